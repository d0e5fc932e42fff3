"""LoRA adapters in PEFT's on-disk format, and merged-model export as a Hugging Face directory.

Adapter directory: ``adapter_config.json`` (peft_type LORA, r, lora_alpha, ...) + ``adapter_model.safetensors``
with keys ``base_model.model.model.<module path>.lora_A.weight`` [r, in] / ``.lora_B.weight`` [out, r]
(``base_model.model.lm_head...`` for the head). Our module paths are Hugging Face's minus the leading ``model.``.
The config (which keys are honoured or refused, per-module r / alpha from rank_pattern / alpha_pattern) is
reflectevo.model.peft_config's.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
from pathlib import Path

import torch

from reflectevo.atomic import fsync_dir
from reflectevo.errors import ModelLoadError
from reflectevo.model.lora import attach_lora, lora_modules, merged_state_dict, remove_lora
from reflectevo.model.peft_config import (  # noqa: F401  (HARMLESS_CONFIG_KEYS: re-exported)
    CONFIG_NAME,
    HARMLESS_CONFIG_KEYS,
    LoraHyperparameters,
    config_for,
    hyperparameters,
    read_config,
)
from reflectevo.model.safetensors_io import read_safetensors

WEIGHTS_NAME = "adapter_model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja")


def peft_key(module_path: str, which: str) -> str:
    """PEFT state key for our module path (``layers.0.self_attn.q_proj``) and ``lora_A`` / ``lora_B``."""
    head = module_path == "lm_head" or module_path.startswith("lm_head.")
    prefix = "base_model.model." if head else "base_model.model.model."
    return f"{prefix}{module_path}.{which}.weight"


def _our_path(key: str) -> tuple[str, str] | None:
    """(module path, 'lora_A' | 'lora_B') for a PEFT key, or None when it is not a LoRA A/B weight."""
    k = key
    for prefix in ("base_model.model.",):
        if k.startswith(prefix):
            k = k[len(prefix):]
    if k.startswith("model."):
        k = k[len("model."):]
    for which in ("lora_A", "lora_B"):
        for suffix in (f".{which}.weight", f".{which}.default.weight"):
            if k.endswith(suffix):
                return k[: -len(suffix)], which
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        pass
    return True


def _recover_stale(out_dir: Path) -> None:
    """Leftovers of a writer killed mid-swap: an ``.old<pid>`` folder comes back when ``out_dir`` is gone (a kill
    between the two renames); a dead process's other temporaries are removed."""
    pattern = re.compile(rf"\.{re.escape(out_dir.name)}\.(tmp|old)(\d+)")
    for stale in sorted(out_dir.parent.iterdir()):
        m = pattern.fullmatch(stale.name)
        if m is None or int(m.group(2)) == os.getpid() or _pid_alive(int(m.group(2))):
            continue
        if m.group(1) == "old" and not out_dir.exists():
            os.replace(stale, out_dir)
        else:
            shutil.rmtree(stale, ignore_errors=True)


def _fsync_tree(folder: Path) -> None:
    for f in folder.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    fsync_dir(folder)


def _atomic_dir(out_dir: Path, write) -> Path:
    """Write a folder as a whole: into a temporary sibling (files fsynced), then swapped in by renames."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _recover_stale(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write(tmp)
        _fsync_tree(tmp)
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old{os.getpid()}")
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
        fsync_dir(out_dir.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def adapter_config(model: torch.nn.Module, base_model_name_or_path: str = "") -> dict:
    """The adapter_config.json save_adapter writes for the model's LoRA layers (peft_config.config_for)."""
    return config_for(lora_modules(model), base_model_name_or_path)


def save_adapter(model: torch.nn.Module, out_dir, base_model_name_or_path: str = "") -> Path:
    """Write the adapter as PEFT does (config + safetensors); the directory appears complete or not at all."""
    from safetensors.torch import save_file

    cfg = adapter_config(model, base_model_name_or_path or getattr(getattr(model, "config", None), "name_or_path", ""))
    tensors = {}
    for name, m in lora_modules(model).items():
        tensors[peft_key(name, "lora_A")] = m.lora_A.weight.detach().to("cpu").contiguous()
        tensors[peft_key(name, "lora_B")] = m.lora_B.weight.detach().to("cpu").contiguous()

    def write(tmp: Path):
        (tmp / CONFIG_NAME).write_text(json.dumps(cfg, indent=2))
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})

    return _atomic_dir(Path(out_dir), write)


