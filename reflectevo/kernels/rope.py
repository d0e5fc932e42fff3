"""Rotary position embeddings (Hugging Face "rotate_half" convention): frequencies, a PyTorch reference and a
Triton kernel used for both directions.

Frequencies for head_dim D and base theta (fp32, as Hugging Face computes them):

    inv_freq[i] = 1 / theta^(2i / D),  i = 0 .. D/2-1
    "linear" scaling:  inv_freq / factor
    "llama3" scaling (Llama 3.1): with wavelen = 2*pi / inv_freq, low_wl = L / low_freq_factor and
        high_wl = L / high_freq_factor (L = original_max_position_embeddings):
        wavelen < high_wl            -> inv_freq                         (high frequencies kept)
        wavelen > low_wl             -> inv_freq / factor                (low frequencies scaled)
        otherwise, s = (L / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor),
                                     -> (1 - s) * inv_freq / factor + s * inv_freq
    "yarn" scaling (YaRN; Qwen2 / Qwen2.5 long context): with L = original_max_position_embeddings (default
        max_position_embeddings) and dim(r) = D * ln(L / (2*pi*r)) / (2 * ln theta), the pair index where a
        frequency turns r times over L positions, low = dim(beta_fast), high = dim(beta_slow) (floor / ceil
        unless truncate is false; clipped to [0, D - 1]), ramp[i] = clamp((i - low) / (high - low), 0, 1):
                                     -> inv_freq / factor * ramp + inv_freq * (1 - ramp)
        and cos, sin are multiplied by the attention factor: attention_factor when given, else
        mscale(factor, mscale) / mscale(factor, mscale_all_dim) when both are set, else mscale(factor, 1),
        mscale(s, m) = 1 + 0.1 * m * ln(s) for s > 1, else 1.
    "dynamic" scaling (dynamic NTK): with M = max_position_embeddings and the sequence length S (see
        dynamic_ntk_inv_freq for which S), theta' = theta * (factor * max(S, M) / M - (factor - 1))^(D / (D - 2))
                                     -> 1 / theta'^(2i / D)    (plain RoPE while S <= M)
    angles = position * inv_freq;  cos = a * cos(cat(angles, angles)),  sin = a * sin(cat(angles, angles))
    (a: the attention factor, 1 except for "yarn")

Rotation of one head vector x = [x1, x2] (halves of length D/2), with cos = [c1, c2], sin = [s1, s2]:

    out = x * cos + rotate_half(x) * sin,  rotate_half(x) = [-x2, x1]
        = [x1*c1 - x2*s1,  x2*c2 + x1*s2]

It is linear in x, so the gradient is the transposed rotation (the same rotation with -sin when the two halves
of cos/sin are equal, as they are for cat(angles, angles)):

    dx = [do1*c1 + do2*s2,  do2*c2 - do1*s1]

Memory and traffic: the kernel reads q/k and one cos/sin row per token and writes the rotated tensors in one
pass; backward saves only cos/sin. The reference materialises an fp32 copy, rotate_half(x), x*cos and
rotate_half(x)*sin for each of q and k (four temporaries of q's shape in fp32, written and read back).

Without Triton (the CPU), ``_rotate_cpu`` computes the half formulas above straight into one output buffer
(a multiply and a fused multiply-add per half, in fp32 / fp64, one rounding to the input dtype) in both directions,
with no rotate_half tensor or autograd graph of six nodes per input. Forward + backward of q [1, 1822, 9, 64] and k
[1, 1822, 3, 64] on a 2-core AMX Xeon (medians of 9, interleaved): bf16 3.9 ms vs 5.6 ms for the reference, fp32
2.9 vs 6.4 ms. 16-bit inputs are upcast once first (mixed-dtype multiplies would cast per operand). Its results
may differ from the reference's in the last bit of the compute dtype (a fused multiply-add rounds once).
cos/sin are treated as constants (no gradient); a call whose cos/sin require grad takes the reference path.
Inside ``cpu_compiled.compiled_cpu_kernels`` the same formulas run as one compiled loop per direction.
"""
from __future__ import annotations

