"""The sampler with scaled RoPE: greedy decoding through the paged KV cache (prefill, prefix-cache hits, decode,
emulated CUDA-graph steps) gives the argmax of the model's own no-cache forward, for YaRN (its attention factor
applied in every path) beyond the original context, and for dynamic NTK."""
import pytest
import torch

from reflectevo.gen import Engine, SamplingParams
from reflectevo.model import ModelConfig, Transformer
from test_gen import VOCAB, CharTokenizer, one_thread, plain_greedy  # noqa: F401 (fixture)

YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "attention_factor": 1.5}


def tiny_model(max_pos, scaling):
    cfg = ModelConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                      num_kv_heads=2, max_position_embeddings=max_pos, rope_scaling=scaling, eos_token_ids=[0])
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    with torch.no_grad():  # larger logits: fewer near-ties, so greedy comparisons are meaningful
        model.lm_head.weight.mul_(8.0)
    return model


def prompts(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture(scope="module")
def yarn_model():
    return tiny_model(128, YARN)


def test_yarn_greedy_through_the_kv_cache_matches_the_full_forward(yarn_model, one_thread):  # noqa: F811
    model, tok = yarn_model, CharTokenizer()
    assert model.rope_attention_factor == 1.5
    ps = prompts((5, 37, 45, 70))  # all but the first beyond the original 32 positions
    outs = Engine(model, tok, kv_cache_gib=0.01).generate(ps, SamplingParams(max_tokens=14))
    refs = [plain_greedy(model, p, 14) for p in ps]
    assert [o[0].token_ids for o in outs] == refs
    # the attention factor matters for these outputs: without it the same weights decode otherwise
    plain = Transformer(model.config.replace(rope_scaling={k: v for k, v in YARN.items() if k != "attention_factor"}))
    plain.load_state_dict(model.state_dict())
    assert plain.rope_attention_factor != 1.5
    assert [plain_greedy(plain.eval(), p, 14) for p in ps] != refs


def test_yarn_prefix_cache_hits_and_graph_steps_match_the_full_forward(yarn_model, one_thread):  # noqa: F811
    model, tok = yarn_model, CharTokenizer()
    prefix = prompts((48,), seed=2)[0]  # three full blocks of 16, past the original context
    a, b = prefix + [5, 6, 7], prefix + [9, 10, 11, 12, 13]
    eng = Engine(model, tok, kv_cache_gib=0.01, max_num_seqs=4)
    eng.runner.enable_graphs(4, eng.max_model_len, emulate=True)
    first = eng.generate([a], SamplingParams(max_tokens=10))[0][0].token_ids
    second = eng.generate([b, a], SamplingParams(max_tokens=10))
    assert eng.stats["prefix_cache_hit_tokens"] >= 48
    assert first == second[1][0].token_ids == plain_greedy(model, a, 10)
    assert second[0][0].token_ids == plain_greedy(model, b, 10)


def test_dynamic_ntk_greedy_matches_the_full_forward_up_to_the_context_limit(one_thread):  # noqa: F811
    """The engine stops at max_position_embeddings, where dynamic NTK is still plain RoPE (Transformer.rope_tables)."""
    model, tok = tiny_model(64, {"rope_type": "dynamic", "factor": 2.0}), CharTokenizer()
    ps = prompts((20, 50), seed=3)
    outs = Engine(model, tok, kv_cache_gib=0.01).generate(ps, SamplingParams(max_tokens=30))
    for p, o in zip(ps, outs):
        assert o[0].token_ids == plain_greedy(model, p, min(30, 64 - len(p)))


def test_yarn_context_is_the_original_length_times_the_factor(one_thread):  # noqa: F811
    """Qwen2.5's YaRN layout: max_position_embeddings equals the original context; the sampler serves factor
    times more, and decoding past max_position_embeddings still equals the full forward."""
    model, tok = tiny_model(32, YARN), CharTokenizer()
    assert model.config.context_length() == 128
    engine = Engine(model, tok, kv_cache_gib=0.01)
    assert engine.max_model_len == 128
    ps = prompts((40, 60), seed=3)
    outs = engine.generate(ps, SamplingParams(max_tokens=10))
    assert [o[0].token_ids for o in outs] == [plain_greedy(model, p, 10) for p in ps]
    plain = tiny_model(32, None)
    assert plain.config.context_length() == 32 and Engine(plain, tok, kv_cache_gib=0.01).max_model_len == 32
