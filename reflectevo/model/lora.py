"""QLoRA layers: a frozen NF4 base linear and LoRA adapters that wrap any base linear.

``y = base(x) + scaling · B(A(dropout(x)))`` with ``A`` [r, in] and ``B`` [out, r]; ``scaling = alpha / r`` or
``alpha / sqrt(r)`` with rsLoRA. Initialisation as PEFT: A Kaiming-uniform (a = sqrt(5)), B zero, so a fresh
adapter leaves the model unchanged. Only A and B train; the base stays frozen (NF4: 0.52 bytes/parameter).
Module and state names mirror PEFT (``...q_proj.lora_A.weight``) so reflectevo.model.peft_io maps keys 1:1.

Merged compute (an fp32 / fp64 float base on the CPU, no dropout in training): the layer keeps
``W' = W + scaling · B A`` (rebuilt whenever A, B or W change, detected by their version counters) and computes
``y = x W'^T``: one matmul instead of the base matmul plus two skinny rank-r ones, a scale and an add. Its backward
takes dx = dy W' (again one matmul) and the adapter gradients from ``u = x A^T`` saved in the forward:
dB = scaling · dy^T u, dA = scaling · (dy B)^T x. The price is one more copy of each adapted weight (fp32: 4 bytes a
parameter). Measured on a 2-core CPU: an SFT step of SmolLM2-135M with LoRA on every linear layer 9-16 % shorter
(interleaved runs).
Skipped where it would lose precision or memory: 16-bit bases or autocast (the small B A would round away), NF4
bases, CUDA; ``MERGED_COMPUTE = False`` turns it off.

QLoRA node (an NF4 base in training): the base matmul, the adapter's two products, the scale and the add are one
autograd node (``_QLoRA``) instead of five or six (cast, dequant-matmul, linear, dropout multiply, addmm), and the
input gradient adds the adapter's part into the base's with one addmm. Host time of a checkpointed forward +
backward of a 4-layer model at tiny shapes (dequantisation cached, so only dispatch and autograd are left; 2-core
CPU, 5 interleaved runs): 1.06-1.16x shorter; ``QLORA_NODE = False`` computes op by op.

Dense node under CPU autocast (a frozen float base, 16-bit autocast training on the CPU): one node
(``lora_node16``) casts x once instead of once per product and computes the adapter inside the base product
(x̂ = [x | u], Ŵ = [W | s B]); layers sharing an input take one node together (``lora_group``). The first version
(adapter added into the base output in place), SmolLM2-135M SFT step under bf16 autocast on a 2-core AMX Xeon:
median 4.55 s vs 4.87 s op by op (6 interleaved runs); ``DENSE16_NODE = False`` computes op by op.

Dropout (training only) multiplies x by a keep-mask drawn from 16-bit uniform integers, four from each full-range
64-bit draw, so P(drop) is p rounded to a multiple of 2^-16 (0.05 -> 0.0500031); the 1/P(keep) rescaling is
folded into the adapter's scale, which the small [tokens, r] product carries instead of x. Autograd keeps the
mask as bool (1 byte an element; nn.Dropout's CPU path keeps a float one). Against nn.Dropout, which draws one
Bernoulli per element from the CPU generator, mask + multiply take about a third of the time on a 2-core CPU.
On the CPU the 64-bit words come from numpy's PCG64 seeded by one draw from torch's default generator (so a seed,
and a resumed generator state, still fix every mask): torch's CPU generator (mt19937) takes 2.5 ms for the 262k
words of a [1822, 576] mask, PCG64 1.2 ms; the SmolLM2 SFT step of the CPU benchmark with dropout 0.05 on every
adapter: 5.36 vs 5.63 s (8 interleaved rounds, per-round median 1.08).
"""
from __future__ import annotations

