"""Benchmark: NF4 dequantisation and 4-bit matmul against bitsandbytes.

- dequant: GB/s (packed bytes + absmax read, bf16 written) of ours vs bitsandbytes' dequantize_4bit, with a
  device-to-device copy measured in the same run as the ceiling.
- matmul: y = x · dequant(W)ᵀ for the Llama-3-8B linear shapes [out, in] at 1/16/512/4096 tokens: ours on each
  path (gemv / fused / dequant + matmul) vs bitsandbytes' matmul_4bit. CUDA: bf16. CPU: one small shape at 1 and 16
  tokens, PyTorch paths only (Triton would run in the interpreter, whose time means nothing). On CUDA, from 16
  tokens, also the input gradient dx = dy · dequant(W) (fused vs dequant + matmul) and the tiles the autotuner chose.
- memory: bytes/parameter of the NF4 base for Llama-3-8B (every linear except lm_head), from the layout.
"""
from __future__ import annotations

import importlib

import torch

from reflectevo.bench.common import copy_bandwidth_gbs, env_info, time_fn, time_fn_graph
from reflectevo.kernels import kernel_backend
from reflectevo.kernels.nf4 import _dequantize_triton, nf4_dequantize, nf4_quantize
from reflectevo.kernels.nf4_gemv import gemv
from reflectevo.kernels.nf4_matmul import (
    AUTO_FUSED_MAX_ROWS,
    AUTO_GEMV_MAX_ROWS,
    GEMV_MAX_ROWS,
    choose_path,
    llama3_8b_nf4_bytes_per_param,
    nf4_matmul,
)

# the module, not the function of the same name that reflectevo.kernels exports
nm = importlib.import_module("reflectevo.kernels.nf4_matmul")
nf4_mod = importlib.import_module("reflectevo.kernels.nf4")
nf4_gemv = importlib.import_module("reflectevo.kernels.nf4_gemv")

CUDA_SHAPES = [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)]
CUDA_TOKENS = [1, 16, 64, 512, 4096]
GRAPH_MAX_TOKENS = 64  # decode batches: also timed replayed from a CUDA graph (device time, no launch cost)
CPU_SHAPES = [(1024, 1024)]
CPU_TOKENS = [1, 16]


def _bnb():
    try:
        import bitsandbytes
        import bitsandbytes.functional as bnbf

        return bitsandbytes, bnbf
    except Exception:  # pragma: no cover - optional
        return None, None


def _dequant_row(device, n, k, dtype, repeats):
    bnb, bnbf = _bnb()
    w = torch.randn(n, k, device=device, dtype=dtype)
    q = nf4_quantize(w)
    nbytes = q.data.numel() + q.absmax.numel() + n * k * w.element_size()
    row = {"shape": [n, k], "bytes_moved": nbytes}
    ms = time_fn(lambda: nf4_dequantize(q, dtype), device, repeats=repeats)
    row["ours_ms"], row["ours_gbs"] = ms, nbytes / ms / 1e6
    row["ours_graph_ms"] = time_fn_graph(lambda: nf4_dequantize(q, dtype), device)
    if device.type == "cuda":  # the other level lookup (see nf4.BYTE_TABLE)
        row["ours_other_table_graph_ms"] = time_fn_graph(
            lambda: _dequantize_triton(q, dtype, byte_table=not nf4_mod.BYTE_TABLE), device)
    if bnbf is not None:
        packed, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
        ms = time_fn(lambda: bnbf.dequantize_4bit(packed, state), device, repeats=repeats)
        row["bnb_ms"], row["bnb_gbs"] = ms, nbytes / ms / 1e6
        row["bnb_graph_ms"] = time_fn_graph(lambda: bnbf.dequantize_4bit(packed, state), device)
    return row


def _tile_name(cfg) -> str:
    """'BLOCK_M x BLOCK_P x BLOCK_R, warps, stages' of an autotuner choice."""
    kw = cfg.kwargs
    swap = " swap" if kw.get("SWAP") else ""
    return f"{kw['BLOCK_M']}x{kw['BLOCK_P']}x{kw['BLOCK_R']} w{cfg.num_warps} s{cfg.num_stages}{swap}"


