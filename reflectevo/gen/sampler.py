"""Logits processing and sampling for a batch of sequences, each with its own SamplingParams.

Randomness is counter-based: the uniform noise for sequence s, generated token number t and vocabulary entry v
is a hash of (seed_s, t, v), so a seeded request draws the same tokens whatever else shares the batch (and
after a preemption), and no generator state lives outside the tensors. Sampling is the Gumbel-max trick,
argmax(logits / T + Gumbel noise) over the tokens the filters keep, which draws exactly from softmax(logits / T).
"""
from __future__ import annotations

import torch

from reflectevo.gen.sequence import Sequence

_M32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xorshift-multiply rounds) on int64 tensors holding values < 2**32."""
    x = x & _M32
    x = ((x ^ (x >> 16)) * 0x7FEB352D) & _M32
    x = ((x ^ (x >> 15)) * 0x2C1B3C6D) & _M32
    x = ((x ^ (x >> 16)) * 0x297A2D39) & _M32
    return x ^ (x >> 16)


def seq_key(seed: int, sample_idx: int) -> int:
    """The per-sequence 32-bit key: the request seed with the sample index mixed in."""
    k = _mix32(torch.tensor([seed & _M32], dtype=torch.int64))
    k = _mix32(k ^ ((seed >> 32) & _M32))
    return int(_mix32(k + 0x9E3779B9 * (sample_idx + 1) & _M32))


def gumbel_noise(keys: torch.Tensor, steps: torch.Tensor, vocab: int) -> torch.Tensor:
    """keys, steps [S] int64 -> Gumbel(0, 1) noise [S, vocab], a pure function of (key, step, vocab index)."""
    row = _mix32(keys * 0x01000193 + _mix32(steps + 0x68E31DA4))
    idx = torch.arange(vocab, device=keys.device, dtype=torch.int64)
    bits = _mix32(row[:, None] ^ _mix32(idx + 0x1B873593)[None, :])
    u = ((bits >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))  # in (0, 1)
    return -torch.log(-torch.log(u))


def apply_repetition_penalty(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    rows = [i for i, s in enumerate(seqs) if s.params.repetition_penalty != 1.0]
    if not rows:
        return logits
    longest = max(len(seqs[i].token_ids) for i in rows)
    ids = torch.full((len(rows), longest), -1, dtype=torch.long)
    for r, i in enumerate(rows):
        ids[r, : len(seqs[i].token_ids)] = torch.tensor(seqs[i].token_ids)
    ids = ids.to(logits.device)
    seen = torch.zeros(len(rows), logits.shape[1] + 1, dtype=torch.bool, device=logits.device)
    seen.scatter_(1, torch.where(ids < 0, logits.shape[1], ids), True)
    seen = seen[:, :-1]
    pen = torch.tensor([seqs[i].params.repetition_penalty for i in rows], device=logits.device)[:, None]
    sub = logits[rows]
    sub = torch.where(seen, torch.where(sub > 0, sub / pen, sub * pen), sub)
    logits[rows] = sub
    return logits


def filter_logits(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor,
                  need_sort: bool) -> torch.Tensor:
    """Set to -inf what top_k (0 = off), top_p (1 = off) and min_p (0 = off) drop; rows [S, V] already / T."""
    V = logits.shape[1]
    if need_sort:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        rank = torch.arange(V, device=logits.device)[None, :]
        k = torch.where(top_k > 0, top_k, V)[:, None]
        drop = rank >= k
        probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
        before = probs.cumsum(dim=-1) - probs  # mass of the strictly better tokens
        drop |= before >= top_p[:, None]
        drop[:, 0] = False
        logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
    if bool((min_p > 0).any()):
        probs = torch.softmax(logits, dim=-1)
        cut = probs.max(dim=-1, keepdim=True).values * min_p[:, None]
        logits = logits.masked_fill(probs < cut, float("-inf"))
    return logits


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """logits [S, V] (float) for the last position of each sequence -> next token ids [S] (on the device)."""
    logits = apply_repetition_penalty(logits.float(), seqs)
    chosen = logits.argmax(dim=-1)  # greedy: ties go to the first index, as torch/transformers argmax
    rows = [i for i, s in enumerate(seqs) if s.params.temperature > 0.0]
    if not rows:
        return chosen
    dev, sub = logits.device, [seqs[i] for i in rows]
    temps = torch.tensor([s.params.temperature for s in sub], device=dev)
    top_k = torch.tensor([max(s.params.top_k, 0) for s in sub], device=dev)
    top_p = torch.tensor([s.params.top_p for s in sub], device=dev)
    min_p = torch.tensor([s.params.min_p for s in sub], device=dev)
    need_sort = any(0 < s.params.top_k < logits.shape[1] or s.params.top_p < 1.0 for s in sub)
    scaled = filter_logits(logits[rows] / temps[:, None], top_k, top_p, min_p, need_sort)
    keys = torch.tensor([s.seed for s in sub], dtype=torch.int64, device=dev)
    steps = torch.tensor([s.num_output_tokens for s in sub], dtype=torch.int64, device=dev)
    chosen[torch.tensor(rows, device=dev)] = (scaled + gumbel_noise(keys, steps, logits.shape[1])).argmax(dim=-1)
    return chosen
