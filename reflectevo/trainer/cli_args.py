"""Command-line options of ``reflectevo sft`` / ``reflectevo dpo`` and the functions behind them.

    add_train_args(parser, dpo)   add every option to an argparse parser
    run_sft(args) -> summary      load the model (QLoRA NF4 on a GPU by default), read --data, train, return summary
    run_dpo(args) -> summary
"""
from __future__ import annotations

import argparse
from pathlib import Path

from reflectevo.data.tasks import TASKS
from reflectevo.trainer.config import (DEFAULT_TARGETS, DPO_LOSSES, OPTIMIZERS, SCHEDULERS, SFT_MODES, SFT_PROMPTS,
                                      TrainConfig, TrainError)


def add_train_args(parser: argparse.ArgumentParser, dpo: bool) -> argparse.ArgumentParser:
    a = parser.add_argument
    a("--data", required=True, help="D+ (sft) or D± / Dpref (dpo) JSONL file")
    if not dpo:
        a("--mode", default="one-stage", choices=SFT_MODES,
          help="one-stage: prompt -> reflection + corrected answer; reflect: -> reflection; "
               "correct: prompt + reflection -> corrected trial")
        a("--sft-prompt", default="test-time", choices=SFT_PROMPTS,
          help="test-time = train on the prompts eval uses: reflect the record's test_reflection_prompt (else built "
               "from question + first_trial_reasoning); one-stage the prompt eval's one-stage reflector mode sends "
               "(that conversation asking for a reflection and a new attempt; records without question + "
               "first_trial_reasoning fall back to reflect_prompt); correct its test_trial2_prompt (else "
               "reason_prompt[1]); stored = the data-generation prompts (reflect_prompt, reason_prompt[1]; for "
               "one-stage a request that asks not to give the answer)")
    a("--task", default=None, choices=TASKS,
      help="the task of the data (eval's --task): records that store no prompt of eval's (the official D+ / D± / "
           "Dpref) train on the conversation eval sends for their trial 1, built from question + "
           "first_trial_reasoning (+ reflections for trial 2; MBPP: + test_list), rendered with this model's chat "
           "template. Default: each record's own 'task' field; without one such records keep their stored / "
           "one-message prompts (a warning says so)")
    a("--prompts", default=None, help="JSON file of prompt templates, the one eval gets with --prompts (prompts "
      "built for records - one-stage, --task - use it, and stored ones are recognised with it)")
    a("--model", default="smollm2-135m", help="smollm2-135m | Hugging Face model dir | .gguf file")
    a("--out", required=True, help="run directory (metrics.jsonl, adapter/, state/, summary.json)")
    a("--adapter", default=None, help="start from this PEFT LoRA adapter" +
      (" (it is also the DPO reference policy)" if dpo else ""))
    a("--qlora", action=argparse.BooleanOptionalAction, default=None,
      help="NF4 base weights + LoRA (default: on with CUDA, off on the CPU)")
    a("--resume", action="store_true", help="continue the run in --out exactly where it stopped")
    a("--device", default=None, help="cuda | cpu (default: cuda when available)")
    g = parser.add_argument_group("schedule")
    g.add_argument("--max-steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    g.add_argument("--epochs", type=float, default=1.0)
    g.add_argument("--max-length", type=int, default=1024, help="tokens per sequence; the prompt is cut from the left")
    if dpo:
        g.add_argument("--max-prompt-length", type=int, default=None, help="prompt tokens kept (default 7/8 of max)")
    g.add_argument("--batch-size", type=int, default=4, help=("pairs" if dpo else "examples") + " per micro-batch")
    g.add_argument("--grad-accum", type=int, default=1)
    g.add_argument("--lr", type=float, default=5e-6 if dpo else 2e-4)
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--scheduler", default="cosine", choices=SCHEDULERS)
    g.add_argument("--warmup-ratio", type=float, default=0.1 if dpo else 0.03)
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="0 disables clipping")
    g.add_argument("--optim", default="adamw", choices=OPTIMIZERS)
    g.add_argument("--seed", type=int, default=42)
    g.add_argument("--on-too-long", default="error", choices=("error", "skip"),
                   help="a response that cannot fit --max-length: stop with an error, or skip the record")
    g = parser.add_argument_group("LoRA and precision")
    g.add_argument("--lora-r", type=int, default=16)
    g.add_argument("--lora-alpha", type=float, default=None, help="default 2 * r")
    g.add_argument("--lora-dropout", type=float, default=0.05 if not dpo else 0.0)
    g.add_argument("--target-modules", default=",".join(DEFAULT_TARGETS))
    g.add_argument("--rslora", action="store_true", help="rank-stabilised scaling alpha / sqrt(r)")
    g.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="recompute each decoder layer in backward (default: on with CUDA)")
    g.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast (default: on with CUDA)")
    g.add_argument("--cpu-compile", action=argparse.BooleanOptionalAction, default=None,
                   help="CPU: compiled one-pass loops for the residual add + bf16 RMSNorm, the bf16 SwiGLU and RoPE "
                        "(default: on with --bf16 on a CPU; the first step compiles them, ~10-30 s)")
    if dpo:
        g = parser.add_argument_group("DPO")
        g.add_argument("--beta", type=float, default=0.1)
        g.add_argument("--loss", default="sigmoid", choices=DPO_LOSSES)
        g.add_argument("--label-smoothing", type=float, default=0.0)
        g.add_argument("--ref-on-the-fly", action="store_true",
                       help="score the reference per batch (adapters off) instead of caching it before training")
    g = parser.add_argument_group("run directory")
    g.add_argument("--save-every", type=int, default=100, help="save adapter/ and state/ every N steps (0: end only)")
    g.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps (written to RUN/eval.jsonl)")
    g.add_argument("--eval-data", default=None, help="held-out JSONL file")
    g.add_argument("--eval-fraction", type=float, default=0.0, help="hold out this seeded fraction of --data")
    g.add_argument("--log-every", type=int, default=10, help="log line every N steps when not on a terminal")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None)
    return parser


