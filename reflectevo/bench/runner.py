"""`reflectevo bench WHAT`: run one family of benchmarks and return (JSON-able result, Markdown table)."""
from __future__ import annotations

import importlib
import inspect

import torch

FAMILIES = {
    "kernels": ["reflectevo.bench.loss_kernels", "reflectevo.bench.nf4_kernels", "reflectevo.bench.norm_kernels"],
    "sampler": ["reflectevo.bench.sampler"],
    "train": ["reflectevo.bench.train"],
    "loop": ["reflectevo.bench.loop"],
}


def run_bench(what: str, device: str | None = None, quick: bool = False, on_result=None):
    """Run each benchmark of the family in turn; ``on_result(results, table)`` after each one, so a caller can
    save what is done before a later benchmark fails or the run is stopped. A benchmark that raises is recorded
    as ``{"error": ...}`` and the others still run."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    results, tables = {}, []
    for name in FAMILIES[what]:
        short = name.rsplit(".", 1)[1]
        try:
            mod = importlib.import_module(name)
            kwargs = {"device": device}
            if quick and "quick" in inspect.signature(mod.run).parameters:
                kwargs["quick"] = True
            res = mod.run(**kwargs)
            table = mod.format_table(res)
        except Exception as e:  # keep the other benchmarks' results
            res = {"error": f"{type(e).__name__}: {e}"}
            table = f"### {short}: FAILED ({res['error'][:300]})"
        results[short] = res
        tables.append(table)
        if on_result is not None:
            on_result(results, "\n\n".join(tables))
    return results, "\n\n".join(tables)


def failed(results: dict) -> list[str]:
    """Names of the benchmarks in ``results`` that raised."""
    return [k for k, v in results.items() if isinstance(v, dict) and "error" in v]
