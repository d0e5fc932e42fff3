"""Fused linear log-prob / cross-entropy kernels and DPO loss against fp64 references (CPU; Triton interpreted)."""
import importlib
import math

import pytest
import torch
import torch.nn.functional as F

import contextlib

from reflectevo.kernels import kernel_backend
from reflectevo.kernels.dpo_loss import dpo_loss, sequence_logps
from reflectevo.kernels.linear_cross_entropy import linear_cross_entropy
from reflectevo.kernels.linear_logprobs import linear_logprobs, linear_logprobs_reference

# the package re-exports the function under the module's name, so reach the module through sys.modules
ll = importlib.import_module("reflectevo.kernels.linear_logprobs")
tiles_mod = importlib.import_module("reflectevo.kernels.linear_logprobs_tiles")
ce_mod = importlib.import_module("reflectevo.kernels.linear_cross_entropy")
# torch: row chunks, PyTorch row step; triton: row chunks, Triton row kernel; chunks16: the same with 16-bit
# logits for 16-bit inputs; tiles: the fully tiled kernels
BACKENDS = ["torch", "triton", "chunks16", "tiles"]


@contextlib.contextmanager
def backend_ctx(name):
    """Select one implementation; yields the keyword arguments the op calls take."""
    with kernel_backend("torch" if name == "torch" else "triton"):
        yield {"impl": name if name in ("tiles", "chunks16") else "auto"}


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    """Chunks of 8 rows, so every test crosses several chunks (and a ragged last one)."""
    monkeypatch.setattr(ll, "CHUNK_ROWS", 8)


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def make(n, h, v, dtype, scale=1.0, seed=0, ignore_every=4):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, h, generator=g, dtype=torch.float64) * scale).to(dtype)
    w = (torch.randn(v, h, generator=g, dtype=torch.float64) / math.sqrt(h)).to(dtype)
    labels = torch.randint(0, v, (n,), generator=g)
    if ignore_every:
        labels[::ignore_every] = -100
    return x, w, labels


