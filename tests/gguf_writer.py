"""A GGUF of a tiny transformers model, laid out as llama.cpp's converter writes it (the tests' GGUF oracle)."""
import pytest

LAYER_TENSORS = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                 "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
                 "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                 "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
                 "post_attention_layernorm": "ffn_norm"}
TOP_TENSORS = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
               "lm_head.weight": "output.weight"}


def _rows_to_pairs(t, n):
    """llama.cpp's Q/K permutation for llama: HF's rotate-half rows become adjacent pairs."""
    return t.reshape(n, 2, t.shape[0] // n // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)


def write_tiny_gguf(path, hf, arch: str, *, permute_qk: bool = False, add_keys=None, f16_matrices: bool = False,
                    extra_tensors=()):
    """``hf``'s config and weights as an ``arch`` GGUF with a placeholder byte-level vocabulary. ``permute_qk``:
    llama's Q/K row permutation; ``add_keys(writer)``: architecture-specific keys; ``f16_matrices``: 2-D tensors
    in f16 (the rest f32); ``extra_tensors``: (name, tensor) pairs written as they are."""
    gguf = pytest.importorskip("gguf")
    cfg = hf.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    if add_keys is not None:
        add_keys(w)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(cfg.vocab_size)])
    w.add_token_types([1] * cfg.vocab_size)
    w.add_token_merges([])
    w.add_eos_token_id(0)
    for key, t in hf.state_dict().items():
        t = t.detach().float()
        if key in TOP_TENSORS:
            name = TOP_TENSORS[key]
        else:
            _, _, layer, module = key.split(".", 3)
            module, _, kind = module.rpartition(".")
            name = f"blk.{layer}.{LAYER_TENSORS[module]}.{kind}"
            if permute_qk and module == "self_attn.q_proj":
                t = _rows_to_pairs(t, cfg.num_attention_heads)
            elif permute_qk and module == "self_attn.k_proj":
                t = _rows_to_pairs(t, cfg.num_key_value_heads)
        arr = t.numpy()
        w.add_tensor(name, arr.astype("float16") if f16_matrices and arr.ndim == 2 else arr)
    for name, t in extra_tensors:
        w.add_tensor(name, t.numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
