"""Regression tests for the sampler audit: weight changes the prefix cache must notice, interrupts inside the
scheduler, top_k / top_p ties, the paged decode kernel's batch invariance, SamplingParams checked at generate
time, greedy below a tiny temperature, and the terminal progress line."""
import io

import pytest
import torch

from reflectevo.gen import Engine, SamplingParams
from reflectevo.gen import sampler as sampler_mod
from reflectevo.gen.fingerprint import content_fingerprint
from reflectevo.gen.progress import Progress
from reflectevo.gen.sampler import _top_k_mask, _top_p_mask
from reflectevo.kernels import kernel_backend
from reflectevo.kernels import paged_attention as pa
from reflectevo.model import ModelConfig, Transformer, lora
from reflectevo.model.lora import lora_modules, lora_parameters
from test_gen import VOCAB, CharTokenizer, one_thread, plain_greedy, prompts_mixed, tiny  # noqa: F401 (fixtures)
from test_gen_adapter import adapted_model

PROMPT = list(range(1, 41))  # two full blocks + 8: a second call hits 32 cached tokens
GREEDY6 = SamplingParams(max_tokens=6, ignore_eos=True)


def _fresh_tiny(seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                      num_kv_heads=2, max_position_embeddings=256, eos_token_ids=[0])
    model = Transformer(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    return model


def _train_step(model, opt, prompt=PROMPT):
    model.train()
    model(torch.tensor([prompt])).logsumexp(-1).mean().backward()
    opt.step()
    opt.zero_grad()
    model.eval()


def _regenerates(model, eng):
    """The engine's greedy tokens after a weight change equal plain decoding, with no prefix-cache hit."""
    hits = eng.stats["prefix_cache_hit_tokens"]
    out = eng.generate([PROMPT], GREEDY6)[0][0].token_ids
    assert out == plain_greedy(model, PROMPT, 6, eos=())
    assert eng.stats["prefix_cache_hit_tokens"] == hits


# ----------------------------------------------------------------------------- 1. prefix-cache staleness
def test_fused_optimizer_step_drops_the_prefix_cache(one_thread):  # noqa: F811
    model = _fresh_tiny()
    eng = Engine(model, CharTokenizer(), kv_cache_gib=0.01)
    eng.generate([PROMPT], GREEDY6)
    _train_step(model, torch.optim.AdamW(model.parameters(), lr=0.05, fused=True))
    _regenerates(model, eng)


def test_replaced_parameter_data_drops_the_prefix_cache(one_thread):  # noqa: F811
    model = _fresh_tiny()
    eng = Engine(model, CharTokenizer(), kv_cache_gib=0.01)
    eng.generate([PROMPT], GREEDY6)
    torch.manual_seed(1)
    for p in model.parameters():
        p.data = p.data + 0.3 * torch.randn_like(p)
    _regenerates(model, eng)


def test_frozen_base_replaced_data_is_noticed_without_fingerprinting_it(one_thread):  # noqa: F811
    model = _fresh_tiny()
    for p in model.parameters():
        p.requires_grad_(False)
    eng = Engine(model, CharTokenizer(), kv_cache_gib=0.01)
    assert eng._weights_signature()[1] == ()  # no content pass over frozen weights
    eng.generate([PROMPT], GREEDY6)
    model.norm.weight.data = model.norm.weight.data * 1.5
    _regenerates(model, eng)


@pytest.mark.parametrize("change", ["scaling", "disabled"])
def test_lora_scaling_or_switch_drops_the_prefix_cache(one_thread, change):  # noqa: F811
    model = adapted_model(False)
    eng = Engine(model, CharTokenizer(), kv_cache_gib=0.01)
    eng.generate([PROMPT], GREEDY6)
    for m in lora_modules(model).values():
        setattr(m, change, 0.0 if change == "scaling" else True)
    _regenerates(model, eng)


def test_lora_fused_step_rebuilds_the_merged_weight_and_the_cache(one_thread, monkeypatch):  # noqa: F811
    model = adapted_model(False)
    eng = Engine(model, CharTokenizer(), kv_cache_gib=0.01)
    eng.generate([PROMPT], GREEDY6)  # builds every merged weight W + s·BA
    _train_step(model, torch.optim.AdamW(lora_parameters(model), lr=0.05, fused=True))
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        merged = model(ids)
        monkeypatch.setattr(lora, "MERGED_COMPUTE", False)
        unmerged = model(ids)
        monkeypatch.undo()
    torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=1e-4)
    _regenerates(model, eng)


