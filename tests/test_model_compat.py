"""Loading and templating edge cases, each checked against transformers on a tiny model or tokenizer."""
import json

import pytest
import torch

from reflectevo.model import load_model
from reflectevo.model.tokenizer import Tokenizer
from test_model import write_tiny_tokenizer

transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=320, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256)


def save_tiny(tmp_path, cfg):
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").float().eval()
    hf.save_pretrained(tmp_path)
    write_tiny_tokenizer(tmp_path)
    return hf


@pytest.mark.parametrize("bias", ["attention_bias", "mlp_bias"])
def test_llama_with_biases_matches_transformers(tmp_path, bias):
    hf = save_tiny(tmp_path, transformers.LlamaConfig(**TINY, **{bias: True}))
    ours, _ = load_model(tmp_path, dtype="float32")
    ids = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max().item() <= 1e-4
