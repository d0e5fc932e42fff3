"""Benchmark: questions/hour of the generate loop against the paper's one-request-at-a-time structure.

Ours: ``ReflectLoop`` (trial 1 -> n reflections per failure -> trial 2 per reflection, every phase one batched
``Engine.generate`` call with prefix caching; one growing chat conversation per question, sent as token ids that
extend the previous phase's cached ids) on ``num_questions`` LogiQA questions. Each phase records the engine's
prompt tokens, prefill tokens computed and prefix-cache hit tokens.

Baseline: the public code's structure - one request at a time through transformers ``generate`` (same weights,
loaded into LlamaForCausalLM) - replaying EXACTLY the requests our run sent to the engine (recorded: each
prompt with its n, sampling settings, max tokens and stop strings; the reflections as one request with
``num_return_sequences = n``). Timing every request would take hours, so the first ``baseline_per_phase``
requests of each batched call (phase) are timed one at a time and the phase is extrapolated by its request
count. Generated tokens per request are recorded on both sides (sampled reflections and stops make lengths
differ a little).
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from reflectevo.bench.common import env_info

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "reflectevo_test" / "logiqa_test.jsonl"


def _hf_tokenizer(tok):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tok.backend)


def _hf_call(hf, hf_tok, tok, prompt, sp):
    """One request through transformers generate with the engine's SamplingParams (n samples, stops)."""
    ids = torch.tensor([prompt if isinstance(prompt, list) else tok.encode(prompt, add_special_tokens=False)])
    kw = dict(max_new_tokens=sp.max_tokens, num_return_sequences=sp.n, pad_token_id=tok.pad_token_id or 0,
              eos_token_id=list(tok.eos_token_ids), attention_mask=torch.ones_like(ids))
    if sp.stop:
        kw.update(stop_strings=list(sp.stop), tokenizer=hf_tok)
    if sp.temperature > 0:
        torch.manual_seed(sp.seed or 0)
        kw.update(do_sample=True, temperature=sp.temperature, top_p=sp.top_p, top_k=0)
    else:
        kw.update(do_sample=False)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = hf.generate(ids, **kw)
    seconds = time.perf_counter() - t0
    pad = tok.pad_token_id or 0
    return seconds, int(sum((row[ids.shape[1]:] != pad).sum() for row in out))


class RecordingEngine:
    """Passes calls to the engine and keeps (prompts, params, seconds, prefill counts) of each, for the replay."""

    COUNTS = ("prefill_tokens_computed", "prefix_cache_hit_tokens")

    def __init__(self, engine):
        self.engine, self.calls = engine, []

    def generate(self, prompts, params=None, **kw):
        before = {k: self.engine.stats[k] for k in self.COUNTS}
        t0 = time.perf_counter()
        outs = self.engine.generate(prompts, params, **kw)
        plist = params if isinstance(params, list) else [params] * len(prompts)
        gen = sum(len(o.token_ids) for g in outs for o in g)
        tok = self.engine.tokenizer
        tail = [tok.decode(p[-4:]) if isinstance(p, list) else p[-20:] for p in prompts[:1]]
        lengths = [len(p) if isinstance(p, list) else len(tok.encode(p, add_special_tokens=False)) for p in prompts]
        self.calls.append({"prompts": list(prompts), "params": plist, "seconds": time.perf_counter() - t0,
                           "generated_tokens": gen, "tail": tail[0] if tail else "",
                           "prompt_tokens": sum(n * sp.n for n, sp in zip(lengths, plist)),
                           **{k: self.engine.stats[k] - before[k] for k in self.COUNTS}})
        return outs


def phase_name(i: int, call: dict) -> str:
    if call["params"][0].temperature > 0:
        return f"{i}:reflections"
    return f"{i}:forced actions" if call["tail"].endswith("\nAction:") else f"{i}:trials"


def run_baseline(hf, tok, calls: list[dict], per_phase: int) -> dict:
    """Replays the first ``per_phase`` requests of every batched call one at a time; extrapolates per phase."""
    hf_tok = _hf_tokenizer(tok)
    phases, total_timed, est = [], 0.0, 0.0
    for i, call in enumerate(calls):
        k = min(per_phase, len(call["prompts"]))
        secs, gen = [], 0
        for prompt, sp in list(zip(call["prompts"], call["params"]))[:k]:
            s, g = _hf_call(hf, hf_tok, tok, prompt, sp)
            secs.append(s)
            gen += g
        mean = sum(secs) / k
        total_timed += sum(secs)
        est += mean * len(call["prompts"])
        phases.append({"phase": phase_name(i, call), "requests": len(call["prompts"]), "timed": k,
                       "mean_seconds": mean, "generated_tokens_timed": gen,
                       "ours_seconds": call["seconds"], "ours_generated_tokens": call["generated_tokens"],
                       "ours_tokens_per_request": call["generated_tokens"] / len(call["prompts"]),
                       "ours_prompt_tokens": call["prompt_tokens"],
                       "ours_prefill_computed": call["prefill_tokens_computed"],
                       "ours_prefix_cache_hits": call["prefix_cache_hit_tokens"],
                       "baseline_tokens_per_request": gen / k})
    return {"phases": phases, "seconds_timed": total_timed, "estimated_seconds_full_run": est}


