"""Seeded property tests of curation (reflectevo/data/curate.py).

Many random raw records (built with the module's ``make_output`` / ``make_raw_record``, some rewritten to the
older official spellings) are curated and compared with a plain re-statement of the definitions:

* D+  = one row per distinct (stripped, non-empty) reflection of a question whose trial 1 failed and whose
  trial 2 is correct (its first such trial 2);
* D±  = (chosen -> correct trial 2, rejected -> wrong trial 2) for every two distinct reflections of that
  question;
* Dpref = every two distinct reflections with correct trial 2s, ordered by the judge; declined pairs dropped.

Every row carries its own record's trial-1 transcript and trial-1 prompt, the trial-2 prompt exactly as saved,
and no row appears twice. A question's rows go to the side given by ``sha256(str(id))`` (below
``eval_fraction`` -> eval), which is the same for every run and every record order. An id seen again with the
same question is a rerun: the first record wins (so only the rows of de-duplicated inputs are order-free).
"""
from __future__ import annotations

import copy
import hashlib
import itertools
import json
import random

import pytest

from reflectevo.data.curate import (SET_NAMES, curate_file, curate_records, heuristic_preference, make_output,
                                    make_raw_record, split_of)
from reflectevo.data.jsonl import DataError, write_jsonl_atomic
from reflectevo.data.prompts import DEFAULT

SEEDS = range(24)
FILES = [n + s for n in SET_NAMES for s in ("", ".eval")]

# ------------------------------------------------------------------------------------------- random raw data
QUESTION_WORDS = ["triangle", "perimeter", "bakery", "sells", "loaves", "morning", "argument", "assumes",
                  "premise", "function", "returns", "largest", "element", "string", "reverse", "weaken"]


def _reflection_pool(rng: random.Random, question: str, gold: str) -> list[str]:
    """Reflection texts of one question: short and long ones, ones giving the answer away, blanks, and
    whitespace twins (the same reflection once stripped)."""
    q_words = [w for w in question.split() if len(w) >= 4]
    long_text = " ".join(rng.choice(q_words + ["check", "each", "step", "again"]) for _ in range(rng.randint(30, 60)))
    pool = ["Re-read the question and check each step.",
            "Plan: verify the arithmetic before answering.",
            f"The answer is {gold}.",
            "Next time write Finish[x] at the end.",
            "Vérifier l'unité — ne pas oublier les étapes.",
            long_text,
            " ".join(rng.sample(q_words, min(3, len(q_words)))) if q_words else "generic advice",
            "", "   \n"]
    pool.append("  " + pool[0] + "\n")          # the same reflection as pool[0] once stripped
    return pool


def _record(rng: random.Random, rid, question: str | None = None, mbpp: bool | None = None) -> dict:
    mbpp = rng.random() < 0.25 if mbpp is None else mbpp
    if question is None:
        question = " ".join(rng.choice(QUESTION_WORDS) for _ in range(rng.randint(3, 9))) + f" ({rid!r})?"
    gold = rng.choice(["b", "42", "def f(x):\n    return x[::-1]", "ünïcode"])
    item = {"id": rid, "question": question, "answer": gold}
    if mbpp:
        item["test_list"] = [f"assert f({i}) == {i}" for i in range(rng.randint(1, 3))]
    tag = f"{rid!r}/{rng.random():.6f}"   # makes every transcript, prompt and answer of this record unique
    outs = [make_output(1, f"t1-answer {tag}", f"Thought: first try {tag}\nAction: Finish[x]",
                        rng.random() < 0.2, f"TRIAL1-PROMPT {tag}",
                        reasoning_source="base", reflection_source="N/A")]
    pool = _reflection_pool(rng, question, gold)
    history: list[str] = []
    for k in range(rng.randint(0, 6)):
        text = rng.choice(pool)
        history.append(text)
        ok = rng.random() < 0.5
        out = make_output(2, f"t2-answer {k} {'ok' if ok else 'bad'} {tag}",
                          f"Thought: second try {k} {tag}\nAction: Finish[y]", ok,
                          f"TRIAL2-PROMPT {k} {tag}\nreflection: {text.strip()}",
                          reflection=text, reflection_prompt=f"REFLECT-PROMPT {k} {tag} demand 1-{k % 8 + 1}-1",
                          reasoning_source="base", reflection_source="base")
        style = rng.random()
        if style < 0.2:
            out["reflections"] = list(history)         # the whole history: the reflection is its last element
        elif style < 0.3:
            out["reflections"] = text                 # a bare string
        elif style < 0.35:
            out["reflections"] = []                   # no reflection at all
        roll = rng.random()
        if roll < 0.3:
            out["test_reason_prompt"] = f"EVAL-TRIAL2-PROMPT {k} {tag}"
        elif roll < 0.4:
            out["test_reason_prompt"] = rng.choice(["", "  "])   # blank: no eval trial-2 prompt
        outs.append(out)
    rec = make_raw_record(item, outs)
    if rng.random() < 0.2:                            # the official sample's spellings, without prompts
        for out in rec["output"]:
            out["reasoning"] = out.pop("scratchpad")
            out["trial"] = out.pop("trail")
            out.pop("reason_prompt")
            out.pop("reflection_prompt")
    roll = rng.random()
    if roll < 0.3:
        rec["test_reflection_prompt"] = f"<rendered test-time conversation {tag}>"
    elif roll < 0.4:
        rec["test_reflection_prompt"] = " \n"         # blank: the plain test-time prompt is used
    return rec