def test_merged_weight_kept_while_adapters_are_unchanged():
    layer = lora.LoRALinear(torch.nn.Linear(8, 6), r=2)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    first = layer._merged_weight()
    assert layer._merged_weight() is first
    with torch.no_grad():
        layer.lora_B.weight.data.view(-1)[3] += 1.0  # through .data: no version bump
    assert layer._merged_weight() is not first


def test_content_fingerprint_sees_one_ulp_and_only_real_changes():
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        w = (torch.randn(64, 48, generator=g) * 0.02).to(dtype)
        base = content_fingerprint([w, torch.zeros(0)])
        assert base == content_fingerprint([w.clone(), torch.zeros(0)])
        bumped = w.clone()
        flat = bumped.view(-1)
        flat[777] = torch.nextafter(flat[777].float(), torch.tensor(1.0)).to(dtype) if dtype == torch.float32 \
            else (flat[777].view(torch.int16) + 1).view(dtype)
        assert not torch.equal(bumped, w)
        assert content_fingerprint([bumped, torch.zeros(0)])[0] != base[0]


# ----------------------------------------------------------------------------- 2. interrupts in the scheduler
@pytest.mark.parametrize("where,at", [("plan", 2), ("_take", 5)])  # the second prompt: before / inside allocate
def test_interrupt_inside_schedule_frees_every_block(tiny, where, at):  # noqa: F811
    model, tok = tiny
    eng = Engine(model, tok, kv_cache_gib=0.01)
    bm = eng.block_manager
    real, calls = getattr(bm, where), [0]

    def interrupted(*args):
        calls[0] += 1
        if calls[0] == at:
            raise KeyboardInterrupt
        return real(*args)

    setattr(bm, where, interrupted)
    prompts = [list(range(1, 41)), list(range(2, 42))]
    with pytest.raises(KeyboardInterrupt) as info:
        eng.generate(prompts, SamplingParams(max_tokens=4))
    assert info.value.__context__ is None  # the cleanup raised nothing over it
    delattr(bm, where)
    assert bm.num_free == eng.num_blocks and not any(bm.ref_count) and not eng.scheduler.has_work()
    with torch.no_grad():
        model.norm.weight.mul_(1.0)  # a weight change: the next call resets the prefix cache
    outs = eng.generate(prompts, SamplingParams(max_tokens=4))
    assert [o[0].token_ids for o in outs] == [plain_greedy(model, p, 4) for p in prompts]


# ----------------------------------------------------------------------------- 3. ties in top_k / top_p
def _bf16_row_with_tie(V=4096):
    row = (torch.randn(V, generator=torch.Generator().manual_seed(0)) * 3).to(torch.bfloat16).float()
    vals = row.sort(descending=True).values
    k = next(k for k in range(2, 300) if vals[k - 1] == vals[k])  # the k-th value is tied with the next
    return row, k, vals[k - 1]


def test_top_k_keeps_every_token_tied_with_the_kth_whatever_the_batch():
    row, k, kth = _bf16_row_with_tie()
    alone = ~_top_k_mask(row[None], torch.tensor([k]))[0]
    assert torch.equal(alone, row >= kth) and int(alone.sum()) > k
    other = torch.randn(row.shape[0])
    for k2 in (k + 1, 64, 1000, 0):
        batched = ~_top_k_mask(torch.stack([other, row]), torch.tensor([k2, k]))[1]
        assert torch.equal(batched, alone)


