"""Projections that share an input (q / k / v, gate / up) as one autograd node under CPU 16-bit autocast.

Each LoRA layer alone reads the shared input x for its own base product, its own rank-r product and its own dA,
and autograd then sums the layers' dx. As a group (``lora_node16``): x is cast once, the rank products of the
layers without dropout are one product x [A_1; ...; A_n]ᵀ, each layer's adapter rides inside its base product,
dx is accumulated in one buffer, and [dA_1; ...; dA_n] is one product over x. With dropout each layer keeps its
own keep-mask, drawn in the order the layers one by one draw them, so the same seed gives the same masks.

Taken for layers that the one-layer node would take (``LoRALinear`` on a frozen ``nn.Linear``, CPU autocast,
gradients on, adapters on); otherwise ``grouped_projections`` returns None and each layer runs alone.
``GROUPED_NODE = False`` turns it off.
"""
from __future__ import annotations

import torch
from torch import nn

from reflectevo.model import lora
from reflectevo.model.lora_node16 import lora_projections16

GROUPED_NODE = True


def _applies(x: torch.Tensor, layers) -> bool:
    if not (GROUPED_NODE and lora.DENSE16_NODE and x.device.type == "cpu" and torch.is_autocast_enabled("cpu")
            and torch.is_grad_enabled()):
        return False
    for m in layers:
        if not isinstance(m, lora.LoRALinear) or type(m.base) is not nn.Linear or m.disabled:
            return False
        if any(p.requires_grad for p in m.base.parameters()):
            return False
        if m._merges(x):
            return False
    return True


def grouped_projections(x: torch.Tensor, layers) -> tuple[torch.Tensor, ...] | None:
    """``tuple(m(x) for m in layers)`` as one node where it applies (see the module docstring), else None."""
    if not _applies(x, layers):
        return None
    rows = x.numel() // x.shape[-1]
    specs = []
    for m in layers:
        keep, scale = None, m.scaling
        if m.training and m.dropout_p > 0:
            keep, inv_keep = lora.dropout_keep_mask((rows, x.shape[-1]), m.dropout_p, x.device)
            scale *= inv_keep
        specs.append((m.base.weight, m.base.bias, m.lora_A.weight, m.lora_B.weight, keep, scale))
    return lora_projections16(x, specs, torch.get_autocast_dtype("cpu"))
