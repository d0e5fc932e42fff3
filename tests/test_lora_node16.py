"""The augmented-weight LoRA node (reflectevo.model.lora_node16): its persistent [W | s B] buffers follow W and B,
and a graph's backward uses the B its forward saw."""
from __future__ import annotations

import gc

import torch

from reflectevo.model import lora_node16
from reflectevo.model.lora_node16 import augmented, lora_projections16


def _spec(seed=0, n=24, k=32, r=4):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    a = (torch.randn(r, k, generator=g) * 0.3).requires_grad_(True)
    b = (torch.randn(n, r, generator=g) * 0.3).requires_grad_(True)
    return w, a, b


def test_augmented_buffer_is_kept_refreshed_and_dropped_with_the_weight():
    w, _, b = _spec()
    bs = (b.detach() * 2).bfloat16()
    buf = augmented(w, torch.bfloat16, 40, 32, bs)
    assert buf.shape == (24, 40) and buf.dtype == torch.bfloat16
    assert torch.equal(buf[:, :32], w.bfloat16()) and torch.equal(buf[:, 32:36], bs) and not buf[:, 36:].any()
    assert augmented(w, torch.bfloat16, 40, 32, bs) is buf  # kept while W is unchanged
    bs2 = bs * 3
    assert torch.equal(augmented(w, torch.bfloat16, 40, 32, bs2)[:, 32:36], bs2)  # B columns rewritten each call
    with torch.no_grad():
        w.mul_(2)  # an in-place update of W: converted again
    buf2 = augmented(w, torch.bfloat16, 40, 32, bs)
    assert torch.equal(buf2[:, :32], w.bfloat16())
    before = len(lora_node16._BUFFERS)
    del w, buf, buf2
    gc.collect()
    assert len(lora_node16._BUFFERS) == before - 1


def test_backward_uses_the_adapter_its_forward_saw():
    """Two graphs through the same layer with B changed between them: each backward matches a fresh run with the B
    of its own forward, though the shared buffer holds the later B when the first backward runs."""
    w, a, b = _spec(1)
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(2))
    dy = torch.randn(5, 24, generator=torch.Generator().manual_seed(3)).bfloat16()

    def run(b_now, backward=True):
        xx = x.clone().requires_grad_(True)
        y = lora_projections16(xx, [(w, None, a, b_now, None, 2.0)], torch.bfloat16)[0]
        if backward:
            y.backward(dy)
        return y, xx

    b1 = b.detach().clone().requires_grad_(True)
    y1, x1 = run(b1, backward=False)
    b2 = (b.detach() * -1.5).requires_grad_(True)
    run(b2)  # rewrites the buffer's B columns
    y1.backward(dy)
    b_fresh = b.detach().clone().requires_grad_(True)
    a.grad = None
    _, x_fresh = run(b_fresh)
    assert torch.equal(x1.grad, x_fresh.grad)
    assert torch.equal(b1.grad, b_fresh.grad)


def test_rank_product_and_input_gradient_against_fp64():
    w, a, b = _spec(4)
    x = torch.randn(7, 32, generator=torch.Generator().manual_seed(5), requires_grad=True)
    dy = torch.randn(7, 24, generator=torch.Generator().manual_seed(6)).bfloat16()
    y = lora_projections16(x, [(w, None, a, b, None, 2.0)], torch.bfloat16)[0]
    y.backward(dy)
    x64, a64, b64 = (t.detach().double().requires_grad_(True) for t in (x, a, b))
    y64 = x64 @ w.double().T + 2.0 * (x64 @ a64.T) @ b64.T
    y64.backward(dy.double())
    for got, want in ((y, y64), (x.grad, x64.grad), (a.grad, a64.grad), (b.grad, b64.grad)):
        assert ((got.double() - want).norm() / want.norm()).item() < 1.5e-2


def test_adapter_gradients_without_an_input_gradient_are_the_same():
    """x without grad (a first layer's input) skips the base products of the backward; dA and dB unchanged."""
    specs = [_spec(7 + i, n=16 + 8 * i) for i in range(2)]
    x = torch.randn(6, 32, generator=torch.Generator().manual_seed(8))
    dys = [torch.randn(6, 16 + 8 * i, generator=torch.Generator().manual_seed(9 + i)).bfloat16() for i in range(2)]
    runs = []
    for need_dx in (True, False):
        for _, a, b in specs:
            a.grad = b.grad = None
        ys = lora_projections16(x.clone().requires_grad_(need_dx), [(w, None, a, b, None, 2.0) for w, a, b in specs],
                                torch.bfloat16)
        torch.autograd.backward(ys, dys)
        runs.append([t.grad.clone() for _, a, b in specs for t in (a, b)])
    for got, want in zip(*runs):  # du from its own small product or from the base product's extra columns: the
        # same sums, possibly blocked in another order, so equal to a bf16 rounding of du
        assert ((got - want).norm() / want.norm()).item() <= 2.0 ** -8