def test_top_p_cut_keeps_ties_and_candidates_match_whole_row_sort(monkeypatch):
    probs = torch.tensor([[0.4, 0.2, 0.2, 0.1, 0.1], [0.3, 0.3, 0.2, 0.1, 0.1]])
    keep = ~_top_p_mask(probs, torch.tensor([0.5, 0.5]))
    assert keep.tolist() == [[True, True, True, False, False], [True, True, False, False, False]]
    row, _, _ = _bf16_row_with_tie()
    logits = torch.stack([row, row.flip(0), row * 0.1])
    probs = torch.softmax(logits, dim=-1)
    top_p = torch.tensor([0.6, 0.9, 0.95])
    full = _top_p_mask(probs, top_p)
    monkeypatch.setattr(sampler_mod, "TOP_P_CANDIDATES", 8)  # every row's cut lies past 8: whole-row sorts
    assert torch.equal(_top_p_mask(probs, top_p), full)
    for r in range(3):  # a row alone gets the same set
        assert torch.equal(_top_p_mask(probs[r:r + 1], top_p[r:r + 1])[0], full[r])


def test_tiny_temperature_is_greedy(tiny):
    model, tok = tiny
    eng = Engine(model, tok, kv_cache_gib=0.01)
    prompts = prompts_mixed(21)
    greedy = eng.generate(prompts, SamplingParams(max_tokens=6))
    tiny_t = eng.generate(prompts, SamplingParams(max_tokens=6, temperature=1e-6, seed=3, top_k=5))
    assert [o[0].token_ids for o in tiny_t] == [o[0].token_ids for o in greedy]
    assert SamplingParams(temperature=1e-6).greedy and not SamplingParams(temperature=1e-4).greedy


# ----------------------------------------------------------------------------- 4. paged decode batch invariance
def _decode_problem(lens, width, Hq=4, Hkv=2, D=32, bs=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    nb = len(lens) * width
    kc, vc = torch.randn(nb, bs, Hkv, D, generator=g), torch.randn(nb, bs, Hkv, D, generator=g)
    tables = torch.randperm(nb, generator=g).to(torch.int32).view(len(lens), width)
    return torch.randn(len(lens), Hq, D, generator=g), kc, vc, tables, torch.tensor(lens, dtype=torch.int32)


def test_decode_row_bitwise_the_same_alone_and_in_any_batch(monkeypatch):
    """A row's result depends on its own context only: not on the other rows, the table width or how many
    programs share its splits (what a seeded request's batch independence needs on the GPU)."""
    assert pa.split_blocks(16) * 16 == pa.SPLIT_TOKENS
    q, kc, vc, tables, lens = _decode_problem([300, 700, 20, 129], width=48)
    scale = q.shape[-1] ** -0.5
    with kernel_backend("triton"):
        batch = pa.paged_attention_decode(q, kc, vc, tables, lens, scale)
        for r, blocks in ((0, 19), (2, 2), (3, 9)):  # each short row alone, with a table just wide enough
            alone = pa.paged_attention_decode(q[r:r + 1], kc, vc, tables[r:r + 1, :blocks], lens[r:r + 1], scale)
            assert torch.equal(alone[0], batch[r])
        for z in (1, 2, 3):  # fewer programs than splits: they loop over the rest
            monkeypatch.setattr(pa, "_grid_splits", lambda S, Hkv, max_splits, device, z=z: min(z, max_splits))
            assert torch.equal(pa.paged_attention_decode(q, kc, vc, tables, lens, scale), batch)
    ref = pa.paged_attention_decode_reference(q, kc, vc, tables, lens, scale)
    torch.testing.assert_close(batch, ref, rtol=1e-5, atol=1e-5)


def test_decode_bf16_cache_multi_split_matches_reference():
    q, kc, vc, tables, lens = _decode_problem([400, 33], width=26, seed=1)
    q, kc, vc = q.bfloat16(), kc.bfloat16(), vc.bfloat16()
    with kernel_backend("triton"):
        out = pa.paged_attention_decode(q, kc, vc, tables, lens, 0.2)
    ref = pa.paged_attention_decode_reference(q, kc, vc, tables, lens, 0.2)
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)


