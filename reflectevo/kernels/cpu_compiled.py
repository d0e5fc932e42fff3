"""One-pass CPU loops for the elementwise steps of a bf16 training step, compiled by TorchInductor.

Why: on the CPU every PyTorch op is a pass over memory, and the two cores share the memory bus, so the
elementwise work between the matmuls costs more than its FLOPs. The eager CPU paths of RMSNorm with a 16-bit
output (``rmsnorm._RMSNormCastCPU``: 4 passes forward, 5 backward), the residual add before such a norm with it
(``rmsnorm._AddRMSNormCastCPU``: the add, the norm, and in backward the sum of the two gradients of the residual
stream and their cast for the 16-bit branch), RoPE (``rope._rotate_cpu``: upcast, 4 half products, downcast) and
the 16-bit SwiGLU (``swiglu._SwiGLUHalfCPU``: 2 passes forward, 3 backward) each become one C++ loop here
(Inductor's OpenMP loops over rows, vectorised): they read their inputs once and write their outputs once.

Math: the formulas of the eager paths they stand in for, written once below, in the same order of operations and
with the same roundings to 16 bits (``.to(dtype)`` where the eager path rounds; Inductor's
``emulate_precision_casts`` keeps them). Inductor may sum a row in another order and contract a multiply and an
add, so results match the eager ones to fp32 rounding (an output rounded to bf16 can differ by one bf16 step
where the fp32 value sits on a rounding boundary); the tests check both paths against each other and fp64.

Memory: nothing beyond the outputs (the eager paths allocate one to three temporaries of the input's size).

When: inside ``compiled_cpu_kernels(True)`` (the trainer's ``--cpu-compile``, on by default for CPU runs under
``--bf16``), for CPU tensors; each autograd node records in its forward which path it took and its backward
takes the same one. The first call of each function compiles it (``torch.compile(dynamic=True)``: one kernel for
every sequence length; ~10-20 s in all on 2 cores, cached on disk by Inductor for later processes). If
compiling fails (no C++ compiler, an unsupported build), one warning names the error and the eager paths serve
the rest of the process.
"""
from __future__ import annotations

import contextlib
import sys

import torch

_STATE = {"on": False, "failed": None}


@contextlib.contextmanager
def compiled_cpu_kernels(on: bool = True):
    """Within the block, CPU (residual add +) RMSNorm-to-16-bit, RoPE and 16-bit SwiGLU calls take the compiled
    loops."""
    before = _STATE["on"]
    _STATE["on"] = bool(on)
    try:
        yield
    finally:
        _STATE["on"] = before


def active(t: torch.Tensor) -> bool:
    return _STATE["on"] and _STATE["failed"] is None and t.device.type == "cpu"


_VARIANTS = 64  # compiled variants per function (dtypes, directions, size-1 dims); dynamo's default is 8


class _Compiled:
    """``fn`` compiled on first use; if compiling fails, ``fn`` itself from then on (after one warning). A call
    that would need more than ``_VARIANTS`` compiled variants runs ``fn`` (that call only)."""

    def __init__(self, fn):
        self.fn, self.compiled = fn, None

    def __call__(self, *args):
        if _STATE["failed"] is None:
            try:
                if self.compiled is None:
                    self.compiled = torch.compile(self.fn, dynamic=True, fullgraph=True,
                                                  options={"emulate_precision_casts": True})
                try:
                    return self.compiled(*args)
                except torch._dynamo.exc.FailOnRecompileLimitHit:  # raise the limit only then: patching the
                    with torch._dynamo.config.patch(recompile_limit=_VARIANTS):  # config costs ~0.1 ms a call
                        return self.compiled(*args)
            except Exception as err:  # a bad call raises again below, from the eager formula
                out = self.fn(*args)
                if type(err).__name__ == "FailOnRecompileLimitHit":
                    return out
                _STATE["failed"] = f"{type(err).__name__}: {str(err).strip().splitlines()[0][:200]}"
                print(f"[reflectevo] warning: compiling the CPU elementwise kernels failed ({_STATE['failed']}); "
                      f"the eager PyTorch paths run instead", file=sys.stderr, flush=True)
                return out
        return self.fn(*args)


