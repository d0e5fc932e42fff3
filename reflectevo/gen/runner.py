"""ModelRunner: owns the paged KV cache, builds each step's batch metadata and calls the model once per step.

A step is flattened into one row, input_ids [1, T] with per-token positions: a prefill step holds the
uncomputed suffix of every admitted sequence back to back, a decode step the last token of every running
sequence. The model calls ``PagedAttention(layer_idx, q, k, v)`` in every layer; the backend writes the new
K/V into the cache and attends over cached + new tokens (prefill: one flash-attn varlen call per layer where
flash-attn is installed, else SDPA per sequence; decode: the paged decode kernel). Only the last position of
each sequence goes through the lm_head.

Everything the layers share (block tables, slots, lengths, the CPU decode plan, prefill masks) is built once
per step here, not once per layer; gather scratch buffers live as long as the runner.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from reflectevo.gen.cuda_graphs import DecodeGraphs
from reflectevo.gen.sequence import Sequence
from reflectevo.kernels._dispatch import use_triton
from reflectevo.kernels.paged_attention import (
    DecodePlan,
    GatherBuffers,
    paged_attention_decode,
    paged_attention_decode_cpu,
    plan_decode,
    store_kv,
)
from reflectevo.kernels.paged_attention_rows import RowContexts, keep_contexts
from reflectevo.model import transformer as tfm

LOGITS_CHUNK_CPU = 512


@dataclass
class FlashPrefill:
    """A prefill step as one flash-attn varlen call: the queries packed as they come, the contexts packed by
    ``slots`` (cache slots of positions 0..ctx-1 of each sequence, in order; None when no sequence has a cached
    prefix, and this step's K/V are the contexts)."""

    cu_q: torch.Tensor  # int32 [S + 1]
    cu_k: torch.Tensor  # int32 [S + 1]
    max_q: int
    max_k: int
    slots: torch.Tensor | None


@dataclass
class PrefillSeq:
    """One sequence of a prefill step: its queries are rows start:end of the step; it attends to ctx tokens."""

    start: int
    end: int
    ctx: int
    blocks: torch.Tensor | None  # int64 block ids of the whole context; None when every token is new this step
    mask: torch.Tensor | None  # [end - start, ctx] additive causal mask with the query offset (cached prefix)


class PagedAttention:
    """The attention backend the model calls; holds the caches and the current step's metadata."""

    def __init__(self, k_cache: torch.Tensor, v_cache: torch.Tensor, scale: float):
        self.k_cache, self.v_cache, self.scale = k_cache, v_cache, scale  # [L, num_blocks, bs, Hkv, D]
        self.is_prefill = False
        self.slot_mapping = self.block_tables = self.context_lens = None  # block tables: Triton decode only
        self.decode_plan: DecodePlan | None = None  # CPU decode: built once per step
        self.prefill_seqs: list[PrefillSeq] = []
        self.flash: FlashPrefill | None = None  # set for prefill steps when flash-attn can run them
        self.buffers = GatherBuffers()
        cache_bytes = 2 * k_cache.numel() * k_cache.element_size()
        self.rows = RowContexts(cache_bytes)  # CPU decode: each sequence's own context, contiguous across steps
        self.groups = RowContexts(cache_bytes // 2)  # ... and each sample group's shared prompt

    def __call__(self, layer_idx: int, q, k, v):
        B, T, Hq, D = q.shape
        q, k, v = q.reshape(T, Hq, D), k.reshape(T, *k.shape[2:]), v.reshape(T, *v.shape[2:])
        kc, vc = self.k_cache[layer_idx], self.v_cache[layer_idx]
        store_kv(k, v, kc, vc, self.slot_mapping)
        if self.is_prefill and self.flash is not None:
            out = self._prefill_flash(q, k, v, kc, vc)
        elif self.is_prefill:
            out = self._prefill(q, k, v, kc, vc)
        elif self.decode_plan is not None:
            out = paged_attention_decode_cpu(q, kc, vc, self.decode_plan, self.scale, self.buffers)
        else:
            out = paged_attention_decode(q, kc, vc, self.block_tables, self.context_lens, self.scale)
        return out.reshape(B, T, Hq, D)

    def _prefill_flash(self, q, k, v, kc, vc):
        """All sequences of the step in one flash-attn varlen call, causal aligned to the end of each context
        (flash-attn's convention: query i of n sits at position ctx - n + i). Contexts with a cached prefix are
        gathered from the cache slot by slot: flash-attn 2 reads block tables only with blocks of 256 tokens,
        and prefix caching wants small ones."""
        f = self.flash
        keys, vals = k, v
        if f.slots is not None:
            keys = kc.view(-1, *kc.shape[2:]).index_select(0, f.slots)
            vals = vc.view(-1, *vc.shape[2:]).index_select(0, f.slots)
        return tfm.flash_attn_varlen_func(q, keys, vals, f.cu_q, f.cu_k, f.max_q, f.max_k, softmax_scale=self.scale,
                                          causal=True)

    def _prefill(self, q, k, v, kc, vc):
        """Each sequence's new queries attend to its whole context, causal with the query offset. A sequence
        without cached prefix attends to this step's K/V directly; one with a cached prefix reads its context
        back from its blocks (the prefix and the K/V stored just above)."""
        out = torch.empty_like(q)
        Hkv = kc.shape[2]
        for s in self.prefill_seqs:
            qi = q[s.start:s.end].transpose(0, 1)[None]  # [1, Hq, n, D]
            if s.blocks is None:
                keys, vals = k[s.start:s.end], v[s.start:s.end]
            else:
                kbuf, vbuf = self.buffers.take(s.blocks.shape[0], kc)
                torch.index_select(kc, 0, s.blocks, out=kbuf)
                torch.index_select(vc, 0, s.blocks, out=vbuf)
                keys, vals = kbuf.view(-1, Hkv, kc.shape[3])[:s.ctx], vbuf.view(-1, Hkv, kc.shape[3])[:s.ctx]
            keys, vals = keys.transpose(0, 1)[None].to(qi.dtype), vals.transpose(0, 1)[None].to(qi.dtype)
            gqa = qi.shape[1] != Hkv
            if gqa and qi.is_cuda:  # repeated K/V keep the fused CUDA kernels eligible with a mask
                keys = keys.repeat_interleave(qi.shape[1] // Hkv, dim=1)
                vals = vals.repeat_interleave(qi.shape[1] // Hkv, dim=1)
                gqa = False
            o = F.scaled_dot_product_attention(qi, keys, vals, attn_mask=s.mask, is_causal=s.mask is None,
                                               scale=self.scale, enable_gqa=gqa)
            out[s.start:s.end] = o[0].transpose(0, 1)
        return out


class ModelRunner:
    def __init__(self, model, num_blocks: int, block_size: int):
        cfg = model.config
        self.model = model
        self.block_size = block_size
        self.device = model.device
        self.dtype = model.dtype if model.dtype in (torch.float32, torch.float16, torch.bfloat16) else torch.float32
        shape = (cfg.num_layers, num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
        # empty, zeroed block by block on first use (clear_blocks_below): a CPU cache of several GiB is neither
        # written nor committed up front
        self.k_cache = torch.empty(shape, dtype=self.dtype, device=self.device)
        self.v_cache = torch.empty(shape, dtype=self.dtype, device=self.device)
        self._cleared = 0
        self.attn = PagedAttention(self.k_cache, self.v_cache, cfg.head_dim ** -0.5)
        self._last_common: list[int] = []  # the block ids the last decode step's rows all started with
        self.graphs: DecodeGraphs | None = None

    def clear_blocks_below(self, high_water: int):
        """Zero blocks [cleared so far, high_water) of both caches. Slots past a context are read and weighted by
        0 (the CPU gather path, padded CUDA-graph rows, tables padded with block 0), and 0 * NaN left in memory
        by its previous owner would poison the whole row; a block once written holds finite K/V."""
        if high_water > self._cleared:
            self.k_cache[:, self._cleared:high_water].zero_()
            self.v_cache[:, self._cleared:high_water].zero_()
            self._cleared = high_water

    def enable_graphs(self, max_batch: int, max_model_len: int, emulate: bool = False):
        """Decode steps of up to ``max_batch`` sequences through CUDA graphs (``emulate``: eager, for tests)."""
        # a row never holds more blocks than the cache has: the bound sizes the tables and the decode partials
        max_blocks = min(-(-max_model_len // self.block_size), self.k_cache.shape[1])
        self.graphs = DecodeGraphs(self, max_batch, max_blocks, emulate=emulate)

    def _graph_step(self, seqs, ids, pos, slots, lens) -> torch.Tensor | None:
        """Logits from a graph replay, or None when the step runs eagerly (no graphs, batch too large, or a
        capture failed before: then graphs stay off for this runner, with one warning)."""
        g = self.graphs
        if g is None or g.failed is not None or g.bucket(len(seqs)) is None:
            return None
        try:
            return g.run(ids, pos, slots, self._tables(seqs), lens)
        except Exception as e:  # noqa: BLE001 - eager decode still works
            if g.emulate:
                raise
            g.failed = f"{type(e).__name__}: {e}"
            g.invalidate()
            warnings.warn(f"CUDA graphs off for this engine, decode runs eagerly: {g.failed}", stacklevel=2)
            return None

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

    def _prefill_seqs(self, seqs: list[Sequence], starts: list[int]) -> list[PrefillSeq]:
        bs, dev, out = self.block_size, self.device, []
        for s, start, end in zip(seqs, starts[:-1], starts[1:]):
            ctx, n_new = len(s), end - start
            if n_new == ctx:
                out.append(PrefillSeq(start, end, ctx, None, None))
                continue
            blocks = torch.tensor(s.block_table[: (ctx + bs - 1) // bs], dtype=torch.int64, device=dev)
            qpos = torch.arange(ctx - n_new, ctx, device=dev)  # query i sits at position ctx - n_new + i
            mask = torch.zeros(n_new, ctx, dtype=self.dtype, device=dev)
            mask.masked_fill_(torch.arange(ctx, device=dev)[None, :] > qpos[:, None], float("-inf"))
            out.append(PrefillSeq(start, end, ctx, blocks, mask))
        return out

    def _flash_prefill(self, seqs: list[Sequence], starts: list[int]) -> FlashPrefill:
        bs, dev = self.block_size, self.device
        ctx = [len(s) for s in seqs]
        new = [e - b for b, e in zip(starts[:-1], starts[1:])]
        slots = None
        if ctx != new:  # some context starts in the cache
            slots = torch.cat([(torch.tensor(s.block_table[: (n + bs - 1) // bs], dtype=torch.int64)[:, None] * bs
                                + torch.arange(bs)).flatten()[:n] for s, n in zip(seqs, ctx)]).to(dev)
        cu_k = torch.tensor([0] + ctx, dtype=torch.int32).cumsum(0, dtype=torch.int32)
        return FlashPrefill(torch.tensor(starts, dtype=torch.int32, device=dev), cu_k.to(dev), max(new), max(ctx),
                            slots)

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
        if not is_prefill:
            logits = self._graph_step(seqs, ids, pos, slots, lens)
            if logits is not None:
                return logits
        attn = self.attn
        attn.is_prefill = is_prefill
        attn.slot_mapping = torch.tensor(slots, dtype=torch.int64, device=dev)
        attn.decode_plan, attn.prefill_seqs, attn.flash = None, [], None
        if is_prefill and tfm.flash_usable(self.k_cache):
            attn.flash = self._flash_prefill(seqs, starts)
        elif is_prefill:
            attn.prefill_seqs = self._prefill_seqs(seqs, starts)
        if is_prefill:
            attn.buffers.forget_stable()  # prefill may place new or recycled blocks where shared prefixes were
            attn.rows.forget()
            attn.groups.forget()
            self._last_common = []
        else:
            tables = self._tables(seqs)
            context_lens = torch.tensor(lens, dtype=torch.int32)
            if use_triton(self.k_cache):
                attn.block_tables, attn.context_lens = tables.to(dev), context_lens.to(dev)
            else:  # CPU: prefixes shared by all sequences, or by the samples of a prompt, are read once
                common = self._common_blocks(tables, min(lens))
                plan = plan_decode(tables.to(dev), context_lens.to(dev), self.block_size, common, self.dtype,
                                   [s.num_prompt_tokens for s in seqs])
                cfg = self.model.config
                reserve = max(s.params.max_tokens - s.num_output_tokens for s in seqs)
                keep_contexts(plan, attn.rows, attn.groups, [s.seq_id for s in seqs], [s.block_table for s in seqs],
                              lens, self.block_size, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, self.dtype, dev,
                              reserve)
                attn.decode_plan = plan
        input_ids = torch.tensor([ids], dtype=torch.long, device=dev)
        positions = torch.tensor([pos], dtype=torch.long, device=dev)
        hidden = self.model.hidden_states(input_ids, positions=positions, attention=attn)
        last = hidden[0] if not is_prefill else hidden[0, torch.tensor(starts[1:], device=dev) - 1]
        return self._logits(last)

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[S, H] -> [S, V] fp32. On the CPU a plain head runs in vocabulary slices of LOGITS_CHUNK_CPU rows, so
        each slice's [S, chunk] output stays in cache: 1.7-2x faster than one matmul at 8-50 rows (measured on a
        2-core AVX2 machine, SmolLM2's 49152 x 576 head; 512 rows 0-10% faster than 1024 there)."""
        head = self.model.lm_head
        if hidden.is_cuda or type(head) is not torch.nn.Linear or head.bias is not None:
            return self.model.logits(hidden).float()
        w = head.weight
        out = torch.empty(hidden.shape[0], w.shape[0], dtype=torch.result_type(hidden, w), device=hidden.device)
        for c in range(0, w.shape[0], LOGITS_CHUNK_CPU):
            torch.matmul(hidden, w[c:c + LOGITS_CHUNK_CPU].T, out=out[:, c:c + LOGITS_CHUNK_CPU])
        return out.float()

    def _common_blocks(self, tables: torch.Tensor, min_len: int) -> int:
        """Leading table columns equal in every row and full in every sequence. A row left alone keeps the prefix
        it shared in the step before, so its kept contiguous part stays valid instead of being copied again."""
        if tables.shape[0] < 2:
            last = torch.tensor(self._last_common, dtype=tables.dtype)[: tables.shape[1]]
            same = tables[0, : last.shape[0]] == last
        else:
            same = (tables == tables[:1]).all(dim=0)
        n = min(int(same.to(torch.int32).cumprod(0).sum()), min_len // self.block_size)
        self._last_common = tables[0, :n].tolist()
        return n
