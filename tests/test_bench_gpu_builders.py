"""The GPU benchmarks' model builders and step code, run on the CPU at a tiny Llama shape.

`reflectevo bench train` / `bench sampler` build Llama-3-8B-shaped models (ours in NF4, transformers with
bitsandbytes Linear4bit) only on CUDA, where a device session is short and rare: a broken builder would waste it.
Here the same code runs end to end with the shape shrunk; bitsandbytes' 4-bit layers run on the CPU too."""
import math

import pytest

pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")

import reflectevo.bench.sampler as sampler  # noqa: E402
import reflectevo.bench.train as train  # noqa: E402

TINY = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4, num_kv_heads=2,
            head_dim=32, eos_token_ids=[1])


@pytest.fixture
def tiny_llama(monkeypatch):
    monkeypatch.setattr(sampler, "LLAMA3_8B", dict(sampler.LLAMA3_8B, **TINY))


def test_train_bench_builders_take_sft_and_dpo_steps(tiny_llama):
    pairs = train.make_pairs(TINY["vocab_size"], 1, 96)
    ours = train.Ours(train._llama8b_ours("cpu"), pairs, 96, 8, "cpu", 2)
    ref = train.Reference(train._llama8b_hf("cpu"), pairs, 8, "cpu", 2)
    losses = [ours.sft(), ours.dpo(), ours.dpo(True), ref.sft(), ref.dpo()]
    assert all(math.isfinite(x) for x in losses), losses
    # a random 512-token vocabulary: the SFT loss starts near ln(512), DPO near ln(2)
    assert abs(losses[0] - math.log(512)) < 1.0 and abs(losses[3] - math.log(512)) < 1.0
    assert abs(losses[1] - math.log(2)) < 0.1 and abs(losses[4] - math.log(2)) < 0.1


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_sampler_decode_floor_runs_both_stacks(quantize):
    shape = {"model": "tiny", "num_prompts": 3, "prefix_tokens": 32, "suffix_tokens": 6, "n": 2, "max_tokens": 5}
    row = sampler.decode_floor("cpu", quantize, batch=3, prompt_tokens=24, max_tokens=4,
                               config=dict(sampler.LLAMA3_8B, **TINY), shape=shape, kv_cache_gib=0.01)
    assert row["quantize"] == (quantize or "bf16") and row["decode_step_ms"] > 0 and row["hf_decode_step_ms"] > 0
    assert 0 < row["fraction_of_floor"] and row["weight_bytes"] > 0
    assert row["ours"]["generated_tokens"] == row["hf"]["generated_tokens"] == 3 * 2 * 5
    assert row["rows"] == 6 and row["speedup"] > 0
    # the shared 32-token prefix is computed once on our side, once per row (n x prompts) on transformers'
    assert row["ours"]["prefill_tokens_computed"] < row["hf"]["prefill_tokens_computed"]
    table = sampler.format_table({"env": {"device": "cpu"}, "reflectevo_shape": {"error": "no model"},
                                  "llama3_8b_decode": [row, {"quantize": "nf4", "error": "boom"}]})
    assert "tiny" in table and "FAILED: boom" in table and "FAILED (no model)" in table


def test_nf4_bench_reads_the_fused_autotuners():
    """The CUDA rows of `bench kernels` name the fused kernel's chosen tiles from its autotuners; on 2026-11-30 that
    line failed on the H200 because `nm` was bound to the function `nf4_matmul`, not its module."""
    from reflectevo.bench import nf4_kernels

    tuned = nf4_kernels.nm._fused_tuned
    assert set(tuned) == {False, True}
    names = [nf4_kernels._tile_name(c) for c in tuned[False].configs]
    assert names and all(n.count("x") == 2 and " w" in n and " s" in n for n in names)


def test_train_bench_llama8b_run_end_to_end_and_keeps_our_rows_when_the_reference_fails(tiny_llama, monkeypatch):
    """The CUDA flow of `bench train` (one stack at a time, total peaks, table) at the tiny shape on the CPU."""
    res = train.run("cpu", quick=True, llama8b=True, seq=192)
    r = res["results"]
    assert res["seq"] == 192 and res["pairs"] == 1 and "bitsandbytes" in res["reference_stack"]
    assert {"ours_sft", "ours_dpo", "ours_dpo_onthefly", "ref_sft", "ref_dpo"} <= set(r)
    assert r["speedup_sft"] > 0 and r["ours_dpo"]["peak_extra_bytes"] is not None
    assert "Speed-up" in train.format_table(res)

    def broken(device):
        raise RuntimeError("no bitsandbytes CUDA")

    monkeypatch.setattr(train, "_llama8b_hf", broken)
    res = train.run("cpu", quick=True, llama8b=True, seq=192)
    assert "no bitsandbytes CUDA" in res["results"]["ref_error"] and "ours_dpo" in res["results"]
    assert "Reference stack FAILED" in train.format_table(res)


def test_nf4_bench_names_the_split_tile_for_decode_batches(monkeypatch):
    from reflectevo.bench import nf4_kernels

    monkeypatch.setattr(nf4_kernels.nm, "sm_count", lambda device: 132)
    assert nf4_kernels._fused_tile(64, 4096, 4096, False, "cuda") == "64x64x64 w4 s3 swap, 5 R splits"
    assert nf4_kernels._fused_tile(16, 1024, 4096, True, "cuda").startswith("16x64x64 w4 s3, ")


def test_sampler_bench_fused_nf4_thresholds_are_restored():
    import importlib

    nm = importlib.import_module("reflectevo.kernels.nf4_matmul")
    before = nm.AUTO_GEMV_MAX_ROWS, nm.AUTO_FUSED_MAX_ROWS
    seen = sampler._with_fused_nf4(lambda: (nm.AUTO_GEMV_MAX_ROWS, nm.AUTO_FUSED_MAX_ROWS), 64)
    assert seen == (nm.GEMV_MAX_ROWS, 64) and (nm.AUTO_GEMV_MAX_ROWS, nm.AUTO_FUSED_MAX_ROWS) == before
    with pytest.raises(ZeroDivisionError):
        sampler._with_fused_nf4(lambda: 1 / 0, 64)
    assert (nm.AUTO_GEMV_MAX_ROWS, nm.AUTO_FUSED_MAX_ROWS) == before
    row = {"quantize": "nf4", "batch": 64, "decode_step_ms": 15.0, "decode_step_cpu_ms": 1.0, "floor_ms": 2.25,
           "fraction_of_floor": 0.15, "hf_decode_step_ms": None, "decode_step_ms_fused": 4.5}
    table = sampler.format_table({"env": {"device": "cuda"}, "reflectevo_shape": {"error": "x"},
                                  "llama3_8b_decode": [row]})
    assert "| 4.50 (0.50) |" in table
