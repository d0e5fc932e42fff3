"""Run-directory edge cases of the trainer: crashes during a save, resume (tiny model and tokenizer of
trainer_tiny)."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import reflectevo.model.peft_io as peft_io
from reflectevo.trainer import TrainError, train_dpo, train_sft
from trainer_tiny import cfg, d_plus, d_pm, killed_after_step, read_metrics, tiny_model, tiny_tokenizer


def test_crash_during_the_final_save_resumes_to_a_complete_adapter(tmp_path, monkeypatch):
    tok = tiny_tokenizer()
    c = dict(max_steps=3, save_every=2, lr=1e-2)
    train_sft(tiny_model(), tok, d_plus(4), cfg(**c), tmp_path / "full")

    real, calls = peft_io.save_adapter, []

    def killed_in_final_save(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt   # stands for a SIGKILL while the step-3 adapter is being written
        return real(*args, **kwargs)

    monkeypatch.setattr(peft_io, "save_adapter", killed_in_final_save)
    with pytest.raises(KeyboardInterrupt):
        train_sft(tiny_model(), tok, d_plus(4), cfg(**c), tmp_path / "run")
    monkeypatch.setattr(peft_io, "save_adapter", real)
    train_sft(tiny_model(), tok, d_plus(4), cfg(**c, resume=True), tmp_path / "run")

    assert [m["step"] for m in read_metrics(tmp_path / "run")] == [1, 2, 3]
    want = load_file(str(tmp_path / "full" / "adapter" / "adapter_model.safetensors"))
    got = load_file(str(tmp_path / "run" / "adapter" / "adapter_model.safetensors"))
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_lora_on_lm_head_is_refused_before_the_first_step(tmp_path):
    from reflectevo.model.lora import attach_lora

    tok = tiny_tokenizer()
    with pytest.raises(TrainError, match="--target-modules: lm_head"):
        train_sft(tiny_model(), tok, d_plus(2), cfg(max_steps=2, target_modules=("q_proj", "lm_head")),
                  tmp_path / "run")
    with_head = tiny_model()
    attach_lora(with_head, r=4, alpha=8, target_modules=("q_proj", "lm_head"))   # as a PEFT adapter may carry
    with pytest.raises(TrainError, match="--adapter: has a LoRA on lm_head"):
        train_dpo(with_head, tok, d_pm(2), cfg(max_steps=2), tmp_path / "run", init_adapter="peft-adapter")
    assert not (tmp_path / "run").exists()


def test_dpo_from_an_adapter_resumes_when_its_path_is_spelled_differently(tmp_path, monkeypatch):
    from reflectevo.model.lora import attach_lora, lora_parameters
    from reflectevo.model.peft_io import save_adapter
    from reflectevo.trainer.cli_args import load_adapter_checked

    tok = tiny_tokenizer()
    sft = tiny_model()
    attach_lora(sft, r=4, alpha=8)
    with torch.no_grad():
        for p in lora_parameters(sft):
            p.normal_(0, 0.2)
    save_adapter(sft, tmp_path / "sft" / "adapter")
    monkeypatch.chdir(tmp_path)
    c = dict(max_steps=4, batch_size=2, save_every=2, lr=1e-2)

    def run(adapter, out, **kw):
        model = tiny_model()
        load_adapter_checked(model, adapter)
        return train_dpo(model, tok, d_pm(4), cfg(**c, **kw), out, init_adapter=adapter)

    run("sft/adapter", tmp_path / "full")
    with killed_after_step(monkeypatch, 3):
        run("sft/adapter", tmp_path / "run")
    with torch.no_grad():
        lora_parameters(sft)[0].add_(1.0)
    save_adapter(sft, tmp_path / "other")
    with pytest.raises(TrainError, match="no reference log-probs for this --adapter"):
        run("other", tmp_path / "run", resume=True)                       # another initial policy is refused
    run(str(tmp_path / "sft" / "adapter"), tmp_path / "run", resume=True)   # same adapter, absolute path
    full, resumed = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "run")
    for m in full + resumed:
        m.pop("tokens_per_s")
    assert resumed == full
