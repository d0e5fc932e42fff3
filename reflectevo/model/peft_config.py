"""PEFT's ``adapter_config.json`` for LoRA: reading and checking it, per-module r / lora_alpha, and writing it.

Per-module hyperparameters follow PEFT's ``rank_pattern`` / ``alpha_pattern``: each key is a regular expression
tried, in the file's order, against a module's full Hugging Face name (``model.layers.0.self_attn.q_proj``,
``lm_head``); it matches when it covers the whole name or the part after some dot, so ``q_proj``,
``layers.0.self_attn.q_proj`` and ``^model\\.layers\\.0\\..*`` all match that layer. The first key that matches gives
the value; without one the module takes ``r`` / ``lora_alpha``. The scale is then ``alpha / r`` (``alpha / sqrt(r)``
with ``use_rslora``) with that module's own r and alpha.

Keys (PEFT 0.21) and what the loader does with them:
  * honoured: r, lora_alpha, lora_dropout, use_rslora, rank_pattern, alpha_pattern; bias (a file with trained base
    biases is refused by peft_io); init_lora_weights, unless an init that rewrites the base weights (refused).
  * no effect on a loaded adapter: which layers carry adapters comes from the weight file (target_modules,
    exclude_modules, layers_to_transform, layers_pattern); fan_in_fan_out (PEFT turns it off for nn.Linear
    layers, and every layer of ours is one); settings for initialisation, training or other model kinds
    (eva_config, megatron_*, runtime_config, ensure_weight_tying - it acts only through an embedding adapter or
    modules_to_save, both refused -, qalora_group_size without use_qalora); bookkeeping (peft_type, task_type,
    base_model_name_or_path, revision, inference_mode, auto_mapping, peft_version).
  * refused when set, naming the key: everything else - use_dora, lora_bias, modules_to_save, layer_replication,
    target_parameters, trainable_token_indices, use_qalora, alora_invocation_tokens, use_bdlora, the *_config
    of other variants (loftq, corda, lora_ga, velora, monteclora, arrow, kasa) and any key unknown to us.
"""
from __future__ import annotations

import json
import math
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from reflectevo.errors import ModelLoadError

CONFIG_NAME = "adapter_config.json"
HARMLESS_CONFIG_KEYS = {"peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "use_rslora", "target_modules",
                        "exclude_modules", "layers_to_transform", "layers_pattern", "base_model_name_or_path",
                        "revision", "inference_mode", "init_lora_weights", "auto_mapping", "bias", "megatron_config",
                        "megatron_core", "eva_config", "runtime_config", "peft_version", "ensure_weight_tying",
                        "qalora_group_size", "rank_pattern", "alpha_pattern", "fan_in_fan_out"}
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")  # PEFT inits that rewrite the base weights
PEFT_DEFAULT_ALPHA = 8
PEFT_DEFAULT_R = 8


def hf_module_name(path: str) -> str:
    """Hugging Face's name of our module (``layers.0.mlp.up_proj`` -> ``model.layers.0.mlp.up_proj``)."""
    return path if path == "lm_head" or path.startswith("lm_head.") else f"model.{path}"


def _key_regex(key: str) -> re.Pattern:
    """A pattern key as PEFT applies it: the key itself, or it after any prefix that ends in a dot."""
    return re.compile(rf"(?:.*\.)?(?:{key})")


def pattern_key(patterns: dict, name: str) -> str | None:
    """The first key of ``patterns`` that matches module ``name`` as PEFT matches them (module docstring)."""
    for key in patterns:
        if _key_regex(key).fullmatch(name):
            return key
    return None


@dataclass(frozen=True)
class LoraHyperparameters:
    """An adapter's r / lora_alpha / lora_dropout / use_rslora and its per-module patterns."""
    r: int
    alpha: float
    dropout: float = 0.0
    use_rslora: bool = False
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)

    def for_module(self, path: str) -> tuple[int, float, str]:
        """(r, alpha, where they came from) for our module ``path``; the note is '' without a pattern."""
        name = hf_module_name(path)
        rk, ak = pattern_key(self.rank_pattern, name), pattern_key(self.alpha_pattern, name)
        note = ", ".join(f"{what} {k!r}" for what, k in (("rank_pattern", rk), ("alpha_pattern", ak)) if k is not None)
        return (int(self.rank_pattern[rk]) if rk is not None else self.r,
                float(self.alpha_pattern[ak]) if ak is not None else self.alpha, note)

    def scaling(self, r: int, alpha: float) -> float:
        return alpha / (math.sqrt(r) if self.use_rslora else r)

    def warn_unmatched(self, paths, cfg_path: Path) -> None:
        """PEFT ignores, with a warning, pattern keys that match none of the adapted modules: so do we."""
        names = [hf_module_name(p) for p in paths]
        for what, patterns in (("rank_pattern", self.rank_pattern), ("alpha_pattern", self.alpha_pattern)):
            for key in patterns:
                if not any(_key_regex(key).fullmatch(n) for n in names):
                    warnings.warn(f"{cfg_path}: {what} key {key!r} matches no module with an adapter (ignored)",
                                  RuntimeWarning, stacklevel=5)  # load_adapter's caller


