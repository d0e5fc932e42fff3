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


def run_bench(what: str, device: str | None = None, quick: bool = False):
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    results, tables = {}, []
    for name in FAMILIES[what]:
        mod = importlib.import_module(name)
        kwargs = {"device": device}
        if quick and "quick" in inspect.signature(mod.run).parameters:
            kwargs["quick"] = True
        res = mod.run(**kwargs)
        results[name.rsplit(".", 1)[1]] = res
        tables.append(mod.format_table(res))
    return results, "\n\n".join(tables)
