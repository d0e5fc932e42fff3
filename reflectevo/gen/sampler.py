"""Logits processing and sampling for a batch of sequences, each with its own SamplingParams.

Randomness is counter-based: the uniform noise for sequence s, generated token number t and vocabulary entry v
is a hash of (seed_s, t, v), so a seeded request draws the same tokens whatever else shares the batch (and
after a preemption), and no generator state lives outside the tensors. Sampling is the Gumbel-max trick,
argmax(logits / T + Gumbel noise) over the tokens the filters keep, which draws exactly from softmax(logits / T).

Cost (the vocabulary is ~50k-150k wide): top-p needs the probabilities in descending order only as far as the
cut, so it reads them from ``topk`` of the first few hundred candidates and sorts the whole row only for rows
whose cut lies further out; both give the same kept set, because the cumulative sums of the leading entries
are the same numbers either way. The noise is computed only for the tokens the filters kept when those are
few, and the per-vocabulary half of its hash is cached: the same numbers, at a fraction of the cost.
Which filters run is known from the parameters on the host; only data-dependent choices read the device back
(a top-p cut past the candidates, how many tokens the filters kept).
"""
from __future__ import annotations

import torch

from reflectevo.gen.sequence import Sequence

_M32 = 0xFFFFFFFF
_BELOW_ONE = 1.0 - 2.0**-24  # the largest float32 below 1


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


