"""A byte-level BPE GGUF vocabulary honours tokenizer.ggml.add_bos_token / add_eos_token, as llama.cpp does."""
from reflectevo.model.tokenizer import Tokenizer

TOKENS = ["a", "b", "ab", "<|begin_of_text|>", "<|end_of_text|>"]
BOS, EOS = 3, 4


def _fields(**extra):
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": TOKENS,
            "tokenizer.ggml.token_type": [1, 1, 1, 3, 3], "tokenizer.ggml.merges": ["a b"],
            "tokenizer.ggml.pre": "default", "tokenizer.ggml.bos_token_id": BOS,
            "tokenizer.ggml.eos_token_id": EOS, **extra}


def _ids(tok, text="ab"):
    return tok.encode(text, add_special_tokens=True)


def test_flags_absent_add_nothing():
    assert _ids(Tokenizer.from_gguf_fields(_fields())) == [2]


def test_add_bos_only():
    assert _ids(Tokenizer.from_gguf_fields(_fields(**{"tokenizer.ggml.add_bos_token": True}))) == [BOS, 2]


def test_add_eos_only_and_both():
    tok = Tokenizer.from_gguf_fields(_fields(**{"tokenizer.ggml.add_eos_token": True}))
    assert _ids(tok) == [2, EOS]
    both = Tokenizer.from_gguf_fields(_fields(**{"tokenizer.ggml.add_bos_token": True,
                                                 "tokenizer.ggml.add_eos_token": True}))
    assert _ids(both) == [BOS, 2, EOS]
    assert both.encode("ab", add_special_tokens=False) == [2]
