"""RoPE scaling parameters that cannot give finite frequencies are refused (one line naming the file and key),
and GGUF files read their scaling as llama.cpp does: the older ``{arch}.rope.scale_linear`` key (convert.py's
until late 2023, written without a type key) and a factor without a type are linear scaling."""
import math

import pytest
import torch

from reflectevo.errors import ModelLoadError
from reflectevo.model import ModelConfig
from reflectevo.model.gguf_loader import config_from_gguf

transformers = pytest.importorskip("transformers")

HF = dict(architectures=["LlamaForCausalLM"], vocab_size=64, hidden_size=32, intermediate_size=64,
          num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=64)
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 32}


@pytest.mark.parametrize("scaling, key", [
    ({"type": "yarn", "factor": 0}, "factor"),                      # was accepted: NaN logits
    ({"type": "linear", "factor": 0.0}, "factor"),                  # was accepted: inf frequencies, NaN logits
    ({"type": "dynamic", "factor": -3.0}, "factor"),                # NaN beyond max_position_embeddings
    ({"type": "yarn", "factor": float("nan")}, "factor"),           # was accepted: NaN logits
    ({"type": "linear", "factor": "two"}, "factor"),
    ({**LLAMA3, "low_freq_factor": 0}, "low_freq_factor"),          # was a ZeroDivisionError traceback
    ({**LLAMA3, "original_max_position_embeddings": 0}, "original_max_position_embeddings"),  # was accepted
    ({"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 0},
     "original_max_position_embeddings"),                           # was "cfg.json: math domain error"
])
def test_rope_parameters_without_finite_frequencies_are_refused(scaling, key):
    with pytest.raises(ModelLoadError) as e:
        ModelConfig.from_hf({**HF, "rope_scaling": scaling}, source="cfg.json")
    msg = str(e.value)
    assert msg.startswith("cfg.json: ") and repr(key) in msg and "\n" not in msg, msg


def test_rope_theta_that_divides_by_zero_is_a_one_line_error():
    with pytest.raises(ModelLoadError) as e:  # yarn divides by ln(theta): was a ZeroDivisionError traceback
        ModelConfig.from_hf({**HF, "rope_theta": 1.0, "rope_scaling": {"type": "yarn", "factor": 4.0}},
                            source="cfg.json")
    assert str(e.value).startswith("cfg.json: rope_theta=1.0") and "\n" not in str(e.value)


def test_factors_below_one_stay_accepted_as_in_transformers():
    cfg = ModelConfig.from_hf({**HF, "rope_scaling": {"type": "linear", "factor": 0.5}})
    assert torch.isfinite(cfg.inv_freq()).all()


def _fields(**extra):
    base = {"general.architecture": "llama", "llama.attention.head_count": 2, "llama.embedding_length": 32,
            "llama.feed_forward_length": 64, "llama.block_count": 1, "llama.vocab_size": 64,
            "llama.context_length": 64}
    return {**base, **{f"llama.{k}": v for k, v in extra.items()}}


def _hf_linear_inv_freq(factor):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = transformers.LlamaConfig(hidden_size=32, num_attention_heads=2, max_position_embeddings=64,
                                   rope_parameters={"rope_type": "linear", "factor": factor, "rope_theta": 1e4})
    return ROPE_INIT_FUNCTIONS["linear"](cfg, "cpu")[0]


@pytest.mark.parametrize("keys", [{"rope.scale_linear": 4.0},                       # convert.py, 2023
                                  {"rope.scaling.factor": 4.0},                     # a factor without a type
                                  {"rope.scaling.type": "linear", "rope.scale_linear": 4.0}])
def test_gguf_linear_scaling_as_llama_cpp_reads_it(keys):
    """llama.cpp: type defaults to "linear", the factor falls back to rope.scale_linear. These were read as plain
    RoPE (positions 4x too far apart for a model trained with linear factor 4) or refused."""
    cfg = config_from_gguf(_fields(**keys), {"output.weight"}, "m.gguf")
    assert cfg.rope_scaling == {"rope_type": "linear", "factor": 4.0}
    torch.testing.assert_close(cfg.inv_freq(), _hf_linear_inv_freq(4.0), rtol=0, atol=0)


@pytest.mark.parametrize("keys", [{}, {"rope.scale_linear": 1.0}, {"rope.scaling.factor": 0.0},
                                  {"rope.scaling.type": "none", "rope.scaling.factor": 4.0}])
def test_gguf_without_effective_scaling_is_plain_rope(keys):
    assert config_from_gguf(_fields(**keys), {"output.weight"}, "m.gguf").rope_scaling is None


@pytest.mark.parametrize("kind, value", [("yarn", 0.0), ("linear", -2.0), ("yarn", math.inf)])
def test_gguf_typed_scaling_with_a_factor_that_is_not_positive_is_refused(kind, value):
    with pytest.raises(ModelLoadError) as e:  # yarn 0 was accepted: NaN logits
        config_from_gguf(_fields(**{"rope.scaling.type": kind, "rope.scaling.factor": value}), {"output.weight"},
                         "m.gguf")
    msg = str(e.value)
    assert msg.startswith("m.gguf: llama.rope.scaling.factor") and "\n" not in msg, msg
