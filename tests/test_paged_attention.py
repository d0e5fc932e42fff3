"""Paged decode attention: Triton kernel (interpreter on CPU) and the fast CPU path (planned, cascade, reused
buffers) vs the gather reference, and the reference itself vs attention computed one sequence at a time from
the unpaged K/V."""
import pytest
import torch

from reflectevo.kernels import kernel_backend
from reflectevo.kernels import paged_attention as pa
from reflectevo.kernels.paged_attention import (
    GatherBuffers,
    paged_attention_decode,
    paged_attention_decode_cpu,
    paged_attention_decode_reference,
    paged_attention_decode_torch,
    plan_decode,
    store_kv,
    store_kv_torch,
)


def _paged_problem(lens, Hq, Hkv, D, bs=16, num_blocks=40, shared_prefix_blocks=0, seed=0):
    """Random contexts written into randomly placed blocks; returns the dense K/V per sequence too."""
    g = torch.Generator().manual_seed(seed)
    kc = torch.randn(num_blocks, bs, Hkv, D, generator=g)
    vc = torch.randn(num_blocks, bs, Hkv, D, generator=g)
    perm = torch.randperm(num_blocks, generator=g).tolist()
    shared = [perm.pop() for _ in range(shared_prefix_blocks)]
    tables = []
    for L in lens:
        n = (L + bs - 1) // bs
        tables.append(shared + [perm.pop() for _ in range(n - len(shared))])
    width = max(len(t) for t in tables)
    bt = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    q = torch.randn(len(lens), Hq, D, generator=g)
    return q, kc, vc, bt, torch.tensor(lens, dtype=torch.int32)


