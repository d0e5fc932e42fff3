"""Prompts of one growing chat conversation: the rendered text and the tokenizer's own ids of it.

Every phase of the loop sends the previous phase's prompt + what the model wrote + a new user turn, rendered
with the chat template. The ids sent are ``encode(text)``: the records save the text and the trainer encodes
that text, so a model is asked at evaluation with exactly the ids it was trained on (paper.md defect 4), and
the same text gets the same ids whether or not its start was generated (e.g. trial 1 from a cache). The
sampler's prefix cache hashes full blocks of ids, so a later prompt reuses every block of the earlier prompt and
generated tokens up to the first id where the encodings differ: none where the tokenizer splits at the seams
as the model generated (our SmolLM2 runs); with Llama-3's pre-tokeniser often the line break after the trial-1
action ("]" and "\n" are one token in "Finish[9]\nObservation"); a sampled split of a word the tokenizer would
not produce.

Nothing here knows a particular chat template: the text is what ``tokenizer.apply_chat_template`` renders. An
opened assistant turn ("Thought:") is the template's own rendering of an assistant message starting with it (as
transformers' ``continue_final_message`` prefills one): the generation prompt + the whitespace the template puts in
front of an assistant message's content (:func:`assistant_frame`; Llama-2: " ", so "[/INST] Thought:") + the opener.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Sequence

__all__ = ["Prompt", "PromptBuilder", "assistant_frame"]

_USER, _REPLY = "\ue000user text\ue000", "\ue001assistant text\ue001"
_FRAMES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _probe(tok) -> tuple[str, str]:
    gen = tok.apply_chat_template([{"role": "user", "content": _USER}], add_generation_prompt=True)
    full = tok.apply_chat_template([{"role": "user", "content": _USER}, {"role": "assistant", "content": _REPLY}],
                                   add_generation_prompt=False)
    if not (isinstance(gen, str) and isinstance(full, str)) or full.count(_REPLY) != 1:
        return "", ""
    at = full.index(_REPLY)
    opening = full[len(gen):at] if full.startswith(gen) else ""
    after = full[at + len(_REPLY):]
    try:
        eot = getattr(tok, "eot_token_id", None)
        eot_text = tok.decode([eot]) if eot is not None else ""
    except Exception:                               # no way to name the end-of-turn token: nothing after content
        eot_text = ""
    closing = after[:after.find(eot_text)] if eot_text and eot_text in after else ""
    # whitespace only: markup such as Qwen3's "<think>\n\n</think>\n\n" in front of a final assistant turn's
    # content is not put into our prompts (the model writes its own) and is no text the model writes before eot
    return (opening if not opening.strip() else ""), (closing if not closing.strip() else "")


def assistant_frame(tok) -> tuple[str, str]:
    """(opening, closing): the whitespace the chat template renders between the generation prompt and an assistant
    message's content, and between that content and its end-of-turn token (Llama-2: " ", " " - "[/INST] x </s>";
    ChatML, Llama-3, Mistral: "", ""). Anything else the template puts there (reasoning markup) or a template that
    renders no such turn gives "". Cached per tokenizer and chat template."""
    key = getattr(tok, "chat_template", None)
    try:
        hit = _FRAMES.get(tok)
    except TypeError:                               # not weak-referenceable: computed each time
        hit = None
    if hit is not None and hit[0] == key:
        return hit[1]
    try:
        frame = _probe(tok)
    except Exception:                               # a template that raises on this conversation: nothing inserted
        frame = ("", "")
    try:
        _FRAMES[tok] = (key, frame)
    except TypeError:
        pass
    return frame


@dataclass(frozen=True)
class Prompt:
    text: str                       # exactly what the model sees: the records save this
    ids: list[int]                  # what the engine receives: encode(text)


class PromptBuilder:
    """Renders chat messages and turns the text into a token-id prompt (see the module docstring)."""

    def __init__(self, tokenizer):
        self.tok = tokenizer

    def render(self, messages: list[dict], opener: str = "") -> str:
        """The conversation as the chat template renders it (generation prompt added) + ``opener``, the start of
        the assistant turn the prompt already holds (e.g. "Thought:"), where the template puts an assistant
        message's content (after :func:`assistant_frame`'s opening)."""
        text = self.tok.apply_chat_template(messages, add_generation_prompt=True)
        return text + assistant_frame(self.tok)[0] + opener if opener else text

    def encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)

    def start(self, text: str) -> Prompt:
        return Prompt(text, self.encode(text))
