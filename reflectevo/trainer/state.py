"""Crash-safe run state: everything --resume needs, written atomically.

RUN/state/checkpoint.pt holds, in one file, the trainable (LoRA) tensors, the optimizer state, the trainer
position (step, examples consumed, scheduler step), the torch / CUDA / python / numpy RNG states and the settings
fingerprint. It is written to a temporary name in the same folder, fsynced, renamed over the old one and the
folder fsynced, so a SIGKILL at any moment leaves either the previous checkpoint or the new one, never a mix.
RUN/state/trainer.json is a readable copy of the position (informational). RUN/state/ref_logps.json caches the
DPO reference log-probs by example key.

On resume, RUN/metrics.jsonl and RUN/eval.jsonl are cut back to the lines with step <= the saved step (a torn
last line is dropped), so the resumed run appends exactly the lines an uninterrupted run would have written.
"""
from __future__ import annotations

import io
import json
import random
from pathlib import Path

import numpy as np
import torch

from reflectevo.atomic import atomic_write_bytes, atomic_write_json
from reflectevo.trainer.config import TrainError

CHECKPOINT = "checkpoint.pt"


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def save_checkpoint(state_dir: Path, params: dict[str, torch.Tensor], optimizer, position: dict,
                    fingerprint: dict) -> None:
    blob = {
        "params": {k: v.detach().cpu().clone() for k, v in params.items()},
        "optimizer": optimizer.state_dict(),
        "position": dict(position),
        "rng": rng_state(),
        "fingerprint": fingerprint,
    }
    buf = io.BytesIO()
    torch.save(blob, buf)
    atomic_write_bytes(state_dir / CHECKPOINT, buf.getvalue())
    atomic_write_json(state_dir / "trainer.json", {"position": position, "fingerprint": fingerprint})


def load_checkpoint(state_dir: Path) -> dict | None:
    path = state_dir / CHECKPOINT
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise TrainError(f"{path}: unreadable checkpoint ({' '.join(str(e).split())[:160]})") from None


def check_fingerprint(saved: dict, current: dict, path: Path) -> None:
    for key in sorted(set(saved) | set(current), key=lambda k: (k != "model_shape", k != "model", k)):
        if key == "lora_layout" and key not in saved:
            continue   # a checkpoint written before the layout was recorded: the shapes are checked on loading
        if saved.get(key) != current.get(key):
            if key == "lora_layout":
                raise TrainError(f"{path}: cannot resume, the LoRA layers differ from the saved run's "
                                 f"(saved {saved[key]!r}, now {current.get(key)!r}); resume with the --adapter, "
                                 f"--lora-r, --lora-alpha, --rslora and --target-modules the run started with")
            if key == "model_shape":
                raise TrainError(f"{path}: the saved adapter was made for another model "
                                 f"({saved.get(key)!r}, this run uses {current.get(key)!r})")
            if key == "model":
                raise TrainError(f"{path}: the run was made with other base weights (another checkpoint, or the "
                                 f"float vs NF4 form: --qlora); resume with the same --model and --qlora setting")
            if key == "data":
                raise TrainError(f"{path}: cannot resume, the training or held-out data differ from the saved run's "
                                 f"(or --max-length cut them differently)")
            raise TrainError(f"{path}: cannot resume, setting {key!r} differs "
                             f"(saved {saved.get(key)!r}, now {current.get(key)!r})")


def truncate_jsonl_to_step(path: Path, max_step: int) -> int:
    """Keep the complete lines of ``path`` whose "step" is <= max_step; returns how many were kept."""
    if not path.exists():
        return 0
    kept = []
    for line in path.read_bytes().split(b"\n"):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            continue  # a torn line from a killed writer
        if isinstance(obj, dict) and isinstance(obj.get("step"), int) and obj["step"] <= max_step:
            kept.append(line)
    atomic_write_bytes(path, b"".join(k + b"\n" for k in kept))
    return len(kept)


def append_line(path: Path, obj: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(obj) + "\n")
        f.flush()


def load_ref_cache(path: Path, digest: str) -> dict:
    if not path.is_file():
        return {}
    try:
        obj = json.loads(path.read_text())
    except ValueError:
        return {}
    if obj.get("digest") != digest:
        return {}
    return obj.get("logps", {})


def save_ref_cache(path: Path, digest: str, logps: dict) -> None:
    atomic_write_json(path, {"digest": digest, "logps": logps})