import math

import torch

from reflectevo.kernels import cpu_compiled
from reflectevo.kernels._dispatch import HAS_TRITON, next_power_of_2, use_triton

if HAS_TRITON:
    import triton
    import triton.language as tl

_MAX_TILE = 4096  # heads x half-dim elements rotated at once by one program


ROPE_TYPES = ("default", "linear", "llama3", "yarn", "dynamic")


def rope_kind(scaling: dict | None) -> str:
    """The scaling type of a Hugging Face ``rope_scaling`` dict (key ``rope_type`` or the older ``type``)."""
    return scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"


def _plain_inv_freq(head_dim: int, theta) -> torch.Tensor:
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float32) / head_dim
    return 1.0 / (theta ** exponent)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None = None,
                  max_position_embeddings: int | None = None) -> torch.Tensor:
    """Inverse frequencies [head_dim // 2] (fp32) for plain, "linear", "llama3", "yarn" or "dynamic" scaling.

    ``scaling`` is a Hugging Face ``rope_scaling`` dict (key ``rope_type`` or the older ``type``); None,
    ``{}`` or type "default" mean no scaling. ``max_position_embeddings`` stands in for a missing
    ``original_max_position_embeddings`` ("llama3", "yarn") and a missing yarn ``factor`` (as transformers).
    For "dynamic" these are the frequencies of sequences up to max_position_embeddings (plain RoPE);
    longer ones take dynamic_ntk_inv_freq.
    """
    if head_dim <= 0 or head_dim % 2:
        raise ValueError(f"rope_inv_freq: head_dim must be a positive even number, got {head_dim}")
    inv_freq = _plain_inv_freq(head_dim, float(theta))
    if not scaling:
        return inv_freq
    if float(scaling.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ValueError(f"rope_scaling: partial_rotary_factor is not supported: {scaling}")
    kind = rope_kind(scaling)
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / _positive(scaling, "factor")
    if kind == "dynamic":
        _positive(scaling, "factor")
        if max_position_embeddings is None or head_dim < 4:
            raise ValueError(f"rope_scaling 'dynamic' needs max_position_embeddings and head_dim >= 4: {scaling}")
        return inv_freq
    if kind == "yarn":
        return _yarn_inv_freq(head_dim, float(theta), scaling, max_position_embeddings)
    if kind == "llama3":
        factor = _positive(scaling, "factor")
        low = _positive(scaling, "low_freq_factor")
        high = _positive(scaling, "high_freq_factor")
        old_len = float(_original_len(scaling, max_position_embeddings))
        wavelen = 2 * math.pi / inv_freq
        low_wavelen, high_wavelen = old_len / low, old_len / high
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, blended, scaled)
    raise ValueError(f"rope scaling type {kind!r} is not supported (supported: {', '.join(ROPE_TYPES)})")


def _need(scaling: dict, key: str):
    if scaling.get(key) is None:
        raise ValueError(f"rope_scaling is missing {key!r}: {scaling}")
    return scaling[key]


def _positive(scaling: dict, key: str) -> float:
    """``scaling[key]`` as a float, refused unless a positive finite number (0 would give inf / NaN frequencies)."""
    value = _need(scaling, key)
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if isinstance(value, bool) or not (math.isfinite(number) and number > 0):
        raise ValueError(f"rope_scaling {key!r} must be a positive number, got {value!r}: {scaling}")
    return number


def _original_len(scaling: dict, max_position_embeddings: int | None):
    if scaling.get("original_max_position_embeddings") is None and max_position_embeddings is not None:
        return max_position_embeddings
    return _positive(scaling, "original_max_position_embeddings")


def _yarn_factor(scaling: dict, max_position_embeddings: int | None) -> float:
    if scaling.get("factor") is None and max_position_embeddings is not None:
        return max_position_embeddings / float(_original_len(scaling, max_position_embeddings))
    return _positive(scaling, "factor")


