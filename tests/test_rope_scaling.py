"""RoPE scaling "yarn" and "dynamic" (NTK) against transformers: frequencies, attention factor, and the logits of
tiny Llama / Qwen2 models on sequences longer than their original context, from config.json and from GGUF."""
import math

import pytest
import torch

from reflectevo.errors import ModelLoadError
from reflectevo.kernels.rope import dynamic_ntk_inv_freq, rope_attention_factor, rope_cos_sin, rope_inv_freq
from reflectevo.model import ModelConfig
from reflectevo.model.config import read_config_json
from reflectevo.model.gguf_loader import config_from_gguf
from reflectevo.model.loader import _read_hf_weights, build_model, load_model
from gguf_writer import write_tiny_gguf

transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=320, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, rms_norm_eps=1e-6)
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}

# name: (config class, max_position_embeddings, rope parameters)
MODELS = {
    "llama-yarn": ("LlamaConfig", 128, YARN),
    "qwen2-yarn-attention-factor": ("Qwen2Config", 128, {**YARN, "attention_factor": 0.8, "beta_fast": 16,
                                                         "beta_slow": 2}),
    "qwen2-yarn-mscale-untruncated": ("Qwen2Config", 128, {**YARN, "mscale": 2.0, "mscale_all_dim": 1.0,
                                                           "truncate": False}),
    "llama-dynamic": ("LlamaConfig", 32, {"rope_type": "dynamic", "factor": 2.0}),
    "qwen2-dynamic": ("Qwen2Config", 32, {"rope_type": "dynamic", "factor": 3.0}),
}


def hf_model(name, theta=10000.0):
    cls, max_pos, params = MODELS[name]
    cfg = getattr(transformers, cls)(**TINY, max_position_embeddings=max_pos,
                                     rope_parameters={**params, "rope_theta": theta})
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").float().eval()


def ours_from_config_json(tmp_path, hf):
    hf.save_pretrained(tmp_path)
    return build_model(read_config_json(tmp_path / "config.json"), _read_hf_weights(tmp_path), "cpu", torch.float32)


def assert_logits_match(ours, hf, ids):
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, rtol=1e-5, atol=2e-6)  # measured: ~2e-7


@pytest.mark.parametrize("name", [n for n in MODELS if "yarn" in n])
def test_yarn_logits_match_transformers_beyond_the_original_context(tmp_path, name):
    hf = hf_model(name)
    ours = ours_from_config_json(tmp_path, hf)
    assert ours.config.rope_type == "yarn"
    assert ours.rope_attention_factor == pytest.approx(hf.model.rotary_emb.attention_scaling, rel=1e-12)
    assert ours.rope_attention_factor != 1.0
    ids = torch.randint(0, 320, (2, 80), generator=torch.Generator().manual_seed(1))
    assert_logits_match(ours, hf, ids)
    assert_logits_match(ours, hf, ids[:, :20])  # yarn is static: the same frequencies below the original context


@pytest.mark.parametrize("name", [n for n in MODELS if "dynamic" in n])
def test_dynamic_ntk_logits_match_transformers(tmp_path, name):
    hf = hf_model(name)
    ours = ours_from_config_json(tmp_path, hf)
    assert ours.config.rope_type == "dynamic" and ours.rope_attention_factor == 1.0
    g = torch.Generator().manual_seed(1)
    # increasing lengths: transformers keeps the largest length seen, ours is stateless; they agree this way
    for T in (20, 32, 50, 80):
        assert_logits_match(ours, hf, torch.randint(0, 320, (2, T), generator=g))
    # a fresh model on 50 tokens after ours saw 80: the frequencies come from this call alone
    hf = hf_model(name)
    assert_logits_match(ours, hf, torch.randint(0, 320, (1, 50), generator=g))


def test_dynamic_ntk_changes_the_logits_beyond_max_positions(tmp_path):
    """The check above is not vacuous: plain RoPE gives other logits at 80 tokens, the same ones at 20."""
    hf = hf_model("llama-dynamic")
    ours = ours_from_config_json(tmp_path, hf)
    plain = build_model(ours.config.replace(rope_scaling=None), dict(ours.state_dict()), "cpu", torch.float32)
    ids = torch.randint(0, 320, (1, 80), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids[:, :20]), plain(ids[:, :20]))
        assert (ours(ids) - plain(ids)).abs().max() > 1e-3


