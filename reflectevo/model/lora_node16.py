"""LoRA layers on frozen dense bases under CPU 16-bit autocast: one autograd node for all the layers that read the
same input (q / k / v, gate / up; o and down each alone), with each adapter riding inside its base product.

Math, for layers i = 1..n on x [M, K] with ranks r_i (R = Σ r_i), scales s_i and dropout keep-masks m_i (or none):

    u_i = (m_i ⊙ x) A_iᵀ                  [M, r_i]   (one product x [A_1; ...; A_n]ᵀ when no layer drops out)
    x̂  = [x | u_1 | ... | u_n]            [M, K + R]
    Ŵ_i = [W_i | 0 .. s_i B_i .. 0]        [N_i, K + R] (s_i B_i in the columns of u_i, zero elsewhere)
    y_i = x̂ Ŵ_iᵀ (+ bias_i) = x W_iᵀ + s_i u_i B_iᵀ

    dx̂  = Σ_i dy_i Ŵ_i = [Σ_i dy_i W_i | du_1 | ... | du_n],   du_i = s_i dy_i B_i
    dx  = dx̂[:, :K] + Σ_i m_i ⊙ (du_i A_i)   (one product [du_1 ... du_n] [A_1; ...; A_n] without dropout)
    dA_i = du_iᵀ (m_i ⊙ x),   dB_i = s_i dy_iᵀ u_i

Every product runs in the autocast dtype ``ldt`` with fp32 sums, as autocast's own products do. Why: done layer
by layer, the adapter's s u Bᵀ is a second pass over y [M, N] (a read and a write) and du = dy B a second read of
dy; here both happen inside the base products, which grow by R columns of K (SmolLM2: 576 + 48 for q / k / v).
y_i is rounded to 16 bits once, where autocast rounds the base product, the adapter product and their sum.
s_i B_i is rounded to 16 bits as one tensor (the same as B_i rounded, then scaled, when s_i is a power of two).

Memory: Ŵ_i is a persistent 16-bit buffer per base weight (``augmented``): the W part is converted once and again
only when W changes (its ``_version`` and storage are checked at each call; it goes with W), the B columns are
rewritten at every call (forward and backward, so they always hold the B this graph saw). For an fp32 base it takes
the place of the 16-bit cast autocast would make (2 bytes a parameter, plus R columns); a 16-bit base gets one copy
more. Saved for backward: x (its 16-bit cast when it is fp32) and u, the cast A's, the s_i B_i and the keep-masks
(bool) — not m_i ⊙ x, recomputed.
"""
from __future__ import annotations

import weakref

import torch

_BUFFERS: dict = {}  # (id(w), dtype, width, column) -> (weakref, _version, data_ptr, buffer)


