"""Benchmark: Triton RMSNorm, RoPE and SwiGLU against their PyTorch references, forward and forward+backward.

CUDA: Llama-3-8B shapes (8192 tokens, hidden 4096, 32 q / 8 kv heads of 128, ffn 14336) in bf16.
CPU: small SmolLM2-135M shapes, reference only — Triton runs in the interpreter there and its time means nothing.
"""
from __future__ import annotations

import statistics
import time

import torch

from reflectevo.kernels import kernel_backend
from reflectevo.kernels.rmsnorm import rms_norm
from reflectevo.kernels.rope import apply_rope, rope_cos_sin
from reflectevo.kernels.swiglu import swiglu

CUDA_SHAPES = dict(tokens=8192, hidden=4096, heads=32, kv_heads=8, head_dim=128, ffn=14336, dtype="bfloat16")
CPU_SHAPES = dict(tokens=256, hidden=576, heads=9, kv_heads=3, head_dim=64, ffn=1536, dtype="float32")


def _time_ms(fn, device: torch.device) -> float:
    """Median milliseconds per call after warm-up (triton.testing.do_bench on CUDA)."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))  # its default is the mean
    for _ in range(3):
        fn()
    times = []
    for _ in range(10):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _env(device: torch.device) -> dict:
    try:
        from reflectevo.bench.common import env_info

        return env_info()
    except Exception:
        info = {"torch": torch.__version__, "device": str(device)}
        if device.type == "cuda":
            info["gpu"] = torch.cuda.get_device_name(device)
        try:
            import triton

            info["triton"] = triton.__version__
        except Exception:
            pass
        return info


def _cases(s: dict, device: torch.device):
    """(name, inputs needing grad, forward fn, bytes one forward must move at least)."""
    dtype = getattr(torch, s["dtype"])
    gen = torch.Generator(device=device).manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=device, dtype=dtype)

    n, h, d = s["tokens"], s["hidden"], s["head_dim"]
    esize = torch.empty((), dtype=dtype).element_size()
    x, w = randn(n, h), 1 + 0.1 * randn(h)
    q, k = randn(1, n, s["heads"], d), randn(1, n, s["kv_heads"], d)
    cos, sin = rope_cos_sin(torch.arange(n, device=device), d, 500000.0)
    gate, up = randn(n, s["ffn"]), randn(n, s["ffn"])
    return [
        ("rms_norm", (x, w), lambda a, b: rms_norm(a, b, 1e-5), 2 * n * h * esize),
        ("rope", (q, k), lambda a, b: apply_rope(a, b, cos, sin),
         2 * n * (s["heads"] + s["kv_heads"]) * d * esize),
        ("swiglu", (gate, up), swiglu, 3 * n * s["ffn"] * esize),
    ]


def _measure(fn, inputs, device: torch.device) -> dict:
    leaves = [t.detach().requires_grad_(True) for t in inputs]
    with torch.no_grad():
        fwd_ms = _time_ms(lambda: fn(*leaves), device)

    def fwd_bwd():
        out = fn(*leaves)
        outs = out if isinstance(out, tuple) else (out,)
        torch.autograd.grad(outs, leaves, [torch.ones_like(o) for o in outs])

    res = {"fwd_ms": fwd_ms, "fwd_bwd_ms": _time_ms(fwd_bwd, device)}
    if device.type == "cuda":  # bytes held after a training-mode forward: outputs + what autograd saved
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        kept = fn(*leaves)
        res["fwd_alloc_mb"] = (torch.cuda.memory_allocated(device) - before) / 2**20
        del kept
    return res


def run(device: str | torch.device | None = None, quick: bool = False) -> dict:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_cuda = device.type == "cuda"
    shapes = dict(CUDA_SHAPES if on_cuda else CPU_SHAPES)
    if quick:
        shapes["tokens"] //= 4
    result = {"env": _env(device), "shapes": shapes, "ops": {}}
    if not on_cuda:
        result["note"] = ("CPU: PyTorch reference only; the Triton kernels run in the interpreter on a CPU, "
                          "so timing them would be meaningless")
    for name, inputs, fn, min_bytes in _cases(shapes, device):
        row = {}
        with kernel_backend("torch"):
            row["torch"] = _measure(fn, inputs, device)
        if on_cuda:
            with kernel_backend("triton"):
                row["triton"] = _measure(fn, inputs, device)
            row["speedup_fwd"] = row["torch"]["fwd_ms"] / row["triton"]["fwd_ms"]
            row["speedup_fwd_bwd"] = row["torch"]["fwd_bwd_ms"] / row["triton"]["fwd_bwd_ms"]
            row["triton_fwd_gb_s"] = min_bytes / row["triton"]["fwd_ms"] / 1e6
        row["fwd_min_bytes"] = min_bytes
        result["ops"][name] = row
        if on_cuda:
            torch.cuda.empty_cache()
    return result


def format_table(result: dict) -> str:
    s = result["shapes"]
    lines = [f"### RMSNorm / RoPE / SwiGLU ({s['tokens']} tokens, hidden {s['hidden']}, heads {s['heads']}/"
             f"{s['kv_heads']}x{s['head_dim']}, ffn {s['ffn']}, {s['dtype']})", ""]
    if "note" in result:
        lines += [result["note"], ""]
    lines += ["| op | torch fwd ms | torch fwd+bwd ms | triton fwd ms | triton fwd+bwd ms | speedup fwd | "
              "speedup fwd+bwd | triton fwd GB/s | fwd alloc MB torch / triton |",
              "|---|---|---|---|---|---|---|---|---|"]
    for name, row in result["ops"].items():
        t, tr = row["torch"], row.get("triton")
        cells = [name, f"{t['fwd_ms']:.3f}", f"{t['fwd_bwd_ms']:.3f}"]
        if tr:
            mem = f"{t.get('fwd_alloc_mb', 0):.0f} / {tr.get('fwd_alloc_mb', 0):.0f}"
            cells += [f"{tr['fwd_ms']:.3f}", f"{tr['fwd_bwd_ms']:.3f}", f"{row['speedup_fwd']:.2f}x",
                      f"{row['speedup_fwd_bwd']:.2f}x", f"{row['triton_fwd_gb_s']:.0f}", mem]
        else:
            cells += ["-"] * 6
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
