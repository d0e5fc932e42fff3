"""Fused lm_head + log-softmax + label gather: per-token log p(label) without the [N, V] logits.

Math, for hidden rows ``h_i`` (H), lm_head ``W`` (V x H) and labels ``y_i``::

    z_ij   = h_i . w_j                                  (logits)
    lse_i  = log sum_j exp(z_ij)                        (fp32: row max m, then log of the rescaled sum)
    logp_i = z_{i,y_i} - lse_i                          (0 where y_i == ignore_index)

    for row weights r_i (an upstream gradient, or known loss coefficients):
    G_ij   = r_i * (1[j == y_i] - exp(z_ij - lse_i))    (= d(r_i logp_i) / d z_ij)
    dH     = G @ W          dW = G^T @ H

Design (default, ``impl="chunks"``): the tokens go through in chunks of C rows. Per chunk one BLAS matmul
(cuBLAS / MKL) writes the fp32 logits z [C, V]; a row step (the Triton ``_rows_kernel`` on CUDA and under the
interpreter, PyTorch ops on the CPU) reads each row twice (max + rescaled sum, then the label's logit and G) and
writes G; then a matmul gives G @ W (and G^T @ H). Only a [C, V] buffer exists, never [N, V].

Gradients in forward where they do not depend on the upstream gradient. With r_i = 1 on valid tokens,
U = G @ W = w_{y_i} - softmax(z_i) @ W is the unit gradient of logp_i w.r.t. h_i, so the forward saves U [N, H] and
the backward's dH_i = g_i U_i is elementwise. dW = sum_i g_i G_i^T h_i needs the upstream g_i, so a trainable head
recomputes the chunks in the backward with r = g. ``linear_cross_entropy`` (mean / sum) knows every r_i up front
(-1/#valid or -1), so it computes dH and dW inside its forward and the backward scales them by the upstream scalar.

FLOPs per token (H hidden, V vocab): forward under no_grad 2HV; frozen head (QLoRA) 4HV, the same as the naive
path (logits forward, dH backward); trainable head 8HV for per-token log-probs (DPO), 6HV for SFT's cross-entropy
(= naive). The naive path also writes and reads [N, V] fp32 log-softmax and gradient tensors; this one moves
[C, V] at a time. The tiled variant (linear_logprobs_tiles.py, ``impl="tiles"``) recomputes instead: 6HV / 8HV,
less memory, but its atomics made it 5x slower than naive on an H200.

Extra memory beyond inputs and gradients: U [N, H] (fp32 on the CPU, the input dtype on CUDA), one chunk of fp32
logits (C x V x 4 bytes, C chosen from a byte budget: 32 MiB CPU, 256 MiB CUDA) plus G in the input dtype on CUDA
(written over z in place when the dtypes match), and the dW accumulator when the head trains.

``impl="chunks16"`` (opt-in; ``reflectevo bench kernels`` times it beside the default on CUDA, not yet run on a
GPU): with bf16 / fp16
inputs the logits stay in the input dtype, one [C, V] 16-bit buffer that G overwrites in place, 2 bytes per
element instead of 6: three times the rows per chunk at the same budget (a third of the [V, H] passes a trainable
head's dW accumulation makes) and ~40 % less chunk traffic (z written, read twice, G written and read: 10 bytes an
element instead of 16). The price is the precision of a naive bf16 forward: each logit is rounded to the input
dtype before the fp32 row step (~|z| 2^-9 in bf16), and logits near 1e4 lose their units. fp32 inputs and the
CPU's fp32 path are the same as ``chunks``.

Precision: inputs bf16 / fp16 / fp32. On CUDA the matmuls take the input dtype (tensor cores, fp32 accumulation;
the logits come out in fp32 where torch.mm offers out_dtype, else rounded to the input dtype by cuBLAS), the row
step is fp32, G is rounded to the input dtype for the next matmuls, and a trainable head's dW is summed over
the chunks in the weight's dtype (each chunk's product accumulates in fp32 inside cuBLAS; with bf16 and many
chunks that sum carries ~sqrt(chunks) bf16 roundings). On the CPU the row step and the buffers are fp32; the
matmuls are fp32 too, except with bf16 inputs, or fp32 ones under bf16 CPU autocast, on a CPU whose oneDNN has
bf16 (AMX / AVX512-BF16): then they take bf16 products with fp32 sums, as on CUDA (logits and dW through
oneDNN's "bf16" fp32-matmul precision, so the logits stay fp32; G and W rounded to bf16 for dH = G @ W, the
head's bf16 copy cached while the weight is unchanged). That is 2-3x faster than fp32 there (a [170, 576] x
[576, 49152] chunk: 23 vs 50 ms on a 2-core AMX Xeon). fp32 CUDA inputs follow torch's TF32 setting (off by
default). The log-sum-exp subtracts the row max first, so |logits| ~ 1e4 stay exact to fp32.
"""
from __future__ import annotations