def test_dynamic_ntk_per_token_tables_are_each_sequence_length_at_its_own_position(tmp_path):
    """The paged-KV rule: token p is rotated as the no-cache forward of the first p + 1 tokens rotates its last."""
    ours = ours_from_config_json(tmp_path, hf_model("qwen2-dynamic"))
    pos = torch.arange(80)[None]
    cos_tok, sin_tok = ours.rope_tables(pos, torch.float32, per_token=True)
    for p in (5, 31, 32, 47, 79):
        cos_full, sin_full = ours.rope_tables(pos[:, :p + 1], torch.float32)
        torch.testing.assert_close(cos_tok[0, p], cos_full[0, p], rtol=0, atol=1e-6)
        torch.testing.assert_close(sin_tok[0, p], sin_full[0, p], rtol=0, atol=1e-6)
    yarn = ours_from_config_json(tmp_path / "y", hf_model("llama-yarn"))
    for a, b in zip(yarn.rope_tables(pos, torch.float32, per_token=True), yarn.rope_tables(pos, torch.float32)):
        assert torch.equal(a, b)


YARN_GRID = [
    dict(factor=4.0, original_max_position_embeddings=32768),  # Qwen2.5 long context
    dict(factor=4.0, original_max_position_embeddings=32768, beta_fast=16, beta_slow=2, truncate=False),
    dict(factor=8.0, original_max_position_embeddings=4096, mscale=0.707, mscale_all_dim=0.707),
    dict(factor=2.0, original_max_position_embeddings=8192, mscale=1.0, mscale_all_dim=0.5),
    dict(factor=2.5, original_max_position_embeddings=2048, attention_factor=1.25),
    dict(factor=16.0, original_max_position_embeddings=4096, mscale=1.0),  # mscale alone: ignored
]


@pytest.mark.parametrize("params", YARN_GRID)
def test_yarn_frequencies_and_attention_factor_match_transformers(params):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = {"rope_type": "yarn", **params}
    cfg = transformers.Qwen2Config(hidden_size=1024, num_attention_heads=8, max_position_embeddings=131072,
                                   rope_parameters={**scaling, "rope_theta": 1e6})
    want, want_factor = ROPE_INIT_FUNCTIONS["yarn"](cfg, "cpu")
    assert torch.equal(rope_inv_freq(128, 1e6, scaling, 131072), want)
    assert rope_attention_factor(scaling, 131072) == pytest.approx(want_factor, rel=1e-12)
    pos = torch.tensor([[0, 1, 7, 4000, 40000, 131071]])
    hf_cos, hf_sin = transformers.models.qwen2.modeling_qwen2.Qwen2RotaryEmbedding(cfg)(torch.zeros(1), pos)
    cos, sin = rope_cos_sin(pos, 128, 1e6, scaling, max_position_embeddings=131072)
    torch.testing.assert_close(cos, hf_cos, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(sin, hf_sin, rtol=1e-6, atol=1e-6)


def test_yarn_defaults_as_transformers_fills_them():
    """original_max_position_embeddings defaults to max_position_embeddings, factor to their ratio."""
    full = rope_inv_freq(64, 10000.0, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512},
                         2048)
    assert torch.equal(rope_inv_freq(64, 10000.0, {"type": "yarn", "factor": 4.0}, 512), full)
    assert torch.equal(rope_inv_freq(64, 10000.0, {"type": "yarn", "original_max_position_embeddings": 512}, 2048),
                       full)
    assert rope_attention_factor({"type": "yarn", "original_max_position_embeddings": 512}, 2048) == \
        pytest.approx(1 + 0.1 * math.log(4.0))
    with pytest.raises(ValueError, match="original_max_position_embeddings"):
        rope_inv_freq(64, 10000.0, {"rope_type": "yarn", "factor": 4.0})


def test_dynamic_ntk_frequencies_match_transformers():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = transformers.LlamaConfig(hidden_size=1024, num_attention_heads=8, max_position_embeddings=4096,
                                   rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 5e5})
    lens = torch.tensor([100, 4096, 4097, 9000, 30000])
    got = dynamic_ntk_inv_freq(128, 5e5, 2.0, 4096, lens)
    assert got.shape == (5, 64)
    for i, n in enumerate(lens):
        want, factor = ROPE_INIT_FUNCTIONS["dynamic"](cfg, "cpu", seq_len=n)
        assert factor == 1.0
        torch.testing.assert_close(got[i], want, rtol=1e-6, atol=0)
    torch.testing.assert_close(got[0], rope_inv_freq(128, 5e5), rtol=1e-6, atol=0)  # plain up to max positions


def hf_json(arch, **kw):
    return {"architectures": [arch], **TINY, "max_position_embeddings": 128, **kw}


