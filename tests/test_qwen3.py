"""Qwen3 (``Qwen3ForCausalLM``): per-head q / k RMSNorms before RoPE, an explicit head_dim, optional attention
biases (o_proj's too). A tiny random model built with transformers is the oracle for the Hugging Face directory,
a GGUF written as llama.cpp's converter lays out arch "qwen3", the sampler, LoRA / NF4 and the merged export."""
import copy

import pytest
import torch

from reflectevo.gen import Engine, SamplingParams
from reflectevo.model import load_model
from reflectevo.model.config import ModelConfig
from reflectevo.model.lora import NF4Linear, attach_lora, lora_parameters, quantize_model
from reflectevo.model.peft_io import export_merged
from reflectevo.model.transformer import RMSNorm
from test_gen import one_thread  # noqa: F401 (fixture)
from test_model import assert_packed_equals_separate, write_tiny_tokenizer
from gguf_writer import write_tiny_gguf

transformers = pytest.importorskip("transformers")

VOCAB = 320
# head_dim 32 with hidden 64 and 4 heads (hidden / heads = 16): q_proj is 64 -> 128, o_proj 128 -> 64
TINY = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=112, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32, max_position_embeddings=256, rms_norm_eps=1e-6)
VARIANTS = {
    "plain": {},
    "bias-tied-sliding": dict(attention_bias=True, tie_word_embeddings=True, use_sliding_window=True,
                              sliding_window=6, max_window_layers=1),
}


pytestmark = pytest.mark.usefixtures("one_thread")


def make_qwen3(d, **extra):
    """A saved random Qwen3ForCausalLM with random norm weights (transformers initialises them to 1, which would
    hide a norm applied without its weight, or q's and k's swapped)."""
    cfg = transformers.Qwen3Config(**{**TINY, "tie_word_embeddings": False, **extra})
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").float().eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.1)
    d.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(d)
    write_tiny_tokenizer(d)
    return hf


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("qwen3") / "plain"
    hf = make_qwen3(d)
    return hf, d


def _ids(b, t, seed=1):
    return torch.randint(0, VOCAB, (b, t), generator=torch.Generator().manual_seed(seed))


# ---- Hugging Face directory ---------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_logits_match_transformers(tmp_path, variant):
    hf = make_qwen3(tmp_path, **VARIANTS[variant])
    ours, _ = load_model(tmp_path, dtype="float32")
    cfg = ours.config
    assert cfg.architecture == "qwen3" and cfg.head_dim == 32 and cfg.qk_norm
    assert cfg.attention_bias == bool(VARIANTS[variant].get("attention_bias"))
    attn = ours.layers[0].self_attn
    assert isinstance(attn.q_norm, RMSNorm) and attn.q_norm.weight.shape == (32,)
    assert (attn.o_proj.bias is not None) == cfg.attention_bias  # Qwen3's o_proj takes attention_bias too
    ids = _ids(2, 24)
    with torch.no_grad():
        ref = hf(ids).logits
        got = ours(ids)
    assert (got - ref).abs().max().item() <= 1e-4
    if variant == "bias-tied-sliding":  # layers >= max_window_layers see 6 tokens back; 24 > 6, so it matters
        assert [cfg.window_for_layer(i) for i in range(3)] == [None, 6, 6]


