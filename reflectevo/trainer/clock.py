"""One date for the prompts the trainer renders with a chat template that writes today's date.

A template with a clock (Llama-3.2's "Today Date: ...": ``strftime_now``) renders the same conversation with
another text each day. The trainer renders prompts itself (eval's conversation for records that store none,
records of another template rendered again, plain-text prompts wrapped in the template), and ``--resume`` compares
a digest of the tokenized data: a run resumed on another day would be refused, and two runs of one data set would
train on different ids. Those renderings use :data:`TRAINING_DATE` (Llama-3.2's own date when a renderer has no
clock) instead; prompts stored already rendered with this template keep the date they hold.
"""
from __future__ import annotations

import datetime

__all__ = ["TRAINING_DATE", "fixed_clock"]

TRAINING_DATE = datetime.datetime(2024, 7, 26)


class _FixedClock:
    """``tokenizer`` whose chat template renders with ``strftime_now`` on :data:`TRAINING_DATE`."""

    def __init__(self, tokenizer):
        self._tok = tokenizer

    def __getattr__(self, name):
        return getattr(self._tok, name)

    def apply_chat_template(self, messages, *args, **kwargs):
        kwargs.setdefault("strftime_now", TRAINING_DATE.strftime)
        return self._tok.apply_chat_template(messages, *args, **kwargs)


def fixed_clock(tokenizer):
    """``tokenizer`` itself when its chat template has no clock, else one that renders with a fixed date."""
    if isinstance(tokenizer, _FixedClock) or "strftime_now" not in str(getattr(tokenizer, "chat_template", "") or ""):
        return tokenizer
    return _FixedClock(tokenizer)
