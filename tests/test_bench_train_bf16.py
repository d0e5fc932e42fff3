"""`bench train --bf16` on the CPU: both stacks from fp32 weights under bf16 autocast, and the reference with
its weights loaded in bf16, at a tiny shape."""
import pytest
import torch

from reflectevo.model import ModelConfig, Transformer


def test_cpu_bf16_train_bench_times_the_reference_with_bf16_weights_too(monkeypatch):
    pytest.importorskip("peft")
    import reflectevo.bench.train as train
    from reflectevo.bench.sampler import hf_twin

    built = {}

    def tiny_models(source):
        torch.manual_seed(0)
        built["ours"] = Transformer(ModelConfig(vocab_size=49152, hidden_size=64, intermediate_size=128,
                                                num_layers=2, num_heads=4, num_kv_heads=2,
                                                tie_word_embeddings=True))
        return built["ours"], hf_twin(built["ours"])

    monkeypatch.setattr(train, "_cpu_models", tiny_models)
    res = train.run("cpu", quick=True, memory=False, bf16=True, seq=64)
    r = res["results"]
    assert {"ours_sft", "ref_sft", "ref16_sft", "ref16_dpo"} <= set(r)
    assert r["speedup_sft_vs_bf16_weights"] > 0 and r["speedup_dpo_cached_ref_vs_bf16_weights"] > 0
    # the same model and tokens: first losses agree to bf16 precision on all three stacks
    assert r["ours_sft"]["first_loss"] == pytest.approx(r["ref_sft"]["first_loss"], rel=2e-2)
    assert r["ref16_sft"]["first_loss"] == pytest.approx(r["ref_sft"]["first_loss"], rel=2e-2)
    for key, ref, ours in (("sft", "ref_sft", "ours_sft"), ("dpo_ref_on_the_fly", "ref_dpo", "ours_dpo_onthefly")):
        rounds = r[f"round_ratios_{key}"]  # each round's two steps, back to back
        assert rounds == [a / b for a, b in zip(r[ref]["times_s"], r[ours]["times_s"])]
        assert sorted(rounds)[(len(rounds) - 1) // 2] <= r[f"median_round_ratio_{key}"] <= max(rounds)
    table = train.format_table(res)
    assert "bf16 weights" in table and "Against the reference with bf16 weights" in table
    assert "Median of the per-round ratios" in table
