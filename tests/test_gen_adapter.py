"""The batched sampler on a LoRA model (fp32 and NF4 bases): adapters switched off and on between calls of one
engine, and training the model after it generated."""
import pytest
import torch

from reflectevo.gen import Engine, SamplingParams
from reflectevo.model import ModelConfig, Transformer
from reflectevo.model.lora import adapters_disabled, attach_lora, lora_parameters, quantize_model
from test_gen import VOCAB, CharTokenizer, one_thread, plain_greedy, prompts_mixed  # noqa: F401 (fixture)


def adapted_model(quantized: bool, dropout: float = 0.0):
    torch.manual_seed(1)
    cfg = ModelConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                      num_kv_heads=2, max_position_embeddings=256, eos_token_ids=[0])
    model = Transformer(cfg)
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    if quantized:
        quantize_model(model, compute_dtype=torch.float32)
    attach_lora(model, r=4, alpha=8, dropout=dropout)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


@pytest.mark.parametrize("quantized", [False, True])
def test_one_engine_with_adapters_switched_off_and_on(quantized):
    """The prefix cache holds K/V computed with the adapters on; with them off the same tokens have other K/V."""
    model = adapted_model(quantized)
    prompts = prompts_mixed(12)
    eng = Engine(model, CharTokenizer(), kv_cache_gib=0.01)
    on = [plain_greedy(model, p, 8) for p in prompts]
    with adapters_disabled(model):
        off = [plain_greedy(model, p, 8) for p in prompts]
    assert on != off
    assert [o[0].token_ids for o in eng.generate(prompts, SamplingParams(max_tokens=8))] == on
    with adapters_disabled(model):
        assert [o[0].token_ids for o in eng.generate(prompts, SamplingParams(max_tokens=8))] == off
    assert [o[0].token_ids for o in eng.generate(prompts, SamplingParams(max_tokens=8))] == on


def test_training_after_generate_reuses_the_merged_weight():
    """The merged weight W + s·BA built while sampling (under inference mode) is reused by a training forward
    with unchanged weights: its backward must work and give the same gradients as a model that never sampled."""
    model, fresh = adapted_model(False), adapted_model(False)
    Engine(model, CharTokenizer(), kv_cache_gib=0.01).generate(prompts_mixed(12)[:1], SamplingParams(max_tokens=3))
    ids = torch.tensor([prompts_mixed(13)[1]])
    for m in (model, fresh):
        m.train()
        m(ids).logsumexp(-1).mean().backward()
    for p, q in zip(lora_parameters(model), lora_parameters(fresh)):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0)
