"""CPU decode: each running sequence's own context (the part after the prefixes it shares) kept contiguous.

The cascade plan (``plan_decode``) attends to a shared prefix once per batch or group; what is left is each
sequence's own tokens ("rest": for one of the n samples of a prompt, its generated text and the partial last
prompt block; for a sequence alone, everything after the common prefix). Gathering those blocks from the paged
cache every layer of every decode step reads and writes the whole private context each time, although a decode step
adds one token per sequence and never changes a token already stored. ``RowContexts`` keeps, per layer, one
buffer K, V [slots, Hkv, capacity, D] in which slot i holds one sequence's rest tokens in order; each step copies
in only the tokens that are new to it (one per sequence while decoding) and attention reads the buffer as it is,
each (slot, head) a contiguous [tokens, D] matrix.

Bookkeeping is done once per step (``step``), for all layers: which slot each sequence owns, which tokens are
new, which slots move. When a sequence leaves, the last slot moves into its place, so the live slots are always
0..n-1; their order differs from the step's row order, which the attention undoes by permuting the queries and
outputs ([S, Hq, D], tiny).

Rests differ in length (prompts of different questions), and one attention call over all slots pads each to the
longest: measured on the ReflectEvo loop, half of what such a call reads is padding. So sequences arriving
together get slots in order of decreasing rest length (they then grow together, a token per step, and a slot
moved into a hole is the shortest, so the order stays close), and each step splits the slots into a few
contiguous ranges (``buckets``), each attended up to its own longest rest: a split costs one more call
(``BUCKET_CALL_COST`` padded tokens per slot-range, measured order of magnitude) and saves the padding it cuts.
The buffers are sized for the tokens the sequences may still generate (``reserve``), so they rarely grow.

Everything is forgotten on a prefill step (a recomputed or newly admitted sequence may reuse block ids or hold
recomputed K/V), when a sequence's rest starts elsewhere (its sample group changed), and when the buffers would
pass ``budget_bytes`` (then the caller gathers as before).
The same class keeps the sample groups' shared prompts (one slot per group, keyed by the group's block ids),
which never change during a decode: ``keep_contexts`` plans both for a step.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from reflectevo.kernels.paged_attention import attention_with_lse

BUCKET_CALL_COST = 300  # one more attention call costs about as much as this many (slot x token) of padding


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
    buckets: list[tuple[int, int, int]] | None = None  # (first slot, end slot, tokens read): covers 0..slots
    flat_rows: tuple | None = None  # cache of _flat_rows

    def kv(self, layer_key, k_cache, v_cache):
        """This layer's buffers brought up to date -> K, V [slots, Hkv, length, D] views."""
        return self.owner._layer_kv(self, layer_key, k_cache, v_cache)

    def attend(self, layer_key, q, k_cache, v_cache, scale):
        """q [rows, Hkv, M, D] in the step's row order (M queries per KV head) against each row's kept tokens ->
        (out [rows, Hkv, M, D], lse [rows, Hkv, M] fp32) in row order; one attention call per bucket."""
        k, v = self.kv(layer_key, k_cache, v_cache)
        qs, mask = q[self.row_of_slot], self.mask.to(q.dtype)
        parts = [attention_with_lse(qs[a:b], k[a:b, :, :n], v[a:b, :, :n], mask[a:b, :, :, :n], scale)
                 for a, b, n in self.buckets or [(0, self.slots, self.length)]]
        out = torch.cat([o for o, _ in parts]) if len(parts) > 1 else parts[0][0]
        lse = torch.cat([x for _, x in parts]) if len(parts) > 1 else parts[0][1]
        return out[self.slot_of_row], lse[self.slot_of_row]


