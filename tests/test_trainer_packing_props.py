"""Seeded property tests of the training-data pipeline: truncation, labels, packing, DPO layout, packed numerics.

Every case is drawn from ``random.Random(seed)`` (no hypothesis dependency), so a failure names its seed and
replays exactly. Invariants checked on many random example sets:

1. labels cover exactly each example's response tokens + end-of-turn token, never a prompt or padding token;
2. truncation cuts the prompt from the left (a leading BOS stays) and never the response; a response that
   cannot fit is the documented one-line TrainError (or a skip);
3. a packed row restarts seq ids / positions at every sequence, and the model's attention never crosses a
   boundary: each sequence's hidden states in the packed batch equal those of the sequence run alone (fp64);
4. DPO batches hold all chosen sequences, then all rejected ones, example by example with one shared prompt;
5. no sequence exceeds --max-length (nor --max-prompt-length for the DPO prompt);
6. per-sequence log-prob sums (and means, the SFT loss, the DPO reference cache) of a packed batch equal those
   computed one example at a time.

3 and 6 hold for RoPE whose frequencies do not depend on the batch (the tiny model's). With dynamic-NTK RoPE
past max_position_embeddings, Transformer.rope_tables takes one length S = max(positions) + 1 for the whole call
(its documented transformers parity), so a short sequence packed next to a long one is rotated with the long
one's frequencies: not covered here.
"""
from __future__ import annotations

import math
import random

import pytest
import torch

from reflectevo.trainer import TrainError
from reflectevo.trainer.data import (IGNORE, encode_prompt, encode_response, make_batch, make_example,
                                    pack, sequences_of, tokenize_records)
from test_gen import one_thread  # noqa: F401 (fixture)
from trainer_tiny import WORDS, cfg, tiny_model, tiny_tokenizer

VOCAB = 96            # tiny_model's vocabulary
EOT = 1               # tiny_tokenizer's end-of-turn id (<|im_end|>)


# ------------------------------------------------------------------------------------------------------------
# random data
# ------------------------------------------------------------------------------------------------------------
def rand_ids(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(2, VOCAB) for _ in range(n)]


def rand_length(rng: random.Random, hi: int) -> int:
    """Mostly small, sometimes 1 (empty-ish), sometimes far beyond ``hi`` (over-long)."""
    r = rng.random()
    if r < 0.15:
        return 1
    if r < 0.3:
        return rng.randint(hi, 3 * hi)
    return rng.randint(1, hi)


