"""Benchmark: fused linear log-prob / cross-entropy / DPO loss against the naive lm_head + log_softmax path.

For each (N tokens, H hidden, V vocab) it times forward + backward (median after warm-up) and measures the peak
extra memory of: naive PyTorch (full logits, fp32 log_softmax, gather, mean over valid tokens), our
``linear_cross_entropy`` (SFT's loss) with a frozen and with a trainable head, Liger's fused linear cross-entropy and
fused linear DPO loss when ``liger_kernel`` imports, and a DPO side by side (packed chosen + rejected ->
linear_logprobs -> sequence_logps -> dpo_loss vs naive). On CUDA the fully tiled kernels (``impl="tiles"``) run
too, as ``fused_tiles`` / ``fused_dpo_tiles``, and the row chunks with 16-bit logits (``impl="chunks16"``) as
``fused16`` / ``fused_dpo16``.

Throughput is counted in model FLOPs (4NHV frozen head, 6NHV trainable: forward + backward matmuls, no recompute)
and set against a bf16 (CUDA) / fp32 (CPU) dense matmul timed in the same run.

Memory. CUDA: torch.cuda.max_memory_allocated delta around one fwd+bwd. CPU: every (shape, method) runs in a fresh
subprocess started with MALLOC_MMAP_THRESHOLD_=65536 so each tensor is its own mmap and frees return memory at once;
after a warm-up on a tiny shape the peak RSS (VmHWM, reset through /proc/self/clear_refs) minus the RSS before the
call is the peak extra memory. It counts the gradients the call creates (dH, dW) and allocator/BLAS scratch.
CPU runs in fp32 (bf16 CPU matmuls are not representative), CUDA in bf16.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch

from reflectevo.bench.common import (cpu_peak_extra_bytes, cuda_peak_extra_bytes, env_info, matmul_peak_tflops,
                                     time_fn)
from reflectevo.kernels.dpo_loss import dpo_loss, sequence_logps
from reflectevo.kernels.linear_cross_entropy import linear_cross_entropy
from reflectevo.kernels.linear_logprobs import linear_logprobs

GPU_SHAPES = [(4096, 576, 49152), (8192, 4096, 128256), (16384, 4096, 32000)]
CPU_SHAPES = [(4096, 576, 49152)]
QUICK_CPU_SHAPES = [(1024, 576, 16384)]
DPO_SEQ_LEN = 512
METHODS = ["naive", "fused", "fused16", "fused_tiles", "liger_flce", "naive_dpo", "fused_dpo", "fused_dpo16",
           "fused_dpo_tiles", "liger_dpo"]
# the tiled Triton kernels have no CPU path outside the interpreter; 16-bit logits are the fp32 path on the CPU
CUDA_ONLY = ("fused_tiles", "fused_dpo_tiles", "fused16", "fused_dpo16")
IMPL = {"fused": "auto", "fused16": "chunks16", "fused_tiles": "tiles", "fused_dpo": "auto", "fused_dpo16": "chunks16",
        "fused_dpo_tiles": "tiles"}


def _inputs(n, h, v, device, dtype, train_head: bool):
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(n, h, generator=gen).to(device=device, dtype=dtype).requires_grad_()
    w = (torch.randn(v, h, generator=gen) / h ** 0.5).to(device=device, dtype=dtype).requires_grad_(train_head)
    labels = torch.randint(0, v, (n,), generator=gen)
    labels[::16] = -100
    return x, w, labels.to(device)


def _naive_logps(x, w, labels):
    logits = x @ w.T
    logp = torch.log_softmax(logits.float(), dim=-1).gather(1, labels.clamp(min=0)[:, None]).squeeze(1)
    return torch.where(labels != -100, logp, 0.0)


def _build(method: str, n, h, v, device, dtype, train_head: bool):
    """A closure running one forward + backward, or raises ImportError / ValueError when not applicable."""
    x, w, labels = _inputs(n, h, v, device, dtype, train_head)
    leaves = [x, w]  # every tensor whose .grad the call sets, cleared before each call
    count = (labels != -100).sum()
    pairs = max(1, n // (2 * DPO_SEQ_LEN))
    seq_len = n // (2 * pairs)
    seq_ids = (torch.arange(n, device=device) // seq_len).clamp(max=2 * pairs - 1)
    ref = -torch.rand(2 * pairs, device=device) * 100

    def dpo_from_seq(seq):
        return dpo_loss(seq[:pairs], seq[pairs:], ref[:pairs], ref[pairs:])[0]

    if method == "naive":
        body = lambda: (-_naive_logps(x, w, labels).sum() / count).backward()
    elif method in ("fused", "fused16", "fused_tiles"):
        impl = IMPL[method]
        body = lambda: linear_cross_entropy(x, w, labels, impl=impl).backward()
    elif method == "naive_dpo":
        body = lambda: dpo_from_seq(sequence_logps(_naive_logps(x, w, labels), seq_ids, 2 * pairs)).backward()
    elif method in ("fused_dpo", "fused_dpo16", "fused_dpo_tiles"):
        impl = IMPL[method]
        body = lambda: dpo_from_seq(sequence_logps(linear_logprobs(x, w, labels, impl=impl), seq_ids,
                                                   2 * pairs)).backward()
    elif method == "liger_flce":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        loss_fn = LigerFusedLinearCrossEntropyLoss()
        body = lambda: loss_fn(w, x, labels).backward()
    elif method == "liger_dpo":
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

        loss_fn = LigerFusedLinearDPOLoss(use_ref_model=False)
        x3 = x.detach()[: 2 * pairs * seq_len].reshape(2 * pairs, seq_len, h).requires_grad_()
        t3 = labels[: 2 * pairs * seq_len].reshape(2 * pairs, seq_len)
        leaves.append(x3)
        body = lambda: loss_fn(w, x3, t3)[0].backward()
    else:
        raise ValueError(f"method: unknown {method!r}")

    def run():
        for t in leaves:
            t.grad = None
        body()

    run.inputs = leaves
    return run


def _cuda_peak_bytes(fn, device) -> int:
    """Peak extra memory of one fwd+bwd, its gradients included as on the CPU. After the timing the closure's inputs
    still hold the last call's dX / dW; the call frees them first, so measured with them held the delta left the
    gradients out (the naive trainable head read less than the frozen one by exactly dW)."""
    for t in fn.inputs:
        t.grad = None
    return cuda_peak_extra_bytes(fn, device)


def _cpu_memory_subprocess(method, n, h, v, train_head) -> int:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", REFLECTEVO_KERNELS="torch")
    cmd = [sys.executable, "-m", "reflectevo.bench.loss_kernels", "--memory-child", method, str(n), str(h), str(v),
           "1" if train_head else "0"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return int(json.loads(out.stdout.strip().splitlines()[-1])["peak_extra_bytes"])


def _memory_child(method, n, h, v, train_head):
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    _build(method, 64, min(h, 64), 512, "cpu", torch.float32, train_head)()  # warm-up of lazy init, tiny shape
    fn = _build(method, n, h, v, "cpu", torch.float32, train_head)
    print(json.dumps({"peak_extra_bytes": cpu_peak_extra_bytes(fn)}))


def run(device: str = "cpu", shapes=None, repeats: int | None = None, liger: bool = True, quick: bool = False) -> dict:
    device = torch.device(device)
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    if shapes is None:
        shapes = GPU_SHAPES if cuda else (QUICK_CPU_SHAPES if quick else CPU_SHAPES)
    repeats = repeats or (20 if cuda else (2 if quick else 3))
    warmup = 5 if cuda else 1
    peak = matmul_peak_tflops(device, repeats=5 if not cuda else 20)
    rows = []
    for n, h, v in shapes:
        for method in METHODS:
            if (method.startswith("liger") and not liger) or (method in CUDA_ONLY and not cuda):
                continue
            for train_head in ((False, True) if method in ("naive", "fused", "fused16", "fused_tiles", "liger_flce")
                               else (False,)):
                row = {"shape": [n, h, v], "method": method, "head": "trainable" if train_head else "frozen"}
                try:
                    fn = _build(method, n, h, v, device, dtype, train_head)
                    row["ms"] = time_fn(fn, device, warmup=warmup, repeats=repeats)
                    peak_bytes = (_cuda_peak_bytes(fn, device) if cuda
                                  else _cpu_memory_subprocess(method, n, h, v, train_head))
                    row["peak_extra_mb"] = peak_bytes / 2 ** 20
                    model_flops = (6 if train_head else 4) * n * h * v
                    row["tflops"] = model_flops / (row["ms"] * 1e-3) / 1e12
                    row["frac_matmul_peak"] = row["tflops"] / peak
                    del fn
                except ImportError as e:
                    row["error"] = f"not importable: {e.name or e}"
                except Exception as e:  # one failing baseline must not sink the whole run
                    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                rows.append(row)
                if cuda:
                    torch.cuda.empty_cache()
    _relative_to_naive(rows)
    meta = env_info(device)
    meta.update(dtype=str(dtype).replace("torch.", ""), matmul_peak_tflops=peak, repeats=repeats, warmup=warmup,
                memory_method=("torch.cuda.max_memory_allocated delta" if cuda else
                               "subprocess VmHWM - VmRSS with MALLOC_MMAP_THRESHOLD_=65536"),
                flops_model="4NHV frozen head / 6NHV trainable head per fwd+bwd",
                dpo_seq_len=DPO_SEQ_LEN)
    return {"meta": meta, "rows": rows, "targets": _targets(rows, cuda)}


def _relative_to_naive(rows):
    """Each row against the naive path of its own loss: the DPO methods (fused_dpo_tiles too) against naive_dpo."""
    base = {(tuple(r["shape"]), r["head"], "dpo" in r["method"]): r for r in rows
            if r["method"] in ("naive", "naive_dpo") and "ms" in r}
    for r in rows:
        b = base.get((tuple(r["shape"]), r["head"], "dpo" in r["method"]))
        if b is not None and "ms" in r:
            r["time_vs_naive"] = r["ms"] / b["ms"]
            r["mem_vs_naive"] = r["peak_extra_mb"] / b["peak_extra_mb"] if b["peak_extra_mb"] > 0 else None


def _targets(rows, cuda: bool):
    """The CPU target of the issue: chunked path <= 10% of naive extra memory at <= 1.3x its time."""
    if cuda:
        return []
    out = []
    for r in rows:
        if r["method"] in ("fused", "fused_dpo") and "time_vs_naive" in r and r["mem_vs_naive"] is not None:
            out.append({"shape": r["shape"], "method": r["method"], "head": r["head"],
                        "mem_vs_naive": r["mem_vs_naive"], "time_vs_naive": r["time_vs_naive"],
                        "holds": r["mem_vs_naive"] <= 0.10 and r["time_vs_naive"] <= 1.3})
    return out


def format_table(result: dict) -> str:
    m = result["meta"]
    lines = [f"### Fused linear log-prob / CE / DPO loss — {m['device']}, {m['dtype']}, torch {m['torch']}, "
             f"triton {m.get('triton')}, {m['date']}",
             f"Measured dense {m['dtype']} matmul: {m['matmul_peak_tflops']:.2f} TFLOP/s. Memory: {m['memory_method']}."
             f" FLOPs: {m['flops_model']}.", "",
             "| N, H, V | method | head | fwd+bwd ms | peak extra MiB | TFLOP/s | % matmul peak | time vs naive "
             "| mem vs naive |", "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        shape = "{}, {}, {}".format(*r["shape"])
        if "error" in r:
            lines.append(f"| {shape} | {r['method']} | {r['head']} | — | — | — | — | {r['error']} | |")
            continue
        tv, mv = r.get("time_vs_naive"), r.get("mem_vs_naive")
        lines.append(f"| {shape} | {r['method']} | {r['head']} | {r['ms']:.1f} | {r['peak_extra_mb']:.1f} | "
                     f"{r['tflops']:.3f} | {100 * r['frac_matmul_peak']:.1f} | "
                     f"{'' if tv is None else f'{tv:.2f}x'} | {'' if mv is None else f'{100 * mv:.1f}%'} |")
    if result.get("targets"):
        lines += ["", "CPU target (extra memory <= 10% of naive at <= 1.3x its time):"]
        for t in result["targets"]:
            lines.append(f"- {t['method']} ({t['head']} head) at {tuple(t['shape'])}: memory "
                         f"{100 * t['mem_vs_naive']:.1f}% of naive, time {t['time_vs_naive']:.2f}x -> "
                         f"{'holds' if t['holds'] else 'does NOT hold'}")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", help="write JSON here and Markdown next to it (.md)")
    p.add_argument("--repeats", type=int)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--no-liger", action="store_true")
    p.add_argument("--memory-child", nargs=5, metavar=("METHOD", "N", "H", "V", "TRAIN_HEAD"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.memory_child:
        method, n, h, v, train = args.memory_child
        _memory_child(method, int(n), int(h), int(v), train == "1")
        return 0
    result = run(args.device, repeats=args.repeats, liger=not args.no_liger, quick=args.quick)
    table = format_table(result)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
            f.write(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
