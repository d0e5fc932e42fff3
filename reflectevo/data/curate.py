"""Curation: raw generation records -> D+, D± and Dpref (official field names), with a deterministic split.

Raw record (one per question): ``id, question, answer, [test_list], output: [...]``; ``output[0]`` is trial 1
and each further entry is the trial 2 of one reflection, with ``generated_answer, reflections (list),
scratchpad, is_correct, error, trail (1|2), reasoning_source, reflection_source, reason_prompt,
reflection_prompt``. The older spellings of the official sample (``reasoning`` for ``scratchpad``, ``trial``
for ``trail``) are accepted. Only questions whose trial 1 is wrong contribute; a trial 2's reflection is the
last element of its ``reflections``.

* D+ (``d_plus``): one record per trial 2 that became correct (identical reflections counted once):
  ``id, question, answer, first_trial_reasoning, first_trial_answer, second_trial_reasoning,
  second_trial_answer, reflections`` (the reflection text), ``reason_prompt`` ([trial-1 prompt, trial-2
  prompt]), ``reflect_prompt`` (the prompt the reflection was sampled with: data generation, with a demand)
  and one field of ours, ``test_reflection_prompt``: the test-time reflection prompt on the trial-1 transcript
  (the prompt the reflector gets at evaluation; the same text as the pairs' default ``reflection_prompt``),
  and, when the raw trial-2 entry has it (our loop's ``test_reason_prompt``), ``test_trial2_prompt``: that trial
  2's prompt as eval renders it (after the test-time reflection request; the "correct" SFT stage's prompt).
* D± (``d_pm``): every (correct, wrong) pair of distinct reflections of the same question: chosen = the
  reflection whose trial 2 is correct, rejected = one whose trial 2 is still wrong.
* Dpref (``d_pref``): every pair of distinct reflections whose trial 2s are both correct, ordered by ``judge``
  (or by :func:`heuristic_preference` when no judge is given); pairs the judge declines (returns neither 0
  nor 1) are dropped.
  Both pair sets use ``id, question, answer, first_trial_reasoning, first_trial_answer,
  second_trial_reasoning_{chosen,rejected}, second_trial_answer_{chosen,rejected},
  reflection_{chosen,rejected}, reason_prompt`` (trial-1 prompt) and ``reflection_prompt``: by default
  (``pair_prompt="test"``) the test-time reflection prompt on the trial-1 transcript, which is what the
  reflector sees at evaluation time: the rendered conversation our loop stores in the raw record
  (``test_reflection_prompt``), else the test-time request with question and transcript as one plain message
  (``Prompts.test_reflection_prompt``); ``pair_prompt="raw"`` keeps the prompt the reflections were sampled with.

A record is one question: an id seen again with the same question is counted in ``duplicates`` and left out;
with another question it is an error naming both lines (ids of files without official ids are line numbers).

Split: a question goes to evaluation when ``sha256(str(id))`` maps below ``eval_fraction``, so all records of
one question land on the same side and the split never changes between runs. Files written atomically:
``d_plus.jsonl, d_pm.jsonl, d_pref.jsonl`` (train) and ``d_plus.eval.jsonl, d_pm.eval.jsonl,
d_pref.eval.jsonl`` (evaluation).
"""
from __future__ import annotations

import hashlib
import itertools
import re
from pathlib import Path
from typing import Callable, Iterable

from .jsonl import DataError, iter_jsonl, write_jsonl_atomic
from .prompts import DEFAULT, Prompts

__all__ = ["curate_records", "curate_file", "split_of", "heuristic_preference", "make_output", "make_raw_record",
           "SET_NAMES"]

SET_NAMES = ("d_plus", "d_pm", "d_pref")
Judge = Callable[[dict, str, str], int]


def make_output(trial: int, answer: str | None, transcript: str, is_correct: bool, reason_prompt: str,
                reflection: str | None = None, reflection_prompt: str = "", error: str = "",
                reasoning_source: str = "", reflection_source: str = "") -> dict:
    """One entry of a raw record's ``output`` list in the official schema (``trail`` is the trial number).

    ``transcript`` is the trial's Thought/Action/Observation text; ``reason_prompt`` and ``reflection_prompt``
    must be the prompts exactly as the model saw them.
    """
    if trial not in (1, 2):
        raise DataError(f"trial must be 1 or 2, got {trial!r}")
    return {"generated_answer": "" if answer is None else answer,
            "reflections": [] if reflection is None else [reflection], "scratchpad": transcript,
            "is_correct": bool(is_correct), "error": error, "trail": trial, "reasoning_source": reasoning_source,
            "reflection_source": reflection_source, "reason_prompt": reason_prompt,
            "reflection_prompt": reflection_prompt}


def make_raw_record(item: dict, outputs: list[dict]) -> dict:
    """A raw record: ``id, question, answer, [test_list], output`` (``outputs[0]`` = trial 1)."""
    rec = {"id": item["id"], "question": item["question"], "answer": item["answer"]}
    if "test_list" in item:
        rec["test_list"] = item["test_list"]
    rec["output"] = list(outputs)
    return rec


