"""A chat template with a clock (Llama-3.2: ``strftime_now``) must not make a run's training data depend on the
day: ``sft --resume`` / ``dpo --resume`` compare a digest of the tokenized examples, so prompts the trainer renders
itself (eval's conversation built for official records with --task, records of another template re-rendered,
plain-text prompts wrapped in the template) are rendered with one fixed date."""
from __future__ import annotations

import datetime as real_datetime

import pytest

from reflectevo.trainer.data import data_digest, tokenize_records
from test_cross_template_audit3 import CHATML, _TOKENIZERS
from test_official_records import records
from test_prompt_parity_audit2 import _bpe, pipeline
from trainer_tiny import cfg


def dated_tokenizer():
    dated = CHATML.replace("SYSTEM", "Today is {{ strftime_now('%d %b %Y') }}.")
    return _TOKENIZERS.setdefault("chatml_dated", _bpe(dated, ["<|im_start|>", "<|im_end|>"], "<|im_start|>",
                                                       "<|im_end|>", False))


def on_day(monkeypatch, day: int):
    class Fixed(real_datetime.datetime):
        @classmethod
        def now(cls, tz=None):
            return real_datetime.datetime(2030, 1, day, 12, 0, 0)
    monkeypatch.setattr("reflectevo.model.tokenizer.datetime", Fixed)


def digests(monkeypatch, recs, mode, dpo, **kw):
    tok, out = dated_tokenizer(), []
    for day in (1, 2):
        on_day(monkeypatch, day)
        examples, _ = tokenize_records(list(enumerate(recs, 1)), tok, cfg(mode=mode, max_length=1 << 20, **kw), dpo,
                                       "f.jsonl")
        out.append(data_digest(examples))
    return out


@pytest.mark.parametrize("mode,dpo", [("one-stage", False), ("reflect", False), ("correct", False), ("reflect", True)])
def test_official_records_with_task_give_the_same_examples_on_another_day(monkeypatch, tmp_path, mode, dpo):
    _, d_plus, d_pm = records("logiqa", tmp_path)
    first, second = digests(monkeypatch, [d_pm if dpo else d_plus], mode, dpo, task="logiqa")
    assert first == second


@pytest.mark.parametrize("mode", ["reflect", "correct", "one-stage"])
def test_records_of_another_template_give_the_same_examples_on_another_day(monkeypatch, tmp_path_factory, mode):
    run = pipeline("llama3", "canonical", tmp_path_factory)
    first, second = digests(monkeypatch, run.d_plus[:2], mode, False)
    assert first == second


def test_plain_official_prompts_give_the_same_examples_on_another_day(monkeypatch, tmp_path):
    _, d_plus, _ = records("logiqa", tmp_path)
    first, second = digests(monkeypatch, [d_plus], "reflect", False, sft_prompt="stored")
    assert first == second
