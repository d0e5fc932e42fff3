"""Evaluation metrics from raw generation records (the pure part; no model here).

With N questions:

* Acc@t1 = (trial 1 correct) / N;
* Acc@t2 = (trial 1 correct + trial 1 wrong but the trial 2 of the FIRST reflection correct) / N
  (a question whose trial 1 is wrong and has no trial 2 counts as wrong);
* delta = Acc@t2 - Acc@t1.

All three are percentages (0-100, like the paper's tables). For free-text BIG-bench items (``task`` =
"bigbench" or "bigbench-free"), F1@t1 / F1@t2 are the mean SQuAD token F1 (percent) of the trial-1 answer and
of the answer counted for Acc@t2, over the free-text items, and ``f1_gain`` their difference.
"""
from __future__ import annotations

from typing import Iterable, Mapping

from .jsonl import DataError, iter_jsonl
from .verifiers import f1_score

__all__ = ["evaluate_records", "evaluate_file", "format_table"]


def _trial(out: dict) -> int:
    return int(out.get("trail", out.get("trial", 2)))


def evaluate_records(records: Iterable[dict], task=None) -> dict:
    """Acc@t1, Acc@t2, delta (percent) and counts from raw records (see module docstring)."""
    task_name = getattr(task, "name", task)
    free_text = task_name in ("bigbench", "bigbench-free")
    n = t1_correct = fixed = 0
    f1_t1 = f1_t2 = 0.0
    n_free = 0
    for i, rec in enumerate(records):
        outputs = rec.get("output") if isinstance(rec, dict) else None
        if not outputs:
            raise DataError(f"record {i + 1} (id {rec.get('id') if isinstance(rec, dict) else None!r}): "
                            "missing or empty 'output'")
        n += 1
        first = outputs[0]
        seconds = [o for o in outputs[1:] if _trial(o) == 2]
        counted = first
        if bool(first.get("is_correct")):
            t1_correct += 1
        elif seconds:
            counted = seconds[0]
            if bool(seconds[0].get("is_correct")):
                fixed += 1
        if free_text:
            from .tasks import bigbench_kind

            if bigbench_kind(rec.get("question", ""), str(rec.get("answer", ""))) == "free":
                n_free += 1
                a1 = first.get("generated_answer")
                a2 = counted.get("generated_answer")
                f1_t1 += f1_score(None if a1 is None else str(a1), str(rec["answer"]))
                f1_t2 += f1_score(None if a2 is None else str(a2), str(rec["answer"]))
    pct = (lambda k: 100.0 * k / n) if n else (lambda k: 0.0)
    result = {"task": task_name, "n": n, "acc_t1": pct(t1_correct), "acc_t2": pct(t1_correct + fixed),
              "delta": pct(fixed), "t1_correct": t1_correct, "t2_fixed": fixed}
    if free_text:
        result["n_free"] = n_free
        if n_free:
            result["f1_t1"] = 100.0 * f1_t1 / n_free
            result["f1_t2"] = 100.0 * f1_t2 / n_free
            result["f1_gain"] = result["f1_t2"] - result["f1_t1"]
    return result


def evaluate_file(path, task=None) -> dict:
    """:func:`evaluate_records` on a raw JSONL file (errors name the file and line)."""
    records = []
    for line_no, rec in iter_jsonl(path, ("output",)):
        if not isinstance(rec["output"], list) or not rec["output"]:
            raise DataError(f"{path}:{line_no}: 'output' must be a non-empty list of trials")
        records.append(rec)
    return evaluate_records(records, task)


def format_table(results: Mapping[str, dict] | Iterable[dict]) -> str:
    """A plain-text table of results (a mapping name -> result, or a list of results named by their task)."""
    rows = list(results.items()) if isinstance(results, Mapping) else [(r.get("task") or "?", r) for r in results]
    with_f1 = any(r.get("f1_t1") is not None for _, r in rows)  # free-text items only (BIG-bench)
    header = ["name", "N", "Acc@t1", "Acc@t2", "delta"] + ["F1@t1", "F1@t2", "F1 gain"] * with_f1

    def fmt(r: dict, key: str) -> str:
        v = r.get(key)
        return "-" if v is None else (f"{v:+.1f}" if key in ("delta", "f1_gain") else f"{v:.1f}")

    table = [header] + [[str(name), str(r.get("n", "-")), fmt(r, "acc_t1"), fmt(r, "acc_t2"), fmt(r, "delta")]
                        + [fmt(r, "f1_t1"), fmt(r, "f1_t2"), fmt(r, "f1_gain")] * with_f1 for name, r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