def _records(seed: int, n: int = 24) -> list[dict]:
    """Records with unique questions per repr(id); some ids are repeated (reruns: same question, other outputs),
    some are int/str twins (7 and "7": two different ids of the JSON file)."""
    rng = random.Random(seed)
    recs: list[dict] = []
    for i in range(n):
        roll = rng.random()
        if recs and roll < 0.15:                      # a rerun appended: same id and question, new outputs
            old = rng.choice(recs)
            recs.append(_record(rng, old["id"], old["question"], "test_list" in old))
        elif recs and roll < 0.2 and isinstance(recs[-1]["id"], int):
            recs.append(_record(rng, str(recs[-1]["id"])))
        else:
            recs.append(_record(rng, rng.choice([seed * 1000 + i, f"q-{seed}-{i}", f"ü{seed}.{i}"])))
    return recs


# -------------------------------------------------------------------------------- the definitions, restated
def _trial_text(out: dict) -> str:
    return out["scratchpad"] if "scratchpad" in out else out.get("reasoning", "")


def _refl_text(out: dict):
    value = out.get("reflections")
    if isinstance(value, list):
        value = value[-1] if value else None
    if value is None:
        return None
    return value.strip() or None


def _first_wins(records):
    kept, seen = [], set()
    for rec in records:
        if repr(rec["id"]) not in seen:
            seen.add(repr(rec["id"]))
            kept.append(rec)
    return kept


def _side(rid, fraction: float) -> str:
    if fraction <= 0:
        return "train"
    value = int(hashlib.sha256(str(rid).encode("utf-8")).hexdigest()[:16], 16)
    return "eval" if value < fraction * 2 ** 64 else "train"


def _expected(records, judge, fraction: float, pair_prompt: str = "test") -> dict[str, list]:
    want = {name: [] for name in FILES}
    for rec in _first_wins(records):
        t1 = rec["output"][0]
        if t1["is_correct"]:
            continue
        seconds = [(_refl_text(o), o) for o in rec["output"][1:]]
        seconds = [(r, o) for r, o in seconds if r is not None]
        first_ok: dict[str, dict] = {}
        first_bad: dict[str, dict] = {}
        for r, o in seconds:
            (first_ok if o["is_correct"] else first_bad).setdefault(r, o)
        stored = rec.get("test_reflection_prompt")
        test_prompt = stored if isinstance(stored, str) and stored.strip() else \
            DEFAULT.test_reflection_prompt(rec, _trial_text(t1))
        common = {"id": rec["id"], "question": rec["question"], "answer": rec["answer"],
                  "first_trial_reasoning": _trial_text(t1), "first_trial_answer": t1["generated_answer"]}
        p1 = t1.get("reason_prompt", "")
        suffix = ".eval" if _side(rec["id"], fraction) == "eval" else ""
        for r, o in first_ok.items():
            row = dict(common, second_trial_reasoning=_trial_text(o), second_trial_answer=o["generated_answer"],
                       reflections=r, reason_prompt=[p1, o.get("reason_prompt", "")],
                       reflect_prompt=o.get("reflection_prompt", ""), test_reflection_prompt=test_prompt)
            if (o.get("test_reason_prompt") or "").strip():
                row["test_trial2_prompt"] = o["test_reason_prompt"]
            want["d_plus" + suffix].append(row)

        def pair(rc, oc, rr, orj):
            return dict(common, second_trial_reasoning_chosen=_trial_text(oc),
                        second_trial_reasoning_rejected=_trial_text(orj),
                        second_trial_answer_chosen=oc["generated_answer"],
                        second_trial_answer_rejected=orj["generated_answer"],
                        reflection_chosen=rc, reflection_rejected=rr, reason_prompt=p1,
                        reflection_prompt=test_prompt if pair_prompt == "test" else oc.get("reflection_prompt", ""))

        for rc, oc in first_ok.items():
            for rr, orj in first_bad.items():
                if rc != rr:
                    want["d_pm" + suffix].append(pair(rc, oc, rr, orj))
        for a, b in itertools.combinations(sorted(first_ok), 2):   # sorted: the judges here are order-free
            verdict = judge(rec, a, b)
            if verdict == 0:
                want["d_pref" + suffix].append(pair(a, first_ok[a], b, first_ok[b]))
            elif verdict == 1:
                want["d_pref" + suffix].append(pair(b, first_ok[b], a, first_ok[a]))
    return want