def _dense(q, kc, vc, bt, lens, scale):
    Hq, Hkv = q.shape[1], kc.shape[2]
    outs = []
    for s, L in enumerate(lens.tolist()):
        k = kc[bt[s].long()].reshape(-1, Hkv, kc.shape[3])[:L].repeat_interleave(Hq // Hkv, dim=1)
        v = vc[bt[s].long()].reshape(-1, Hkv, kc.shape[3])[:L].repeat_interleave(Hq // Hkv, dim=1)
        w = torch.softmax(torch.einsum("hd,lhd->hl", q[s], k) * scale, dim=-1)
        outs.append(torch.einsum("hl,lhd->hd", w, v))
    return torch.stack(outs)


@pytest.mark.parametrize("Hq,Hkv,D", [(4, 4, 16), (6, 2, 32), (8, 1, 16)])
def test_reference_matches_dense(Hq, Hkv, D):
    q, kc, vc, bt, lens = _paged_problem([1, 17, 40, 33, 16], Hq, Hkv, D)
    ref = paged_attention_decode_reference(q, kc, vc, bt, lens, 0.25)
    torch.testing.assert_close(ref, _dense(q, kc, vc, bt, lens, 0.25), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("Hq,Hkv,D", [(4, 2, 16), (6, 2, 32)])
def test_triton_decode_matches_reference(splits, Hq, Hkv, D):
    q, kc, vc, bt, lens = _paged_problem([1, 17, 50, 33, 64], Hq, Hkv, D, seed=splits)
    ref = paged_attention_decode_reference(q, kc, vc, bt, lens, D ** -0.5)
    with kernel_backend("triton"):
        out = paged_attention_decode(q, kc, vc, bt, lens, D ** -0.5, num_splits=splits)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_triton_decode_bf16_cache():
    q, kc, vc, bt, lens = _paged_problem([5, 40, 23], 4, 2, 16, seed=7)
    q, kc, vc = q.bfloat16(), kc.bfloat16(), vc.bfloat16()
    ref = paged_attention_decode_reference(q, kc, vc, bt, lens, 0.25)
    with kernel_backend("triton"):
        out = paged_attention_decode(q, kc, vc, bt, lens, 0.25)
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)


def test_cascade_path_matches_reference():
    q, kc, vc, bt, lens = _paged_problem([40, 64, 35, 49], 6, 2, 16, shared_prefix_blocks=2, seed=3)
    ref = paged_attention_decode_reference(q, kc, vc, bt, lens, 0.3)
    for common in (0, 1, 2):
        out = paged_attention_decode_torch(q, kc, vc, bt, lens, 0.3, common_blocks=common)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("Hq,Hkv,D", [(4, 4, 16), (6, 2, 32), (9, 3, 64), (8, 1, 16)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cpu_path_matches_reference_random_tables(Hq, Hkv, D, seed):
    """Ragged lengths (1 token to several blocks, block boundaries), GQA, blocks scattered over the pool."""
    g = torch.Generator().manual_seed(100 + seed)
    lens = torch.randint(1, 120, (7,), generator=g).tolist() + [16, 32, 1]
    q, kc, vc, bt, lens_t = _paged_problem(lens, Hq, Hkv, D, num_blocks=120, seed=seed)
    ref = paged_attention_decode_reference(q, kc, vc, bt, lens_t, D ** -0.5)
    out = paged_attention_decode_cpu(q, kc, vc, plan_decode(bt, lens_t, 16), D ** -0.5, GatherBuffers())
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_cpu_path_cascade_keeps_a_token_after_the_shared_prefix():
    """A sequence whose context ends exactly at the shared blocks still has its last token in the rest."""
    q, kc, vc, bt, lens = _paged_problem([32, 47, 33], 6, 2, 16, shared_prefix_blocks=2, seed=5)
    plan = plan_decode(bt, lens, 16, common_blocks=2)
    assert plan.shared_blocks.tolist() == bt[0, :1].tolist()  # clamped to (32 - 1) // 16 = 1 block
    ref = paged_attention_decode_reference(q, kc, vc, bt, lens, 0.25)
    torch.testing.assert_close(paged_attention_decode_cpu(q, kc, vc, plan, 0.25), ref, rtol=1e-5, atol=1e-5)
    single = plan_decode(bt[:1], lens[:1], 16, common_blocks=2)  # a row left alone keeps the prefix it shared
    assert single.shared_blocks.tolist() == bt[0, :1].tolist()
    torch.testing.assert_close(paged_attention_decode_cpu(q[:1], kc, vc, single, 0.25),
                               paged_attention_decode_reference(q[:1], kc, vc, bt[:1], lens[:1], 0.25),
                               rtol=1e-5, atol=1e-5)
    assert plan_decode(bt[:1], lens[:1], 16).shared_blocks is None


def test_cpu_path_reuses_buffers_across_layers_and_steps():
    """One plan serves every layer; one GatherBuffers serves growing and shrinking steps."""
    buffers = GatherBuffers()
    for step, lens in enumerate(([20, 50, 3], [70, 90, 41, 17], [5, 6])):
        q, kc, vc, bt, lens_t = _paged_problem(lens, 4, 2, 16, num_blocks=60, seed=10 + step)
        plan = plan_decode(bt, lens_t, 16)
        for layer in range(2):
            k_layer, v_layer = kc * (layer + 1), vc - layer
            ref = paged_attention_decode_reference(q, k_layer, v_layer, bt, lens_t, 0.25)
            out = paged_attention_decode_cpu(q, k_layer, v_layer, plan, 0.25, buffers)
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert buffers.k.shape[0] >= 4 * 6  # grew for the largest step, kept afterwards


def _grouped_problem(groups, global_blocks, Hq=6, Hkv=2, D=16, bs=16, num_blocks=200, seed=0):
    """groups: [(blocks shared by the group, [context lengths of its rows])]; rows of a group share those blocks
    after ``global_blocks`` blocks that every row shares; the rest of each row is its own."""
    g = torch.Generator().manual_seed(seed)
    kc, vc = torch.randn(num_blocks, bs, Hkv, D, generator=g), torch.randn(num_blocks, bs, Hkv, D, generator=g)
    perm = torch.randperm(num_blocks, generator=g).tolist()
    common = [perm.pop() for _ in range(global_blocks)]
    tables, lens = [], []
    for shared_count, group_lens in groups:
        shared = [perm.pop() for _ in range(shared_count)]
        for L in group_lens:
            n = (L + bs - 1) // bs
            tables.append((common + shared + [perm.pop() for _ in range(n)])[:n])
            lens.append(L)
    width = max(len(t) for t in tables)
    bt = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    return torch.randn(len(lens), Hq, D, generator=g), kc, vc, bt, torch.tensor(lens, dtype=torch.int32)


@pytest.mark.parametrize("global_blocks", [0, 1])
def test_cpu_path_groups_of_samples_match_reference(global_blocks):
    """n samples of a prompt share its blocks: groups of 2 and 3, one shorter at a block boundary, a row alone."""
    groups = [(3, [70, 81]), (2, [48 + 16 * global_blocks, 60 + 16 * global_blocks, 90]), (0, [40]), (4, [99, 99])]
    q, kc, vc, bt, lens = _grouped_problem(groups, global_blocks, seed=global_blocks)
    plan = plan_decode(bt, lens, 16, common_blocks=global_blocks)
    assert plan.group_rows.shape[0] == 3 and (plan.shared_blocks is None) == (global_blocks == 0)
    assert plan.group_members.tolist() == [0, 1, 2, 3, 4, 6, 7]
    ref = paged_attention_decode_reference(q, kc, vc, bt, lens, 0.25)
    torch.testing.assert_close(paged_attention_decode_cpu(q, kc, vc, plan, 0.25, GatherBuffers()), ref,
                               rtol=1e-5, atol=1e-5)


def test_cpu_path_group_shared_part_leaves_the_last_token_out():
    q, kc, vc, bt, lens = _grouped_problem([(2, [32, 33]), (1, [16, 17])], 0, seed=4)
    plan = plan_decode(bt, lens, 16)
    # 32 tokens = 2 full blocks, but the last token must stay in the rest: the pair shares 1 block; the second
    # pair cannot share its single block with a 16-token row at all
    assert plan.group_rows.tolist() == [[0, 1]] and plan.group_mask.shape[-1] == 16
    ref = paged_attention_decode_reference(q, kc, vc, bt, lens, 0.25)
    torch.testing.assert_close(paged_attention_decode_cpu(q, kc, vc, plan, 0.25), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("budget", [1 << 30, 0])
def test_shared_parts_are_kept_across_steps_until_forgotten(budget, monkeypatch):
    """Decode steps reuse the gathered shared prefix and group parts (no index_select for them); a prefill step's
    forget_stable makes the next step read the blocks again; with no budget nothing is kept and results hold."""
    q, kc, vc, bt, lens = _grouped_problem([(3, [70, 81]), (2, [64, 90])], 1, seed=11)
    buffers = GatherBuffers(stable_budget=budget)
    plan = plan_decode(bt, lens, 16, common_blocks=1)
    ref = paged_attention_decode_reference(q, kc, vc, bt, lens, 0.25)
    gathered = []
    real = torch.index_select
    monkeypatch.setattr(torch, "index_select", lambda t, d, i, **kw: gathered.append(i.numel()) or real(t, d, i, **kw))
    monkeypatch.setattr(torch.Tensor, "index_select", lambda t, d, i: gathered.append(i.numel()) or real(t, d, i))
    first = paged_attention_decode_cpu(q, kc, vc, plan, 0.25, buffers)
    per_step = len(gathered)
    gathered.clear()
    second = paged_attention_decode_cpu(q, kc, vc, plan_decode(bt, lens, 16, common_blocks=1), 0.25, buffers)
    torch.testing.assert_close(first, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(second, ref, rtol=1e-5, atol=1e-5)
    if budget:
        assert len(gathered) == per_step - 4 and buffers.stable_bytes > 0  # shared + group K and V were kept
        shared = int(bt[0, 0])
        kc[shared] += 1.0  # stands for a block recycled by a prefill step
        buffers.forget_stable()
        fresh = paged_attention_decode_cpu(q, kc, vc, plan, 0.25, buffers)
        torch.testing.assert_close(fresh, paged_attention_decode_reference(q, kc, vc, bt, lens, 0.25),
                                   rtol=1e-5, atol=1e-5)
    else:
        assert len(gathered) == per_step and not buffers.stable


def test_cpu_path_bf16_and_matmul_fallback(monkeypatch):
    q, kc, vc, bt, lens = _paged_problem([5, 40, 23, 64], 6, 2, 16, shared_prefix_blocks=1, seed=8)
    ref = paged_attention_decode_reference(q, kc, vc, bt, lens, 0.25)
    plan = plan_decode(bt, lens, 16, common_blocks=1, dtype=torch.bfloat16)
    out = paged_attention_decode_cpu(q.bfloat16(), kc.bfloat16(), vc.bfloat16(), plan, 0.25)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=3e-2, atol=3e-2)
    monkeypatch.setattr(pa, "_flash_cpu", None)  # torch builds without the fused CPU entry point
    out = paged_attention_decode_cpu(q, kc, vc, plan_decode(bt, lens, 16, common_blocks=1), 0.25)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_store_kv_triton_matches_torch():
    g = torch.Generator().manual_seed(1)
    kc, vc = torch.zeros(6, 16, 2, 16), torch.zeros(6, 16, 2, 16)
    k, v = torch.randn(5, 2, 16, generator=g), torch.randn(5, 2, 16, generator=g)
    slots = torch.tensor([3, -1, 40, 41, 95])
    a, b = (kc.clone(), vc.clone()), (kc.clone(), vc.clone())
    store_kv_torch(k, v, *a, slots)
    with kernel_backend("triton"):
        store_kv(k, v, *b, slots)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    flat = a[0].view(-1, 2, 16)
    assert torch.equal(flat[40], k[2]) and torch.equal(flat[95], k[4]) and flat[1].abs().sum() == 0


def test_rejects_bad_gqa():
    q, kc, vc, bt, lens = _paged_problem([5], 3, 2, 16)
    with pytest.raises(ValueError, match="multiple"):
        paged_attention_decode(q, kc, vc, bt, lens, 0.25)


def test_prompt_groups_keep_each_prompt_apart():
    """With prompt lengths, groups are the rows whose prompts' full blocks are the same blocks (n samples of one
    prompt); a row alone forms no group, and rows of different prompts that merely start alike are not grouped."""
    q, kc, vc, bt, lens = _grouped_problem([(3, [70, 81]), (2, [64, 90]), (0, [40])], 1, seed=12)
    prompt = [64, 64, 48, 48, 33]  # each pair's prompt ends where its shared blocks end; the last row is alone
    plan = plan_decode(bt, lens, 16, common_blocks=1, prompt_lens=prompt)
    assert sorted(plan.group_rows[:, 0].tolist()) == [0, 2]
    assert plan.rest_start.tolist() == [4, 4, 3, 3, 1]  # the row alone keeps everything after the common block
    ref = paged_attention_decode_reference(q, kc, vc, bt, lens, 0.25)
    torch.testing.assert_close(paged_attention_decode_cpu(q, kc, vc, plan, 0.25, GatherBuffers()), ref,
                               rtol=1e-5, atol=1e-5)
    bt[1, 1] = bt[0, 1]  # rows 0-1 now share their first block only: different prompts, no group
    bt[1, 2:4] = torch.tensor([190, 191], dtype=bt.dtype)
    plan = plan_decode(bt, lens, 16, common_blocks=1, prompt_lens=[64, 64, 48, 48, 33])
    assert plan.group_rows[:, 0].tolist() == [2] and plan.rest_start.tolist() == [1, 1, 3, 3, 1]
    torch.testing.assert_close(paged_attention_decode_cpu(q, kc, vc, plan, 0.25, GatherBuffers()),
                               paged_attention_decode_reference(q, kc, vc, bt, lens, 0.25), rtol=1e-5, atol=1e-5)
