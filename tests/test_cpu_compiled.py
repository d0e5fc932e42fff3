"""The compiled CPU loops (kernels/cpu_compiled.py) against the eager CPU paths they stand in for and fp64,
gradients included; the switch, the nodes' choice carried into backward, the fallback when compiling fails,
and the trainer's default."""
from __future__ import annotations

import importlib

import pytest
import torch

from reflectevo.kernels import cpu_compiled, kernel_backend
from reflectevo.kernels.rmsnorm import rms_norm
from reflectevo.kernels.rope import apply_rope, apply_rope_reference, rope_cos_sin
from reflectevo.kernels.swiglu import swiglu
from reflectevo.trainer.config import TrainConfig

loop = importlib.import_module("reflectevo.trainer.loop")
STEP = {torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}  # one rounding step relative to the value


def run(fn, inputs, upstream, compiled: bool):
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    with kernel_backend("torch"), cpu_compiled.compiled_cpu_kernels(compiled):
        out = fn(*leaves)
    outs = out if isinstance(out, tuple) else (out,)
    torch.autograd.backward(outs, upstream)  # outside the block: the nodes keep their forward's choice
    return [o.detach() for o in outs] + [leaf.grad for leaf in leaves]


def close_16bit(got, want, max_fraction=0.01):
    """Equal, except a few elements one 16-bit rounding step apart (an fp32 value on a rounding boundary)."""
    assert got.dtype == want.dtype and got.shape == want.shape
    diff = (got.double() - want.double()).abs()
    step = want.double().abs().clamp(min=1e-3) * STEP[want.dtype]
    assert bool((diff <= step * 1.01).all())
    assert (diff > 0).double().mean().item() <= max_fraction


@pytest.fixture
def spies(monkeypatch):
    """Counts the calls of each compiled loop."""
    calls = {}
    for name in ("rmsnorm_cast_fwd", "rmsnorm_cast_bwd", "rotate", "swiglu16_fwd", "swiglu16_bwd"):
        orig = getattr(cpu_compiled, name)

        def spy(*a, _o=orig, _n=name):
            calls[_n] = calls.get(_n, 0) + 1
            return _o(*a)

        monkeypatch.setattr(cpu_compiled, name, spy)
    return calls


@pytest.mark.parametrize("rows,hidden", [(37, 40), (3, 64), (130, 576)])
def test_rmsnorm_to_16bit_matches_eager_and_fp64(rows, hidden, spies):
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, hidden, generator=g) * 3
    w = torch.rand(hidden, generator=g) + 0.5
    up = torch.randn(rows, hidden, generator=g).bfloat16()
    fn = lambda a: rms_norm(a, w, 1e-5, out_dtype=torch.bfloat16)  # noqa: E731
    y_c, dx_c = run(fn, [x], [up], True)
    assert spies == {"rmsnorm_cast_fwd": 1, "rmsnorm_cast_bwd": 1}
    y_e, dx_e = run(fn, [x], [up], False)
    close_16bit(y_c, y_e)
    torch.testing.assert_close(dx_c, dx_e, rtol=1e-5, atol=1e-6)
    xd = x.double().requires_grad_()
    yd = xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-5) * w.double()
    yd.backward(up.double())
    torch.testing.assert_close(dx_c.double(), xd.grad, rtol=1e-5, atol=1e-6)
    assert ((y_c.double() - yd.detach()).abs() <= yd.detach().abs() * 2.0 ** -8 + 1e-30).all()


def test_rmsnorm_with_a_trained_weight_takes_the_eager_backward(spies):
    x, w = torch.randn(5, 16), torch.rand(16).requires_grad_()
    with cpu_compiled.compiled_cpu_kernels():
        y = rms_norm(x.requires_grad_(), w, 1e-6, out_dtype=torch.bfloat16)
    y.float().sum().backward()
    assert spies == {"rmsnorm_cast_fwd": 1} and w.grad is not None and x.grad is not None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("b,t,hq,hk,d", [(1, 29, 9, 3, 64), (2, 7, 4, 2, 16)])
def test_rope_matches_eager_and_fp64(dtype, b, t, hq, hk, d, spies):
    g = torch.Generator().manual_seed(t + d)
    q = torch.randn(b, t, hq, d, generator=g, dtype=torch.float64).to(dtype)
    k = torch.randn(b, t, hk, d, generator=g, dtype=torch.float64).to(dtype)
    pos = torch.stack([torch.arange(t) + 3 * i for i in range(b)])
    table = torch.float64 if dtype == torch.float64 else torch.float32
    cos, sin = rope_cos_sin(pos, d, 10000.0, None, dtype=table)
    ups = [torch.randn(q.shape, generator=g).to(dtype), torch.randn(k.shape, generator=g).to(dtype)]
    fn = lambda a, c: apply_rope(a, c, cos, sin)  # noqa: E731
    got = run(fn, [q, k], ups, True)
    assert spies == {"rotate": 4}  # q and k, forward and backward
    want = run(fn, [q, k], ups, False)
    ref = run(lambda a, c: apply_rope_reference(a, c, cos, sin), [q.double(), k.double()],
              [u.double() for u in ups], False)
    for c, e, r in zip(got, want, ref):
        if dtype in (torch.bfloat16, torch.float16):
            close_16bit(c, e)
        else:
            tol = 1e-6 if dtype == torch.float32 else 1e-13
            torch.testing.assert_close(c, e, rtol=tol, atol=tol)
            torch.testing.assert_close(c.double(), r, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 45, 96), (300, 1536)])
