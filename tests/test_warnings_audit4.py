"""The trainer's data warnings are one line per run: training and held-out records are tokenized separately, but
a user is told once (as the --task warning already is)."""
from __future__ import annotations

from reflectevo.trainer.sft import prepare_examples
from test_prompt_parity_audit2 import tokenizer
from trainer_tiny import cfg


def test_the_one_stage_fallback_warning_is_printed_once_with_held_out_records(capsys):
    tok = tokenizer("llama3")
    recs = [{"id": i, "reflect_prompt": f"Reflect on attempt {i}.", "reflections": "I misread it.",
             "second_trial_reasoning": "Thought: again.\nAction: Finish[B]"} for i in range(4)]
    train, evals = prepare_examples(tok, recs, cfg(mode="one-stage", max_length=1 << 16, eval_fraction=0.5), False)
    assert train and evals
    err = capsys.readouterr().err
    assert err.count("lack 'question' / 'first_trial_reasoning'") == 1, err
