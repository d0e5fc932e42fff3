"""SentencePiece vocabularies in GGUF metadata (``tokenizer.ggml.model = "llama"``: Llama-2, Mistral-7B, ...).

The file holds pieces, scores and token types, not a tokenizer. It is rebuilt here as the BPE ``tokenizers``
pipeline transformers builds from the same metadata, so both give the same ids:

* model: BPE over the pieces with byte fallback (``<0x00>``..``<0xFF>``) and no unk token; its merges are the
  file's ``tokenizer.ggml.merges`` when present, otherwise every split of a piece into two pieces of the vocab,
  ranked by the score of the whole piece (higher first), then the longer left part, then the longer right part;
* no normalizer; Metaspace pre-tokenizer (spaces become ``▁``, one ``▁`` in front of the text but not after a
  special token, no splitting);
* decoder: ``▁`` back to a space, byte pieces back to bytes, the leading space of the text stripped;
* matched whole in the text: the control tokens (type 3), the bos / eos / unk / padding tokens and the literal
  ``<unk>`` / ``<s>`` / ``</s>`` pieces as special tokens; user-defined tokens (type 4) as plain added tokens;
* BOS in front of every encoded text unless ``tokenizer.ggml.add_bos_token`` is false (llama.cpp's default for a
  SentencePiece vocab too), EOS after it when ``tokenizer.ggml.add_eos_token`` is true.

``tokenizer.ggml.add_space_prefix`` is not read: transformers ignores it as well (and Llama/Mistral files set it).
"""
from __future__ import annotations

import math

from tokenizers import AddedToken, decoders, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.models import BPE

from reflectevo.errors import ModelLoadError

CONTROL, USER_DEFINED = 3, 4  # llama.cpp token types
SPIECE_SPACE = "\u2581"
# pieces transformers' Llama tokenizer treats as special whatever the ids in the file say
DEFAULT_SPECIAL_PIECES = ("<unk>", "<s>", "</s>")


def merges_from_scores(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """BPE merges a SentencePiece vocabulary implies: each way to cut a piece into two pieces of the vocabulary,
    best-scored piece first; among equal scores the longer left part, then the longer right part, then the order
    of the pieces in the file (and, within a piece, of the two parts' ids)."""
    ids = {t: i for i, t in enumerate(tokens)}
    score_of = dict(zip(tokens, scores))
    ranked = []
    for piece, score in score_of.items():
        cuts = [(piece[:k], piece[k:]) for k in range(1, len(piece)) if piece[:k] in ids and piece[k:] in ids]
        cuts.sort(key=lambda lr: (ids[lr[0]], ids[lr[1]]))
        ranked += [(-score, -len(left), -len(right), left, right) for left, right in cuts]
    ranked.sort(key=lambda r: r[:3])  # stable: ties keep the order above
    return [(r[3], r[4]) for r in ranked]


def sentencepiece_backend(fields: dict) -> HFTokenizer:
    """The ``tokenizers`` pipeline of a GGUF SentencePiece vocabulary (see the module docstring)."""
    tokens = list(fields["tokenizer.ggml.tokens"])
    types = list(fields.get("tokenizer.ggml.token_type") or [])
    scores = fields.get("tokenizer.ggml.scores")
    if types and len(types) != len(tokens):
        raise ModelLoadError(f"GGUF tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens")
    if "tokenizer.ggml.merges" in fields:
        merges = [tuple(m.split(" ", 1)) for m in fields["tokenizer.ggml.merges"]]
    elif scores is None:
        raise ModelLoadError("GGUF tokenizer model 'llama' (SentencePiece) lacks tokenizer.ggml.scores (and "
                             "tokenizer.ggml.merges); its merges cannot be recovered")
    else:
        scores = [float(s) for s in scores]
        if len(scores) != len(tokens) or any(math.isnan(s) for s in scores):
            raise ModelLoadError(f"GGUF tokenizer.ggml.scores has {len(scores)} entries for {len(tokens)} tokens"
                                 if len(scores) != len(tokens) else "GGUF tokenizer.ggml.scores holds NaN")
        merges = merges_from_scores(tokens, scores)
    vocab = {t: i for i, t in enumerate(tokens)}
    backend = HFTokenizer(BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True))
    backend.normalizer = None
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPIECE_SPACE, prepend_scheme="first", split=False)
    backend.decoder = decoders.Sequence([decoders.Replace(SPIECE_SPACE, " "), decoders.ByteFallback(),
                                         decoders.Fuse(), decoders.Strip(content=" ", left=1, right=0)])

    def token_at(key):
        i = fields.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    special = [t for t in DEFAULT_SPECIAL_PIECES if t in vocab]
    special += [t for t, ty in zip(tokens, types) if ty == CONTROL]
    special += [t for t in (token_at(k) for k in ("unknown", "bos", "eos", "padding")) if t is not None]
    special = list(dict.fromkeys(special))
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    user = [t for t, ty in zip(tokens, types) if ty == USER_DEFINED and t not in special]
    if user:
        backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])

    bos, eos = token_at("bos"), token_at("eos")
    add_bos = bool(fields.get("tokenizer.ggml.add_bos_token", True)) and bos is not None
    add_eos = bool(fields.get("tokenizer.ggml.add_eos_token", False)) and eos is not None
    backend.post_processor = bos_eos_processor(bos, vocab.get(bos), eos, vocab.get(eos), add_bos, add_eos)
    return backend


def bos_eos_processor(bos, bos_id, eos, eos_id, add_bos: bool, add_eos: bool):
    """``[BOS] $A [EOS]`` (pairs: ``[BOS] $A [EOS] [BOS] $B [EOS]``) with the parts the flags ask for."""
    def one(seq, type_id):
        return [f"{bos}:{type_id}"] * add_bos + [f"${seq}:{type_id}"] + [f"{eos}:{type_id}"] * add_eos

    specials = ([(bos, bos_id)] if add_bos else []) + ([(eos, eos_id)] if add_eos and eos != bos else [])
    return processors.TemplateProcessing(single=" ".join(one("A", 0)), pair=" ".join(one("A", 0) + one("B", 1)),
                                         special_tokens=specials)