# ----------------------------------------------------------------------------- 5. SamplingParams checks
@pytest.mark.parametrize("field,value", [
    ("max_tokens", 0), ("n", True), ("n", 2.0), ("temperature", None), ("temperature", float("inf")),
    ("top_p", float("nan")), ("top_k", False), ("min_p", "0.1"), ("repetition_penalty", float("inf")),
    ("stop_token_ids", "12"), ("stop_token_ids", [1, True]), ("stop_token_ids", [-1]), ("seed", 1.5),
    ("stop", ["ok", ""]), ("stop", {"a"}), ("ignore_eos", 1)])
def test_bad_params_rejected_at_construction_and_after_mutation(tiny, field, value):
    model, tok = tiny
    with pytest.raises(ValueError, match=rf"^SamplingParams\.{field} must be [^\n]*$"):
        SamplingParams(**{field: value})
    sp = SamplingParams(max_tokens=3)
    setattr(sp, field, value)
    eng = Engine(model, tok, kv_cache_gib=0.01)
    with pytest.raises(ValueError, match=rf"^SamplingParams\.{field} must be"):
        eng.generate([[1, 2, 3]], [sp])
    assert eng.stats["prefill_tokens_computed"] == 0 and not eng.scheduler.has_work()


def test_stop_set_as_a_string_after_construction(tiny):
    model, tok = tiny
    eng = Engine(model, tok, kv_cache_gib=0.01)
    prompt = list(range(1, 20))
    full = eng.generate([prompt], SamplingParams(max_tokens=8, ignore_eos=True))[0][0]
    sp = SamplingParams(max_tokens=8, ignore_eos=True)
    sp.stop = full.text[6:10]
    out = eng.generate([prompt], sp)[0][0]
    assert sp.stop == [full.text[6:10]] and out.text == full.text[:6] and out.finish_reason == "stop"


# ----------------------------------------------------------------------------- 6. progress on a terminal
def test_terminal_progress_clears_the_rest_of_the_line():
    class TTY(io.StringIO):
        def isatty(self):
            return True

    stream = TTY()
    bar = Progress(10, stream=stream)
    bar.last -= 1
    bar.update(1, 100)
    bar.last -= 1
    bar.update(2, 0)
    bar.close()
    redraws = stream.getvalue().split("\r")[1:]
    assert len(redraws) == 3 and all(r.rstrip("\n").endswith("\x1b[K") for r in redraws)


def test_decode_row_without_context_is_zeros():
    """Padded rows of a captured decode graph have no context: their output is zeros, the others unchanged."""
    q, kc, vc, tables, lens = _decode_problem([300, 0, 129], width=24, seed=2)
    with kernel_backend("triton"):
        out = pa.paged_attention_decode(q, kc, vc, tables, lens, 0.2)
        rest = pa.paged_attention_decode(q[[0, 2]], kc, vc, tables[[0, 2]], lens[[0, 2]], 0.2)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert torch.equal(out[[0, 2]], rest)


@pytest.mark.parametrize("how", ["in_place", "replaced"])
def test_nf4_base_change_drops_the_prefix_cache(one_thread, how):  # noqa: F811
    from reflectevo.kernels.nf4 import nf4_quantize
    model = lora.quantize_model(_fresh_tiny(), compute_dtype=torch.float32)
    eng = Engine(model, CharTokenizer(), kv_cache_gib=0.01)
    eng.generate([PROMPT], GREEDY6)
    layer = model.layers[0].self_attn.v_proj
    if how == "in_place":
        layer.q.data.bitwise_xor_(0x11)  # every code moves to a neighbouring level
    else:
        torch.manual_seed(3)
        q = nf4_quantize(torch.randn(layer.out_features, layer.in_features))
        q.dtype = torch.float32
        layer.q = q
    _regenerates(model, eng)
