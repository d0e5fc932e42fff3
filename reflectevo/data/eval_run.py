"""Evaluation runs: Acc@t1, Acc@t2 and their difference with the paper's definitions.

    result = run_eval(task, items, trial_engine, reflect_engine, tokenizer, "RESULT.json", ...)

* Trial 1 (greedy) from the generator; trial-1 outputs can be reused from a cache file keyed by id
  (``trial1_cache``: any raw JSONL whose records carry ``output[0]``, e.g. an earlier eval's raw file or a
  generate RAW.jsonl) so that settings are compared on the same first trials. A question hits the cache when
  its id AND question match (the same id with another question is an error); missing ones are computed and
  appended to the cache file chunk by chunk (a torn last line from a killed run is cut off on the next read),
  unless that file is the raw file of a run (``is_run_raw``), which is only read.
* One reflection per wrong trial 1 with the test-time reflection prompt (no demand), from the reflector (the
  adapter model with ``--adapter``; trial 1 always from the base model), then trial 2 (greedy) from the
  trial-1 transcript, by the base model or, for two-stage SFT, by its own engine (``trial2_engine``: the
  second-stage adapter, ``--trial2-adapter``).
* One-stage reflector mode (``cfg.reflector_mode="one-stage"``, the paper's setting I; ``one_stage.py``): the
  reflector's one reply to the one-stage prompt holds the reflection and the new attempt; the attempt is trial 2
  (verified as any trial; no separate trial-2 generation, so no ``trial2_engine``).
* No-reflection mode (``cfg.reflector_mode="none"``, the paper's "prompt w/o reflection" baseline;
  ``no_reflection.py``): no reflection; trial 2 (greedy, by ``trial2_engine`` or the trial engine) follows the failed
  trial 1 and a request to try again; ``reflect_engine`` is not used (may be None), records name
  reflection_source "none".
* Acc@t2 = (correct at t1 + wrong at t1 but correct at trial 2 with the first reflection) / N
  (``reflectevo.data.evaluate.evaluate_records``); for free-text BIG-bench the token-F1 gain too.
  ``forced_actions`` (trials whose action came from the forced call, a cached trial 1 included) and
  ``trial1_from_cache`` are counted on the raw records, so a killed and resumed run reports what an
  uninterrupted one does.

The raw records of the run go to ``RESULT.raw.jsonl`` beside RESULT.json, the result JSON is written atomically.
An existing raw file with records is an error unless ``resume`` (continue it) or ``overwrite`` (start over). The
sampling settings of a raw file go to ``RESULT.raw.settings.json`` (the reflector mode among them; a file written
before it was recorded counts as two-stage); a resume with other settings, or whose raw records name another
model / adapter (reasoning_source, reflection_source), is an error before anything runs.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from ..atomic import atomic_write_bytes
from .evaluate import evaluate_records, format_table
from .jsonl import DataError, append_jsonl, iter_jsonl, read_jsonl, repair_tail
from .loop import ONE_STAGE_TRIAL2, LoopConfig, ReflectLoop, check_resumed_sources
from .no_reflection import NO_REFLECTION

__all__ = ["run_eval", "load_trial1_cache", "raw_path_for", "check_trial1_cache", "write_json_atomic",
           "format_table", "check_eval_raw", "settings_path_for",
           "check_raw_settings", "generate_settings", "is_run_raw"]

# the settings a raw file's records depend on (the sources are checked on the records themselves)
_SETTINGS = ("seed", "max_tokens", "action_max_tokens", "reflection_max_tokens", "reflection_temperature",
             "reflection_top_p", "force_action", "reasoning_source", "reflection_source", "trial2_source",
             "prompts_id")
GENERATE_SETTINGS = ("n_reflections", "demand", "test_time", *_SETTINGS)
EVAL_SETTINGS = ("reflector_mode", *_SETTINGS)   # the mode first: it explains trial2_source too
_EVAL_DEFAULTS = {"reflector_mode": "two-stage"}   # what a sidecar written before the setting existed meant


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


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


def settings_path_for(out_json) -> Path:
    raw = raw_path_for(out_json)
    return raw.with_name(raw.name[:-len(".jsonl")] + ".settings.json")


def _settings(cfg: LoopConfig, names=_SETTINGS) -> dict:
    return {name: getattr(cfg, name) for name in names}


def check_raw_settings(raw: Path, sidecar: Path, current: dict, remedy: str, defaults: dict | None = None) -> None:
    """Refuse to add to ``raw`` when its ``sidecar`` says it was written with other settings (a file without a
    sidecar, from an older version, is not checked; a setting the sidecar lacks is compared with its value in
    ``defaults`` when there is one, else not checked)."""
    if not sidecar.exists():
        return
    try:
        old = json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"{sidecar}: unreadable ({e})") from None
    if not isinstance(old, dict):
        raise DataError(f"{sidecar}: unreadable (not a JSON object)")
    old = {**(defaults or {}), **old}
    for name, value in current.items():
        if name in old and old[name] != value:
            raise DataError(f"{raw}: was written with {name} {old[name]!r}, this run has {value!r}; {remedy}")


def generate_settings(cfg: LoopConfig, task_name: str) -> dict:
    """What the records of a ``generate`` RAW file depend on besides the questions (kept in RAW.settings.json)."""
    return {"task": task_name, **_settings(cfg, GENERATE_SETTINGS)}


def check_eval_raw(out_json, items: list[dict], cfg: LoopConfig, resume: bool = False, overwrite: bool = False,
                   trial1_cache=None) -> None:
    """Before anything runs: refuse to delete a raw file holding records (neither ``resume`` nor ``overwrite``),
    and refuse to resume one written with other settings or by another model / adapter."""
    raw = raw_path_for(out_json)
    if not raw.exists():
        return
    if not resume:
        if not overwrite and raw.read_bytes().strip():
            raise DataError(f"{raw}: holds records of an earlier run; pass --resume to continue it or --overwrite "
                            "to start over (or choose another --out)")
        return
    if not raw.read_bytes().strip():
        return
    check_raw_settings(raw, settings_path_for(out_json), _settings(cfg, EVAL_SETTINGS),
                       "--resume needs the same settings (or pass --overwrite)", _EVAL_DEFAULTS)
    cache = load_trial1_cache(trial1_cache)
    t1_ids = [it["id"] for it in items if _key(it) in cache]
    repair_tail(raw)
    check_resumed_sources(raw, cfg, [it["id"] for it in items], t1_ids)


def write_json_atomic(path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n").encode("utf-8"))


def _key(rec: dict) -> tuple:
    return repr(rec["id"]), rec["question"]


def load_trial1_cache(path) -> dict:
    """(repr(id), question) -> trial-1 output entry (``output[0]``). A torn last line (a run killed while
    appending) is cut off first, but in the raw file of a run (``is_run_raw``), which is only read (its run may be
    writing that line), it is left out; later lines of the same question win."""
    cache = {}
    if path is None or not Path(path).exists():
        return cache
    run_raw = is_run_raw(path)
    if not run_raw:
        repair_tail(path)
    for line, rec in iter_jsonl(path, ("id", "question", "output"), torn_tail_ok=run_raw):
        out = rec["output"]
        if not isinstance(out, list) or not out or not isinstance(out[0], dict):
            raise DataError(f"{path}:{line}: 'output' must be a non-empty list of trial entries")
        for f in ("is_correct", "scratchpad"):
            if f not in out[0]:
                raise DataError(f"{path}:{line}: output[0] missing field {f!r}")
        if not isinstance(out[0]["is_correct"], (bool, int)) or out[0]["is_correct"] not in (0, 1):
            raise DataError(f"{path}:{line}: output[0].is_correct is {out[0]['is_correct']!r}; expected true or false")
        if int(out[0].get("trail", out[0].get("trial", 1))) != 1:
            raise DataError(f"{path}:{line}: output[0] is not a trial-1 entry")
        cache[_key(rec)] = out[0]
    return cache


def is_run_raw(path) -> bool:
    """Whether ``path`` is the raw file of a generate / eval run (a settings file beside it, or a record with
    trial-2 entries) rather than a file of trial-1 entries only: such a file may serve as a trial-1 cache, but
    trial-1-only records appended to it would later read as complete questions (a rerun of that generate would
    skip them, giving them no reflections; a resumed eval would count them wrong at trial 2)."""
    path = Path(path)
    if not path.exists():
        return False
    if path.with_name(path.stem + ".settings.json").exists():
        return True
    for _line, rec in iter_jsonl(path, torn_tail_ok=True):
        out = rec.get("output")
        if isinstance(out, list) and len(out) > 1:
            return True
    return False


def _append_trial1(path, records: list[dict], known: set) -> None:
    """Append the trial-1 entries of ``records`` not in ``known`` (updated) to the cache file, fsynced."""
    fresh = [r for r in records if _key(r) not in known]
    if not fresh:
        return
    for rec in fresh:
        append_jsonl(path, {"id": rec["id"], "question": rec["question"], "answer": rec["answer"],
                            "output": [rec["output"][0]]})
        known.add(_key(rec))
    with open(path, "a", encoding="utf-8") as f:
        os.fsync(f.fileno())


def run_eval(task, items: list[dict], trial_engine, reflect_engine, tokenizer, out_json,
             cfg: LoopConfig | None = None, trial1_cache=None, resume: bool = False, prompts=None,
             meta: dict | None = None, log=None, trial2_engine=None, overwrite: bool = False) -> dict:
    """Evaluate on ``items``; writes RESULT.json (+ RESULT.raw.jsonl) and returns the result dict.
    ``trial2_engine``: answers trial 2 instead of ``trial_engine`` (two-stage SFT: the "correct" adapter); not
    with ``cfg.reflector_mode="one-stage"``, where the reflector answers trial 2 in its reply. With
    ``cfg.reflector_mode="none"`` ``reflect_engine`` is not used."""
    cfg = cfg or LoopConfig()
    cfg.test_time = True
    cfg.n_reflections = 1
    if cfg.reflector_mode == "one-stage":
        if trial2_engine is not None:
            raise DataError(ONE_STAGE_TRIAL2)
        cfg.trial2_source = cfg.trial2_source or cfg.reflection_source
    elif cfg.reflector_mode == NO_REFLECTION:
        cfg.reflection_source = NO_REFLECTION   # no reflector (the settings file and the records say so)
    cfg.validate()
    out_json = Path(out_json)
    check_trial1_cache(out_json, trial1_cache)
    raw = raw_path_for(out_json)
    check_eval_raw(out_json, items, cfg, resume, overwrite, trial1_cache)
    if raw.exists() and not resume:
        raw.unlink()
    if not raw.exists() or not raw.read_bytes().strip():
        raw.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(settings_path_for(out_json), _settings(cfg, EVAL_SETTINGS))
    cache_raw = load_trial1_cache(trial1_cache)
    cached_ids = {key[0] for key in cache_raw}
    cache = {}
    for item in items:
        hit = cache_raw.get(_key(item))
        if hit is not None:
            cache[item["id"]] = hit
        elif repr(item["id"]) in cached_ids:
            raise DataError(f"{trial1_cache}: id {item['id']!r} has another question than the test data "
                            "(a trial-1 cache from another data set?)")
    foreign = [str(e["reasoning_source"]) for e in cache.values()
               if e.get("reasoning_source") not in (None, "", "N/A", cfg.reasoning_source)]
    if foreign and cfg.reasoning_source not in (None, "", "N/A"):
        (log or _log)(f"[reflectevo] warning: --trial1-cache {trial1_cache}: trial 1 of {len(foreign)} questions comes "
                      f"from it, answered by {', '.join(map(repr, sorted(set(foreign))))}; this run's model is "
                      f"{cfg.reasoning_source!r}")
    known = set(cache_raw)
    append = trial1_cache is not None and not is_run_raw(trial1_cache)
    if trial1_cache is not None and not append:
        (log or _log)(f"{trial1_cache}: the raw file of a run: its trial-1 outputs are read, nothing is appended to it")

    def after_chunk(_index, records):
        if append:
            _append_trial1(trial1_cache, records, known)

    kwargs = {} if log is None else {"log": log}
    loop = ReflectLoop(task, trial_engine, reflect_engine, tokenizer, cfg, prompts=prompts,
                       trial2_engine=trial2_engine, **kwargs)
    start = time.perf_counter()
    loop.run(items, raw, trial1_cache=cache, after_chunk=after_chunk)
    wanted = {repr(it["id"]) for it in items}
    records = [r for r in read_jsonl(raw) if repr(r["id"]) in wanted]
    if append:  # records of a resumed raw file whose chunk ran before
        _append_trial1(trial1_cache, records, known)
    result = evaluate_records(records, task)
    # from the records, so that a resumed run reports what an uninterrupted one does
    from_cache = sum(bool(r.get("trial1_from_cache")) for r in records)
    forced = sum(bool(o.get("forced_action")) for r in records for o in r["output"] if isinstance(o, dict))
    result.update({"trial1_from_cache": from_cache, "raw": str(raw), "seconds": time.perf_counter() - start,
                   "settings": {"seed": cfg.seed, "max_tokens": cfg.max_tokens,
                                "reflection_max_tokens": cfg.reflection_max_tokens,
                                "reflection_temperature": cfg.reflection_temperature,
                                "reflection_top_p": cfg.reflection_top_p,
                                "reasoning_source": cfg.reasoning_source,
                                "reflection_source": cfg.reflection_source,
                                "trial2_source": cfg.trial2_source or cfg.reasoning_source,
                                "reflector_mode": cfg.reflector_mode},
                   "forced_actions": forced})
    if meta:
        result.update(meta)
    write_json_atomic(out_json, result)
    return result
