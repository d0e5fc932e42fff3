"""Tokenizer: Hugging Face ``tokenizers`` underneath, chat templates rendered with jinja2 as transformers does.

Built from a model directory (tokenizer.json + tokenizer_config.json [+ generation_config.json]) or from GGUF
metadata (byte-level BPE vocab + merges, the pre-tokeniser the file names, control tokens as special tokens).
"""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from tokenizers import AddedToken, Regex, pre_tokenizers, decoders
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.models import BPE

from reflectevo.errors import ModelLoadError

# Split patterns of llama.cpp pre-tokeniser names (tokenizer.ggml.pre) that are not plain GPT-2.
_GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_DIGIT_THEN_GPT2 = ("digits", _GPT2_SPLIT)  # SmolLM / StarCoder: every digit its own token, then GPT-2
GGUF_PRE_SPLITS = {
    "gpt2": _GPT2_SPLIT, "default": _GPT2_SPLIT,
    "llama3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "smaug-bpe": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT,
    "smollm": _DIGIT_THEN_GPT2, "starcoder": _DIGIT_THEN_GPT2, "refact": _DIGIT_THEN_GPT2,
}
END_OF_TURN_CANDIDATES = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "</s>")
# tokens that end generation in a GGUF chat model besides its eos / eot / eom ids (llama.cpp's list of such texts)
END_OF_GENERATION = ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|endoftext|>", "<|im_end|>", "<end_of_turn>",
                     "<|end|>", "<EOT>", "<|END_OF_TURN_TOKEN|>")


def _render_environment():
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(Extension):
        """``{% generation %}...{% endgeneration %}`` marks the assistant's tokens for a training mask; rendering
        keeps the body as it is."""
        tags = {"generation"}

        def parse(self, parser):
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    def raise_exception(message):
        raise ValueError(f"chat template: {message}")

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols, GenerationBlock])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


