"""Command-line options and entry points of ``reflectevo generate | curate | eval | demo``.

``reflectevo.cli`` wires them: ``add_<cmd>_args(parser)`` then ``cmd_<cmd>(args)``. User errors raise
ReflectEvoError subclasses (one line naming the file:line or option); the CLI prints them and exits non-zero.
Options are checked (task, data file, demand, numbers) before the model is loaded.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from reflectevo.errors import ReflectEvoError


class LoopArgError(ReflectEvoError, ValueError):
    """A bad command-line value (the message names the option)."""


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------- options
def _task_args(p, data_required: bool = False):
    p.add_argument("--task", required=True,
                   help="logiqa | math | mbpp | bigbench | bigbench-free | arithmetic")
    p.add_argument("--data", default=None, help="the task's JSONL file (official format; arithmetic: optional)")
    p.add_argument("--limit", type=int, default=None, help="first N questions only")
    p.add_argument("--difficulty", type=int, default=None, help="arithmetic only: operations per question (default 1)")
    p.add_argument("--prompts", default=None, help="JSON file replacing prompt templates (see data/prompts.py)")


def _model_args(p, adapter_help: str):
    p.add_argument("--model", default="smollm2-135m", help="smollm2-135m | Hugging Face model dir | .gguf file")
    p.add_argument("--adapter", default=None, type=os.path.normpath, help=adapter_help)
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--quantize", default=None, choices=["nf4"], help="4-bit NF4 base weights")
    p.add_argument("--kv-cache-gib", type=float, default=None, help="KV cache size per engine (default: CPU a fifth of available "
                   "memory, 0.5-8 GiB; CUDA 85%% of free memory, in equal shares for the run's engines; "
                   "each of the two engines with --adapter)")
    p.add_argument("--max-num-seqs", type=int, default=256, help="sequences decoded together at most")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="token progress lines from the sampler")


def _gen_args(p, n_reflections: bool):
    if n_reflections:
        p.add_argument("--n-reflections", type=int, default=2, help="reflections per wrong trial 1")
        p.add_argument("--demand", default="1-1-1", help="instruction demand a-b-c, or 'random' (one per question)")
    p.add_argument("--seed", type=int, default=0, help="seed of the reflection sampling (per question)")
    p.add_argument("--max-tokens", type=int, default=256, help="tokens per trial (thought + action)")
    p.add_argument("--reflection-max-tokens", type=int, default=512)
    p.add_argument("--reflection-temperature", type=float, default=0.8)
    p.add_argument("--reflection-top-p", type=float, default=0.9)
    p.add_argument("--chunk-size", type=int, default=32,
                   help="questions per chunk (a killed run loses at most one chunk)")


def add_generate_args(p):
    _task_args(p)
    _model_args(p, "PEFT LoRA adapter of a trained reflector (reflections from it; trials from the base model)")
    p.add_argument("--out", required=True, help="RAW.jsonl (appended; existing complete ids are skipped)")
    _gen_args(p, n_reflections=True)
    return p


def add_curate_args(p):
    p.add_argument("raw", help="RAW.jsonl written by generate")
    p.add_argument("--out", required=True, help="output directory (d_plus.jsonl, d_pm.jsonl, d_pref.jsonl, *.eval.jsonl)")
    p.add_argument("--eval-fraction", type=float, default=0.1, help="questions held out into *.eval.jsonl")
    p.add_argument("--pair-prompt", default="test", choices=["test", "raw"],
                   help="prompt stored in D± / Dpref: test-time reflection prompt, or the one sampled with")
    p.add_argument("--judge", default=None, help="judge MODEL (smollm2-135m | HF dir | .gguf) ranking Dpref pairs "
                   "(default: a length/specificity heuristic)")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--quantize", default=None, choices=["nf4"])
    return p


def add_eval_args(p):
    _task_args(p)
    _model_args(p, "PEFT LoRA adapter of a trained reflector (reflections from it; trials from the base model)")
    p.add_argument("--out", required=True, help="RESULT.json (raw records go to RESULT.raw.jsonl)")
    p.add_argument("--trial2-adapter", default=None, type=os.path.normpath,
                   help="PEFT LoRA adapter that answers trial 2 (two-stage SFT: the 'correct' stage; reflections "
                   "still from --adapter, trial 1 from the base model); loads a second copy of the model")
    p.add_argument("--reflector-mode", default="auto", choices=["auto", "two-stage", "one-stage", "none"],
                   help="two-stage: the reflector writes a reflection, then trial 2 is answered after it (by the base "
                   "model or --trial2-adapter); one-stage (setting I): the reflector's one reply holds the reflection "
                   "and the new attempt, whose answer is trial 2's; none (the paper's 'prompt w/o reflection' "
                   "baseline): no reflection, trial 2 is answered right after the failed trial 1 and a request to try "
                   "again (by the base model or --trial2-adapter; no --adapter); auto (default): one-stage when "
                   "--adapter's run directory has config.json from 'reflectevo sft --mode one-stage', else two-stage")
    p.add_argument("--trial1-cache", default=None,
                   help="JSONL of trial-1 outputs keyed by id (read if present, missing ids appended; the raw "
                   "file of a generate / eval run is only read)")
    p.add_argument("--resume", action="store_true", help="keep RESULT.raw.jsonl and continue it")
    p.add_argument("--overwrite", action="store_true",
                   help="delete an existing RESULT.raw.jsonl and start over (without it or --resume: an error)")
    _gen_args(p, n_reflections=False)
    return p


def add_demo_args(p):
    from reflectevo.demo import add_demo_options

    return add_demo_options(p)


# ---------------------------------------------------------------------------------------------------- helpers
def load_task_items(args):
    from reflectevo.data import get_task

    options = {}
    if getattr(args, "difficulty", None) is not None:
        if str(args.task).strip().lower() != "arithmetic":
            raise LoopArgError("--difficulty: only for --task arithmetic")
        options["difficulty"] = args.difficulty
    task = get_task(args.task, **options)
    if args.limit is not None and args.limit < 1:
        raise LoopArgError(f"--limit must be >= 1, got {args.limit}")
    if args.data is not None and not Path(args.data).is_file():
        raise LoopArgError(f"--data {args.data}: file not found")
    items = task.load(args.data, limit=args.limit)
    if not items:
        raise LoopArgError(f"--data {args.data}: no questions")
    return task, items


def check_out_path(path, option: str, directory: bool = False) -> None:
    """Refuse an output path that cannot be written (before any model is loaded): a file where a folder is needed
    or the other way round, or a parent that is a file."""
    path = Path(path)
    if directory and path.exists() and not path.is_dir():
        raise LoopArgError(f"{option} {path}: exists and is not a directory")
    if not directory and path.is_dir():
        raise LoopArgError(f"{option} {path}: is a directory, not a file")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if parent.exists() and not parent.is_dir():
        raise LoopArgError(f"{option} {path}: {parent} is not a directory")


def load_prompts(args):
    from reflectevo.data.prompts import DEFAULT, load_prompt_overrides

    return load_prompt_overrides(args.prompts) if getattr(args, "prompts", None) else DEFAULT


def default_device(device: str | None) -> str:
    import torch

    if not device:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise LoopArgError(f"--device {device}: not a device (cpu, cuda, cuda:N)") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise LoopArgError(f"--device {device}: CUDA is not available here")
    use_cuda_device(device)
    return device


def use_cuda_device(device) -> None:
    """Make ``cuda:N`` the current CUDA device: Triton launches its kernels, and CUDA graphs capture, on the current
    device, whatever device their tensors are on."""
    import torch

    d = torch.device(device)
    if d.type == "cuda" and d.index is not None:
        if d.index >= torch.cuda.device_count():
            raise LoopArgError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        torch.cuda.set_device(d)


def check_engine_options(kv_cache_gib, max_num_seqs: int = 1, device: str | None = None) -> None:
    default_device(device)
    if kv_cache_gib is not None and not kv_cache_gib > 0:
        raise LoopArgError(f"--kv-cache-gib must be > 0, got {kv_cache_gib}")
    if max_num_seqs < 1:
        raise LoopArgError(f"--max-num-seqs must be >= 1, got {max_num_seqs}")


def check_adapter_dir(adapter: str | None, option: str = "--adapter") -> None:
    if adapter is not None and not (Path(adapter) / "adapter_config.json").is_file():
        raise LoopArgError(f"{option} {adapter}: no adapter_config.json (not a PEFT adapter directory)")


def load_generation_model(args, adapter: str | None = None, option: str = "--adapter"):
    from reflectevo.model import load_model

    check_adapter_dir(adapter, option)
    return load_model(args.model, device=default_device(args.device), dtype=args.dtype,
                      quantize=args.quantize, adapter=adapter)


def build_engines(model, tokenizer, adapter: bool, kv_cache_gib=None, max_num_seqs: int = 256,
                  progress: bool = True):
    """(trial engine, reflection engine). With an adapter the trials run on the base model (adapters off) in an
    engine of their own, so the two prefix caches never mix base and adapter K/V."""
    from reflectevo.gen import Engine
    from reflectevo.gen.engine import gpu_kv_share

    kw = {"max_num_seqs": max_num_seqs, "progress": progress}
    if not adapter:
        engine = Engine(model, tokenizer, kv_cache_gib=kv_cache_gib, **kw)
        return engine, engine
    from reflectevo.data.loop import AdapterOffEngine

    # CUDA default: half of the share each (the first engine's own default would leave the second ~13 %)
    half = gpu_kv_share(model, 2) if kv_cache_gib is None else kv_cache_gib / 2
    return AdapterOffEngine(Engine(model, tokenizer, kv_cache_gib=half, **kw), model), \
        Engine(model, tokenizer, kv_cache_gib=half, **kw)


def prompts_id(path) -> str | None:
    """A fingerprint of a --prompts file's templates (None: the built-in prompts), kept with a raw file's settings
    so that a rerun / resume with other prompts is refused instead of mixing records of two prompt sets."""
    if not path:
        return None
    import hashlib

    data = json.loads(Path(path).read_text(encoding="utf-8"))  # load_prompts has checked it
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode("utf-8")).hexdigest()[:16]


def loop_config(args, test_time: bool):
    from reflectevo.data.loop import LoopConfig

    # the generator as the records name it: 4-bit weights generate other text than the full-precision model, so a
    # quantized run is another source (a rerun / resume mixing the two is refused)
    name = str(args.model) + (f" ({args.quantize})" if getattr(args, "quantize", None) else "")
    cfg = LoopConfig(n_reflections=getattr(args, "n_reflections", 1), demand=getattr(args, "demand", "1-1-1"),
                     seed=args.seed, max_tokens=args.max_tokens, reflection_max_tokens=args.reflection_max_tokens,
                     reflection_temperature=args.reflection_temperature, reflection_top_p=args.reflection_top_p,
                     chunk_size=args.chunk_size, test_time=test_time, reasoning_source=name,
                     reflection_source=name + (f" + adapter {args.adapter}" if args.adapter else ""),
                     trial2_source=(f"{name} + adapter {args.trial2_adapter}"
                                    if getattr(args, "trial2_adapter", None) else None),
                     prompts_id=prompts_id(getattr(args, "prompts", None)),
                     reflector_mode=getattr(args, "reflector_mode", None) or "two-stage")
    if cfg.reflector_mode == "one-stage":  # the reflector answers trial 2 (its records name it)
        cfg.trial2_source = cfg.reflection_source
    elif cfg.reflector_mode == "none":     # no reflector
        cfg.reflection_source = "none"
    if not cfg.reflection_temperature >= 0:
        raise LoopArgError(f"--reflection-temperature must be >= 0, got {cfg.reflection_temperature}")
    if not 0 < cfg.reflection_top_p <= 1:
        raise LoopArgError(f"--reflection-top-p must be in (0, 1], got {cfg.reflection_top_p}")
    check_engine_options(args.kv_cache_gib, args.max_num_seqs, args.device)
    cfg.validate()
    return cfg


# ---------------------------------------------------------------------------------------------------- commands
def cmd_generate(args) -> int:
    from reflectevo.data.eval_run import check_raw_settings, generate_settings, write_json_atomic
    from reflectevo.data.loop import ReflectLoop

    task, items = load_task_items(args)
    prompts = load_prompts(args)
    cfg = loop_config(args, test_time=False)
    check_out_path(args.out, "--out")
    out = Path(args.out)
    settings, sidecar = generate_settings(cfg, task.name), out.with_name(f"{out.stem}.settings.json")
    if out.exists() and out.read_bytes().strip():  # a rerun adds to these records: they must match
        check_raw_settings(out, sidecar, settings, "a rerun into the same file needs the same settings (or "
                                                   "another --out)")
    else:
        write_json_atomic(sidecar, settings)
    _log(f"generate: {len(items)} {task.name} questions, {cfg.n_reflections} reflections per failure -> {out}")
    if args.adapter:
        from reflectevo.data.one_stage import detect_reflector_mode

        mode, why = detect_reflector_mode(args.adapter)
        if mode == "one-stage":   # it answers any reflection request with a reflection AND a new attempt
            _log(f"generate: warning: --adapter {args.adapter} is a one-stage SFT adapter ({why}): its reflections "
                 "may hold a new attempt whose answer trial 2 copies (and D+ would teach); generate reflections "
                 "with a reflect-mode SFT or DPO adapter, or the base model")
    t0 = time.perf_counter()
    model, tok = load_generation_model(args, args.adapter)
    trial_engine, refl_engine = build_engines(model, tok, args.adapter is not None, args.kv_cache_gib,
                                              args.max_num_seqs, args.progress)
    _log(f"model {args.model} loaded in {time.perf_counter() - t0:.1f} s")
    stats = ReflectLoop(task, trial_engine, refl_engine, tok, cfg, prompts=prompts).run(items, out)
    q = stats["questions"]
    rate = q / stats["seconds"] * 3600 if stats["seconds"] > 0 and q else 0.0
    print(f"generate: {q} new questions ({stats['skipped_complete']} already done), trial 1 correct "
          f"{stats['t1_correct']}/{q}, {stats['reflections']} reflections, {stats['t2_correct']} correct trial 2s; "
          f"{stats['seconds']:.1f} s ({rate:.0f} questions/hour) -> {out}")
    return 0


def cmd_curate(args) -> int:
    from reflectevo.data.curate import curate_file

    raw = Path(args.raw)
    if not raw.is_file():
        raise LoopArgError(f"{raw}: file not found")
    if not 0.0 <= args.eval_fraction < 1.0:
        raise LoopArgError(f"--eval-fraction must be in [0, 1), got {args.eval_fraction}")
    check_out_path(args.out, "--out", directory=True)
    if not raw.read_bytes().strip():  # before a judge model loads (curate_file refuses it too)
        from reflectevo.data.jsonl import DataError

        raise DataError(f"{raw}: no records")
    kwargs = {"eval_fraction": args.eval_fraction, "pair_prompt": args.pair_prompt}
    if args.judge:
        from reflectevo.data.judge import BatchedJudge, curate_with_judge
        from reflectevo.gen import Engine
        from reflectevo.model import load_model

        model, tok = load_model(args.judge, device=default_device(args.device), dtype=args.dtype,
                                quantize=args.quantize)
        counts = curate_with_judge(raw, args.out, BatchedJudge(Engine(model, tok), tok), **kwargs)
    else:
        counts = curate_file(raw, args.out, **kwargs)
    out = Path(args.out)
    print(f"curate: {counts.get('records', 0)} questions ({counts.get('trial1_wrong', 0)} wrong at trial 1) -> "
          f"D+ {counts.get('d_plus', 0)}, D± {counts.get('d_pm', 0)}, Dpref {counts.get('d_pref', 0)} "
          f"(held out: {counts.get('d_plus.eval', 0)} / {counts.get('d_pm.eval', 0)} / "
          f"{counts.get('d_pref.eval', 0)}) in {out}/")
    print(json.dumps(counts))
    return 0


def resolve_reflector_mode(args) -> tuple[str, str]:
    """(mode, why): --reflector-mode, or for "auto" what the --adapter's run directory says; sets
    ``args.reflector_mode``. One-stage with --trial2-adapter, and none with --adapter, are errors."""
    from reflectevo.data.loop import ONE_STAGE_TRIAL2
    from reflectevo.data.no_reflection import NO_REFLECTION_ADAPTER
    from reflectevo.data.one_stage import detect_reflector_mode

    mode = getattr(args, "reflector_mode", None) or "auto"
    if mode == "auto":
        mode, why = detect_reflector_mode(args.adapter)
        why += "; --reflector-mode overrides"
    else:
        why = "--reflector-mode"
    if mode == "one-stage" and getattr(args, "trial2_adapter", None):
        raise LoopArgError(ONE_STAGE_TRIAL2 + ("" if why == "--reflector-mode" else f" ({why.split(';')[0]})"))
    if mode == "none" and getattr(args, "adapter", None):
        raise LoopArgError(NO_REFLECTION_ADAPTER)
    args.reflector_mode = mode
    return mode, why


def cmd_eval(args) -> int:
    from reflectevo.data.eval_run import check_eval_raw, check_trial1_cache, format_table, raw_path_for, run_eval

    task, items = load_task_items(args)
    prompts = load_prompts(args)
    check_adapter_dir(args.adapter)
    mode, why = resolve_reflector_mode(args)
    cfg = loop_config(args, test_time=True)
    check_out_path(args.out, "--out")
    check_out_path(raw_path_for(args.out), "--out")
    if args.trial1_cache:
        check_out_path(args.trial1_cache, "--trial1-cache")
        check_trial1_cache(args.out, args.trial1_cache)
        Path(args.trial1_cache).parent.mkdir(parents=True, exist_ok=True)
    check_adapter_dir(args.trial2_adapter, "--trial2-adapter")
    if args.resume and args.overwrite:
        raise LoopArgError("--resume and --overwrite exclude each other")
    check_eval_raw(args.out, items, cfg, args.resume, args.overwrite, args.trial1_cache)
    _log(f"eval: reflector mode {mode} ({why})")   # after the checks: an error stays one line
    from reflectevo.data.one_stage import trained_prompts_mismatch

    for adapter in (args.adapter, args.trial2_adapter):
        mismatch = trained_prompts_mismatch(adapter, getattr(args, "prompts", None))
        if mismatch:
            _log(f"eval: warning: {mismatch}")
    t0 = time.perf_counter()
    model, tok = load_generation_model(args, args.adapter)
    # both models before any engine: an engine without --kv-cache-gib sizes its cache from the memory left
    model2 = None if args.trial2_adapter is None else \
        load_generation_model(args, args.trial2_adapter, "--trial2-adapter")[0]
    # one engine per model state: base (trial 1), --adapter (reflections), --trial2-adapter (trial 2)
    main = 1 + (args.adapter is not None)
    engines = main + (model2 is not None)
    if args.kv_cache_gib is None:  # CUDA: equal shares of the free memory (None on the CPU: each engine's default)
        from reflectevo.gen.engine import gpu_kv_share

        kv = gpu_kv_share(model, engines)
    else:
        kv = args.kv_cache_gib / engines
    trial_engine, refl_engine = build_engines(model, tok, args.adapter is not None, None if kv is None else kv * main,
                                              args.max_num_seqs, args.progress)
    trial2_engine = None
    if model2 is not None:
        from reflectevo.gen import Engine

        trial2_engine = Engine(model2, tok, kv_cache_gib=kv, max_num_seqs=args.max_num_seqs, progress=args.progress)
    _log(f"eval: {len(items)} {task.name} questions; model {args.model} loaded in {time.perf_counter() - t0:.1f} s")
    meta = {"model": str(args.model), "adapter": args.adapter, "trial2_adapter": args.trial2_adapter,
            "data": args.data, "reflector_mode": args.reflector_mode}
    result = run_eval(task, items, trial_engine, refl_engine, tok, args.out, cfg, trial1_cache=args.trial1_cache,
                      resume=args.resume, prompts=prompts, meta=meta, trial2_engine=trial2_engine,
                      overwrite=args.overwrite)
    name = task.name + (" + adapter" if args.adapter else "") + (" + trial-2 adapter" if args.trial2_adapter else "")
    name += {"one-stage": " (one-stage)", "none": " (retry without reflection)"}.get(args.reflector_mode, "")
    print(format_table({name: result}))
    print(f"wrote {args.out}")
    return 0


def cmd_demo(args) -> int:
    from reflectevo.demo import run_demo_from_args

    return run_demo_from_args(args)

