"""Trainer audit: options that cannot work, resume with another LoRA layout, an empty held-out set, and trial-2
targets that are only the oracle observation (tiny model and tokenizer of trainer_tiny)."""
from __future__ import annotations

import math

import pytest
import torch

import reflectevo.trainer.state as st
from reflectevo.trainer import TrainError, train_sft
from reflectevo.trainer.data import tokenize_records
from trainer_tiny import cfg, d_plus, killed_after_step, read_metrics, tiny_model, tiny_tokenizer


# ------------------------------------------------------------------------------------------------------------
# options: non-finite or out-of-range values are named before anything runs
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dpo, field, value", [
    (False, "epochs", math.inf),                      # was an OverflowError traceback when counting the steps
    (False, "epochs", math.nan),                      # with --max-steps: a resume then refused "nan != nan"
    (False, "lr", math.inf),                          # was a non-finite loss at step 2, after a line with lr inf
    (False, "weight_decay", math.nan),                # was torch's ValueError traceback
    (False, "max_grad_norm", math.nan),               # silently trained without clipping
    (False, "max_grad_norm", -1.0),                   # silently trained without clipping
    (False, "lora_alpha", math.nan),                  # was a non-finite loss at step 1
    (True, "beta", math.inf),
    (False, "seed", 2**62),                           # was an overflow traceback in the data order
])
def test_unusable_option_values_are_named(dpo, field, value):
    c = cfg(max_steps=2 if field == "epochs" and value != math.inf else None, **{field: value})
    with pytest.raises(TrainError, match=rf"^--{field.replace('_', '-')}: "):
        c.validate(dpo)


def test_infinite_epochs_stop_before_the_run_directory_is_made(tmp_path):
    with pytest.raises(TrainError, match="^--epochs: "):
        train_sft(tiny_model(), tiny_tokenizer(), d_plus(2), cfg(epochs=math.inf), tmp_path / "run")
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------------------------
# resume: the LoRA layout of the model must be the saved run's
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("r", [4, 8])   # 4: other shapes (was a RuntimeError); 8: same shapes, other alpha (silent)
def test_resume_of_a_second_stage_needs_the_same_lora_layout(tmp_path, monkeypatch, r):
    """Stage 2 (--mode correct) continues the stage-1 adapter (r, alpha 8); resuming it without --adapter would
    attach a fresh LoRA of --lora-r 8, alpha 16 and continue with another scaling (or crash on the shapes)."""
    from reflectevo.model.lora import attach_lora, lora_parameters
    from reflectevo.model.peft_io import save_adapter
    from reflectevo.trainer.cli_args import load_adapter_checked

    tok = tiny_tokenizer()
    stage1 = tiny_model()
    attach_lora(stage1, r=r, alpha=8)
    with torch.no_grad():
        for p in lora_parameters(stage1):
            p.normal_(0, 0.2)
    save_adapter(stage1, tmp_path / "stage1")
    c = dict(mode="correct", max_steps=4, batch_size=2, save_every=2, lr=1e-2)

    def model(adapter):
        m = tiny_model()
        if adapter:
            load_adapter_checked(m, tmp_path / "stage1")
        return m

    train_sft(model(True), tok, d_plus(4), cfg(**c), tmp_path / "full")
    with killed_after_step(monkeypatch, 3):
        train_sft(model(True), tok, d_plus(4), cfg(**c), tmp_path / "run")
    with pytest.raises(TrainError, match=r"checkpoint\.pt: .*LoRA"):
        train_sft(model(False), tok, d_plus(4), cfg(**c, resume=True), tmp_path / "run")
    if r == 4:   # a checkpoint that does not record the layout: the shapes are still compared, in one line
        path = tmp_path / "run" / "state" / st.CHECKPOINT
        real_load = st.load_checkpoint

        def without_layout(state_dir):
            blob = real_load(state_dir)
            del blob["fingerprint"]["lora_layout"]
            return blob

        monkeypatch.setattr(st, "load_checkpoint", without_layout)
        with pytest.raises(TrainError, match=rf"^{path}: the saved LoRA tensor .* has shape"):
            train_sft(model(False), tok, d_plus(4), cfg(**c, resume=True), tmp_path / "run")
        monkeypatch.setattr(st, "load_checkpoint", real_load)
    assert [m["step"] for m in read_metrics(tmp_path / "run")] == [1, 2, 3]   # nothing written by the refusal
    train_sft(model(True), tok, d_plus(4), cfg(**c, resume=True), tmp_path / "run")
    full, resumed = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "run")
    assert [m["loss"] for m in resumed] == [m["loss"] for m in full]