def _yarn_inv_freq(head_dim: int, theta: float, scaling: dict, max_position_embeddings: int | None) -> torch.Tensor:
    factor = _yarn_factor(scaling, max_position_embeddings)
    old_len = float(_original_len(scaling, max_position_embeddings))
    beta_fast = float(scaling.get("beta_fast") or 32)  # 0 / None take the paper's values, as transformers
    beta_slow = float(scaling.get("beta_slow") or 1)

    def pair_index(turns: float) -> float:  # fractional pair index whose frequency turns ``turns`` times in old_len
        return head_dim * math.log(old_len / (turns * 2 * math.pi)) / (2 * math.log(theta))

    low, high = pair_index(beta_fast), pair_index(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    wavelength_base = float(theta) ** (torch.arange(0, head_dim, 2).to(torch.float32) / head_dim)
    kept, scaled = 1.0 / wavelength_base, 1.0 / (factor * wavelength_base)
    keep = 1 - ramp  # 1 for the high frequencies (pairs below low), 0 for the low ones (above high)
    return scaled * (1 - keep) + kept * keep


def rope_attention_factor(scaling: dict | None, max_position_embeddings: int | None = None) -> float:
    """The factor cos and sin are multiplied by: YaRN's attention factor, 1.0 for every other type."""
    if rope_kind(scaling) != "yarn":
        return 1.0
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    factor = _yarn_factor(scaling, max_position_embeddings)

    def mscale(m: float) -> float:
        return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0

    m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
    if m and m_all:
        return float(mscale(float(m)) / mscale(float(m_all)))
    return mscale(1.0)


def dynamic_ntk_inv_freq(head_dim: int, theta: float, factor: float, max_position_embeddings: int,
                         seq_len: torch.Tensor) -> torch.Tensor:
    """Dynamic-NTK inverse frequencies for sequence lengths ``seq_len`` (an integer tensor of any shape):
    seq_len.shape + (head_dim // 2,), fp32, on seq_len's device. Lengths up to max_position_embeddings give
    plain RoPE. Which length applies to which token is the caller's choice (Transformer.rope_tables)."""
    m = max_position_embeddings
    length = seq_len.clamp(min=m)
    base = float(theta) * ((float(factor) * length / m) - (float(factor) - 1)) ** (head_dim / (head_dim - 2))
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device=seq_len.device).to(torch.float32) / head_dim
    return 1.0 / (base.to(torch.float32)[..., None] ** exponent)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, scaling: dict | None = None,
                 dtype: torch.dtype = torch.float32,
                 max_position_embeddings: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape positions.shape + (head_dim,) ([T] -> [T, D], [B, T] -> [B, T, D]), in ``dtype``,
    including the attention factor. "dynamic": the frequencies of length max(positions) + 1 for every position."""
    if positions.is_floating_point():
        raise ValueError(f"rope_cos_sin: positions must be an integer tensor, got {positions.dtype}")
    inv_freq = rope_inv_freq(head_dim, theta, scaling, max_position_embeddings).to(positions.device)
    if rope_kind(scaling) == "dynamic" and positions.numel():
        inv_freq = dynamic_ntk_inv_freq(head_dim, theta, float(scaling["factor"]), max_position_embeddings,
                                        positions.max() + 1)
    angles = positions.to(torch.float32)[..., None] * inv_freq
    emb = torch.cat((angles, angles), dim=-1)
    scale = rope_attention_factor(scaling, max_position_embeddings)
    return (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _check(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"apply_rope: q and k must be [B, T, heads, head_dim], got {tuple(q.shape)}, {tuple(k.shape)}")
    b, t, _, d = q.shape
    if k.shape[0] != b or k.shape[1] != t or k.shape[3] != d:
        raise ValueError(f"apply_rope: k shape {tuple(k.shape)} does not match q shape {tuple(q.shape)}")
    if d % 2:
        raise ValueError(f"apply_rope: head_dim must be even, got {d}")
    if cos.shape != sin.shape:
        raise ValueError(f"apply_rope: cos {tuple(cos.shape)} and sin {tuple(sin.shape)} differ in shape")
    if cos.shape[-2:] != (t, d) or cos.dim() not in (2, 3) or (cos.dim() == 3 and cos.shape[0] not in (1, b)):
        raise ValueError(f"apply_rope: cos/sin must be [T, D] or [B, T, D] with T={t}, D={d}, got {tuple(cos.shape)}")


def _bcast(cos: torch.Tensor) -> torch.Tensor:
    """[T, D] or [B, T, D] -> [B or 1, T, 1, D] for broadcasting against [B, T, H, D]."""
    return (cos if cos.dim() == 3 else cos[None]).unsqueeze(2)


def apply_rope_reference(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Plain PyTorch rotate_half RoPE, computed in fp32 (fp64 for fp64 inputs), returned in each input's dtype."""
    _check(q, k, cos, sin)

    def rotate(x):
        compute = torch.float64 if x.dtype == torch.float64 else torch.float32
        c, s = _bcast(cos).to(compute), _bcast(sin).to(compute)
        xc = x.to(compute)
        return (xc * c + _rotate_half(xc) * s).to(x.dtype)

    return rotate(q), rotate(k)


