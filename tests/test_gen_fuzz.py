"""Seeded randomized differential tests of the batched sampler's scheduling (test_gen.py's tiny model).

Each seed builds a random workload: token-id prompts sharing prefixes of random length (block-aligned or not) with
a few base sequences, duplicates, prompts that extend an earlier prompt with its own output (hits on blocks
filled while decoding), n in {1, 2, 3}, max_tokens 1..12, greedy and seeded sampled requests, stop_token_ids
picked on the expected trajectory, ignore_eos on and off. The same three generate() calls (so later calls hit
the prefix cache the earlier ones left) run on a large-cache engine and on engines of a few blocks: 4-5 blocks of
16 with max_num_seqs 2, 3 or 256 and a prefill budget of 40 tokens or none; 4-6 blocks with a budget of one
token (every prompt admitted alone, the nearest thing to chunked prefill, which the engine does not have) and a
short max_model_len; 2-3 blocks of 32. The small ones preempt, and some sequences outgrow the cache or context.

Oracles:
- every output (greedy or seeded sampled) equals decoding that request alone by full recompute with the plain
  model: argmax for greedy, ``sample`` on the plain logits for sampled (the same counter-based noise), cut by the
  stop ids, eos, max_tokens, max_model_len and the cache (a sequence alone never holds more than
  num_blocks * block_size tokens of K/V), with the matching finish_reason;
- seeded sampled requests give what they give alone in a large-cache engine;
- after every generate: no block held, the free lists partition the blocks, the prefix-cache maps agree, and
  every block still findable by a hash holds the plain model's K/V for the tokens that hash names.
"""
import dataclasses
import random

import torch

from reflectevo.gen import Engine, SamplingParams
from reflectevo.gen.block_manager import block_hash
from reflectevo.gen.sampler import sample, seq_key
from reflectevo.gen.sequence import Sequence
from reflectevo.model.transformer import causal_attention
from test_gen import VOCAB, one_thread, tiny  # noqa: F401 (fixtures)

PER_TOKEN = 2 * 2 * 2 * 16 * 4  # K+V, layers, kv heads, head_dim, fp32 (test_gen's tiny model)
EOS = 0
MAX_PROMPT = 64  # fits every engine below: 64 tokens of cache at least, max_model_len >= 65
SEEDS = [0, 1, 2, 3, 4, 5]


def _gib(blocks, block_size=16):
    return blocks * block_size * PER_TOKEN / 2**30


class Plain:
    """Full-recompute decoding and K/V with the plain model, memoised."""

    def __init__(self, model):
        self.model = model
        self._logits, self._kv, self._traj = {}, {}, {}

    def logits(self, ids):
        key = tuple(ids)
        if key not in self._logits:
            with torch.no_grad():
                self._logits[key] = self.model(torch.tensor([ids]))[0, -1]
        return self._logits[key]

    def trajectory(self, prompt, sp, j):
        """(tokens, finish_reason) of sample j decoded alone; max_model_len and the cache are not applied."""
        key = (tuple(prompt), sp.temperature, sp.top_k, sp.top_p, sp.repetition_penalty, sp.seed, j,
               sp.max_tokens, tuple(sp.stop_token_ids), sp.ignore_eos)
        if key in self._traj:
            return self._traj[key]
        seq = None if sp.greedy else Sequence(0, 0, j, prompt, sp, seq_key(sp.seed, j))
        out, reason = [], "length"
        while len(out) < sp.max_tokens:
            lg = self.logits(list(prompt) + out)
            if seq is None:
                tok = int(lg.argmax())
            else:
                seq.token_ids = list(prompt) + out
                tok = int(sample(lg[None].clone(), [seq])[0])
            out.append(tok)
            if tok in sp.stop_token_ids or (not sp.ignore_eos and tok == EOS):
                reason = "stop"
                break
        self._traj[key] = (out, reason)
        return out, reason

    def kv(self, ids):
        """Per layer (K, V) [len(ids), Hkv, D] as the model's attention receives them (after RoPE)."""
        key = tuple(ids)
        if key not in self._kv:
            got = {}

            def record(layer_idx, q, k, v):
                got[layer_idx] = (k[0], v[0])
                return causal_attention(q, k, v)

            with torch.no_grad():
                self.model.hidden_states(torch.tensor([ids]), attention=record)
            self._kv[key] = [got[i] for i in range(len(got))]
        return self._kv[key]


