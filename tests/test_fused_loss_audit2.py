"""Edge cases of the fused loss ops (second audit): empty batches, V = 1 / V = 0, other ignore indices, label
checks, repeated calls, and the argument checks of dpo_loss / sequence_logps. Tiny shapes; every backend of
test_fused_loss.py (PyTorch chunks, Triton row kernel, chunks16, tiles; Triton interpreted on a CPU)."""
import importlib
import math

import pytest
import torch
import torch.nn.functional as F

from reflectevo.kernels.dpo_loss import dpo_loss, sequence_logps
from reflectevo.kernels.linear_cross_entropy import linear_cross_entropy
from reflectevo.kernels.linear_logprobs import linear_logprobs
from test_fused_loss import BACKENDS, backend_ctx, make, rel

ll = importlib.import_module("reflectevo.kernels.linear_logprobs")


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr(ll, "CHUNK_ROWS", 2)


def fp64_logprobs(x, w, labels, ignore_index):
    valid = labels != ignore_index
    lp = torch.log_softmax(x.double() @ w.double().T, -1).gather(1, torch.where(valid, labels, 0)[:, None])
    return torch.where(valid, lp.squeeze(1), 0.0)


@pytest.mark.parametrize("backend", ["torch", "tiles"])
@pytest.mark.parametrize("hidden_grad", [False, True])
def test_empty_batch_is_differentiable_in_a_trainable_head(backend, hidden_grad):
    """N = 0: the full-logits reference gives zero gradients to every input that requires grad; a head-only
    gradient (frozen hidden) used to fail in backward ("does not require grad"), and w.grad stayed None."""
    w = torch.randn(7, 12, requires_grad=True)
    x = torch.randn(0, 12, requires_grad=hidden_grad)
    labels = torch.zeros(0, dtype=torch.long)
    with backend_ctx(backend) as kw:
        out = linear_logprobs(x, w, labels, **kw)
        losses = [linear_cross_entropy(x, w, labels, reduction=r, **kw) for r in ("mean", "sum", "none")]
    assert out.shape == (0,) and out.dtype == torch.float32 and out.requires_grad
    total = out.sum() + sum(loss.sum() for loss in losses)
    assert all(loss.dtype == torch.float32 for loss in losses) and losses[0].item() == losses[1].item() == 0.0
    total.backward()
    assert torch.equal(w.grad, torch.zeros_like(w))
    assert (x.grad is not None) == hidden_grad
    frozen_w = torch.randn(7, 12)
    with backend_ctx(backend) as kw:
        assert not linear_logprobs(torch.randn(0, 12), frozen_w, labels, **kw).requires_grad


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_vocabulary_is_a_clear_error(backend):
    """V = 0 (only ignored labels can pass the range check) used to end in a ZeroDivisionError."""
    x, labels = torch.randn(3, 8), torch.full((3,), -100)
    with backend_ctx(backend) as kw:
        for fn in (linear_logprobs, linear_cross_entropy):
            with pytest.raises(ValueError, match="weight"):
                fn(x, torch.randn(0, 8), labels, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_other_ignore_index_vocabulary_one_and_ragged_shapes(backend):
    """ignore_index=-1 with 0 and V-1 as real labels; V = 1; H not a multiple of 16; transposed / strided
    views; logp and CE (mean, sum) with both gradients against fp64."""
    g = torch.Generator().manual_seed(7)
    for v, labels in ((23, torch.tensor([0, 22, -1, 5, 0])), (1, torch.tensor([0, -1, 0, 0, -1]))):
        x = torch.randn(13, 5, generator=g).T  # [5, 13], column-major
        w = torch.randn(13, 2 * v, generator=g).T[::2] / 3  # [v, 13], strided
        up = torch.randn(5, generator=g, dtype=torch.float64)
        xr, wr = x.double().requires_grad_(), w.double().requires_grad_()
        ref = fp64_logprobs(xr, wr, labels, -1)
        want = torch.autograd.grad((ref * up).sum(), [xr, wr])
        xk, wk = x.clone().requires_grad_(), w.clone().requires_grad_()
        with backend_ctx(backend) as kw:
            out = linear_logprobs(xk, wk, labels, ignore_index=-1, **kw)
            got = torch.autograd.grad((out.double() * up).sum(), [xk, wk])
            assert rel(out, ref) <= 1e-5 and torch.all(out[labels == -1] == 0)
            for a, b in zip(got, want):
                assert (a.double() - b).abs().max() <= 1e-5 * max(1.0, b.abs().max().item())
            for reduction in ("mean", "sum"):
                ce = linear_cross_entropy(xk, wk, labels, ignore_index=-1, reduction=reduction, **kw)
                ce_ref = F.cross_entropy(xr @ wr.T, labels, ignore_index=-1, reduction=reduction)
                got = torch.autograd.grad(ce, [xk, wk])
                want_ce = torch.autograd.grad(ce_ref, [xr, wr])
                assert abs(ce.item() - ce_ref.item()) <= 1e-5 * max(1.0, abs(ce_ref.item()))
                for a, b in zip(got, want_ce):
                    assert (a.double() - b).abs().max() <= 1e-5 * max(1.0, b.abs().max().item())


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_label_ignored_with_sum_and_a_custom_ignore_index(backend):
    x, w, _ = make(5, 16, 9, torch.float32)
    labels = torch.full((5,), 3)  # ignore_index=3: a valid column, every token ignored
    xk, wk = x.clone().requires_grad_(), w.clone().requires_grad_()
    with backend_ctx(backend) as kw:
        out = linear_logprobs(xk, wk, labels, ignore_index=3, **kw)
        ce = linear_cross_entropy(xk, wk, labels, ignore_index=3, reduction="sum", **kw)
        (out.sum() + ce).backward()
    assert torch.equal(out, torch.zeros(5)) and ce.item() == 0.0
    assert torch.equal(xk.grad, torch.zeros_like(x)) and torch.equal(wk.grad, torch.zeros_like(w))


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_of_range_labels_raise_before_any_kernel(backend):
    x, w, _ = make(3, 8, 6, torch.float32)
    cases = [(torch.tensor([0, -2, 1]), -100), (torch.tensor([0, 6, 1]), -100), (torch.tensor([0, -100, 1]), 0),
             (torch.tensor([5, -1, 6]), -1)]
    with backend_ctx(backend) as kw:
        for labels, ignore_index in cases:
            for fn in (linear_logprobs, linear_cross_entropy):
                with pytest.raises(ValueError, match=r"labels: values must lie in \[0, 6\)") as info:
                    fn(x, w, labels, ignore_index=ignore_index, **kw)
                assert "\n" not in str(info.value)


@pytest.mark.parametrize("backend", BACKENDS)
def test_repeated_calls_and_backward_are_identical(backend):
    """The Function keeps no state between calls: two calls, and two backwards of one graph, agree exactly."""
    x, w, labels = make(6, 16, 11, torch.float32, ignore_every=3)
    xk, wk = x.clone().requires_grad_(), w.clone().requires_grad_()
    with backend_ctx(backend) as kw:
        a, b = (linear_logprobs(xk, wk, labels, **kw) for _ in range(2))
        ga = torch.autograd.grad(a.sum(), [xk, wk], retain_graph=True)
        ga2 = torch.autograd.grad(a.sum(), [xk, wk])
        gb = torch.autograd.grad(b.sum(), [xk, wk])
    assert torch.equal(a, b)
    if backend != "tiles":  # the tiled backward's fp32 atomics may differ in the last bits
        assert all(torch.equal(p, q) and torch.equal(p, r) for p, q, r in zip(ga, ga2, gb))
    assert all(rel(p, q) <= 1e-6 for p, q in zip(ga, gb))


def test_dpo_argument_checks_and_dtypes():
    pc, pr, rc, rr = (torch.tensor([-1.0, -2.0, -4.0]) * k for k in (1, 2, 1.5, 1.2))
    for beta in (0.0, -0.1, math.nan, math.inf):
        with pytest.raises(ValueError, match="beta"):
            dpo_loss(pc, pr, rc, rr, beta=beta)
    for ls in (-0.1, 0.5, 0.7):
        with pytest.raises(ValueError, match="label_smoothing"):
            dpo_loss(pc, pr, rc, rr, label_smoothing=ls)
    with pytest.raises(ValueError, match="same shape"):
        dpo_loss(pc, pr, rc, rr[:2])
    pcb = pc.bfloat16().requires_grad_()
    loss, metrics = dpo_loss(pcb, pr.bfloat16(), rc.bfloat16(), rr.bfloat16(), beta=0.5)
    assert loss.dtype == torch.float32 and loss.requires_grad
    assert all(m.dtype == torch.float32 and m.dim() == 0 and not m.requires_grad for m in metrics.values())
    loss.backward()
    assert pcb.grad.dtype == torch.bfloat16


def test_sequence_logps_without_sequences():
    """num_seqs = 0 with every token outside a sequence (seq id -1) used to fail inside index_add."""
    logp = torch.tensor([-1.0, -2.0], requires_grad=True)
    for average in (False, True):
        out = sequence_logps(logp, torch.tensor([-1, -1]), 0, average=average)
        assert out.shape == (0,) and out.dtype == torch.float32
    with pytest.raises(ValueError, match="seq_ids"):
        sequence_logps(logp, torch.tensor([0, -1]), 0)
