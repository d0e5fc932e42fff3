"""``python -m reflectevo.trainer sft|dpo [options]``: the trainer without the rest of the CLI."""
from __future__ import annotations

import argparse
import json
import sys

from reflectevo.errors import ReflectEvoError
from reflectevo.trainer.cli_args import add_train_args, run_dpo, run_sft


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reflectevo.trainer")
    sub = parser.add_subparsers(dest="command", required=True)
    add_train_args(sub.add_parser("sft", help="supervised fine-tuning on D+"), dpo=False)
    add_train_args(sub.add_parser("dpo", help="DPO on D± / Dpref"), dpo=True)
    args = parser.parse_args(argv)
    try:
        summary = (run_sft if args.command == "sft" else run_dpo)(args)
    except ReflectEvoError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