def length_buckets(lengths: list[int], call_cost: int = BUCKET_CALL_COST) -> list[tuple[int, int, int]]:
    """Split slots 0..n-1 with these lengths into contiguous ranges minimising sum(range size x longest in range)
    + call_cost per range (dynamic programming over range ends) -> [(start, end, longest)]."""
    n = len(lengths)
    best, cut = [0] + [None] * n, [0] * (n + 1)
    for end in range(1, n + 1):
        longest = 0
        for start in range(end - 1, -1, -1):
            longest = max(longest, lengths[start])
            cost = best[start] + (end - start) * longest + call_cost
            if best[end] is None or cost < best[end]:
                best[end], cut[end] = cost, start
    out, end = [], n
    while end > 0:
        start = cut[end]
        out.append((start, end, max(lengths[start:end])))
        end = start
    return out[::-1]


class RowContexts:
    def __init__(self, budget_bytes: int = 1 << 30, bucket_call_cost: int = BUCKET_CALL_COST):
        self.budget_bytes, self.bucket_call_cost = budget_bytes, bucket_call_cost
        self.layers: dict = {}  # layer key -> [k, v views, last step applied, k, v flat storage]
        self.forget()

    def forget(self):
        """Drop what the slots hold (the buffers stay allocated for reuse)."""
        self.slot_of: dict = {}  # sequence (or group) key -> slot
        self.kept: dict = {}  # key -> (rest start token, rest blocks, tokens held)
        self.step_id = 0
        self.valid_capacity = 0
        for entry in self.layers.values():
            entry[2] = -1

    def step(self, keys: list, tables: list[list[int]], starts: list[int], lens: list[int], block_size: int,
             num_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device, reserve: int = 0
             ) -> RowStep | None:
        """Plan one decode step: row r is sequence keys[r] (any hashable) with block table tables[r], context
        lens[r], whose rest starts at token starts[r] (a block boundary); ``reserve``: tokens a sequence may still
        add (room made for them when the buffers grow). None when the buffers would pass the budget."""
        bs, S = block_size, len(keys)
        if self.step_id and any(e[2] != self.step_id for e in self.layers.values()):
            self.forget()  # the last step did not reach every layer (an interrupted model call)
        longest = max(n - s for n, s in zip(lens, starts))
        slot_bytes = 2 * num_layers * max(S, len(self.slot_of)) * kv_heads * head_dim \
            * torch.empty((), dtype=dtype).element_size()  # per token of capacity
        capacity = self.valid_capacity
        if longest > self.valid_capacity:
            for extra in (reserve, 0):  # room for the rest of the generation when the budget allows
                capacity = max(longest + extra, int(self.valid_capacity * 1.25), 64)
                capacity = (capacity + bs - 1) // bs * bs
                if slot_bytes * capacity <= self.budget_bytes:
                    break
        if slot_bytes * capacity > self.budget_bytes:
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
        arriving = sorted((r for r, key in enumerate(keys) if key not in self.slot_of),
                          key=lambda r: starts[r] - lens[r])  # longest rest first
        for r in arriving:
            self.slot_of[keys[r]] = len(self.slot_of)
        src, dst_slot, dst_pos = [], [], []
        for key, table, start, n in zip(keys, tables, starts, lens):
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
        rest_of_slot = [0] * S
        for key, start, n in zip(keys, starts, lens):
            rest_of_slot[self.slot_of[key]] = n - start
        rest = torch.tensor(rest_of_slot, device=device)
        mask = torch.zeros(S, 1, 1, longest, dtype=dtype, device=device)
        mask.masked_fill_((torch.arange(longest, device=device)[None, :] >= rest[:, None])[:, None, None, :],
                          float("-inf"))

        def t(xs):
            return torch.tensor(xs, dtype=torch.long, device=device) if xs else None

        return RowStep(self.step_id, S, capacity, longest, t(moves_from), t(moves_to), t(src), t(dst_slot),
                       t(dst_pos), row_of_slot, slot_of_row, mask, self,
                       length_buckets(rest_of_slot, self.bucket_call_cost))

    def _layer_kv(self, step: RowStep, layer_key, k_cache, v_cache):
        entry = self.layers.get(layer_key)
        Hkv, D = k_cache.shape[2], k_cache.shape[3]
        pending = entry is None or entry[2] != step.step
        if entry is not None and pending and step.moves_from is not None:  # before a resize drops high slots
            for buf in entry[:2]:
                buf.index_copy_(0, step.moves_to, buf.index_select(0, step.moves_from))
        if entry is None or entry[0].shape[2] < step.capacity or entry[0].shape[0] < step.slots \
                or entry[0].dtype != k_cache.dtype:
            shape = (step.slots, Hkv, step.capacity, D)
            numel = step.slots * Hkv * step.capacity * D
            if entry is not None and entry[2] < 0 and entry[3].numel() >= numel and entry[0].dtype == k_cache.dtype:
                # nothing kept to move: re-view the old storage (it holds finite values, which is all that
                # masked positions need) instead of mapping and faulting in fresh zeroed pages
                k, v = entry[3][:numel].view(shape), entry[4][:numel].view(shape)
                entry[:2] = [k, v]
            else:
                # zeros: positions past a slot's rest are masked, but their V is still multiplied by a zero weight
                kf = torch.zeros(numel, dtype=k_cache.dtype, device=k_cache.device)
                vf = torch.zeros_like(kf)
                k, v = kf.view(shape), vf.view(shape)
                if entry is not None and entry[2] >= 0 and entry[0].dtype == k_cache.dtype:
                    old_s, old_c = min(entry[0].shape[0], step.slots), min(entry[0].shape[2], step.capacity)
                    k[:old_s, :, :old_c] = entry[0][:old_s, :, :old_c]
                    v[:old_s, :, :old_c] = entry[1][:old_s, :, :old_c]
                entry = self.layers[layer_key] = [k, v, entry[2] if entry is not None else -1, kf, vf]
        k, v = entry[0], entry[1]
        if pending:
            if step.src is not None:  # one contiguous [D] row per (token, head): a flat index_copy per buffer
                rows = _flat_rows(step, Hkv, k.shape[2])
                kf, vf = k_cache.view(-1, Hkv * D), v_cache.view(-1, Hkv * D)
                k.view(-1, D).index_copy_(0, rows, kf.index_select(0, step.src).view(-1, D))
                v.view(-1, D).index_copy_(0, rows, vf.index_select(0, step.src).view(-1, D))
            entry[2] = step.step
        return k[:step.slots, :, :step.length], v[:step.slots, :, :step.length]