if HAS_TRITON:

    @triton.jit
    def _rope_kernel(X, COS, SIN, OUT, T, H, HALF,
                     stride_xb, stride_xt, stride_xh, stride_ob, stride_ot, stride_oh, stride_cb, stride_ct,
                     BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, BACKWARD: tl.constexpr,
                     COMPUTE: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)
        b = pid // T
        t = pid % T
        d = tl.arange(0, BLOCK_HALF)
        dmask = d < HALF
        c_row = b * stride_cb + t * stride_ct
        c1 = tl.load(COS + c_row + d, mask=dmask, other=0.0).to(COMPUTE)[None, :]
        c2 = tl.load(COS + c_row + HALF + d, mask=dmask, other=0.0).to(COMPUTE)[None, :]
        s1 = tl.load(SIN + c_row + d, mask=dmask, other=0.0).to(COMPUTE)[None, :]
        s2 = tl.load(SIN + c_row + HALF + d, mask=dmask, other=0.0).to(COMPUTE)[None, :]
        x_row = X + b * stride_xb + t * stride_xt
        o_row = OUT + b * stride_ob + t * stride_ot
        for h0 in range(0, H, BLOCK_H):
            h = h0 + tl.arange(0, BLOCK_H)
            mask = (h < H)[:, None] & dmask[None, :]
            x_ptr = x_row + h[:, None] * stride_xh + d[None, :]
            o_ptr = o_row + h[:, None] * stride_oh + d[None, :]
            x1 = tl.load(x_ptr, mask=mask, other=0.0).to(COMPUTE)
            x2 = tl.load(x_ptr + HALF, mask=mask, other=0.0).to(COMPUTE)
            if BACKWARD:
                o1 = x1 * c1 + x2 * s2
                o2 = x2 * c2 - x1 * s1
            else:
                o1 = x1 * c1 - x2 * s1
                o2 = x2 * c2 + x1 * s2
            tl.store(o_ptr, o1.to(OUT.dtype.element_ty), mask=mask)
            tl.store(o_ptr + HALF, o2.to(OUT.dtype.element_ty), mask=mask)


