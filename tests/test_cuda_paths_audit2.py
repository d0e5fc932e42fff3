"""CUDA-only branches checked on the CPU: the training summary's peak-memory window and the KV cache shares of
several engines on one card (torch.cuda calls replaced by stand-ins that record what they are given)."""
from __future__ import annotations

import types

import pytest
import torch

import reflectevo.gen as gen
import reflectevo.trainer.loop as loop
from reflectevo.gen.engine import GPU_MEMORY_UTILIZATION, Engine, gpu_kv_share
from trainer_tiny import cfg, d_plus, tiny_model, tiny_tokenizer

CUDA = torch.device("cuda", 0)
GIB = 2**30


# ---------------------------------------------------------------------------------------------------- peak memory
def test_peak_memory_helpers_reset_and_read_the_cuda_counters(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: calls.append(("reset", device)))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated",
                        lambda device=None: calls.append(("max", device)) or 3 * GIB)
    loop.reset_peak_memory(CUDA)
    assert loop.peak_memory_gib(CUDA) == 3.0
    assert calls == [("reset", CUDA), ("max", CUDA)]
    calls.clear()
    loop.reset_peak_memory(torch.device("cpu"))
    assert loop.peak_memory_gib(torch.device("cpu")) is None and calls == []


def test_the_peak_memory_window_opens_after_loading_and_before_the_first_step(tmp_path, monkeypatch):
    """torch.cuda.max_memory_allocated counts from the process start (or the last reset): without a reset the summary
    reported the model's loading and NF4 quantisation peak, or the DPO reference pass, as the training's."""
    from reflectevo.trainer.sft import SFTObjective

    events = []
    monkeypatch.setattr(loop, "reset_peak_memory", lambda device: events.append(("reset", device.type)))
    step = SFTObjective.micro_step
    monkeypatch.setattr(SFTObjective, "micro_step", lambda self, *a: events.append("step") or step(self, *a))
    from reflectevo.trainer import train_sft

    train_sft(tiny_model(), tiny_tokenizer(), d_plus(4), cfg(max_steps=2), tmp_path / "run")
    assert events[0] == ("reset", "cpu") and events.count(("reset", "cpu")) == 1 and events.count("step") == 2


# ---------------------------------------------------------------------------------------------------- KV budgets
class _Card:
    """A CUDA card's free memory; each engine built on it takes its KV cache out of it, sized as Engine sizes it."""

    def __init__(self, free_gib: float):
        self.start = self.free = free_gib * GIB
        self.caches: list[float] = []  # GiB per engine, in build order

    def mem_get_info(self, device=None):
        return self.free, 141 * GIB

    def engine_class(card):
        class CardEngine:
            def __init__(self, model, tokenizer, *, kv_cache_gib=None, **kwargs):
                budget = Engine._kv_budget(model.device, kv_cache_gib, GPU_MEMORY_UTILIZATION)
                card.free -= budget
                card.caches.append(budget / GIB)

        return CardEngine


@pytest.fixture
def card(monkeypatch):
    c = _Card(100.0)
    monkeypatch.setattr(torch.cuda, "mem_get_info", c.mem_get_info)
    monkeypatch.setattr(gen, "Engine", c.engine_class())
    return c


def _cuda_model():
    return types.SimpleNamespace(device=CUDA)


def test_gpu_kv_share_is_an_equal_part_of_the_free_memory(card):
    assert gpu_kv_share(_cuda_model(), 1) == pytest.approx(GPU_MEMORY_UTILIZATION * 100)
    assert gpu_kv_share(_cuda_model(), 3) == pytest.approx(GPU_MEMORY_UTILIZATION * 100 / 3)
    assert gpu_kv_share(types.SimpleNamespace(device=torch.device("cpu")), 2) is None  # the CPU default stays


def test_adapter_runs_split_the_card_between_their_two_engines(card):
    """Each engine left to its default took 85 % of what was free when it was built: 85 GiB for the trials, 12.75
    for the reflections, 2.25 left for every step's activations and CUDA-graph pools of both."""
    from reflectevo.cli_loop import build_engines

    build_engines(_cuda_model(), None, adapter=True)
    assert card.caches == pytest.approx([GPU_MEMORY_UTILIZATION * 100 / 2] * 2)
    assert card.free == pytest.approx((1 - GPU_MEMORY_UTILIZATION) * card.start)
    card.caches.clear()
    build_engines(_cuda_model(), None, adapter=True, kv_cache_gib=8.0)  # an explicit size is still halved
    assert card.caches == [4.0, 4.0]


def test_eval_with_both_adapters_gives_its_three_engines_equal_shares(card, tmp_path, monkeypatch):
    """`reflectevo eval --adapter A --trial2-adapter B` without --kv-cache-gib on CUDA: before, the third engine got
    1.9 % of the free memory and 0.34 % (~0.4 GB of an H200) was left for the activations of all three."""
    import reflectevo.cli_loop as cli_loop
    import reflectevo.data.eval_run as eval_run
    from reflectevo.cli import main

    adapters = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_config.json").write_text("{}")
        adapters.append(str(tmp_path / name))
    monkeypatch.setattr(cli_loop, "load_generation_model",
                        lambda args, adapter=None, option=None: (_cuda_model(), None))
    monkeypatch.setattr(eval_run, "run_eval", lambda *a, **k: {})
    monkeypatch.setattr(eval_run, "format_table", lambda results: "table")
    code = main(["eval", "--task", "arithmetic", "--limit", "1", "--model", "m", "--adapter", adapters[0],
                 "--trial2-adapter", adapters[1], "--out", str(tmp_path / "eval.json")])
    assert code == 0
    assert card.caches == pytest.approx([GPU_MEMORY_UTILIZATION * 100 / 3] * 3)
    assert card.free == pytest.approx((1 - GPU_MEMORY_UTILIZATION) * card.start)


# ---------------------------------------------------------------------------------------------------- the suite
@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA machine runs the whole suite this way already")
def test_tests_launching_kernels_on_cpu_tensors_skip_where_the_interpreter_is_off():
    """A CUDA machine runs the suite without TRITON_INTERPRET (conftest). Tests that launch a Triton kernel on CPU
    tensors directly, not through a dispatcher that raises InterpreterRequired, must skip there like the dispatched
    ones instead of failing on Triton's refusal of CPU pointers (14 tests of test_nf4.py did)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("triton")
    tests = Path(__file__).resolve().parent
    env = dict(os.environ, TRITON_INTERPRET="0", REFLECTEVO_KERNELS="")
    names = "every_cuda_tile or split_over_r or words_or_bytes or level_lookups_agree or partial_last_block"
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tests / "test_nf4.py"),
                          "-k", names], env=env, cwd=tests.parent, capture_output=True, text=True, timeout=600)
    summary = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else run.stderr[-2000:]
    assert run.returncode == 0 and "failed" not in summary and "passed" not in summary, run.stdout[-4000:]
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is not None:  # test_nf4.py skips as a whole without it
        assert "14 skipped" in summary, summary