def _read_adapter(adapter_dir: Path) -> tuple[dict, dict]:
    cfg_path = adapter_dir / CONFIG_NAME
    cfg = read_config(cfg_path)
    bias = cfg.get("bias", "none")
    wpath = adapter_dir / WEIGHTS_NAME
    if wpath.is_file():
        weights = read_safetensors(wpath)  # errors name the file (truncated, corrupt header, ...)
    elif (adapter_dir / "adapter_model.bin").is_file():
        bpath = adapter_dir / "adapter_model.bin"
        try:
            weights = torch.load(bpath, map_location="cpu", weights_only=True)
        except Exception as e:  # unpickling / zip errors of every kind
            raise ModelLoadError(f"{bpath}: unreadable ({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None
        if not isinstance(weights, dict) or not all(isinstance(t, torch.Tensor) for t in weights.values()):
            raise ModelLoadError(f"{bpath}: expected a dict of tensors")
    else:
        raise ModelLoadError(f"{wpath}: adapter weights not found")
    # bias 'all' / 'lora_only' train the base layers' biases; on a model without any the file is plain LoRA
    trained = sorted(k for k in weights if k.endswith(".bias"))
    if bias != "none" and trained:
        raise ModelLoadError(f"{cfg_path}: bias={bias!r} adapters with trained base biases are not supported "
                             f"(the weights hold {trained[0]!r})")
    return cfg, weights


def _weights_path(adapter_dir: Path) -> Path:
    """The adapter's weight file: adapter_model.safetensors, else the older adapter_model.bin."""
    st = adapter_dir / WEIGHTS_NAME
    return st if st.is_file() or not (adapter_dir / "adapter_model.bin").is_file() else adapter_dir / "adapter_model.bin"


@torch.no_grad()
def load_adapter(model: torch.nn.Module, adapter_dir) -> torch.nn.Module:
    """Attach LoRA as the adapter's config says (unless already attached with the same r and scale) and load its
    weights. Each layer takes its own r / lora_alpha from rank_pattern / alpha_pattern (peft_config). Any key that
    names no module of ours, or has another shape, is an error naming the key."""
    adapter_dir = Path(adapter_dir)
    cfg, weights = _read_adapter(adapter_dir)
    wpath = _weights_path(adapter_dir)
    hp = hyperparameters(cfg, adapter_dir / CONFIG_NAME)
    mods = lora_modules(model)
    if not mods:
        # only modules the file has weights for get adapters (PEFT's target list may name absent layers)
        in_file = {p for p in (_our_path(k) for k in weights) if p is not None}
        paths = sorted({p for p, _ in in_file})
        if not paths:
            raise ModelLoadError(f"{wpath}: no lora_A/lora_B weights found")
        unknown = [p for p in paths if not _has_linear(model, p)]
        if unknown:
            raise ModelLoadError(f"{wpath}: key {peft_key(unknown[0], 'lora_A')!r} names no linear layer of this model")
        per_module = {p: hp.for_module(p) for p in paths}
        grads = [(p, p.requires_grad) for p in model.parameters()]
        attach_lora(model, r=hp.r, alpha=hp.alpha, dropout=hp.dropout, target_modules="|".join(map(re.escape, paths)),
                    use_rslora=hp.use_rslora, ranks={p: v[0] for p, v in per_module.items()},
                    alphas={p: v[1] for p, v in per_module.items()})
        try:
            return _fill_adapter(model, adapter_dir, weights, hp)
        except BaseException:  # a refused adapter leaves the model as it was
            remove_lora(model)
            for p, flag in grads:
                p.requires_grad_(flag)
            raise
    return _fill_adapter(model, adapter_dir, weights, hp)


def _fill_adapter(model, adapter_dir: Path, weights: dict, hp: LoraHyperparameters):
    """Check the model's LoRA layers against the config (r, scale: per module) and the file's keys and shapes
    against the layers, then copy the weights in."""
    wpath, cfg_path = _weights_path(adapter_dir), adapter_dir / CONFIG_NAME
    mods = lora_modules(model)
    hp.warn_unmatched(mods, cfg_path)
    expected, owner = {}, {}
    for name, m in mods.items():
        r, alpha, source = hp.for_module(name)
        source = f", {source}" if source else ""
        if m.r != r:
            raise ModelLoadError(f"{cfg_path}: r={r} for {name}{source} but the model's adapter has r={m.r}")
        scaling = hp.scaling(r, alpha)
        if not math.isclose(m.scaling, scaling):
            raise ModelLoadError(f"{cfg_path}: lora_alpha={alpha:g}, use_rslora={hp.use_rslora}{source} (scale "
                                 f"{scaling:g}) but the model's adapter {name} has scale {m.scaling:g}")
        for which in ("lora_A", "lora_B"):
            expected[peft_key(name, which)] = getattr(m, which).weight
            owner[peft_key(name, which)] = f"{name} (r={r}{source})"
    normalised = {}
    for key, t in weights.items():
        if key.endswith(".base_layer.weight"):  # PEFT stores a head / embedding base beside its adapter
            _check_base_copy(model, key, t, wpath)
            continue
        parsed = _our_path(key)
        if parsed is None:
            raise ModelLoadError(f"{wpath}: unexpected key {key!r} (not a LoRA A/B weight)")
        ours = peft_key(*parsed)
        if ours not in expected:
            raise ModelLoadError(f"{wpath}: key {key!r} names no LoRA layer of this model")
        if tuple(t.shape) != tuple(expected[ours].shape):
            raise ModelLoadError(f"{wpath}: key {key!r} has shape {tuple(t.shape)}, the model expects "
                                 f"{tuple(expected[ours].shape)} for {owner[ours]}")
        normalised[ours] = t
    missing = [k for k in expected if k not in normalised]
    if missing:
        raise ModelLoadError(f"{wpath}: adapter lacks {missing[0]!r}")
    for k, t in normalised.items():
        expected[k].copy_(t.to(dtype=expected[k].dtype, device=expected[k].device))
    return model


def _check_base_copy(model, key: str, t: torch.Tensor, wpath: Path) -> None:
    """A base weight PEFT saved beside an adapter must be this model's: error naming the key otherwise."""
    path = key.removeprefix("base_model.model.").removesuffix(".base_layer.weight")
    candidates = [path, path.removeprefix("model.")]
    for name in candidates:
        try:
            mod = model.get_submodule(name)
        except AttributeError:
            continue
        mod = getattr(mod, "base", mod)
        weight = getattr(mod, "weight", None)
        if isinstance(weight, torch.Tensor) and tuple(weight.shape) == tuple(t.shape):
            ref = weight.detach().float().cpu()
            if torch.allclose(t.float(), ref, rtol=1e-2, atol=1e-3 * float(ref.abs().max().clamp(min=1e-12))):
                return
        raise ModelLoadError(f"{wpath}: key {key!r} holds a base weight that differs from this model's "
                             f"(made for another model)")
    raise ModelLoadError(f"{wpath}: key {key!r} names no layer of this model")


def _has_linear(model, path: str) -> bool:
    from reflectevo.model.lora import NF4Linear

    try:
        m = model.get_submodule(path)
    except AttributeError:
        return False
    return isinstance(m, (torch.nn.Linear, NF4Linear))


@torch.no_grad()
def export_merged(model: torch.nn.Module, out_dir, tokenizer_dir=None, dtype: torch.dtype | None = None) -> Path:
    """A Hugging Face model directory (config.json + model.safetensors [+ tokenizer files]) with every adapter
    merged and every NF4 weight dequantised; ``dtype`` defaults to the model's embedding dtype."""
    from safetensors.torch import save_file

    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_hf"):
        raise ValueError("export_merged: the model has no ModelConfig (.config.to_hf)")
    dtype = dtype or model.embed_tokens.weight.dtype
    state = merged_state_dict(model, dtype)
    untie = config.tie_word_embeddings and "lm_head" in lora_modules(model)  # the merged head is its own weight
    if config.tie_word_embeddings and not untie:
        state.pop("lm_head.weight", None)
    tensors = {(k if k.startswith("lm_head.") else f"model.{k}"): v.to("cpu").contiguous() for k, v in state.items()}
    hf = config.to_hf()
    if untie:
        hf["tie_word_embeddings"] = False
    hf["torch_dtype"] = str(dtype).removeprefix("torch.")
    if config.name_or_path:
        hf["_name_or_path"] = config.name_or_path
    tok_dir = Path(tokenizer_dir) if tokenizer_dir is not None else None
    if tok_dir is not None and not (tok_dir / "tokenizer.json").is_file():
        raise ModelLoadError(f"{tok_dir / 'tokenizer.json'}: tokenizer.json not found")

    def write(tmp: Path):
        (tmp / "config.json").write_text(json.dumps(hf, indent=2))
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if tok_dir is not None:
            for name in TOKENIZER_FILES:
                if (tok_dir / name).is_file():
                    shutil.copy2(tok_dir / name, tmp / name)

    return _atomic_dir(Path(out_dir), write)
