"""Paged attention for decoding, and the store of new K/V into the paged cache.

The cache of one layer is k_cache, v_cache [num_blocks, block_size, Hkv, D]; sequence s owns the blocks
block_tables[s, :ceil(L_s / block_size)] and its token t lives at slot block_tables[s, t // bs] * bs + t % bs.
Decode (one query token per sequence, GQA group g = Hq / Hkv):

    out[s, h] = sum_t softmax_t(scale * q[s, h] . K_s[t, h // g]) V_s[t, h // g],   t < context_lens[s]

The kernel walks the block table with an online softmax (running max m, running sum l, fp32 accumulator), so
it reads each cached K/V once and never materialises the gathered [S, L, Hkv, D] context that the PyTorch
reference builds; the g query heads of a KV head share each K/V load. Long contexts can be split over several
programs (flash-decoding), each writing a partial (out, log-sum-exp) that is merged afterwards.

The CPU path (``paged_attention_decode_torch``) gathers by block table in one indexing op and runs a masked
softmax for all sequences at once; when the sequences share leading blocks (a common few-shot prefix) it
attends to that prefix once for the whole batch (cascade attention) and merges by log-sum-exp, which turns
S copies of the prefix into one.
"""
from __future__ import annotations

import math

import torch

from reflectevo.kernels._dispatch import HAS_TRITON, interpreting, use_triton

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


def _partial(q, k, v, valid, scale):
    """q [S,Hkv,G,D], k/v [S or 1, L, Hkv, D], valid [S or 1, L] or None (all valid)
    -> (out [S,Hkv,G,D] fp32 normalised over these keys, lse [S,Hkv,G]; -inf where no key is valid)."""
    S, H, G, D = q.shape
    qf = q.float()
    if k.shape[0] == 1 and S > 1:  # shared keys: one GEMM per KV head for the whole batch
        kk, vv = k[0].float().transpose(0, 1), v[0].float().transpose(0, 1)  # [Hkv, L, D]
        scores = torch.matmul(qf.transpose(0, 1).reshape(H, S * G, D), kk.transpose(1, 2)).mul_(scale)
        scores = scores.view(H, S, G, -1).transpose(0, 1)  # [S, Hkv, G, L] (a view)
    else:
        kk, vv = k.float().permute(0, 2, 1, 3), v.float().permute(0, 2, 1, 3)  # [S, Hkv, L, D]
        scores = torch.matmul(qf, kk.transpose(2, 3)).mul_(scale)
    if valid is not None:
        scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    m = scores.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(scores - m)
    denom = p.sum(dim=-1, keepdim=True)
    if k.shape[0] == 1 and S > 1:
        out = torch.matmul(p.transpose(0, 1).reshape(H, S * G, -1), vv).view(H, S, G, D).transpose(0, 1)
    else:
        out = torch.matmul(p, vv)
    lse = (m + denom.log()).squeeze(-1)
    return out / denom.clamp_min(1e-30), lse


def merge_partials(outs, lses):
    """Combine attention over disjoint key sets: weights exp(lse_i - logsumexp_i lse_i)."""
    lse = torch.stack(lses)
    total = torch.logsumexp(lse, dim=0)
    w = torch.exp(lse - total.nan_to_num(neginf=0.0)).nan_to_num(nan=0.0)
    return sum(w[i][..., None] * outs[i] for i in range(len(outs)))


