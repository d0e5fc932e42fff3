"""Paged attention for decoding, and the store of new K/V into the paged cache.

The cache of one layer is k_cache, v_cache [num_blocks, block_size, Hkv, D]; sequence s owns the blocks
block_tables[s, :ceil(L_s / block_size)] and its token t lives at slot block_tables[s, t // bs] * bs + t % bs.
Decode (one query token per sequence, GQA group g = Hq / Hkv):

    out[s, h] = sum_t softmax_t(scale * q[s, h] . K_s[t, h // g]) V_s[t, h // g],   t < context_lens[s]

The kernel walks the block table with an online softmax (running max m, running sum l, fp32 accumulator), so
it reads each cached K/V once and never materialises the gathered [S, L, Hkv, D] context that the PyTorch
reference builds; the g query heads of a KV head share each K/V load. Contexts longer than ``SPLIT_TOKENS`` are
split (flash-decoding): each split of ``SPLIT_TOKENS`` writes a partial (out, log-sum-exp) and a second kernel
merges a row's partials in split order. The split size is fixed, so a row's result is bitwise the same whatever
else is in the batch and however wide the block table is (what makes a seeded request batch-independent); only
how many programs share a row's splits follows the batch (``_grid_splits``).

The PyTorch reference (``paged_attention_decode_reference``) gathers each sequence's context by its block
table in one indexing op and runs a masked softmax for all sequences at once: the readable definition the
Triton kernel and the CPU path are tested against.

The CPU path (``paged_attention_decode_cpu``) computes the same thing faster, in three ways:
- what every layer of a step shares (block ids as one flat index, the additive length mask) is planned once
  per step (``plan_decode``), not once per layer;
- the context is gathered into scratch buffers reused by every layer and step (``GatherBuffers``): a fresh
  tensor of that size per layer costs page faults, since large allocations are mapped afresh each time; the
  shared prefixes below are gathered once and kept across decode steps, since no decode step writes them;
- the attention itself is one call of PyTorch's fused CPU attention kernel (the one SDPA uses) over the padded
  batch with the length mask, the grouped query heads folded into the query length so K/V are never
  repeated, instead of matmuls on permuted copies.
When the sequences share leading blocks (a common few-shot prefix) it attends to that prefix once for the
whole batch (cascade attention), and blocks shared by a group of sequences only (the n samples of one prompt)
once per group, then merges the parts by log-sum-exp: S copies of a shared prefix become one. Given the prompt
lengths, a group is the samples of one prompt and its part is their prompt blocks; a sequence alone keeps its
whole context after the common prefix as its own part. The caller may keep the groups' parts and the sequences'
own parts contiguous across steps (``paged_attention_rows.RowContexts``: each step copies in one token per
sequence, and attends to the parts in a few length buckets instead of padding every part to the longest).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from reflectevo.kernels._dispatch import HAS_TRITON, cdiv, interpreting, next_power_of_2, sm_count, use_triton

if HAS_TRITON:
    import triton
    import triton.language as tl


# ----------------------------------------------------------------------------- PyTorch
def store_kv_torch(k, v, k_cache, v_cache, slot_mapping):
    """k, v [T, Hkv, D] -> cache slots slot_mapping [T] (slots < 0 are skipped)."""
    kf, vf = k_cache.view(-1, *k_cache.shape[2:]), v_cache.view(-1, *v_cache.shape[2:])
    slots = slot_mapping.long()
    if bool((slots < 0).any()):
        keep = slots >= 0
        k, v, slots = k[keep], v[keep], slots[keep]
    kf.index_copy_(0, slots, k.to(kf.dtype))
    vf.index_copy_(0, slots, v.to(vf.dtype))


def _gather(cache, block_tables):
    """[num_blocks, bs, Hkv, D] by [S, nb] -> [S, nb * bs, Hkv, D]."""
    S, nb = block_tables.shape
    rows = cache.index_select(0, block_tables.reshape(-1).long())
    return rows.reshape(S, nb * cache.shape[1], *cache.shape[2:])


def merge_partials(outs, lses):
    """Combine attention over disjoint key sets: out = sum_i w_i out_i / sum_i w_i, w_i = exp(lse_i - max_j lse_j)
    (a part a row does not see has lse -inf and weight 0; every row sees at least one part)."""
    top = lses[0]
    for lse in lses[1:]:
        top = torch.maximum(top, lse)
    acc = den = None
    for out, lse in zip(outs, lses):
        w = torch.exp(lse - top)
        acc = out * w[..., None] if acc is None else acc.addcmul_(out, w[..., None])
        den = w if den is None else den.add_(w)
    return acc.div_(den[..., None])


def paged_attention_decode_reference(q, k_cache, v_cache, block_tables, context_lens, scale):
    """Readable reference (every context_lens >= 1): gather each sequence's context by its block table, masked
    softmax, weighted sum, in fp32."""
    S, Hq, D = q.shape
    Hkv = k_cache.shape[2]
    k = _gather(k_cache, block_tables).float().permute(0, 2, 1, 3)  # [S, Hkv, L, D]
    v = _gather(v_cache, block_tables).float().permute(0, 2, 1, 3)
    qg = q.float().view(S, Hkv, Hq // Hkv, D)  # the G = Hq / Hkv query heads that share one KV head
    scores = torch.matmul(qg, k.transpose(2, 3)) * scale  # [S, Hkv, G, L]
    valid = torch.arange(k.shape[2], device=q.device)[None, :] < context_lens.long()[:, None]
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    out = torch.matmul(torch.softmax(scores, dim=-1), v)
    return out.reshape(S, Hq, D).to(q.dtype)


# ----------------------------------------------------------------------------- PyTorch, fast CPU path
try:  # the fused CPU attention that SDPA dispatches to; this entry point also returns the log-sum-exp
    _flash_cpu = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
except (AttributeError, RuntimeError):  # pragma: no cover - older / other torch builds
    _flash_cpu = None


def attention_with_lse(q, k, v, mask, scale):
    """q [B, H, M, D], k/v [B, H, N, D] (any strides), additive mask broadcastable to [B, H, M, N] or None
    -> (out [B, H, M, D] in q.dtype, lse [B, H, M] fp32). Every query must see at least one key."""
    if _flash_cpu is not None and not q.is_cuda:
        out, lse = _flash_cpu(q, k, v, attn_mask=mask, scale=scale)
        return out, lse.float()
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)).mul_(scale)
    if mask is not None:
        scores = scores + mask
    return torch.matmul(torch.softmax(scores, dim=-1), v.float()).to(q.dtype), torch.logsumexp(scores, dim=-1)


@dataclass
class DecodePlan:
    """What every layer of one decode step needs, built once per step by ``plan_decode``. A sequence's context is
    split into up to three disjoint parts, attended separately and merged by log-sum-exp: the prefix all
    sequences share (few-shot examples), the prefix it shares with its group (the n samples of one prompt) and
    the rest. Shared prefixes are read once per batch or group instead of once per sequence."""

    shared_blocks: torch.Tensor | None  # [C] block ids every sequence starts with
    group_blocks: torch.Tensor | None  # [Ng * P] each group's shared blocks after those, padded to the longest
    group_mask: torch.Tensor | None  # [Ng, 1, 1, P * block_size] additive: -inf past the group's shared blocks
    group_rows: torch.Tensor | None  # [Ng, M] member rows of each group, padded by repeating the first member
    group_slots: torch.Tensor | None  # [n] flat positions in [Ng * M] of the real members ...
    group_members: torch.Tensor | None  # [n] ... and their rows
    rest_blocks: torch.Tensor  # [S * R] int64: the R table columns after each row's shared parts, row after row
    rest_mask: torch.Tensor  # [S, 1, 1, R * block_size] additive: 0 for context tokens, -inf past the context
    rest_start: torch.Tensor | None = None  # [S] each row's first rest column
    groups: list | None = None  # [(member rows, shared blocks after the common prefix)], in group order
    common: int = 0  # blocks every row shares (the shared_blocks)
    rows: object = None  # a RowStep (paged_attention_rows): the rest kept contiguous across steps, set by the caller
    group_ctx: object = None  # a RowStep over the groups' shared parts (slot per group), set by the caller


def _sample_groups(block_tables, lens, block_size, common, prompt_lens=None) -> list[tuple[list[int], int]]:
    """Groups of two or more rows and the full blocks after the common prefix that each group shares (equal block
    ids mean equal prefixes: blocks are only shared through prefix-cache hits), as [(rows, shared blocks)]. Each row
    keeps at least its last token outside the shared blocks.

    With ``prompt_lens`` a group is the rows whose prompts' full blocks are the same blocks (the n samples of one
    prompt), and the shared part is those prompt blocks: it stays the same for the whole decode, so its copy is
    kept across steps (``paged_attention_rows.RowContexts`` or GatherBuffers) and each step reads only the generated
    tokens apart. Without it, rows agreeing on the first block after the common prefix form a group over the blocks
    they all agree on. A row alone forms no group: its whole context after the common prefix is its own part."""
    limit = ((lens - 1) // block_size - common).tolist()
    if common >= block_tables.shape[1]:
        return []
    if prompt_lens is not None:
        by_prompt: dict[tuple, list[int]] = {}
        rows_blocks = block_tables[:, common:].tolist()
        for row, (lim, n) in enumerate(zip(limit, prompt_lens)):
            own = min(lim, int(n) // block_size - common)
            if own > 0:
                by_prompt.setdefault(tuple(rows_blocks[row][:own]), []).append(row)
        return [(rows, len(key)) for key, rows in by_prompt.items() if len(rows) > 1]
    by_first: dict[int, list[int]] = {}
    for row, (block, lim) in enumerate(zip(block_tables[:, common].tolist(), limit)):
        if lim > 0:
            by_first.setdefault(block, []).append(row)
    groups = []
    for rows in by_first.values():
        if len(rows) > 1:
            tail = block_tables[rows, common:]
            agree = int((tail == tail[:1]).all(dim=0).to(torch.int32).cumprod(0).sum())
            groups.append((rows, min(agree, min(limit[r] for r in rows))))
    return groups


def plan_decode(block_tables, context_lens, block_size, common_blocks=0, dtype=torch.float32,
                prompt_lens=None) -> DecodePlan:
    """block_tables [S, >= max blocks], context_lens [S] (>= 1); ``common_blocks``: leading columns with the same
    ids in every row; ``prompt_lens`` [S] (optional): each row's prompt length, so that groups are the samples of
    one prompt (see ``_sample_groups``). Shared parts stop early enough that every sequence has a token after them."""
    lens, bs, dev = context_lens.long(), block_size, context_lens.device
    S, width = lens.shape[0], block_tables.shape[1]
    tables = block_tables.long()
    common = min(common_blocks, (int(lens.min()) - 1) // bs)
    shared = tables[0, :common] if common > 0 else None
    start = torch.full((S,), common, dtype=torch.long, device=dev)  # each row's first rest column
    groups = _sample_groups(tables, lens, bs, common, prompt_lens) if S > 1 or prompt_lens is not None else []
    group = [None] * 5
    if groups:
        longest, most = max(p for _, p in groups), max(len(rows) for rows, _ in groups)
        blocks = torch.stack([tables[rows[0], common:common + longest] for rows, _ in groups])
        pos = torch.arange(longest * bs, device=dev)
        shared_len = torch.tensor([p * bs for _, p in groups], device=dev)
        mask = torch.zeros(len(groups), 1, 1, longest * bs, dtype=dtype, device=dev)
        mask.masked_fill_((pos[None, :] >= shared_len[:, None])[:, None, None, :], float("-inf"))
        rows = torch.tensor([r + [r[0]] * (most - len(r)) for r, _ in groups], device=dev)
        slots = torch.tensor([g * most + m for g, (r, _) in enumerate(groups) for m in range(len(r))], device=dev)
        members = torch.tensor([row for r, _ in groups for row in r], device=dev)
        group = [blocks.reshape(-1), mask, rows, slots, members]
        for r, p in groups:
            start[r] = common + p
    num_blocks = (lens + bs - 1) // bs
    cols = start[:, None] + torch.arange(int((num_blocks - start).max()), device=dev)
    rest = tables.gather(1, cols.clamp(max=width - 1)).reshape(-1)
    pos = (cols[:, :, None] * bs + torch.arange(bs, device=dev)).reshape(S, -1)
    mask = torch.zeros(S, 1, 1, pos.shape[1], dtype=dtype, device=dev)
    mask.masked_fill_((pos >= lens[:, None])[:, None, None, :], float("-inf"))
    return DecodePlan(shared, *group, rest, mask, start, groups, common)


class GatherBuffers:
    """Grow-only scratch for one layer's gathered K and V, reused by every layer and step (it keeps the size of
    the largest gather seen: batch x context x one layer's K/V), and the gathered shared prefixes kept across
    decode steps.

    The shared parts of a decode plan (the prefix every sequence starts with, the prompt each sample group shares)
    are full blocks that no decode step writes, so each layer's gathered copy stays valid while the plan names
    the same blocks: ``stable_gather`` reuses it instead of gathering again every step. The runner calls
    ``forget_stable`` on every prefill step (the only steps that place new or recycled blocks into shared
    positions), and the kept copies are bounded by ``stable_budget`` bytes (past it, parts are gathered afresh)."""

    def __init__(self, stable_budget: int = 2 << 30):
        self.k = self.v = None
        self.stable_budget = stable_budget
        self.stable: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.stable_bytes = 0

    def take(self, num_blocks: int, cache: torch.Tensor):
        """Two [num_blocks, *cache.shape[1:]] views for gathering cache blocks into."""
        k = self.k
        if k is None or k.shape[0] < num_blocks or k.shape[1:] != cache.shape[1:] or k.dtype != cache.dtype \
                or k.device != cache.device:
            rows = max(num_blocks, int(1.25 * k.shape[0]) if k is not None else 0)  # contexts grow every step
            self.k = torch.empty(rows, *cache.shape[1:], dtype=cache.dtype, device=cache.device)
            self.v = torch.empty_like(self.k)
        return self.k[:num_blocks], self.v[:num_blocks]

    def stable_gather(self, part: str, k_cache, v_cache, blocks, rows: int):
        """K and V [rows, Hkv, len(blocks) / rows * bs, D] of the shared blocks ``blocks`` of this layer's cache:
        the copy kept from an earlier step when it names the same blocks, else gathered now (and kept when it
        fits)."""
        key = (part, k_cache.data_ptr())
        kept = self.stable.get(key)
        if kept is not None and kept[0].shape == blocks.shape and torch.equal(kept[0], blocks):
            return kept[1], kept[2]
        if kept is not None:
            del self.stable[key]
            self.stable_bytes -= 2 * kept[1].numel() * kept[1].element_size()
        size = 2 * blocks.numel() * k_cache[0].numel() * k_cache.element_size()
        if self.stable_bytes + size > self.stable_budget:
            kbuf, vbuf = self.take(blocks.shape[0], k_cache)
            torch.index_select(k_cache, 0, blocks, out=kbuf)
            torch.index_select(v_cache, 0, blocks, out=vbuf)
        else:
            kbuf, vbuf = k_cache.index_select(0, blocks), v_cache.index_select(0, blocks)
        Hkv, D = k_cache.shape[2], k_cache.shape[3]
        k, v = kbuf.view(rows, -1, Hkv, D).transpose(1, 2), vbuf.view(rows, -1, Hkv, D).transpose(1, 2)
        if self.stable_bytes + size <= self.stable_budget:
            self.stable[key] = (blocks.clone(), k, v)
            self.stable_bytes += size
        return k, v

    def forget_stable(self):
        self.stable.clear()
        self.stable_bytes = 0


def _gather_heads(k_cache, v_cache, blocks, rows, buffers, stable: str | None = None):
    """Gather blocks (into the scratch buffers, or the kept copy of a shared part) -> K, V [rows, Hkv, L, D]."""
    if stable is not None:
        return buffers.stable_gather(stable, k_cache, v_cache, blocks, rows)
    kbuf, vbuf = buffers.take(blocks.shape[0], k_cache)
    torch.index_select(k_cache, 0, blocks, out=kbuf)
    torch.index_select(v_cache, 0, blocks, out=vbuf)
    Hkv, D = k_cache.shape[2], k_cache.shape[3]
    return kbuf.view(rows, -1, Hkv, D).transpose(1, 2), vbuf.view(rows, -1, Hkv, D).transpose(1, 2)


def paged_attention_decode_cpu(q, k_cache, v_cache, plan: DecodePlan, scale, buffers: GatherBuffers | None = None):
    """The reference's result from a step plan: q [S, Hq, D], caches [num_blocks, bs, Hkv, D] -> [S, Hq, D]."""
    S, Hq, D = q.shape
    Hkv = k_cache.shape[2]
    G = Hq // Hkv
    buffers = buffers or GatherBuffers()
    qg = q.reshape(S, Hkv, G, D)  # the G query heads of a KV head become G queries of one attention row
    if plan.rows is not None:  # the rows' own tokens, kept contiguous in slot order across steps
        out, lse = plan.rows.attend(k_cache.data_ptr(), qg, k_cache, v_cache, scale)
    else:
        k, v = _gather_heads(k_cache, v_cache, plan.rest_blocks, S, buffers)
        out, lse = attention_with_lse(qg, k, v, plan.rest_mask.to(q.dtype), scale)
    outs, lses = [out.float()], [lse]
    if plan.shared_blocks is not None:  # the whole batch's queries against the common prefix at once
        k, v = _gather_heads(k_cache, v_cache, plan.shared_blocks, 1, buffers, stable="shared")
        out, lse = attention_with_lse(qg.transpose(0, 1).reshape(1, Hkv, S * G, D), k, v, None, scale)
        outs.append(out.view(Hkv, S, G, D).transpose(0, 1).float())
        lses.append(lse.view(Hkv, S, G).transpose(0, 1))
    if plan.group_blocks is not None:  # each group's queries against its shared prefix at once
        Ng, M = plan.group_rows.shape
        qs = qg[plan.group_rows.reshape(-1)].view(Ng, M, Hkv, G, D).transpose(1, 2).reshape(Ng, Hkv, M * G, D)
        if plan.group_ctx is not None:  # the groups' parts kept contiguous across steps, one slot per group
            out, lse = plan.group_ctx.attend(k_cache.data_ptr(), qs, k_cache, v_cache, scale)
        else:
            k, v = _gather_heads(k_cache, v_cache, plan.group_blocks, Ng, buffers, stable="group")
            out, lse = attention_with_lse(qs, k, v, plan.group_mask.to(q.dtype), scale)
        out = out.view(Ng, Hkv, M, G, D).transpose(1, 2).reshape(Ng * M, Hkv, G, D)
        lse = lse.view(Ng, Hkv, M, G).transpose(1, 2).reshape(Ng * M, Hkv, G)
        outs.append(torch.zeros(S, Hkv, G, D, device=q.device).index_copy_(
            0, plan.group_members, out[plan.group_slots].float()))
        lses.append(torch.full((S, Hkv, G), float("-inf"), device=q.device).index_copy_(
            0, plan.group_members, lse[plan.group_slots]))
    out = merge_partials(outs, lses) if len(outs) > 1 else outs[0]
    return out.reshape(S, Hq, D).to(q.dtype)