def _canon(rows) -> list[str]:
    return sorted(json.dumps(r, sort_keys=True, ensure_ascii=False) for r in rows)


def _fake_judge(item, a, b):
    """Deterministic and consistent: the same verdict for (a, b) and (b, a) swapped; declines some pairs with
    values other than 0 and 1."""
    lo, hi = sorted((a, b))
    h = hashlib.sha256(f"{item['id']!r}\x00{lo}\x00{hi}".encode()).digest()
    if h[0] % 4 == 0:
        return (-1, None, 2)[h[1] % 3]
    best = lo if h[2] % 2 else hi
    return 0 if best == a else 1


# -------------------------------------------------------------------------------------------------- properties
def test_generator_covers_the_cases():
    recs = [r for s in SEEDS for r in _records(s)]
    wrong = [r for r in recs if not r["output"][0]["is_correct"]]
    assert any(r["output"][0]["is_correct"] for r in recs) and any("test_list" in r for r in recs)
    assert len({repr(r["id"]) for r in recs}) < len(recs)                     # repeated ids
    assert any(isinstance(r["id"], str) and r["id"].isdigit() for r in recs)  # int/str twins
    refl = [(_refl_text(o), o["is_correct"]) for r in wrong for o in r["output"][1:]]
    assert any(t is None for t, _ in refl) and any(ok for _, ok in refl) and any(not ok for _, ok in refl)
    assert any(len(r["output"]) == 1 for r in wrong) and max(len(r["output"]) for r in recs) == 7
    assert any(len([o for o in r["output"][1:] if _refl_text(o) is not None])
               > len({_refl_text(o) for o in r["output"][1:]} - {None}) for r in wrong)  # identical texts


@pytest.mark.parametrize("seed", SEEDS)
def test_sets_follow_the_definitions(seed):
    recs = _records(seed)
    before = copy.deepcopy(recs)
    asked = []

    def judge(item, a, b):
        asked.append((repr(item["id"]), item["question"], frozenset((a, b))))
        return _fake_judge(item, a, b)

    sets, counts = curate_records(recs, eval_fraction=0.3, judge=judge)
    assert recs == before                                  # the input is left alone
    want = _expected(before, _fake_judge, 0.3)
    assert set(sets) == set(FILES)
    for name in FILES:
        assert _canon(sets[name]) == _canon(want[name]), name
        assert counts[name] == len(sets[name])
    # the judge is asked about each pair of distinct correct reflections once, with the pair's own record
    expected_asks = [(repr(row["id"]), row["question"],
                      frozenset((row["reflection_chosen"], row["reflection_rejected"])))
                     for n in ("d_pref", "d_pref.eval") for row in want[n]]
    assert len(set(asked)) == len(asked) and set(expected_asks) <= set(asked)
    kept = _first_wins(before)
    n_pairs = sum(len(list(itertools.combinations(
        {_refl_text(o) for o in r["output"][1:] if o["is_correct"]} - {None}, 2)))
        for r in kept if not r["output"][0]["is_correct"])
    assert len(asked) == n_pairs
    assert counts["records"] == len(kept) and counts["duplicates"] == len(before) - len(kept)
    assert counts["trial1_correct"] == sum(bool(r["output"][0]["is_correct"]) for r in kept)
    assert counts["trial1_wrong"] == len(kept) - counts["trial1_correct"]


@pytest.mark.parametrize("seed", SEEDS[:12])
def test_default_heuristic_and_raw_pair_prompts(seed):
    recs = _records(seed + 100)
    sets, _ = curate_records(copy.deepcopy(recs), eval_fraction=0.5, pair_prompt="raw")
    want = _expected(recs, heuristic_preference, 0.5, pair_prompt="raw")
    for name in FILES:
        assert _canon(sets[name]) == _canon(want[name]), name


