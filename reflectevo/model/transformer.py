"""A Llama-family decoder written out by hand: Llama 2/3/3.1, Mistral, Qwen2, Qwen3, SmolLM.

    x = embed(ids)
    for each layer:  x = x + o_proj(attention(rope(q_proj(rmsnorm(x))), rope(k_proj(.)), v_proj(.)))
                     x = x + down_proj(silu(gate_proj(rmsnorm(x))) * up_proj(rmsnorm(x)))
    logits = lm_head(rmsnorm(x))

Qwen3 also normalises each head of q and k (``q_norm`` / ``k_norm``, RMSNorm weights of head_dim) between the
projection and RoPE; they are part of Attention.forward, so every path (training, packing, checkpointing, the
sampler's prefill and paged decode, CUDA-graph replays) runs them. They are not linear layers: NF4 and LoRA
leave them alone.

Seams for the rest of the project:
- every linear layer is a plain ``nn.Linear`` that NF4 / LoRA layers replace in place (reflectevo.model.lora);
- ``hidden_states`` stops before the lm_head (the fused losses take the hidden states and the head weight);
- ``attention=`` takes the sampler's paged-KV backend, called as ``backend(layer_idx, q, k, v)``;
- ``seq_ids=`` packs several sequences in one row with block-diagonal causal attention;
- ``gradient_checkpointing`` recomputes each decoder layer in backward;
- under CPU 16-bit autocast with the compiled CPU loops on (``cpu_compiled``), each residual add runs fused into
  the norm after it (``DecoderLayer.forward_deferred``; ``FUSED_RESIDUAL_NORM = False`` keeps them apart).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from reflectevo.kernels.cpu_attention import (causal_attention_fp32_backward, causal_forward16, is_cpu16,
                                              packed_causal_attention, wants_fp32_backward)
from reflectevo.kernels import cpu_compiled
from reflectevo.kernels.rmsnorm import add_rms_norm, rms_norm
from reflectevo.kernels.rope import apply_rope, dynamic_ntk_inv_freq
from reflectevo.kernels.swiglu import swiglu
from reflectevo.model.config import ModelConfig
from reflectevo.model.lora_group import grouped_projections

try:  # optional: FlashAttention-2 for packed (varlen) training batches on CUDA
    from flash_attn import flash_attn_func, flash_attn_varlen_func
except Exception:  # pragma: no cover - not installed on CPU machines
    flash_attn_func = flash_attn_varlen_func = None


FUSED_RESIDUAL_NORM = True  # CPU 16-bit autocast: residual adds fused into the norms (DecoderLayer.forward_deferred)


def flash_usable(x: torch.Tensor) -> bool:
    """flash-attn installed and ``x`` a CUDA fp16 / bf16 tensor (its kernels take nothing else)."""
    return flash_attn_varlen_func is not None and x.is_cuda and x.dtype in (torch.float16, torch.bfloat16)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps, out_dtype)


def causal_attention(q, k, v, window: int | None = None, seq_ids: torch.Tensor | None = None):
    """Causal attention for q [B,T,Hq,D], k/v [B,T,Hkv,D] -> [B,T,Hq,D].

    Token i sees token j when j <= i, i - j < window (sliding window) and seq_ids match (packing).
    Packed rows (runs of equal seq_ids) without flash-attn run one causal SDPA per sequence: the same result as
    a block-diagonal mask at sum(L^2) instead of T^2 work, and no [B, H, T, T] mask or attention matrix.
    16-bit CPU tensors under autograd keep SDPA's fused forward and take its backward in fp32 (faster and more
    exact there: reflectevo.kernels.cpu_attention).
    """
    B, T, Hq, D = q.shape
    if flash_usable(q):
        return _flash_attention(q, k, v, window, seq_ids)
    if seq_ids is not None:
        if wants_fp32_backward(q, k, v):  # all sequences' backward in one fp32 call (kernels/cpu_attention.py)
            spans = [(b, s, e) for b, bounds in enumerate(_segments(seq_ids)) for s, e in zip(bounds[:-1], bounds[1:])]
            if window is None or max(e - s for _, s, e in spans) <= window:
                out = packed_causal_attention(q, k, v, spans)
                if out is not None:
                    return out
        rows = []
        for b, bounds in enumerate(_segments(seq_ids)):
            # split views: their backward concatenates the gradients, where slices would each zero-fill a full row
            lens = [e - s for s, e in zip(bounds[:-1], bounds[1:])]
            parts = [causal_attention(qs, ks, vs, window)
                     for qs, ks, vs in zip(*(t[b:b + 1].split(lens, 1) for t in (q, k, v)))]
            rows.append(torch.cat(parts, 1) if len(parts) > 1 else parts[0])
        return torch.cat(rows, 0) if B > 1 else rows[0]
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    gqa = Hq != k.shape[2]
    if window is None or T <= window:
        if T > 1 and wants_fp32_backward(qt, kt, vt):  # 16-bit CPU training: its backward in fp32
            return causal_attention_fp32_backward(qt, kt, vt).transpose(1, 2)
        if T > 1 and is_cpu16(qt, kt, vt):  # no gradient wanted here (the branch above)
            return causal_forward16(qt, kt, vt)[0].transpose(1, 2)
        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=T > 1, enable_gqa=gqa)
    else:
        i = torch.arange(T, device=q.device)
        mask = (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] < window)
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, enable_gqa=gqa)
    return out.transpose(1, 2)


_PACKING_MEMO: dict = {}


def _per_packing(kind: str, seq_ids: torch.Tensor, compute):
    """``compute(seq_ids)``, computed once per seq_ids tensor (and in-place version) rather than once per layer:
    every layer of a forward (and of its checkpointed recompute) gets the same tensor, and each computation copies
    to the host, which on a GPU waits for all queued work and stops the host from running ahead of it."""
    hit = _PACKING_MEMO.get(kind)
    if hit is not None and hit[0] is seq_ids and hit[1] == seq_ids._version:
        return hit[2]
    value = compute(seq_ids)
    _PACKING_MEMO[kind] = (seq_ids, seq_ids._version, value)
    return value


def _segment_bounds(seq_ids: torch.Tensor) -> list[list[int]]:
    T = seq_ids.shape[1]
    change = torch.ones_like(seq_ids, dtype=torch.bool)
    change[:, 1:] = seq_ids[:, 1:] != seq_ids[:, :-1]
    return [torch.nonzero(row).flatten().tolist() + [T] for row in change.cpu()]


def _segments(seq_ids: torch.Tensor) -> list[list[int]]:
    """Boundaries [0, ..., T] of the runs of equal ids in each row of seq_ids [B, T]."""
    return _per_packing("segments", seq_ids, _segment_bounds)


def _varlen_bounds(seq_ids: torch.Tensor):
    B, T = seq_ids.shape
    flat = seq_ids.reshape(-1) + torch.arange(B, device=seq_ids.device).repeat_interleave(T) * (int(seq_ids.max()) + 1)
    starts = torch.nonzero(torch.diff(flat, prepend=flat[:1] - 1)).flatten()
    cu = torch.cat([starts, torch.tensor([B * T], device=seq_ids.device)]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


def _flash_attention(q, k, v, window, seq_ids):
    win = (window - 1, 0) if window is not None else (-1, -1)
    if seq_ids is None:
        return flash_attn_func(q, k, v, causal=True, window_size=win)
    B, T = seq_ids.shape
    cu, max_len = _per_packing("varlen", seq_ids, _varlen_bounds)
    out = flash_attn_varlen_func(
        q.reshape(B * T, *q.shape[2:]), k.reshape(B * T, *k.shape[2:]), v.reshape(B * T, *v.shape[2:]),
        cu, cu, max_len, max_len, causal=True, window_size=win,
    )
    return out.reshape(q.shape)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.window = cfg.window_for_layer(layer_idx)
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=bias)
        o_bias = bias and cfg.architecture != "qwen2"
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=o_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x, cos, sin, attention=None, seq_ids=None):
        B, T, _ = x.shape
        qkv = grouped_projections(x, (self.q_proj, self.k_proj, self.v_proj))
        q, k, v = qkv if qkv is not None else (self.q_proj(x), self.k_proj(x), self.v_proj(x))
        q = q.view(B, T, self.num_heads, self.head_dim)
        k = k.view(B, T, self.num_kv_heads, self.head_dim)
        v = v.view(B, T, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, k, cos, sin)
        if attention is None:
            out = causal_attention(q, k, v, self.window, seq_ids)
        else:
            out = attention(self.layer_idx, q, k, v)
        return self.o_proj(out.reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        bias = cfg.mlp_bias
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=bias)

    def forward(self, x):
        gate_up = grouped_projections(x, (self.gate_proj, self.up_proj))
        gate, up = gate_up if gate_up is not None else (self.gate_proj(x), self.up_proj(x))
        return self.down_proj(swiglu(gate, up))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, attention=None, seq_ids=None):
        # fp32 activations under CPU autocast: the norms write the 16-bit input every projection would cast to
        h = torch.get_autocast_dtype("cpu") if x.device.type == "cpu" and torch.is_autocast_enabled("cpu") else None
        x = x + self.self_attn(self.input_layernorm(x, h), cos, sin, attention, seq_ids)
        return x + self.mlp(self.post_attention_layernorm(x, h))

    def forward_deferred(self, x, pending, cos, sin, attention=None, seq_ids=None):
        """``forward`` for CPU 16-bit autocast with each residual add fused into the norm after it: takes the
        previous layer's MLP output not yet added (``pending``, None for the first layer) and returns
        (the residual stream, this layer's MLP output not yet added)."""
        h = torch.get_autocast_dtype("cpu")
        if pending is None:
            normed = self.input_layernorm(x, h)
        else:
            x, normed = add_rms_norm(x, pending, self.input_layernorm.weight, self.input_layernorm.eps, h)
        attn = self.self_attn(normed, cos, sin, attention, seq_ids)
        x, normed = add_rms_norm(x, attn, self.post_attention_layernorm.weight, self.post_attention_layernorm.eps, h)
        return x, self.mlp(normed)


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.gradient_checkpointing = False
        self.register_buffer("inv_freq", config.inv_freq(), persistent=False)
        self.rope_attention_factor = config.rope_attention_factor()

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    def tie_weights(self):
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def rope_tables(self, positions: torch.Tensor, dtype: torch.dtype, per_token: bool = False):
        """cos/sin [B,T,D] for integer positions [B,T], computed in fp32, multiplied by the attention factor
        (YaRN) and then cast, as transformers does. Every path (training, scoring, the sampler's prefill and
        decode, CUDA-graph replays) takes its tables from here.

        Dynamic NTK ("dynamic") sets the frequencies from a sequence length S (plain RoPE while
        S <= max_position_embeddings):

        - ``per_token=False`` (no KV cache: training, scoring): S = max(positions) + 1 over the whole call, as
          transformers computes it for a forward pass. transformers also keeps the largest S seen across calls
          (until a call is shorter than max_position_embeddings); this is stateless, so it equals transformers
          on a fresh model, or for calls in increasing length.
        - ``per_token=True`` (the paged KV cache): S = position + 1 of each token, the length of its sequence
          when its key is written. A cached key is never rotated again, so the cache content of a token depends
          on its prefix alone (prefix-cache hits, chunked prefill and batch composition change nothing), and a
          decode step rotates its query as transformers' generate() does for one sequence. A prompt prefilled
          beyond max_position_embeddings differs from the no-cache forward (which rotates every token with the
          whole length): exact parity is impossible once keys are cached with earlier frequencies. The sampler
          (Engine) caps max_model_len at max_position_embeddings, so there it is plain RoPE, which equals the
          no-cache forward and transformers.
        """
        pos = positions[..., None].float()
        cfg = self.config
        if cfg.rope_type == "dynamic" and positions.numel():
            seq_len = positions + 1 if per_token else positions.max() + 1
            inv_freq = dynamic_ntk_inv_freq(cfg.head_dim, cfg.rope_theta, float(cfg.rope_scaling["factor"]),
                                            cfg.max_position_embeddings, seq_len)
            if cfg.rope_freq_factors is not None:
                inv_freq = inv_freq / torch.tensor(cfg.rope_freq_factors, dtype=torch.float32, device=pos.device)
            freqs = pos * inv_freq  # [B,T,1] x ([D/2] or per token [B,T,D/2])
        else:
            freqs = pos * self.inv_freq.float()
        emb = torch.cat([freqs, freqs], dim=-1)
        cos, sin = emb.cos(), emb.sin()
        if self.rope_attention_factor != 1.0:
            cos, sin = cos * self.rope_attention_factor, sin * self.rope_attention_factor
        return cos.to(dtype), sin.to(dtype)

    def hidden_states(self, input_ids, positions=None, attention=None, seq_ids=None) -> torch.Tensor:
        """[B,T] token ids -> [B,T,H] final-norm hidden states (no lm_head)."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        if positions is None:
            positions = torch.arange(T, device=input_ids.device).expand(B, T)
        x = self.embed_tokens(input_ids)
        cos, sin = self.rope_tables(positions, x.dtype, per_token=attention is not None)
        recompute = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        if (FUSED_RESIDUAL_NORM and x.device.type == "cpu" and torch.is_autocast_enabled("cpu")
                and cpu_compiled.active(x)):
            pending = None
            for layer in self.layers:
                if recompute:
                    x, pending = checkpoint(layer.forward_deferred, x, pending, cos, sin, attention, seq_ids,
                                            use_reentrant=False)
                else:
                    x, pending = layer.forward_deferred(x, pending, cos, sin, attention, seq_ids)
            return self.norm(x if pending is None else x + pending)
        for layer in self.layers:
            if recompute:
                x = checkpoint(layer, x, cos, sin, attention, seq_ids, use_reentrant=False)
            else:
                x = layer(x, cos, sin, attention, seq_ids)
        return self.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def forward(self, input_ids, positions=None, attention=None, seq_ids=None) -> torch.Tensor:
        return self.logits(self.hidden_states(input_ids, positions, attention, seq_ids)).float()

    def num_parameters(self) -> int:
        seen, total = set(), 0
        for p in self.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
        return total
