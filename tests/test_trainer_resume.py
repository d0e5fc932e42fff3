"""Run-directory edge cases of the trainer: crashes during a save, resume (tiny model and tokenizer of
test_trainer)."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import reflectevo.model.peft_io as peft_io
from reflectevo.trainer import TrainError, train_dpo, train_sft
from test_trainer import cfg, d_plus, d_pm, read_metrics, tiny_model, tiny_tokenizer


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