def check_against_fp64(backend, x, w, labels, tol, train_head=True):
    up = torch.randn(labels.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    xr, wr = x.double().requires_grad_(), w.double().requires_grad_(train_head)
    ref = linear_logprobs_reference(xr, wr, labels)
    ref_grads = torch.autograd.grad((ref * up).sum(), [xr, wr] if train_head else [xr])
    xk, wk = x.clone().requires_grad_(), w.clone().requires_grad_(train_head)
    with backend_ctx(backend) as kw:
        out = linear_logprobs(xk, wk, labels, **kw)
        grads = torch.autograd.grad((out.double() * up).sum(), [xk, wk] if train_head else [xk])
    assert out.dtype == torch.float32 and out.shape == labels.shape
    assert torch.all(out[labels == -100] == 0)
    assert rel(out, ref) <= tol
    for got, want in zip(grads, ref_grads):
        assert got.dtype == x.dtype
        assert rel(got, want) <= tol


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n,h,v", [(64, 64, 300), (20, 48, 100), (1, 16, 33), (37, 40, 129)])
def test_fp32_matches_fp64(backend, n, h, v):
    x, w, labels = make(n, h, v, torch.float32, ignore_every=4 if n > 1 else 0)
    check_against_fp64(backend, x, w, labels, 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_matches_fp64_of_rounded_inputs(backend, dtype):
    x, w, labels = make(37, 40, 130, dtype)
    check_against_fp64(backend, x, w, labels, 2e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_chunks16_keeps_16bit_logits_with_g_in_place(dtype, monkeypatch):
    """impl="chunks16": every chunk's logits in the input dtype, G written over them, and log-probs, the
    cross-entropy and both gradients (trainable head) within 2e-2 of fp64 on the rounded inputs."""
    calls = []
    rows_triton = ll._rows_triton

    def spy(z, labels, row_weight, g_dtype):
        logp, g = rows_triton(z, labels, row_weight, g_dtype)
        calls.append((z.dtype, g is z))
        return logp, g

    monkeypatch.setattr(ll, "_rows_triton", spy)
    x, w, labels = make(37, 40, 130, dtype, seed=3)
    check_against_fp64("chunks16", x, w, labels, 2e-2)  # forward, then the trainable head's dW sweep
    assert len(calls) > 4 and set(calls) == {(dtype, True)}
    xr, wr = x.double().requires_grad_(), w.double().requires_grad_()
    ref = F.cross_entropy(xr @ wr.T, labels, ignore_index=-100)
    ref_grads = torch.autograd.grad(ref, [xr, wr])
    xk, wk = x.clone().requires_grad_(), w.clone().requires_grad_()
    with backend_ctx("chunks16") as kw:
        out = linear_cross_entropy(xk, wk, labels, **kw)
        grads = torch.autograd.grad(out, [xk, wk])
    assert rel(out, ref) <= 2e-2
    for got, want in zip(grads, ref_grads):
        assert got.dtype == dtype and rel(got, want) <= 2e-2


def spy_weight_grad_work(monkeypatch):
    """Records, for every chunk sweep or tiled backward, whether it was asked for dW."""
    calls = []
    for mod, name in ((ll, "chunked_pass"), (ce_mod, "chunked_pass"), (tiles_mod, "tiles_backward")):
        orig = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, _o=orig, **k: calls.append(a[6]) or _o(*a, **k))
    return calls


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_head_skips_weight_gradient(backend, monkeypatch):
    calls = spy_weight_grad_work(monkeypatch)
    x, w, labels = make(20, 32, 70, torch.float32)
    check_against_fp64(backend, x, w, labels, 1e-5, train_head=False)
    assert calls == [False]  # chunks: the forward sweep only (dH is elementwise); tiles: one backward, no dW
    xk = x.clone().requires_grad_()
    with backend_ctx(backend) as kw:
        linear_logprobs(xk, w, labels, **kw).sum().backward()
        linear_cross_entropy(xk, w, labels, **kw).backward()
    assert w.grad is None and xk.grad is not None
    assert True not in calls


@pytest.mark.parametrize("train_head", [False, True])
def test_cross_entropy_computes_gradients_in_one_sweep(train_head, monkeypatch):
    """mean/sum CE knows its row weights up front: one chunk sweep gives loss, dH and dW; per-token log-probs
    with a trainable head recompute once in the backward."""
    calls = spy_weight_grad_work(monkeypatch)
    x, w, labels = make(30, 32, 110, torch.float32, ignore_every=3)
    xk, wk = x.clone().requires_grad_(), w.clone().requires_grad_(train_head)
    linear_cross_entropy(xk, wk, labels, reduction="sum").backward()
    assert calls == [train_head]
    calls.clear()
    linear_logprobs(xk, wk, labels).sum().backward()
    assert calls == ([False, True] if train_head else [False])


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_output_element_is_written(backend, monkeypatch):
    poisoned = []

    def nan_empty(shape, dtype, device):
        t = torch.full(shape, float("nan"), dtype=dtype, device=device)
        poisoned.append(t)
        return t

    monkeypatch.setattr(ll, "_empty", nan_empty)
    monkeypatch.setattr(tiles_mod, "_empty", nan_empty)
    x, w, labels = make(21, 32, 150, torch.float32)  # 3 row chunks (ragged), several vocab splits on Triton
    xk = x.clone().requires_grad_()
    with backend_ctx(backend) as kw:
        out = linear_logprobs(xk, w, labels, **kw)
        out.sum().backward()
    assert poisoned and all(not torch.isnan(t).any() for t in poisoned)
    assert rel(out, linear_logprobs_reference(x.double(), w.double(), labels)) <= 1e-5
    assert torch.isfinite(xk.grad).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_extreme_logits_and_edge_labels(backend):
    """|logits| ~ 1e4: no overflow; log-probs within 1e-5 of fp64. An fp32 logit of 1e4 carries ~1e-3 absolute
    rounding, so softmax-based gradients cannot reach 1e-5: they must match fp64 as well as the plain fp32 PyTorch
    computation (full logits + log_softmax) does, within a factor 2."""
    x, w, labels = make(18, 16, 70, torch.float32, scale=3e3, ignore_every=0)
    labels[0], labels[1], labels[-1] = 0, 69, 69
    assert (x.double() @ w.double().T).abs().max() > 5e3
    up = torch.randn(18, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads = {}
    for name, dtype in (("fp64", torch.float64), ("fp32", torch.float32)):
        xr = x.to(dtype).requires_grad_()
        ref = linear_logprobs_reference(xr.to(dtype), w.to(dtype), labels) if dtype == torch.float64 else \
            torch.log_softmax(xr @ w.T, -1).gather(1, labels[:, None]).squeeze(1)
        (grads[name],) = torch.autograd.grad((ref.double() * up).sum(), xr)
        if name == "fp64":
            want = ref
    xk = x.clone().requires_grad_()
    with backend_ctx(backend) as kw:
        out = linear_logprobs(xk, w, labels, **kw)
        (got,) = torch.autograd.grad((out.double() * up).sum(), xk)
    assert torch.isfinite(out).all() and torch.isfinite(got).all()
    assert rel(out, want) <= 1e-5
    assert rel(got, grads["fp64"]) <= max(1e-5, 2 * rel(grads["fp32"], grads["fp64"]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_ignored_gives_zeros_and_no_nan(backend):
    x, w, _ = make(9, 16, 40, torch.float32)
    labels = torch.full((9,), -100)
    xk, wk = x.clone().requires_grad_(), w.clone().requires_grad_()
    with backend_ctx(backend) as kw:
        out = linear_logprobs(xk, wk, labels, **kw)
        ce = linear_cross_entropy(xk, wk, labels, **kw)
        (out.sum() + ce).backward()
    assert torch.equal(out, torch.zeros(9)) and ce.item() == 0.0
    assert torch.equal(xk.grad, torch.zeros_like(x)) and torch.equal(wk.grad, torch.zeros_like(w))


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_and_batched_inputs(backend):
    x, w, labels = make(24, 32, 90, torch.float32)
    x_nc = x.T.contiguous().T  # column-major [N, H]
    w_nc = torch.cat([w, w], dim=1)[:, ::2]  # stride 2 along H
    assert not x_nc.is_contiguous() and not w_nc.is_contiguous()
    check_against_fp64(backend, x_nc, w_nc, labels, 1e-5)
    with backend_ctx(backend) as kw:
        batched = linear_logprobs(x.reshape(4, 6, 32), w, labels.reshape(4, 6), **kw)
    assert batched.shape == (4, 6)
    assert rel(batched.reshape(-1), linear_logprobs_reference(x.double(), w.double(), labels)) <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_dtypes_promote(backend):
    x, w, labels = make(16, 32, 64, torch.float32)
    xb = x.bfloat16().requires_grad_()
    wf = w.clone().requires_grad_()
    with backend_ctx(backend) as kw:
        out = linear_logprobs(xb, wf, labels, **kw)
        out.sum().backward()
    ref = linear_logprobs_reference(xb.double(), w.double(), labels)
    assert rel(out, ref) <= 1e-5
    assert xb.grad.dtype == torch.bfloat16 and wf.grad.dtype == torch.float32


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_matches_torch(backend, reduction):
    x, w, labels = make(30, 32, 110, torch.float32, ignore_every=3)
    xr, wr = x.double().requires_grad_(), w.double().requires_grad_()
    ref = F.cross_entropy(xr @ wr.T, labels, ignore_index=-100, reduction=reduction)
    ref_grads = torch.autograd.grad(ref.sum(), [xr, wr])
    xk, wk = x.clone().requires_grad_(), w.clone().requires_grad_()
    with backend_ctx(backend) as kw:
        out = linear_cross_entropy(xk, wk, labels, reduction=reduction, **kw)
        grads = torch.autograd.grad(out.sum(), [xk, wk])
    assert out.shape == ref.shape
    assert rel(out, ref) <= 1e-5
    for got, want in zip(grads, ref_grads):
        assert rel(got, want) <= 1e-5


def test_bad_inputs_raise_clear_errors():
    x, w, labels = make(4, 8, 10, torch.float32)
    with pytest.raises(ValueError, match="labels"):
        linear_logprobs(x, w, torch.tensor([0, 1, 10, 2]))
    with pytest.raises(ValueError, match="hidden/weight"):
        linear_logprobs(x, w[:, :4], labels)
    with pytest.raises(ValueError, match="labels"):
        linear_logprobs(x, w, labels.float())
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(x, w, labels, reduction="avg")
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(*torch.zeros(4, 2), loss_type="kto")
    with pytest.raises(ValueError, match="seq_ids"):
        sequence_logps(torch.zeros(3), torch.tensor([0, 1, 2]), num_seqs=2)


# ---------------------------------------------------------------------------------------------------------------
# DPO
# ---------------------------------------------------------------------------------------------------------------
def trl_losses(pc, pr, rc, rr, beta, loss_type, ls):
    """TRL DPOTrainer.dpo_loss formulas, written out by hand per pair, in fp64."""
    out = []
    for a, b, c, d in zip(pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist()):
        logits = (a - b) - (c - d)
        logsig = lambda t: -math.log1p(math.exp(-t)) if t > 0 else t - math.log1p(math.exp(t))
        if loss_type == "sigmoid":
            out.append(-logsig(beta * logits) * (1 - ls) - logsig(-beta * logits) * ls)
        elif loss_type == "robust":
            out.append((-logsig(beta * logits) * (1 - ls) + logsig(-beta * logits) * ls) / (1 - 2 * ls))
        elif loss_type == "hinge":
            out.append(max(0.0, 1 - beta * logits))
        else:
            out.append((logits - 1 / (2 * beta)) ** 2)
    return sum(out) / len(out)


@pytest.mark.parametrize("loss_type,ls", [("sigmoid", 0.0), ("sigmoid", 0.1), ("robust", 0.2), ("hinge", 0.0),
                                          ("ipo", 0.0)])
def test_dpo_loss_and_metrics_match_trl_formulas(loss_type, ls):
    g = torch.Generator().manual_seed(3)
    pc, pr, rc, rr = (-torch.rand(7, generator=g, dtype=torch.float64) * 30 for _ in range(4))
    beta = 0.3
    pcg = pc.clone().requires_grad_()
    loss, metrics = dpo_loss(pcg, pr, rc, rr, beta=beta, loss_type=loss_type, label_smoothing=ls)
    assert loss.dim() == 0 and loss.item() == pytest.approx(trl_losses(pc, pr, rc, rr, beta, loss_type, ls),
                                                            rel=1e-5)
    loss.backward()
    assert pcg.grad is not None and torch.isfinite(pcg.grad).all()
    chosen, rejected = beta * (pc - rc), beta * (pr - rr)
    want = {"rewards/chosen": chosen.mean(), "rewards/rejected": rejected.mean(),
            "rewards/accuracies": (chosen > rejected).double().mean(), "rewards/margins": (chosen - rejected).mean(),
            "logps/chosen": pc.mean(), "logps/rejected": pr.mean()}
    assert set(metrics) == set(want)
    for k, v in want.items():
        assert metrics[k].dim() == 0 and not metrics[k].requires_grad
        assert metrics[k].item() == pytest.approx(v.item(), rel=1e-5, abs=1e-6)


def test_sequence_logps_sums_means_and_empty_sequences():
    logp = torch.tensor([-1.0, -2.0, -3.0, -4.0, 0.0, -5.0], requires_grad=True)
    ids = torch.tensor([0, 0, -1, 2, 2, 2])
    valid = torch.tensor([True, True, True, True, False, True])
    sums = sequence_logps(logp, ids, 3, valid=valid)
    assert torch.equal(sums, torch.tensor([-3.0, 0.0, -9.0]))
    means = sequence_logps(logp, ids, 3, average=True, valid=valid)
    assert torch.equal(means, torch.tensor([-1.5, 0.0, -4.5]))
    means.sum().backward()
    assert torch.equal(logp.grad, torch.tensor([0.5, 0.5, 0.0, 0.5, 0.0, 0.5]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_dpo_single_pass_matches_naive(backend):
    """hidden of 2 chosen + 2 rejected packed sequences -> loss; the second chosen answer has no valid token."""
    n, h, v = 40, 32, 96
    x, w, labels = make(n, h, v, torch.float32, ignore_every=0, seed=5)
    seq_ids = torch.tensor([0] * 10 + [1] * 8 + [2] * 12 + [3] * 10)
    labels[:3] = -100
    labels[10:18] = -100  # sequence 1 (a chosen answer) entirely ignored
    valid = labels != -100
    ref_logps = -torch.rand(4, dtype=torch.float64) * 50
    for average, loss_type in ((False, "sigmoid"), (True, "ipo")):
        xr = x.double().requires_grad_()
        naive_tok = torch.log_softmax(xr @ w.double().T, -1).gather(1, labels.clamp(min=0)[:, None]).squeeze(1)
        seq = sequence_logps(naive_tok, seq_ids, 4, average=average, valid=valid)
        want, _ = dpo_loss(seq[:2], seq[2:], ref_logps[:2], ref_logps[2:], loss_type=loss_type)
        (want_grad,) = torch.autograd.grad(want, xr)
        xk = x.clone().requires_grad_()
        with backend_ctx(backend) as kw:
            tok = linear_logprobs(xk, w, labels, **kw)
            seq_k = sequence_logps(tok, seq_ids, 4, average=average, valid=valid)
            loss, metrics = dpo_loss(seq_k[:2], seq_k[2:], ref_logps[:2], ref_logps[2:], loss_type=loss_type)
            loss.backward()
        assert seq_k[1].item() == 0.0 and torch.isfinite(loss) and torch.isfinite(xk.grad).all()
        assert loss.item() == pytest.approx(want.item(), rel=1e-5)
        assert rel(xk.grad, want_grad) <= 1e-5
        assert all(torch.isfinite(m) for m in metrics.values())


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_grad_forward_and_hidden_only_weight_grad(backend):
    """Reference-model forward under no_grad, and a head-only gradient (hidden frozen)."""
    x, w, labels = make(19, 24, 77, torch.float32)
    want = linear_logprobs_reference(x.double(), w.double(), labels)
    with backend_ctx(backend) as kw, torch.no_grad():
        out = linear_logprobs(x.requires_grad_(), w, labels, **kw)
    assert not out.requires_grad and rel(out, want) <= 1e-5
    x = x.detach()
    wr = w.double().requires_grad_()
    (want_gw,) = torch.autograd.grad(linear_logprobs_reference(x.double(), wr, labels).sum(), wr)
    wk = w.clone().requires_grad_()
    with backend_ctx(backend) as kw:
        linear_logprobs(x, wk, labels, **kw).sum().backward()
    assert rel(wk.grad, want_gw) <= 1e-5


def test_cross_entropy_second_backward_is_a_clear_error():
    x, w, labels = make(12, 16, 40, torch.float32)
    xk = x.clone().requires_grad_()
    loss = linear_cross_entropy(xk, w, labels)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="twice"):
        loss.backward()
