"""``reflectevo demo``: the whole ReflectEvo loop on a CPU in minutes.

With the embedded SmolLM2-135M-Instruct and generated arithmetic word problems (or ``--task/--data``):

1. generate: trial 1 -> 2 reflections per wrong answer -> trial 2 for each, on ``--n-train`` questions;
2. curate the raw records into D+ / D± / Dpref;
3. evaluate the base model on ``--n-eval`` held-out questions: first retrying without a reflection (the paper's
   "prompt w/o reflection" baseline: told the answer was wrong, it simply tries again), then with prompted
   test-time reflection (same trial-1 answers: the first row fills the trial-1 cache, the second reads it);
4. one-stage LoRA SFT of the reflector on D+, evaluate it (same trial-1 answers, from a cache);
5. DPO of the reflector on D± when pairs exist, evaluate it;
6. print Acc@t1 / Acc@t2 / delta per setting and where the files are.

Nothing is invented: when D+ (or D±) is empty - the tiny model fixed nothing - the demo says so and skips that
training step. The curated records go to the trainer as they are (their prompts are saved exactly as the model
saw them, chat template included, and the trainer uses such a prompt unchanged). Every step prints its progress
and time; ``--out`` holds every file (a rerun resumes ``raw.jsonl`` and redoes the steps after it;
``--fresh`` starts over).
"""
from __future__ import annotations

import argparse
import math
from dataclasses import replace
import shutil
import sys
import time
from pathlib import Path

__all__ = ["add_demo_options", "run_demo", "run_demo_from_args"]

OWNED = ("raw.jsonl", "curated", "trial1_cache.jsonl", "eval_retry.json", "eval_retry.raw.jsonl",
         "eval_retry.raw.settings.json", "eval_base.json", "eval_base.raw.jsonl", "eval_base.raw.settings.json",
         "sft", "eval_sft.json", "eval_sft.raw.jsonl", "eval_sft.raw.settings.json",
         "dpo", "eval_dpo.json", "eval_dpo.raw.jsonl", "eval_dpo.raw.settings.json", "summary.json")