def _flat_rows(step: RowStep, kv_heads: int, capacity: int) -> torch.Tensor:
    """Rows of a [slots * Hkv * capacity, D] view of the buffers where each new token's heads go, token-major
    (the order of the gathered [tokens, Hkv, D] values); computed once per step and buffer capacity."""
    cached = step.flat_rows
    if cached is None or cached[0] != (kv_heads, capacity):
        heads = torch.arange(kv_heads, device=step.dst_slot.device)
        rows = ((step.dst_slot[:, None] * kv_heads + heads) * capacity + step.dst_pos[:, None]).reshape(-1)
        cached = step.flat_rows = ((kv_heads, capacity), rows)
    return cached[1]


def keep_contexts(plan, rows: RowContexts, groups: RowContexts, keys: list, tables: list[list[int]],
                  lens: list[int], block_size: int, num_layers: int, kv_heads: int, head_dim: int, dtype, device,
                  reserve: int = 0):
    """Set ``plan.rows`` (each sequence's own part) and ``plan.group_ctx`` (each sample group's shared part, a
    group known by its block ids: the same blocks hold the same tokens) from the kept contexts; either stays None
    when its buffers would pass their budget, and the attention gathers that part instead. ``reserve``: tokens
    the sequences may still generate."""
    shape = (block_size, num_layers, kv_heads, head_dim, dtype, device)
    plan.rows = rows.step(keys, tables, (plan.rest_start * block_size).tolist(), lens, *shape, reserve=reserve)
    if plan.groups:
        c = plan.common
        firsts = [tables[members[0]][:c + n] for members, n in plan.groups]
        plan.group_ctx = groups.step([tuple(t) for t in firsts], firsts, [c * block_size] * len(firsts),
                                     [len(t) * block_size for t in firsts], *shape)
    return plan
