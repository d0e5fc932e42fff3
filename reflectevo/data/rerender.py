"""Eval's conversations inside stored prompts, rendered again with the chat template of the model being trained.

Our loop saves every prompt rendered with the chat template of the model that generated it; D+ / D± / Dpref keep
those texts (``test_reflection_prompt``, ``test_trial2_prompt``, the pairs' ``reflection_prompt``) and the one-stage
prompt is built from them. Trained on another model (another generator's data, a student), such a text is not
what eval sends the trained model: eval renders the same conversation with the trained model's own template.
:func:`rerender` recognises in a stored text one of eval's conversations for the record's question and trial 1

    reflect      [user: trial prompt, assistant: trial-1 transcript, user: test-time reflection request]
    one-stage    [..., user: the one-stage request (reflect_and_retry_request)]
    trial 2      [... reflect ..., assistant: the record's reflection, user: retry request] + "Thought:"

(every turn's text in order, joined by template markup only; the trial prompt of one of the tasks; ``Prompts`` of
the run) and renders it with the given tokenizer, which is the text eval sends that model for the same trial 1
(for the generator itself: the stored text again). Any other text (official data, data-generation prompts with a
demand, prompts of other templates than ``prompts``) is not recognised (None): the caller keeps it.
"""
from __future__ import annotations

import re

from .conversation import PromptBuilder
from .prompts import _FORMATS, DEFAULT, Prompts, _trial1_transcript

__all__ = ["rerender"]


def _reflection(record: dict) -> str | None:
    value = record.get("reflections")
    if isinstance(value, list):
        value = next((v for v in reversed(value) if isinstance(v, str) and v.strip()), None)
    return value if isinstance(value, str) and value.strip() else None


_WORDS = re.compile(r"[A-Za-z]+ [A-Za-z]+ [A-Za-z]+")   # prose: never in a template's markup between two turns


def _is_rendering(text: str, parts: list[str], opener: str) -> bool:
    """Whether ``text`` is ``parts`` (turn texts) in this order, joined by chat-template markup only (no words of
    another text between two turns nor after the last; anything before the first, e.g. a system turn), and ends
    with ``opener`` (or, without one, does not end with an opened "Thought:")."""
    at, glue = 0, []
    for i, part in enumerate(parts):
        k = text.find(part, at)
        if k < 0:
            return False
        if i:
            glue.append(text[at:k])
        at = k + len(part)
    tail = text[at:].rstrip()
    if opener:
        if not tail.endswith(opener):
            return False
        tail = tail[:-len(opener)]
    elif tail.endswith(DEFAULT.response_prefix):
        return False
    return not any(_WORDS.search(g) for g in glue + [tail])


def rerender(record: dict, text: str, tokenizer, prompts: Prompts | None = None) -> str | None:
    """``text`` (a stored prompt of ``record``) as eval renders it with ``tokenizer``'s chat template, when it is
    one of eval's conversations (module docstring); None otherwise."""
    P = prompts or DEFAULT
    if not isinstance(text, str) or not isinstance(record, dict) or "question" not in record:
        return None
    transcript = _trial1_transcript(record)
    if not isinstance(transcript, str) or not transcript.strip() or transcript.strip() not in text:
        return None
    for task in _FORMATS:
        head = P.prefix(task)
        if head not in text:
            continue
        base = P.trial_messages(task, record) + [{"role": "assistant", "content": transcript.strip()}]
        reflect = P.test_reflection_messages(task, record, transcript)
        reflection = _reflection(record)
        kinds = []
        if reflection is not None:
            kinds.append((P.trial2_messages(record, reflect, reflection), P.response_prefix))
        kinds += [(reflect, ""), (base + [{"role": "user", "content": P.reflect_and_retry_request(task, record)}], "")]
        for messages, opener in kinds:
            if _is_rendering(text, [m["content"].strip() for m in messages], opener):
                return PromptBuilder(tokenizer).render(messages, opener)   # as the loop / eval render it
    return None