def _row_hash(keys: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    return _mix32(keys * 0x01000193 + _mix32(steps + 0x68E31DA4))


_vocab_hash_cache: dict[tuple[int, str], torch.Tensor] = {}


def _vocab_hash(vocab: int, device: torch.device) -> torch.Tensor:
    """The per-vocabulary-index half of the noise hash, [vocab] int64 (the same every step: cached)."""
    key = (vocab, str(device))
    h = _vocab_hash_cache.get(key)
    if h is None:
        h = _vocab_hash_cache[key] = _mix32(torch.arange(vocab, device=device, dtype=torch.int64) + 0x1B873593)
    return h


def _gumbel_from(row: torch.Tensor, vocab_hash: torch.Tensor) -> torch.Tensor:
    bits = _mix32(row ^ vocab_hash)
    u = ((bits >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))
    u = u.clamp_(max=_BELOW_ONE)  # the top value, 1 - 2**-25, rounds to 1.0 in fp32: its noise would be +inf
    return -torch.log(-torch.log(u))


def gumbel_noise(keys: torch.Tensor, steps: torch.Tensor, vocab: int) -> torch.Tensor:
    """keys, steps [S] int64 -> Gumbel(0, 1) noise [S, vocab], a pure function of (key, step, vocab index)."""
    return _gumbel_from(_row_hash(keys, steps)[:, None], _vocab_hash(vocab, keys.device)[None, :])


def gumbel_noise_at(keys: torch.Tensor, steps: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """gumbel_noise(keys, steps, vocab)[rows, cols], computed only at those entries."""
    return _gumbel_from(_row_hash(keys, steps)[rows], _mix32(cols + 0x1B873593))


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
    # out of place: the runner's logits are inference tensors, which cannot be written outside inference mode
    return logits.index_put((torch.tensor(rows, device=logits.device),), sub)


TOP_P_CANDIDATES = 512  # top-p looks for its cut among this many best tokens before sorting a whole row


def _top_k_mask(logits: torch.Tensor, top_k: torch.Tensor, k_max: int | None = None) -> torch.Tensor:
    """True where a token is below its row's k-th largest value (top_k 0 = off): every token tied with the k-th
    stays, as in transformers and vLLM, so the kept set is the row's own whatever the other rows ask for.
    ``k_max``: the largest k in force (0: none), when the caller knows it on the host (no device read-back)."""
    S, V = logits.shape
    on = (top_k > 0) & (top_k < V)
    if k_max is None:
        k_max = int(top_k[on].max()) if bool(on.any()) else 0
    if k_max == 0:
        return torch.zeros(S, V, dtype=torch.bool, device=logits.device)
    best = logits.topk(k_max, dim=-1).values  # sorted, largest first
    kth = best.gather(1, (torch.where(on, top_k, 1) - 1)[:, None])
    return on[:, None] & (logits < kth)


def _top_p_cut(sorted_p: torch.Tensor, top_p: torch.Tensor, on: torch.Tensor) -> torch.Tensor:
    """Per sorted position: dropped because the strictly better tokens already hold >= top_p (never the best)."""
    before = sorted_p.cumsum(dim=-1) - sorted_p  # prefix sums: the same numbers for any number of columns
    drop = (before >= top_p[:, None]) & on[:, None]
    drop[:, 0] = False
    return drop


def _top_p_mask(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """True where a token falls outside the smallest set of best tokens whose probability reaches top_p (1 = off),
    and every token tied with the last one in: the cut is a probability value, so the order in which a sort puts
    tied tokens does not matter, and the candidates and the whole-row sort give the same set."""
    S, V = probs.shape
    on = top_p < 1.0
    sorted_p = probs.topk(min(TOP_P_CANDIDATES, V), dim=-1).values
    drop = _top_p_cut(sorted_p, top_p, on)
    cut = sorted_p.gather(1, (~drop).sum(dim=-1, keepdim=True) - 1)  # drop is monotone: the last kept value
    far = on & ~drop[:, -1]
    if sorted_p.shape[1] < V and bool(far.any()):  # rows whose cut lies further out: sort them whole
        whole = probs[far].sort(dim=-1, descending=True).values
        kept = (~_top_p_cut(whole, top_p[far], on[far])).sum(dim=-1, keepdim=True)
        cut[far] = whole.gather(1, kept - 1)
    return on[:, None] & (probs < cut)


def filter_logits(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor,
                  host: tuple[int, bool, bool] | None = None) -> torch.Tensor:
    """Set to -inf what top_k (0 = off), top_p (1 = off) and min_p (0 = off) drop; rows [S, V] already / T.
    Each filter works on what the one before kept: top_k, then top_p, then min_p. ``host``: (largest k in force
    or 0, any top_p < 1, any min_p > 0) from the parameters on the host, which saves three device read-backs."""
    k_max, any_top_p, any_min_p = host if host is not None else (None, bool((top_p < 1.0).any()),
                                                                 bool((min_p > 0).any()))
    logits = logits.masked_fill(_top_k_mask(logits, top_k, k_max), float("-inf"))
    if any_top_p:
        logits = logits.masked_fill(_top_p_mask(torch.softmax(logits, dim=-1), top_p), float("-inf"))
    if any_min_p:
        probs = torch.softmax(logits, dim=-1)
        cut = probs.max(dim=-1, keepdim=True).values * min_p[:, None]
        logits = logits.masked_fill(probs < cut, float("-inf"))
    return logits


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """logits [S, V] (float) for the last position of each sequence -> next token ids [S] (on the device)."""
    logits = apply_repetition_penalty(logits.float(), seqs)
    chosen = logits.argmax(dim=-1)  # greedy: ties go to the first index, as torch/transformers argmax
    rows = [i for i, s in enumerate(seqs) if not s.params.greedy]
    if not rows:
        return chosen
    dev, sub = logits.device, [seqs[i] for i in rows]
    temps = torch.tensor([s.params.temperature for s in sub], device=dev)
    top_k = torch.tensor([max(s.params.top_k, 0) for s in sub], device=dev)
    top_p = torch.tensor([s.params.top_p for s in sub], device=dev)
    min_p = torch.tensor([s.params.min_p for s in sub], device=dev)
    V = logits.shape[1]
    host = (max([k for k in (s.params.top_k for s in sub) if 0 < k < V], default=0),
            any(s.params.top_p < 1.0 for s in sub), any(s.params.min_p > 0 for s in sub))
    scaled = filter_logits(logits[rows] / temps[:, None], top_k, top_p, min_p, host)
    keys = torch.tensor([s.seed for s in sub], dtype=torch.int64, device=dev)
    steps = torch.tensor([s.num_output_tokens for s in sub], dtype=torch.int64, device=dev)
    kept = torch.isfinite(scaled)
    if int(kept.sum()) * 4 < kept.numel():  # the filters left few tokens: noise only for those
        r, c = kept.nonzero(as_tuple=True)
        noisy = torch.full_like(scaled, float("-inf"))
        noisy[r, c] = scaled[r, c] + gumbel_noise_at(keys, steps, r, c)
    else:  # dropped tokens stay -inf either way
        noisy = scaled + gumbel_noise(keys, steps, logits.shape[1])
    chosen[torch.tensor(rows, device=dev)] = noisy.argmax(dim=-1)
    return chosen