def test_heuristic_is_consistent_under_swap():
    for seed in SEEDS:
        for rec in _records(seed):
            texts = sorted({_refl_text(o) for o in rec["output"][1:]} - {None})
            for a, b in itertools.combinations(texts, 2):
                ab, ba = heuristic_preference(rec, a, b), heuristic_preference(rec, b, a)
                assert (ab, ba) in ((0, 1), (1, 0), (-1, -1)), (a, b)


@pytest.mark.parametrize("seed", SEEDS[:12])
def test_rows_carry_their_own_trial1_and_saved_prompts(seed):
    """Paper defects 1 and 2: every row's trial 1 is its own record's trial 1 (never some trial 2), and the
    prompts are those saved with the raw record."""
    recs = _records(seed + 200)
    sets, _ = curate_records(copy.deepcopy(recs), eval_fraction=0.2, judge=_fake_judge)
    by_id = {repr(r["id"]): r for r in _first_wins(recs)}
    every_trial2 = {_trial_text(o) for r in recs for o in r["output"][1:]}
    for name, rows in sets.items():
        for row in rows:
            rec = by_id[repr(row["id"])]
            t1 = rec["output"][0]
            assert not t1["is_correct"]
            assert row["question"] == rec["question"] and row["answer"] == rec["answer"]
            assert row["first_trial_reasoning"] == _trial_text(t1) and row["first_trial_reasoning"] not in every_trial2
            assert row["first_trial_answer"] == t1["generated_answer"]
            own = {(_refl_text(o), _trial_text(o), o["generated_answer"], o["is_correct"]) for o in rec["output"][1:]}
            prompt_of = {_trial_text(o): o.get("reason_prompt", "") for o in rec["output"][1:]}
            if name.startswith("d_plus"):
                assert (row["reflections"], row["second_trial_reasoning"], row["second_trial_answer"], True) in own
                assert row["reason_prompt"] == [t1.get("reason_prompt", ""), prompt_of[row["second_trial_reasoning"]]]
                assert row["second_trial_answer"] not in row["reason_prompt"][1]   # saved before the answer
                assert _trial_text(t1).strip() in row["test_reflection_prompt"] \
                    or row["test_reflection_prompt"] == rec.get("test_reflection_prompt")
                assert not any(t in row["test_reflection_prompt"] for t in every_trial2)
            else:
                assert (row["reflection_chosen"], row["second_trial_reasoning_chosen"],
                        row["second_trial_answer_chosen"], True) in own
                ok_rejected = name.startswith("d_pref")
                assert (row["reflection_rejected"], row["second_trial_reasoning_rejected"],
                        row["second_trial_answer_rejected"], ok_rejected) in own
                assert row["reflection_chosen"] != row["reflection_rejected"]
                assert row["reason_prompt"] == t1.get("reason_prompt", "")
                assert not any(t in row["reflection_prompt"] for t in every_trial2)


@pytest.mark.parametrize("seed", SEEDS[:12])
def test_no_row_twice_and_one_order_per_pair(seed):
    sets, _ = curate_records(_records(seed + 300), eval_fraction=0.4, judge=_fake_judge)
    for name in FILES:
        canon = [json.dumps(r, sort_keys=True) for r in sets[name]]
        assert len(set(canon)) == len(canon), name
    plus = [(repr(r["id"]), r["reflections"]) for n in ("d_plus", "d_plus.eval") for r in sets[n]]
    assert len(set(plus)) == len(plus)
    for kind in ("d_pm", "d_pref"):
        keys = [(repr(r["id"]), r["reflection_chosen"], r["reflection_rejected"])
                for n in (kind, kind + ".eval") for r in sets[n]]
        assert len(set(keys)) == len(keys)
        if kind == "d_pref":
            assert not {(i, b, a) for i, a, b in keys} & set(keys)