def split_of(item_id, eval_fraction: float) -> str:
    """ "eval" or "train" for a question id, stable across runs and machines."""
    if eval_fraction <= 0:
        return "train"
    h = int.from_bytes(hashlib.sha256(str(item_id).encode("utf-8")).digest()[:8], "big") / 2.0 ** 64
    return "eval" if h < eval_fraction else "train"


def _field(out: dict, *names, default=None):
    for n in names:
        if n in out:
            return out[n]
    return default


def _reasoning(out: dict) -> str:
    return _field(out, "scratchpad", "reasoning", default="") or ""


def _reflection(out: dict) -> str | None:
    refl = out.get("reflections")
    if isinstance(refl, str):
        return refl.strip() or None
    if isinstance(refl, list) and refl:
        return str(refl[-1]).strip() or None
    return None


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def heuristic_preference(item: dict, refl_a: str, refl_b: str) -> int:
    """0 if ``refl_a`` is preferred, 1 if ``refl_b``, -1 when they cannot be told apart.

    Score = -2 when the reflection gives the answer away (an action such as ``Finish[``/``<<<``/``[BEGIN]``,
    or "answer is <gold>"), +1 when its length is within 30-200 words (the prompt asks for ~100), plus the
    share of the question's content words (4+ letters) it mentions (specific beats generic). Ties go to
    the shorter reflection; equal length too -> -1.
    """
    gold = str(item.get("answer", "")).strip().lower()
    q_words = {w for w in _words(str(item.get("question", ""))) if len(w) >= 4}

    def score(text: str) -> float:
        low = text.lower()
        s = 0.0
        if re.search(r"finish\s*[\[<]|<<<|\[begin\]", low) or (
                gold and len(gold) < 40 and re.search(r"answer\s+(?:is|should be)\s*[:(\[]?\s*" + re.escape(gold)
                                                      + r"\b", low)):
            s -= 2.0
        n = len(_words(text))
        if 30 <= n <= 200:
            s += 1.0
        if q_words:
            s += len(q_words & set(_words(text))) / len(q_words)
        return s

    sa, sb = score(refl_a), score(refl_b)
    if sa != sb:
        return 0 if sa > sb else 1
    la, lb = len(_words(refl_a)), len(_words(refl_b))
    if la != lb:
        return 0 if la < lb else 1
    return -1


def _check_record(rec: dict, where: str) -> None:
    for f in ("id", "question", "answer", "output"):
        if f not in rec:
            raise DataError(f"{where}: missing field {f!r}")
    if not isinstance(rec["output"], list) or not rec["output"]:
        raise DataError(f"{where}: 'output' must be a non-empty list of trials")
    for i, out in enumerate(rec["output"]):
        if not isinstance(out, dict):
            raise DataError(f"{where}: output[{i}] is not an object")
        for f in ("is_correct", "generated_answer"):
            if f not in out:
                raise DataError(f"{where}: output[{i}] missing field {f!r}")
        if not isinstance(out["is_correct"], (bool, int)) or out["is_correct"] not in (0, 1):
            raise DataError(f"{where}: output[{i}].is_correct is {out['is_correct']!r}; expected true or false")
        trial = _field(out, "trail", "trial", default=None)
        if trial is not None and (isinstance(trial, bool) or trial not in (1, 2)):
            raise DataError(f"{where}: output[{i}].trail is {trial!r}; expected 1 or 2")


def _distinct(trials: list[tuple]) -> list[tuple]:
    """The (reflection, output) pairs with each reflection text kept once (its first trial 2)."""
    seen, kept = set(), []
    for refl, out in trials:
        if refl not in seen:
            seen.add(refl)
            kept.append((refl, out))
    return kept


