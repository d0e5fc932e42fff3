"""Projections that share an input (q / k / v, gate / up) as one autograd node under CPU 16-bit autocast.

Each LoRA layer alone (``lora._DenseLoRA16``) reads the shared input x for its own rank-r product and its own dA,
adds its own du Aᵀ into its own dx, and autograd then sums the layers' dx. For a group of layers on the same x:

    forward:  u = x [A_1; ...; A_n]ᵀ  (one product, r_1 + ... + r_n wide)
              y_i = x W_iᵀ (+ bias_i) + s_i · u_i B_iᵀ
    backward: du_i = s_i · dy_i B_i,  dx = Σ dy_i W_i + [du_1 ... du_n] [A_1; ...; A_n]  (one buffer, in place)
              [dA_1; ...; dA_n] = [du_1 ... du_n]ᵀ x  (one product),  dB_i = s_i · dy_iᵀ u_i

every product in the autocast dtype as autocast computes them, W_i's cast kept while W_i is unchanged
(``frozen_cast``). The same values as the layers one by one, up to the order of fp32 sums inside a product and
the roundings of dx (accumulated in the autocast dtype either way). Saved: x, u and the casts of A and B, as the
layers one by one save them.

Taken for layers that ``_DenseLoRA16`` would take (``LoRALinear`` on a frozen ``nn.Linear``, CPU autocast,
gradients on, adapters on) without dropout; otherwise ``grouped_projections`` returns None and each layer runs
alone. ``GROUPED_NODE = False`` turns it off.
"""
from __future__ import annotations

import torch
from torch import nn

from reflectevo.kernels.frozen_cast import cast_frozen
from reflectevo.model import lora

GROUPED_NODE = True


def _applies(x: torch.Tensor, layers) -> bool:
    if not (GROUPED_NODE and lora.DENSE16_NODE and x.device.type == "cpu" and torch.is_autocast_enabled("cpu")
            and torch.is_grad_enabled()):
        return False
    for m in layers:
        if not isinstance(m, lora.LoRALinear) or type(m.base) is not nn.Linear or m.disabled:
            return False
        if any(p.requires_grad for p in m.base.parameters()) or (m.training and m.dropout_p > 0):
            return False
        if m._merges(x):
            return False
    return True


class _GroupedLoRA16(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, ldt: torch.dtype, scales: tuple, *params):
        x2d = x.reshape(-1, x.shape[-1])
        xl = x2d if x2d.dtype == ldt else x2d.to(ldt)
        ws, biases, a_s, b_s = params[0::4], params[1::4], params[2::4], params[3::4]
        a_cat = torch.cat([a.to(ldt) for a in a_s])
        b_ = [b.to(ldt) for b in b_s]
        u = xl @ a_cat.T
        ranks = [a.shape[0] for a in a_s]
        us = u.split(ranks, dim=1)
        outs = []
        for w, bias, ui, bi, s in zip(ws, biases, us, b_, scales):
            w_ = cast_frozen(w, ldt)
            y = xl @ w_.T if bias is None else torch.addmm(bias.to(ldt), xl, w_.T)
            y.addmm_(ui, bi.T, alpha=s)
            outs.append(y.view(*x.shape[:-1], y.shape[-1]))
        ctx.save_for_backward(xl, u, a_cat, *b_)
        ctx.ws, ctx.ranks, ctx.scales, ctx.ldt = ws, ranks, scales, ldt
        ctx.x_dtype, ctx.a_dtypes, ctx.b_dtypes = x.dtype, [a.dtype for a in a_s], [b.dtype for b in b_s]
        return tuple(outs)

    @staticmethod
    def backward(ctx, *dys):
        xl, u, a_cat, *b_ = ctx.saved_tensors
        ldt, n = ctx.ldt, len(ctx.ws)
        dy2 = [dy.reshape(-1, dy.shape[-1]) for dy in dys]
        dy2 = [d if d.dtype == ldt else d.to(ldt) for d in dy2]
        du = torch.cat([(d @ bi).mul_(s) for d, bi, s in zip(dy2, b_, ctx.scales)], dim=1)
        dx = None
        if ctx.needs_input_grad[0]:
            dx = dy2[0] @ cast_frozen(ctx.ws[0], ldt)
            for d, w in zip(dy2[1:], ctx.ws[1:]):
                dx.addmm_(d, cast_frozen(w, ldt))
            dx.addmm_(du, a_cat)
            dx = dx.to(ctx.x_dtype).view(*dys[0].shape[:-1], dx.shape[-1])
        grads = [None] * (4 * n)
        want_a = [ctx.needs_input_grad[3 + 4 * i + 2] for i in range(n)]
        if any(want_a):
            for i, da in enumerate((du.T @ xl).split(ctx.ranks, dim=0)):
                if want_a[i]:
                    grads[4 * i + 2] = da.to(ctx.a_dtypes[i])
        for i, (d, ui, s) in enumerate(zip(dy2, u.split(ctx.ranks, dim=1), ctx.scales)):
            if ctx.needs_input_grad[3 + 4 * i + 3]:
                grads[4 * i + 3] = (d.T @ ui).mul_(s).to(ctx.b_dtypes[i])
        return (dx, None, None, *grads)


def grouped_projections(x: torch.Tensor, layers) -> tuple[torch.Tensor, ...] | None:
    """``tuple(m(x) for m in layers)`` as one node where it applies (see the module docstring), else None."""
    if not _applies(x, layers):
        return None
    params = []
    for m in layers:
        params += [m.base.weight, m.base.bias, m.lora_A.weight, m.lora_B.weight]
    return _GroupedLoRA16.apply(x, torch.get_autocast_dtype("cpu"), tuple(m.scaling for m in layers), *params)
