"""Frozen decoder linears stored in bf16 for a bf16-autocast run: bitwise the same training, and the CLI's setup."""
import json

import pytest
import torch
from safetensors.torch import load_file

from reflectevo.model import ModelConfig, Transformer
from reflectevo.model.lora import LoRALinear, lora_parameters
from reflectevo.trainer import train_dpo, train_sft
from reflectevo.trainer.loop import store_frozen_linears
from trainer_tiny import cfg, d_plus, d_pm, read_metrics, tiny_tokenizer


def biased_model(seed=0) -> Transformer:
    """Like trainer_tiny's model, with q/k/v/o and MLP biases (autocast casts those too)."""
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_layers=2,
                                    num_heads=4, num_kv_heads=2, tie_word_embeddings=True, attention_bias=True,
                                    mlp_bias=True))
    with torch.no_grad():
        model.embed_tokens.weight.normal_(0, 0.3)
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, 0.1)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _stored(model) -> dict:
    return {name: p.dtype for name, p in model.named_parameters()}


@pytest.mark.parametrize("checkpointing", [False, True])
def test_sft_with_bf16_frozen_linears_is_bitwise_the_autocast_run(tmp_path, checkpointing):
    # q and v only: the other five linears of a layer stay plain frozen nn.Linear layers, also cast
    c = dict(max_steps=3, bf16=True, gradient_checkpointing=checkpointing, target_modules=("q_proj", "v_proj"),
             lr=5e-2)
    train_sft(biased_model(), tiny_tokenizer(), d_plus(), cfg(**c), tmp_path / "fp32")
    stored = biased_model()
    assert store_frozen_linears(stored) == 2 * 7
    train_sft(stored, tiny_tokenizer(), d_plus(), cfg(**c), tmp_path / "bf16")
    a, b = read_metrics(tmp_path / "fp32"), read_metrics(tmp_path / "bf16")
    assert len(a) == 3 and a[-1]["loss"] != a[0]["loss"]          # the adapters moved the loss
    assert [m["loss"] for m in a] == [m["loss"] for m in b]
    assert [m["grad_norm"] for m in a] == [m["grad_norm"] for m in b]
    wa, wb = (load_file(str(tmp_path / r / "adapter" / "adapter_model.safetensors")) for r in ("fp32", "bf16"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_dpo_reference_and_steps_unchanged_by_bf16_frozen_linears(tmp_path):
    c = dict(max_steps=2, bf16=True, lr=5e-2)
    train_dpo(biased_model(), tiny_tokenizer(), d_pm(), cfg(**c), tmp_path / "fp32")
    stored = biased_model()
    store_frozen_linears(stored)
    train_dpo(stored, tiny_tokenizer(), d_pm(), cfg(**c), tmp_path / "bf16")
    refs = [json.loads((tmp_path / r / "state" / "ref_logps.json").read_text()) for r in ("fp32", "bf16")]
    assert refs[0]["logps"] and refs[0]["logps"] == refs[1]["logps"]      # scored with the adapters off
    a, b = read_metrics(tmp_path / "fp32"), read_metrics(tmp_path / "bf16")
    for key in ("loss", "grad_norm", "rewards/margins", "rewards/chosen"):
        assert [m[key] for m in a] == [m[key] for m in b], key


def test_only_frozen_fp32_decoder_linears_are_stored_in_bf16():
    from reflectevo.model.lora import attach_lora

    model = biased_model()
    attach_lora(model, r=4, alpha=8, target_modules=("q_proj", "down_proj"))
    model.layers[1].mlp.up_proj.weight.requires_grad_(True)          # a trainable base linear is left alone
    before = _stored(model)
    assert store_frozen_linears(model) == 2 * 7 - 1
    after = _stored(model)
    for name, dtype in after.items():
        cast = ("layers." in name and "_proj." in name and "lora_" not in name and "layers.1.mlp.up_proj" not in name)
        assert dtype == (torch.bfloat16 if cast else before[name]), name
    assert all(p.dtype == torch.float32 for p in lora_parameters(model))
    assert model.embed_tokens.weight.dtype == model.norm.weight.dtype == torch.float32
    assert store_frozen_linears(model) == 0                          # idempotent
    assert isinstance(model.layers[0].self_attn.q_proj, LoRALinear)


@pytest.mark.parametrize("bf16, want", [(["--bf16"], torch.bfloat16), ([], torch.float32),
                                        (["--no-bf16"], torch.float32)])
def test_cli_setup_stores_the_frozen_base_in_bf16_only_for_a_bf16_run(tmp_path, bf16, want):
    import argparse

    from reflectevo.trainer.cli_args import add_train_args, config_from_args, load_for_training
    from reflectevo.trainer.loop import prepare_model
    from test_trainer import save_tiny_model_dir

    model_dir = save_tiny_model_dir(tmp_path / "tiny")
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in d_plus(4)))
    parser = add_train_args(argparse.ArgumentParser(), dpo=False)
    args = parser.parse_args(["--data", str(data), "--mode", "reflect", "--model", str(model_dir), "--out",
                              str(tmp_path / "run"), "--device", "cpu", *bf16])
    c = config_from_args(args, dpo=False)
    model, _ = load_for_training(args, c)
    params = prepare_model(model, c, torch.device("cpu"))
    linears = [m for m in model.layers.modules() if isinstance(m, LoRALinear)]
    assert linears and all(m.base.weight.dtype == want for m in linears)
    assert all(p.dtype == torch.float32 and p.requires_grad for p in params.values())
    assert model.embed_tokens.weight.dtype == torch.float32


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
    bases = [m.base.weight.dtype for m in built["ours"].layers.modules() if isinstance(m, LoRALinear)]
    assert bases and set(bases) == {torch.bfloat16}
    table = train.format_table(res)
    assert "bf16 weights" in table and "Against the reference with bf16 weights" in table
