"""Evaluation runs: Acc@t1, Acc@t2 and their difference with the paper's definitions.

    result = run_eval(task, items, trial_engine, reflect_engine, tokenizer, "RESULT.json", ...)

* Trial 1 (greedy) from the generator; trial-1 outputs can be reused from a cache file keyed by id
  (``trial1_cache``: any raw JSONL whose records carry ``output[0]``, e.g. an earlier eval's raw file or a
  generate RAW.jsonl) so that settings are compared on the same first trials. Missing ids are computed and
  appended to the cache file.
* One reflection per wrong trial 1 with the test-time reflection prompt (no demand), from the reflector (the
  adapter model with ``--adapter``; trials always from the base model), then trial 2 (greedy) from the
  trial-1 transcript.
* Acc@t2 = (correct at t1 + wrong at t1 but correct at trial 2 with the first reflection) / N
  (``reflectevo.data.evaluate.evaluate_records``); for free-text BIG-bench the token-F1 gain too.

The raw records of the run go to ``RESULT.raw.jsonl`` beside RESULT.json (rewritten unless ``resume``), the
result JSON is written atomically.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from ..atomic import atomic_write_bytes
from .evaluate import evaluate_records, format_table
from .jsonl import DataError, append_jsonl, iter_jsonl, read_jsonl
from .loop import LoopConfig, ReflectLoop

__all__ = ["run_eval", "load_trial1_cache", "raw_path_for", "check_trial1_cache", "write_json_atomic",
           "format_table"]


def raw_path_for(out_json) -> Path:
    out_json = Path(out_json)
    name = out_json.name[:-5] if out_json.name.endswith(".json") else out_json.name
    return out_json.with_name(name + ".raw.jsonl")


def check_trial1_cache(out_json, trial1_cache) -> None:
    """Refuse a trial-1 cache that is this run's own raw file (the run would rewrite it, then append
    trial-1-only duplicates of every record to it)."""
    if trial1_cache is not None and Path(trial1_cache).resolve() == raw_path_for(out_json).resolve():
        raise DataError(f"--trial1-cache {trial1_cache}: is the raw file of this run's own --out {out_json}; "
                        "pass another file (e.g. an earlier run's raw file, copied)")


def write_json_atomic(path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n").encode("utf-8"))


def load_trial1_cache(path) -> dict:
    """id -> trial-1 output entry (``output[0]``) with the record's question kept for a consistency check."""
    cache = {}
    if path is None or not Path(path).exists():
        return cache
    for line, rec in iter_jsonl(path, ("id", "question", "output")):
        out = rec["output"]
        if not isinstance(out, list) or not out or not isinstance(out[0], dict):
            raise DataError(f"{path}:{line}: 'output' must be a non-empty list of trial entries")
        for f in ("is_correct", "scratchpad"):
            if f not in out[0]:
                raise DataError(f"{path}:{line}: output[0] missing field {f!r}")
        if int(out[0].get("trail", out[0].get("trial", 1))) != 1:
            raise DataError(f"{path}:{line}: output[0] is not a trial-1 entry")
        cache[rec["id"]] = {"question": rec["question"], "entry": out[0]}
    return cache


def run_eval(task, items: list[dict], trial_engine, reflect_engine, tokenizer, out_json,
             cfg: LoopConfig | None = None, trial1_cache=None, resume: bool = False, prompts=None,
             meta: dict | None = None, log=None) -> dict:
    """Evaluate on ``items``; writes RESULT.json (+ RESULT.raw.jsonl) and returns the result dict."""
    cfg = cfg or LoopConfig()
    cfg.test_time = True
    cfg.n_reflections = 1
    out_json = Path(out_json)
    check_trial1_cache(out_json, trial1_cache)
    raw = raw_path_for(out_json)
    if raw.exists() and not resume:
        raw.unlink()
    cache_raw = load_trial1_cache(trial1_cache)
    cache = {}
    for item in items:
        hit = cache_raw.get(item["id"])
        if hit is None:
            continue
        if hit["question"] != item["question"]:
            raise DataError(f"{trial1_cache}: id {item['id']!r} has another question than the test data "
                            "(a trial-1 cache from another data set?)")
        cache[item["id"]] = hit["entry"]
    kwargs = {} if log is None else {"log": log}
    loop = ReflectLoop(task, trial_engine, reflect_engine, tokenizer, cfg, prompts=prompts, **kwargs)
    start = time.perf_counter()
    stats = loop.run(items, raw, trial1_cache=cache)
    wanted = {repr(it["id"]) for it in items}
    records = [r for r in read_jsonl(raw) if repr(r["id"]) in wanted]
    if trial1_cache is not None:
        for rec in records:
            if rec["id"] not in cache_raw:
                append_jsonl(trial1_cache, {"id": rec["id"], "question": rec["question"], "answer": rec["answer"],
                                            "output": [rec["output"][0]]})
    result = evaluate_records(records, task)
    result.update({"trial1_from_cache": len(cache), "raw": str(raw), "seconds": time.perf_counter() - start,
                   "settings": {"seed": cfg.seed, "max_tokens": cfg.max_tokens,
                                "reflection_max_tokens": cfg.reflection_max_tokens,
                                "reflection_temperature": cfg.reflection_temperature,
                                "reflection_top_p": cfg.reflection_top_p,
                                "reasoning_source": cfg.reasoning_source,
                                "reflection_source": cfg.reflection_source},
                   "forced_actions": stats.get("forced_actions", 0)})
    if meta:
        result.update(meta)
    write_json_atomic(out_json, result)
    return result
