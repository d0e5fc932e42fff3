"""The flash-attn call sites (packed training rows, the sampler's prefill) against the SDPA paths, on the CPU.

flash-attn runs only on CUDA and has no wheel to carry to the GPU machine, so its kernels never run here. What is
checked is our side of the call: a stand-in with flash-attn 2's documented semantics (packed varlen layout,
int32 cumulative lengths, causal mask aligned to the bottom-right corner of each sequence's score matrix, GQA by
head groups, window_size = (left, right)) replaces it, and every output must match the path without it.
"""
import pytest
import torch

from reflectevo.gen import Engine, SamplingParams
from reflectevo.model import ModelConfig, Transformer
from reflectevo.model import transformer as tfm

CALLS = {"varlen": 0, "dense": 0}


def fake_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                softmax_scale=None, causal=False, window_size=(-1, -1), **unused):
    CALLS["varlen"] += 1
    assert cu_seqlens_q.dtype == cu_seqlens_k.dtype == torch.int32
    assert q.dim() == k.dim() == v.dim() == 3 and q.shape[1] % k.shape[1] == 0 and k.shape == v.shape
    assert int(cu_seqlens_q[-1]) == q.shape[0] and int(cu_seqlens_k[-1]) == k.shape[0]
    assert q.stride(-1) == k.stride(-1) == v.stride(-1) == 1
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    group = q.shape[1] // k.shape[1]
    outs = []
    for i in range(cu_seqlens_q.shape[0] - 1):
        qs = q[int(cu_seqlens_q[i]):int(cu_seqlens_q[i + 1])]
        ks = k[int(cu_seqlens_k[i]):int(cu_seqlens_k[i + 1])].repeat_interleave(group, 1)
        vs = v[int(cu_seqlens_k[i]):int(cu_seqlens_k[i + 1])].repeat_interleave(group, 1)
        nq, nk = qs.shape[0], ks.shape[0]
        assert nq <= max_seqlen_q and nk <= max_seqlen_k
        qi = torch.arange(nq)[:, None] + (nk - nq)  # bottom-right alignment
        kj = torch.arange(nk)[None, :]
        keep = torch.ones(nq, nk, dtype=torch.bool)
        if causal:
            keep &= kj <= qi
        if window_size[0] >= 0:
            keep &= kj >= qi - window_size[0]
        if window_size[1] >= 0:
            keep &= kj <= qi + window_size[1]
        scores = torch.einsum("qhd,khd->hqk", qs.double(), ks.double()) * scale
        p = torch.softmax(scores.masked_fill(~keep, float("-inf")), -1)
        outs.append(torch.einsum("hqk,khd->qhd", p, vs.double()).to(q.dtype))
    return torch.cat(outs, 0)


def fake_dense(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), **unused):
    CALLS["dense"] += 1
    B, T = q.shape[:2]
    cu = torch.arange(0, (B + 1) * T, T, dtype=torch.int32)
    out = fake_varlen(q.reshape(B * T, *q.shape[2:]), k.reshape(B * T, *k.shape[2:]),
                      v.reshape(B * T, *v.shape[2:]), cu, cu, T, T, softmax_scale=softmax_scale, causal=causal,
                      window_size=window_size)
    CALLS["varlen"] -= 1
    return out.reshape(q.shape)


def test_stand_in_follows_the_documented_masks():
    """flash-attn 2's docstring: seqlen_q = 2, seqlen_k = 5, causal keeps [[1 1 1 1 0], [1 1 1 1 1]]."""
    q, k = torch.zeros(2, 1, 5), torch.zeros(5, 1, 5)  # equal scores: each output row averages the kept rows of v
    v = torch.eye(5)[:, None, :].contiguous()
    cu_q, cu_k = torch.tensor([0, 2], dtype=torch.int32), torch.tensor([0, 5], dtype=torch.int32)
    out = fake_varlen(q, k, v, cu_q, cu_k, 2, 5, causal=True)
    torch.testing.assert_close(out[:, 0], torch.tensor([[0.25] * 4 + [0.0], [0.2] * 5]))


@pytest.fixture
def flash(monkeypatch):
    monkeypatch.setattr(tfm, "flash_attn_varlen_func", fake_varlen)
    monkeypatch.setattr(tfm, "flash_attn_func", fake_dense)
    monkeypatch.setattr(tfm, "flash_usable", lambda x: True)
    CALLS.update(varlen=0, dense=0)
    return CALLS


def _tiny(window=None, seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                      num_kv_heads=2, max_position_embeddings=256, eos_token_ids=[0], sliding_window=window)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    return model


@pytest.mark.parametrize("window", [None, 5])
def test_training_rows_through_flash_match_sdpa(flash, monkeypatch, window):
    model = _tiny(window)
    model.embed_tokens.weight.requires_grad_(True)
    lens = [[7, 12, 3], [22]]
    ids = torch.randint(1, 96, (2, 22))
    seq_ids = torch.tensor([[i for i, n in enumerate(row) for _ in range(n)] for row in lens])
    positions = torch.tensor([[p for n in row for p in range(n)] for row in lens])
    results = []
    for use in (True, False):
        monkeypatch.setattr(tfm, "flash_usable", lambda x, use=use: use)
        model.zero_grad(set_to_none=True)
        for packed in (True, False):
            h = (model.hidden_states(ids, positions=positions, seq_ids=seq_ids) if packed
                 else model.hidden_states(ids))
            h.square().sum().backward()
            results.append((h.detach(), model.embed_tokens.weight.grad.clone()))
    assert flash["varlen"] == 2 and flash["dense"] == 2  # one call per layer, packed and not
    for got, want in zip(results[:2], results[2:]):
        torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got[1], want[1], rtol=1e-4, atol=1e-5)


def test_sampler_prefill_through_flash_matches_sdpa(flash, monkeypatch):
    """Prompts sharing a cached prefix (contexts gathered slot by slot) and prompts without one, in one step: the
    logits of every prefill and decode step, and the tokens, equal the SDPA path's. (Tokens alone would not do:
    a tiny random model's next token hardly depends on its context.)"""
    model = _tiny(seed=3)
    g = torch.Generator().manual_seed(5)
    prefix = torch.randint(1, 96, (40,), generator=g).tolist()
    fresh = [torch.randint(1, 96, (n,), generator=g).tolist() for n in (9, 23)]
    first = [prefix + [7, 8]]
    rest = [prefix + torch.randint(1, 96, (n,), generator=g).tolist() for n in (3, 17)] + fresh
    tokens, logits = [], []
    for use in (True, False):
        monkeypatch.setattr(tfm, "flash_usable", lambda x, use=use: use)
        calls = flash["varlen"]
        eng = Engine(model, _Chars(), kv_cache_gib=0.01)
        seen = []
        plain = eng.runner._logits
        monkeypatch.setattr(eng.runner, "_logits", lambda h, plain=plain, seen=seen: seen.append(plain(h)) or seen[-1])
        eng.generate(first, SamplingParams(max_tokens=3))
        tokens.append([o[0].token_ids for o in eng.generate(rest, SamplingParams(max_tokens=8))])
        logits.append(seen)
        assert eng.stats["prefix_cache_hit_tokens"] >= 2 * 32
        assert (flash["varlen"] > calls) == use
    assert tokens[0] == tokens[1]
    assert len(logits[0]) == len(logits[1]) > 2
    for got, want in zip(*logits):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


class _Chars:
    eos_token_ids = [0]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(65 + i % 26) for i in ids)

    def encode(self, text, add_special_tokens=False):
        return [1 + ord(c) % 95 for c in text]
