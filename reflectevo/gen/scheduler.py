"""Scheduler: continuous batching over the paged KV cache.

Each step is either a prefill step (admit waiting sequences, oldest first, while the batched-token budget,
max_num_seqs and free blocks allow) or, when nothing can be admitted, a decode step over every running
sequence. A decode step that runs out of blocks preempts the newest running sequences: their blocks are freed
(hashed blocks stay findable, so most of the recompute is a cache hit) and they go back to the front of the queue.
No chunked prefill: a prompt longer than max_num_batched_tokens is admitted alone in its own step.
"""
from __future__ import annotations

from collections import deque

from reflectevo.gen.block_manager import BlockManager
from reflectevo.gen.sequence import Sequence, Status


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int, stats: dict):
        self.bm = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.stats = stats
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence):
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> tuple[list[Sequence], bool]:
        """Returns (sequences, is_prefill). Sequences that can never fit are finished with reason "length"."""
        batch, tokens = [], 0
        while self.waiting and len(self.running) < self.max_num_seqs:  # the batch is in running already
            seq = self.waiting[0]
            need_blocks, cached = self.bm.plan(seq)
            new_tokens = len(seq) - cached
            if batch and tokens + new_tokens > self.max_num_batched_tokens:
                break
            if need_blocks > self.bm.num_free:
                if not batch and not self.running and need_blocks > self.bm.num_blocks:
                    self.waiting.popleft()
                    self._finish(seq, "length")  # outgrew the whole cache
                    continue
                break
            self.waiting.popleft()
            self.running.append(seq)  # first: an exception from here on leaves it where abort() finds it
            self.bm.allocate(seq)
            seq.status = Status.RUNNING
            self.stats["prefix_cache_hit_tokens"] += seq.num_cached_tokens
            self.stats["prefill_tokens_computed"] += len(seq) - seq.num_cached_tokens
            tokens += len(seq) - seq.num_cached_tokens
            batch.append(seq)
        if batch:
            return batch, True
        if self.waiting and not self.running:  # with nothing running every block should be free
            raise RuntimeError(f"scheduler: {len(self.waiting)} sequences waiting, none running, and only "
                               f"{self.bm.num_free} of {self.bm.num_blocks} KV blocks free (blocks leaked)")

        queue, running = deque(self.running), []
        while queue:
            seq = queue.popleft()
            while not self.bm.can_append(seq):
                if queue:
                    self._preempt(queue.pop())
                elif running:
                    self._preempt(seq)
                    seq = None
                    break
                else:
                    self._finish(seq, "length")  # alone and still no room: the cache is too small for it
                    seq = None
                    break
            if seq is not None:
                self.bm.append_slot(seq)
                running.append(seq)
        self.running = running
        return list(running), False

    def _preempt(self, seq: Sequence):
        self.bm.deallocate(seq)
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.stats["preemptions"] += 1

    def _finish(self, seq: Sequence, reason: str):
        seq.status = Status.FINISHED
        seq.finish_reason = reason
        if seq.block_table:
            self.bm.deallocate(seq)
        self.stats["finished_by_cache"] = self.stats.get("finished_by_cache", 0) + 1

    def finish(self, seq: Sequence, reason: str):
        """Called by the engine after sampling: frees the sequence's blocks at once."""
        seq.status = Status.FINISHED
        seq.finish_reason = reason
        self.bm.deallocate(seq)
        self.running.remove(seq)

    def abort(self):
        """Drop every sequence (after an error inside a step, an interrupt included, wherever it struck) so the
        next call starts clean: every block is freed, whatever the reference counts say. The prefix cache goes
        too: a prefill step registers its full blocks when it allocates them, before the model has written them."""
        for seq in (*self.running, *self.waiting):
            seq.block_table, seq.block_hashes, seq.num_cached_tokens = [], [], 0
        self.running, self.waiting = [], deque()
        self.bm.reset()