def paged_attention_decode_reference(q, k_cache, v_cache, block_tables, context_lens, scale):
    """Readable reference: gather each sequence's context by its block table, masked softmax, weighted sum."""
    S, Hq, D = q.shape
    Hkv = k_cache.shape[2]
    k, v = _gather(k_cache, block_tables), _gather(v_cache, block_tables)
    pos = torch.arange(k.shape[1], device=q.device)
    valid = pos[None, :] < context_lens.long()[:, None]
    out, _ = _partial(q.view(S, Hkv, Hq // Hkv, D), k, v, valid, scale)
    return out.reshape(S, Hq, D).to(q.dtype)


def paged_attention_decode_torch(q, k_cache, v_cache, block_tables, context_lens, scale, common_blocks=0):
    """CPU path: like the reference, but the first ``common_blocks`` columns of block_tables (the same block
    ids in every row, full in every sequence) are attended once for the whole batch (cascade)."""
    if common_blocks <= 0 or q.shape[0] == 1:
        return paged_attention_decode_reference(q, k_cache, v_cache, block_tables, context_lens, scale)
    S, Hq, D = q.shape
    Hkv, bs = k_cache.shape[2], k_cache.shape[1]
    qg = q.view(S, Hkv, Hq // Hkv, D)
    shared = block_tables[:1, :common_blocks]
    ks, vs = _gather(k_cache, shared), _gather(v_cache, shared)
    out_a, lse_a = _partial(qg, ks, vs, None, scale)
    rest = block_tables[:, common_blocks:]
    if rest.shape[1] == 0:
        return out_a.reshape(S, Hq, D).to(q.dtype)
    kr, vr = _gather(k_cache, rest), _gather(v_cache, rest)
    pos = torch.arange(kr.shape[1], device=q.device) + common_blocks * bs
    out_b, lse_b = _partial(qg, kr, vr, pos[None, :] < context_lens.long()[:, None], scale)
    return merge_partials([out_a, out_b], [lse_a, lse_b]).reshape(S, Hq, D).to(q.dtype)


# ----------------------------------------------------------------------------- Triton
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

    @triton.jit
    def _paged_decode_kernel(
        q_ptr, kc_ptr, vc_ptr, bt_ptr, lens_ptr, out_ptr, lse_ptr, scale,
        stride_bt, blocks_per_split,
        HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BS: tl.constexpr,
        BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, NUM_SPLITS: tl.constexpr, PREC: tl.constexpr,
        UPCAST: tl.constexpr,
    ):
        s = tl.program_id(0)
        h = tl.program_id(1)
        split = tl.program_id(2)
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
        m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
        n_blocks = (ctx + BS - 1) // BS
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
        empty = l_i == 0.0
        out = acc / tl.where(empty, 1.0, l_i)[:, None]
        lse = tl.where(empty, float("-inf"), m_i + tl.log(tl.where(empty, 1.0, l_i)))
        out_rows = (s * HKV * G + h * G + offs_g) * NUM_SPLITS + split
        tl.store(out_ptr + out_rows[:, None] * D + offs_d[None, :], out, mask=g_ok[:, None] & d_ok[None, :])
        tl.store(lse_ptr + out_rows, lse, mask=g_ok)


def _store_kv_triton(k, v, k_cache, v_cache, slot_mapping):
    T = k.shape[0]
    row = k.shape[1] * k.shape[2]
    block = min(1024, triton.next_power_of_2(row)) if k.is_cuda else min(128, triton.next_power_of_2(row))
    _store_kv_kernel[(T,)](k.contiguous().to(k_cache.dtype), v.contiguous().to(v_cache.dtype), k_cache, v_cache,
                           slot_mapping.to(torch.int32).contiguous(), row, block)


def _num_splits(S, Hkv, max_blocks, device):
    if not torch.cuda.is_available() or device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    if S * Hkv >= 2 * sms or max_blocks < 16:
        return 1
    return int(min(max_blocks // 8, math.ceil(2 * sms / (S * Hkv)), 16)) or 1


def _paged_decode_triton(q, k_cache, v_cache, block_tables, context_lens, scale, num_splits=None):
    S, Hq, D = q.shape
    _, bs, Hkv, _ = k_cache.shape
    G = Hq // Hkv
    max_blocks = block_tables.shape[1]
    splits = num_splits or _num_splits(S, Hkv, max_blocks, q.device)
    per_split = max(1, math.ceil(max_blocks / splits))
    out = torch.empty(S, Hq, splits, D, device=q.device, dtype=torch.float32)
    lse = torch.empty(S, Hq, splits, device=q.device, dtype=torch.float32)
    bt = block_tables.to(torch.int32).contiguous()
    _paged_decode_kernel[(S, Hkv, splits)](
        q.contiguous(), k_cache, v_cache, bt, context_lens.to(torch.int32).contiguous(), out, lse, float(scale),
        bt.stride(0), per_split,
        HKV=Hkv, G=G, D=D, BS=bs, BLOCK_G=max(16, triton.next_power_of_2(G)),
        BLOCK_D=max(16, triton.next_power_of_2(D)), NUM_SPLITS=splits,
        PREC="ieee" if k_cache.dtype == torch.float32 else "tf32", UPCAST=interpreting(),
    )
    if splits == 1:
        return out[:, :, 0].to(q.dtype)
    w = torch.softmax(lse, dim=-1).nan_to_num(nan=0.0)
    return (w[..., None] * out).sum(2).to(q.dtype)


# ----------------------------------------------------------------------------- dispatch
def store_kv(k, v, k_cache, v_cache, slot_mapping):
    """Write k, v [T, Hkv, D] into the paged caches at slot_mapping [T] (int; -1 = skip)."""
    if use_triton(k):
        return _store_kv_triton(k, v, k_cache, v_cache, slot_mapping)
    return store_kv_torch(k, v, k_cache, v_cache, slot_mapping)


def paged_attention_decode(q, k_cache, v_cache, block_tables, context_lens, scale, common_blocks=0, num_splits=None):
    """q [S,Hq,D], caches [num_blocks, block_size, Hkv, D], block_tables [S, max_blocks] int32,
    context_lens [S] int32 -> [S,Hq,D]. ``common_blocks``: leading table columns shared by every row (CPU
    cascade path); ``num_splits``: force the flash-decoding split count on the Triton path."""
    if q.shape[1] % k_cache.shape[2]:
        raise ValueError(f"paged_attention_decode: {q.shape[1]} query heads is not a multiple of {k_cache.shape[2]}")
    if use_triton(q):
        return _paged_decode_triton(q, k_cache, v_cache, block_tables, context_lens, scale, num_splits)
    return paged_attention_decode_torch(q, k_cache, v_cache, block_tables, context_lens, scale, common_blocks)