# ------------------------------------------------------------------------------------------------------------
# held-out data: asked for but empty
# ------------------------------------------------------------------------------------------------------------
def test_empty_eval_data_file_is_an_error(tmp_path):
    c = cfg(max_steps=2, eval_every=1, eval_data=[])
    c.extra["eval_path"] = str(tmp_path / "eval.jsonl")          # as --eval-data of an empty file leaves it
    with pytest.raises(TrainError, match=r"eval\.jsonl: no held-out"):
        train_sft(tiny_model(), tiny_tokenizer(), d_plus(4), c, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_held_out_records_all_too_long_is_an_error(tmp_path):
    long = d_plus(1)[0]
    long["reflections"] = "reflection : " + " ".join(["alpha"] * 200)
    c = cfg(max_steps=2, eval_every=1, eval_data=[(7, long)], on_too_long="skip")
    c.extra["eval_path"] = "held.jsonl"
    with pytest.raises(TrainError, match=r"held\.jsonl: no held-out .* --max-length 96"):
        train_sft(tiny_model(), tiny_tokenizer(), d_plus(4), c, tmp_path / "run")


# ------------------------------------------------------------------------------------------------------------
# a trial-2 transcript that is only the oracle observation leaves nothing to train on
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["correct", "one-stage"])
def test_trial_2_that_is_only_the_observation_is_named(mode):
    rec = d_plus(1)[0]
    rec["second_trial_reasoning"] = "\nObservation: Answer is CORRECT"
    with pytest.raises(TrainError, match=r"^f\.jsonl:3: field 'second_trial_reasoning' .*observation"):
        tokenize_records([(3, rec)], tiny_tokenizer(), cfg(mode=mode), False, "f.jsonl")
    rec["second_trial_reasoning"] = "thought : fix action : finish [ A ]\nObservation: Answer is CORRECT"
    ex = tokenize_records([(3, rec)], tiny_tokenizer(), cfg(mode=mode), False, "f.jsonl")[0][0]
    assert len(ex.responses[0]) > 1


# ------------------------------------------------------------------------------------------------------------
# more options that cannot work, and a finished run resumed
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("field, value, extra", [
    ("lora_alpha", 0.0, {}),                          # a zero scale: the adapter would train nothing
    ("lora_alpha", -8.0, {}),
    ("eval_fraction", 0.25, {"eval_data": []}),       # two held-out sets named: the fraction was silently ignored
])
def test_more_unusable_options_are_named(field, value, extra):
    with pytest.raises(TrainError, match=rf"^--{field.replace('_', '-')}: "):
        cfg(**{field: value}, **extra).validate(False)


def test_resuming_a_finished_run_keeps_its_summary(tmp_path):
    import json

    tok = tiny_tokenizer()
    first = train_sft(tiny_model(), tok, d_plus(4), cfg(max_steps=2), tmp_path / "run")
    assert first["train_seconds"] > 0 and first["tokens_per_s"] > 0
    lines = (tmp_path / "run" / "metrics.jsonl").read_text()
    again = train_sft(tiny_model(), tok, d_plus(4), cfg(max_steps=2, resume=True), tmp_path / "run")
    assert again == first == json.loads((tmp_path / "run" / "summary.json").read_text())
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == lines