import contextlib
import math
import re

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from reflectevo.kernels.nf4 import NF4Tensor, nf4_dequantize, nf4_quantize
from reflectevo.kernels.nf4_matmul import forward_2d, input_grad, nf4_matmul, plan
from reflectevo.model.lora_node16 import apply_keep, lora_projections16

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MERGED_COMPUTE = True
QLORA_NODE = True
DENSE16_NODE = True


class NF4Linear(nn.Module):
    """A frozen linear layer whose weight is stored as an NF4Tensor; ``y = nf4_matmul(x, W, bias)``."""

    def __init__(self, q: NF4Tensor, bias: torch.Tensor | None = None, compute_dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        if len(q.shape) != 2:
            raise ValueError(f"NF4Linear: weight must be 2-D, got shape {tuple(q.shape)}")
        self.q = q
        self.out_features, self.in_features = int(q.shape[0]), int(q.shape[1])
        self.compute_dtype = compute_dtype
        self.bias = nn.Parameter(bias.detach().to(compute_dtype), requires_grad=False) if bias is not None else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, compute_dtype: torch.dtype | None = None, blocksize: int = 64):
        compute_dtype = compute_dtype or linear.weight.dtype
        q = nf4_quantize(linear.weight.detach(), blocksize=blocksize, double_quant=True)
        q.dtype = compute_dtype
        return cls(q, linear.bias, compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != self.compute_dtype:
            x = x.to(self.compute_dtype)
        return nf4_matmul(x, self.q, self.bias)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return nf4_dequantize(self.q, dtype or self.compute_dtype)

    def _apply(self, fn, recurse=True):
        probe = fn(torch.empty(0, dtype=torch.float64, device=self.q.device))  # reveals .to(device/dtype)
        self.q = self.q.to(probe.device)
        if probe.dtype != torch.float64 and probe.dtype.is_floating_point:
            self.compute_dtype = probe.dtype
            self.q.dtype = probe.dtype
        return super()._apply(fn, recurse)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        """The NF4 storage goes in as ``weight.data``, ``weight.absmax``, ... (NF4Tensor.state_dict), so a
        quantised model's state_dict holds its base weights."""
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for key, t in self.q.state_dict().items():
            destination[f"{prefix}weight.{key}"] = t

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        names = {key: f"{prefix}weight.{key}" for key in self.q.state_dict()}
        found = {key: state_dict[name] for key, name in names.items() if name in state_dict}
        if len(found) == len(names):
            loaded = NF4Tensor.from_state_dict(found)
            if loaded.shape != self.q.shape or loaded.blocksize != self.q.blocksize:
                error_msgs.append(f"{prefix}weight: NF4 shape {tuple(loaded.shape)} / blocksize {loaded.blocksize}, "
                                  f"this layer has {tuple(self.q.shape)} / {self.q.blocksize}")
            else:
                self.q = loaded.to(self.q.device, self.compute_dtype)
        else:
            missing_keys.extend(name for name in names.values() if name not in state_dict)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        ours = f"{prefix}weight."
        unexpected_keys[:] = [k for k in unexpected_keys if not k.startswith(ours)]

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"nf4 blocksize={self.q.blocksize}, compute_dtype={self.compute_dtype}")


