"""Model layer audit (2), each case against transformers or as a one-line error naming the file:
bad RoPE settings and malformed JSON / safetensors / GGUF metadata; Qwen2's layer_types and default window;
chat-template calls transformers renders differently from a plain render (None-valued message keys, sep / cls /
mask tokens, continue_final_message, a template chosen by name, text or tools); checkpoints with an explicit
head_dim, 16-bit and sharded weights."""
import json
import shutil
import struct

import pytest
import torch

from reflectevo.errors import ModelLoadError
from reflectevo.model import ModelConfig, load_model
from reflectevo.model.tokenizer import Tokenizer
from test_model import CHATML, write_tiny_tokenizer

transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=320, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256)


def save_hf(path, cfg, dtype=torch.float32, **save_kw):
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").to(dtype).eval()
    hf.save_pretrained(path, **save_kw)
    write_tiny_tokenizer(path)
    return path


def reload_hf(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager",
                                                             dtype=torch.float32).eval()


def max_logit_error(path, ours, T=16):
    ids = torch.randint(0, 320, (2, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return (ours(ids) - reload_hf(path)(ids).logits).abs().max().item()


def edit_json(path, **changes):  # a value of None removes the key
    data = json.loads(path.read_text())
    for k, v in changes.items():
        data.pop(k, None) if v is None else data.__setitem__(k, v)
    path.write_text(json.dumps(data))


def one_line(err: Exception) -> str:
    msg = str(err)
    assert "\n" not in msg
    return msg


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return save_hf(tmp_path_factory.mktemp("llama"), transformers.LlamaConfig(**TINY))


@pytest.fixture(scope="module")
def sharded_dir(tmp_path_factory):
    return save_hf(tmp_path_factory.mktemp("sharded"), transformers.LlamaConfig(**TINY), max_shard_size="50KB")


def copy_of(src, tmp_path):
    return shutil.copytree(src, tmp_path / "m")


# ---- bad input: one line, naming the file and the key ------------------------------------------------------

@pytest.mark.parametrize("change, key", [
    ({"rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0}}, "'factor'"),
    ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "rope_theta": 10000.0}}, "'low_freq_factor'"),
    ({"rope_parameters": None, "rope_scaling": {"type": "linear"}}, "'factor'"),  # transformers 4 layout
    ({"head_dim": 7}, "head_dim"),
], ids=["linear-no-factor", "llama3-incomplete", "v4-linear-no-factor", "odd-head-dim"])
def test_bad_rope_settings_are_one_line_errors_naming_config_json(tmp_path, llama_dir, change, key):
    d = copy_of(llama_dir, tmp_path)
    edit_json(d / "config.json", **change)
    with pytest.raises(ModelLoadError) as e:
        load_model(d)
    msg = one_line(e.value)
    assert "config.json" in msg and key in msg


def _bad_header(d):
    header = json.dumps({"model.norm.weight": {"dtype": "F32"}}).encode()  # valid JSON, no shape / offsets
    (d / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)


@pytest.mark.parametrize("which", ["config-list", "index-list", "index-weight-map-list", "safetensors-header"])
def test_malformed_files_are_one_line_errors_naming_the_file(tmp_path, llama_dir, sharded_dir, which):
    d = copy_of(sharded_dir if which.startswith("index") else llama_dir, tmp_path)
    name = {"config-list": "config.json", "safetensors-header": "model.safetensors"}.get(
        which, "model.safetensors.index.json")
    if which == "config-list":
        (d / name).write_text("[1, 2]")
    elif which == "index-list":
        (d / name).write_text("[1, 2]")
    elif which == "index-weight-map-list":
        (d / name).write_text(json.dumps({"weight_map": ["model-00001-of-00002.safetensors"]}))
    else:
        _bad_header(d)
    with pytest.raises(ModelLoadError) as e:
        load_model(d)
    assert one_line(e.value).split(":")[0].endswith(name)


def write_metadata_gguf(path, tokenizer_model="gpt2", rope_scaling=None):
    """A GGUF with llama metadata and a tokenizer but no tensors (enough to reach the metadata checks)."""
    gguf = pytest.importorskip("gguf")
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(8)
    w.add_feed_forward_length(16)
    w.add_head_count(2)
    w.add_tokenizer_model(tokenizer_model)
    w.add_token_list([f"t{i}" for i in range(32)])
    w.add_token_types([1] * 32)
    if rope_scaling:
        w.add_string("llama.rope.scaling.type", rope_scaling)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("kw, key", [({"tokenizer_model": "llama"}, "tokenizer model 'llama'"),
                                     ({"rope_scaling": "linear"}, "rope.scaling.factor")], ids=["spm", "linear"])
def test_gguf_metadata_errors_name_the_file(tmp_path, kw, key):
    path = write_metadata_gguf(tmp_path / "tiny.gguf", **kw)
    with pytest.raises(ModelLoadError) as e:
        load_model(path)
    msg = one_line(e.value)
    assert "tiny.gguf" in msg and key in msg


# ---- Qwen2: the per-layer attention transformers runs -------------------------------------------------------

QWEN_SLIDING = dict(TINY, num_hidden_layers=3, use_sliding_window=True, sliding_window=4, max_window_layers=1)


@pytest.mark.parametrize("layer_types", [["sliding_attention", "full_attention", "sliding_attention"],
                                         ["full_attention"] * 3], ids=["alternating", "all-full"])
def test_qwen2_layer_types_win_over_max_window_layers(tmp_path, layer_types):
    d = save_hf(tmp_path, transformers.Qwen2Config(**QWEN_SLIDING))
    edit_json(d / "config.json", layer_types=layer_types)
    ours, _ = load_model(d, dtype="float32")
    assert max_logit_error(d, ours) <= 1e-4
    again = ModelConfig.from_hf(ours.config.to_hf())  # merged exports keep the layout
    assert [again.window_for_layer(i) for i in range(3)] == [ours.config.window_for_layer(i) for i in range(3)]


def test_qwen2_sliding_window_key_missing_and_bad_layer_types(tmp_path):
    d = save_hf(tmp_path, transformers.Qwen2Config(**QWEN_SLIDING))
    edit_json(d / "config.json", sliding_window=None, layer_types=None)
    hf = reload_hf(d)
    ours, _ = load_model(d, dtype="float32")
    assert [ours.config.window_for_layer(i) for i in range(3)] == [l.self_attn.sliding_window for l in hf.model.layers]
    edit_json(d / "config.json", layer_types=["sliding_attention"])
    with pytest.raises(ModelLoadError) as e:
        load_model(d)
    assert "config.json" in one_line(e.value) and "layer_types" in str(e.value)


# ---- checkpoints the other tests do not cover ----------------------------------------------------------------

@pytest.mark.parametrize("case", ["llama-head-dim", "qwen2-head-dim-untied", "mistral-bf16-sharded", "llama-fp16"])
def test_more_checkpoints_match_transformers(tmp_path, case):
    cfg, dtype, save_kw = {
        "llama-head-dim": (transformers.LlamaConfig(**TINY, head_dim=32), torch.float32, {}),
        "qwen2-head-dim-untied": (transformers.Qwen2Config(**TINY, head_dim=8, tie_word_embeddings=False),
                                  torch.float32, {}),
        "mistral-bf16-sharded": (transformers.MistralConfig(**TINY, sliding_window=5), torch.bfloat16,
                                 {"max_shard_size": "40KB"}),
        "llama-fp16": (transformers.LlamaConfig(**TINY), torch.float16, {}),
    }[case]
    d = save_hf(tmp_path, cfg, dtype, **save_kw)
    assert ("sharded" in case) == (d / "model.safetensors.index.json").is_file()
    ours, _ = load_model(d, dtype="float32")
    assert max_logit_error(d, ours, T=12) <= 1e-4


def test_eos_ids_take_every_generation_config_id(tmp_path):
    write_tiny_tokenizer(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 1]}))
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.eos_token_ids[:2] == [0, 1] and tok.token_to_id("<|im_end|>") in tok.eos_token_ids