def config_from_args(args, dpo: bool) -> TrainConfig:
    targets = tuple(t.strip() for t in str(args.target_modules).split(",") if t.strip())
    cfg = TrainConfig(
        mode=getattr(args, "mode", "one-stage"), sft_prompt=getattr(args, "sft_prompt", "test-time"),
        prompts=getattr(args, "prompts", None), task=getattr(args, "task", None), max_length=args.max_length,
        max_prompt_length=getattr(args, "max_prompt_length", None), on_too_long=args.on_too_long,
        eval_fraction=args.eval_fraction, data_path=str(args.data), epochs=args.epochs, max_steps=args.max_steps,
        batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr, weight_decay=args.weight_decay,
        scheduler=args.scheduler, warmup_ratio=args.warmup_ratio, max_grad_norm=args.max_grad_norm,
        optim=args.optim, seed=args.seed, lora_r=args.lora_r, lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout, target_modules=targets, use_rslora=args.rslora, qlora=args.qlora,
        gradient_checkpointing=args.gradient_checkpointing, bf16=args.bf16, cpu_compile=args.cpu_compile,
        beta=getattr(args, "beta", 0.1), loss_type=getattr(args, "loss", "sigmoid"),
        label_smoothing=getattr(args, "label_smoothing", 0.0), ref_on_the_fly=getattr(args, "ref_on_the_fly", False),
        save_every=args.save_every, eval_every=args.eval_every, log_every=args.log_every, resume=args.resume,
        progress=args.progress,
    )
    if args.eval_data:
        cfg.extra["eval_path"] = str(args.eval_data)  # read later, by _read; validate() needs to know it is coming
    cfg.validate(dpo)
    if cfg.prompts:
        from reflectevo.trainer.data import load_prompts

        load_prompts(cfg.prompts)   # a bad file: one line now, before the model loads
    if not targets:
        raise TrainError("--target-modules: empty list")
    return cfg


