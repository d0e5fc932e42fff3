"""BlockManager: the KV cache as fixed-size blocks with reference counts and prefix caching.

Every full block of a sequence gets a chained hash, h_i = H(h_{i-1}, tokens of block i), so equal hashes mean
equal prefixes. A new sequence whose leading full blocks are already in the table reuses them (reference count
+1) and only computes the rest. Free blocks that still hold a hashed prefix stay findable and are evicted least
recently freed first, after the plain free blocks are used up.
"""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque

from reflectevo.gen.sequence import Sequence


def block_hash(prev: bytes, tokens: list[int]) -> bytes:
    return hashlib.blake2b(prev + array("q", tokens).tobytes(), digest_size=16).digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.ref_count = [0] * num_blocks
        self.hash_of: list[bytes | None] = [None] * num_blocks
        self.block_of: dict[bytes, int] = {}
        self.free_plain: deque[int] = deque(range(num_blocks))
        self.free_cached: OrderedDict[int, None] = OrderedDict()  # oldest first
        self.high_water = 0  # 1 + the highest block id ever handed out: blocks above it were never used

    @property
    def num_free(self) -> int:
        return len(self.free_plain) + len(self.free_cached)

    def _take(self) -> int:
        if self.free_plain:
            bid = self.free_plain.popleft()
        else:
            bid, _ = self.free_cached.popitem(last=False)
            h = self.hash_of[bid]
            if self.block_of.get(h) == bid:
                del self.block_of[h]
            self.hash_of[bid] = None
        self.ref_count[bid] = 1
        self.high_water = max(self.high_water, bid + 1)
        return bid

    def _release(self, bid: int):
        self.ref_count[bid] -= 1
        if self.ref_count[bid] == 0:
            if self.hash_of[bid] is not None:
                self.free_cached[bid] = None
            else:
                self.free_plain.append(bid)

    def _register(self, bid: int, h: bytes):
        if self.hash_of[bid] is None and h not in self.block_of:
            self.hash_of[bid] = h
            self.block_of[h] = bid

    def _full_block_hashes(self, seq: Sequence) -> list[bytes]:
        bs, toks, hashes = self.block_size, seq.token_ids, list(seq.block_hashes)
        prev = hashes[-1] if hashes else b""
        for i in range(len(hashes), len(toks) // bs):
            prev = block_hash(prev, toks[i * bs:(i + 1) * bs])
            hashes.append(prev)
        return hashes

    def _cached_prefix(self, seq: Sequence, hashes: list[bytes]) -> list[int]:
        """Block ids of the leading cached blocks; the last token is always left to compute (it gives logits)."""
        hits = []
        for h in hashes[: (len(seq) - 1) // self.block_size]:
            bid = self.block_of.get(h)
            if bid is None:
                break
            hits.append(bid)
        return hits

    def plan(self, seq: Sequence) -> tuple[int, int]:
        """(free blocks an allocation would use, tokens already cached) for a waiting sequence."""
        hashes = self._full_block_hashes(seq)
        hits = self._cached_prefix(seq, hashes)
        in_use = sum(1 for b in hits if self.ref_count[b] > 0)
        return seq.num_blocks_needed(self.block_size) - in_use, len(hits) * self.block_size

    def can_allocate(self, seq: Sequence) -> bool:
        return self.plan(seq)[0] <= self.num_free

    def allocate(self, seq: Sequence):
        assert not seq.block_table
        hashes = self._full_block_hashes(seq)
        hits = self._cached_prefix(seq, hashes)
        for bid in hits:
            if self.ref_count[bid] == 0:
                del self.free_cached[bid]
            self.ref_count[bid] += 1
        table = list(hits)
        for i in range(len(hits), seq.num_blocks_needed(self.block_size)):
            bid = self._take()
            if i < len(hashes):  # full block computed in this step: findable by sequences scheduled after it
                self._register(bid, hashes[i])
            table.append(bid)
        seq.block_table = table
        seq.block_hashes = hashes
        seq.num_cached_tokens = len(hits) * self.block_size

    def deallocate(self, seq: Sequence):
        for bid in reversed(seq.block_table):  # the tail is evicted before the shared head
            self._release(bid)
        seq.block_table = []
        seq.block_hashes = []
        seq.num_cached_tokens = 0

    def reset_prefix_cache(self):
        """Forget every cached prefix (the weights changed); only valid while no sequence holds blocks."""
        if any(self.ref_count):
            raise RuntimeError("reset_prefix_cache: sequences still hold blocks")
        self.reset()

    def reset(self):
        """Free every block and forget every cached prefix, whoever holds them (the caller drops all sequences)."""
        self.ref_count = [0] * self.num_blocks
        self.block_of.clear()
        self.hash_of = [None] * self.num_blocks
        self.free_cached.clear()
        self.free_plain = deque(range(self.num_blocks))

    def can_append(self, seq: Sequence) -> bool:
        return len(seq.block_table) >= seq.num_blocks_needed(self.block_size) or self.num_free >= 1

    def append_slot(self, seq: Sequence):
        """Make room for the K/V of the sequence's last token (called before a decode step)."""
        if len(seq.block_table) < seq.num_blocks_needed(self.block_size):
            seq.block_table.append(self._take())

    def register_full_blocks(self, seq: Sequence, num_computed: int):
        """After a step: hash blocks that became full of computed tokens so later prompts can reuse them."""
        bs = self.block_size
        while len(seq.block_hashes) < num_computed // bs:
            i = len(seq.block_hashes)
            prev = seq.block_hashes[-1] if seq.block_hashes else b""
            h = block_hash(prev, seq.token_ids[i * bs:(i + 1) * bs])
            seq.block_hashes.append(h)
            self._register(seq.block_table[i], h)
