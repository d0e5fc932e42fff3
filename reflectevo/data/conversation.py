"""Prompts of one growing chat conversation as token ids, reusing the ids the engine computed before.

Every phase of the loop sends the previous phase's prompt + what the model wrote + a new user turn. The
sampler hashes full blocks of token ids (prompt and generated), so a later prompt is only a cache hit when its
ids BEGIN WITH the exact ids the engine computed before. Prompts are built from those ids:

* a :class:`Prompt` holds the text the model sees (saved in the records), the ids the engine receives, and
  those ids as a path of :class:`Segment` s (ids + the text they decode to);
* ``path + generated`` (:meth:`PromptBuilder.generated`) is what the engine computed for a sequence;
* :meth:`PromptBuilder.follow` turns the next rendered text into ids: whole segments of the path while the
  text starts with them, then the longest run of the first differing segment's ids whose text still matches
  (e.g. generated ids cut back to the text before a stop string), then only the new text is encoded.

The ids sent are always the tokenizer's own encoding of the text (``encode(text)``, checked every time): the
records save the text, and the trainer encodes that text, so a model is asked at evaluation with exactly the
ids it was trained on (paper.md defect 4), and the same text gets the same ids whether or not its start was
generated (e.g. trial 1 from a cache). Where the pieces are not that encoding, the whole text's encoding is
sent: a seam the tokenizer merges across (Llama-3's pre-tokeniser joins "]" or "." with the line break after
it, so "Finish[9]" generated before an end of turn + "\nObservation" rendered after it is not how
"Finish[9]\nObservation" encodes), or generated ids the tokenizer would not produce (a sampled split of a
word). The prefix cache still holds every block before the first differing id.

Nothing here knows a particular chat template: the text is what ``tokenizer.apply_chat_template`` renders.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

__all__ = ["Segment", "Prompt", "PromptBuilder"]


@dataclass(frozen=True)
class Segment:
    ids: tuple[int, ...]
    text: str


@dataclass(frozen=True)
class Prompt:
    text: str                       # exactly what the model sees: the records save this
    ids: list[int]                  # what the engine receives; decodes to ``text``
    path: tuple[Segment, ...]       # ``ids`` in pieces (``follow`` reuses them)


class PromptBuilder:
    """Renders chat messages and turns texts into token-id prompts that extend earlier ones."""

    def __init__(self, tokenizer):
        self.tok = tokenizer

    def render(self, messages: list[dict], opener: str = "") -> str:
        """The conversation as the chat template renders it (generation prompt added) + ``opener``, the start of
        the assistant turn the prompt already holds (e.g. "Thought:")."""
        return self.tok.apply_chat_template(messages, add_generation_prompt=True) + opener

    def encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)

    def _piece(self, ids: Sequence[int], context: Sequence[int]) -> str:
        """The text ``ids`` add after ``context`` (a decoder may treat the first token of a text specially)."""
        if not context:
            return self.decode(ids)
        head = self.decode(context)
        full = self.decode(list(context) + list(ids))
        return full[len(head):] if full.startswith(head) else self.decode(ids)

    def start(self, text: str) -> Prompt:
        ids = self.encode(text)
        return Prompt(text, ids, (Segment(tuple(ids), text),))

    def generated(self, path: tuple[Segment, ...], ids: Sequence[int]) -> tuple[Segment, ...]:
        """``path`` followed by the ids the model generated after it (the engine computed and cached them)."""
        ids = tuple(int(t) for t in ids)
        if not ids:
            return path
        context = path[-1].ids[-1:] if path and path[-1].ids else ()
        return path + (Segment(ids, self._piece(ids, context)),)

    def _matching_head(self, seg: Segment, text: str, pos: int, context) -> Segment:
        """The longest leading run of ``seg.ids`` whose text is a prefix of ``text[pos:]``."""
        common = len(os.path.commonprefix([seg.text, text[pos:pos + len(seg.text)]]))
        lo, hi = 0, len(seg.ids)          # largest k whose text is no longer than the common prefix
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if len(self._piece(seg.ids[:mid], context)) <= common:
                lo = mid
            else:
                hi = mid - 1
        for k in range(lo, 0, -1):
            piece = self._piece(seg.ids[:k], context)
            if text.startswith(piece, pos):
                return Segment(seg.ids[:k], piece)
        return Segment((), "")

    def follow(self, path: tuple[Segment, ...], text: str) -> Prompt:
        """``encode(text)``, as segments that reuse as much of ``path`` as ``text`` starts with (module doc)."""
        pos, taken, context = 0, [], ()
        for seg in path:
            whole = text.startswith(seg.text, pos)
            piece = seg if whole else self._matching_head(seg, text, pos, context)
            if piece.ids:
                taken.append(piece)
                pos += len(piece.text)
                context = piece.ids[-1:]
            if not whole:
                break
        rest = text[pos:]
        if rest:
            taken.append(Segment(tuple(self.encode(rest)), rest))
        ids = [t for seg in taken for t in seg.ids]
        if ids != self.encode(text):  # only the text's own ids: what the trainer encodes from the saved prompt
            return self.start(text)
        return Prompt(text, ids, tuple(taken))