def _fused_tile(m, n, k, transpose_w, device) -> str:
    """The tile the fused kernel ran with: the fixed split-R tile for decode-sized inputs, else the autotuner's."""
    if m <= nm.SPLIT_MAX_ROWS:
        bm = max(16, nm.next_power_of_2(m))
        p, r = (k, n) if transpose_w else (n, k)
        per = nm._split_plan(m, p, r, bm, 64, 64, nm.sm_count(device))
        swap = " swap" if nm.SPLIT_SWAP and not transpose_w else ""
        return f"{bm}x64x64 w4 s3{swap}, {-(-r // per)} R splits"
    return _tile_name(nm._fused_tuned[transpose_w].best_config)


def _matmul_rows(device, n, k, tokens, dtype, repeats):
    bnb, bnbf = _bnb()
    w = torch.randn(n, k, device=device, dtype=dtype)
    q = nf4_quantize(w)
    q.dtype = dtype
    packed = state = None
    if bnbf is not None:
        packed, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    del w
    rows = []
    for m in tokens:
        x = torch.randn(m, k, device=device, dtype=dtype)
        row = {"shape": [n, k], "tokens": m}
        paths = ["dequant"]
        if device.type == "cuda":
            paths = (["gemv"] if m <= GEMV_MAX_ROWS else []) + ["fused", "dequant"]
        for path in paths:
            with torch.no_grad():
                row[f"{path}_ms"] = time_fn(lambda: nf4_matmul(x, q, path=path), device, repeats=repeats)
                if m <= GRAPH_MAX_TOKENS:
                    row[f"{path}_graph_ms"] = time_fn_graph(lambda: nf4_matmul(x, q, path=path), device)
        if device.type == "cuda" and GEMV_MAX_ROWS < m <= nm.SPLIT_MAX_ROWS:  # the split tile the other way round
            with torch.no_grad():
                row["fused_other_swap_graph_ms"] = time_fn_graph(
                    lambda: nm._fused(x, q, None, False, split_swap=not nm.SPLIT_SWAP), device)
        if device.type == "cuda" and m <= GEMV_MAX_ROWS:
            with torch.no_grad():  # 1 row: the elementwise GEMV kernel instead of the block kernel; pipelined
                if m == 1:
                    row["gemv_elementwise_graph_ms"] = time_fn_graph(lambda: gemv(x, q, None, blocks=False), device)
                row["gemv_pipelined_graph_ms"] = time_fn_graph(lambda: gemv(x, q, None, blocks=False, stages=3),
                                                               device)
        if device.type == "cuda" and m <= GRAPH_MAX_TOKENS:  # the fused kernel with the other level lookup
            with torch.no_grad():
                row["fused_other_table_graph_ms"] = time_fn_graph(
                    lambda: nm._fused(x, q, None, False, byte_table=not nf4_mod.BYTE_TABLE), device)
        if device.type == "cuda" and m > GEMV_MAX_ROWS:
            row["fused_tile"] = _fused_tile(m, n, k, False, device)
            dy = torch.randn(m, n, device=device, dtype=dtype)
            row["fused_dx_ms"] = time_fn(lambda: nm._fused(dy, q, None, True), device, repeats=repeats)
            row["fused_dx_tile"] = _fused_tile(m, n, k, True, device)
            row["dequant_dx_ms"] = time_fn(lambda: dy @ nf4_dequantize(q, dtype), device, repeats=repeats)
        row["auto_path"] = choose_path(x)
        if bnb is not None:
            with torch.no_grad():
                row["bnb_ms"] = time_fn(lambda: bnb.matmul_4bit(x, packed.t(), state), device, repeats=repeats)
                if m <= GRAPH_MAX_TOKENS:
                    row["bnb_graph_ms"] = time_fn_graph(lambda: bnb.matmul_4bit(x, packed.t(), state), device)
        row["flops"] = 2 * m * n * k
        rows.append(row)
    return rows


def run(device="cpu", quick: bool = False) -> dict:
    device = torch.device(device)
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    shapes = CUDA_SHAPES if cuda else CPU_SHAPES
    tokens = CUDA_TOKENS if cuda else CPU_TOKENS
    if quick:
        shapes, tokens = shapes[:1], tokens[:2]
    repeats = 10 if cuda else 5
    result = {"env": env_info(device), "dtype": str(dtype).removeprefix("torch."),
              "copy_gbs": copy_bandwidth_gbs(device), "dequant": [], "matmul": [],
              "thresholds": {"AUTO_GEMV_MAX_ROWS": AUTO_GEMV_MAX_ROWS, "AUTO_FUSED_MAX_ROWS": AUTO_FUSED_MAX_ROWS},
              "llama3_8b_memory": llama3_8b_nf4_bytes_per_param()}
    backend = "triton" if cuda else "torch"
    with kernel_backend(backend):
        for n, k in shapes:
            result["dequant"].append(_dequant_row(device, n, k, dtype, repeats))
            result["matmul"] += _matmul_rows(device, n, k, tokens, dtype, repeats)
    result["note"] = ("CUDA: Triton kernels" if cuda else
                      "CPU: PyTorch dequant + matmul only (Triton would run in the interpreter)")
    return result