def _compute(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _rmsnorm_cast_fwd(x, weight, eps: float, out_dtype: torch.dtype):
    """fp32 x -> (round(x * rstd * weight) in out_dtype, rstd [..., 1])."""
    rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return (x * rstd * weight).to(out_dtype), rstd


def _rmsnorm_cast_bwd(dy, x, weight, rstd):
    """dx = rstd * (g - xhat * mean(g * xhat)), g = dy * weight, xhat = x * rstd (fp32)."""
    xhat = x * rstd
    g = dy.to(x.dtype) * weight
    return (g - xhat * ((g * xhat).sum(-1, keepdim=True) / x.shape[-1])) * rstd


def _add_rmsnorm_cast_fwd(x, y, weight, eps: float, out_dtype: torch.dtype):
    """(s = x + y in x's dtype, round(s * rstd * weight) in out_dtype, rstd): a residual add and the RMSNorm
    after it in one pass."""
    s = x + y
    h, rstd = _rmsnorm_cast_fwd(s, weight, eps, out_dtype)
    return s, h, rstd


def _add_rmsnorm_cast_bwd(ds, dh, s, weight, rstd, y_dtype: torch.dtype):
    """(dx, dy): ds + the norm's input gradient, and the same rounded to y's dtype."""
    d = ds + _rmsnorm_cast_bwd(dh, s, weight, rstd)
    return d, d.to(y_dtype)


def _rotate(x, cos, sin, backward: bool):
    """x [B, T, H, D] rotated by cos / sin [B|1, T, 1, D] (``backward``: the transposed rotation), computed in
    fp32 (fp64 for fp64 x) and rounded once to x's dtype."""
    compute = _compute(x.dtype)
    h = x.shape[-1] // 2
    xf, c, s = x.to(compute), cos.to(compute), sin.to(compute)
    x1, x2 = xf[..., :h], xf[..., h:]
    if backward:  # [do1*c1 + do2*s2, do2*c2 - do1*s1]
        out = torch.cat([x1 * c[..., :h] + x2 * s[..., h:], x2 * c[..., h:] - x1 * s[..., :h]], dim=-1)
    else:  # [x1*c1 - x2*s1, x2*c2 + x1*s2]
        out = torch.cat([x1 * c[..., :h] - x2 * s[..., :h], x2 * c[..., h:] + x1 * s[..., h:]], dim=-1)
    return out.to(x.dtype)


def _silu(g):
    return g / (1 + torch.exp(-g))  # PyTorch's CPU silu kernel's formula (Inductor's F.silu is g * sigmoid(g))


def _swiglu16_fwd(gate, up):
    """Hugging Face's bf16 MLP: silu(gate) rounded to the input dtype, then the product rounded."""
    silu = _silu(gate.float()).to(gate.dtype)
    return (silu.float() * up.float()).to(gate.dtype)


def _swiglu16_bwd(dy, gate, up):
    """(d_gate, d_up) as autograd of the rounded forward: d_gate = silu'(gate) * round(dy * up), rounded;
    d_up = round(silu(gate)) * dy, rounded; silu'(g) = s (1 + g (1 - s)), s = sigmoid(g)."""
    g = gate.float()
    s = torch.sigmoid(g)
    dy_up = (dy.float() * up.float()).to(gate.dtype).float()
    d_gate = (dy_up * (s * (1 + g * (1 - s)))).to(gate.dtype)
    d_up = (_silu(g).to(gate.dtype).float() * dy.float()).to(gate.dtype)
    return d_gate, d_up


rmsnorm_cast_fwd = _Compiled(_rmsnorm_cast_fwd)
rmsnorm_cast_bwd = _Compiled(_rmsnorm_cast_bwd)
add_rmsnorm_cast_fwd = _Compiled(_add_rmsnorm_cast_fwd)
add_rmsnorm_cast_bwd = _Compiled(_add_rmsnorm_cast_bwd)
rotate = _Compiled(_rotate)
swiglu16_fwd = _Compiled(_swiglu16_fwd)
swiglu16_bwd = _Compiled(_swiglu16_bwd)