def dropout_keep_mask(shape, p: float, device) -> tuple[torch.Tensor, float]:
    """(bool keep-mask of ``shape``, 1 / P(keep)) with P(drop) = round(p · 2^16) / 2^16, from the default generator
    (on the CPU: one 63-bit seed from it, expanded by numpy's PCG64)."""
    numel = math.prod(shape)
    threshold = min(round(p * 65536), 65535)
    if torch.device(device).type == "cpu":  # numpy's compare: 0.14 vs 0.39 ms for torch's on a [1822, 576] mask
        seed = int(torch.randint(0, 2 ** 63 - 1, (), dtype=torch.int64))
        lanes = np.random.PCG64(seed).random_raw((numel + 3) // 4).view(np.int16)[:numel]
        keep = torch.from_numpy(lanes >= threshold - 32768).view(shape)
    else:
        words = torch.empty((numel + 3) // 4, dtype=torch.int64, device=device).random_(-2 ** 63, None)  # 64 bits
        keep = words.view(torch.int16)[:numel].view(shape) >= threshold - 32768
    return keep, 65536 / (65536 - threshold)


class LoRALinear(nn.Module):
    """``base(x) + scaling · lora_B(lora_A(dropout(x)))``; ``base`` is an nn.Linear or NF4Linear (frozen)."""

    def __init__(self, base: nn.Module, r: int = 8, alpha: float = 16, dropout: float = 0.0,
                 use_rslora: bool = False, dtype: torch.dtype = torch.float32):
        super().__init__()
        if r <= 0:
            raise ValueError(f"LoRA rank r={r}: must be positive")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRA dropout={dropout}: must be in [0, 1)")
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.alpha, self.dropout_p, self.use_rslora = int(r), float(alpha), float(dropout), bool(use_rslora)
        self.scaling = self.alpha / (math.sqrt(self.r) if use_rslora else self.r)
        device = _module_device(base)
        self.lora_A = nn.Linear(self.in_features, self.r, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(self.r, self.out_features, bias=False, device=device, dtype=dtype)
        self.disabled = False
        self._merged, self._merged_key = None, None
        self.reset_lora_parameters()
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.train(base.training)  # the mode of the layer it replaces: no dropout when wrapped in an eval model

    def reset_lora_parameters(self):
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._merges(x):
            bias = self.base.bias
            if torch.is_grad_enabled() and (x.requires_grad or self.lora_A.weight.requires_grad
                                            or self.lora_B.weight.requires_grad):
                return _MergedLoRA.apply(x, self._merged_weight(), bias, self.lora_A.weight, self.lora_B.weight,
                                         self.scaling)
            return F.linear(x, self._merged_weight(), bias)
        if self.disabled:
            return self.base(x)
        a, b = self.lora_A.weight, self.lora_B.weight
        autocast = torch.is_autocast_enabled(x.device.type)
        if (QLORA_NODE and type(self.base) is NF4Linear and torch.is_grad_enabled()
                and (x.requires_grad or a.requires_grad or b.requires_grad)
                and not (self.base.bias is not None and self.base.bias.requires_grad)):
            ldt = torch.get_autocast_dtype(x.device.type) if autocast else a.dtype
            keep, scale = None, self.scaling
            if self.training and self.dropout_p > 0:
                keep, inv_keep = dropout_keep_mask((x.numel() // x.shape[-1], x.shape[-1]), self.dropout_p,
                                                   x.device)
                scale *= inv_keep
            return _QLoRA.apply(x, a, b, self.base, keep, scale, ldt)
        if (DENSE16_NODE and autocast and x.device.type == "cpu" and type(self.base) is nn.Linear
                and torch.is_grad_enabled()
                and not any(p.requires_grad for p in self.base.parameters())):
            keep, scale = None, self.scaling
            if self.training and self.dropout_p > 0:
                keep, inv_keep = dropout_keep_mask((x.numel() // x.shape[-1], x.shape[-1]), self.dropout_p,
                                                   x.device)
                scale *= inv_keep
            return lora_projections16(x, [(self.base.weight, self.base.bias, a, b, keep, scale)],
                                      torch.get_autocast_dtype("cpu"))[0]
        y = self.base(x)
        # under autocast F.linear casts x to the autocast dtype itself: an fp32 copy of x first would be a wasted
        # round trip (and two more [tokens, in] conversions in backward)
        xa, scale = (x if autocast else x.to(a.dtype)), self.scaling
        if self.training and self.dropout_p > 0:
            keep, inv_keep = dropout_keep_mask(xa.shape, self.dropout_p, xa.device)
            xa, scale = apply_keep(xa, keep), scale * inv_keep
        u = F.linear(xa, a)
        if autocast or y.dtype == u.dtype == b.dtype:
            # y + scale · u B^T in one BLAS call: no [tokens, out] temporaries for the product, scale and sum
            # (autocast runs addmm in its dtype, as it would the F.linear, the scale and the add)
            return torch.addmm(y.reshape(-1, y.shape[-1]), u.reshape(-1, u.shape[-1]), b.T,
                               alpha=scale).view(y.shape)
        return y + (F.linear(u, b) * scale).to(y.dtype)

    def _merges(self, x: torch.Tensor) -> bool:
        if not MERGED_COMPUTE or self.disabled or type(self.base) is not nn.Linear:
            return False
        w, bias = self.base.weight, self.base.bias
        if w.requires_grad or (bias is not None and bias.requires_grad) or torch.is_autocast_enabled("cpu"):
            return False  # under autocast W' would be rounded to 16 bits, and its backward is not autocast
        return (w.device.type == "cpu" and w.dtype in (torch.float32, torch.float64) and x.dtype == w.dtype
                and self.lora_A.weight.dtype == w.dtype and (self.dropout_p == 0 or not self.training))

    def _merged_weight(self) -> torch.Tensor:
        """W + scaling · B A, rebuilt when any of the three tensors changed since the last call. The frozen W is
        known by (id, pointer, version); A and B are compared by content with the copies taken at the last
        build (a fused optimizer step updates them without bumping the version; they are small)."""
        a, b, w = self.lora_A.weight, self.lora_B.weight, self.base.weight
        ident = tuple((id(t), t.data_ptr(), t._version) for t in (a, b, w)) + (self.scaling,)
        kept = self._merged_key
        if kept is None or kept[0] != ident or not (torch.equal(kept[1], a) and torch.equal(kept[2], b)):
            # not an inference tensor even when built in the sampler: a training forward may reuse it
            with torch.inference_mode(False), torch.no_grad():
                self._merged = torch.addmm(w, b, a, alpha=self.scaling)
                self._merged_key = (ident, a.detach().clone(), b.detach().clone())
        return self._merged

    def _apply(self, fn, recurse=True):
        self._merged, self._merged_key = None, None  # rebuilt on the next forward, where the weights then live
        return super()._apply(fn, recurse)

    def base_weight(self) -> torch.Tensor:
        """The base weight in fp32 (dequantised for NF4)."""
        if isinstance(self.base, NF4Linear):
            return self.base.dequantize(torch.float32)
        return self.base.weight.detach().float()

    @torch.no_grad()
    def merge(self) -> torch.Tensor:
        """fp32 weight W + scaling · B A (the adapter folded into the dequantised base)."""
        return self.base_weight() + self.scaling * (self.lora_B.weight.float() @ self.lora_A.weight.float())

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, dropout={self.dropout_p}, rslora={self.use_rslora}"


class _MergedLoRA(torch.autograd.Function):
    """y = x W'^T + bias with W' = W + s B A (built from the same A, B); gradients for x, A and B."""

    @staticmethod
    def forward(ctx, x, merged, bias, a, b, scaling: float):
        u = x @ a.T if ctx.needs_input_grad[4] else None
        ctx.save_for_backward(x, u, merged, a, b)
        ctx.scaling = scaling
        return F.linear(x, merged, bias)

    @staticmethod
    def backward(ctx, dy):
        x, u, merged, a, b = ctx.saved_tensors
        need_x, need_a, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[3], ctx.needs_input_grad[4]
        dy2 = dy.reshape(-1, dy.shape[-1])
        dx = (dy @ merged) if need_x else None
        da = db = None
        if need_b:
            db = (dy2.T @ u.reshape(-1, u.shape[-1])).mul_(ctx.scaling)
        if need_a:
            da = ((dy2 @ b).T @ x.reshape(-1, x.shape[-1])).mul_(ctx.scaling)
        return dx, None, None, da, db, None


class _QLoRA(torch.autograd.Function):
    """An NF4 base and its adapter as one autograd node (training): y = x Wᵀ + bias + s · (m ⊙ x) Aᵀ Bᵀ with
    W = dequant(q) and m the dropout keep-mask (none without dropout). With u = (m ⊙ x) Aᵀ and du = s · dy B:
    dx = dy W + m ⊙ (du A), dA = duᵀ (m ⊙ x), dB = s · dyᵀ u. The base runs in its compute dtype, the adapter's
    products in ``ldt`` (the autocast dtype under autocast, else A's dtype), as the unfused layer's F.linear / addmm
    would; A and B get their gradients in their own dtype. Saved: m ⊙ x in ``ldt``, u, the cast A and B, the mask."""

    @staticmethod
    def forward(ctx, x, a, b, base, keep, scale: float, ldt: torch.dtype):
        q, cdt = base.q, base.compute_dtype
        x2d, path, triton_ok = plan(x if x.dtype == cdt else x.to(cdt), q)
        bias = base.bias if base.bias is None or base.bias.dtype == cdt else base.bias.to(cdt)
        y = forward_2d(x2d, q, bias, path, triton_ok)
        xa = x2d if ldt == cdt else x.reshape(-1, x.shape[-1]).to(ldt)
        if keep is not None:
            xa = apply_keep(xa, keep)
        a_, b_ = a.to(ldt), b.to(ldt)
        u = xa @ a_.T
        if y.dtype == ldt:
            y = torch.addmm(y, u, b_.T, alpha=scale)  # y + s · u Bᵀ in one GEMM
        else:
            y = y + (u @ b_.T).mul_(scale).to(y.dtype)
        ctx.save_for_backward(xa, u, a_, b_, keep)
        ctx.q, ctx.path, ctx.triton_ok, ctx.scale, ctx.cdt = q, path, triton_ok, scale, cdt
        ctx.x_dtype, ctx.a_dtype, ctx.b_dtype = x.dtype, a.dtype, b.dtype
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        xa, u, a_, b_, keep = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1])
        dyl = dy2 if dy2.dtype == a_.dtype else dy2.to(a_.dtype)
        du = (dyl @ b_).mul_(ctx.scale)
        dx = da = db = None
        if ctx.needs_input_grad[0]:
            dx = input_grad(dy2 if dy2.dtype == ctx.cdt else dy2.to(ctx.cdt), ctx.q, ctx.path, ctx.triton_ok)
            if keep is None and dx.dtype == du.dtype:
                dx = dx.addmm_(du, a_)
            else:
                lora_dx = du @ a_
                if keep is not None:
                    apply_keep(lora_dx, keep, inplace=True)
                dx = dx.add_(lora_dx.to(dx.dtype))
            dx = dx.to(ctx.x_dtype).view(*dy.shape[:-1], dx.shape[-1])
        if ctx.needs_input_grad[1]:
            da = (du.T @ xa).to(ctx.a_dtype)
        if ctx.needs_input_grad[2]:
            db = (dyl.T @ u).mul_(ctx.scale).to(ctx.b_dtype)
        return dx, da, db, None, None, None, None


def _module_device(m: nn.Module) -> torch.device:
    if isinstance(m, NF4Linear):
        return m.q.device
    return next(m.parameters()).device


def _parent(model: nn.Module, name: str):
    parent_name, _, attr = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), attr


@torch.no_grad()
def quantize_model(model: nn.Module, compute_dtype: torch.dtype = torch.bfloat16, blocksize: int = 64) -> nn.Module:
    """Replace every nn.Linear except lm_head (the embeddings are not linear) by an NF4Linear, in place."""
    names = [n for n, m in model.named_modules()
             if type(m) is nn.Linear and n.rpartition(".")[2] not in ("lm_head", "lora_A", "lora_B")]
    for name in names:
        parent, attr = _parent(model, name)
        lin = getattr(parent, attr)
        setattr(parent, attr, NF4Linear.from_linear(lin, compute_dtype=compute_dtype, blocksize=blocksize))
    return model


def _is_target(name: str, targets) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)  # as PEFT: "q_proj", "self_attn.q_proj"


def attach_lora(model: nn.Module, r: int = 8, alpha: float = 16, dropout: float = 0.0,
                target_modules=DEFAULT_TARGETS, use_rslora: bool = False, dtype: torch.dtype = torch.float32,
                ranks: dict[str, int] | None = None, alphas: dict[str, float] | None = None) -> list[nn.Parameter]:
    """Wrap each target linear (nn.Linear / NF4Linear, matched as PEFT does: a listed name equal to the module's
    name or to a dotted ending of it, or a regex over the whole name when ``target_modules`` is a string) in a
    LoRALinear; freeze everything else. ``ranks`` / ``alphas`` give single layers, by their full name, their own r /
    alpha (PEFT's rank_pattern / alpha_pattern resolved); each must name a target. Returns the trainable LoRA
    parameters."""
    if has_lora(model):
        raise ValueError("attach_lora: the model already has LoRA adapters")
    names = [n for n, m in model.named_modules()
             if isinstance(m, (nn.Linear, NF4Linear)) and _is_target(n, target_modules)]
    if not names:
        raise ValueError(f"attach_lora: no linear layer matches target_modules={target_modules!r}")
    ranks, alphas = ranks or {}, alphas or {}
    stray = sorted((set(ranks) | set(alphas)) - set(names))
    if stray:
        raise ValueError(f"attach_lora: {stray[0]!r} (in ranks / alphas) is not one of the target layers")
    for p in model.parameters():
        p.requires_grad_(False)
    # every layer built before any is put in place: a bad rank or dropout raises before the structure changes
    wrapped = [(name, LoRALinear(model.get_submodule(name), ranks.get(name, r), alphas.get(name, alpha), dropout,
                                 use_rslora, dtype)) for name in names]
    for name, layer in wrapped:
        parent, attr = _parent(model, name)
        setattr(parent, attr, layer)
    params = lora_parameters(model)
    for p in params:
        p.requires_grad_(True)
    return params


def remove_lora(model: nn.Module) -> None:
    """Put every LoRALinear's base layer back in its place (the adapters are dropped, not merged)."""
    for name, m in lora_modules(model).items():
        parent, attr = _parent(model, name)
        setattr(parent, attr, m.base)


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    out = []
    for m in lora_modules(model).values():
        out += [m.lora_A.weight, m.lora_B.weight]
    return out


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LoRALinear) for m in model.modules())


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """Inside the block every LoRALinear returns only its base output (e.g. the DPO reference model)."""
    mods = list(lora_modules(model).values())
    previous = [m.disabled for m in mods]
    for m in mods:
        m.disabled = True
    try:
        yield model
    finally:
        for m, prev in zip(mods, previous):
            m.disabled = prev


@torch.no_grad()
def merged_state_dict(model: nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Plain weights (our key names): LoRA folded into the base, NF4 dequantised, everything else as is."""
    out: dict[str, torch.Tensor] = {}
    special: set[str] = set()
    for name, m in model.named_modules():
        if any(name.startswith(s + ".") for s in special):
            continue
        if isinstance(m, LoRALinear):
            out[f"{name}.weight"] = m.merge()
            bias = getattr(m.base, "bias", None)
            special.add(name)
        elif isinstance(m, NF4Linear):
            out[f"{name}.weight"] = m.dequantize(torch.float32)
            bias = m.bias
            special.add(name)
        else:
            continue
        if bias is not None:
            out[f"{name}.bias"] = bias.detach()
    for k, v in model.state_dict().items():
        if not any(k.startswith(s + ".") for s in special):
            out[k] = v.detach()
    if dtype is not None:
        out = {k: v.to(dtype) if v.is_floating_point() else v for k, v in out.items()}
    return out