def _f(v, fmt="{:.3f}"):
    return fmt.format(v) if isinstance(v, (int, float)) else "-"


def format_table(result: dict) -> str:
    mem = result["llama3_8b_memory"]
    lines = [f"## NF4 kernels ({result['env'].get('device')}, {result['dtype']})", "",
             f"{result['note']}. Device-to-device copy of a large buffer (128 MiB CPU, 1 GiB CUDA): "
             f"{result['copy_gbs']:.1f} GB/s; dequant GB/s counts packed bytes + absmax read and the dense output "
             f"written (a small CPU shape stays in cache, so it can beat the copy).", "",
             f"Llama-3-8B NF4 base: {mem['nf4_bytes'] / 2**30:.2f} GiB for {mem['linear_params'] / 1e9:.2f} B linear "
             f"parameters = {mem['bytes_per_param']:.4f} bytes/parameter.", "",
             "Columns marked *graph* replay the call from a CUDA graph (device time only, no host launch cost: what a "
             "graph-captured decode step pays); the others time eager calls, whose small shapes are bound by the "
             "host's launch cost.", "",
             f"*other table*: the level lookup nf4.BYTE_TABLE={nf4_mod.BYTE_TABLE} does not use (pair table vs "
             "16 levels).", "",
             "| dequant [out, in] | ours ms | ours GB/s | ours graph ms | ours other table graph ms | bnb ms | bnb GB/s "
             "| bnb graph ms | copy GB/s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["dequant"]:
        lines.append(f"| {r['shape'][0]}x{r['shape'][1]} | {_f(r['ours_ms'])} | {_f(r['ours_gbs'], '{:.1f}')} | "
                     f"{_f(r.get('ours_graph_ms'))} | {_f(r.get('ours_other_table_graph_ms'))} | {_f(r.get('bnb_ms'))} | {_f(r.get('bnb_gbs'), '{:.1f}')} | "
                     f"{_f(r.get('bnb_graph_ms'))} | {result['copy_gbs']:.1f} |")
    lines += ["", "| matmul [out, in] | tokens | gemv ms | fused ms | dequant+mm ms | bnb matmul_4bit ms | auto | "
              "fused dx ms | dequant dx ms | fused tile (fwd / dx) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["matmul"]:
        tiles = f"{r['fused_tile']} / {r['fused_dx_tile']}" if "fused_tile" in r else "-"
        lines.append(f"| {r['shape'][0]}x{r['shape'][1]} | {r['tokens']} | {_f(r.get('gemv_ms'))} | "
                     f"{_f(r.get('fused_ms'))} | {_f(r.get('dequant_ms'))} | {_f(r.get('bnb_ms'))} | {r['auto_path']} | "
                     f"{_f(r.get('fused_dx_ms'))} | {_f(r.get('dequant_dx_ms'))} | {tiles} |")
    graphed = [r for r in result["matmul"] if any(v for k, v in r.items() if k.endswith("_graph_ms"))]
    if graphed:
        other = "unswapped" if nm.SPLIT_SWAP else "swapped"
        lines += ["", f"| matmul [out, in] | tokens | gemv graph ms | gemv elementwise graph ms "
                      f"| gemv pipelined graph ms | fused graph ms | fused {other} graph ms | fused other table graph ms "
                      "| dequant+mm graph ms | bnb graph ms | weight GB/s of the best (0.52 B/param) | % of copy |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in graphed:
            ours = [r.get(f"{p}_graph_ms") for p in ("gemv", "gemv_elementwise", "gemv_pipelined", "fused",
                                                      "fused_other_swap", "fused_other_table", "dequant")]
            best = min((t for t in ours if t), default=None)
            gbs = r["shape"][0] * r["shape"][1] * 0.5159 / best / 1e6 if best else None
            share = 100 * gbs / result["copy_gbs"] if gbs else None
            lines.append(f"| {r['shape'][0]}x{r['shape'][1]} | {r['tokens']} | "
                         + " | ".join(_f(t) for t in ours) + f" | {_f(r.get('bnb_graph_ms'))} | "
                         f"{_f(gbs, '{:.0f}')} | {_f(share, '{:.0f}')} |")
    return "\n".join(lines) + format_recommendation(result)



def _time(row: dict, key: str):
    """A path's time in a matmul row: replayed from a CUDA graph where measured, else eager."""
    return row.get(f"{key}_graph_ms", row.get(f"{key}_ms"))


def _faster_share(pairs) -> tuple[int, int]:
    """(how many of the (candidate, current) time pairs the candidate wins, how many were measured)."""
    pairs = [(a, b) for a, b in pairs if a and b]
    return sum(a < b for a, b in pairs), len(pairs)


def recommend(result: dict) -> dict:
    """The module settings a CUDA run's timings support: {name: (value, evidence)}. A threshold covers a token count
    only when its path beat dequant + cuBLAS on every shape measured at that count and at every smaller one; a
    variant switch flips only when the other variant won on more than half of the rows that timed both."""
    rows = result.get("matmul", [])
    if not rows or not any(_time(r, "gemv") or _time(r, "fused") for r in rows):
        return {}
    by_tokens: dict = {}
    for r in rows:
        by_tokens.setdefault(r["tokens"], []).append(r)

    def wins(path: str, tokens: int, rivals: tuple) -> bool:
        for r in by_tokens[tokens]:
            mine, others = _time(r, path), [t for t in (_time(r, p) for p in rivals) if t]
            if mine is None or not others or mine >= min(others):
                return False
        return True

    out = {}
    gemv_max = 0
    for m in sorted(t for t in by_tokens if t <= GEMV_MAX_ROWS):
        if not wins("gemv", m, ("fused", "dequant")):
            break
        gemv_max = m
    fused_max = 0
    for m in sorted(t for t in by_tokens if t > gemv_max):
        if not wins("fused", m, ("dequant",)):
            break
        fused_max = m
    out["AUTO_GEMV_MAX_ROWS"] = (gemv_max, "largest measured token count where the GEMV beat the other paths "
                                           "on every shape")
    out["AUTO_FUSED_MAX_ROWS"] = (fused_max, "largest measured token count (above the GEMV's) where the fused "
                                             "kernel beat dequant + cuBLAS on every shape")
    variants = [
        ("nf4.BYTE_TABLE", not nf4_mod.BYTE_TABLE, nf4_mod.BYTE_TABLE,
         [(r.get("fused_other_table_graph_ms"), r.get("fused_graph_ms")) for r in rows]
         + [(r.get("ours_other_table_graph_ms"), r.get("ours_graph_ms")) for r in result.get("dequant", [])]),
        ("nf4_matmul.SPLIT_SWAP", not nm.SPLIT_SWAP, nm.SPLIT_SWAP,
         [(r.get("fused_other_swap_graph_ms"), r.get("fused_graph_ms")) for r in rows]),
        ("nf4_gemv.GEMV_BLOCKS", not nf4_gemv.GEMV_BLOCKS, nf4_gemv.GEMV_BLOCKS,
         [(r.get("gemv_elementwise_graph_ms"), r.get("gemv_graph_ms")) for r in rows if r["tokens"] == 1]),
        ("nf4_gemv.GEMV_STAGES", 3, nf4_gemv.GEMV_STAGES,
         [(r.get("gemv_pipelined_graph_ms"), r.get("gemv_elementwise_graph_ms", r.get("gemv_graph_ms")))
          for r in rows if r["tokens"] > 1 or "gemv_elementwise_graph_ms" in r]),
    ]
    for name, other, current, pairs in variants:
        won, n = _faster_share(pairs)
        out[name] = (other if n and won * 2 > n else current, f"the other value won {won} of {n} rows")
    return out


def format_recommendation(result: dict) -> str:
    rec = recommend(result)
    if not rec:
        return ""
    lines = ["", "Settings these timings support (from ``recommend``; a change is applied by hand, with the run cited):",
             ""]
    lines += [f"- {name} = {value!r}: {why}" for name, (value, why) in rec.items()]
    return "\n".join(lines)


if __name__ == "__main__":
    import json
    import sys
    from pathlib import Path

    dev = sys.argv[1] if len(sys.argv) > 1 else ("cuda" if torch.cuda.is_available() else "cpu")
    res = run(dev)
    out = Path("bench/results")
    out.mkdir(parents=True, exist_ok=True)
    name = "cuda" if dev.startswith("cuda") else "cpu"
    (out / f"{name}-nf4-kernels.json").write_text(json.dumps(res, indent=2))
    (out / f"{name}-nf4-kernels.md").write_text(format_table(res) + "\n")
    print(format_table(res))
