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


def test_curate_leaves_out_a_torn_last_line_and_leaves_the_file_alone(tmp_path, capsys):
    import json

    import pytest

    from reflectevo.data.curate import curate_file
    from reflectevo.data.jsonl import DataError

    recs = [_record([("plan one", True), ("bad plan", False)]) for _ in range(3)]
    for i, r in enumerate(recs):
        r["id"] = f"q{i}"
    lines = [json.dumps(r) for r in recs]
    raw = tmp_path / "raw.jsonl"
    raw.write_text("\n".join(lines[:2]) + "\n" + lines[2][:40])  # a generate run killed mid-line
    before = raw.read_bytes()
    counts = curate_file(raw, tmp_path / "sets", eval_fraction=0.0)
    assert counts["records"] == 2 and counts["d_plus"] == 2 and raw.read_bytes() == before
    assert "raw.jsonl:3: incomplete last line" in capsys.readouterr().err
    raw.write_text(lines[0] + "\n" + lines[2][:40] + "\n" + lines[1] + "\n")  # torn in the middle: bad data
    with pytest.raises(DataError, match=r"raw\.jsonl:2: malformed JSON"):
        curate_file(raw, tmp_path / "sets2", eval_fraction=0.0)


def test_is_correct_and_trial_of_another_type_are_clear_errors(tmp_path):
    """A string "false" is truthy: it would have put a wrong trial 2 in D+; a string "2" dropped the trial."""
    import json

    import pytest

    from reflectevo.data.curate import curate_file
    from reflectevo.data.jsonl import DataError

    for field, value, message in (("is_correct", "false", r"output\[1\]\.is_correct is 'false'"),
                                  ("is_correct", None, r"output\[1\]\.is_correct is None"),
                                  ("trail", "2", r"output\[1\]\.trail is '2'; expected 1 or 2"),
                                  ("trail", 3, r"output\[1\]\.trail is 3")):
        good, bad = _record([("plan one", True)]), _record([("plan one", True)])
        good["id"] = "q0"
        bad["output"][1][field] = value
        raw = tmp_path / f"raw-{field}-{value}.jsonl"
        raw.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
        with pytest.raises(DataError, match=rf"raw-{field}-{value}\.jsonl:2: {message}"):
            curate_file(raw, tmp_path / "sets", eval_fraction=0.0)
    rec = _record([("plan one", True)])
    rec["output"][1]["is_correct"] = 1                      # 0 / 1 as JSON numbers stay accepted
    assert curate_records([rec], eval_fraction=0.0)[1]["d_plus"] == 1