import contextlib

import torch

from reflectevo.kernels._dispatch import next_power_of_2, use_triton
from reflectevo.kernels.frozen_cast import cast_frozen
from reflectevo.kernels.linear_logprobs_tiles import TiledLogprobsFunction

try:
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover
    triton = None

CHUNK_BYTES_CPU = 32 << 20
CHUNK_BYTES_CUDA = 256 << 20
CHUNK_ROWS: int | None = None  # fixed chunk size (tests); None: from the byte budget
IMPLS = ("auto", "chunks", "chunks16", "tiles")


def _empty(shape, dtype, device) -> torch.Tensor:
    """Allocation for buffers the code must fully overwrite (tests replace it to poison them with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


# ----------------------------------------------------------------------------------------------------------------
# Plain PyTorch reference (readable, materialises the logits)
# ----------------------------------------------------------------------------------------------------------------
def linear_logprobs_reference(hidden, weight, labels, ignore_index: int = -100) -> torch.Tensor:
    """Teaching version: full fp32 logits, log_softmax, gather. Memory O(N * V)."""
    logits = hidden.float() @ weight.float().T
    logprobs = torch.log_softmax(logits, dim=-1)
    valid = labels != ignore_index
    picked = logprobs.gather(-1, torch.where(valid, labels, 0).long().unsqueeze(-1)).squeeze(-1)
    return torch.where(valid, picked, torch.zeros_like(picked))


# ----------------------------------------------------------------------------------------------------------------
# The row step: logits of a chunk -> logp and G, in PyTorch or Triton
# ----------------------------------------------------------------------------------------------------------------
def _rows_torch(z, labels, row_weight):
    """z [C, V] fp32 (overwritten with G when ``row_weight`` is given), labels [C] in [0, V) -> logp [C], G."""
    m = z.max(dim=1).values
    picked = z.gather(1, labels[:, None]).squeeze(1)
    z.sub_(m[:, None]).exp_()
    s = z.sum(dim=1)
    logp = (picked - m) - torch.log(s)
    if row_weight is None:
        return logp, None
    z.mul_((-row_weight / s)[:, None])
    z.scatter_add_(1, labels[:, None], row_weight[:, None])
    return logp, z


if triton is not None:

    @triton.jit
    def _rows_kernel(z_ptr, labels_ptr, weight_ptr, logp_ptr, g_ptr, V, stride_z, stride_g,
                     WRITE_G: tl.constexpr, BLOCK_V: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        z_row = z_ptr + row * stride_z
        label = tl.load(labels_ptr + row)
        m = float("-inf")
        s = 0.0
        for v0 in range(0, V, BLOCK_V):  # online max and rescaled sum over the row
            cols = v0 + tl.arange(0, BLOCK_V)
            z = tl.load(z_row + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(z, axis=0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
            m = m_new
        log_s = tl.log(s)
        z_label = tl.load(z_row + label).to(tl.float32)
        tl.store(logp_ptr + row, (z_label - m) - log_s)
        if WRITE_G:
            r = tl.load(weight_ptr + row)
            g_row = g_ptr + row * stride_g
            for v0 in range(0, V, BLOCK_V):  # G may alias z: each tile is read before it is written
                cols = v0 + tl.arange(0, BLOCK_V)
                z = tl.load(z_row + cols, mask=cols < V, other=0.0).to(tl.float32)
                grad = r * (tl.where(cols == label, 1.0, 0.0) - tl.exp((z - m) - log_s))
                tl.store(g_row + cols, grad.to(g_ptr.dtype.element_ty), mask=cols < V)


def _rows_triton(z, labels, row_weight, g_dtype):
    c, v = z.shape
    logp = _empty((c,), torch.float32, z.device)
    g = None
    if row_weight is not None:
        g = z if g_dtype == z.dtype else _empty((c, v), g_dtype, z.device)
    block_v = 4096 if z.is_cuda else min(256, next_power_of_2(v))
    _rows_kernel[(c,)](z, labels, row_weight if g is not None else logp, logp, g if g is not None else z, v,
                       z.stride(0), g.stride(0) if g is not None else 0,
                       WRITE_G=g is not None, BLOCK_V=block_v, num_warps=8 if z.is_cuda else 4)
    return logp, g


# ----------------------------------------------------------------------------------------------------------------
# One sweep over row chunks
# ----------------------------------------------------------------------------------------------------------------
_MM_OUT_DTYPE = [True]  # does torch.mm take out_dtype for 16-bit CUDA inputs? (cleared on the first failure)


def _logits_fp32(xc, w):
    if xc.dtype == torch.float32:
        return xc @ w.T
    if _MM_OUT_DTYPE[0]:
        try:
            return torch.mm(xc, w.T, out_dtype=torch.float32)
        except torch.cuda.OutOfMemoryError:  # says nothing about out_dtype: it must not end it for the process
            raise
        except (RuntimeError, TypeError):
            _MM_OUT_DTYPE[0] = False
    return (xc @ w.T).float()


_ONEDNN_BF16 = (hasattr(torch.backends.mkldnn, "matmul") and torch.backends.mkldnn.is_available()
                and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def cpu_bf16_products(x: torch.Tensor) -> bool:
    """Should the CPU head matmuls of a call on ``x`` take bf16 products (fp32 sums)? For bf16 inputs, and fp32
    ones under bf16 CPU autocast (decided at the call: the backward runs outside autocast), where oneDNN has bf16."""
    if x.device.type != "cpu" or not _ONEDNN_BF16 or not torch.backends.mkldnn.enabled:
        return False
    if x.dtype == torch.bfloat16:
        return True
    return (x.dtype == torch.float32 and torch.is_autocast_enabled("cpu")
            and torch.get_autocast_dtype("cpu") == torch.bfloat16)


@contextlib.contextmanager
def _onednn_bf16_matmuls():
    """fp32 CPU matmuls inside run on bf16-rounded inputs with fp32 accumulation and output (a global oneDNN
    setting, restored on exit)."""
    flags = torch.backends.mkldnn.matmul
    before = flags.fp32_precision
    flags.fp32_precision = "bf16"
    try:
        yield
    finally:
        flags.fp32_precision = before


def _chunk_rows(n, v, device, bytes_per_logit: int = 6) -> int:
    if CHUNK_ROWS:
        return CHUNK_ROWS
    if device.type == "cuda":
        rows = CHUNK_BYTES_CUDA // (v * bytes_per_logit)
        return max(64, rows // 64 * 64)
    return max(1, min(n, CHUNK_BYTES_CPU // (v * 4)))


def chunked_pass(x, w, labels, valid, row_weight, want_dx: bool, want_dw: bool, triton_rows: bool,
                 low_precision: bool = False, bf16_products: bool = False):
    """One sweep: logp [N] fp32; G @ W [N, H] when ``want_dx``; G^T @ X [V, H] when ``want_dw``.

    G uses ``row_weight`` [N] fp32 (0 on ignored tokens); it may be None when neither gradient is wanted.
    ``low_precision``: 16-bit logits in place of fp32 (``impl="chunks16"``; Triton row step only).
    ``bf16_products`` (CPU, from ``cpu_bf16_products``): the matmuls on bf16-rounded operands, fp32 sums.
    """
    # autocast off on the inputs' device: it would round fp32 logits and G to 16 bits in the forward while the
    # backward's recompute (never under autocast) stays in fp32
    with torch.autocast(x.device.type, enabled=False):
        return _chunked_pass(x, w, labels, valid, row_weight, want_dx, want_dw, triton_rows, low_precision,
                             bf16_products)


def _chunked_pass(x, w, labels, valid, row_weight, want_dx, want_dw, triton_rows, low_precision, bf16_products):
    n, v = x.shape[0], w.shape[0]
    cuda = x.is_cuda
    low = low_precision and triton_rows and x.dtype in (torch.bfloat16, torch.float16)
    bf16 = bf16_products and not cuda and not low and _ONEDNN_BF16
    w16 = cast_frozen(w, torch.bfloat16) if bf16 and want_dx else None
    if not cuda and not low:  # fp32 buffers on the CPU; bf16 products only through oneDNN (``bf16``)
        x, w = x.float(), w.float()
    safe_labels = torch.where(valid, labels, 0)
    logp = _empty((n,), torch.float32, x.device)
    grad_x = _empty(x.shape, x.dtype, x.device) if want_dx else None
    grad_w = torch.zeros(w.shape, dtype=w.dtype, device=w.device) if want_dw else None
    weights = row_weight if (want_dx or want_dw) else None
    step = _chunk_rows(n, v, x.device, 2 if low else 6)
    with _onednn_bf16_matmuls() if bf16 else contextlib.nullcontext():
        for r0 in range(0, n, step):
            xc = x[r0:r0 + step]
            z = xc @ w.T if low else _logits_fp32(xc, w)
            lab = safe_labels[r0:r0 + step]
            rw = None if weights is None else weights[r0:r0 + step].contiguous()
            if triton_rows:
                logp_c, g = _rows_triton(z, lab.contiguous(), rw, x.dtype)
            else:
                logp_c, g = _rows_torch(z, lab, rw)
                g = g if g is None or g.dtype == x.dtype else g.to(x.dtype)
            logp[r0:r0 + step] = logp_c
            if want_dx and w16 is not None:  # oneDNN's bf16 mode converts G and W per call: 2x slower than this
                grad_x[r0:r0 + step] = g.to(torch.bfloat16) @ w16
            elif want_dx:
                torch.mm(g, w, out=grad_x[r0:r0 + step])
            if want_dw:
                grad_w.addmm_(g.T, xc)
            del z, g
    return torch.where(valid, logp, 0.0), grad_x, grad_w


class LinearLogprobsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, valid, triton_rows: bool, want_dx: bool, low_precision: bool,
                bf16_products: bool = False):
        unit = valid.float() if want_dx else None
        logp, unit_dx, _ = chunked_pass(hidden, weight, labels, valid, unit, want_dx, False, triton_rows,
                                        low_precision, bf16_products)
        ctx.save_for_backward(hidden, weight, labels, valid, unit_dx)
        ctx.triton_rows, ctx.low_precision, ctx.bf16_products = triton_rows, low_precision, bf16_products
        return logp

    @staticmethod
    def backward(ctx, grad_logp):
        hidden, weight, labels, valid, unit_dx = ctx.saved_tensors
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        g = torch.where(valid, grad_logp.float(), 0.0)
        dx = dw = None
        if need_dx:
            dx = (g[:, None] * unit_dx).to(hidden.dtype)
        if need_dw:  # recompute the chunks with r = g: dW = sum_i g_i G_i^T h_i
            dw = chunked_pass(hidden, weight, labels, valid, g, False, True, ctx.triton_rows,
                              ctx.low_precision, ctx.bf16_products)[2].to(weight.dtype)
        return dx, dw, None, None, None, None, None, None


# ----------------------------------------------------------------------------------------------------------------
# Checks + dispatcher
# ----------------------------------------------------------------------------------------------------------------
def check_inputs(hidden, weight, labels, ignore_index):
    if not isinstance(hidden, torch.Tensor) or hidden.dim() < 1:
        raise ValueError("hidden: expected a tensor [..., H]")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"weight: expected a 2-D tensor [V, H], got shape {tuple(getattr(weight, 'shape', ()))}")
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden/weight: hidden size {hidden.shape[-1]} != weight.shape[1] {weight.shape[1]}")
    if not isinstance(labels, torch.Tensor) or labels.shape != hidden.shape[:-1]:
        raise ValueError(f"labels: expected shape {tuple(hidden.shape[:-1])}, got {tuple(getattr(labels, 'shape', ()))}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels: expected an integer tensor, got {labels.dtype}")
    for name, t in (("hidden", hidden), ("weight", weight)):
        if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"{name}: dtype {t.dtype} not supported (float32, float16, bfloat16)")
    if hidden.device != weight.device or hidden.device != labels.device:
        raise ValueError("hidden, weight, labels: must be on the same device")
    v = weight.shape[0]
    if v == 0:
        raise ValueError(f"weight: empty vocabulary (shape {tuple(weight.shape)}), need V >= 1 rows")
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= v))
    if labels.numel() and bool(bad.any()):
        raise ValueError(f"labels: values must lie in [0, {v}) or equal ignore_index={ignore_index}")


def prepare(hidden, weight, labels, ignore_index, impl):
    """Checked, flattened, dtype-promoted inputs: x [N, H], w [V, H], labels [N] int64, valid [N], tiles?"""
    check_inputs(hidden, weight, labels, ignore_index)
    if impl not in IMPLS:
        raise ValueError(f"impl: expected one of {IMPLS}, got {impl!r}")
    dtype = torch.promote_types(hidden.dtype, weight.dtype)
    x = hidden.reshape(-1, hidden.shape[-1]).to(dtype)
    w = weight.to(dtype)
    flat_labels = labels.reshape(-1).long()
    tiles = impl == "tiles"
    if tiles:
        if not use_triton(x):
            raise ValueError("impl='tiles' runs Triton kernels only: CUDA tensors, or TRITON_INTERPRET=1 on the CPU")
        x = x if x.stride(-1) == 1 or x.stride(0) == 1 else x.contiguous()
        w = w if w.stride(-1) == 1 or w.stride(0) == 1 else w.contiguous()
        flat_labels = flat_labels.contiguous()
    return x, w, flat_labels, flat_labels != ignore_index, tiles


def empty_batch_zeros(x, w, dim=None) -> torch.Tensor:
    """fp32 zeros for an empty x [0, H] (sum over ``dim``, all when None), differentiable w.r.t. x and w (as the
    full-logits reference is) at no cost: only empty slices are summed."""
    zeros = x.sum() if dim is None else x.sum(dim)
    return (zeros + w[:0].sum()).float()


def linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                    ignore_index: int = -100, impl: str = "auto") -> torch.Tensor:
    """log_softmax(hidden @ weight.T)[i, labels[i]] as float32, 0 where labels == ignore_index.

    hidden [..., H], weight [V, H] (lm_head), labels [...] -> logp [...] float32. Differentiable w.r.t. hidden,
    and w.r.t. weight only when it requires grad (a frozen head costs no dW work or memory). Mixed input dtypes
    are promoted to a common dtype first. Never materialises the [N, V] logits. ``impl``: "auto" / "chunks"
    (row chunks, the default), "chunks16" (row chunks with 16-bit logits, see the module docstring) or "tiles"
    (the fully tiled Triton kernels).
    """
    x, w, flat_labels, valid, tiles = prepare(hidden, weight, labels, ignore_index, impl)
    if x.shape[0] == 0:  # empty batch: zeros tied to both inputs, so each one that requires grad gets a zero grad
        return empty_batch_zeros(x, w, -1).reshape(labels.shape)
    if tiles:
        logp = TiledLogprobsFunction.apply(x, w, flat_labels, valid)
    else:
        want_dx = x.requires_grad and torch.is_grad_enabled()
        logp = LinearLogprobsFunction.apply(x, w, flat_labels, valid, use_triton(x), want_dx, impl == "chunks16",
                                            cpu_bf16_products(x))
    return logp.reshape(labels.shape)