def test_config_defaults_follow_qwen3config():
    base = dict(architectures=["Qwen3ForCausalLM"], vocab_size=100, hidden_size=64, intermediate_size=96,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    cfg = ModelConfig.from_hf(base)
    assert cfg.head_dim == 128 and not cfg.attention_bias and cfg.sliding_window is None  # Qwen3Config's defaults
    cfg = ModelConfig.from_hf({**base, "model_type": "qwen3", "architectures": None, "head_dim": 32,
                               "use_sliding_window": True, "sliding_window": 8,
                               "layer_types": ["sliding_attention", "full_attention"]})
    assert cfg.architecture == "qwen3" and [cfg.window_for_layer(i) for i in range(2)] == [8, None]
    back = transformers.Qwen3Config(**cfg.to_hf())
    assert back.head_dim == 32 and back.sliding_window == 8 and back.layer_types == cfg.layer_types


def test_packed_rows_and_checkpointing(pair):
    """Packed sequences equal separate ones; gradient checkpointing gives the same gradients, q_norm's included."""
    _, d = pair
    model, _ = load_model(d, dtype="float32")
    lens = [[13, 5], [4, 9, 5]]
    seqs = [[_ids(1, n, seed=10 + n) for n in row] for row in lens]
    packed, positions, seq_ids = assert_packed_equals_separate(model, seqs)
    model.train()
    q_norm = model.layers[1].self_attn.q_norm.weight
    k_norm = model.layers[1].self_attn.k_norm.weight
    q_norm.requires_grad_(True)
    k_norm.requires_grad_(True)
    grads = []
    for ckpt in (False, True):
        q_norm.grad = k_norm.grad = None
        model.gradient_checkpointing = ckpt
        model(packed, positions=positions, seq_ids=seq_ids).logsumexp(-1).sum().backward()
        grads.append((q_norm.grad.clone(), k_norm.grad.clone()))
    assert grads[0][0].abs().sum() > 0 and grads[0][1].abs().sum() > 0
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


# ---- sampler ------------------------------------------------------------------------------------------------

class _Tok:
    eos_token_ids = [0]

    def encode(self, text, add_special_tokens=False):
        return [1 + ord(c) % (VOCAB - 1) for c in text]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(97 + i % 26) for i in ids)


def _plain_greedy(model, prompt, steps):
    ids = list(prompt)
    for _ in range(steps):
        with torch.no_grad():
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.fixture(scope="module")
def sharp(pair):
    _, d = pair
    model, _ = load_model(d, dtype="float32")
    with torch.no_grad():  # larger logits: fewer near-ties, so greedy comparisons are meaningful
        model.lm_head.weight.mul_(8.0)
    return model


def test_sampler_greedy_matches_full_forward_with_prefix_cache_and_graph_buffers(sharp):
    model = sharp
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in (5, 37, 21)]
    sp = SamplingParams(max_tokens=8, ignore_eos=True)
    eng = Engine(model, _Tok(), kv_cache_gib=0.01)
    outs = eng.generate(prompts, sp)
    refs = [_plain_greedy(model, p, 8) for p in prompts]
    assert [o[0].token_ids for o in outs] == refs
    # a second prompt sharing the first 32 tokens (two blocks of 16) of the 37-token one: prefix-cache hit
    b = prompts[1][:32] + [7, 8, 9, 10, 11]
    before = dict(eng.stats)
    out = eng.generate([b], sp)
    assert eng.stats["prefix_cache_hit_tokens"] - before["prefix_cache_hit_tokens"] == 32
    assert out[0][0].token_ids == _plain_greedy(model, b, 8)
    # decode through the CUDA-graph static buffers (emulated: the same padded step, run eagerly)
    eng = Engine(model, _Tok(), kv_cache_gib=0.01, max_num_seqs=4)
    eng.runner.enable_graphs(4, eng.max_model_len, emulate=True)
    graphed = eng.generate(prompts, sp)
    assert [o[0].token_ids for o in graphed] == refs


# ---- GGUF ---------------------------------------------------------------------------------------------------

def write_qwen3_gguf(path, hf):
    """A qwen3-architecture GGUF of ``hf`` as llama.cpp's converter writes it: no Q/K row permutation (NeoX RoPE),
    head_dim as key_length / value_length, the per-head norms as f32 attn_q_norm / attn_k_norm, matrices in f16."""
    def qwen3_keys(w):
        w.add_key_length(hf.config.head_dim)
        w.add_value_length(hf.config.head_dim)
        w.add_rope_dimension_count(hf.config.head_dim)
        w.add_tokenizer_pre("qwen2")  # what llama.cpp names Qwen3's pre-tokenizer

    write_tiny_gguf(path, hf, "qwen3", add_keys=qwen3_keys, f16_matrices=True)