def paged_attention_decode_torch(q, k_cache, v_cache, block_tables, context_lens, scale, common_blocks=0):
    """The CPU path for one call (plans the step on the spot); ``common_blocks`` as in ``plan_decode``."""
    plan = plan_decode(block_tables, context_lens, k_cache.shape[1], common_blocks, q.dtype)
    return paged_attention_decode_cpu(q, k_cache, v_cache, plan, scale)


# ----------------------------------------------------------------------------- Triton
# Split size. On a 132-SM H100/H200 with 8 KV heads (Llama-3-8B), a 1-2k-token context at batch 1 gets 8-16
# splits: 64-128 programs, about one per SM (256-token splits would leave half to three quarters of the SMs idle).
# At batch 64 the grid has 512 (row, head) programs already, each looping over its row's 8-16 splits; the price
# of splitting is then the partials, G x D fp32 per split against 128 tokens x 2 x D of K/V: ~3% more traffic
# written and ~3% read back by the merge (512-token splits: ~1.5% but 16-32 programs at batch 1).
SPLIT_TOKENS = 128

if HAS_TRITON:

    @triton.jit
    def _store_kv_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr, row: tl.constexpr, BLOCK: tl.constexpr):
        t = tl.program_id(0)
        slot = tl.load(slot_ptr + t).to(tl.int64)
        if slot >= 0:
            for start in range(0, row, BLOCK):
                offs = start + tl.arange(0, BLOCK)
                m = offs < row
                tl.store(kc_ptr + slot * row + offs, tl.load(k_ptr + t * row + offs, mask=m), mask=m)
                tl.store(vc_ptr + slot * row + offs, tl.load(v_ptr + t * row + offs, mask=m), mask=m)

    # max_splits follows the table width; unspecialised, every width runs the same compiled code
    @triton.jit(do_not_specialize=["max_splits"])
    def _paged_decode_kernel(
        q_ptr, kc_ptr, vc_ptr, bt_ptr, lens_ptr, out_ptr, lse_ptr, scale,
        stride_bt, blocks_per_split, max_splits,
        HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BS: tl.constexpr,
        BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
    ):
        """Program (s, h, z) computes splits z, z + grid_z, ... of row s, KV head h: each split is a fresh online
        softmax over its own blocks, so its partial does not depend on grid_z."""
        s = tl.program_id(0)
        h = tl.program_id(1)
        first = tl.program_id(2)
        grid_z = tl.num_programs(2)
        ctx = tl.load(lens_ptr + s)
        offs_g = tl.arange(0, BLOCK_G)
        offs_d = tl.arange(0, BLOCK_D)
        offs_t = tl.arange(0, BS)
        g_ok = offs_g < G
        d_ok = offs_d < D
        q_rows = s * HKV * G + h * G + offs_g  # row index into q viewed as [S*Hq, D]
        q = tl.load(q_ptr + q_rows[:, None] * D + offs_d[None, :], mask=g_ok[:, None] & d_ok[None, :], other=0.0)
        dot_ty = tl.float32 if UPCAST else kc_ptr.dtype.element_ty  # the interpreter's tl.dot lacks bf16
        q = (q.to(tl.float32) * scale).to(dot_ty)
        n_blocks = (ctx + BS - 1) // BS
        n_splits = (n_blocks + blocks_per_split - 1) // blocks_per_split
        for split in range(first, n_splits, grid_z):
            m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
            l_i = tl.zeros([BLOCK_G], tl.float32)
            acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
            b_start = split * blocks_per_split
            b_end = tl.minimum(b_start + blocks_per_split, n_blocks)
            for b in range(b_start, b_end):
                block = tl.load(bt_ptr + s * stride_bt + b).to(tl.int64)
                tok = b * BS + offs_t
                t_ok = tok < ctx
                kv_off = (block * BS + offs_t)[:, None] * (HKV * D) + h * D + offs_d[None, :]
                kv_mask = t_ok[:, None] & d_ok[None, :]
                k = tl.load(kc_ptr + kv_off, mask=kv_mask, other=0.0).to(dot_ty)
                v = tl.load(vc_ptr + kv_off, mask=kv_mask, other=0.0).to(dot_ty)
                scores = tl.dot(q, tl.trans(k), input_precision=PREC, out_dtype=tl.float32)
                scores = tl.where(t_ok[None, :], scores, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(scores, axis=1))
                alpha = tl.exp(m_i - m_new)
                p = tl.exp(scores - m_new[:, None])
                l_i = l_i * alpha + tl.sum(p, axis=1)
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC, out_dtype=tl.float32)
                m_i = m_new
            # int64: S * Hq * max_splits * D passes 2**31 at the 1024 splits of a 128k-token table (the width CUDA
            # graphs launch with) from 513 rows of an 8B model's 4096 query features, 257 rows of a 70B model's 8192
            out_rows = ((s * HKV * G + h * G + offs_g) * max_splits + split).to(tl.int64)
            tl.store(out_ptr + out_rows[:, None] * D + offs_d[None, :], acc / l_i[:, None],
                     mask=g_ok[:, None] & d_ok[None, :])
            tl.store(lse_ptr + out_rows, m_i + tl.log(l_i), mask=g_ok)

    @triton.jit(do_not_specialize=["max_splits"])
    def _merge_splits_kernel(part_ptr, lse_ptr, lens_ptr, out_ptr, blocks_per_split, max_splits,
                             HQ: tl.constexpr, D: tl.constexpr, BS: tl.constexpr, BLOCK_D: tl.constexpr):
        """out[s, h] = sum_i w_i part_i / sum_i w_i, w_i = exp(lse_i - max lse), over row s's own splits in order
        (a row of one split copies it): the same arithmetic whatever the other rows or the table width."""
        s = tl.program_id(0)
        h = tl.program_id(1)
        ctx = tl.load(lens_ptr + s)
        n = ((ctx + BS - 1) // BS + blocks_per_split - 1) // blocks_per_split
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        base = ((s * HQ + h) * max_splits).to(tl.int64)  # times D below: int64, as in _paged_decode_kernel
        top = tl.load(lse_ptr + base)
        for i in range(1, n):
            top = tl.maximum(top, tl.load(lse_ptr + base + i))
        first = tl.load(part_ptr + base * D + offs_d, mask=d_ok, other=0.0)
        acc = tl.zeros([BLOCK_D], tl.float32)
        den = 0.0
        for i in range(0, n):
            w = tl.exp(tl.load(lse_ptr + base + i) - top)
            acc += w * tl.load(part_ptr + (base + i) * D + offs_d, mask=d_ok, other=0.0)
            den += w
        out = tl.where(n == 1, first, acc / tl.where(den > 0, den, 1.0))  # a row of no context: zeros
        tl.store(out_ptr + (s * HQ + h) * D + offs_d, out, mask=d_ok)


def _store_kv_triton(k, v, k_cache, v_cache, slot_mapping):
    T = k.shape[0]
    row = k.shape[1] * k.shape[2]
    block = min(1024, next_power_of_2(row)) if k.is_cuda else min(128, next_power_of_2(row))
    _store_kv_kernel[(T,)](k.contiguous().to(k_cache.dtype), v.contiguous().to(v_cache.dtype), k_cache, v_cache,
                           slot_mapping.to(torch.int32).contiguous(), row, block)


def split_blocks(block_size: int) -> int:
    """Blocks per flash-decoding split: SPLIT_TOKENS of context, whatever the batch or the table width."""
    return max(1, SPLIT_TOKENS // block_size)


def _grid_splits(S, Hkv, max_splits, device) -> int:
    """Programs per (row, KV head): enough for about two per SM (a row's splits beyond them are looped over by
    the same programs). Only the parallelism depends on the batch, never the arithmetic."""
    if device.type != "cuda":
        return max_splits
    return max(1, min(max_splits, cdiv(2 * sm_count(device), S * Hkv)))


def _paged_decode_triton(q, k_cache, v_cache, block_tables, context_lens, scale, num_splits=None,
                         blocks_per_split=None):
    S, Hq, D = q.shape
    _, bs, Hkv, _ = k_cache.shape
    G = Hq // Hkv
    width = block_tables.shape[1]
    if num_splits:  # forced count (tests): the split size then depends on the table width
        blocks_per_split = cdiv(width, num_splits)
    per_split = blocks_per_split or split_blocks(bs)
    max_splits = cdiv(width, per_split)
    out = torch.empty(S, Hq, max_splits, D, device=q.device, dtype=torch.float32)
    lse = torch.empty(S, Hq, max_splits, device=q.device, dtype=torch.float32)
    bt = block_tables.to(torch.int32).contiguous()
    lens = context_lens.to(torch.int32).contiguous()
    _paged_decode_kernel[(S, Hkv, _grid_splits(S, Hkv, max_splits, q.device))](
        q.contiguous(), k_cache, v_cache, bt, lens, out, lse, float(scale), bt.stride(0), per_split, max_splits,
        HKV=Hkv, G=G, D=D, BS=bs, BLOCK_G=max(16, next_power_of_2(G)), BLOCK_D=max(16, next_power_of_2(D)),
        PREC="ieee" if k_cache.dtype == torch.float32 else "tf32", UPCAST=interpreting(),
    )
    if max_splits == 1:
        return out[:, :, 0].to(q.dtype)
    merged = torch.empty(S, Hq, D, device=q.device, dtype=torch.float32)
    _merge_splits_kernel[(S, Hq)](out, lse, lens, merged, per_split, max_splits, HQ=Hq, D=D, BS=bs,
                                  BLOCK_D=next_power_of_2(D))
    return merged.to(q.dtype)


# ----------------------------------------------------------------------------- dispatch
def store_kv(k, v, k_cache, v_cache, slot_mapping):
    """Write k, v [T, Hkv, D] into the paged caches at slot_mapping [T] (int; -1 = skip)."""
    if use_triton(k):
        return _store_kv_triton(k, v, k_cache, v_cache, slot_mapping)
    return store_kv_torch(k, v, k_cache, v_cache, slot_mapping)


def paged_attention_decode(q, k_cache, v_cache, block_tables, context_lens, scale, common_blocks=0, num_splits=None,
                           blocks_per_split=None):
    """q [S,Hq,D], caches [num_blocks, block_size, Hkv, D], block_tables [S, max_blocks] int32,
    context_lens [S] int32 -> [S,Hq,D]. ``common_blocks``: leading table columns shared by every row (CPU
    cascade path). Triton path: ``blocks_per_split`` overrides the split size (default ``split_blocks``);
    ``num_splits`` (tests) forces the count instead, a size then tied to the table width."""
    if q.shape[1] % k_cache.shape[2]:
        raise ValueError(f"paged_attention_decode: {q.shape[1]} query heads is not a multiple of {k_cache.shape[2]}")
    if use_triton(q):
        return _paged_decode_triton(q, k_cache, v_cache, block_tables, context_lens, scale, num_splits,
                                    blocks_per_split)
    return paged_attention_decode_torch(q, k_cache, v_cache, block_tables, context_lens, scale, common_blocks)
