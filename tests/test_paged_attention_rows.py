"""CPU decode with each sequence's own context kept contiguous across steps (RowContexts) against the gather
reference, over simulated decode runs: contexts growing a token per step across block boundaries, sequences
leaving, sample groups, a prefill in between, an interrupted step, and a budget too small to keep anything."""
import random

import torch

from reflectevo.kernels.paged_attention import paged_attention_decode_cpu, paged_attention_decode_reference, \
    plan_decode
from reflectevo.kernels.paged_attention_rows import RowContexts, keep_contexts, length_buckets

BS, HQ, HKV, D, LAYERS = 16, 6, 2, 16, 2


class FakeRun:
    """Sequences in a paged cache of LAYERS layers: one common prefix, then per group a shared part, then each
    sequence's own tokens; ``grow`` writes one new token per sequence (a new block when the last is full)."""

    def __init__(self, groups, common_blocks=1, num_blocks=400, seed=0):
        self.g = torch.Generator().manual_seed(seed)
        self.kc = torch.randn(LAYERS, num_blocks, BS, HKV, D, generator=self.g)
        self.vc = torch.randn(LAYERS, num_blocks, BS, HKV, D, generator=self.g)
        self.free = list(range(num_blocks))
        random.Random(seed).shuffle(self.free)
        common = [self.free.pop() for _ in range(common_blocks)]
        self.tables, self.lens, self.keys = [], [], []
        for shared_blocks, lens in groups:
            shared = [self.free.pop() for _ in range(shared_blocks)]
            for L in lens:  # shared blocks are full blocks, as the prefix cache shares them
                assert L > (common_blocks + shared_blocks) * BS
                n = (L + BS - 1) // BS
                own = [self.free.pop() for _ in range(max(0, n - len(common) - len(shared)))]
                self.tables.append((common + shared + own)[:n])
                self.lens.append(L)
                self.keys.append(len(self.keys) + 100)

    def grow(self):
        for i, table in enumerate(self.tables):
            if self.lens[i] % BS == 0:
                table.append(self.free.pop())
            block, off = table[self.lens[i] // BS], self.lens[i] % BS
            self.kc[:, block, off] = torch.randn(LAYERS, HKV, D, generator=self.g)
            self.vc[:, block, off] = torch.randn(LAYERS, HKV, D, generator=self.g)
            self.lens[i] += 1

    def leave(self, i):
        for xs in (self.tables, self.lens, self.keys):
            del xs[i]

    def step(self, rows: RowContexts, layers=range(LAYERS), groups: RowContexts | None = None, prompt_lens=None):
        """One decode step through RowContexts (and the groups' kept parts when ``groups`` is given), checked
        against the reference in every layer it runs."""
        width = max(len(t) for t in self.tables)
        bt = torch.tensor([t + [0] * (width - len(t)) for t in self.tables], dtype=torch.int32)
        lens = torch.tensor(self.lens, dtype=torch.int32)
        same = (bt == bt[:1]).all(dim=0).to(torch.int32)
        common = min(int(same.cumprod(0).sum()), min(self.lens) // BS)
        plan = plan_decode(bt, lens, BS, common, prompt_lens=prompt_lens)
        if groups is None:
            plan.rows = rows.step(list(self.keys), [list(t) for t in self.tables], (plan.rest_start * BS).tolist(),
                                  list(self.lens), BS, LAYERS, HKV, D, torch.float32, "cpu")
        else:
            keep_contexts(plan, rows, groups, list(self.keys), [list(t) for t in self.tables], list(self.lens), BS,
                          LAYERS, HKV, D, torch.float32, "cpu")
            self.last_plan = plan
        q = torch.randn(len(self.lens), HQ, D, generator=self.g)
        for layer in layers:
            ref = paged_attention_decode_reference(q, self.kc[layer], self.vc[layer], bt, lens, 0.25)
            out = paged_attention_decode_cpu(q, self.kc[layer], self.vc[layer], plan, 0.25)
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        return plan.rows


def test_rows_match_reference_over_a_decode_run_with_leaving_sequences():
    run = FakeRun([(2, [50, 57]), (1, [40, 70, 33]), (0, [60])], seed=1)
    rows = RowContexts()
    assert run.step(rows) is not None
    for t in range(40):
        run.grow()
        if t in (5, 17, 18):
            run.leave([0, 3, 1][(5, 17, 18).index(t)])
        step = run.step(rows)
        assert step is not None
        if t not in (5, 17, 18):  # steady decode: only the token each sequence just added is copied in
            assert step.src.numel() == len(run.lens) and step.moves_from is None
    assert len(rows.slot_of) == len(run.lens) == 3


def test_first_step_copies_each_rest_once_and_slots_stay_dense_after_leaving():
    run = FakeRun([(0, [20, 35, 50, 18])], common_blocks=1, seed=2)
    rows = RowContexts()
    step = run.step(rows)
    rest = [n - BS for n in run.lens]  # every row's rest starts after the one common block
    assert step.src.numel() == sum(rest) and step.length == max(rest)
    run.grow()
    run.leave(1)
    step = run.step(rows)
    assert sorted(rows.slot_of.values()) == [0, 1, 2]  # the last slot moved into the hole
    assert step.moves_from.tolist() == [3] and step.moves_to.tolist() == [1]


def test_prefill_forget_interrupted_step_and_budget():
    run = FakeRun([(1, [36, 41]), (0, [25])], seed=3)
    rows = RowContexts()
    run.step(rows)
    run.grow()
    run.step(rows, layers=[0])  # the model call stopped after layer 0: layer 1 missed this step's token
    run.grow()
    step = run.step(rows)  # noticed: everything is sent again, results still match in both layers
    assert step.src.numel() > len(run.lens)
    storage = {key: entry[3].data_ptr() for key, entry in rows.layers.items()}
    rows.forget()  # what a prefill step does
    run.grow()
    step = run.step(rows)
    assert step.src.numel() > len(run.lens)
    assert {key: entry[3].data_ptr() for key, entry in rows.layers.items()} == storage  # re-viewed, not remapped
    assert RowContexts(budget_bytes=0).step([1], [[0, 1]], [0], [20], BS, LAYERS, HKV, D, torch.float32,
                                            "cpu") is None


def test_sequence_whose_rest_moves_is_sent_again():
    """When a group loses a member the other's rest starts earlier (its group part is gone): re-sent whole."""
    run = FakeRun([(2, [50, 55]), (0, [50])], common_blocks=1, seed=4)
    rows = RowContexts()
    before = run.step(rows)
    run.grow()
    run.leave(1)
    after = run.step(rows)
    start_before = rows.kept[run.keys[0]][0]
    assert start_before == BS  # rest now starts after the common block only
    assert after.src.numel() > len(run.lens) and before is not None


def test_group_parts_kept_across_steps_while_groups_come_and_go():
    """Sample groups' shared prompts kept contiguous (one slot per group) beside the rows' own parts: equal to the
    reference every step while groups lose members, dissolve into a row alone and leave."""
    run = FakeRun([(2, [50, 57]), (1, [40, 70, 33]), (3, [70, 66]), (0, [60])], seed=5)
    prompts = [48, 48, 32, 32, 32, 64, 64, 40]  # each group's prompt ends where its shared blocks end
    rows, groups = RowContexts(), RowContexts()
    run.step(rows, groups=groups, prompt_lens=prompts)
    assert run.last_plan.group_ctx.slots == 3 and run.last_plan.group_ctx.src.numel() == (2 + 1 + 3) * BS
    for t in range(30):
        run.grow()
        if t in (4, 9, 10, 20):
            i = [0, 2, 0, 3][(4, 9, 10, 20).index(t)]
            run.leave(i)
            del prompts[i]
        run.step(rows, groups=groups, prompt_lens=prompts)
        ctx = run.last_plan.group_ctx
        assert ctx.slots == len(run.last_plan.groups) == (3 if t < 4 else 2 if t < 20 else 1)
        if t in (0, 1, 2):  # steady groups: nothing copied into the group slots
            assert ctx.src is None and ctx.moves_from is None
    assert sorted(groups.slot_of.values()) == [0]  # the group left is compacted into slot 0


def test_length_buckets_minimise_padding_plus_calls():
    lengths = [90, 88, 85, 40, 38, 10]
    assert length_buckets(lengths, call_cost=10**6) == [(0, 6, 90)]  # calls dear: one padded range
    assert length_buckets(lengths, call_cost=0) == [(i, i + 1, n) for i, n in enumerate(lengths)]
    assert length_buckets(lengths, call_cost=60) == [(0, 3, 90), (3, 6, 40)]
    assert length_buckets([], call_cost=5) == []


def test_arrivals_take_slots_longest_first_and_buckets_match_reference():
    """Sequences arriving together get slots by decreasing rest; attention split into many buckets (every call
    free) still equals the reference over a run where sequences leave and the last slot fills the hole."""
    run = FakeRun([(0, [20, 75, 50, 33, 61])], common_blocks=1, seed=6)
    rows = RowContexts(bucket_call_cost=0)
    step = run.step(rows)
    assert [rows.slot_of[k] for k in run.keys] == [4, 0, 2, 3, 1]
    assert len(step.buckets) == 5 and step.buckets[0] == (0, 1, 75 - BS)
    for t in range(12):
        run.grow()
        if t == 3:
            run.leave(1)  # the longest leaves: the shortest moves into slot 0
        step = run.step(rows)
        covered = [i for a, b, _ in step.buckets for i in range(a, b)]
        assert covered == list(range(len(run.lens)))


def test_after_forget_a_new_shape_reuses_the_storage():
    """More slots of shorter rests after a prefill fit the old storage: re-viewed (stale but finite values past
    each rest are masked) and still equal to the reference."""
    first = FakeRun([(0, [150, 140])], seed=7)
    rows = RowContexts()
    first.step(rows)
    storage = {key: entry[3].data_ptr() for key, entry in rows.layers.items()}
    rows.forget()
    second = FakeRun([(0, [40, 35, 30, 45])], seed=8)
    second.kc, second.vc = first.kc, first.vc  # the same cache, so the same layer keys
    step = second.step(rows)
    assert step.slots == 4 and all(entry[0].shape[0] == 4 for entry in rows.layers.values())
    assert {key: entry[3].data_ptr() for key, entry in rows.layers.items()} == storage
