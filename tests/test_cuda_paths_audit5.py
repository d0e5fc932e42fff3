"""CUDA-only branches checked on the CPU (fifth audit).

linear_logprobs: the fp32-logit GEMM of 16-bit inputs (``torch.mm(..., out_dtype=float32)``, reached on CUDA only:
the CPU path computes in fp32) is switched off for the whole process when it fails, on the belief that this torch
lacks it. An out-of-memory error is no such sign, yet it switched every later call of the process to logits rounded
to 16 bits (the loss benchmark's sweep catches one shape's OOM and goes on with the next shapes and methods).
"""
from __future__ import annotations

import importlib

import pytest
import torch

ll = importlib.import_module("reflectevo.kernels.linear_logprobs")  # the package exports a function of that name


# ---------------------------------------------------------------------------------------------------- fp32 logits
def test_an_out_of_memory_error_does_not_turn_the_fp32_logits_off_for_good(monkeypatch):
    monkeypatch.setattr(ll, "_MM_OUT_DTYPE", [True])
    calls = []

    def cuda_like_mm(a, b, *, out_dtype=None):  # cuBLAS with out_dtype: fp32 accumulation and output
        calls.append(out_dtype)
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return a.float() @ b.float()

    monkeypatch.setattr(torch, "mm", cuda_like_mm)
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(8, 64, generator=g) * 4).to(torch.bfloat16)
    w = torch.randn(300, 64, generator=g).to(torch.bfloat16)
    with pytest.raises(torch.OutOfMemoryError):
        ll._logits_fp32(x, w)  # the caller sees the OOM (the bf16 product would need memory as well)
    assert ll._MM_OUT_DTYPE == [True]
    z = ll._logits_fp32(x, w)  # a later call, memory freed: fp32 logits, not the bf16-rounded ones
    assert calls == [torch.float32, torch.float32]
    assert torch.equal(z, x.float() @ w.float().T)
    assert not torch.equal(z, (x @ w.T).float())  # the two differ at these magnitudes: the check means something


def test_a_backend_without_out_dtype_still_falls_back(monkeypatch):
    monkeypatch.setattr(ll, "_MM_OUT_DTYPE", [True])
    x = torch.randn(4, 32).to(torch.bfloat16)
    w = torch.randn(40, 32).to(torch.bfloat16)
    z = ll._logits_fp32(x, w)  # torch's CPU mm has no out_dtype kernel (NotImplementedError)
    assert ll._MM_OUT_DTYPE == [False] and z.dtype == torch.float32
    assert torch.equal(z, (x @ w.T).float())


def test_cuda_n_becomes_the_current_device(monkeypatch):
    """Triton launches (and CUDA graphs capture) on the current device: `--device cuda:1` must make it current."""
    import torch

    from reflectevo.cli_loop import LoopArgError, default_device

    made_current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: made_current.append(torch.device(d)))
    assert default_device("cuda:1") == "cuda:1" and made_current == [torch.device("cuda:1")]
    assert default_device("cuda") == "cuda" and default_device("cpu") == "cpu" and len(made_current) == 1
    with pytest.raises(LoopArgError, match=r"--device cuda:2: this machine has 2 CUDA device\(s\)"):
        default_device("cuda:2")