def test_swiglu_16bit_matches_eager_and_fp64(dtype, shape, spies):
    g = torch.Generator().manual_seed(shape[-1])
    gate = (torch.randn(shape, generator=g) * 3).to(dtype)
    up = torch.randn(shape, generator=g).to(dtype)
    dy = torch.randn(shape, generator=g).to(dtype)
    got = run(swiglu, [gate, up], [dy], True)
    assert spies == {"swiglu16_fwd": 1, "swiglu16_bwd": 1}
    want = run(swiglu, [gate, up], [dy], False)
    for c, e in zip(got, want):
        close_16bit(c, e)
    gd, ud = gate.double().requires_grad_(), up.double().requires_grad_()
    (torch.nn.functional.silu(gd) * ud).backward(dy.double())
    eps = 2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -10
    for c, r in zip(got[1:], (gd.grad, ud.grad)):
        assert ((c.double() - r).abs() <= r.abs() * 3 * eps + 1e-2 * eps).all()


def test_switch_scope_and_device():
    x = torch.zeros(2)
    assert not cpu_compiled.active(x)
    with cpu_compiled.compiled_cpu_kernels():
        assert cpu_compiled.active(x)
        with cpu_compiled.compiled_cpu_kernels(False):
            assert not cpu_compiled.active(x)
        assert cpu_compiled.active(x) and not cpu_compiled.active(torch.zeros(2, device="meta"))
    assert not cpu_compiled.active(x)


def test_a_failed_compile_warns_once_and_serves_the_eager_formula(monkeypatch, capsys):
    monkeypatch.setitem(cpu_compiled._STATE, "failed", None)
    fresh = cpu_compiled._Compiled(cpu_compiled._swiglu16_fwd)

    def broken(*a, **k):
        raise RuntimeError("no C++ compiler here\nsecond line")

    monkeypatch.setattr(torch, "compile", broken)
    gate, up = torch.randn(4, 8).bfloat16(), torch.randn(4, 8).bfloat16()
    out = fresh(gate, up)
    assert torch.equal(out, cpu_compiled._swiglu16_fwd(gate, up))
    assert cpu_compiled._STATE["failed"] == "RuntimeError: no C++ compiler here"
    fresh(gate, up)  # no second attempt, no second warning
    err = capsys.readouterr().err.splitlines()
    assert err == ["[reflectevo] warning: compiling the CPU elementwise kernels failed (RuntimeError: no C++ "
                   "compiler here); the eager PyTorch paths run instead"]
    with cpu_compiled.compiled_cpu_kernels():
        assert not cpu_compiled.active(gate)  # the nodes go back to their eager paths
    with pytest.raises(RuntimeError, match="size of tensor"):  # a caller's error is still raised, by the eager formula
        cpu_compiled._Compiled(cpu_compiled._swiglu16_fwd)(gate, up[:, :3])


def test_a_bad_call_is_not_taken_for_a_failed_compile(monkeypatch):
    monkeypatch.setitem(cpu_compiled._STATE, "failed", None)
    with pytest.raises(RuntimeError):
        cpu_compiled.swiglu16_fwd(torch.randn(3, 4).bfloat16(), torch.randn(3, 5).bfloat16())
    assert cpu_compiled._STATE["failed"] is None


@pytest.mark.parametrize("bf16,flag,want", [(True, None, True), (None, None, False), (False, True, True),
                                            (True, False, False)])
def test_trainer_default_is_on_with_cpu_bf16(bf16, flag, want):
    cfg = TrainConfig(bf16=bf16, cpu_compile=flag)
    with loop._autocast(torch.device("cpu"), cfg):
        assert cpu_compiled.active(torch.zeros(1)) is want
        assert torch.is_autocast_enabled("cpu") is bool(bf16)
    assert not cpu_compiled.active(torch.zeros(1))


def test_cli_flag_reaches_the_config():
    import argparse

    from reflectevo.trainer.cli_args import add_train_args, config_from_args

    parser = add_train_args(argparse.ArgumentParser(), dpo=False)
    base = ["--model", "m", "--data", "d.jsonl", "--out", "o"]
    assert config_from_args(parser.parse_args(base), dpo=False).cpu_compile is None
    assert config_from_args(parser.parse_args(base + ["--no-cpu-compile"]), dpo=False).cpu_compile is False