def rand_example(rng: random.Random, k: int, dpo: bool, max_length: int, budget: int, bos: int | None):
    """An Example truncated by make_example (None when its response cannot fit)."""
    prompt = rand_ids(rng, rand_length(rng, max_length))
    if bos is not None and rng.random() < 0.7:
        prompt = [bos] + prompt
    responses = [rand_ids(rng, rand_length(rng, max_length // 2) - 1) + [EOT] for _ in range(2 if dpo else 1)]
    return make_example(f"ex{k}", f"f.jsonl:{k + 1}", prompt, responses, max_length, budget, bos, "skip")


def rand_examples(rng: random.Random, dpo: bool):
    """(examples, max_length, prompt budget): 1 to 7 examples made to fit a random max_length."""
    max_length = rng.randint(8, 64)
    budget = rng.randint(1, max_length - 1) if dpo else max_length
    bos = rng.choice([None, 0, 5])
    want = rng.randint(1, 7)
    out, k = [], 0
    while len(out) < want:
        ex = rand_example(rng, k, dpo, max_length, budget, bos)
        k += 1
        if ex is not None:
            out.append(ex)
    return out, max_length, budget


def rand_batch(rng: random.Random, examples: list, dpo: bool):
    """(batch, pad id it was built with): make_batch (one packed row), or ``pack`` into rows of a random length
    (from one sequence per padded row up to everything in one row)."""
    pad = rng.choice([None, 0, EOT, rng.randrange(VOCAB)])
    if rng.random() < 0.5:
        return make_batch(examples, cfg(), dpo, pad), pad
    seqs = sequences_of(examples, dpo)
    lens = [len(inp) for inp, _ in seqs]
    row_len = rng.choice([max(lens), rng.randint(max(lens), sum(lens))])
    return pack(seqs, row_len, [ex.key for ex in examples], pad or 0), pad


def expected_sequences(examples: list, dpo: bool) -> list[tuple[list[int], int]]:
    """(full token ids prompt + response, prompt length) per sequence in the documented batch order."""
    out = [(ex.prompt + ex.responses[0], len(ex.prompt)) for ex in examples]
    if dpo:
        out += [(ex.prompt + ex.responses[1], len(ex.prompt)) for ex in examples]
    return out


# ------------------------------------------------------------------------------------------------------------
# 2, 5: truncation (token ids)
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(4))
def test_make_example_cuts_only_the_prompt_from_the_left(seed):
    rng = random.Random(1000 + seed)
    for case in range(150):
        dpo = rng.random() < 0.5
        max_length = rng.randint(8, 80)
        budget = rng.randint(1, max_length - 1) if dpo else max_length
        bos = rng.choice([None, 0, 7])
        prompt = rand_ids(rng, rand_length(rng, max_length))
        if bos is not None and rng.random() < 0.6:
            prompt = [bos] + prompt
        responses = [rand_ids(rng, rand_length(rng, max_length) - 1) + [EOT] for _ in range(2 if dpo else 1)]
        originals = [list(prompt), [list(r) for r in responses]]
        on_too_long = rng.choice(["error", "skip"])
        where = f"d.jsonl:{case + 1}"
        longest = max(len(r) for r in responses)
        try:
            ex = make_example(f"k{case}", where, prompt, responses, max_length, budget, bos, on_too_long)
        except TrainError as e:
            msg = str(e)
            assert on_too_long == "error" and longest >= max_length, (seed, case)
            assert "\n" not in msg and msg.startswith(where + ":") and f"--max-length {max_length}" in msg
            assert f"{longest} tokens" in msg
            continue
        assert [prompt, responses] == originals          # the caller's lists are not modified
        if longest >= max_length:                         # no room for even one prompt token
            assert ex is None and on_too_long == "skip", (seed, case)
            continue
        assert ex is not None, (seed, case)
        assert ex.responses == responses                  # never shortened
        keep = min(budget, max_length - longest)          # the prompt loses only what does not fit
        assert len(ex.prompt) == min(len(prompt), keep), (seed, case)
        assert all(len(ex.prompt) + len(r) <= max_length for r in ex.responses)
        assert len(ex.prompt) <= budget
        if len(ex.prompt) == len(prompt):
            assert ex.prompt == prompt
        elif bos is not None and prompt[0] == bos and keep >= 2:   # the leading BOS stays, then the prompt's end
            assert ex.prompt[0] == bos and ex.prompt[1:] == prompt[len(prompt) - keep + 1:]
        else:
            assert ex.prompt == prompt[len(prompt) - keep:]


# ------------------------------------------------------------------------------------------------------------
# 1, 2, 5: records -> examples with the tiny tokenizer
# ------------------------------------------------------------------------------------------------------------
def rand_text(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS[20:44]) for _ in range(n))


@pytest.mark.parametrize("dpo", [False, True])
def test_tokenized_records_keep_the_response_and_the_end_of_the_prompt(dpo):
    tok = tiny_tokenizer()
    rng = random.Random(2000 + dpo)
    for case in range(40):
        n = rng.randint(1, 6)
        max_length = rng.randint(8, 72)
        mpl = rng.choice([None, rng.randint(1, max_length - 1)]) if dpo else None
        on_too_long = rng.choice(["error", "skip"])
        c = cfg(mode="reflect", sft_prompt="stored", max_length=max_length, max_prompt_length=mpl,
                on_too_long=on_too_long)
        recs = []
        for i in range(n):
            p = rand_text(rng, rand_length(rng, 40))
            if dpo:
                recs.append({"id": f"r{i}", "reflection_prompt": p,
                             "reflection_chosen": rand_text(rng, rand_length(rng, 20)),
                             "reflection_rejected": rand_text(rng, rand_length(rng, 20))})
            else:
                recs.append({"id": f"r{i}", "reflect_prompt": p, "reflections": rand_text(rng, rand_length(rng, 30))})
        texts = [(r["reflection_prompt"], [r["reflection_chosen"], r["reflection_rejected"]]) if dpo else
                 (r["reflect_prompt"], [r["reflections"]]) for r in recs]
        full = [(encode_prompt(tok, p), [encode_response(tok, t) for t in ts]) for p, ts in texts]
        fits = [max(len(r) for r in rs) < max_length for _, rs in full]
        pairs = list(enumerate(recs, 1))
        if not all(fits) and on_too_long == "error":
            with pytest.raises(TrainError) as e:
                tokenize_records(pairs, tok, c, dpo, "f.jsonl")
            first = fits.index(False) + 1
            assert "\n" not in str(e.value) and str(e.value).startswith(f"f.jsonl:{first}: ")
            assert f"--max-length {max_length}" in str(e.value)
            continue
        exs, skipped = tokenize_records(pairs, tok, c, dpo, "f.jsonl")
        assert skipped == fits.count(False) and [ex.key for ex in exs] == [r["id"] for r, f in zip(recs, fits) if f]
        budget = c.prompt_budget() if dpo else max_length
        for ex, (prompt, responses) in zip(exs, [f for f, ok in zip(full, fits) if ok]):
            assert ex.responses == responses and all(r[-1] == tok.eot_token_id for r in ex.responses)
            keep = min(budget, max_length - max(len(r) for r in responses))
            assert ex.prompt == prompt[-min(keep, len(prompt)):], (case, ex.key)   # the prompt's end, intact
            assert all(len(ex.prompt) + len(r) <= max_length for r in ex.responses)
            for (_, labels), response in zip(sequences_of([ex], dpo), ex.responses):
                assert [t for t in labels if t != IGNORE] == response


# ------------------------------------------------------------------------------------------------------------
# 1, 3 (layout), 4, 5: batch structure
# ------------------------------------------------------------------------------------------------------------
def check_layout(b, examples, dpo, max_length, pad):
    """Every structural invariant of a Batch built from ``examples``; returns the per-sequence (row, start, n)."""
    seqs = expected_sequences(examples, dpo)
    R, T = b.input_ids.shape
    for t in (b.positions, b.seq_ids, b.labels, b.seq_index):
        assert t.shape == (R, T)
    assert b.num_seqs == len(seqs) and b.keys == [ex.key for ex in examples]
    where = {}
    for r in range(R):
        sidx, sid = b.seq_index[r].tolist(), b.seq_ids[r].tolist()
        at = 0
        while at < T and sidx[at] >= 0:
            i, start = sidx[at], at
            while at < T and sidx[at] == i:
                at += 1
            assert i not in where, "a sequence split in two places"
            where[i] = (r, start, at - start)
            assert len(set(sid[start:at])) == 1 and sid[start] >= 0
            if start > 0:
                assert sid[start] != sid[start - 1], "two sequences share a seq id run"
        # after the last sequence: padding only (never attended, never labelled)
        assert all(s == -1 for s in sidx[at:]) and all(s == -1 for s in sid[at:])
        assert (b.labels[r, at:] == IGNORE).all() and (b.input_ids[r, at:] == (pad or 0)).all()
        assert (b.positions[r, at:] == 0).all()
    assert sorted(where) == list(range(len(seqs)))
    labelled = 0
    for i, (ids, plen) in enumerate(seqs):
        r, s, n = where[i]
        assert len(ids) <= max_length and n == len(ids) - 1                       # 5
        assert b.input_ids[r, s:s + n].tolist() == ids[:-1]
        assert b.positions[r, s:s + n].tolist() == list(range(n))                  # 3: restart at 0
        lab = b.labels[r, s:s + n].tolist()
        assert lab[:plen - 1] == [IGNORE] * (plen - 1)                              # 1: no prompt target
        assert lab[plen - 1:] == ids[plen:]                                         # 1: response + eot, shifted
        assert ids[-1] == EOT
        labelled += n - (plen - 1)
    if dpo:                                                                         # 4: chosen, then rejected
        P = len(examples)
        for k, ex in enumerate(examples):
            (rc, sc, nc), (rr, sr, nr) = where[k], where[P + k]
            c_ids, r_ids = b.input_ids[rc, sc:sc + nc].tolist(), b.input_ids[rr, sr:sr + nr].tolist()
            L = len(ex.prompt)
            assert c_ids[:L] == r_ids[:L] == ex.prompt
            assert c_ids == (ex.prompt + ex.responses[0])[:-1] and r_ids == (ex.prompt + ex.responses[1])[:-1]
    assert b.num_labels == labelled == int((b.labels != IGNORE).sum())
    assert b.num_tokens == sum(len(ids) - 1 for ids, _ in seqs) == int((b.seq_ids >= 0).sum())
    assert b.num_tokens == sum(ex.num_tokens for ex in examples)
    per_row = [sum(1 for r_, _, _ in where.values() if r_ == r) for r in range(R)]
    assert min(per_row) >= 1 and b.meta["packed"] == (max(per_row) > 1)
    return where


@pytest.mark.parametrize("dpo", [False, True])
def test_batch_layout_labels_and_order(dpo):
    rng = random.Random(3000 + dpo)
    for case in range(250):
        examples, max_length, _ = rand_examples(rng, dpo)
        b, pad = rand_batch(rng, examples, dpo)
        check_layout(b, examples, dpo, max_length, pad)


# ------------------------------------------------------------------------------------------------------------
# 3 (numerics), 6: packed forward == each sequence alone
# ------------------------------------------------------------------------------------------------------------
pytestmark = pytest.mark.usefixtures("one_thread")   # the tiny model's ops are too small to split


@pytest.fixture(scope="module")
def model64():
    return tiny_model().double()


@pytest.fixture(scope="module")
def model32():
    return tiny_model()


def hidden_of(model, b):
    """The hidden states the objectives compute (sft.labelled_hidden: seq_ids only for packed rows)."""
    seq_ids = b.seq_ids if b.meta.get("packed", True) else None
    return model.hidden_states(b.input_ids, positions=b.positions, seq_ids=seq_ids)


@pytest.mark.parametrize("dpo", [False, True])
def test_packed_attention_never_crosses_a_sequence(model64, dpo):
    rng = random.Random(4000 + dpo)
    with torch.no_grad():
        for case in range(40):
            examples, max_length, _ = rand_examples(rng, dpo)
            b, pad = rand_batch(rng, examples, dpo)
            where = check_layout(b, examples, dpo, max_length, pad)
            h = hidden_of(model64, b)
            for i, (ids, _) in enumerate(expected_sequences(examples, dpo)):
                r, s, n = where[i]
                alone = model64.hidden_states(torch.tensor([ids[:-1]]))[0]
                torch.testing.assert_close(h[r, s:s + n], alone, rtol=1e-10, atol=1e-10,
                                           msg=lambda m: f"case {case} seq {i}: {m}")
            # the pad id is never seen by a real token
            if (b.seq_ids < 0).any():
                other = torch.where(b.seq_ids < 0, (b.input_ids + 1) % VOCAB, b.input_ids)
                b2 = type(b)(other, b.positions, b.seq_ids, b.labels, b.seq_index, b.num_seqs, b.keys,
                             b.num_tokens, b.num_labels, b.meta)
                real = b.seq_ids >= 0
                torch.testing.assert_close(hidden_of(model64, b2)[real], h[real], rtol=0, atol=0)


def alone_logps(model, ids: list[int], plen: int) -> float:
    """Summed log p(response + eot | prompt) of one sequence from full logits (the plain reference)."""
    inp = torch.tensor([ids[:-1]])
    logp = torch.log_softmax(model(inp)[0].double(), -1)
    return float(sum(logp[t, ids[t + 1]] for t in range(plen - 1, len(ids) - 1)))


@pytest.mark.parametrize("dpo", [False, True])
def test_packed_logp_sums_equal_one_example_at_a_time(model32, dpo):
    from reflectevo.trainer.dpo import DPOObjective, compute_reference, policy_logps
    from reflectevo.trainer.sft import SFTObjective

    rng = random.Random(5000 + dpo)
    with torch.no_grad():
        for case in range(30):
            examples, max_length, _ = rand_examples(rng, dpo)
            b, _ = rand_batch(rng, examples, dpo)
            packed = policy_logps(model32, b)
            one = [policy_logps(model32, make_batch([ex], cfg(), dpo, None)) for ex in examples]
            singles = torch.cat([o[:1] for o in one] + ([o[1:] for o in one] if dpo else []))
            torch.testing.assert_close(packed, singles, rtol=1e-5, atol=1e-5)
            ref = torch.tensor([alone_logps(model32, ids, plen) for ids, plen in expected_sequences(examples, dpo)],
                               dtype=torch.float32)
            torch.testing.assert_close(packed, ref, rtol=1e-5, atol=1e-5)
            counts = torch.tensor([float(len(ids) - plen) for ids, plen in expected_sequences(examples, dpo)])
            torch.testing.assert_close(policy_logps(model32, b, average=True), ref / counts, rtol=1e-5, atol=1e-5)
            P = len(examples)
            if dpo:   # the cached reference maps each key to [chosen, rejected] of its own example
                cache = compute_reference(model32, examples, cfg(batch_size=rng.randint(1, 4)), None, True)
                assert list(cache) == [ex.key for ex in examples]
                got = torch.tensor([cache[ex.key] for ex in examples])
                torch.testing.assert_close(got[:, 0], ref[:P], rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(got[:, 1], ref[P:], rtol=1e-5, atol=1e-5)
                # the training step reads the cache by key and scores the packed batch: at the reference weights
                # every margin is 0 (a swapped or shifted pair would not be), so the sigmoid loss is log 2
                c = cfg(batch_size=P)
                cached = DPOObjective(c, cache).reference(model32, b)
                fresh = DPOObjective(c, None).reference(model32, b)
                for x, y in zip(cached, fresh):
                    torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
                loss, stats = DPOObjective(c, cache).micro_step(model32, b, P)
                torch.testing.assert_close(loss, torch.tensor(math.log(2.0)), rtol=0, atol=1e-5)
                assert abs(float(stats["rewards/margins"])) < 1e-5
            else:     # SFT: the loss of the packed batch is the token mean over every example's response
                norm = SFTObjective().step_normaliser([b])
                assert norm == sum(len(ex.responses[0]) for ex in examples)
                loss, _ = SFTObjective().micro_step(model32, b, norm)
                torch.testing.assert_close(loss.double(), -ref.double().sum() / norm, rtol=1e-5, atol=1e-6)