def test_config_json_layouts_and_refusals():
    old = ModelConfig.from_hf(hf_json("Qwen2ForCausalLM", rope_theta=1e6, rope_scaling={
        "type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}))
    new = ModelConfig.from_hf(hf_json("Qwen2ForCausalLM", rope_parameters={
        "rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0, "original_max_position_embeddings": 32}))
    assert old.rope_type == new.rope_type == "yarn"
    assert torch.equal(old.inv_freq(), new.inv_freq())
    assert old.rope_attention_factor() == new.rope_attention_factor() == pytest.approx(1 + 0.1 * math.log(4))
    dyn = ModelConfig.from_hf(hf_json("LlamaForCausalLM", rope_scaling={"type": "dynamic", "factor": 2.0}))
    assert dyn.rope_type == "dynamic" and torch.equal(dyn.inv_freq(), rope_inv_freq(16, 10000.0))
    assert ModelConfig.from_hf(dyn.to_hf()).rope_scaling == dyn.rope_scaling
    with pytest.raises(ModelLoadError, match=r"cfg\.json: rope_scaling type 'longrope' is not supported"):
        ModelConfig.from_hf(hf_json("LlamaForCausalLM", rope_scaling={"type": "longrope", "factor": 2.0}),
                            source="cfg.json")
    with pytest.raises(ModelLoadError, match=r"cfg\.json: .*'factor'"):
        ModelConfig.from_hf(hf_json("LlamaForCausalLM", rope_scaling={"type": "dynamic"}), source="cfg.json")


def gguf_fields(arch="qwen2", **rope):
    base = {"general.architecture": arch, f"{arch}.attention.head_count": 4, f"{arch}.embedding_length": 64,
            f"{arch}.feed_forward_length": 112, f"{arch}.block_count": 2, f"{arch}.vocab_size": 320,
            f"{arch}.context_length": 128}
    return {**base, **{f"{arch}.rope.scaling.{k}": v for k, v in rope.items()}}


def test_gguf_yarn_metadata_is_read_and_other_kinds_refused():
    names = {"output.weight"}
    cfg = config_from_gguf(gguf_fields(type="yarn", factor=4.0, original_context_length=32), names, "m.gguf")
    assert cfg.rope_scaling == {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}
    betas = config_from_gguf(gguf_fields("llama", type="yarn", factor=4.0, yarn_beta_fast=16.0, yarn_beta_slow=2.0,
                                         attn_factor=1.0), names, "m.gguf")
    assert betas.rope_scaling == {"rope_type": "yarn", "factor": 4.0, "beta_fast": 16.0, "beta_slow": 2.0}
    assert torch.equal(betas.inv_freq(), rope_inv_freq(16, 10000.0, {**betas.rope_scaling,
                                                                      "original_max_position_embeddings": 128}))
    for rope, key in [(dict(type="longrope", factor=4.0), "qwen2.rope.scaling.type"),
                      (dict(type="yarn"), "qwen2.rope.scaling.factor"),
                      (dict(type="yarn", factor=4.0, attn_factor=0.5), "qwen2.rope.scaling.attn_factor"),
                      (dict(type="yarn", factor=4.0, yarn_log_multiplier=0.1), "rope.scaling.yarn_log_multiplier")]:
        with pytest.raises(ModelLoadError) as e:
            config_from_gguf(gguf_fields(**rope), names, "m.gguf")
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith("m.gguf: ") and key in msg


def write_qwen2_gguf(path, hf, rope):
    """A float32 qwen2 GGUF of ``hf`` with the rope.scaling keys ``rope`` (llama.cpp does not permute qwen2)."""
    def scaling_keys(w):
        for key, value in rope.items():
            (w.add_string if isinstance(value, str) else w.add_uint32 if isinstance(value, int) else w.add_float32)(
                f"qwen2.rope.scaling.{key}", value)

    write_tiny_gguf(path, hf, "qwen2", add_keys=scaling_keys)


def test_qwen2_yarn_gguf_matches_transformers(tmp_path):
    cfg = transformers.Qwen2Config(**TINY, max_position_embeddings=128, rope_parameters={**YARN, "rope_theta": 1e4})
    torch.manual_seed(0)
    hf = transformers.Qwen2ForCausalLM(cfg).float().eval()
    write_qwen2_gguf(tmp_path / "q.gguf", hf, {"type": "yarn", "factor": 4.0, "original_context_length": 32})
    ours, _ = load_model(tmp_path / "q.gguf", dtype="float32")
    assert ours.config.rope_type == "yarn"
    assert_logits_match(ours, hf, torch.randint(0, 320, (1, 80), generator=torch.Generator().manual_seed(3)))
