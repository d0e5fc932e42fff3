"""Shared benchmark helpers: median timing, measured matmul peak and copy bandwidth, peak memory, environment."""
from __future__ import annotations

import datetime
import os
import platform
import statistics
import time

import torch


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn, device, warmup: int = 3, repeats: int = 10) -> float:
    """Median milliseconds per call of ``fn()`` after ``warmup`` calls.

    CUDA: triton.testing.do_bench (L2 flushed between calls, median), with its warm-up / repetition windows sized
    from one timed call so that about ``warmup`` and ``repeats`` calls run. CPU: time.perf_counter medians.
    """
    device = torch.device(device)
    if device.type == "cuda":
        import triton.testing

        fn()
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        one_ms = max((time.perf_counter() - t0) * 1e3, 1e-3)
        return float(triton.testing.do_bench(fn, warmup=max(1.0, one_ms * warmup), rep=max(1.0, one_ms * repeats),
                                             return_mode="median"))
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def time_fn_graph(fn, device, repeats: int = 20) -> float | None:
    """Median device milliseconds per call of ``fn()`` replayed from a CUDA graph (triton.testing.do_bench_cudagraph):
    the kernels' own time without the host's launch cost, which is what a graph-captured decode step pays. None on
    the CPU, or when ``fn`` cannot be captured (the reason is not kept: the eager time still stands)."""
    if torch.device(device).type != "cuda":
        return None
    import triton.testing

    try:
        fn()  # compile / autotune outside the capture
        torch.cuda.synchronize(device)
        return float(triton.testing.do_bench_cudagraph(fn, rep=max(10, repeats), return_mode="median"))
    except Exception:  # noqa: BLE001
        torch.cuda.synchronize(device)
        return None


def matmul_peak_tflops(device, dtype: torch.dtype | None = None, size: int | None = None,
                       repeats: int = 10) -> float:
    """Measured dense matmul throughput (TFLOP/s) of a square ``size`` matmul: bf16 8192^3 on CUDA, fp32 2048^3 on
    CPU by default. A measured ceiling for "fraction of peak", not the datasheet number."""
    device = torch.device(device)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if size is None:
        size = 8192 if device.type == "cuda" else 2048
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    ms = time_fn(lambda: a @ b, device, warmup=2, repeats=repeats)
    return 2 * size ** 3 / (ms * 1e-3) / 1e12


def copy_bandwidth_gbs(device, nbytes: int | None = None, repeats: int = 10) -> float:
    """Measured device-to-device copy bandwidth in GB/s (bytes read + bytes written per second)."""
    device = torch.device(device)
    nbytes = nbytes or (1 << 30 if device.type == "cuda" else 1 << 27)
    src = torch.empty(nbytes // 4, device=device, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src)
    ms = time_fn(lambda: dst.copy_(src), device, warmup=2, repeats=repeats)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def cuda_peak_extra_bytes(fn, device) -> int:
    """Peak bytes allocated above what was allocated before ``fn()`` (torch.cuda.max_memory_allocated delta)."""
    device = torch.device(device)
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    _sync(device)
    return int(torch.cuda.max_memory_allocated(device) - before)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status: no {field}")


def cpu_peak_extra_bytes(fn) -> int:
    """Peak resident-set growth while ``fn()`` runs (Linux: VmHWM after resetting it through clear_refs).

    Honest only in a fresh process started with MALLOC_MMAP_THRESHOLD_ small (e.g. 65536): then every tensor
    buffer is its own mmap, freed memory leaves the RSS at once and the high-water mark tracks live tensors.
    """
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status_kib("VmRSS")
    fn()
    return (_status_kib("VmHWM") - before) * 1024


def env_info(device=None) -> dict:
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:
        info["triton"] = None
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    info["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return info
