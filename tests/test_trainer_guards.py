"""Trainer guards: options that cannot work and gradients that must not be stepped stop the run before anything
is written (tiny model and tokenizer of trainer_tiny)."""
from __future__ import annotations

import json

import pytest

from reflectevo.trainer import TrainError, train_sft
from trainer_tiny import cfg, d_plus, read_metrics, tiny_model, tiny_tokenizer


def test_eval_every_without_held_out_data_is_refused(tmp_path):
    tok, model = tiny_tokenizer(), tiny_model()
    with pytest.raises(TrainError, match=r"^--eval-every: has no held-out data .*--eval-data FILE or --eval-fraction"):
        train_sft(model, tok, d_plus(4), cfg(max_steps=2, eval_every=1), tmp_path / "run")
    assert not (tmp_path / "run").exists()
    train_sft(model, tok, d_plus(4), cfg(max_steps=2, eval_every=1, eval_fraction=0.25), tmp_path / "ok")
    assert [json.loads(x)["step"] for x in (tmp_path / "ok" / "eval.jsonl").read_text().splitlines()] == [1, 2]


def test_non_finite_gradient_with_finite_loss_stops_before_stepping(tmp_path):
    tok, model = tiny_tokenizer(), tiny_model()

    def poison_gradient(module, inputs, out):
        out.register_hook(lambda g: g * float("nan"))

    model.layers[0].mlp.register_forward_hook(poison_gradient)
    with pytest.raises(TrainError, match=r"step 1: non-finite gradient norm \(nan\) with a finite loss .* examples \d"):
        train_sft(model, tok, d_plus(2), cfg(max_steps=2), tmp_path / "run")
    assert not (tmp_path / "run" / "adapter").exists()
    assert not (tmp_path / "run" / "metrics.jsonl").exists() or read_metrics(tmp_path / "run") == []


def test_progress_to_a_file_is_plain_lines(capsys):
    from reflectevo.trainer.loop import Progress

    bar = Progress(3, enabled=True, log_every=1, label="sft")  # asked for, but stderr is not a terminal here
    for step in (1, 2, 3):
        bar.update(step, 1.0 / step, 100.0)
    err = capsys.readouterr().err
    assert "\r" not in err and "\x1b" not in err
    assert err.count("[reflectevo] sft step") == 3