def read_config(cfg_path: Path) -> dict:
    """adapter_config.json as a dict, checked: every key either honoured or without effect, else an error."""
    from reflectevo.model.config import read_json_object

    cfg = read_json_object(cfg_path, "adapter_config.json")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ModelLoadError(f"{cfg_path}: peft_type {cfg.get('peft_type')!r} is not supported (only LORA)")
    bias = cfg.get("bias", "none")
    if bias not in ("none", "all", "lora_only"):
        raise ModelLoadError(f"{cfg_path}: bias={bias!r} is not one of 'none', 'all', 'lora_only'")
    init = cfg.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(BASE_CHANGING_INITS):
        raise ModelLoadError(f"{cfg_path}: init_lora_weights={init!r} changes the base weights the adapter goes with "
                             f"(save it converted to plain LoRA)")
    for key, value in cfg.items():  # anything else that is set changes the forward pass in ways we do not model
        if key not in HARMLESS_CONFIG_KEYS and value not in (None, False, {}, [], ""):
            raise ModelLoadError(f"{cfg_path}: {key}={json.dumps(value)[:60]} is not supported")
    hyperparameters(cfg, cfg_path)
    return cfg


def _number(cfg_path: Path, key: str, v, positive_int: bool = False):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ModelLoadError(f"{cfg_path}: {key}={json.dumps(v)[:40]} is not a finite number")
    if positive_int and (v != int(v) or v <= 0):
        raise ModelLoadError(f"{cfg_path}: {key}={v} must be a positive integer")
    return v


def _pattern(cfg: dict, cfg_path: Path, key: str, positive_int: bool) -> dict:
    patterns = cfg.get(key) or {}
    if not isinstance(patterns, dict):
        raise ModelLoadError(f"{cfg_path}: {key} must be an object (module pattern -> value), got "
                             f"{json.dumps(patterns)[:40]}")
    for k, v in patterns.items():
        try:
            _key_regex(k)
        except re.error as e:
            raise ModelLoadError(f"{cfg_path}: {key} key {k!r} is not a valid regular expression ({e})") from None
        _number(cfg_path, f"{key}[{k!r}]", v, positive_int)
    return patterns


def hyperparameters(cfg: dict, cfg_path: Path) -> LoraHyperparameters:
    """The config's LoRA hyperparameters, PEFT's defaults for absent keys; bad values name the key."""
    r = _number(cfg_path, "r", cfg.get("r", PEFT_DEFAULT_R), positive_int=True)
    alpha = _number(cfg_path, "lora_alpha", cfg.get("lora_alpha", PEFT_DEFAULT_ALPHA))
    dropout = _number(cfg_path, "lora_dropout", cfg.get("lora_dropout", 0.0))
    if not 0.0 <= dropout < 1.0:
        raise ModelLoadError(f"{cfg_path}: lora_dropout={dropout} must lie in [0, 1)")
    return LoraHyperparameters(int(r), float(alpha), float(dropout), bool(cfg.get("use_rslora", False)),
                               _pattern(cfg, cfg_path, "rank_pattern", True),
                               _pattern(cfg, cfg_path, "alpha_pattern", False))


def _default_and_pattern(values: dict[str, float]) -> tuple[float, dict]:
    """(most common value, pattern giving every other module its own) for {our module path: value}: a module name's
    last part as key when all modules of that kind share a value, else each differing module's path."""
    default = Counter(values.values()).most_common(1)[0][0]
    kinds: dict[str, list[str]] = {}
    for path in values:
        kinds.setdefault(path.rpartition(".")[2], []).append(path)
    pattern = {}
    for kind, paths in kinds.items():
        distinct = {values[p] for p in paths}
        if distinct == {default}:
            continue
        if len(distinct) == 1:
            pattern[kind] = values[paths[0]]
        else:
            pattern.update({p: values[p] for p in paths if values[p] != default})
    return default, pattern


def config_for(mods: dict, base_model_name_or_path: str = "") -> dict:
    """PEFT's adapter_config.json for the LoRA layers ``mods`` ({our path: LoRALinear}); ranks and alphas that
    differ between layers go in rank_pattern / alpha_pattern. One dropout and one use_rslora for all, as PEFT."""
    if not mods:
        raise ValueError("save_adapter: the model has no LoRA adapters")
    first = next(iter(mods.values()))
    for name, m in mods.items():
        if (m.dropout_p, m.use_rslora) != (first.dropout_p, first.use_rslora):
            raise ValueError(f"save_adapter: {name} has lora_dropout / use_rslora different from the other adapters "
                             f"(a PEFT adapter has one of each)")
    r, rank_pattern = _default_and_pattern({n: m.r for n, m in mods.items()})
    alpha, alpha_pattern = _default_and_pattern({n: m.alpha for n, m in mods.items()})
    hp = LoraHyperparameters(r, alpha, first.dropout_p, first.use_rslora, rank_pattern, alpha_pattern)
    for name, m in mods.items():  # read back as PEFT will: every layer gets its own r and alpha
        if hp.for_module(name)[:2] != (m.r, m.alpha):
            raise AssertionError(f"save_adapter: patterns {rank_pattern} / {alpha_pattern} misread for {name}")
    targets = sorted({n.rpartition(".")[2] for n in mods})
    return {
        "alpha_pattern": alpha_pattern, "auto_mapping": None, "base_model_name_or_path": base_model_name_or_path,
        "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
        "layers_pattern": None, "layers_to_transform": None, "lora_alpha": alpha, "lora_dropout": first.dropout_p,
        "modules_to_save": None, "peft_type": "LORA", "r": r, "rank_pattern": rank_pattern, "revision": None,
        "target_modules": targets, "task_type": "CAUSAL_LM", "use_dora": False, "use_rslora": first.use_rslora,
    }
