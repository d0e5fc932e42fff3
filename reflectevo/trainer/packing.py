"""Token ids -> packed micro-batches.

Packing: the sequences of a micro-batch go into one row, back to back (no padding token is computed); each keeps
its own ``seq_ids`` value and positions restarting at 0, so attention never crosses a sequence boundary
(flash-attn varlen, or one causal SDPA per sequence). ``pack`` can also fill rows of a fixed length
first-fit-decreasing. Input = ids[:-1], labels = ids[1:] masked to -100 on prompt targets.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from reflectevo.trainer.config import TrainError

IGNORE = -100


@dataclass
class Batch:
    input_ids: torch.Tensor     # [R, T]
    positions: torch.Tensor     # [R, T]
    seq_ids: torch.Tensor       # [R, T] sequence number inside its row, -1 on padding
    labels: torch.Tensor        # [R, T] next token, IGNORE on prompt and padding
    seq_index: torch.Tensor     # [R, T] index of the sequence in the batch (for per-sequence sums), -1 on padding
    num_seqs: int
    keys: list[str]
    num_tokens: int             # real (non-padding) tokens
    num_labels: int             # tokens that carry a label
    meta: dict = field(default_factory=dict)

    def to(self, device) -> "Batch":
        move = {k: getattr(self, k).to(device, non_blocking=True)
                for k in ("input_ids", "positions", "seq_ids", "labels", "seq_index")}
        return Batch(**move, num_seqs=self.num_seqs, keys=self.keys, num_tokens=self.num_tokens,
                     num_labels=self.num_labels, meta=self.meta)


def sequences_of(examples: list, dpo: bool) -> list[tuple[list[int], list[int]]]:
    """(inputs, labels) per sequence; DPO order: all chosen, then all rejected."""
    def one(prompt, resp):
        ids = prompt + resp
        labels = [IGNORE] * (len(prompt) - 1) + resp
        return ids[:-1], labels

    if not dpo:
        return [one(ex.prompt, ex.responses[0]) for ex in examples]
    return [one(ex.prompt, ex.responses[0]) for ex in examples] + [one(ex.prompt, ex.responses[1]) for ex in examples]


def pack(seqs: list[tuple[list[int], list[int]]], row_len: int, keys: list[str], pad_id: int = 0) -> Batch:
    """First-fit-decreasing packing of sequences into rows of at most row_len tokens."""
    order = sorted(range(len(seqs)), key=lambda i: (-len(seqs[i][0]), i))
    rows: list[list[int]] = []
    fill: list[int] = []
    for i in order:
        n = len(seqs[i][0])
        if n > row_len:
            raise TrainError(f"internal: sequence of {n} tokens exceeds the row length {row_len}")
        for r, f in enumerate(fill):
            if f + n <= row_len:
                rows[r].append(i)
                fill[r] += n
                break
        else:
            rows.append([i])
            fill.append(n)
    R, T = len(rows), max(fill)
    ids = torch.full((R, T), pad_id, dtype=torch.long)
    pos = torch.zeros((R, T), dtype=torch.long)
    sid = torch.full((R, T), -1, dtype=torch.long)
    lab = torch.full((R, T), IGNORE, dtype=torch.long)
    sidx = torch.full((R, T), -1, dtype=torch.long)
    for r, members in enumerate(rows):
        at = 0
        for local, i in enumerate(sorted(members)):
            inp, labels = seqs[i]
            n = len(inp)
            ids[r, at:at + n] = torch.tensor(inp)
            lab[r, at:at + n] = torch.tensor(labels)
            pos[r, at:at + n] = torch.arange(n)
            sid[r, at:at + n] = local
            sidx[r, at:at + n] = i
            at += n
    # rows holding one sequence each need no per-sequence attention (trailing padding is never attended)
    meta = {"packed": any(len(m) > 1 for m in rows)}
    return Batch(ids, pos, sid, lab, sidx, len(seqs), keys, sum(fill), int((lab != IGNORE).sum()), meta)


def make_batch(examples: list, cfg, dpo: bool, pad_id: int | None) -> Batch:
    """The micro-batch as one packed row (each sequence already fits ``cfg.max_length``)."""
    seqs = sequences_of(examples, dpo)
    return pack(seqs, sum(len(inp) for inp, _ in seqs), [ex.key for ex in examples], pad_id or 0)
