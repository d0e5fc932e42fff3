"""CPU decode: each running sequence's own context (the part after the prefixes it shares) kept contiguous.

The cascade plan (``plan_decode``) attends to a shared prefix once per batch or group; what is left is each
sequence's own tokens ("rest": with prompt groups, its generated text and the partial last prompt block; without,
its whole private prompt too). Gathering those blocks from the paged cache
every layer of every decode step reads and writes the whole private context each time, although a decode step
adds one token per sequence and never changes a token already stored. ``RowContexts`` keeps, per layer, one
buffer K, V [slots, Hkv, capacity, D] in which slot i holds one sequence's rest tokens in order; each step copies
in only the tokens that are new to it (one per sequence while decoding) and attention reads the buffer as it is,
each (slot, head) a contiguous [tokens, D] matrix.

Bookkeeping is done once per step (``step``), for all layers: which slot each sequence owns, which tokens are
new, which slots move. When a sequence leaves, the last slot moves into its place, so the live slots are always
0..n-1; their order differs from the step's row order, which the attention undoes by permuting the queries and
outputs ([S, Hq, D], tiny). Everything is forgotten on a prefill step (a recomputed or newly admitted sequence
may reuse block ids or hold recomputed K/V), when a sequence's rest starts elsewhere (its sample group changed),
and when the buffers would pass ``budget_bytes`` (then the caller gathers as before).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class RowStep:
    """One decode step's instructions for every layer's buffers."""

    step: int
    slots: int  # live slots, = rows of the step
    capacity: int  # tokens per slot the buffers must hold
    length: int  # longest rest this step: attention reads slots [:slots, :, :length]
    moves_from: torch.Tensor | None  # [m] slots copied into ...
    moves_to: torch.Tensor | None  # [m] ... these slots, before the new tokens
    src: torch.Tensor | None  # [n] flat cache slots (block * block_size + offset) of the new tokens ...
    dst_slot: torch.Tensor | None  # [n] ... and where they go
    dst_pos: torch.Tensor | None
    row_of_slot: torch.Tensor  # [S] step row held by each slot
    slot_of_row: torch.Tensor  # [S]
    mask: torch.Tensor  # [S, 1, 1, length] additive, slot order: -inf past each slot's rest
    owner: "RowContexts"

    def kv(self, layer_key, k_cache, v_cache):
        """This layer's buffers brought up to date -> K, V [slots, Hkv, length, D] views."""
        return self.owner._layer_kv(self, layer_key, k_cache, v_cache)


