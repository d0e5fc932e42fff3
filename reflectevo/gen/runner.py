"""ModelRunner: owns the paged KV cache, builds each step's batch metadata and calls the model once per step.

A step is flattened into one row, input_ids [1, T] with per-token positions: a prefill step holds the
uncomputed suffix of every admitted sequence back to back, a decode step the last token of every running
sequence. The model calls ``PagedAttention(layer_idx, q, k, v)`` in every layer; the backend writes the new
K/V into the cache and attends over cached + new tokens (SDPA per sequence for prefill, the paged decode
kernel for decode). Only the last position of each sequence goes through the lm_head.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from reflectevo.gen.sequence import Sequence
from reflectevo.kernels.paged_attention import paged_attention_decode, store_kv


class PagedAttention:
    """The attention backend the model calls; holds the caches and the current step's metadata."""

    def __init__(self, k_cache: torch.Tensor, v_cache: torch.Tensor, scale: float):
        self.k_cache, self.v_cache, self.scale = k_cache, v_cache, scale  # [L, num_blocks, bs, Hkv, D]
        self.is_prefill = False
        self.slot_mapping = self.block_tables = self.context_lens = None
        self.query_starts: list[int] = []
        self.context_lens_host: list[int] = []
        self.common_blocks = 0

    def __call__(self, layer_idx: int, q, k, v):
        B, T, Hq, D = q.shape
        q, k, v = q.reshape(T, Hq, D), k.reshape(T, *k.shape[2:]), v.reshape(T, *v.shape[2:])
        kc, vc = self.k_cache[layer_idx], self.v_cache[layer_idx]
        store_kv(k, v, kc, vc, self.slot_mapping)
        if not self.is_prefill:
            out = paged_attention_decode(q, kc, vc, self.block_tables, self.context_lens, self.scale,
                                         common_blocks=self.common_blocks)
        else:
            out = self._prefill(q, kc, vc)
        return out.reshape(B, T, Hq, D)

    def _prefill(self, q, kc, vc):
        """Each sequence's new queries attend to its whole context, read back from its blocks (the cached
        prefix and the K/V stored just above), causal with the query offset."""
        bs, Hkv, D = kc.shape[1], kc.shape[2], kc.shape[3]
        outs = []
        for i, (start, end) in enumerate(zip(self.query_starts[:-1], self.query_starts[1:])):
            ctx = int(self.context_lens_host[i])
            n_blocks = (ctx + bs - 1) // bs
            table = self.block_tables[i, :n_blocks].long()
            keys = kc[table].reshape(-1, Hkv, D)[:ctx].transpose(0, 1)
            vals = vc[table].reshape(-1, Hkv, D)[:ctx].transpose(0, 1)
            qi = q[start:end].transpose(0, 1)
            if qi.shape[0] != Hkv:  # GQA: repeated K/V keep the fused SDPA kernels eligible with a mask
                keys = keys.repeat_interleave(qi.shape[0] // Hkv, dim=0)
                vals = vals.repeat_interleave(qi.shape[0] // Hkv, dim=0)
            n_new = end - start
            mask = None
            if n_new != ctx:  # causal with the query offset: query i sits at position ctx - n_new + i
                qpos = torch.arange(ctx - n_new, ctx, device=q.device)
                mask = torch.arange(ctx, device=q.device)[None, :] <= qpos[:, None]
            o = F.scaled_dot_product_attention(qi[None], keys[None].to(qi.dtype), vals[None].to(qi.dtype),
                                               attn_mask=mask, is_causal=mask is None, scale=self.scale)
            outs.append(o[0].transpose(0, 1))
        return torch.cat(outs, dim=0)


class ModelRunner:
    def __init__(self, model, num_blocks: int, block_size: int):
        cfg = model.config
        self.model = model
        self.block_size = block_size
        self.device = model.device
        self.dtype = model.dtype if model.dtype in (torch.float32, torch.float16, torch.bfloat16) else torch.float32
        shape = (cfg.num_layers, num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
        self.k_cache = torch.empty(shape, dtype=self.dtype, device=self.device)
        self.v_cache = torch.empty(shape, dtype=self.dtype, device=self.device)
        self.attn = PagedAttention(self.k_cache, self.v_cache, cfg.head_dim ** -0.5)

    @staticmethod
    def bytes_per_block(cfg, block_size: int, dtype: torch.dtype) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        return 2 * cfg.num_layers * block_size * cfg.num_kv_heads * cfg.head_dim * elem

    def _tables(self, seqs: list[Sequence]) -> torch.Tensor:
        width = max(len(s.block_table) for s in seqs)
        return torch.tensor([s.block_table + [0] * (width - len(s.block_table)) for s in seqs], dtype=torch.int32)

    def _slots(self, seq: Sequence, start: int, end: int) -> list[int]:
        bs, table = self.block_size, seq.block_table
        return [table[p // bs] * bs + p % bs for p in range(start, end)]

    @torch.inference_mode()
    def run(self, seqs: list[Sequence], is_prefill: bool) -> torch.Tensor:
        """One model call for the step -> logits [len(seqs), V] at each sequence's last position."""
        ids, pos, slots, starts = [], [], [], [0]
        for s in seqs:
            first = s.num_cached_tokens if is_prefill else len(s) - 1
            ids.extend(s.token_ids[first:])
            pos.extend(range(first, len(s)))
            slots.extend(self._slots(s, first, len(s)))
            starts.append(len(ids))
        dev = self.device
        lens = [len(s) for s in seqs]
        tables = self._tables(seqs)
        attn = self.attn
        attn.is_prefill = is_prefill
        attn.slot_mapping = torch.tensor(slots, dtype=torch.int64, device=dev)
        attn.block_tables = tables.to(dev)
        attn.context_lens = torch.tensor(lens, dtype=torch.int32, device=dev)
        attn.context_lens_host = lens
        attn.query_starts = starts
        attn.common_blocks = 0 if is_prefill else self._common_blocks(tables, min(lens))
        input_ids = torch.tensor([ids], dtype=torch.long, device=dev)
        positions = torch.tensor([pos], dtype=torch.long, device=dev)
        hidden = self.model.hidden_states(input_ids, positions=positions, attention=attn)
        last = torch.tensor(starts[1:], device=dev) - 1
        return self.model.logits(hidden[0, last]).float()

    def _common_blocks(self, tables: torch.Tensor, min_len: int) -> int:
        """Leading table columns equal in every row and full in every sequence."""
        if tables.shape[0] < 2:
            return 0
        same = (tables == tables[:1]).all(dim=0).to(torch.int32)
        n = int(same.cumprod(0).sum())
        return min(n, min_len // self.block_size)