class Tokenizer:
    def __init__(self, backend: HFTokenizer, chat_template: str | None = None, special_tokens: dict | None = None,
                 eos_token_ids: list[int] | None = None, bos_token_id: int | None = None,
                 pad_token_id: int | None = None):
        self.backend = backend
        self.chat_template = chat_template
        self.special_tokens = {k: v for k, v in (special_tokens or {}).items() if v is not None}
        self.bos_token_id = bos_token_id
        self.eos_token_ids = list(dict.fromkeys(eos_token_ids or []))
        self.pad_token_id = pad_token_id if pad_token_id is not None else (self.eos_token_ids or [None])[0]
        self.named_chat_templates: dict[str, str] = {}  # tokenizer_config's named templates ("tool_use", ...)
        self._compiled: dict[str, object] = {}

    # -- basic ------------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``. Special tokens are added only where the model's own post-processor adds them
        (e.g. Llama-3's BOS); pass ``add_special_tokens=False`` for text that is already chat-formatted."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=add_special_tokens)]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @property
    def eot_token_id(self) -> int | None:
        """The token that ends an assistant turn in the chat template (ChatML <|im_end|>, Llama-3 <|eot_id|>...)."""
        for tok in END_OF_TURN_CANDIDATES:
            tid = self.backend.token_to_id(tok)
            if tid is not None and (self.chat_template is None or tok in self.chat_template):
                return tid
        return self.eos_token_ids[0] if self.eos_token_ids else None

    # -- chat -------------------------------------------------------------------------------------------
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, *,
                            continue_final_message: bool | str = False, chat_template: str | None = None,
                            **kwargs) -> str:
        """The same text transformers' ``apply_chat_template(..., tokenize=False)`` renders.

        As there: message keys whose value is None are dropped (templates test ``'tool_calls' in message``);
        ``continue_final_message`` leaves the last message open for the model to continue (no generation prompt
        then); ``chat_template`` is a named template of this tokenizer or a template text; with ``tools`` a
        "tool_use" named template is preferred.
        """
        template = self._pick_template(chat_template, kwargs.get("tools"))
        compiled = self._compiled.get(template)
        if compiled is None:
            compiled = self._compiled[template] = _render_environment().from_string(template)
        messages = [{k: v for k, v in m.items() if v is not None} if isinstance(m, dict) else m for m in messages]
        # transformers always passes tools and documents (None when not given); templates test `tools is not none`
        context = {"tools": None, "documents": None, **self.special_tokens, **kwargs}
        if not continue_final_message:
            return compiled.render(messages=messages, add_generation_prompt=add_generation_prompt, **context)
        # as transformers: tag the end of the final message, render, and cut the text at the tag
        field = continue_final_message if isinstance(continue_final_message, str) else "content"
        final = messages[-1].get(field) if messages else None
        if not isinstance(final, str):
            raise ValueError(f"continue_final_message: the final message has no text {field!r} to continue")
        tag = "CONTINUE_FINAL_MESSAGE_TAG "
        messages[-1] = {**messages[-1], field: final + tag}
        text = compiled.render(messages=messages, add_generation_prompt=False, **context)
        if final.strip() not in text or tag.strip() not in text:
            raise ValueError("continue_final_message: the chat template does not render the final message as given")
        at = text.rindex(tag.strip())
        return text[:at] if text[at:at + len(tag)] == tag else text[:at].rstrip()

    def _pick_template(self, chat_template: str | None, tools) -> str:
        if chat_template is not None:
            return self.named_chat_templates.get(chat_template, chat_template)
        if tools is not None and "tool_use" in self.named_chat_templates:
            return self.named_chat_templates["tool_use"]
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat template (tokenizer_config.json or GGUF metadata)")
        return self.chat_template

    # -- construction -----------------------------------------------------------------------------------
    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer":
        path = Path(path)
        tj = path / "tokenizer.json"
        if not tj.is_file():
            raise ModelLoadError(f"{tj}: tokenizer.json not found")
        try:
            backend = HFTokenizer.from_file(str(tj))
        except Exception as e:
            raise ModelLoadError(f"{tj}: cannot read tokenizer ({str(e).splitlines()[0]})") from None
        cfg = _read_json(path / "tokenizer_config.json")
        _llama_sentencepiece_pipeline(backend, cfg)
        gen = _read_json(path / "generation_config.json")
        model_cfg = _read_json(path / "config.json")
        template = cfg.get("chat_template")
        named = {}
        if isinstance(template, list):  # named templates: "default" renders unless a call asks for another
            named = {t["name"]: t["template"] for t in template if isinstance(t, dict) and "name" in t}
            template = named.get("default")
        if (path / "chat_template.jinja").is_file():  # takes priority over tokenizer_config, as in transformers
            template = (path / "chat_template.jinja").read_text(encoding="utf-8")
        if (path / "additional_chat_templates").is_dir():  # how transformers 5 saves named templates
            named = {f.stem: f.read_text(encoding="utf-8")
                     for f in sorted((path / "additional_chat_templates").glob("*.jinja"))}
        special_map = _read_json(path / "special_tokens_map.json")  # tokenizer_config.json wins, as in transformers
        # every named special token transformers hands the template (a template may print {{ sep_token }})
        specials = {k: _token_text(cfg.get(k)) or _token_text(special_map.get(k))
                    for k in ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                              "mask_token")}
        eos_ids = []
        for src in (gen.get("eos_token_id"), model_cfg.get("eos_token_id")):
            eos_ids += src if isinstance(src, list) else ([src] if src is not None else [])
        if specials.get("eos_token") and backend.token_to_id(specials["eos_token"]) is not None:
            eos_ids.append(backend.token_to_id(specials["eos_token"]))
        bos = specials.get("bos_token")
        bos_id = backend.token_to_id(bos) if bos else model_cfg.get("bos_token_id")
        pad = specials.get("pad_token")
        pad_id = backend.token_to_id(pad) if pad else None
        tok = cls(backend, template, specials, eos_ids, bos_id, pad_id)
        tok.named_chat_templates = named
        return tok

    @classmethod
    def from_gguf_fields(cls, fields: dict) -> "Tokenizer":
        """From GGUF metadata (``tokenizer.ggml.*``): byte-level BPE ("gpt2") as llama.cpp reads it, or a
        SentencePiece vocabulary ("llama") as transformers converts it (see gguf_tokenizer.py)."""
        model = fields.get("tokenizer.ggml.model")
        if model == "llama":
            return cls._from_gguf_sentencepiece(fields)
        if model != "gpt2":
            raise ModelLoadError(f"GGUF tokenizer model {model!r} is not supported (byte-level BPE 'gpt2' or "
                                 f"SentencePiece 'llama')")
        tokens, types = fields["tokenizer.ggml.tokens"], fields.get("tokenizer.ggml.token_type") or []
        merges = [tuple(m.split(" ", 1)) for m in fields.get("tokenizer.ggml.merges", [])]
        backend = HFTokenizer(BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False,
                                  byte_fallback=False))
        pre = fields.get("tokenizer.ggml.pre", "default")
        if pre not in GGUF_PRE_SPLITS:
            raise ModelLoadError(f"GGUF pre-tokenizer {pre!r} is not supported (known: "
                                 f"{', '.join(sorted(GGUF_PRE_SPLITS))}); its token ids would differ from the model's")
        split = GGUF_PRE_SPLITS[pre]
        pieces = []
        if isinstance(split, tuple):
            pieces.append(pre_tokenizers.Digits(individual_digits=True))
            split = split[1]
        pieces += [pre_tokenizers.Split(Regex(split), behavior="isolated"),
                   pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        backend.pre_tokenizer = pre_tokenizers.Sequence(pieces)
        backend.decoder = decoders.ByteLevel()
        control = [t for t, ty in zip(tokens, types) if ty == 3]  # 3 = CONTROL in llama.cpp's token types
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
        user = [t for t, ty in zip(tokens, types) if ty == 4]
        if user:
            backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])

        def tok(key):
            i = fields.get(f"tokenizer.ggml.{key}_token_id")
            return (int(i), tokens[int(i)]) if i is not None and int(i) < len(tokens) else (None, None)

        bos_id, bos = tok("bos")
        eos_id, eos = tok("eos")
        pad_id, pad = tok("padding")
        _, unk = tok("unknown")
        add_bos = bool(fields.get("tokenizer.ggml.add_bos_token", False)) and bos is not None
        add_eos = bool(fields.get("tokenizer.ggml.add_eos_token", False)) and eos is not None
        if add_bos or add_eos:
            from reflectevo.model.gguf_tokenizer import bos_eos_processor
            backend.post_processor = bos_eos_processor(bos, bos_id, eos, eos_id, add_bos, add_eos)
        specials = {"bos_token": bos, "eos_token": eos, "unk_token": unk, "pad_token": pad}
        return cls(backend, fields.get("tokenizer.chat_template"), specials, _gguf_eos_ids(fields), bos_id, pad_id)

    @classmethod
    def _from_gguf_sentencepiece(cls, fields: dict) -> "Tokenizer":
        from reflectevo.model.gguf_tokenizer import sentencepiece_backend

        backend = sentencepiece_backend(fields)
        tokens = fields["tokenizer.ggml.tokens"]

        def tok(key):
            i = fields.get(f"tokenizer.ggml.{key}_token_id")
            if i is None or not 0 <= int(i) < len(tokens):
                return None, None
            return backend.token_to_id(tokens[int(i)]), tokens[int(i)]

        (bos_id, bos), (_, eos), (pad_id, pad), (_, unk) = tok("bos"), tok("eos"), tok("padding"), tok("unknown")
        specials = {"bos_token": bos, "eos_token": eos, "unk_token": unk, "pad_token": pad}
        return cls(backend, fields.get("tokenizer.chat_template"), specials, _gguf_eos_ids(fields), bos_id, pad_id)

    def save(self, out_dir: str | Path):
        """Write tokenizer.json + tokenizer_config.json (+ generation eos ids) in Hugging Face layout."""
        out = Path(out_dir)
        self.backend.save(str(out / "tokenizer.json"))
        cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
               "model_max_length": 1_000_000, **self.special_tokens}
        if self.chat_template:
            cfg["chat_template"] = self.chat_template
        (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False))