class RowContexts:
    def __init__(self, budget_bytes: int = 1 << 30):
        self.budget_bytes = budget_bytes
        self.layers: dict = {}  # layer key -> [k buffer, v buffer, last step applied]
        self.forget()

    def forget(self):
        """Drop what the slots hold (the buffers stay allocated for reuse)."""
        self.slot_of: dict[int, int] = {}  # sequence key -> slot
        self.kept: dict[int, tuple[int, list[int], int]] = {}  # key -> (rest start token, rest blocks, tokens held)
        self.step_id = 0
        self.valid_capacity = 0
        for entry in self.layers.values():
            entry[2] = -1

    def step(self, keys: list[int], tables: list[list[int]], starts: list[int], lens: list[int], block_size: int,
             num_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device) -> RowStep | None:
        """Plan one decode step: row r is sequence keys[r] with block table tables[r], context lens[r], whose rest
        starts at token starts[r] (a block boundary). None when the buffers would pass the budget."""
        bs, S = block_size, len(keys)
        if self.step_id and any(e[2] != self.step_id for e in self.layers.values()):
            self.forget()  # the last step did not reach every layer (an interrupted model call)
        longest = max(n - s for n, s in zip(lens, starts))
        capacity = max(self.valid_capacity, longest)
        if capacity > self.valid_capacity:
            capacity = max(capacity, int(self.valid_capacity * 1.25), 64)
            capacity = (capacity + bs - 1) // bs * bs
        elem = torch.empty((), dtype=dtype).element_size()
        if 2 * num_layers * max(S, len(self.slot_of)) * kv_heads * capacity * head_dim * elem > self.budget_bytes:
            self.forget()
            return None
        live = set(keys)
        freed = sorted(self.slot_of[k] for k in self.slot_of if k not in live)
        for k in [k for k in self.slot_of if k not in live]:
            del self.slot_of[k]
            self.kept.pop(k, None)
        moves_from, moves_to = [], []
        if freed:  # fill each freed slot below the live count with the highest live slot
            n_live = len(self.slot_of)
            by_slot = {s: k for k, s in self.slot_of.items()}
            high = sorted((s for s in by_slot if s >= n_live), reverse=True)
            for hole in (f for f in freed if f < n_live):
                s = high.pop()  # any slot above the live range; each is moved once
                moves_from.append(s)
                moves_to.append(hole)
                self.slot_of[by_slot[s]] = hole
        src, dst_slot, dst_pos = [], [], []
        for key, table, start, n in zip(keys, tables, starts, lens):
            if key not in self.slot_of:
                self.slot_of[key] = len(self.slot_of)
            first_block = start // bs
            blocks = table[first_block:(n + bs - 1) // bs]
            held = 0
            kept = self.kept.get(key)
            if kept is not None and kept[0] == start:
                full = kept[2] // bs  # stored tokens never change: only other block ids (recycled) mean resend
                if kept[1][:full] == blocks[:full]:
                    held = kept[2]
            slot = self.slot_of[key]
            for t in range(held, n - start):
                pos = start + t
                src.append(table[pos // bs] * bs + pos % bs)
                dst_slot.append(slot)
                dst_pos.append(t)
            self.kept[key] = (start, blocks, n - start)
        self.step_id += 1
        self.valid_capacity = capacity
        slot_of_row = torch.tensor([self.slot_of[k] for k in keys], device=device)
        row_of_slot = torch.empty_like(slot_of_row)
        row_of_slot[slot_of_row] = torch.arange(S, device=device)
        rest = torch.tensor([n - s for n, s in zip(lens, starts)], device=device)[row_of_slot]
        mask = torch.zeros(S, 1, 1, longest, dtype=dtype, device=device)
        mask.masked_fill_((torch.arange(longest, device=device)[None, :] >= rest[:, None])[:, None, None, :],
                          float("-inf"))

        def t(xs):
            return torch.tensor(xs, dtype=torch.long, device=device) if xs else None

        return RowStep(self.step_id, S, capacity, longest, t(moves_from), t(moves_to), t(src), t(dst_slot),
                       t(dst_pos), row_of_slot, slot_of_row, mask, self)

    def _layer_kv(self, step: RowStep, layer_key, k_cache, v_cache):
        entry = self.layers.get(layer_key)
        Hkv, D = k_cache.shape[2], k_cache.shape[3]
        if entry is None or entry[0].shape[2] < step.capacity or entry[0].shape[0] < step.slots \
                or entry[0].dtype != k_cache.dtype:
            slots = max(step.slots, entry[0].shape[0] if entry is not None else 0)
            # zeros: positions past a slot's rest are masked, but their V is still multiplied by a zero weight
            k = torch.zeros(slots, Hkv, step.capacity, D, dtype=k_cache.dtype, device=k_cache.device)
            v = torch.zeros_like(k)
            if entry is not None and entry[2] >= 0 and entry[0].dtype == k_cache.dtype:
                old_s, old_c = min(entry[0].shape[0], slots), entry[0].shape[2]
                k[:old_s, :, :old_c] = entry[0][:old_s]
                v[:old_s, :, :old_c] = entry[1][:old_s]
            entry = self.layers[layer_key] = [k, v, entry[2] if entry is not None else -1]
        k, v = entry[0], entry[1]
        if entry[2] != step.step:
            if step.moves_from is not None:
                k.index_copy_(0, step.moves_to, k.index_select(0, step.moves_from))
                v.index_copy_(0, step.moves_to, v.index_select(0, step.moves_from))
            if step.src is not None:
                kf, vf = k_cache.view(-1, Hkv, D), v_cache.view(-1, Hkv, D)
                k.transpose(1, 2).index_put_((step.dst_slot, step.dst_pos), kf.index_select(0, step.src))
                v.transpose(1, 2).index_put_((step.dst_slot, step.dst_pos), vf.index_select(0, step.src))
            entry[2] = step.step
        return k[:step.slots, :, :step.length], v[:step.slots, :, :step.length]


def keep_contexts(plan, rows: RowContexts, groups: RowContexts, keys: list, tables: list[list[int]],
                  lens: list[int], block_size: int, num_layers: int, kv_heads: int, head_dim: int, dtype, device):
    """Set ``plan.rows`` (each sequence's own part) and ``plan.group_ctx`` (each sample group's shared part, a
    group known by its block ids: the same blocks hold the same tokens) from the kept contexts; either stays None
    when its buffers would pass their budget, and the attention gathers that part instead."""
    shape = (block_size, num_layers, kv_heads, head_dim, dtype, device)
    plan.rows = rows.step(keys, tables, (plan.rest_start * block_size).tolist(), lens, *shape)
    if plan.groups:
        c = plan.common
        firsts = [tables[members[0]][:c + n] for members, n in plan.groups]
        plan.group_ctx = groups.step([tuple(t) for t in firsts], firsts, [c * block_size] * len(firsts),
                                     [len(t) * block_size for t in firsts], *shape)
    return plan
