"""The optimisation loop shared by SFT and DPO: data order, accumulation, clipping, schedule, metrics, progress,
evaluation, atomic saves and exact resume.

An objective (``sft.SFTObjective`` / ``dpo.DPOObjective``) turns a micro-batch into a loss already weighted for
the step (so micro-batch losses add up to the step's loss) and a dict of metric sums. Everything else is here.

Data order: the examples of epoch e are ``randperm(n)`` from a generator seeded with (seed, e); optimizer step s
takes examples [s*B*G, (s+1)*B*G) of the endless concatenation of these epochs, and a run measured in epochs stops
at ceil(epochs * n) examples (its last step may be smaller). The position is thus a pure
function of the step, which makes --resume exact together with the saved RNG, optimizer and adapter states.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

from reflectevo.kernels.cpu_compiled import compiled_cpu_kernels
from reflectevo.trainer import state as st
from reflectevo.trainer.config import TrainConfig, TrainError
from reflectevo.trainer.data import Example, data_digest, make_batch
from reflectevo.trainer.schedule import lr_at

_STEP_DELAY = float(os.environ.get("REFLECTEVO_TRAIN_STEP_DELAY", "0") or 0)


# ------------------------------------------------------------------------------------------------------------
# model setup
# ------------------------------------------------------------------------------------------------------------
def prepare_model(model, cfg: TrainConfig, device: torch.device) -> dict[str, torch.nn.Parameter]:
    """Attach LoRA (unless the model already has adapters, which keep their r and alpha but take
    cfg.lora_dropout), freeze the rest; {name: trainable parameter}."""
    from reflectevo.model.lora import attach_lora, has_lora, lora_modules, lora_parameters

    for p in model.parameters():
        p.requires_grad_(False)
    attached = has_lora(model)
    if "lm_head" in (lora_modules(model) if attached else cfg.target_modules):
        raise TrainError(("--adapter: has a LoRA on lm_head" if attached else "--target-modules: lm_head") +
                         ", which this trainer cannot train (its fused loss reads the plain head weight)")
    if not attached:
        attach_lora(model, r=cfg.lora_r, alpha=cfg.alpha, dropout=cfg.lora_dropout,
                    target_modules=tuple(cfg.target_modules), use_rslora=cfg.use_rslora, dtype=torch.float32)
    else:  # an --adapter fixes r, alpha and the layers; dropout is a training setting, --lora-dropout's
        for m in lora_modules(model).values():
            m.dropout_p = float(cfg.lora_dropout)
    wanted = {id(p) for p in lora_parameters(model)}
    params = {n: p for n, p in model.named_parameters() if id(p) in wanted}
    if not params:
        raise TrainError("model: no LoRA parameters to train (check --target-modules)")
    for p in params.values():
        p.requires_grad_(True)
    model.gradient_checkpointing = bool(cfg.gradient_checkpointing if cfg.gradient_checkpointing is not None
                                        else device.type == "cuda")
    return params


def model_fingerprint(model) -> str:
    c = model.config
    return f"{c.architecture} layers={c.num_layers} hidden={c.hidden_size} ffn={c.intermediate_size} " \
           f"heads={c.num_heads}/{c.num_kv_heads} vocab={c.vocab_size}"


def base_weights_digest(model, samples: int = 1024) -> str:
    """A digest of the frozen base: each tensor's name, shape, dtype and ``samples`` evenly spaced elements (all of a
    smaller one), NF4 weights by their packed bytes and absmax codes. Two checkpoints of one architecture, or the
    float and NF4 forms of one checkpoint, differ here; the cost is a few thousand values per tensor."""
    import hashlib

    from reflectevo.model.lora import NF4Linear, lora_parameters

    skip = {id(p) for p in lora_parameters(model)}
    tensors = [(n, p) for n, p in model.named_parameters() if id(p) not in skip]
    for name, m in model.named_modules():
        if isinstance(m, NF4Linear):
            tensors += [(f"{name}.nf4.{k}", t) for k, t in sorted(m.q.tensors().items())]
    h = hashlib.sha256()
    for name, t in tensors:
        flat = t.detach().reshape(-1)
        if flat.numel() > samples:
            flat = flat[torch.arange(samples, device=flat.device) * (flat.numel() - 1) // (samples - 1)]  # int64
        h.update(f"{name} {tuple(t.shape)} {t.dtype}".encode())
        h.update(flat.to(torch.float64 if flat.is_floating_point() else torch.int64).cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def lora_layout(model) -> str:
    """The LoRA layers the run trains: how many, their ranks and scalings, and a digest of (name, r, scaling) of
    each. An --adapter fixes these, not --lora-r / --lora-alpha, so a resume must compare them on the model."""
    import hashlib

    from reflectevo.model.lora import lora_modules

    mods = sorted(lora_modules(model).items())
    text = "\n".join(f"{n} {m.r} {m.scaling!r}" for n, m in mods)
    ranks = sorted({m.r for _, m in mods})
    scalings = sorted({m.scaling for _, m in mods})
    return f"{len(mods)} layers r={ranks} scaling={scalings} {hashlib.sha256(text.encode()).hexdigest()[:12]}"


def model_identity(model, cfg: TrainConfig, device: torch.device) -> dict:
    """What a resumed run, or a cached reference, must share with the run that wrote it: the architecture, the
    base weights (float or NF4) and the compute precision."""
    bf16 = cfg.bf16 if cfg.bf16 is not None else device.type == "cuda"
    return {"model_shape": model_fingerprint(model), "model": base_weights_digest(model), "bf16": bool(bf16)}


def check_out_dir(out_dir, cfg: TrainConfig) -> None:
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise TrainError(f"--out {out}: exists and is not a directory")
    if not cfg.resume and (out / "state" / st.CHECKPOINT).exists():
        raise TrainError(f"--out {out}: already holds a run; pass --resume to continue it or choose a new --out")


def build_optimizer(params: list, cfg: TrainConfig, device: torch.device):
    if cfg.optim == "paged_adamw_8bit":
        try:
            import bitsandbytes as bnb
        except Exception as e:
            raise TrainError(f"--optim paged_adamw_8bit: bitsandbytes is not usable ({e})") from None
        return bnb.optim.PagedAdamW8bit(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    # fused on the CPU too (torch >= 2.4): one C++ loop per tensor where the for-loop path runs ~10 ops per tensor;
    # 420 LoRA tensors of SmolLM2: 15 vs 46 ms a step, results equal to ~1 fp32 ulp
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)


# ------------------------------------------------------------------------------------------------------------
# data order
# ------------------------------------------------------------------------------------------------------------
class Order:
    def __init__(self, n: int, seed: int):
        self.n, self.seed, self._cache = n, seed, {}

    def epoch(self, e: int) -> list[int]:
        if e not in self._cache:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + e)
            self._cache = {e: torch.randperm(self.n, generator=g).tolist()}
        return self._cache[e]

    def take(self, start: int, count: int) -> list[int]:
        return [self.epoch((start + k) // self.n)[(start + k) % self.n] for k in range(count)]


def _epoch_examples(n: int, cfg: TrainConfig) -> int:
    return math.ceil(round(cfg.epochs * n, 6))  # 0.1 * 30 is 3.0000000000000004


def total_steps(n: int, cfg: TrainConfig) -> int:
    if cfg.max_steps is not None:
        return cfg.max_steps
    return max(1, math.ceil(_epoch_examples(n, cfg) / (cfg.batch_size * cfg.grad_accum)))


def step_examples(step: int, n: int, cfg: TrainConfig) -> int:
    """How many examples optimizer step ``step`` takes: B*G, except that a run measured in epochs stops at
    ceil(epochs * n) examples, so its last step may take fewer (no example of the next epoch's order)."""
    per_step = cfg.batch_size * cfg.grad_accum
    if cfg.max_steps is not None:
        return per_step
    return max(0, min(per_step, _epoch_examples(n, cfg) - step * per_step))


# ------------------------------------------------------------------------------------------------------------
# progress
# ------------------------------------------------------------------------------------------------------------
class Progress:
    def __init__(self, total: int, enabled: bool | None, log_every: int, label: str):
        self.total, self.log_every, self.label = total, log_every, label
        self.bar = sys.stderr.isatty() and enabled is not False  # a file or pipe gets plain lines
        self.t0 = time.perf_counter()
        self.start_step = None

    def update(self, step: int, loss: float, tps: float) -> None:
        if self.start_step is None:
            self.start_step = step - 1
        done = step - self.start_step
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / max(1, done) * (self.total - step)
        text = f"{self.label} step {step}/{self.total} loss {loss:.4f} {tps:,.0f} tok/s ETA {_hms(eta)}"
        if self.bar:
            width = 24
            filled = int(width * step / max(1, self.total))
            sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {text}\x1b[K")
            if step >= self.total:
                sys.stderr.write("\n")
            sys.stderr.flush()
        elif step % self.log_every == 0 or step == self.total or done == 1:
            print(f"[reflectevo] {text}", file=sys.stderr, flush=True)

    def message(self, text: str) -> None:
        if self.bar:
            sys.stderr.write("\r\x1b[K")
        print(f"[reflectevo] {text}", file=sys.stderr, flush=True)


def _hms(seconds: float) -> str:
    s = int(max(0, seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


@contextlib.contextmanager
def _autocast(device: torch.device, cfg: TrainConfig):
    """bf16 autocast per ``cfg.bf16``, and on a CPU the compiled elementwise loops per ``cfg.cpu_compile``
    (None: with autocast). The nodes built inside keep their choice for the backward, which runs outside."""
    on = bool(cfg.bf16 if cfg.bf16 is not None else device.type == "cuda")
    compiled = device.type == "cpu" and (cfg.cpu_compile if cfg.cpu_compile is not None else on)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=on), compiled_cpu_kernels(bool(compiled)):
        yield


def reset_peak_memory(device: torch.device) -> None:
    """Start the summary's ``peak_memory_gib`` window here (CUDA): torch's peak counter otherwise runs from the
    process start, so it would report the model's loading (NF4 quantisation temporaries), the DPO reference pass
    or an earlier sampler instead of the training steps."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float | None:
    """GiB allocated at most since ``reset_peak_memory`` (everything resident counts: model, adapters, optimizer,
    the step's activations); None off CUDA."""
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


# ------------------------------------------------------------------------------------------------------------
# the loop
# ------------------------------------------------------------------------------------------------------------
def run_training(model, tokenizer, cfg: TrainConfig, out_dir, objective, train: list[Example],
                 evals: list[Example], dpo: bool, params: dict, extra_fingerprint: dict | None = None) -> dict:
    out = Path(out_dir)
    state_dir = out / "state"
    metrics_path, eval_path = out / "metrics.jsonl", out / "eval.jsonl"
    device = next(iter(params.values())).device
    total = total_steps(len(train), cfg)
    per_step = cfg.batch_size * cfg.grad_accum
    fingerprint = {**cfg.fingerprint(dpo), **model_identity(model, cfg, device), "num_examples": len(train),
                   "data": data_digest(train + evals), "lora_layout": lora_layout(model), **(extra_fingerprint or {})}
    optimizer = build_optimizer(list(params.values()), cfg, device)

    start = 0
    saved = st.load_checkpoint(state_dir) if cfg.resume else None
    if saved is not None:
        st.check_fingerprint(saved["fingerprint"], fingerprint, state_dir / st.CHECKPOINT)
        with torch.no_grad():
            for name, p in params.items():
                if name not in saved["params"]:
                    raise TrainError(f"{state_dir / st.CHECKPOINT}: the saved adapter lacks {name!r} "
                                     f"(made for another model or LoRA setting)")
                if saved["params"][name].shape != p.shape:   # a checkpoint older than its "lora_layout" entry
                    raise TrainError(f"{state_dir / st.CHECKPOINT}: the saved LoRA tensor {name!r} has shape "
                                     f"{tuple(saved['params'][name].shape)}, this model's {tuple(p.shape)} "
                                     f"(resume with the run's --adapter / --lora-r)")
                p.copy_(saved["params"][name].to(p.device, p.dtype))
        optimizer.load_state_dict(saved["optimizer"])
        start = int(saved["position"]["step"])
        st.set_rng_state(saved["rng"])
        st.truncate_jsonl_to_step(metrics_path, start)
        st.truncate_jsonl_to_step(eval_path, start)
    else:
        check_out_dir(out, cfg)
        for p in (metrics_path, eval_path):
            if p.exists():
                p.unlink()
    out.mkdir(parents=True, exist_ok=True)
    st.atomic_write_json(out / "config.json", {"kind": "dpo" if dpo else "sft", **cfg.to_dict(),
                                                "total_steps": total, "train_examples": len(train),
                                                "eval_examples": len(evals)})

    order = Order(len(train), cfg.seed)
    progress = Progress(total, cfg.progress, cfg.log_every, "dpo" if dpo else "sft")
    if start:
        progress.message(f"resuming at step {start}/{total} from {state_dir}")
    pad = tokenizer.pad_token_id
    model.train()
    reset_peak_memory(device)
    t_run = time.perf_counter()
    tokens_seen, last, last_eval = 0, {}, {}
    for step in range(start, total):
        t0 = time.perf_counter()
        lr = lr_at(step, total, cfg.lr, cfg.warmup_ratio, cfg.scheduler)
        for group in optimizer.param_groups:
            group["lr"] = lr
        idx = order.take(step * per_step, step_examples(step, len(train), cfg))
        micro = [[train[i] for i in idx[k:k + cfg.batch_size]] for k in range(0, len(idx), cfg.batch_size)]
        batches = [make_batch(m, cfg, dpo, pad) for m in micro]
        norm = objective.step_normaliser(batches)
        sums: dict[str, torch.Tensor] = {}
        for b in batches:
            b = b.to(device)
            with _autocast(device, cfg):
                loss, stats = objective.micro_step(model, b, norm)
            loss.backward()
            for k, v in stats.items():
                sums[k] = sums.get(k, 0.0) + v.detach().float()
        loss_value = float(sums["loss"])
        if not math.isfinite(loss_value):
            raise TrainError(f"step {step + 1}: non-finite loss ({loss_value}) on the batch of examples "
                             f"{_example_keys(micro)}")
        plist = list(params.values())
        if cfg.max_grad_norm and cfg.max_grad_norm > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(plist, cfg.max_grad_norm))
        else:
            grad_norm = float(torch.linalg.vector_norm(torch.stack([p.grad.float().norm() for p in plist
                                                                    if p.grad is not None])))
        if not math.isfinite(grad_norm):
            raise TrainError(f"step {step + 1}: non-finite gradient norm ({grad_norm}) with a finite loss "
                             f"({loss_value:.4g}) on the batch of examples {_example_keys(micro)}; nothing was "
                             f"stepped, the last save in {out} is intact")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        n_tok = sum(b.num_tokens for b in batches)
        tokens_seen += n_tok
        dt = time.perf_counter() - t0
        line = {"step": step + 1, "loss": loss_value, "lr": lr, "grad_norm": grad_norm,
                "tokens_per_s": n_tok / max(dt, 1e-9), "tokens": n_tok,
                "epoch": (step * per_step + len(idx)) / len(train)}
        line.update({k: float(v) for k, v in sums.items() if k != "loss"})
        st.append_line(metrics_path, line)
        last = line
        if _STEP_DELAY:
            time.sleep(_STEP_DELAY)  # test hook: widens the window between a step's metrics line and its save
        progress.update(step + 1, loss_value, line["tokens_per_s"])
        done = step + 1
        if evals and (done == total or (cfg.eval_every and done % cfg.eval_every == 0)):
            last_eval = evaluate(model, objective, evals, cfg, dpo, pad, device)
            st.append_line(eval_path, {"step": done, **last_eval})
            progress.message(f"eval at step {done}: " + ", ".join(f"{k} {v:.4f}" for k, v in last_eval.items()))
            model.train()
        if done == total or (cfg.save_every and done % cfg.save_every == 0):
            save_all(model, out, params, optimizer, {"step": done, "examples_seen": step * per_step + len(idx),
                                                      "scheduler_step": done, "total_steps": total}, fingerprint, cfg)
    if start >= total:
        progress.message(f"{out}: already trained to step {total}; nothing to do")
        if (out / "summary.json").is_file():  # the finished run's own figures (its speed, its time) stay
            try:
                kept = json.loads((out / "summary.json").read_text())
                model.eval()
                return kept
            except (OSError, ValueError):
                pass  # unreadable: written anew below
        lines = metrics_path.read_text().splitlines() if metrics_path.exists() else []
        last = json.loads(lines[-1]) if lines else {}
    if evals and not last_eval and eval_path.exists():   # a finished run resumed: report its last evaluation
        lines = eval_path.read_text().splitlines()
        last_eval = {k: v for k, v in json.loads(lines[-1]).items() if k != "step"} if lines else {}
    model.eval()
    wall = time.perf_counter() - t_run
    summary = {
        "kind": "dpo" if dpo else "sft", "out": str(out), "steps": total, "resumed_from": start,
        "train_examples": len(train), "eval_examples": len(evals),
        "final": {k: v for k, v in last.items() if k not in ("tokens", "epoch")},
        "eval": last_eval, "train_seconds": round(wall, 3),
        "tokens_per_s": tokens_seen / wall if wall > 0 and tokens_seen else 0.0,
        "trainable_parameters": sum(p.numel() for p in params.values()),
        "adapter": str(out / "adapter"),
    }
    if device.type == "cuda":
        summary["peak_memory_gib"] = peak_memory_gib(device)
    st.atomic_write_json(out / "summary.json", summary)
    fin = summary["final"]
    print(f"[reflectevo] {summary['kind']} done: {total} steps, final loss {fin.get('loss', float('nan')):.4f}, "
          f"{summary['tokens_per_s']:,.0f} tok/s, adapter in {summary['adapter']}", file=sys.stderr, flush=True)
    return summary


def _example_keys(micro) -> str:
    keys = [ex.key for m in micro for ex in m]
    return ", ".join(keys[:8]) + (f" (+{len(keys) - 8} more)" if len(keys) > 8 else "")


def save_all(model, out: Path, params, optimizer, position, fingerprint, cfg) -> None:
    from reflectevo.model.peft_io import save_adapter

    # adapter first: a crash in between leaves the checkpoint at the previous save, so --resume redoes this step
    # and writes adapter/ again (the other order would let a finished run resume to "nothing to do" without it)
    save_adapter(model, out / "adapter", base_model_name_or_path=cfg.base_model_name or model.config.name_or_path)
    st.save_checkpoint(out / "state", params, optimizer, position, fingerprint)


@torch.no_grad()
def evaluate(model, objective, evals: list[Example], cfg, dpo, pad, device) -> dict:
    model.eval()
    batches = [make_batch(evals[k:k + cfg.batch_size], cfg, dpo, pad) for k in range(0, len(evals), cfg.batch_size)]
    norm = objective.step_normaliser(batches)
    sums: dict[str, float] = {}
    for b in batches:
        with _autocast(device, cfg):
            loss, stats = objective.micro_step(model, b.to(device), norm)
        for k, v in stats.items():
            sums[k] = sums.get(k, 0.0) + float(v)
    return {f"eval/{k}": v for k, v in sums.items()}