def expected(plain, prompt, sp, j, eng):
    """What the engine must return for sample j: the plain trajectory cut where the context or the cache ends."""
    toks, reason = plain.trajectory(prompt, sp, j)
    cap = min(eng.max_model_len, eng.num_blocks * eng.block_size + 1) - len(prompt)
    if len(toks) > cap:
        return toks[:cap], "length"
    return toks, reason


# ----------------------------------------------------------------------------- workload
def _rand_tokens(rng, n):
    return [rng.randrange(1, VOCAB) for _ in range(n)]


def _params(rng, prompt_len):
    kw = dict(n=rng.choice([1, 1, 2, 3]), max_tokens=rng.randint(1, 12), ignore_eos=rng.random() < 0.5)
    if prompt_len >= 50 and rng.random() < 0.7:  # long enough to outgrow a 4-block cache or a short context
        kw.update(max_tokens=rng.randint(8, 12), ignore_eos=True)
    if rng.random() < 0.45:
        kw.update(temperature=rng.choice([0.7, 1.0, 1.5]), top_k=rng.choice([0, 0, 5, 30]),
                  top_p=rng.choice([1.0, 0.9]), seed=rng.getrandbits(48),
                  repetition_penalty=rng.choice([1.0, 1.0, 1.3]))
    return SamplingParams(**kw)


def _with_stops(rng, plain, prompt, sp):
    """Sometimes add stop_token_ids: a token of the expected output (so it really stops) and maybe another."""
    if rng.random() < 0.35:
        toks, _ = plain.trajectory(prompt, sp, rng.randrange(sp.n))
        stops = [rng.choice(toks)] + ([rng.randrange(1, VOCAB)] if rng.random() < 0.3 else [])
        sp = dataclasses.replace(sp, stop_token_ids=stops)
    return sp


def _prompt(rng, bases, history, plain):
    r = rng.random()
    if history and r < 0.15:  # the same prompt again (same or other params)
        return list(rng.choice(history)[0])
    if history and r < 0.35:  # an earlier prompt followed by its own output: hits blocks filled in decode
        prompt, sp = rng.choice(history)
        toks, _ = plain.trajectory(prompt, sp, 0)
        ext = list(prompt) + toks[: rng.randint(0, len(toks))] + _rand_tokens(rng, rng.randint(1, 6))
        return ext[:MAX_PROMPT]
    base = rng.choice(bases)
    cut = rng.choice([0, 1, 15, 16, 17, 31, 32, 33, 47, 48, rng.randint(0, 48)])
    if rng.random() < 0.15:  # long: near the cache's and the context's end
        return base[:48] + _rand_tokens(rng, rng.randint(2, MAX_PROMPT - 48))
    if rng.random() < 0.3:  # a whole number of blocks: the last block is full, yet its last token must run
        total = rng.choice([16, 32, 48])
        return base[:min(cut, total)] + _rand_tokens(rng, total - min(cut, total))
    return (base[:cut] + _rand_tokens(rng, rng.randint(1, 14)))[:MAX_PROMPT]


def workload(seed, plain):
    """Three generate() calls: lists of (prompt ids, SamplingParams)."""
    rng = random.Random(seed)
    bases = [_rand_tokens(rng, 48) for _ in range(2)]
    calls, history = [], []
    for size in (rng.randint(3, 8), rng.randint(3, 8), rng.randint(2, 6)):
        reqs = []
        for _ in range(size):
            prompt = _prompt(rng, bases, history, plain)
            reqs.append((prompt, _with_stops(rng, plain, prompt, _params(rng, len(prompt)))))
        history += reqs
        calls.append(reqs)
    return calls


def engines(seed, model, tok):
    rng = random.Random(1000 + seed)
    big = Engine(model, tok, kv_cache_gib=0.01)
    tight = Engine(model, tok, kv_cache_gib=_gib(rng.randint(4, 5)), max_num_seqs=rng.choice([2, 3, 256]),
                   max_num_batched_tokens=rng.choice([40, 16384]))
    wide = Engine(model, tok, block_size=32, kv_cache_gib=_gib(rng.randint(2, 3), 32))  # other block boundaries
    alone = Engine(model, tok, kv_cache_gib=_gib(rng.randint(4, 6)), max_num_batched_tokens=1,
                   max_model_len=rng.randint(65, 72))
    return {"big": big, "tight": tight, "alone-prefill": alone, "blocks-of-32": wide}


