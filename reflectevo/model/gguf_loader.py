"""GGUF (llama.cpp) files -> ModelConfig, Tokenizer and a float state dict with our tensor names.

llama.cpp's converter permutes the rows of Q and K of llama-architecture models so that RoPE acts on adjacent
pairs (GPT-J style); the Hugging Face layout rotates the two halves of each head. We undo that permutation.
Qwen2 and Qwen3 keep the Hugging Face layout (llama.cpp rotates them NeoX style), so theirs stay as stored; a
Qwen3 file's per-head attn_q_norm / attn_k_norm weights (usually f32) act on whole heads and are never permuted.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from reflectevo.errors import ModelLoadError
from reflectevo.model.config import ModelConfig
from reflectevo.model.tokenizer import Tokenizer

_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",  # Qwen3's per-head q / k RMSNorms
}
_TOP_NAMES = {"token_embd": "embed_tokens", "output_norm": "norm", "output": "lm_head"}


def our_name(gguf_name: str) -> str | None:
    parts = gguf_name.split(".")
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in _LAYER_NAMES:
        return f"layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{parts[3]}"
    if len(parts) == 2 and parts[0] in _TOP_NAMES:
        return f"{_TOP_NAMES[parts[0]]}.{parts[1]}"
    return None


def unpermute_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of llama.cpp's permute: rows (head, half, pair) -> (head, pair, half) back to HF order."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def read_fields(reader) -> dict:
    out = {}
    for name, field in reader.fields.items():
        try:
            out[name] = field.contents()
        except Exception:  # a field type this gguf version cannot decode; not one we need
            continue
    return out


def load_gguf(path: str | Path, dtype: torch.dtype = torch.float32):
    """(config, tokenizer, state_dict) from a GGUF file; tensors dequantised to ``dtype``, one at a time."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"{path}: GGUF file not found")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:
        raise ModelLoadError(f"{path}: not a readable GGUF file ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    fields = read_fields(reader)
    config = config_from_gguf(fields, {t.name for t in reader.tensors}, str(path))
    try:
        tokenizer = Tokenizer.from_gguf_fields(fields)
    except ModelLoadError as e:
        raise ModelLoadError(f"{path}: {e}") from None
    except KeyError as e:
        raise ModelLoadError(f"{path}: GGUF metadata lacks {e.args[0]}") from None
    if not config.eos_token_ids:
        config.eos_token_ids = list(tokenizer.eos_token_ids)
    state = {}
    for t in reader.tensors:
        if t.name == "rope_freqs.weight":
            factors = gguf.quants.dequantize(t.data, t.tensor_type).reshape(-1).tolist()
            config = config.replace(rope_freq_factors=[float(f) for f in factors])
            continue
        name = our_name(t.name)
        if name is None:
            continue
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        try:
            arr = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise ModelLoadError(f"{path}: tensor {t.name} has unsupported type {t.tensor_type.name}") from None
        w = torch.from_numpy(np.array(arr, dtype=np.float32, copy=True).reshape(shape))
        if config.architecture in ("llama", "mistral"):
            if name.endswith("q_proj.weight") or name.endswith("q_proj.bias"):
                w = unpermute_rope_rows(w, config.num_heads)
            elif name.endswith("k_proj.weight") or name.endswith("k_proj.bias"):
                w = unpermute_rope_rows(w, config.num_kv_heads)
        state[name] = w.to(dtype)
    return config, tokenizer, state


def config_from_gguf(fields: dict, tensor_names: set[str], source: str) -> ModelConfig:
    arch = fields.get("general.architecture")
    if arch not in ("llama", "qwen2", "qwen3", "mistral"):
        raise ModelLoadError(f"{source}: unknown architecture {arch!r} (supported: llama, mistral, qwen2, qwen3)")

    def get(key, default=None):
        v = fields.get(f"{arch}.{key}", default)
        if v is None:
            raise ModelLoadError(f"{source}: GGUF metadata lacks {arch}.{key}")
        return v

    heads = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    scaling = _rope_scaling(fields, arch, source)
    vocab = fields.get(f"{arch}.vocab_size") or len(fields.get("tokenizer.ggml.tokens", []))
    window = fields.get(f"{arch}.attention.sliding_window")
    return ModelConfig(
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(get("feed_forward_length")),
        num_layers=int(get("block_count")),
        num_heads=heads,
        num_kv_heads=int(get("attention.head_count_kv", heads)),
        head_dim=int(fields.get(f"{arch}.attention.key_length") or fields.get(f"{arch}.rope.dimension_count") or hidden // heads),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        max_position_embeddings=int(get("context_length", 4096)),
        tie_word_embeddings="output.weight" not in tensor_names,
        attention_bias="blk.0.attn_q.bias" in tensor_names,
        sliding_window=int(window) if window else None,
        architecture="llama" if arch == "mistral" and not window else arch,
        name_or_path=str(fields.get("general.name", source)),
        bos_token_id=fields.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=[int(fields["tokenizer.ggml.eos_token_id"])] if "tokenizer.ggml.eos_token_id" in fields else [],
    )


# llama.cpp's YaRN knobs that have no plain transformers equivalent: refused unless at their defaults
_YARN_DEFAULTS = {"attn_factor": 1.0, "yarn_attn_factor": 1.0, "yarn_ext_factor": (-1.0, 1.0),
                  "yarn_log_multiplier": 0.0}


def _rope_scaling(fields: dict, arch: str, source: str) -> dict | None:
    """The ``rope_scaling`` dict of llama.cpp's {arch}.rope.scaling.* keys: none, linear or yarn.

    As llama.cpp reads them: the factor is rope.scaling.factor, else the older rope.scale_linear (what convert.py
    wrote for linear-scaled models until late 2023, with no type key); without a type key the scaling is linear,
    and a factor of 0 / 1 or none at all then means no scaling. A linear or yarn type without a positive factor
    is refused, naming the key.

    llama.cpp's YaRN (type, factor, original_context_length, yarn_beta_fast / yarn_beta_slow: what its
    converter writes for Qwen2 / Qwen2.5) scales cos/sin by 1 + 0.1 ln(factor) and floors / ceils the ramp
    bounds: transformers' "yarn" with its defaults. original_context_length defaults to context_length in both.
    """
    kind = fields.get(f"{arch}.rope.scaling.type")
    factor_key = f"{arch}.rope.scaling.factor"
    if fields.get(factor_key) is None and fields.get(f"{arch}.rope.scale_linear") is not None:
        factor_key = f"{arch}.rope.scale_linear"
    factor = fields.get(factor_key)
    if kind is None:  # llama.cpp's default type is linear; only a factor other than 0 / 1 scales anything
        if factor is None or float(factor) in (0.0, 1.0):
            return None
        kind = "linear"
    if kind == "none":
        return None
    if kind not in ("linear", "yarn"):
        raise ModelLoadError(f"{source}: RoPE scaling {kind!r} ({arch}.rope.scaling.type) is not supported "
                             "(none, linear, yarn)")
    if factor is None:
        raise ModelLoadError(f"{source}: GGUF metadata lacks {arch}.rope.scaling.factor")
    if not (math.isfinite(float(factor)) and float(factor) > 0):
        raise ModelLoadError(f"{source}: {factor_key} = {factor} is not supported (a positive factor)")
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(factor)}
    for key, default in _YARN_DEFAULTS.items():
        value = fields.get(f"{arch}.rope.scaling.{key}")
        if value is not None and float(value) not in (default if isinstance(default, tuple) else (default,)):
            raise ModelLoadError(f"{source}: {arch}.rope.scaling.{key} = {value} is not supported "
                                 "(YaRN is read with llama.cpp's defaults only)")
    scaling = {"rope_type": "yarn", "factor": float(factor)}
    orig = fields.get(f"{arch}.rope.scaling.original_context_length")
    if orig:
        scaling["original_max_position_embeddings"] = int(orig)
    for ours, key in (("beta_fast", "yarn_beta_fast"), ("beta_slow", "yarn_beta_slow")):
        if fields.get(f"{arch}.rope.scaling.{key}") is not None:
            scaling[ours] = float(fields[f"{arch}.rope.scaling.{key}"])
    return scaling
