"""ModelConfig: the shape of a Llama-family decoder, read from a Hugging Face config.json or GGUF metadata."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from reflectevo.errors import ModelLoadError
from reflectevo.kernels.rope import ROPE_TYPES, rope_attention_factor, rope_inv_freq, rope_kind

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
QWEN = ("qwen2", "qwen3")  # Qwen's sliding-window fields: use_sliding_window, max_window_layers, layer_types
KNOWN_ROPE_TYPES = ROPE_TYPES


@dataclass
class ModelConfig:
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    head_dim: int = 0  # 0 -> hidden_size // num_heads
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    rope_freq_factors: list[float] | None = None  # GGUF rope_freqs.weight (llama.cpp's Llama-3.1 scaling): divides inv_freq
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v biases; also o_proj's in Llama and Qwen3 (Qwen2's o_proj has none)
    mlp_bias: bool = False
    sliding_window: int | None = None
    max_window_layers: int = 0  # layers with index >= this use the sliding window (Qwen2); 0 = all
    layer_types: list[str] | None = None  # Qwen2/3's per-layer "full_attention" / "sliding_attention": wins when set
    architecture: str = "llama"
    name_or_path: str = ""
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)

    def __post_init__(self):
        if not self.head_dim:
            self.head_dim = self.hidden_size // self.num_heads
        if self.num_heads % self.num_kv_heads:
            raise ModelLoadError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.rope_scaling is not None:
            kind = rope_kind(self.rope_scaling)
            if kind not in KNOWN_ROPE_TYPES:
                raise ModelLoadError(f"rope_scaling type {kind!r} is not supported (supported: {KNOWN_ROPE_TYPES})")
            if kind == "default":
                self.rope_scaling = None
        try:  # a scaling without its parameters, or an odd head_dim, fails here and not mid-build with a traceback
            rope_inv_freq(self.head_dim, self.rope_theta, self.rope_scaling, self.max_position_embeddings)
            rope_attention_factor(self.rope_scaling, self.max_position_embeddings)
        except (ValueError, ArithmeticError) as e:  # ArithmeticError: rope_theta 0 or 1 (log / division by zero)
            raise ModelLoadError(f"rope_theta={self.rope_theta}, rope_scaling={self.rope_scaling}: {e}"
                                 if isinstance(e, ArithmeticError) else str(e)) from None
        if self.rope_freq_factors is not None and len(self.rope_freq_factors) != self.head_dim // 2:
            raise ModelLoadError(f"rope_freqs has {len(self.rope_freq_factors)} factors, head_dim {self.head_dim} "
                                 f"needs {self.head_dim // 2}")

    @property
    def qk_norm(self) -> bool:
        """Qwen3: an RMSNorm over each head of q and of k (weights of head_dim) after the projections, before RoPE."""
        return self.architecture == "qwen3"

    @property
    def rope_type(self) -> str:
        return rope_kind(self.rope_scaling)

    def inv_freq(self) -> torch.Tensor:
        """RoPE inverse frequencies [head_dim // 2] (fp32) with this model's scaling ("dynamic": those of
        sequences up to max_position_embeddings; Transformer.rope_tables computes longer ones)."""
        inv_freq = rope_inv_freq(self.head_dim, self.rope_theta, self.rope_scaling, self.max_position_embeddings)
        if self.rope_freq_factors is not None:
            inv_freq = inv_freq / torch.tensor(self.rope_freq_factors, dtype=torch.float32)
        return inv_freq

    def rope_attention_factor(self) -> float:
        """What cos and sin are multiplied by: YaRN's attention factor, else 1.0."""
        return rope_attention_factor(self.rope_scaling, self.max_position_embeddings)

    def context_length(self) -> int:
        """Positions the model is meant to attend over: max_position_embeddings, or with YaRN the original
        context times its factor when that is longer (Qwen2.5 ships 32768 with factor 4 for 131072 tokens)."""
        if self.rope_type != "yarn":
            return self.max_position_embeddings
        original = self.rope_scaling.get("original_max_position_embeddings") or self.max_position_embeddings
        factor = self.rope_scaling.get("factor") or 1.0
        return max(self.max_position_embeddings, int(original * factor))

    def window_for_layer(self, layer_idx: int) -> int | None:
        if self.sliding_window is None:
            return None
        if self.layer_types is not None:  # as transformers: the list wins over max_window_layers
            return self.sliding_window if self.layer_types[layer_idx] == "sliding_attention" else None
        return None if layer_idx < self.max_window_layers else self.sliding_window

    @classmethod
    def from_hf(cls, cfg: dict, source: str = "config.json") -> "ModelConfig":
        archs = cfg.get("architectures") or []
        arch = next((SUPPORTED_ARCHITECTURES[a] for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            model_type = cfg.get("model_type")
            if model_type in ("llama", "mistral", "qwen2", "qwen3"):
                arch = model_type
            else:
                raise ModelLoadError(
                    f"{source}: unknown architecture {archs or model_type!r} "
                    f"(supported: {sorted(SUPPORTED_ARCHITECTURES)})"
                )
        try:
            hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
            rope_scaling = cfg.get("rope_scaling")
            rope_theta = cfg.get("rope_theta")
            rope_params = cfg.get("rope_parameters")  # transformers >= 5 nests theta and scaling here
            if isinstance(rope_params, dict):
                rope_theta = rope_params.get("rope_theta", rope_theta)
                if rope_params.get("rope_type", "default") != "default":
                    rope_scaling = rope_params
            act = cfg.get("hidden_act", cfg.get("hidden_activation", "silu"))
            if act not in ("silu", "swish"):
                raise ModelLoadError(f"{source}: hidden_act {act!r} is not supported (this decoder uses SwiGLU: silu)")
            # a missing key takes transformers' default for the architecture (Mistral, Qwen2/3: a 4096-token window)
            window = cfg["sliding_window"] if "sliding_window" in cfg else (None if arch == "llama" else 4096)
            if arch in QWEN and not cfg.get("use_sliding_window", False):
                window = None
            layer_types = cfg.get("layer_types") if arch in QWEN else None  # Mistral's transformers ignores it
            kinds = ("full_attention", "sliding_attention")
            if layer_types is not None and (not isinstance(layer_types, list)
                                            or any(t not in kinds for t in layer_types)
                                            or len(layer_types) != int(cfg["num_hidden_layers"])):
                raise ModelLoadError(f"layer_types must list num_hidden_layers of {kinds}, got {layer_types!r}")
            eos = cfg.get("eos_token_id")
            return cls(
                vocab_size=int(cfg["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(cfg["intermediate_size"]),
                num_layers=int(cfg["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
                # transformers' Qwen3Config defaults head_dim to 128, not hidden / heads
                head_dim=int(cfg.get("head_dim") or (128 if arch == "qwen3" else hidden // heads)),
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                rope_theta=float(rope_theta if rope_theta is not None else 10000.0),
                rope_scaling=dict(rope_scaling) if rope_scaling else None,
                max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                # q/k/v biases: always in Qwen2, never in Mistral (their configs' attention_bias key is not read)
                attention_bias=(arch == "qwen2"
                                or (arch in ("llama", "qwen3") and bool(cfg.get("attention_bias", False)))),
                mlp_bias=bool(cfg.get("mlp_bias", False)) if arch == "llama" else False,
                sliding_window=int(window) if window else None,
                max_window_layers=int(cfg.get("max_window_layers", 28)) if arch in QWEN else 0,
                layer_types=list(layer_types) if layer_types is not None else None,
                architecture=arch,
                name_or_path=str(cfg.get("_name_or_path", "")),
                bos_token_id=cfg.get("bos_token_id"),
                eos_token_ids=list(eos) if isinstance(eos, list) else ([eos] if eos is not None else []),
            )
        except KeyError as e:
            raise ModelLoadError(f"{source}: missing field {e.args[0]!r}") from None
        except ModelLoadError as e:  # already says what is wrong; add the file where it does not name it
            msg = str(e)
            raise ModelLoadError(msg if msg.startswith(f"{source}:") else f"{source}: {msg}") from None
        except (TypeError, ValueError) as e:
            raise ModelLoadError(f"{source}: bad value ({e})") from None

    def to_hf(self) -> dict:
        """A config.json that transformers reads back as the same model."""
        if self.rope_freq_factors is not None:
            raise ValueError("this model's RoPE uses per-frequency factors from a GGUF rope_freqs tensor, which a "
                             "transformers config.json cannot express; export from the Hugging Face model instead")
        hf_arch = {v: k for k, v in SUPPORTED_ARCHITECTURES.items()}[self.architecture]
        cfg = {
            "architectures": [hf_arch],
            "model_type": self.architecture,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "torch_dtype": "float32",
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_ids[0] if len(self.eos_token_ids) == 1 else (self.eos_token_ids or None),
        }
        if self.architecture in ("llama", "qwen3"):
            cfg["attention_bias"] = self.attention_bias
        if self.architecture == "llama":
            cfg["mlp_bias"] = self.mlp_bias
        if self.architecture == "mistral":
            cfg["sliding_window"] = self.sliding_window
        if self.architecture in QWEN:
            cfg["use_sliding_window"] = self.sliding_window is not None
            cfg["sliding_window"] = self.sliding_window
            cfg["max_window_layers"] = self.max_window_layers
            if self.layer_types is not None:
                cfg["layer_types"] = list(self.layer_types)
        return cfg

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


def read_json_object(path: Path, name: str) -> dict:
    """A JSON object file (``name`` for the message when it is missing); one-line errors naming the file."""
    try:
        obj = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ModelLoadError(f"{path}: {name} not found") from None
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    if not isinstance(obj, dict):
        raise ModelLoadError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def read_config_json(path: Path) -> ModelConfig:
    return ModelConfig.from_hf(read_json_object(path, "config.json"), source=str(path))
