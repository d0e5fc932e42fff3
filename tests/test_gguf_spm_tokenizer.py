"""GGUF files with a SentencePiece vocabulary (tokenizer.ggml.model = "llama": Llama-2, Mistral-7B-Instruct-v0.2).

Tiny llama-architecture GGUFs are written here with a SentencePiece-style vocab (<unk>, <s>, </s>, the 256 byte
pieces, scored '▁' pieces whose merges the scores imply) and loaded with reflectevo's load_model and with
transformers' GGUF integration as the oracle: ids, decode, chat template and logits must agree.
"""
import json
import random

import pytest
import torch

from reflectevo.errors import ModelLoadError
from reflectevo.model import load_model
from reflectevo.model.gguf_tokenizer import merges_from_scores
from reflectevo.model.tokenizer import Tokenizer

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
pytest.importorskip("transformers.integrations.gguf", reason="this transformers has no GGUF tokenizer support")

# Mistral-7B-Instruct-v0.2's and Llama-2-chat's templates (as their tokenizer_config.json ship them)
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}")
LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}")

# pieces in score order (best first); every piece of two or more characters splits into two pieces listed here
PIECES = (
    "▁ e t a o n i s r h l d u c m ▁t he ▁a in ▁the er on ▁s ▁w re ▁o at en ▁c it is or ▁b ▁f ▁p an ▁m es ing "
    "ed ▁in ▁to ▁h ar ▁d ▁and ▁of ▁th ll ▁is lo ▁he ▁wor ld ▁world ▁hel ▁hello ▁▁ ▁▁▁▁ ▁▁▁ ▁1 1 2 3 0 ▁12 12 "
    "▁2 ▁[ [ ] / I N S T IN ST INST ▁[INST [INST ▁[/ < > ▁< s ▁x y z . , ! ? ' ▁I ▁it ▁co de ▁code ▁de é ▁é ü "
    "中 文 中文 ▁中 ▁中文 A B C ▁A ▁B ▁C"
).split(" ")
# equal scores where the merge order decides the result: "DEFG" is DEF+G only if (DE, F) outranks (F, G) (longer
# left part first although FG comes first in the file); "LKHJ" is L+KHJ only if (K, HJ) outranks (L, K)
TIED = [("D", -1.0), ("E", -1.0), ("F", -1.0), ("G", -1.0), ("DE", -2.0), ("FG", -5.0), ("DEF", -5.0),
        ("H", -1.0), ("J", -1.0), ("K", -1.0), ("L", -1.0), ("HJ", -2.0), ("LK", -5.0), ("KHJ", -5.0)]
MESSAGES = [
    [{"role": "user", "content": "hello the world"}],
    [{"role": "user", "content": "  Is 12 + 30 = 42?\n"}, {"role": "assistant", "content": "Yes, it is 42."},
     {"role": "user", "content": "And é, 中文 😀?"}],
    [{"role": "system", "content": "You are a careful coder."}, {"role": "user", "content": "[INST] code </s>"},
     {"role": "assistant", "content": " ok "}, {"role": "user", "content": "more <s>"}],
]
TEXTS = [
    "hello the world", " hello world", "  hello  world  ", "hello\nworld\n\n", "\n\n  indented\n\tcode()",
    "12 + 30 = 042, 1234567890", "é ü 中文 ñ ß Ω", "emoji 😀🚀 need bytes 🇫🇷", "[INST] hi [/INST]", "<s>x</s>",
    "a<s>b</s>c<unk>d", " <s> ", "<<SYS>>\nsys\n<</SYS>>", "The cat sat.", "", " ", "\u2581 already ▁ marked",
    "I'd it's", "TAB\there", "DEFG LKHJ", "DEFGLKHJ", "zero\u200bwidth", "x" * 50, "mixed 中文and English123",
]