def add_demo_options(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--out", default="demo_out", help="output directory (default demo_out/)")
    p.add_argument("--model", default="smollm2-135m", help="smollm2-135m | Hugging Face model dir | .gguf file")
    p.add_argument("--task", default="arithmetic", help="arithmetic (generated) or a task with --data")
    p.add_argument("--data", default=None, help="the task's JSONL file (not needed for arithmetic)")
    p.add_argument("--difficulty", type=int, default=1, help="arithmetic: operations per question")
    p.add_argument("--n-train", type=int, default=32, help="questions for generate (train)")
    p.add_argument("--n-eval", type=int, default=16, help="other questions for evaluation (held out)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-tokens", type=int, default=64, help="tokens per trial")
    p.add_argument("--reflection-max-tokens", type=int, default=96)
    p.add_argument("--sft-steps", type=int, default=12, help="most SFT optimizer steps")
    p.add_argument("--dpo-steps", type=int, default=6, help="most DPO optimizer steps")
    p.add_argument("--max-length", type=int, default=768, help="training tokens per sequence")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    p.add_argument("--kv-cache-gib", type=float, default=1.5,
                   help="KV cache of the sampler (too small a cache makes it recompute preempted sequences)")
    p.add_argument("--fresh", action="store_true",
                   help="also delete the earlier raw.jsonl in --out (a rerun otherwise resumes it, redoes the rest)")
    return p


class _Clock:
    def __init__(self):
        self.t0 = time.perf_counter()

    def __call__(self, msg: str) -> None:
        print(f"[{time.perf_counter() - self.t0:6.1f} s] {msg}", file=sys.stderr, flush=True)


def _split_items(args):
    from reflectevo.cli_loop import LoopArgError
    from reflectevo.data import get_task

    options = {"difficulty": args.difficulty} if str(args.task).lower() == "arithmetic" else {}
    task = get_task(args.task, **options)
    if args.n_train < 1 or args.n_eval < 1:
        raise LoopArgError(f"--n-train and --n-eval must be >= 1, got {args.n_train} and {args.n_eval}")
    items = task.load(args.data, limit=args.n_train + 4 * args.n_eval)
    train = items[:args.n_train]
    seen = {it["question"] for it in train}
    held = [it for it in items[args.n_train:] if it["question"] not in seen][:args.n_eval]
    if len(train) < args.n_train or not held:
        raise LoopArgError(f"--data {args.data}: {len(items)} questions are not enough for --n-train {args.n_train} "
                         f"and --n-eval {args.n_eval}")
    return task, train, held


def _configs(args, name: str, out: Path):
    """The generate / eval LoopConfig options and the SFT / DPO TrainConfigs, validated (one-line errors)."""
    from reflectevo.cli_loop import LoopArgError
    from reflectevo.data.loop import LoopConfig
    from reflectevo.trainer import TrainConfig

    for option in ("sft_steps", "dpo_steps", "difficulty"):
        if getattr(args, option) < 1:
            raise LoopArgError(f"--{option.replace('_', '-')} must be >= 1, got {getattr(args, option)}")
    gen_cfg = dict(seed=args.seed, max_tokens=args.max_tokens, reflection_max_tokens=args.reflection_max_tokens,
                   reasoning_source=name)
    LoopConfig(n_reflections=2, reflection_source=name, **gen_cfg).validate()
    common = dict(lora_r=8, lora_alpha=32, target_modules=("q_proj", "k_proj", "v_proj"), max_length=args.max_length,
                  on_too_long="skip", warmup_ratio=0.0, seed=args.seed, progress=True, log_every=1,
                  base_model_name=name)
    sft = TrainConfig(mode="one-stage", max_steps=args.sft_steps, batch_size=4, lr=1e-3, lora_dropout=0.1,
                      data_path=str(out / "curated" / "d_plus.jsonl"), **common)
    dpo = TrainConfig(max_steps=args.dpo_steps, batch_size=2, lr=5e-5, beta=0.1,
                      data_path=str(out / "curated" / "d_pm.jsonl"), **common)
    sft.validate(dpo=False)
    dpo.validate(dpo=True)
    return gen_cfg, sft, dpo


def run_demo(args) -> dict:
    import torch

    from reflectevo.cli_loop import build_engines, check_engine_options, check_out_path, default_device
    from reflectevo.data.curate import curate_file
    from reflectevo.data.eval_run import run_eval, write_json_atomic
    from reflectevo.data.evaluate import format_table
    from reflectevo.data.jsonl import read_jsonl
    from reflectevo.data.loop import LoopConfig, ReflectLoop
    from reflectevo.model import load_model

    log = _Clock()
    out = Path(args.out)
    check_out_path(out, "--out", directory=True)
    check_engine_options(args.kv_cache_gib)
    device = default_device(args.device)
    task, train, held = _split_items(args)
    name = str(args.model)
    gen_cfg, sft_cfg, dpo_cfg = _configs(args, name, out)  # every option checked before anything is deleted
    model, tok = load_model(args.model, device=device)
    # the options are good: a rerun resumes the expensive generation (raw.jsonl) and redoes everything after it
    for owned in OWNED:
        if owned != "raw.jsonl" or args.fresh:
            path = out / owned
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    log(f"reflectevo demo: {args.model} on {task.name} ({len(train)} questions to learn from, {len(held)} held "
        f"out), {device}, {torch.get_num_threads()} threads -> {out}/")
    log(f"[1/6] model loaded: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters")
    base_engine, _ = build_engines(model, tok, adapter=False, kv_cache_gib=args.kv_cache_gib, progress=True)

    # 1. generate
    raw = out / "raw.jsonl"
    log(f"[2/6] generate: trial 1 -> 2 reflections per wrong answer -> trial 2 ({raw})")
    loop = ReflectLoop(task, base_engine, base_engine, tok,
                       LoopConfig(n_reflections=2, reflection_source=name, **gen_cfg), log=log)
    stats = loop.run(train, raw)
    log(f"      {stats['questions']} questions in {stats['seconds']:.0f} s "
        f"({stats['skipped_complete']} already done in an earlier run)")

    # 2. curate
    cur = out / "curated"
    # only this run's training questions: a raw.jsonl resumed from a run with a larger --n-train holds more,
    # some of them this run's held-out questions
    counts = curate_file(raw, cur, eval_fraction=0.0, ids=[it["id"] for it in train])
    log(f"[3/6] curate: trial 1 wrong on {counts['trial1_wrong']}/{counts['records']} questions -> "
        f"D+ {counts['d_plus']}, D± {counts['d_pm']}, Dpref {counts['d_pref']} ({cur}/)")

    # 3. evaluate the base model
    cache = out / "trial1_cache.jsonl"
    results, notes = {}, []

    def evaluate(label, trial_engine, refl_engine, file, source, reflector_mode="two-stage"):
        cfg = LoopConfig(reflection_source=source, reflector_mode=reflector_mode, **gen_cfg)
        log(f"      evaluating '{label}' on {len(held)} held-out questions")
        results[label] = run_eval(task, held, trial_engine, refl_engine, tok, out / file, cfg, trial1_cache=cache,
                                  log=log, meta={"model": name, "setting": label})
        r = results[label]
        log(f"      Acc@t1 {r['acc_t1']:.1f}  Acc@t2 {r['acc_t2']:.1f}  delta {r['delta']:+.1f}")

    log("[4/6] evaluate the base model: retry without reflection, then prompted reflection")
    evaluate("base (retry without reflection)", base_engine, None, "eval_retry.json", "none", reflector_mode="none")
    evaluate("base (prompted reflection)", base_engine, base_engine, "eval_base.json", name)

    # 4. one-stage SFT on D+
    from reflectevo.data.loop import AdapterOffEngine
    from reflectevo.gen import Engine
    from reflectevo.trainer import train_dpo, train_sft

    d_plus = read_jsonl(cur / "d_plus.jsonl")
    if not d_plus:
        msg = (f"D+ is empty: none of the {stats['reflections'] or 'generated'} reflections led to a correct "
               "second trial, so there is nothing to fine-tune on; SFT skipped (try more --n-train questions, "
               "a lower --difficulty or a bigger --model)")
        log("[5/6] " + msg)
        notes.append(msg)
    else:
        batch = min(4, len(d_plus))
        steps = max(1, min(args.sft_steps, 3 * math.ceil(len(d_plus) / batch)))
        log(f"[5/6] one-stage LoRA SFT on D+ ({len(d_plus)} records, {steps} steps of {batch})")
        cfg = replace(sft_cfg, max_steps=steps, batch_size=batch)
        summary = train_sft(model, tok, d_plus, cfg, out / "sft")
        model.eval()
        log(f"      trained in {summary.get('seconds', summary.get('train_seconds', 0)) or 0:.0f} s; "
            f"adapter in {out / 'sft' / 'adapter'}/")
        # trial 1: the base engine with the adapters off (its prefix cache holds base K/V); reflection and
        # corrected answer in one reply (setting I): a new engine on the adapter model
        evaluate("one-stage SFT on D+", AdapterOffEngine(base_engine, model), Engine(model, tok, kv_cache_gib=args.kv_cache_gib / 2, progress=True),
                 "eval_sft.json", f"{name} + adapter {out / 'sft' / 'adapter'}", reflector_mode="one-stage")

    # 5. DPO on D±
    d_pm = read_jsonl(cur / "d_pm.jsonl")
    if not d_pm:
        msg = ("D± is empty: no question had both a reflection that fixed the answer and one that did not; "
               "DPO skipped")
        log("[6/6] " + msg)
        notes.append(msg)
    else:
        batch = min(2, len(d_pm))
        steps = max(1, min(args.dpo_steps, 2 * math.ceil(len(d_pm) / batch)))
        log(f"[6/6] DPO on D± ({len(d_pm)} pairs, {steps} steps of {batch}) from the base model")
        dpo_model, _ = load_model(args.model, device=device)
        cfg = replace(dpo_cfg, max_steps=steps, batch_size=batch)
        train_dpo(dpo_model, tok, d_pm, cfg, out / "dpo")
        dpo_model.eval()
        evaluate("DPO on D±", AdapterOffEngine(base_engine, model), Engine(dpo_model, tok, kv_cache_gib=args.kv_cache_gib / 2, progress=True),
                 "eval_dpo.json", f"{name} + adapter {out / 'dpo' / 'adapter'}")

    if 0 < len(d_plus) < 8:
        notes.append(f"D+ holds only {len(d_plus)} record(s): a {name} reflector rarely fixes its own mistakes, so "
                     "the trained rows cannot be expected to differ much from the base row; the demo shows the "
                     "pipeline, the paper's gains need a 7-8B model and thousands of records")
    table = format_table(results)
    summary = {"model": name, "task": task.name, "n_train": len(train), "n_eval": len(held), "generate": stats,
               "curate": counts, "results": results, "notes": notes,
               "seconds": time.perf_counter() - log.t0}
    write_json_atomic(out / "summary.json", summary)
    print("\n" + table)
    for note in notes:
        print(f"note: {note}")
    print(f"\nfiles in {out}/: raw.jsonl (raw records), curated/ (d_plus, d_pm, d_pref), eval_*.json "
          f"(+ .raw.jsonl), sft/ and dpo/ (metrics.jsonl, adapter/), summary.json")
    print(f"demo done in {summary['seconds']:.0f} s")
    return summary


def run_demo_from_args(args) -> int:
    run_demo(args)
    return 0