def run(device: str = "cpu", quick: bool = False, num_questions: int = 32, baseline_per_phase: int = 2,
        max_tokens: int = 64, reflection_max_tokens: int = 128, n_reflections: int = 2, threads: int | None = None,
        data: str | None = None, model_source: str = "smollm2-135m", kv_cache_gib: float = 3.0) -> dict:
    from reflectevo.bench.sampler import hf_twin
    from reflectevo.data import get_task
    from reflectevo.data.jsonl import read_jsonl
    from reflectevo.data.loop import LoopConfig, ReflectLoop
    from reflectevo.gen import Engine
    from reflectevo.model import load_model

    if quick:
        num_questions, baseline_per_phase, max_tokens, reflection_max_tokens = 8, 2, 48, 64
    if threads:
        torch.set_num_threads(threads)
    task = get_task("logiqa")
    items = task.load(data or DATA, limit=num_questions)
    model, tok = load_model(model_source, device=device)
    cfg = LoopConfig(n_reflections=n_reflections, max_tokens=max_tokens, reflection_max_tokens=reflection_max_tokens,
                     chunk_size=num_questions, reasoning_source=model_source, reflection_source=model_source)
    engine = Engine(model, tok, kv_cache_gib=kv_cache_gib)
    rec = RecordingEngine(engine)
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw.jsonl"
        loop = ReflectLoop(task, rec, rec, tok, cfg, log=None)
        t0 = time.perf_counter()
        stats = loop.run(items, raw)
        ours_s = time.perf_counter() - t0
        records = read_jsonl(raw)
    n_t1 = len(records)
    n_refl_req = sum(1 for r in records if not r["output"][0]["is_correct"])
    n_t2 = sum(len(r["output"]) - 1 for r in records)
    ours = {"seconds": ours_s, "questions": n_t1, "questions_per_hour": n_t1 / ours_s * 3600,
            "calls": {"trial1": n_t1, "reflection_requests": n_refl_req, "trial2": n_t2},
            "forced_actions": stats["forced_actions"], "engine_stats": dict(engine.stats),
            "trial1_correct": stats["t1_correct"], "trial2_correct": stats["t2_correct"]}
    del engine
    hf = hf_twin(model)
    base = run_baseline(hf, tok, rec.calls, baseline_per_phase)
    est = base["estimated_seconds_full_run"]
    base["questions_per_hour"] = n_t1 / est * 3600 if est else 0.0
    return {"settings": {"task": "logiqa", "model": model_source, "device": device, "dtype": str(model.dtype),
                         "threads": torch.get_num_threads(), "num_questions": n_t1, "n_reflections": n_reflections,
                         "max_tokens": max_tokens, "reflection_max_tokens": reflection_max_tokens,
                         "reflection_sampling": {"temperature": cfg.reflection_temperature,
                                                 "top_p": cfg.reflection_top_p},
                         "baseline": "transformers generate, one request at a time, replaying the exact requests "
                                     f"(prompt, n, sampling, stops) of our run: the first {baseline_per_phase} of "
                                     "each batched call timed, extrapolated by that call's request count"},
            "ours": ours, "baseline": base,
            "speedup": ours["questions_per_hour"] / base["questions_per_hour"] if base["questions_per_hour"] else None,
            "env": env_info(device)}


def format_table(res: dict) -> str:
    s, o, b = res["settings"], res["ours"], res["baseline"]
    es = o["engine_stats"]
    lines = [f"### generate loop: {s['num_questions']} LogiQA questions, n={s['n_reflections']}, {s['model']} on "
             f"{s['device']} ({s['threads']} threads), max_tokens {s['max_tokens']} / reflections "
             f"{s['reflection_max_tokens']}", "",
             "| phase | requests | ours: s (tokens/request) | ours: prompt tokens / prefill computed / cache hits "
             "| one at a time: s/request (tokens/request), timed | one at a time: est. s |",
             "|---|---|---|---|---|---|"]
    for ph in b["phases"]:
        lines.append(f"| {ph['phase']} | {ph['requests']} | {ph['ours_seconds']:.1f} "
                     f"({ph['ours_tokens_per_request']:.0f}) | {ph.get('ours_prompt_tokens', 0)} / "
                     f"{ph.get('ours_prefill_computed', 0)} / {ph.get('ours_prefix_cache_hits', 0)} | "
                     f"{ph['mean_seconds']:.2f} "
                     f"({ph['baseline_tokens_per_request']:.0f}), {ph['timed']} | "
                     f"{ph['mean_seconds'] * ph['requests']:.0f} |")
    lines += ["", f"ours: {o['seconds']:.1f} s = {o['questions_per_hour']:.0f} questions/hour; one request at a "
              f"time (transformers generate): est. {b['estimated_seconds_full_run']:.0f} s = "
              f"{b['questions_per_hour']:.0f} questions/hour (timed {b['seconds_timed']:.0f} s)",
              f"speedup: {res['speedup']:.1f}x questions/hour" if res["speedup"] else "speedup: n/a",
              f"ours, engine totals: {es['prefill_tokens_computed']} prefill tokens computed, "
              f"{es['prefix_cache_hit_tokens']} prefix-cache hit tokens, {es['decode_tokens']} decoded tokens in "
              f"{es['steps']} steps"]
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    import argparse
    import json

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--questions", type=int, default=32)
    ap.add_argument("--baseline-per-phase", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--reflection-max-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    r = run(quick=a.quick, num_questions=a.questions, baseline_per_phase=a.baseline_per_phase,
            max_tokens=a.max_tokens, reflection_max_tokens=a.reflection_max_tokens, threads=a.threads)
    table = format_table(r)
    print(table)
    if a.out:
        Path(a.out).write_text(json.dumps(r, indent=2, default=str))
        Path(a.out).with_suffix(".md").write_text(table + "\n")