def _rope_launch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool) -> torch.Tensor:
    """Rotate x [B, T, H, D] (any strides over B, T, H) into a new contiguous tensor."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    b, t, h, d = x.shape
    out = torch.empty((b, t, h, d), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    half = d // 2
    block_half = next_power_of_2(half)
    block_h = max(1, min(next_power_of_2(h), _MAX_TILE // block_half))
    stride_cb = cos.stride(0) if cos.dim() == 3 and cos.shape[0] > 1 else 0
    compute = tl.float64 if x.dtype == torch.float64 else tl.float32
    _rope_kernel[(b * t,)](x, cos, sin, out, t, h, half,
                           x.stride(0), x.stride(1), x.stride(2), out.stride(0), out.stride(1), out.stride(2),
                           stride_cb, cos.stride(-2),
                           BLOCK_H=block_h, BLOCK_HALF=block_half, BACKWARD=backward, COMPUTE=compute,
                           num_warps=4 if block_h * block_half <= 1024 else 8)
    return out


def _rows_contiguous(cos: torch.Tensor) -> torch.Tensor:
    return cos if cos.stride(-1) == 1 else cos.contiguous()


class _RoPEFunction(torch.autograd.Function):
    """q and k rotated by ``rotate(x, cos, sin, backward)`` (the Triton launch, or the CPU half formulas) with
    cos / sin already laid out for it; the gradient is the transposed rotation, so only cos / sin are saved."""

    @staticmethod
    def forward(ctx, q, k, cos, sin, rotate):
        ctx.save_for_backward(cos, sin)
        ctx.rotate = rotate
        return rotate(q, cos, sin, False), rotate(k, cos, sin, False)

    @staticmethod
    def backward(ctx, dq_out, dk_out):
        cos, sin = ctx.saved_tensors
        dq = ctx.rotate(dq_out, cos, sin, True) if ctx.needs_input_grad[0] and dq_out is not None else None
        dk = ctx.rotate(dk_out, cos, sin, True) if ctx.needs_input_grad[1] and dk_out is not None else None
        return dq, dk, None, None, None


def _rotate_cpu(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool) -> torch.Tensor:
    """x [B,T,H,D] rotated (forward) or rotated back (the transposed rotation) by cos/sin [B|1,T,1,D]."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    c, s = cos.to(compute), sin.to(compute)
    dtype, x = x.dtype, x.to(compute)  # one upcast: mixed-dtype ops below would each cast their operands
    h = x.shape[-1] // 2
    out = torch.empty(x.shape, dtype=compute, device=x.device)
    x1, x2, o1, o2 = x[..., :h], x[..., h:], out[..., :h], out[..., h:]
    if backward:  # [do1*c1 + do2*s2, do2*c2 - do1*s1]
        torch.mul(x1, c[..., :h], out=o1).addcmul_(x2, s[..., h:])
        torch.mul(x2, c[..., h:], out=o2).addcmul_(x1, s[..., :h], value=-1)
    else:  # [x1*c1 - x2*s1, x2*c2 + x1*s2]
        torch.mul(x1, c[..., :h], out=o1).addcmul_(x2, s[..., :h], value=-1)
        torch.mul(x2, c[..., h:], out=o2).addcmul_(x1, s[..., h:])
    return out if out.dtype == dtype else out.to(dtype)


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Rotate q [B, T, Hq, D] and k [B, T, Hk, D] by cos/sin ([T, D] or [B, T, D]); returns (q_out, k_out).

    Computed in fp32 (fp64 for fp64 inputs), each output in its input's dtype.
    """
    _check(q, k, cos, sin)
    grad_cos_sin = cos.requires_grad or sin.requires_grad
    if use_triton(q) and not grad_cos_sin and cos.device == q.device:
        cos, sin = _rows_contiguous(cos), _rows_contiguous(sin)
        if cos.stride() != sin.stride():
            cos, sin = cos.contiguous(), sin.contiguous()
        return _RoPEFunction.apply(q, k, cos, sin, _rope_launch)
    if (q.device.type == cos.device.type == "cpu" and not grad_cos_sin
            and q.is_floating_point() and k.is_floating_point()):
        rotate = cpu_compiled.rotate if cpu_compiled.active(q) else _rotate_cpu
        return _RoPEFunction.apply(q, k, _bcast(cos), _bcast(sin), rotate)
    return apply_rope_reference(q, k, cos, sin)