# ----------------------------------------------------------------------------- checks
def check_block_manager(eng, plain, seen_ids):
    """No block held, free lists partition the blocks, hash maps agree, cached blocks hold the right K/V."""
    bm, sch, bs = eng.block_manager, eng.scheduler, eng.block_size
    assert not sch.waiting and not sch.running
    assert all(c == 0 for c in bm.ref_count)
    plain_free, cached_free = list(bm.free_plain), list(bm.free_cached)
    assert len(set(plain_free)) == len(plain_free) and len(set(cached_free)) == len(cached_free)
    assert sorted(plain_free + cached_free) == list(range(bm.num_blocks)) and bm.num_free == bm.num_blocks
    assert all(bm.hash_of[b] is None for b in plain_free)
    assert all(bm.hash_of[b] is not None for b in cached_free)
    assert all(bm.hash_of[b] == h for h, b in bm.block_of.items())
    assert sorted(bm.block_of.values()) == sorted(cached_free)
    # every hashed block: tokens that were computed (all but the last of a finished sequence), and their K/V
    named = {}
    for ids in seen_ids:
        prev = b""
        for i in range((len(ids) - 1) // bs):
            prev = block_hash(prev, list(ids[i * bs:(i + 1) * bs]))
            named.setdefault(prev, (ids, i))
    for h, bid in bm.block_of.items():
        assert h in named, f"block {bid} is findable under a hash of tokens never computed"
        ids, i = named[h]
        for layer, (k, v) in enumerate(plain.kv(ids[: (i + 1) * bs])):
            torch.testing.assert_close(eng.runner.k_cache[layer, bid], k[i * bs:(i + 1) * bs], rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(eng.runner.v_cache[layer, bid], v[i * bs:(i + 1) * bs], rtol=1e-4, atol=1e-4)


def check_outputs(eng, plain, reqs, outs, where, seen_ids, tally):
    assert len(outs) == len(reqs)
    for r, ((prompt, sp), group) in enumerate(zip(reqs, outs)):
        assert [o.index for o in group] == list(range(sp.n)), where
        for j, o in enumerate(group):
            want = expected(plain, prompt, sp, j, eng)
            assert (o.token_ids, o.finish_reason) == want, f"{where}: request {r} sample {j} {prompt} {sp}"
            seen_ids.append(tuple(prompt) + tuple(o.token_ids))
            tally["stop_ids" if o.finish_reason == "stop" and o.token_ids[-1] != EOS else "other"] += 1
            tally["sampled" if not sp.greedy else "greedy"] += 1
            if o.finish_reason == "length" and len(o.token_ids) < sp.max_tokens:
                tally["cut_by_context_or_cache"] += 1


def test_random_workloads_match_plain_decoding(tiny):
    model, tok = tiny
    plain = Plain(model)
    tally = dict.fromkeys(["stop_ids", "other", "sampled", "greedy", "cut_by_context_or_cache", "preemptions",
                           "cross_call_hits", "alone_checked", "finished_by_cache"], 0)
    for seed in SEEDS:
        calls = workload(seed, plain)
        engs = engines(seed, model, tok)
        seen = {name: [] for name in engs}
        for name, eng in engs.items():
            seen_ids = seen[name]
            for c, reqs in enumerate(calls):
                before = eng.stats["prefix_cache_hit_tokens"]
                outs = eng.generate([p for p, _ in reqs], [sp for _, sp in reqs])
                where = f"seed {seed}, engine {name} ({eng.num_blocks} blocks), call {c}"
                check_outputs(eng, plain, reqs, outs, where, seen_ids, tally)
                check_block_manager(eng, plain, seen_ids)
                if c:
                    tally["cross_call_hits"] += eng.stats["prefix_cache_hit_tokens"] > before
            tally["preemptions"] += eng.stats["preemptions"]
            tally["finished_by_cache"] += eng.stats.get("finished_by_cache", 0)
        # a seeded request alone in a large cache draws what it drew in every batch above
        solo = engs["big"]
        for reqs in calls:
            for prompt, sp in reqs:
                if not sp.greedy:
                    got = [o.token_ids for o in solo.generate([prompt], sp)[0]]
                    assert got == [expected(plain, prompt, sp, j, solo)[0] for j in range(sp.n)], (seed, prompt, sp)
                    seen["big"] += [tuple(prompt) + tuple(t) for t in got]
                    tally["alone_checked"] += 1
        check_block_manager(solo, plain, seen["big"])
    # the workloads really exercised what they are meant to
    assert all(tally[k] > 0 for k in tally), tally
