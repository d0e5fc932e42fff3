"""The `reflectevo` command line: generate, curate, sft, dpo, eval, demo, bench.

Each sub-command's options live next to its implementation (``add_*_args``); this file only wires them.
Errors the user can fix (bad file, missing field, unknown task, wrong path) end with one line on stderr and
exit code 2; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

from reflectevo import __version__
from reflectevo.atomic import atomic_write_bytes

COMMANDS = {
    # name: (module, add-args function, its keyword arguments, run function, help)
    "generate": ("reflectevo.cli_loop", "add_generate_args", {}, "cmd_generate",
                 "trial 1 -> reflections -> trial 2 for every question; writes raw records (JSONL)"),
    "curate": ("reflectevo.cli_loop", "add_curate_args", {}, "cmd_curate",
               "raw records -> D+ (d_plus.jsonl), D± (d_pm.jsonl), Dpref (d_pref.jsonl)"),
    "sft": ("reflectevo.trainer.cli_args", "add_train_args", {"dpo": False}, "reflectevo.trainer:run_sft",
            "supervised fine-tuning on D+ (one-stage, reflect, correct), LoRA / QLoRA"),
    "dpo": ("reflectevo.trainer.cli_args", "add_train_args", {"dpo": True}, "reflectevo.trainer:run_dpo",
            "DPO on D± or Dpref, LoRA / QLoRA"),
    "eval": ("reflectevo.cli_loop", "add_eval_args", {}, "cmd_eval",
             "Acc@t1, Acc@t2 and their difference on a test set"),
    "demo": ("reflectevo.cli_loop", "add_demo_args", {}, "cmd_demo",
             "the whole loop on the embedded default model, on a CPU, in minutes"),
}


def _user_errors() -> tuple[type[BaseException], ...]:
    from reflectevo.errors import ReflectEvoError

    errors: list[type[BaseException]] = [ReflectEvoError, OSError]  # OSError: unreadable / unwritable paths
    try:
        from reflectevo.data.jsonl import DataError

        errors.append(DataError)
    except Exception:
        pass
    return tuple(errors)


def _add_bench_args(p: argparse.ArgumentParser):
    p.add_argument("what", choices=["kernels", "sampler", "train", "loop"], help="which benchmark")
    p.add_argument("--out", type=Path, default=None, help="write the JSON result here (and a .md table beside it)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--quick", action="store_true", help="smaller shapes / fewer repeats")


def _cmd_bench(args) -> int:
    from reflectevo.bench.runner import failed, run_bench
    from reflectevo.cli_loop import LoopArgError, check_out_path

    if args.device is not None:
        import torch

        try:
            device = torch.device(args.device)
        except RuntimeError:
            raise LoopArgError(f"--device {args.device}: expected cpu or cuda[:N]") from None
        if device.type not in ("cpu", "cuda"):
            raise LoopArgError(f"--device {args.device}: expected cpu or cuda[:N]")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise LoopArgError(f"--device {args.device}: CUDA is not available on this machine")
    if args.out is not None:  # before the first benchmark runs, not when its result is saved
        if args.out.suffix == ".md":
            raise LoopArgError(f"--out {args.out}: name the JSON file (FILE.json); the .md table goes beside it")
        check_out_path(args.out, "--out")
        check_out_path(args.out.with_suffix(".md"), "--out")
    printed = [0]

    def save(results, table):  # after each benchmark: print its table, rewrite the files with all done so far
        print(table[printed[0]:].lstrip("\n"), flush=True)
        printed[0] = len(table)
        if args.out is not None and len(failed(results)) < len(results):  # a failure alone keeps older files
            args.out.parent.mkdir(parents=True, exist_ok=True)
            for path, text in ((args.out, json.dumps(results, indent=2, default=str)),
                               (args.out.with_suffix(".md"), table + "\n")):
                atomic_write_bytes(path, text.encode("utf-8"))

    result, _ = run_bench(args.what, device=args.device, quick=args.quick, on_result=save)
    if args.out is not None and len(failed(result)) < len(result):
        print(f"wrote {args.out}")
    bad = failed(result)
    if bad:
        print(f"error: benchmark(s) failed: {', '.join(bad)}", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reflectevo", description="ReflectEvo: self-reflection learning for small LLMs")
    parser.add_argument("--version", action="version", version=f"reflectevo {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, add_fn, add_kwargs, _run, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        getattr(importlib.import_module(module), add_fn)(p, **add_kwargs)
    _add_bench_args(sub.add_parser("bench", help="benchmarks: kernels, sampler, train, loop (side by side with baselines)"))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        if args.command == "bench":
            return _cmd_bench(args)
        module, _add, _kwargs, run_fn, _help = COMMANDS[args.command]
        run_module, _, run_name = run_fn.rpartition(":")
        result = getattr(importlib.import_module(run_module or module), run_name)(args)
        return result if isinstance(result, int) else 0
    except _user_errors() as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"reflectevo {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"reflectevo {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
