"""CUDA graphs for decode steps: one captured model call per batch-size bucket, replayed on static buffers.

An eager decode step of an 8B model launches ~1000 kernels from Python; on an H200 at batch 64 issuing them took
23 ms (bf16) and 45 ms (NF4) of host time for 7.4 / 13.6 ms of device work (bench/profile_gpu.py, 2026-11-30). A
replayed graph issues the same kernels in one call.

How a step maps onto a graph: the batch of ``n`` running sequences is padded to the smallest bucket ``b >= n``
(1, 2, 4, 8, 16, 24, 32, then steps of 16 up to ``max_batch``). Static buffers hold the step's token ids,
positions, KV slots, block tables (``max_blocks`` columns) and context lengths; padding rows get slot -1 (the
store kernel skips them) and context length 1 (they read the first slot of whatever block their table row names:
finite or not, every op is row-wise, so it cannot reach a real row), so they write no cache entry and their
outputs are ignored. Each bucket is captured the first time a step needs it, after one
eager warm-up call at that shape (Triton compiles and autotunes outside the capture). All graphs share one memory
pool; the logits a replay returns are valid until the next replay.

Graphs hold the addresses of the weights they were captured with: ``invalidate()`` (the engine calls it when the
model's parameters or adapter switches change) drops them. ``emulate=True`` runs the same padded static-buffer
step eagerly, without capturing: how CPU tests check the padding.
"""
from __future__ import annotations

import torch


def buckets(max_batch: int) -> list[int]:
    sizes = [b for b in (1, 2, 4, 8, 16, 24, 32) if b < max_batch]
    sizes += list(range(48, max_batch, 16))
    return sizes + [max_batch]


class DecodeGraphs:
    def __init__(self, runner, max_batch: int, max_blocks: int, emulate: bool = False):
        self.runner, self.emulate = runner, emulate
        self.sizes = buckets(max_batch)
        dev = runner.device
        self.input_ids = torch.zeros(1, max_batch, dtype=torch.long, device=dev)
        self.positions = torch.zeros(1, max_batch, dtype=torch.long, device=dev)
        self.slots = torch.full((max_batch,), -1, dtype=torch.int64, device=dev)
        self.tables = torch.zeros(max_batch, max_blocks, dtype=torch.int32, device=dev)
        self.lens = torch.ones(max_batch, dtype=torch.int32, device=dev)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph | None, torch.Tensor | None]] = {}
        self.pool = None
        self.failed: str | None = None  # why capturing failed; the runner then stays eager

    def bucket(self, n: int) -> int | None:
        return next((b for b in self.sizes if b >= n), None)

    def invalidate(self):
        self.graphs.clear()
        self.pool = None

    def _bind(self, b: int):
        attn = self.runner.attn
        attn.is_prefill, attn.decode_plan, attn.prefill_seqs = False, None, []
        attn.slot_mapping, attn.block_tables, attn.context_lens = self.slots[:b], self.tables[:b], self.lens[:b]

    def _forward(self, b: int) -> torch.Tensor:
        self._bind(b)
        hidden = self.runner.model.hidden_states(self.input_ids[:, :b], positions=self.positions[:, :b],
                                                 attention=self.runner.attn)
        return self.runner._logits(hidden[0])

    def _capture(self, b: int):
        stream = torch.cuda.Stream(self.runner.device)
        stream.wait_stream(torch.cuda.current_stream(self.runner.device))
        with torch.cuda.stream(stream):
            self._forward(b)  # compiles / autotunes every kernel at this shape outside the capture
        torch.cuda.current_stream(self.runner.device).wait_stream(stream)
        torch.cuda.synchronize(self.runner.device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self._forward(b)
        self.pool = graph.pool()
        self.graphs[b] = (graph, out)

    @torch.inference_mode()
    def run(self, ids: list[int], pos: list[int], slots: list[int], tables: torch.Tensor,
            lens: list[int]) -> torch.Tensor:
        """Logits [n, V] for a decode step of n = len(ids) sequences (tables: CPU int32 [n, width])."""
        n, b = len(ids), self.bucket(len(ids))
        w = tables.shape[1]
        self.input_ids[0, :n].copy_(torch.tensor(ids, dtype=torch.long), non_blocking=True)
        self.positions[0, :n].copy_(torch.tensor(pos, dtype=torch.long), non_blocking=True)
        self.slots[:n].copy_(torch.tensor(slots, dtype=torch.int64), non_blocking=True)
        self.tables[:n, :w].copy_(tables, non_blocking=True)
        self.lens[:n].copy_(torch.tensor(lens, dtype=torch.int32), non_blocking=True)
        if b > n:
            self.input_ids[0, n:b].zero_()
            self.positions[0, n:b].zero_()
            self.slots[n:b].fill_(-1)
            self.lens[n:b].fill_(1)
        if self.emulate:
            return self._forward(b)[:n]
        if b not in self.graphs:
            self._capture(b)
        graph, out = self.graphs[b]
        graph.replay()
        return out[:n]