def load_for_training(args, cfg: TrainConfig):
    """(model, tokenizer) on the chosen device, NF4-quantised for QLoRA, with --adapter loaded (checked)."""
    import torch

    from reflectevo.model import load_model

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise TrainError(f"--device {device}: CUDA is not available on this machine")
    if device.startswith("cuda"):
        from reflectevo.cli_loop import LoopArgError, use_cuda_device

        try:
            use_cuda_device(device)
        except (LoopArgError, RuntimeError) as e:
            raise TrainError(str(e)) from None
    qlora = cfg.qlora if cfg.qlora is not None else device.startswith("cuda")
    cfg.qlora = qlora
    model, tok = load_model(args.model, device=device, quantize="nf4" if qlora else None)
    cfg.base_model_name = model.config.name_or_path or str(args.model)
    if args.adapter:
        load_adapter_checked(model, args.adapter)
    return model, tok


def load_adapter_checked(model, adapter_dir) -> None:
    """Load a PEFT adapter; TrainError when it is missing or made for another model (shapes / modules)."""
    from reflectevo.errors import ReflectEvoError
    from reflectevo.model.peft_io import load_adapter

    path = Path(adapter_dir)
    if not (path / "adapter_config.json").is_file():
        raise TrainError(f"--adapter {path}: no adapter_config.json (not a PEFT adapter directory)")
    _warn_other_base(model, path)
    try:
        load_adapter(model, path)
    except ReflectEvoError as e:
        raise TrainError(f"--adapter {path}: {e}") from None
    except (RuntimeError, ValueError, KeyError) as e:
        raise TrainError(f"--adapter {path}: made for another model? ({' '.join(str(e).split())[:200]})") from None


def _model_name(name: str) -> str:
    base = Path(str(name).rstrip("/")).name.lower()
    return base[:-5] if base.endswith(".gguf") else base


def _warn_other_base(model, path: Path) -> None:
    """Shapes and module names are checked by the loader; a same-shaped adapter of another checkpoint is not an
    error there (PEFT loads it too), so say so when the names recorded on both sides disagree."""
    import json
    import sys

    try:
        wrote = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path") or ""
    except (OSError, ValueError, AttributeError):
        return  # the loader reports an unreadable config
    ours = getattr(model.config, "name_or_path", "") or ""
    if wrote and ours and _model_name(wrote) != _model_name(ours):
        print(f"[reflectevo] warning: --adapter {path} was trained on {wrote!r}; this model is {ours!r}",
              file=sys.stderr, flush=True)


def _read(args, cfg):
    from reflectevo.trainer.data import read_records

    records = read_records(args.data)
    if args.eval_data:
        cfg.eval_data = read_records(args.eval_data)
        cfg.extra["eval_path"] = str(args.eval_data)
    return records


def run_sft(args) -> dict:
    from reflectevo.trainer.loop import check_out_dir
    from reflectevo.trainer.sft import train_sft

    cfg = config_from_args(args, dpo=False)
    check_out_dir(args.out, cfg)
    records = _read(args, cfg)
    model, tok = load_for_training(args, cfg)
    return train_sft(model, tok, records, cfg, args.out)


def run_dpo(args) -> dict:
    from reflectevo.trainer.dpo import train_dpo
    from reflectevo.trainer.loop import check_out_dir

    cfg = config_from_args(args, dpo=True)
    check_out_dir(args.out, cfg)
    if args.adapter and cfg.ref_on_the_fly:
        raise TrainError("--ref-on-the-fly: not available with --adapter (the reference is the initial adapter)")
    records = _read(args, cfg)
    model, tok = load_for_training(args, cfg)
    return train_dpo(model, tok, records, cfg, args.out, init_adapter=args.adapter)
