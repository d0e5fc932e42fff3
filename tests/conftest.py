"""Test setup: on a machine without CUDA the Triton kernels run under the interpreter.

TRITON_INTERPRET must be set before any module that defines a ``@triton.jit`` kernel is imported. Kernel tests
pick the Triton path explicitly with ``kernel_backend("triton")``; every other test runs the PyTorch paths
(``REFLECTEVO_KERNELS=torch``), which is what a CPU user gets. On a CUDA machine the interpreter stays off (the
kernels compile), so a test that runs Triton on CPU tensors is skipped there: test_gpu.py checks the same kernels
compiled, against the same references.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("REFLECTEVO_KERNELS", "torch")

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    from reflectevo.kernels._dispatch import InterpreterRequired

    try:
        return (yield)
    except InterpreterRequired:
        pytest.skip("Triton on CPU tensors needs the interpreter, which is off here "
                    "(tests/test_gpu.py runs the kernels compiled)")


@pytest.fixture
def shared_data():
    """../shared/data next to the project root; tests that need it skip when it is absent."""
    d = SHARED / "data"
    if not d.is_dir():
        pytest.skip("../shared/data is absent")
    return d