@pytest.mark.parametrize("seed", SEEDS[:12])
def test_split_is_by_question_and_order_free(seed):
    recs = _first_wins(_records(seed + 400, n=40))
    fraction = 0.35
    sets, _ = curate_records(copy.deepcopy(recs), eval_fraction=fraction, judge=_fake_judge)
    for name in FILES:
        for row in sets[name]:
            side = "eval" if name.endswith(".eval") else "train"
            assert side == _side(row["id"], fraction) == split_of(row["id"], fraction)
    sides = {}
    for name in FILES:
        for row in sets[name]:
            sides.setdefault(str(row["id"]), set()).add(name.endswith(".eval"))
    assert all(len(s) == 1 for s in sides.values())
    again, _ = curate_records(copy.deepcopy(recs), eval_fraction=fraction, judge=_fake_judge)
    assert again == sets                                   # same input, same rows in the same order
    shuffled = copy.deepcopy(recs)
    random.Random(seed).shuffle(shuffled)
    moved, _ = curate_records(shuffled, eval_fraction=fraction, judge=_fake_judge)
    for name in FILES:                                     # record order changes the row order only
        assert _canon(moved[name]) == _canon(sets[name]), name
    none_eval, _ = curate_records(copy.deepcopy(recs), eval_fraction=0.0, judge=_fake_judge)
    for kind in SET_NAMES:
        assert none_eval[kind + ".eval"] == []
        assert _canon(none_eval[kind]) == _canon(sets[kind] + sets[kind + ".eval"])


def test_rerun_keeps_the_first_record_of_an_id():
    rng = random.Random(7)
    first = _record(rng, "dup", "Same question?")
    first["output"][0]["is_correct"] = False
    later = _record(rng, "dup", "Same question?")
    later["output"][0]["is_correct"] = False
    sets, counts = curate_records([copy.deepcopy(first), copy.deepcopy(later)], eval_fraction=0.0)
    alone, _ = curate_records([copy.deepcopy(first)], eval_fraction=0.0)
    assert counts["records"] == 1 and counts["duplicates"] == 1 and sets == alone
    clash = dict(copy.deepcopy(later), question="Another question?")
    with pytest.raises(DataError, match="another question"):
        curate_records([copy.deepcopy(first), clash], eval_fraction=0.0)


@pytest.mark.parametrize("seed", SEEDS[:6])
def test_curate_file_counts_lines_and_is_byte_stable(seed, tmp_path):
    recs = [r for s in range(3) for r in _records(seed * 10 + s + 500)]
    recs = _first_wins(recs) + [copy.deepcopy(r) for r in recs[:3]]   # exact reruns at the end
    raw = tmp_path / "raw.jsonl"
    write_jsonl_atomic(raw, recs)
    counts = curate_file(raw, tmp_path / "a", eval_fraction=0.25, judge=_fake_judge)
    in_memory, mem_counts = curate_records(copy.deepcopy(recs), eval_fraction=0.25, judge=_fake_judge)
    assert counts == mem_counts
    first_bytes = {}
    for name in FILES:
        data = (tmp_path / "a" / f"{name}.jsonl").read_bytes()
        first_bytes[name] = data
        lines = data.decode("utf-8").splitlines()
        assert counts[name] == len(lines) == data.count(b"\n")
        assert [json.loads(line) for line in lines] == json.loads(json.dumps(in_memory[name]))
    assert sum(counts[n] for n in FILES) > 0
    assert curate_file(raw, tmp_path / "a", eval_fraction=0.25, judge=_fake_judge) == counts   # over itself
    assert curate_file(raw, tmp_path / "b", eval_fraction=0.25, judge=_fake_judge) == counts
    for name in FILES:
        assert (tmp_path / "a" / f"{name}.jsonl").read_bytes() == first_bytes[name]
        assert (tmp_path / "b" / f"{name}.jsonl").read_bytes() == first_bytes[name]


class _FalsyJudge:
    """A judge object that is falsy (here: an empty verdict cache with ``__len__``), declining every pair."""

    def __init__(self):
        self.asked = []

    def __len__(self):
        return 0

    def __call__(self, item, a, b):
        self.asked.append((a, b))
        return -1


def test_a_falsy_judge_is_still_the_judge():
    """Regression: ``judge or heuristic_preference`` replaced a given judge that is falsy (e.g. a callable with
    ``__len__`` returning 0) by the heuristic, which then ordered pairs the judge would have declined."""
    outs = [make_output(1, "x", "T1", False, "p1"),
            make_output(2, "a", "T2a", True, "p2a", "alpha plan"),
            make_output(2, "a", "T2b", True, "p2b", "beta plan, a longer one")]
    judge = _FalsyJudge()
    sets, counts = curate_records([make_raw_record({"id": 1, "question": "Q?", "answer": "a"}, outs)],
                                  eval_fraction=0.0, judge=judge)
    assert judge.asked == [("alpha plan", "beta plan, a longer one")]
    assert counts["d_pref"] == 0 and sets["d_pref"] == []