def test_gguf_loads_and_matches(pair, tmp_path):
    hf, d = pair
    write_qwen3_gguf(tmp_path / "tiny.gguf", hf)
    ours, _ = load_model(tmp_path / "tiny.gguf", dtype="float32")
    cfg = ours.config
    assert cfg.architecture == "qwen3" and cfg.head_dim == 32 and cfg.qk_norm and not cfg.attention_bias
    sd = hf.state_dict()
    for i in range(cfg.num_layers):  # stored as f32 and not permuted: bit-equal
        for n in ("q_norm", "k_norm"):
            ref = sd[f"model.layers.{i}.self_attn.{n}.weight"]
            assert torch.equal(getattr(ours.layers[i].self_attn, n).weight, ref)
        # f16 matrices, rows in Hugging Face order (a permutation would not survive this bound)
        ref = sd[f"model.layers.{i}.self_attn.q_proj.weight"]
        assert (ours.layers[i].self_attn.q_proj.weight - ref).abs().max() <= 1e-3 * ref.abs().max()
    ids = _ids(2, 24)
    rounded = copy.deepcopy(hf)  # the reference: the same f16-rounded matrices in transformers
    with torch.no_grad():
        for p in rounded.parameters():
            if p.dim() == 2:
                p.copy_(p.half().float())
        ref = rounded(ids).logits
        assert (ours(ids) - ref).abs().max().item() <= 1e-4


# ---- LoRA, NF4, merged export -------------------------------------------------------------------------------

def test_lora_step_trains_adapters_and_leaves_qk_norms_frozen(pair, tmp_path):
    hf, d = pair
    model, _ = load_model(d, dtype="float32")
    params = attach_lora(model, r=4, alpha=8)
    assert "q_norm" not in str([n for n, p in model.named_parameters() if p.requires_grad])
    norms = {n: p.detach().clone() for n, p in model.named_parameters()
             if n.endswith(("q_norm.weight", "k_norm.weight"))}
    assert len(norms) == 2 * model.config.num_layers
    model.train()
    model.gradient_checkpointing = True
    opt = torch.optim.AdamW(params, lr=1e-2)
    ids = _ids(1, 16, seed=5)
    seq_ids = torch.tensor([[0] * 9 + [1] * 7])
    positions = torch.tensor([list(range(9)) + list(range(7))])
    for _ in range(2):  # lora_B starts at zero: after one step lora_A gets gradients too
        opt.zero_grad()
        loss = model(ids, positions=positions, seq_ids=seq_ids).logsumexp(-1).mean()
        loss.backward()
        opt.step()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_parameters(model))
    for n, p in model.named_parameters():
        if n in norms:
            assert not p.requires_grad and p.grad is None and torch.equal(p, norms[n]), n
    # the merged export writes the norms under their Hugging Face names; transformers reads it back
    model.eval()
    out = export_merged(model, tmp_path / "merged")
    back = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(back).__name__ == "Qwen3ForCausalLM"
    merged_sd = back.state_dict()
    assert torch.equal(merged_sd["model.layers.2.self_attn.k_norm.weight"], norms["layers.2.self_attn.k_norm.weight"])
    with torch.no_grad():
        assert (back(_ids(1, 20)).logits - model(_ids(1, 20))).abs().max().item() <= 1e-4


def test_nf4_keeps_qk_norms_in_float(pair):
    hf, d = pair
    for model in (quantize_model(load_model(d, dtype="float32")[0], compute_dtype=torch.float32),
                  load_model(d, dtype="float32", quantize="nf4")[0]):
        attn = model.layers[0].self_attn
        assert isinstance(attn.q_proj, NF4Linear) and isinstance(attn.k_proj, NF4Linear)
        assert type(attn.q_norm) is RMSNorm and attn.q_norm.weight.dtype == torch.float32
        assert torch.equal(attn.k_norm.weight, hf.model.layers[0].self_attn.k_norm.weight)
        # the reference: transformers with the dequantised NF4 matrices and the float norms
        ref_model = copy.deepcopy(hf)
        with torch.no_grad():
            for name, m in model.named_modules():
                if isinstance(m, NF4Linear):
                    ref_model.get_submodule(f"model.{name}").weight.copy_(m.dequantize(torch.float32))
            ids = _ids(1, 12)
            assert (model(ids) - ref_model(ids).logits).abs().max().item() <= 1e-4
        attach_lora(model, r=2, alpha=4)
        assert not attn.q_norm.weight.requires_grad and not attn.k_norm.weight.requires_grad