_LLAMA_CLASSES = ("LlamaTokenizer", "LlamaTokenizerFast")  # (transformers 5 builds CodeLlamaTokenizer otherwise)
# the normalizer transformers 4's LlamaConverter wrote for legacy SentencePiece tokenizers (Llama-2, Mistral-7B
# v0.1 / v0.2 on the Hub): a "▁" in front of EVERY piece of text between added tokens, spaces as "▁"
_LEGACY_SPM_NORMALIZER = {"type": "Sequence", "normalizers": [
    {"type": "Prepend", "prepend": "\u2581"}, {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]}


def _llama_sentencepiece_pipeline(backend: HFTokenizer, cfg: dict) -> None:
    """A SentencePiece tokenizer.json of a ``LlamaTokenizer`` (Llama-2, Mistral-7B-Instruct-v0.2) set up as
    transformers 5 loads it: that class rebuilds the pipeline from the vocab and merges, whatever the file's
    normalizer says (no normalizer; Metaspace without splitting, prepend scheme "always" with ``legacy`` true, else
    "first", "never" with ``add_prefix_space`` false; decoder "▁" -> space, bytes, first space stripped when a
    prefix space is added). The file's legacy normalizer differs where a text starts with a space: it prepends
    "▁" to " So" too ("▁" "▁So", where the model writes "▁So" after "Thought:"). Other files stay as they are.
    """
    if cfg.get("tokenizer_class") not in _LLAMA_CLASSES:
        return
    spec = json.loads(backend.to_str())
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer")
    sentencepiece = (spec.get("normalizer") == _LEGACY_SPM_NORMALIZER and pre is None) or (
        spec.get("normalizer") is None and isinstance(pre, dict) and pre.get("type") == "Metaspace")
    if model.get("type") != "BPE" or not model.get("byte_fallback") or not sentencepiece:
        return  # not the SentencePiece layout (e.g. a byte-level BPE filed under LlamaTokenizer): as it is
    add_prefix_space = cfg.get("add_prefix_space")
    add_prefix_space = True if add_prefix_space is None else bool(add_prefix_space)
    scheme = ("always" if cfg.get("legacy", False) else "first") if add_prefix_space else "never"
    backend.normalizer = None
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme=scheme, split=False)
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    backend.decoder = decoders.Sequence(steps + [decoders.Strip(content=" ", left=1, right=0)] * add_prefix_space)


def _gguf_eos_ids(fields: dict) -> list[int]:
    """eos, eot and eom ids of a GGUF, then every control token llama.cpp also ends generation at."""
    tokens, types = fields["tokenizer.ggml.tokens"], fields.get("tokenizer.ggml.token_type") or []
    eos_ids = []
    for key in ("eos", "eot", "eom"):
        i = fields.get(f"tokenizer.ggml.{key}_token_id")
        if i is not None and int(i) < len(tokens):
            eos_ids.append(int(i))
    eos_ids += [i for i, (t, ty) in enumerate(zip(tokens, types))
                if ty == 3 and t in END_OF_GENERATION and i not in eos_ids]
    return eos_ids


def _token_text(value):
    if isinstance(value, dict):  # serialized AddedToken
        return value.get("content")
    return value


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