def spm_vocab(control=(), user=()):
    """tokens, scores, types as llama.cpp's converter writes a SentencePiece vocabulary."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [6] * 256  # UNKNOWN, CONTROL, BYTE
    scores = [0.0] * len(tokens)
    for i, piece in enumerate(dict.fromkeys(PIECES)):
        tokens.append(piece)
        types.append(1)
        scores.append(-float(i // 3))  # ties of three: the merge order then falls back on the parts' lengths
    for piece, score in TIED:
        tokens.append(piece)
        types.append(1)
        scores.append(score)
    for extra, kind in [(t, 3) for t in control] + [(t, 4) for t in user]:
        tokens.append(extra)
        types.append(kind)
        scores.append(0.0)
    return tokens, scores, types


def write_spm_gguf(path, template=MISTRAL_TEMPLATE, add_bos=None, add_eos=None, pad=None, control=(), user=(),
                   hidden=16, layers=2, seed=0):
    tokens, scores, types = spm_vocab(control, user)
    return write_spm_vocab_gguf(path, tokens, scores, types, template, add_bos, add_eos, pad, hidden, layers, seed)


def write_spm_vocab_gguf(path, tokens, scores, types, template, add_bos=None, add_eos=None, pad=None, hidden=16,
                         layers=2, seed=0, context=128):
    """A tiny llama GGUF with the SentencePiece vocabulary (tokens, scores, types) and random weights, as
    llama.cpp's converter writes a Llama-2 / Mistral model (<unk> 0, <s> 1, </s> 2)."""
    w = gguf.GGUFWriter(str(path), "llama")
    heads, kv_heads, ffn = 4, 2, 32
    w.add_block_count(layers)
    w.add_context_length(context)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(hidden // heads)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    if pad is not None:
        w.add_pad_token_id(pad)
    if add_bos is not None:
        w.add_add_bos_token(add_bos)
    if add_eos is not None:
        w.add_add_eos_token(add_eos)
    if template:
        w.add_chat_template(template)
    write_random_llama_tensors(w, len(tokens), hidden, heads, kv_heads, ffn, layers, seed)
    return path


def write_random_llama_tensors(w, vocab: int, hidden: int, heads: int, kv_heads: int, ffn: int, layers: int,
                               seed: int = 0) -> None:
    """Random llama-layout tensors (norm weights near 1) into GGUFWriter ``w``, then the file is written and closed."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return (torch.randn(*shape, generator=g) * 0.3).numpy()

    head_dim = hidden // heads
    w.add_tensor("token_embd.weight", rand(vocab, hidden))
    w.add_tensor("output_norm.weight", 1 + rand(hidden))
    w.add_tensor("output.weight", rand(vocab, hidden))
    for i in range(layers):
        for name, shape in [("attn_q", (hidden, hidden)), ("attn_k", (kv_heads * head_dim, hidden)),
                            ("attn_v", (kv_heads * head_dim, hidden)), ("attn_output", (hidden, hidden)),
                            ("ffn_gate", (ffn, hidden)), ("ffn_up", (ffn, hidden)), ("ffn_down", (hidden, ffn))]:
            w.add_tensor(f"blk.{i}.{name}.weight", rand(*shape))
        w.add_tensor(f"blk.{i}.attn_norm.weight", 1 + rand(hidden))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", 1 + rand(hidden))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


VARIANTS = {
    "mistral-v0.2": dict(template=MISTRAL_TEMPLATE),  # no add_bos flag: BOS by default, as llama.cpp
    "llama2": dict(template=LLAMA2_TEMPLATE, add_bos=True, add_eos=False, pad=0),
    "flags": dict(template=MISTRAL_TEMPLATE, add_bos=False, add_eos=True, control=("[INST]", "[/INST]"),
                  user=("<think>",)),
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def pair(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(f"spm_{request.param}")
    write_spm_gguf(d / "tiny.gguf", **VARIANTS[request.param])
    model, ours = load_model(d / "tiny.gguf", dtype="float32")
    hf = transformers.AutoTokenizer.from_pretrained(str(d), gguf_file="tiny.gguf")
    return d, model, ours, hf


def test_ids_match_transformers(pair):
    _, _, ours, hf = pair
    pieces = [ours.backend.id_to_token(i) for i in ours.encode("DEFG LKHJ", add_special_tokens=False)]
    assert pieces == ["▁", "DEF", "G", "▁", "L", "KHJ"]  # the tie-breaks above are exercised
    for text in TEXTS:
        assert ours.encode(text) == hf.encode(text), text
        assert ours.encode(text, add_special_tokens=False) == hf.encode(text, add_special_tokens=False), text
    assert ours.encode_batch(TEXTS) == [hf.encode(t) for t in TEXTS]


def test_decode_matches_transformers(pair):
    _, _, ours, hf = pair
    for text in TEXTS:
        ids = hf.encode(text)
        assert ours.decode(ids) == hf.decode(ids), text
        assert ours.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True), text
    rng = random.Random(0)
    for _ in range(30):  # arbitrary ids, cut byte sequences included
        ids = [rng.randrange(ours.vocab_size) for _ in range(rng.randrange(1, 12))]
        assert ours.decode(ids) == hf.decode(ids), ids


def test_chat_template_matches_transformers(pair):
    _, _, ours, hf = pair
    rendered = 0
    for messages in MESSAGES:
        for gen in (True, False):
            try:
                text = ours.apply_chat_template(messages, add_generation_prompt=gen)
            except ValueError as e:  # Mistral's template refuses a system message: so must transformers
                assert "roles must alternate" in str(e)
                with pytest.raises(Exception, match="roles must alternate"):
                    hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
                continue
            rendered += 1
            assert text == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            assert ours.encode(text, add_special_tokens=False) == hf.encode(text, add_special_tokens=False)
    assert rendered >= 4


def test_special_tokens_and_eos(pair):
    _, model, ours, hf = pair
    assert ours.eos_token_ids == [hf.eos_token_id] == [2]
    assert ours.bos_token_id == hf.bos_token_id == 1
    assert ours.special_tokens["bos_token"] == "<s>" and ours.special_tokens["eos_token"] == "</s>"
    assert ours.vocab_size == len(hf) == model.config.vocab_size
    assert model.config.eos_token_ids == [2]


def test_backend_pipeline_matches_transformers(pair):
    """Same normalizer, pre-tokenizer, decoder, post-processor, BPE model (merges in order) and added tokens."""
    _, _, ours, hf = pair
    a, b = json.loads(ours.backend.to_str()), json.loads(hf.backend_tokenizer.to_str())
    for key in ("normalizer", "pre_tokenizer", "decoder", "post_processor", "model"):
        assert a[key] == b[key], key
    assert sorted(a["added_tokens"], key=lambda t: t["id"]) == sorted(b["added_tokens"], key=lambda t: t["id"])


def test_saved_tokenizer_reloads_the_same(pair, tmp_path):
    _, _, ours, _ = pair
    ours.save(tmp_path)
    again = Tokenizer.from_dir(tmp_path)
    assert [again.encode(t) for t in TEXTS] == [ours.encode(t) for t in TEXTS]
    assert again.apply_chat_template(MESSAGES[1]) == ours.apply_chat_template(MESSAGES[1])


def test_logits_match_transformers(pair):
    d, model, ours, _ = pair
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(d), gguf_file="tiny.gguf",
                                                                 dtype=torch.float32).eval()
    ids = torch.tensor([ours.encode(ours.apply_chat_template(MESSAGES[1]), add_special_tokens=False)])
    with torch.no_grad():
        assert (model(ids) - hf_model(ids).logits).abs().max().item() <= 1e-4


def test_merges_follow_scores_then_part_lengths():
    tokens = ["a", "b", "c", "ab", "bc", "abc", "▁", "▁a"]
    scores = [0.0, 0.0, 0.0, -1.0, -1.0, -2.0, 0.0, -1.0]
    # "abc" splits as a+bc and ab+c (same score: the longer left part first); ties keep the file's order
    assert merges_from_scores(tokens, scores) == [("a", "b"), ("b", "c"), ("▁", "a"), ("ab", "c"), ("a", "bc")]
    try:
        from transformers.tokenization_utils_base import generate_merges
    except ImportError:
        return
    vocab = {t: i for i, t in enumerate(tokens)}
    assert merges_from_scores(tokens, scores) == generate_merges(vocab, dict(zip(tokens, scores)))


def test_sentencepiece_gguf_without_scores_is_refused(tmp_path):
    path = tmp_path / "noscores.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(8)
    w.add_feed_forward_length(16)
    w.add_head_count(2)
    w.add_tokenizer_model("llama")
    w.add_token_list(["<unk>", "<s>", "</s>", "▁a"])
    w.add_token_types([2, 3, 3, 1])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelLoadError, match=r"noscores\.gguf: .*'llama'.*tokenizer\.ggml\.scores"):
        load_model(path)
