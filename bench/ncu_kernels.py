"""Launch each of our Triton kernels at Llama-3-8B shapes, for Nsight Compute to profile (CUDA only).

    bash bench/ncu_kernels.sh OUTDIR      (wraps this in `ncu`; one device call, ~2-4 minutes)
    python bench/ncu_kernels.py [NAME ...]  (the launches alone; names: see CASES)

Each case runs once to compile (and autotune), then once between cudaProfilerStart/Stop: `ncu_kernels.sh`
profiles only that second run (--profile-from-start off), so the autotuner's trial launches are not replayed.
Each case uses the public entry point, so the launch shapes are those the library picks; cuBLAS and PyTorch
kernels run too but `ncu_kernels.sh` filters them out by name.
"""
from __future__ import annotations

import math
import sys

import torch


def _loss(dev):
    from reflectevo.kernels import linear_logprobs

    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(8192, 4096, device=dev, dtype=torch.bfloat16, generator=g).requires_grad_()
    w = torch.randn(128256, 4096, device=dev, dtype=torch.bfloat16, generator=g) / 64
    labels = torch.randint(0, 128256, (8192,), device=dev, generator=g)
    return lambda: linear_logprobs(x, w, labels).sum().backward()


def _nf4(path, tokens, shape=(4096, 4096)):
    def make(dev):
        from reflectevo.kernels import nf4_matmul, nf4_quantize

        q = nf4_quantize(torch.randn(*shape, device=dev) / 64)
        x = torch.randn(tokens, shape[1], device=dev, dtype=torch.bfloat16)
        return lambda: nf4_matmul(x, q, path=path)
    return make


def _dequant(dev):
    from reflectevo.kernels import nf4_dequantize, nf4_quantize

    q = nf4_quantize(torch.randn(14336, 4096, device=dev) / 64)
    return lambda: nf4_dequantize(q, torch.bfloat16)


def _decode(dev):
    from reflectevo.kernels import paged_attention_decode

    seqs, hq, hkv, d, bs, ctx = 64, 32, 8, 128, 16, 1024
    blocks = seqs * ctx // bs
    kc = torch.randn(blocks, bs, hkv, d, device=dev, dtype=torch.bfloat16)
    vc = torch.randn_like(kc)
    q = torch.randn(seqs, hq, d, device=dev, dtype=torch.bfloat16)
    tables = torch.randperm(blocks, device=dev).view(seqs, ctx // bs).to(torch.int32)
    lens = torch.full((seqs,), ctx, device=dev, dtype=torch.int32)
    return lambda: paged_attention_decode(q, kc, vc, tables, lens, 1 / math.sqrt(d))


def _elementwise(dev):
    from reflectevo.kernels import apply_rope, rms_norm, swiglu
    from reflectevo.kernels.rope import rope_cos_sin

    n, h = 8192, 4096
    x = torch.randn(n, h, device=dev, dtype=torch.bfloat16, requires_grad=True)
    w = torch.ones(h, device=dev, dtype=torch.bfloat16)
    q = torch.randn(1, n, 32, 128, device=dev, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(1, n, 8, 128, device=dev, dtype=torch.bfloat16, requires_grad=True)
    cos, sin = rope_cos_sin(torch.arange(n, device=dev), 128, 500000.0)
    gate = torch.randn(n, 14336, device=dev, dtype=torch.bfloat16, requires_grad=True)
    up = torch.randn_like(gate, requires_grad=True)

    def run():
        rms_norm(x, w, 1e-5).sum().backward()
        qo, ko = apply_rope(q, k, cos, sin)
        (qo.sum() + ko.sum()).backward()
        swiglu(gate, up).sum().backward()
    return run


CASES = {
    "loss": _loss,                                       # _rows_kernel (+ cuBLAS chunks)
    "dequant": _dequant,                                 # _nf4_dequant_kernel
    "gemv": _nf4("gemv", 1),                             # _gemv_blocks_kernel, one decode token
    "fused": _nf4("fused", 512),                         # _fused_kernel, forward
    "fused_decode": _nf4("fused", 64),                   # _fused_kernel split over K: a decode batch of 64
    "decode": _decode,                                   # _paged_decode_kernel, 64 sequences x 1024 tokens
    "elementwise": _elementwise,                         # RMSNorm, RoPE, SwiGLU forward + backward
}


def main(names: list[str]) -> int:
    if not torch.cuda.is_available():
        print("error: needs a CUDA GPU", file=sys.stderr)
        return 2
    unknown = [n for n in names if n not in CASES]
    if unknown:
        print(f"error: unknown case(s) {unknown}; choose from {sorted(CASES)}", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    for name in names or list(CASES):
        fn = CASES[name](dev)
        fn()  # compiles (and autotunes) outside the profiled range
        torch.cuda.synchronize()
        torch.cuda.profiler.start()
        fn()
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()
        print(f"ran {name}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
