"""Which implementation a kernel call takes: Triton (compiled on CUDA, interpreted on the CPU) or PyTorch.

Rules, in order:
1. ``kernel_backend("torch" | "triton")`` (a context manager) or ``REFLECTEVO_KERNELS=torch|triton`` forces one.
2. CUDA tensors take Triton when it imports.
3. CPU tensors take Triton only under ``TRITON_INTERPRET=1`` (the interpreter must be switched on before the
   kernel modules are imported: Triton reads it when ``@triton.jit`` runs); otherwise the PyTorch path.
"""
from __future__ import annotations

import contextlib
import os

import torch

try:
    import triton  # noqa: F401
    import triton.language  # noqa: F401

    HAS_TRITON = True
except Exception:  # pragma: no cover - triton is optional off Linux x86_64
    HAS_TRITON = False

_forced: list[str] = []
_SMS: dict = {}


class InterpreterRequired(RuntimeError):
    """Triton was asked to run on CPU tensors, which only the interpreter can do."""


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def forced_backend() -> str | None:
    if _forced:
        return _forced[-1]
    env = os.environ.get("REFLECTEVO_KERNELS", "").strip().lower()
    return env if env in ("torch", "triton") else None


def use_triton(t: torch.Tensor) -> bool:
    """True when the call on tensor ``t`` should run the Triton kernel."""
    if not HAS_TRITON:
        return False
    forced = forced_backend()
    if forced == "torch":
        return False
    if t.is_cuda:
        return True
    if forced == "triton" or interpreting():
        if not interpreting():
            raise InterpreterRequired("Triton kernels on CPU tensors need TRITON_INTERPRET=1 set before reflectevo "
                                      "is imported")
        return True
    return False


@contextlib.contextmanager
def kernel_backend(name: str):
    """Force ``"torch"`` or ``"triton"`` for every kernel call inside the block."""
    if name not in ("torch", "triton"):
        raise ValueError(f"kernel backend must be 'torch' or 'triton', got {name!r}")
    _forced.append(name)
    try:
        yield
    finally:
        _forced.pop()


def sm_count(device: torch.device) -> int:
    """Multiprocessors of a CUDA device, read once per device (the property lookup costs microseconds a call)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SMS:
        _SMS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SMS[index]


def cdiv(a: int, b: int) -> int:
    """triton.cdiv for host code: Triton's is a constexpr function whose call costs ~2.6 us, this ~0.1 us."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """triton.next_power_of_2 for host code (same results, 0 for 0), without its ~2.6 us call overhead."""
    return 1 << (n - 1).bit_length() if n > 0 else 0
