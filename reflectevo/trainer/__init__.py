"""LoRA / QLoRA trainer for ReflectEvo: SFT (one-stage, reflect, correct) and DPO on reflections.

Python API (for in-process use with an already loaded model)::

    from reflectevo.trainer import TrainConfig, train_sft, train_dpo
    summary = train_sft(model, tokenizer, records, TrainConfig(mode="one-stage", max_steps=30), "runs/sft")
    summary = train_dpo(model, tokenizer, records, TrainConfig(beta=0.1, max_steps=30), "runs/dpo")

Command line (wired by reflectevo.cli): ``add_train_args(parser, dpo)`` then ``run_sft(args)`` / ``run_dpo(args)``;
also ``python -m reflectevo.trainer sft|dpo ...``.

Run directory: metrics.jsonl (one line per optimizer step), eval.jsonl (one line per evaluation, keys "eval/..."),
adapter/ (PEFT format), state/ (checkpoint.pt, trainer.json, ref_logps.json), config.json, summary.json.
"""
from reflectevo.trainer.cli_args import add_train_args, run_dpo, run_sft
from reflectevo.trainer.config import TrainConfig, TrainError
from reflectevo.trainer.dpo import train_dpo
from reflectevo.trainer.sft import train_sft

__all__ = ["TrainConfig", "TrainError", "add_train_args", "run_dpo", "run_sft", "train_dpo", "train_sft"]
