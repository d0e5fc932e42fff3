"""The CPU head's bf16 products (bf16 inputs, or fp32 ones under bf16 CPU autocast): fp32 logits of the rounded
operands, dH from bf16 G and W, the oneDNN setting restored, the head's bf16 copy cached only while valid."""
import gc
import importlib
import math

import pytest
import torch
import torch.nn.functional as F

from reflectevo.kernels import frozen_cast as fc
from reflectevo.kernels.linear_cross_entropy import linear_cross_entropy
from reflectevo.kernels.linear_logprobs import cpu_bf16_products, linear_logprobs, linear_logprobs_reference

ll = importlib.import_module("reflectevo.kernels.linear_logprobs")

pytestmark = pytest.mark.skipif(not ll._ONEDNN_BF16, reason="this CPU's oneDNN has no bf16 matmuls")


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr(ll, "CHUNK_ROWS", 16)


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def make(n=53, h=96, v=700, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, h, generator=g) * 2
    w = torch.randn(v, h, generator=g) / math.sqrt(h) * 4
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::5] = -100
    return x, w, labels


def rounded(t):
    return t.bfloat16().double()


def autocast(on=True, dtype=torch.bfloat16):
    return torch.autocast("cpu", dtype=dtype, enabled=on)


def test_which_calls_take_bf16_products():
    x = torch.randn(4, 8)
    assert not cpu_bf16_products(x)
    assert cpu_bf16_products(x.bfloat16())
    assert not cpu_bf16_products(x.half())
    with autocast():
        assert cpu_bf16_products(x)
    with autocast(dtype=torch.float16):
        assert not cpu_bf16_products(x)
    torch._C._set_mkldnn_enabled(False)  # (torch.backends.mkldnn.flags would also touch its TF32 switch)
    try:
        assert not cpu_bf16_products(x.bfloat16())
    finally:
        torch._C._set_mkldnn_enabled(True)


def test_autocast_logprobs_are_fp32_logits_of_the_rounded_operands():
    """Under bf16 autocast the log-probs equal fp64 log-probs of the bf16-rounded x and W to fp32 accuracy (the
    logits are not rounded to bf16), while differing from the unrounded inputs' by bf16 rounding."""
    x, w, labels = make()
    with autocast():
        got = linear_logprobs(x, w, labels)
    assert got.dtype == torch.float32
    exact_rounded = linear_logprobs_reference(rounded(x), rounded(w), labels)
    exact = linear_logprobs_reference(x.double(), w.double(), labels)
    assert rel(got, exact_rounded) < 1e-5
    assert rel(got, exact) > 1e-4
    with torch.no_grad(), autocast():  # the no-grad forward (DPO reference log-probs) takes the same products
        assert torch.equal(linear_logprobs(x, w, labels), got.detach())


@pytest.mark.parametrize("train_head", [False, True])
def test_autocast_gradients_against_fp64_of_rounded_operands(train_head):
    x, w, labels = make(seed=1)
    up = torch.randn(labels.shape, generator=torch.Generator().manual_seed(2))
    xr, wr = rounded(x).requires_grad_(), rounded(w).requires_grad_(train_head)
    ref = linear_logprobs_reference(xr, wr, labels)
    want = torch.autograd.grad((ref * up.double()).sum(), [xr, wr] if train_head else [xr])
    xk, wk = x.clone().requires_grad_(), w.clone().requires_grad_(train_head)
    with autocast():
        out = linear_logprobs(xk, wk, labels)
    got = torch.autograd.grad((out * up).sum(), [xk, wk] if train_head else [xk])  # backward outside autocast
    for g, ref_g in zip(got, want):
        assert g.dtype == torch.float32
        assert rel(g, ref_g) < 1e-2  # G (and W for dH) rounded to bf16: ~2^-9 per element


def test_autocast_cross_entropy_and_bf16_inputs():
    x, w, labels = make(seed=3)
    xr = rounded(x).requires_grad_()
    ref = F.cross_entropy(xr @ rounded(w).T, labels, ignore_index=-100)
    (ref_dx,) = torch.autograd.grad(ref, [xr])
    xk = x.clone().requires_grad_()
    with autocast():
        loss = linear_cross_entropy(xk, w, labels)
    loss.backward()
    assert abs(loss.item() - ref.item()) < 1e-5 * abs(ref.item())
    assert rel(xk.grad, ref_dx) < 1e-2
    xb = x.bfloat16().requires_grad_()  # bf16 tensors: the same products without autocast
    loss16 = linear_cross_entropy(xb, w.bfloat16(), labels)
    loss16.backward()
    assert abs(loss16.item() - ref.item()) < 1e-5 * abs(ref.item())
    assert xb.grad.dtype == torch.bfloat16 and rel(xb.grad, ref_dx) < 1e-2


def test_fp32_without_autocast_stays_exact():
    x, w, labels = make(seed=4)
    got = linear_logprobs(x, w, labels)
    assert rel(got, linear_logprobs_reference(x.double(), w.double(), labels)) < 1e-6


def test_onednn_setting_is_restored_even_on_error(monkeypatch):
    flags = torch.backends.mkldnn.matmul
    before = flags.fp32_precision
    x, w, labels = make(seed=5)
    seen = []
    rows = ll._rows_torch

    def spy(z, lab, rw):
        seen.append(flags.fp32_precision)
        return rows(z, lab, rw)

    monkeypatch.setattr(ll, "_rows_torch", spy)
    with autocast():
        linear_logprobs(x, w, labels)
    assert set(seen) == {"bf16"} and flags.fp32_precision == before

    def boom(*a):
        raise RuntimeError("row step failed")

    monkeypatch.setattr(ll, "_rows_torch", boom)
    with autocast(), pytest.raises(RuntimeError, match="row step failed"):
        linear_logprobs(x, w, labels)
    assert flags.fp32_precision == before
    torch.get_float32_matmul_precision()  # the legacy API still reads a consistent setting


def test_head_bf16_copy_is_reused_refreshed_and_dropped():
    x, w, labels = make(seed=6)
    xk = x.clone().requires_grad_()
    with autocast():
        linear_cross_entropy(xk, w, labels).backward()
    first = fc._COPIES[(id(w), torch.bfloat16)][3]
    assert torch.equal(first, w.bfloat16())
    with autocast():
        linear_cross_entropy(xk, w, labels).backward()
    assert fc._COPIES[(id(w), torch.bfloat16)][3] is first  # unchanged weight: no new conversion
    with torch.no_grad():
        w.mul_(-1.0)  # an in-place update (an optimizer step on a trained head) must not be served stale
    xk.grad = None
    with autocast():
        linear_cross_entropy(xk, w, labels).backward()
    xr = rounded(x).requires_grad_()
    F.cross_entropy(xr @ rounded(w).T, labels, ignore_index=-100).backward()
    assert rel(xk.grad, xr.grad) < 1e-2
    assert torch.equal(fc._COPIES[(id(w), torch.bfloat16)][3], w.bfloat16())
    key = (id(w), torch.bfloat16)
    del w
    gc.collect()
    assert key not in fc._COPIES
