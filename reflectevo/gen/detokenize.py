"""Output text of a sequence: its generated ids decoded after a few prompt tokens, as they read after the prompt.

A SentencePiece decoder (Llama-2, Mistral-7B: "▁" for a space, the first space of the decoded text stripped)
gives "The answer" for "▁The▁answer" alone but "Thought: The answer" after "Thought:". The output text is the
text the output adds to the prompt's:

    output text == decode(prompt + output)[len(decode(prompt)):]

computed from the prompt's last few tokens (``PromptContext``), not the whole prompt. Byte-level BPE decoders
(GPT-2, Llama-3, SmolLM2) have no such rule: their output text is the output's own decoding, as before (but
after prompt ids that end inside a character, see below).

The context starts where its decoded text is not empty (a special token skipped by ``skip_special_tokens``
decodes to nothing, and an empty context would let the decoder strip the output's first space) and does not
start with U+FFFD (inside a character spelled over several byte tokens). When the prompt ends inside such a
character, ``decode(prompt)`` ends in U+FFFD that the output's bytes may turn into the character: the identity
above has no answer then, and the character counts as output text (the output starts where the prompt's text
without its unfinished character ends). Where later bytes turn text the prompt decoded alone into U+FFFD (the
byte-fallback decoder does so to a whole run of byte tokens once one is invalid) the output starts where the
two texts part. Only output text is searched for stop strings, so a stop string never matches prompt text.

Incrementally (stop strings): a step decodes the tokens since the last settled point after the piece settled
before it, or after the prompt context until the first piece settles, so it costs a few tokens' decoding, not
the output's. Text ending in U+FFFD is an unfinished character: it waits for its remaining bytes, up to
MAX_PENDING tokens (then the bytes were invalid and stay as they are).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

REPLACEMENT = "\ufffd"
MAX_PENDING = 6  # output tokens an unfinished UTF-8 character may span before its bytes count as invalid
PROMPT_CONTEXT = 4  # prompt tokens decoded in front of the output (more where they decode to nothing)
CONTEXT_REACH = 8  # how much further back the context may start, looking for text that starts a character
MAX_DANGLING = 4  # prompt tokens at the end that may hold the bytes of one unfinished character
MAX_WINDOW = 32  # tokens decoded a step past which the context moves on to any piece with text


@dataclass(frozen=True)
class PromptContext:
    start: int    # index of the first prompt token decoded in front of the output
    text: str     # decode(prompt[start:])
    anchor: str   # the same without the prompt's unfinished last character (== text when there is none)


def prompt_context(tokenizer, prompt_ids, skip_special_tokens: bool) -> PromptContext:
    """Where the output's decoding starts in the prompt (see the module docstring): the last few tokens whose
    text is not empty and starts and ends on whole characters, apart from an unfinished last character."""
    ids, n = list(prompt_ids), len(prompt_ids)

    def dec(a, b):
        return tokenizer.decode(ids[a:b], skip_special_tokens=skip_special_tokens)

    for dangling in range(min(MAX_DANGLING, n - 1) + 1):
        end = n - dangling
        first = max(0, end - PROMPT_CONTEXT)
        for start in range(first, max(-1, first - CONTEXT_REACH - 1), -1):
            anchor = dec(start, end)
            if anchor and not anchor.startswith(REPLACEMENT) and not anchor.endswith(REPLACEMENT):
                return PromptContext(start, anchor if dangling == 0 else dec(start, n), anchor)
    text = dec(0, n)  # nothing clean near the end (empty text, invalid bytes): the whole prompt, exact
    return PromptContext(0, text, text)


def context_of(tokenizer, seq) -> PromptContext:
    """``seq.prompt_context``, computed the first time it is asked for (the engine sets it per request)."""
    if seq.prompt_context is None:
        seq.prompt_context = prompt_context(tokenizer, seq.token_ids[:seq.num_prompt_tokens],
                                            seq.params.skip_special_tokens)
    return seq.prompt_context


def _after_prompt(full: str, ctx: PromptContext) -> str:
    """The output's text in ``full``, the decoding of the prompt context followed by output tokens."""
    if full.startswith(ctx.text):
        return full[len(ctx.text):]
    if full.startswith(ctx.anchor):  # output bytes finished the prompt's last character
        return full[len(ctx.anchor):]
    return full[len(os.path.commonprefix([full, ctx.text])):]  # a decoder that rewrote the prompt's text


def output_text(tokenizer, seq, num_output: int | None = None) -> str:
    """The text of the first ``num_output`` output tokens (all by default), decoded after the prompt context."""
    ctx = context_of(tokenizer, seq)
    end = len(seq.token_ids) if num_output is None else seq.num_prompt_tokens + num_output
    full = tokenizer.decode(seq.token_ids[ctx.start:end], skip_special_tokens=seq.params.skip_special_tokens)
    return _after_prompt(full, ctx)


def extend_text(tokenizer, seq) -> int:
    """Appends the output's newly settled text to ``seq.text`` (or rewrites it where later bytes changed its
    decoding); returns the length of the text that stayed as it was (see the module docstring).

    ``seq.text_offsets``: the decode context's start and the settled text's end, in output tokens (the start
    negative while the context is the prompt's); ``seq.text_context``: the context's text (decoded alone, up to
    the settled end). While the context is the prompt's, each step decodes it and the whole settled output; it
    moves to the output's last settled piece as soon as that piece decodes alone to the text it added (not
    empty, not starting inside a character), usually at the first settled token."""
    ids, skip, p = seq.token_ids, seq.params.skip_special_tokens, seq.num_prompt_tokens
    if seq.text_context is None:
        seq.text_offsets, seq.text_context = (context_of(tokenizer, seq).start - p, 0), ""
    start, settled = p + seq.text_offsets[0], p + seq.text_offsets[1]
    known = seq.text_context
    full = tokenizer.decode(ids[start:], skip_special_tokens=skip)
    if start < p:  # the prompt's context: the output's whole text so far
        text = _after_prompt(full, context_of(tokenizer, seq))
        new = text[len(seq.text):] if text.startswith(seq.text) else None
        pending = text
    else:
        new = full[len(known):] if full.startswith(known) else None
        text, pending = None, full if new is None else new
    if pending.endswith(REPLACEMENT) and len(ids) - settled < MAX_PENDING:
        return len(seq.text)
    before = len(seq.text)
    if new is None:  # a decoder that rewrote the context given more text (bytes turning a run invalid)
        text = output_text(tokenizer, seq) if text is None else text
        before = len(os.path.commonprefix([seq.text, text]))
        seq.text = text
    else:
        seq.text += new
    piece = tokenizer.decode(ids[settled:], skip_special_tokens=skip)
    if piece and ((new is not None and new.endswith(piece) and not piece.startswith(REPLACEMENT))
                  or len(ids) - start > MAX_WINDOW):
        seq.text_offsets, seq.text_context = (settled - p, len(ids) - p), piece
    else:  # alone the piece reads otherwise (a skipped special token, a lone "▁", bytes of a split character)
        seq.text_offsets, seq.text_context = (start - p, len(ids) - p), full
    return before