# ---- chat templates: the text transformers renders -----------------------------------------------------------

def tokenizer_pair(path, **config):
    write_tiny_tokenizer(path)
    edit_json(path / "tokenizer_config.json", **config)
    return Tokenizer.from_dir(path), transformers.AutoTokenizer.from_pretrained(path)


def same_text(ours, hf, messages, **kw):
    gen = kw.pop("add_generation_prompt", True)
    want = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen, **kw)
    assert ours.apply_chat_template(messages, add_generation_prompt=gen, **kw) == want


def test_message_keys_set_to_none_are_dropped(tmp_path):
    template = ("{% for m in messages %}{{ m['role'] }}:{{ m['content'] if 'content' in m else '-' }}"
                "{% if 'tool_calls' in m %}[calls {{ m['tool_calls'] | length }}]{% endif %}|{% endfor %}")
    ours, hf = tokenizer_pair(tmp_path, chat_template=template)
    messages = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": None, "tool_calls": None},
                {"role": "assistant", "content": "A", "tool_calls": [{"name": "f"}]}]
    same_text(ours, hf, messages)


def test_template_sees_sep_cls_and_mask_tokens(tmp_path):
    template = "{{ cls_token }}{% for m in messages %}{{ m['content'] }}{{ sep_token }}{% endfor %}{{ mask_token }}"
    ours, hf = tokenizer_pair(tmp_path, chat_template=template, sep_token="<|im_end|>", cls_token="<|im_start|>",
                              mask_token="<|endoftext|>")
    same_text(ours, hf, [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}])


TRIMMING = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] | trim }}</{{ m['role'] }}>{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")


@pytest.mark.parametrize("content", ["The answer is", "Ends with a space ", "Ends with a newline\n"])
@pytest.mark.parametrize("template", [CHATML, TRIMMING], ids=["chatml", "trimming"])
def test_continue_final_message(tmp_path, template, content):
    ours, hf = tokenizer_pair(tmp_path, chat_template=template)
    messages = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": content}]
    same_text(ours, hf, messages, add_generation_prompt=False, continue_final_message=True)


def test_template_by_name_by_text_and_for_tools(tmp_path):
    tool_use = ("TOOLS {{ tools | tojson }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
                "{% if add_generation_prompt %}<assistant>{% endif %}")
    ours, hf = tokenizer_pair(tmp_path, chat_template=[{"name": "default", "template": CHATML},
                                                       {"name": "tool_use", "template": tool_use}])
    messages = [{"role": "user", "content": "add 2 and 3"}]
    tools = [{"type": "function", "function": {"name": "add", "parameters": {}}}]
    same_text(ours, hf, messages)
    same_text(ours, hf, messages, tools=tools)
    same_text(ours, hf, messages, chat_template="tool_use", tools=tools)
    same_text(ours, hf, messages, chat_template="{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    hf.save_pretrained(tmp_path / "saved")  # transformers 5: chat_template.jinja + additional_chat_templates/
    assert (tmp_path / "saved" / "additional_chat_templates").is_dir()
    same_text(Tokenizer.from_dir(tmp_path / "saved"), hf, messages, tools=tools)