def apply_keep(t: torch.Tensor, keep: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """t ⊙ keep for a bool keep-mask, read as its 0 / 1 bytes: a bool operand takes a slow conversion path on the
    CPU (a [1822, 576] bf16 product: 2.0 ms with the bool, 0.7 ms with its uint8 view)."""
    return t.mul_(keep.view(torch.uint8)) if inplace else t * keep.view(torch.uint8)


def augmented(w: torch.Tensor, ldt: torch.dtype, width: int, col: int, b_scaled: torch.Tensor) -> torch.Tensor:
    """The [N, width] ``ldt`` buffer [W | 0 .. b_scaled (at column ``col``) .. 0] for the frozen W [N, K]."""
    key = (id(w), ldt, width, col)
    hit = _BUFFERS.get(key)
    if hit is None or hit[0]() is not w or hit[1] != w._version or hit[2] != w.data_ptr():
        buf = torch.zeros(w.shape[0], width, dtype=ldt, device=w.device)
        buf[:, :w.shape[1]] = w.detach()
        if hit is None:
            weakref.finalize(w, _BUFFERS.pop, key, None)
        _BUFFERS[key] = hit = (weakref.ref(w), w._version, w.data_ptr(), buf)
    buf = hit[3]
    buf[:, col:col + b_scaled.shape[1]] = b_scaled
    return buf


class _LoRANode16(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, ldt: torch.dtype, scales: tuple, *params):
        """params: (W, bias, A, B, keep) per layer; keep a bool [M, K] mask or None."""
        ws, biases, a_s, b_s, keeps = (params[i::5] for i in range(5))
        x2 = x.reshape(-1, x.shape[-1])
        m, k = x2.shape
        ranks = [a.shape[0] for a in a_s]
        width = k + sum(ranks)
        a_l = [a.to(ldt) for a in a_s]
        xh = torch.empty(m, width, dtype=ldt, device=x.device)
        xh[:, :k] = x2
        xl = xh[:, :k]
        if all(keep is None for keep in keeps):
            xh[:, k:] = xl @ (torch.cat(a_l) if len(a_l) > 1 else a_l[0]).T
        else:
            col = k
            for a, keep in zip(a_l, keeps):
                xh[:, col:col + a.shape[0]] = (xl if keep is None else apply_keep(xl, keep)) @ a.T
                col += a.shape[0]
        b_sc = [(b.detach() * s).to(ldt) for b, s in zip(b_s, scales)]
        outs, col = [], k
        for w, bias, bs in zip(ws, biases, b_sc):
            wh = augmented(w, ldt, width, col, bs)
            y = xh @ wh.T if bias is None else torch.addmm(bias.to(ldt), xh, wh.T)
            outs.append(y.view(*x.shape[:-1], y.shape[-1]))
            col += bs.shape[1]
        # x and u saved apart when x is already 16-bit: x is often saved by its producer too (the attention output
        # before o_proj), and a copy inside x̂ would be a second one
        xs, us = (x2, xh[:, k:].clone()) if x2.dtype == ldt else (xl, xh[:, k:])
        ctx.save_for_backward(xs, us, *a_l, *b_sc, *(kp for kp in keeps if kp is not None))
        ctx.ws, ctx.ranks, ctx.scales, ctx.k, ctx.ldt = ws, ranks, scales, k, ldt
        ctx.has_keep = [kp is not None for kp in keeps]
        ctx.x_dtype, ctx.a_dtypes, ctx.b_dtypes = x.dtype, [a.dtype for a in a_s], [b.dtype for b in b_s]
        return tuple(outs)

    @staticmethod
    def backward(ctx, *dys):
        n, k, ldt = len(ctx.ws), ctx.k, ctx.ldt
        xl, u, *rest = ctx.saved_tensors
        a_l, b_sc, masks = rest[:n], rest[n:2 * n], iter(rest[2 * n:])
        keeps = [next(masks) if has else None for has in ctx.has_keep]
        width = k + u.shape[1]
        dy2 = [dy.reshape(-1, dy.shape[-1]) for dy in dys]
        dy2 = [d if d.dtype == ldt else d.to(ldt) for d in dy2]
        dx = None
        if ctx.needs_input_grad[0]:
            dxh, col = None, k
            for d, w, bs in zip(dy2, ctx.ws, b_sc):
                wh = augmented(w, ldt, width, col, bs)
                dxh = d @ wh if dxh is None else dxh.addmm_(d, wh)
                col += bs.shape[1]
            du = dxh[:, k:]
        else:  # no dx (the first layer's input): only the adapters' du_i = dy_i (s_i B_i)
            du = torch.cat([d @ bs for d, bs in zip(dy2, b_sc)], dim=1) if n > 1 else dy2[0] @ b_sc[0]
        grads = [None] * (5 * n)
        dus = du.split(ctx.ranks, dim=1)
        if ctx.needs_input_grad[0]:
            dx = dxh[:, :k]  # accumulated in place: a strided view of dxh (du, its other columns, stays intact)
            if not any(ctx.has_keep):
                dx.addmm_(du, torch.cat(a_l) if n > 1 else a_l[0])
            else:
                for dui, a, keep in zip(dus, a_l, keeps):
                    dx.add_(dui @ a if keep is None else apply_keep(dui @ a, keep, inplace=True))
            dx = dx.to(ctx.x_dtype).view(*dys[0].shape[:-1], k)
        want_a = [ctx.needs_input_grad[3 + 5 * i + 2] for i in range(n)]
        if any(want_a) and not any(ctx.has_keep):
            das = (du.T @ xl).split(ctx.ranks, dim=0)
        else:
            das = [(dui.T @ (xl if keep is None else apply_keep(xl, keep))) if want else None
                   for dui, keep, want in zip(dus, keeps, want_a)]
        for i, (d, ui, s) in enumerate(zip(dy2, u.split(ctx.ranks, dim=1), ctx.scales)):
            if want_a[i]:
                grads[5 * i + 2] = das[i].to(ctx.a_dtypes[i])
            if ctx.needs_input_grad[3 + 5 * i + 3]:
                grads[5 * i + 3] = (d.T @ ui).mul_(s).to(ctx.b_dtypes[i])
        return (dx, None, None, *grads)


def lora_projections16(x: torch.Tensor, layers, ldt: torch.dtype) -> tuple[torch.Tensor, ...]:
    """``layers``: (W, bias, A, B, keep-mask or None, scale) per layer, all reading ``x`` [..., K]; returns each
    layer's W x + bias + scale · B A (keep ⊙ x), computed as the module docstring says."""
    params, scales = [], []
    for w, bias, a, b, keep, scale in layers:
        params += [w, bias, a, b, keep]
        scales.append(float(scale))
    return _LoRANode16.apply(x, ldt, tuple(scales), *params)
