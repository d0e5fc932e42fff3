"""What a run may reuse from an earlier one (cached reference log-probs, a checkpoint to resume), epoch accounting,
held-out data from the command line, and adapter folders left half-swapped by a kill."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import pytest
import torch

from reflectevo.model.lora import quantize_model
from reflectevo.trainer import TrainConfig, TrainError, train_dpo, train_sft
from reflectevo.trainer.cli_args import add_train_args, config_from_args, load_adapter_checked
from reflectevo.trainer.dpo import compute_reference
from reflectevo.trainer.loop import Order, base_weights_digest, step_examples, total_steps
from reflectevo.trainer.sft import prepare_examples
from trainer_tiny import cfg, d_plus, d_pm, tiny_model, tiny_tokenizer


def _cached_ref(run):
    return json.loads((run / "state" / "ref_logps.json").read_text())["logps"]


def test_reference_cache_is_not_reused_for_other_base_weights(tmp_path):
    tok = tiny_tokenizer()
    run = tmp_path / "run"
    train_dpo(tiny_model(seed=0), tok, d_pm(4), cfg(max_steps=1), run)
    first = _cached_ref(run)
    (run / "state" / "checkpoint.pt").unlink()  # killed before its first save: a fresh run may start here
    other = tiny_model(seed=1)
    train_dpo(other, tok, d_pm(4), cfg(max_steps=1), run)
    c = cfg(max_steps=1)
    train, _ = prepare_examples(tok, d_pm(4), c, True)
    truth = compute_reference(tiny_model(seed=1), train, c, tok.pad_token_id, use_adapters=False)
    cached = _cached_ref(run)
    assert cached["0"] != first["0"]
    for key, value in truth.items():
        assert cached[key] == pytest.approx(value, rel=1e-5)


def test_base_digest_samples_stay_in_bounds_on_large_tensors():
    """float32 index arithmetic would round 28311551 up to 28311552 (the embedding of SmolLM2-135M)."""
    model = torch.nn.Module()
    model.embed = torch.nn.Parameter(torch.zeros(49152 * 576), requires_grad=False)
    with torch.no_grad():
        model.embed[-1] = 1.0
    digest = base_weights_digest(model)
    with torch.no_grad():
        model.embed[-1] = 2.0  # the last element is sampled
    assert base_weights_digest(model) != digest


def test_base_digest_tells_checkpoints_and_forms_apart():
    a, b = tiny_model(seed=0), tiny_model(seed=1)
    assert base_weights_digest(a) == base_weights_digest(tiny_model(seed=0))
    assert base_weights_digest(a) != base_weights_digest(b)
    q = quantize_model(tiny_model(seed=0), compute_dtype=torch.float32)
    assert base_weights_digest(q) != base_weights_digest(a)
    with torch.no_grad():  # the first element of every tensor is among the sampled ones
        a.layers[0].mlp.down_proj.weight[0, 0] += 1e-3
    assert base_weights_digest(a) != base_weights_digest(tiny_model(seed=0))


@pytest.mark.parametrize("change", ["data", "weights"])
def test_resume_refuses_other_data_or_weights(tmp_path, change):
    tok = tiny_tokenizer()
    run = tmp_path / "run"
    train_sft(tiny_model(), tok, d_plus(4), cfg(max_steps=2, save_every=1), run)
    records = d_plus(8)[4:] if change == "data" else d_plus(4)
    model = tiny_model(seed=7) if change == "weights" else tiny_model()
    match = "data differ" if change == "data" else "other base weights"
    with pytest.raises(TrainError, match=match):
        train_sft(model, tok, records, cfg(max_steps=4, save_every=1, resume=True), run)


def test_one_epoch_takes_each_example_once():
    for n, batch, accum, epochs in [(5, 4, 1, 1.0), (7, 2, 2, 1.0), (10, 3, 1, 2.0), (9, 4, 1, 0.5)]:
        c = TrainConfig(batch_size=batch, grad_accum=accum, epochs=epochs)
        order = Order(n, c.seed)
        taken, start = [], 0
        for step in range(total_steps(n, c)):
            count = step_examples(step, n, c)
            assert 1 <= count <= batch * accum
            taken += order.take(start, count)
            start += count
        whole, part = divmod(len(taken), n)
        assert len(taken) == -(-round(epochs * n * 1e6) // 1_000_000)
        for e in range(whole):
            assert sorted(taken[e * n:(e + 1) * n]) == list(range(n))
        assert len(set(taken[whole * n:])) == part


def test_short_last_step_trains(tmp_path):
    tok = tiny_tokenizer()
    summary = train_sft(tiny_model(), tok, d_plus(5), cfg(epochs=1.0, batch_size=4), tmp_path / "run")
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2]
    assert lines[-1]["epoch"] == pytest.approx(1.0)
    assert summary is not None


def test_eval_data_with_eval_every_from_the_command_line(tmp_path):
    parser = add_train_args(argparse.ArgumentParser(), dpo=False)
    args = parser.parse_args(["--data", "train.jsonl", "--out", str(tmp_path / "run"), "--eval-data", "held.jsonl",
                              "--eval-every", "2"])
    assert config_from_args(args, dpo=False).eval_every == 2
    args = parser.parse_args(["--data", "train.jsonl", "--out", str(tmp_path / "run"), "--eval-every", "2"])
    with pytest.raises(TrainError, match="eval_every|eval-every"):
        config_from_args(args, dpo=False)


def test_adapter_of_a_same_shaped_other_model_is_named(tmp_path, capsys):
    from reflectevo.model.lora import attach_lora
    from reflectevo.model.peft_io import save_adapter

    src = tiny_model()
    attach_lora(src, r=4, alpha=8)
    save_adapter(src, tmp_path / "adapter", base_model_name_or_path="org/model-A")
    other = tiny_model(seed=3)
    other.config.name_or_path = "org/model-B"
    load_adapter_checked(other, tmp_path / "adapter")
    assert "trained on 'org/model-A'" in capsys.readouterr().err
    same = tiny_model(seed=3)
    same.config.name_or_path = "/models/Model-A"
    load_adapter_checked(same, tmp_path / "adapter")
    assert "warning" not in capsys.readouterr().err


def test_adapter_folder_swapped_by_a_killed_writer_comes_back(tmp_path):
    from reflectevo.model.lora import attach_lora
    from reflectevo.model.peft_io import save_adapter

    model = tiny_model()
    attach_lora(model, r=4, alpha=8)
    save_adapter(model, tmp_path / "adapter")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    os.replace(tmp_path / "adapter", tmp_path / f".adapter.old{pid}")  # killed between the two renames
    (tmp_path / f".adapter.tmp{pid}").mkdir()
    save_adapter(model, tmp_path / "other")  # a write elsewhere in the folder leaves them alone
    assert (tmp_path / f".adapter.old{pid}").exists()
    save_adapter(model, tmp_path / "adapter")
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["adapter", "other"]
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