def _curate_one(rec: dict, judge: Judge | None, prompts: Prompts, pair_prompt: str) -> dict[str, list]:
    outputs = rec["output"]
    first = outputs[0]
    result: dict[str, list] = {name: [] for name in SET_NAMES}
    if bool(first["is_correct"]):
        return result
    seconds = []
    for out in outputs[1:]:
        if _field(out, "trail", "trial", default=2) != 2:
            continue
        refl = _reflection(out)
        if refl is not None:
            seconds.append((refl, out))
    base = {"id": rec["id"], "question": rec["question"], "answer": rec["answer"],
            "first_trial_reasoning": _reasoning(first), "first_trial_answer": first["generated_answer"]}
    first_prompt = _field(first, "reason_prompt", default="") or ""
    correct = _distinct([(r, o) for r, o in seconds if bool(o["is_correct"])])
    wrong = _distinct([(r, o) for r, o in seconds if not bool(o["is_correct"])])
    stored = rec.get("test_reflection_prompt")
    test_prompt = stored if isinstance(stored, str) and stored.strip() else \
        prompts.test_reflection_prompt(rec, _reasoning(first))
    for refl, out in correct:
        row = {**base, "second_trial_reasoning": _reasoning(out), "second_trial_answer": out["generated_answer"],
               "reflections": refl, "reason_prompt": [first_prompt, _field(out, "reason_prompt", default="") or ""],
               "reflect_prompt": _field(out, "reflection_prompt", default="") or "",
               "test_reflection_prompt": test_prompt}
        test_trial2 = out.get("test_reason_prompt")
        if isinstance(test_trial2, str) and test_trial2.strip():
            row["test_trial2_prompt"] = test_trial2
        result["d_plus"].append(row)

    def pair(chosen, rejected) -> dict:
        (rc, oc), (rr, orj) = chosen, rejected
        prompt = test_prompt if pair_prompt == "test" else (_field(oc, "reflection_prompt", default="") or "")
        return {**base, "second_trial_reasoning_chosen": _reasoning(oc),
                "second_trial_reasoning_rejected": _reasoning(orj),
                "second_trial_answer_chosen": oc["generated_answer"],
                "second_trial_answer_rejected": orj["generated_answer"],
                "reflection_chosen": rc, "reflection_rejected": rr,
                "reason_prompt": first_prompt, "reflection_prompt": prompt}

    for c, w in itertools.product(correct, wrong):
        if c[0] != w[0]:
            result["d_pm"].append(pair(c, w))
    for a, b in itertools.combinations(correct, 2):
        if a[0] == b[0]:
            continue
        choice = (heuristic_preference if judge is None else judge)(rec, a[0], b[0])
        if choice == 0:
            result["d_pref"].append(pair(a, b))
        elif choice == 1:
            result["d_pref"].append(pair(b, a))
    return result


def curate_records(records: Iterable[dict], eval_fraction: float = 0.1, judge: Judge | None = None,
                   prompts: Prompts | None = None, pair_prompt: str = "test", source: str = "records"
                   ) -> tuple[dict[str, list], dict[str, int]]:
    """Curate raw records; returns ({"d_plus": [...], "d_plus.eval": [...], ...}, counts)."""
    if not 0.0 <= eval_fraction < 1.0:
        raise DataError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    if pair_prompt not in ("test", "raw"):
        raise DataError(f"pair_prompt must be 'test' or 'raw', got {pair_prompt!r}")
    prompts = prompts or DEFAULT
    sets: dict[str, list] = {}
    for name in SET_NAMES:
        sets[name], sets[name + ".eval"] = [], []
    counts = {"records": 0, "duplicates": 0, "trial1_correct": 0, "trial1_wrong": 0}
    seen: dict[str, tuple[str, str]] = {}   # repr(id) -> (question, where)
    for index, rec in enumerate(records):
        where = rec.pop("__where__", f"{source}:{index + 1}") if isinstance(rec, dict) else f"{source}:{index + 1}"
        if not isinstance(rec, dict):
            raise DataError(f"{where}: expected a JSON object")
        _check_record(rec, where)
        first = seen.setdefault(repr(rec["id"]), (rec["question"], where))
        if first[1] != where:
            if first[0] != rec["question"]:
                raise DataError(f"{where}: id {rec['id']!r} is also on {first[1]} with another question (records "
                                "of two data files in one raw file?); curate them from separate raw files")
            counts["duplicates"] += 1  # the same question again (a rerun appended to the file): counted once
            continue
        counts["records"] += 1
        counts["trial1_correct" if bool(rec["output"][0]["is_correct"]) else "trial1_wrong"] += 1
        suffix = ".eval" if split_of(rec["id"], eval_fraction) == "eval" else ""
        for name, rows in _curate_one(rec, judge, prompts, pair_prompt).items():
            sets[name + suffix].extend(rows)
    for name, rows in sets.items():
        counts[name] = len(rows)
    return sets, counts


def curate_file(raw_path, out_dir, eval_fraction: float = 0.1, judge: Judge | None = None,
                prompts: Prompts | None = None, pair_prompt: str = "test", ids=None) -> dict[str, int]:
    """Curate a raw JSONL file into ``out_dir`` (see module docstring for the file names); returns counts.
    ``ids``: curate only the records with these ids (others in the file are left out)."""
    wanted = None if ids is None else {repr(i) for i in ids}

    def records():
        for line_no, rec in iter_jsonl(raw_path, torn_tail_ok=True):
            if wanted is None or repr(rec.get("id")) in wanted:
                rec["__where__"] = f"{raw_path}:{line_no}"
                yield rec

    sets, counts = curate_records(records(), eval_fraction, judge, prompts, pair_prompt, source=str(raw_path))
    if not counts["records"]:  # nothing to curate: an error (like generate's "no questions"), no empty sets
        raise DataError(f"{raw_path}: no records"
                        + ("" if wanted is None else f" with the {len(wanted)} requested ids"))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in sets.items():
        write_jsonl_atomic(out / f"{name}.jsonl", rows)
    return counts
