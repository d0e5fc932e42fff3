"""Curation edge cases: repeated reflection texts among a question's trial 2s."""
from reflectevo.data.curate import curate_records, make_output, make_raw_record


def _record(trials):
    """trials: (reflection, correct) per trial 2; trial 1 is always wrong."""
    outs = [make_output(1, "x", "Thought: t\nAction: Finish[x]", False, "p1")]
    for i, (refl, ok) in enumerate(trials):
        answer = "y" if ok else "z"
        outs.append(make_output(2, answer, f"Thought: {i}\nAction: Finish[{answer}]", ok, f"p2-{i}", refl, "rp"))
    return make_raw_record({"id": "q", "question": "Pick one. A.x B.y", "answer": "y"}, outs)


def test_repeated_reflections_give_each_pair_once():
    calls = []

    def judge(item, a, b):
        calls.append((a, b))
        return 0

    rec = _record([("plan one", True), ("plan one", True), ("plan two", True), ("bad plan", False),
                   ("bad plan", False)])
    sets, counts = curate_records([rec], eval_fraction=0.0, judge=judge)
    assert [r["reflections"] for r in sets["d_plus"]] == ["plan one", "plan two"]
    assert [(r["reflection_chosen"], r["reflection_rejected"]) for r in sets["d_pm"]] == [
        ("plan one", "bad plan"), ("plan two", "bad plan")]
    assert calls == [("plan one", "plan two")]
    assert [(r["reflection_chosen"], r["reflection_rejected"]) for r in sets["d_pref"]] == [
        ("plan one", "plan two")]
    assert (counts["d_plus"], counts["d_pm"], counts["d_pref"]) == (2, 2, 1)
