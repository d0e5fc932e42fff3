"""Training configuration (one dataclass for SFT and DPO) and the trainer's one-line error."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from reflectevo.errors import ReflectEvoError

SFT_MODES = ("one-stage", "reflect", "correct")
SFT_PROMPTS = ("test-time", "stored")
SCHEDULERS = ("cosine", "linear", "constant")
OPTIMIZERS = ("adamw", "paged_adamw_8bit")
DPO_LOSSES = ("sigmoid", "ipo", "hinge", "robust")
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class TrainError(ReflectEvoError, ValueError):
    """Bad training input or a failed step; the message is one line (file:line, option or step named)."""


@dataclass
class TrainConfig:
    # data
    mode: str = "one-stage"                 # SFT only: one-stage | reflect | correct
    sft_prompt: str = "test-time"           # SFT prompts: "test-time" (what eval sends) | "stored" (as recorded)
    prompts: str | None = None              # SFT: a --prompts JSON file (eval's templates) for the prompts built here
    task: str | None = None                 # the data's task (--task): records storing no prompt of eval's get eval's
    max_length: int = 1024                  # tokens per sequence (prompt + response [+ eot])
    max_prompt_length: int | None = None    # DPO: prompt tokens kept (the end of the prompt); None = 7/8 of max_length
    on_too_long: str = "error"              # a response that cannot fit max_length: "error" | "skip"
    eval_data: list | None = None           # held-out records (already read), or ...
    eval_fraction: float = 0.0              # ... a seeded fraction of the training records
    data_path: str = "<records>"            # for error messages (file:line)
    # schedule
    epochs: float = 1.0
    max_steps: int | None = None            # overrides epochs when set
    batch_size: int = 4                     # examples (SFT) or pairs (DPO) per micro-batch
    grad_accum: int = 1
    lr: float = 2e-4
    weight_decay: float = 0.0
    scheduler: str = "cosine"
    warmup_ratio: float = 0.03
    max_grad_norm: float = 1.0
    optim: str = "adamw"
    seed: int = 42
    # LoRA / precision
    lora_r: int = 16
    lora_alpha: float | None = None         # None = 2 * r
    lora_dropout: float = 0.0
    target_modules: tuple = DEFAULT_TARGETS
    use_rslora: bool = False
    qlora: bool | None = None               # None = on for CUDA, off for CPU (used by run_sft/run_dpo loading)
    gradient_checkpointing: bool | None = None   # None = on for CUDA, off for CPU
    bf16: bool | None = None                # None = autocast bf16 on CUDA
    cpu_compile: bool | None = None         # compiled CPU elementwise loops; None = on for CPU runs under bf16
    # DPO
    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    ref_on_the_fly: bool = False
    # run directory
    save_every: int = 0                     # 0 = only at the end
    eval_every: int = 0
    log_every: int = 1
    resume: bool = False
    progress: bool | None = None            # None = a bar when stderr is a terminal
    base_model_name: str = ""               # written into adapter_config.json
    extra: dict = field(default_factory=dict)

    def validate(self, dpo: bool) -> None:
        def bad(option, why):
            raise TrainError(f"--{option.replace('_', '-')}: {why}")

        if not dpo and self.sft_prompt not in SFT_PROMPTS:
            bad("sft_prompt", f"expected one of {', '.join(SFT_PROMPTS)}, got {self.sft_prompt!r}")
        if not dpo and self.mode not in SFT_MODES:
            bad("mode", f"expected one of {', '.join(SFT_MODES)}, got {self.mode!r}")
        if self.task is not None:
            from reflectevo.data.tasks import TASKS

            if self.task not in TASKS:
                bad("task", f"expected one of {', '.join(TASKS)}, got {self.task!r}")
        if self.max_length < 8:
            bad("max_length", f"must be >= 8, got {self.max_length}")
        if self.max_prompt_length is not None and not 1 <= self.max_prompt_length < self.max_length:
            bad("max_prompt_length", f"must lie in [1, max_length), got {self.max_prompt_length}")
        for name in ("epochs", "lr", "weight_decay", "warmup_ratio", "max_grad_norm", "lora_alpha", "lora_dropout",
                     "eval_fraction", "beta", "label_smoothing"):   # nan passes every comparison below, inf most
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                bad(name, f"must be a finite number, got {value}")
        if not -2**32 < self.seed < 2**32:   # the data order seeds torch generators with seed * 1_000_003 + epoch
            bad("seed", f"must lie in (-2**32, 2**32), got {self.seed}")
        if self.max_grad_norm < 0:
            bad("max_grad_norm", f"must be >= 0 (0 disables clipping), got {self.max_grad_norm}")
        if self.on_too_long not in ("error", "skip"):
            bad("on_too_long", f"expected error or skip, got {self.on_too_long!r}")
        if not 0.0 <= self.eval_fraction < 1.0:
            bad("eval_fraction", f"must lie in [0, 1), got {self.eval_fraction}")
        if self.eval_fraction and (self.eval_data is not None or self.extra.get("eval_path")):
            bad("eval_fraction", "and --eval-data both name the held-out data: give one of them")
        if self.lora_alpha is not None and not self.lora_alpha > 0:
            bad("lora_alpha", f"must be > 0 (the adapter's scale is alpha / r), got {self.lora_alpha}")
        if self.max_steps is not None and self.max_steps < 1:
            bad("max_steps", f"must be >= 1, got {self.max_steps}")
        if self.max_steps is None and not self.epochs > 0:
            bad("epochs", f"must be > 0, got {self.epochs}")
        for name in ("batch_size", "grad_accum", "lora_r", "log_every"):
            if getattr(self, name) < 1:
                bad(name, f"must be >= 1, got {getattr(self, name)}")
        for name in ("save_every", "eval_every"):
            if getattr(self, name) < 0:
                bad(name, f"must be >= 0, got {getattr(self, name)}")
        if self.eval_every and not self.eval_data and not self.extra.get("eval_path") and not self.eval_fraction:
            bad("eval_every", "has no held-out data to evaluate: give --eval-data FILE or --eval-fraction F")
        if not self.lr > 0:
            bad("lr", f"must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            bad("weight_decay", f"must be >= 0, got {self.weight_decay}")
        if self.scheduler not in SCHEDULERS:
            bad("scheduler", f"expected one of {', '.join(SCHEDULERS)}, got {self.scheduler!r}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            bad("warmup_ratio", f"must lie in [0, 1), got {self.warmup_ratio}")
        if self.optim not in OPTIMIZERS:
            bad("optim", f"expected one of {', '.join(OPTIMIZERS)}, got {self.optim!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            bad("lora_dropout", f"must lie in [0, 1), got {self.lora_dropout}")
        if dpo:
            if not self.beta > 0:
                bad("beta", f"must be > 0, got {self.beta}")
            if self.loss_type not in DPO_LOSSES:
                bad("loss", f"expected one of {', '.join(DPO_LOSSES)}, got {self.loss_type!r}")
            if not 0.0 <= self.label_smoothing < 0.5:
                bad("label_smoothing", f"must lie in [0, 0.5), got {self.label_smoothing}")

    @property
    def alpha(self) -> float:
        return float(self.lora_alpha) if self.lora_alpha is not None else 2.0 * self.lora_r

    def prompt_budget(self) -> int:
        """DPO: the most prompt tokens kept (TRL's max_prompt_length; 1800 of 2048 in the paper)."""
        if self.max_prompt_length is not None:
            return self.max_prompt_length
        return max(1, (self.max_length * 7) // 8)

    def fingerprint(self, dpo: bool) -> dict:
        """The settings a resumed run must share with the run it continues (the rest may change)."""
        keys = ["mode", "sft_prompt", "max_length", "max_prompt_length", "epochs", "max_steps", "batch_size", "grad_accum", "lr",
                "weight_decay", "scheduler", "warmup_ratio", "optim", "seed", "lora_r", "lora_alpha",
                "lora_dropout", "target_modules", "use_rslora", "eval_fraction", "on_too_long"]
        if dpo:
            keys = [k for k in keys if k not in ("mode", "sft_prompt")] + ["beta", "loss_type", "label_smoothing"]
        out = {k: getattr(self, k) for k in keys}
        out["target_modules"] = list(out["target_modules"])
        return out

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("eval_data", None)
        d["target_modules"] = list(d["target_modules"])
        return d
