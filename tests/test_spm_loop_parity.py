"""SentencePiece-vocabulary models (Mistral-7B-Instruct-v0.2, Llama-2: GGUF ``tokenizer.ggml.model = "llama"``)
through the whole loop, token for token: generate -> curate -> the trainer's examples, and eval.

A tiny random Llama model is written as a GGUF with a SentencePiece vocabulary (<unk> <s> </s>, the 256 byte
pieces, scored "▁" pieces learnt from the loop's own texts so that words are single pieces) and loaded with
``load_model``; transformers' GGUF tokenizer of the same file is the oracle of ids (and its chat template
rendering of text). The REAL ``reflectevo.gen.Engine`` samples (paged KV cache, stop strings, incremental
detokenizer) with its ``sample`` step scripted: each sequence writes, after its prompt, the ids a model writes for
a text (" I add ..." after "Thought:" gives "▁I▁add...", a reflection after "[/INST]" "▁Check▁the...") and then
</s>. Checked:

(a) every prompt the loop sends (trial 1, reflection, trial 2; generation and eval) is transformers' encoding of
    the same conversation (its own chat-template rendering + the "Thought:" opener), with the template's "<s>"
    as exactly one BOS id (no "<", "s", ">" pieces, no second BOS from the post-processor);
(b) SFT ("reflect" and "correct"): the trainer's prompt is the ids eval sends, its response the ids the model
    generated (no "▁" added or lost at the start, at the "Thought:" seam or before </s>), ending with the </s> it
    generated, and the labels cover exactly that;
(c) DPO: the pair's prompt is the ids eval sends the reflector; chosen / rejected are the generated ids.

Variants: Mistral-v0.2's template and Llama-2's from the GGUF, and Mistral-v0.2 from a Hub-style directory
(tokenizer.json with transformers 4's legacy SentencePiece normalizer, tokenizer_config naming LlamaTokenizer with
legacy true), whose oracle is transformers 5 loading that directory. The trials of the last question run on into an
Observation the stop string cuts off (the target then ends with </s> where the cut is).

Known divergences, pinned as strict xfails (see their reasons):
* GGUF: llama.cpp's SentencePiece tokenizer puts a "▁" in front of the text after every special token
  ("<s>▁[INST]", as mistral-common and the Llama-2 reference code encode the chat format); transformers' GGUF
  tokenizer (and ours, which matches it) does not (the Hub layout with legacy true does).
Llama-2's template renders an assistant turn as " " + content + " " + </s>: the loop opens its turn "[/INST] Thought:"
("▁Thought", as transformers' continue_final_message prefill) and the trainer's target keeps the "▁" before </s>
(data/conversation.py assistant_frame); Mistral's prompts and targets are what they were ("[/INST]Thought:", no "▁").
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import reflectevo.gen.engine as engine_mod
from reflectevo.data import get_task
from reflectevo.data.curate import curate_records
from reflectevo.data.eval_run import run_eval
from reflectevo.data.jsonl import read_jsonl
from reflectevo.data.loop import LoopConfig, ReflectLoop
from reflectevo.data.prompts import DEFAULT as P
from reflectevo.gen import Engine
from reflectevo.model import load_model
from reflectevo.model.tokenizer import Tokenizer
from reflectevo.trainer.data import IGNORE, sequences_of, strip_observation, tokenize_records
from trainer_tiny import cfg

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
pytest.importorskip("transformers.integrations.gguf", reason="this transformers has no GGUF tokenizer support")

from test_gguf_spm_tokenizer import LLAMA2_TEMPLATE, MISTRAL_TEMPLATE, write_spm_vocab_gguf  # noqa: E402

TASK = get_task("arithmetic")
ITEMS = [{"id": f"q{i}", "question": f"Tom has {i + 3} apples and buys {i + 5} more. How many apples does he have?",
          "answer": str(2 * i + 8)} for i in range(2)]
GOOD, BAD = "Check the carry in the sum and add the two numbers again.", "Read the question once more."
TRIAL1 = " I add the numbers and get 99.\nAction: Finish[99]"
RUN_ON = "\nObservation: The answer is right."      # a trial that runs on past its action (the stop string cuts)
BOS, EOS = 1, 2
BIG = 1 << 20


def trial2_text(answer: str) -> str:
    return f" So it is {answer}.\nAction: Finish[{answer}]"


# ------------------------------------------------------------------------------------------------- the GGUF
def learnt_pieces() -> list[str]:
    """SentencePiece-style pieces ("▁" for a space, in merge order) learnt from the texts the loop sends."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers, trainers

    corpus = [P.trial_prompt(TASK, it) for it in ITEMS] + list(P.templates.values()) * 2
    corpus += [GOOD, BAD, TRIAL1, trial2_text("8"), "[INST] [/INST] Thought: Observation:"] * 3
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    hf.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=900, show_progress=False,
                                                       initial_alphabet=["▁"]))
    vocab = hf.get_vocab()
    return [p for p in sorted(vocab, key=vocab.get) if "\n" not in p]   # as Llama's: "\n" is the byte <0x0A>


def write_gguf(path, template: str):
    """A tiny llama-architecture GGUF as llama.cpp's converter writes a SentencePiece model (Llama-2, Mistral)."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [6] * 256                                  # UNKNOWN, CONTROL, BYTE
    scores = [0.0] * len(tokens)
    for i, piece in enumerate(p for p in learnt_pieces() if p not in tokens):
        tokens.append(piece)
        types.append(1)
        scores.append(-float(i))
    # as Mistral / Llama-2 files: BOS on encode(text) unless told not to
    write_spm_vocab_gguf(path, tokens, scores, types, template, add_bos=True, add_eos=False, layers=1, context=4096)


def spm_pieces(tok, text: str, space_prefix: bool) -> list[int]:
    """A piece of text without special tokens as the SentencePiece model splits it: spaces escaped to "▁" (one in
    front with ``space_prefix``), then the pieces (the BPE model over the file's pieces, byte fallback)."""
    return [t.id for t in tok.backend.model.tokenize(("▁" if space_prefix else "") + text.replace(" ", "▁"))]


# ------------------------------------------------------------------------------------------------- the sampler
class Script:
    """The engine's ``sample`` step scripted per sequence: after its prompt a sequence writes the ids of one text
    (what the model says: trial 1 wrong; a reflection naming the carry fixes trial 2) and then </s>. The ids are
    the SentencePiece pieces of the text as the continuation of the prompt (spaces as "▁", none added in front;
    checked: prompt + ids decode to the prompt's text + the text). ``tail``: what the model writes between its
    text and </s> (Llama-2: " "). The trials of the last question run on into an Observation of their own, which
    the stop string "\nObservation" cuts off.

    ``generated``: (phase, question id, text, ids written, ids of the text + </s>: the training target)."""

    def __init__(self, tok, tail=""):
        self.tok, self.tail, self.generated = tok, tail, []

    def text_for(self, prompt_text: str, seq) -> tuple[str, str, str]:
        item = next(it for it in ITEMS if it["question"] in prompt_text)
        if not seq.params.greedy:
            return "reflect", item["id"], " " + (GOOD, BAD)[seq.sample_idx]
        if P.retry_request(item) in prompt_text:
            fixed = "carry" in prompt_text.rsplit(P.retry_request(item), 1)[0][-400:]
            return "trial2", item["id"], trial2_text(item["answer"] if fixed else "1")
        return "trial1", item["id"], TRIAL1

    def ids_for(self, seq) -> list[int]:
        if not hasattr(seq, "scripted"):
            prompt = seq.token_ids[:seq.num_prompt_tokens]
            head = self.tok.decode(prompt)
            phase, qid, text = self.text_for(head, seq)
            more = RUN_ON if seq.params.greedy and qid == ITEMS[-1]["id"] else ""
            ids = spm_pieces(self.tok, text + more + self.tail, space_prefix=False)
            assert self.tok.decode(prompt + ids) == head + text + more + self.tail   # the ids continue the prompt
            kept = spm_pieces(self.tok, text + self.tail * (not more), space_prefix=False)
            assert ids[:len(kept)] == kept and (len(kept) < len(ids)) == bool(more)
            seq.scripted = ids + [EOS]
            self.generated.append((phase, qid, text.strip(), seq.scripted, kept + [EOS]))
        return seq.scripted

    def __call__(self, logits, batch):
        return torch.tensor([self.ids_for(s)[s.num_output_tokens] for s in batch])


class Recording:
    """The real engine; every request kept as (phase, question id, prompt ids)."""

    def __init__(self, engine, tok):
        self.engine, self.tok, self.calls = engine, tok, []

    def generate(self, prompts, params=None, **kw):
        plist = params if isinstance(params, list) else [params] * len(prompts)
        for ids, sp in zip(prompts, plist):
            text = self.tok.decode(ids)
            qid = next(it["id"] for it in ITEMS if it["question"] in text)
            phase = "reflect" if not sp.greedy else "trial2" if "Your reflection above" in text else "trial1"
            self.calls.append((phase, qid, list(ids)))
        return self.engine.generate(prompts, params, **kw)

    def sent(self, phase: str, qid: str) -> list[list[int]]:
        """The prompt ids of ``phase`` the engine received for question ``qid``."""
        return [ids for p, q, ids in self.calls if (p, q) == (phase, qid)]


# name: (chat template, what the model writes before </s>, where the tokenizer comes from)
VARIANTS = {"mistral-v0.2": (MISTRAL_TEMPLATE, "", "gguf"), "llama2": (LLAMA2_TEMPLATE, " ", "gguf"),
            "mistral-v0.2-hub": (MISTRAL_TEMPLATE, "", "hub")}
GGUF = [n for n, v in VARIANTS.items() if v[2] == "gguf"]
_RUNS: dict = {}


def hub_dir(tok, out, legacy=True, tokenizer_class="LlamaTokenizer", **config_items):
    """``tok``'s vocabulary as a Hub model directory of Mistral-7B-Instruct-v0.2 / Llama-2 holds it: tokenizer.json
    with transformers 4's legacy SentencePiece normalizer (Prepend "▁", spaces as "▁", no pre-tokenizer) and a
    tokenizer_config.json naming LlamaTokenizer (``legacy``: None leaves the key out)."""
    import json

    out.mkdir(parents=True, exist_ok=True)
    tok.save(out)
    spec = json.loads((out / "tokenizer.json").read_text())
    spec["normalizer"] = {"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": "▁"}, {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]}
    spec["pre_tokenizer"] = None
    (out / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False))
    config = json.loads((out / "tokenizer_config.json").read_text())
    config.update(tokenizer_class=tokenizer_class, add_bos_token=True, add_eos_token=False, **config_items)
    if legacy is not None:
        config["legacy"] = legacy
    (out / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False))
    return out


def pipeline(name: str, tmp_path_factory):
    """generate (n=2 reflections) -> curate, then eval; the real engine with the scripted sample step."""
    if name in _RUNS:
        return _RUNS[name]
    template, tail, source = VARIANTS[name]
    d = tmp_path_factory.mktemp(f"spm_loop_{name}")
    write_gguf(d / "tiny.gguf", template)
    model, tok = load_model(d / "tiny.gguf", dtype="float32")
    hf = transformers.AutoTokenizer.from_pretrained(str(d), gguf_file="tiny.gguf")
    if source == "hub":
        tok = Tokenizer.from_dir(hub_dir(tok, d / "hub"))
        hf = transformers.AutoTokenizer.from_pretrained(str(d / "hub"))
    script = Script(tok, tail)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(engine_mod, "sample", script)
        gen = Recording(Engine(model, tok, kv_cache_gib=0.02), tok)
        ReflectLoop(TASK, gen, gen, tok, LoopConfig(n_reflections=2, max_tokens=64, reflection_max_tokens=64),
                    log=None).run(ITEMS, d / "raw.jsonl")
        ev = Recording(Engine(model, tok, kv_cache_gib=0.02), tok)
        run_eval(TASK, ITEMS, ev, ev, tok, d / "eval.json", LoopConfig(max_tokens=64, reflection_max_tokens=64),
                 log=None)
    sets, _ = curate_records(read_jsonl(d / "raw.jsonl"), eval_fraction=0.0)
    raw, eval_raw = read_jsonl(d / "raw.jsonl"), read_jsonl(d / "eval.raw.jsonl")
    # every prompt text the records save, by its ids (a hub tokenizer decodes "<s>▁[INST]" as "<s> [INST]")
    saved = [e[k] for r in raw + eval_raw for e in r["output"] for k in ("reason_prompt", "reflection_prompt")
             if e.get(k)]
    texts = {tuple(tok.encode(t, add_special_tokens=False)): t for t in saved}
    run = SimpleNamespace(name=name, source=source, tok=tok, hf=hf, gen=gen, ev=ev, script=script, raw=raw,
                          eval_raw=eval_raw, d_plus=sets["d_plus"], d_pm=sets["d_pm"], texts=texts)
    assert all(tuple(ids) in texts for _, _, ids in gen.calls + ev.calls)   # each sent = encode(its saved text)
    assert len(run.d_plus) == len(run.d_pm) == len(ITEMS)           # every trial 1 wrong, the GOOD reflection fixes
    _RUNS[name] = run
    return run


@pytest.fixture(params=list(VARIANTS))
def run(request, tmp_path_factory):
    return pipeline(request.param, tmp_path_factory)


def generated(run, phase: str, qid: str, text: str) -> list[int]:
    """The ids the model generated for ``text`` in ``phase`` of question ``qid``, up to the end of the text (the
    stop string cut), then its </s>."""
    found = {tuple(kept) for p, q, t, _, kept in run.script.generated if (p, q, t) == (phase, qid, text)}
    assert len(found) == 1, (phase, qid, text, found)
    return list(found.pop())


def example(tok, rec, mode=None, **kw):
    (ex,), _ = tokenize_records([(1, rec)], tok, cfg(**({"mode": mode} if mode else {}), **{"max_length": BIG, **kw}),
                                mode is None, "f.jsonl")
    return ex


def hf_ids(hf, messages, opener=""):
    """transformers' rendering (generation prompt; with ``opener`` the assistant turn opened with it, as
    continue_final_message prefills it) and its ids of that text."""
    text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if opener:
        prefill = hf_prefill(hf, messages, opener)
        assert prefill[0] == text + ASSISTANT_OPENING[hf.chat_template] + opener
        return prefill
    assert hf.apply_chat_template(messages, tokenize=True, return_dict=False, add_generation_prompt=True) == \
        hf.encode(text, add_special_tokens=False)
    return text, hf.encode(text, add_special_tokens=False)


def hf_prefill(hf, messages, opener: str):
    """transformers' own way to open the assistant turn with ``opener`` (continue_final_message): text, ids."""
    messages = messages + [{"role": "assistant", "content": opener}]
    text = hf.apply_chat_template(messages, tokenize=False, continue_final_message=True)
    ids = hf.apply_chat_template(messages, tokenize=True, return_dict=False, continue_final_message=True)
    assert ids == hf.encode(text, add_special_tokens=False)
    return text, list(ids)


# what each template puts between its generation prompt and an assistant message's content: Mistral nothing (the
# prompts as before the opener followed the template: "[/INST]Thought:"), Llama-2 a space ("[/INST] Thought:")
ASSISTANT_OPENING = {MISTRAL_TEMPLATE: "", LLAMA2_TEMPLATE: " "}
SPECIAL_TEXTS = ("<s>", "</s>", "<unk>")


def fragments(text: str) -> list[str]:
    """``text`` split at the special tokens' texts (kept as their own parts), as llama.cpp's parse_special does."""
    out, at = [], 0
    while at < len(text):
        hits = [(k, sp) for sp in SPECIAL_TEXTS if (k := text.find(sp, at)) >= 0]
        k, sp = min(hits) if hits else (len(text), "")
        out += [text[at:k]] * (k > at) + [sp] * bool(sp)
        at = k + len(sp)
    return out


def llama_cpp_ids(tok, text: str) -> list[int]:
    """llama.cpp's SentencePiece tokenization (parse_special, add_space_prefix, no BOS added): each piece of text
    after a special token (or at the start) gets a space in front (llama_vocab::tokenize, LLAMA_VOCAB_TYPE_SPM)."""
    return [i for f in fragments(text) for i in ([tok.token_to_id(f)] if f in SPECIAL_TEXTS else
                                                 spm_pieces(tok, f, space_prefix=True))]


def first_difference(tok, a, b):
    k = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    pieces = [tok.backend.id_to_token(i) for i in a[max(0, k - 2):k + 3]], \
        [tok.backend.id_to_token(i) for i in b[max(0, k - 2):k + 3]]
    return f"first difference at token {k}: {pieces[0]} vs {pieces[1]} (len {len(a)} vs {len(b)})"


# ------------------------------------------------------------------------------------------------- (a) prompts
def test_loop_prompts_are_transformers_ids_of_the_same_conversation(run):
    tok, hf = run.tok, run.hf
    for rec in run.raw:
        item = next(it for it in ITEMS if it["id"] == rec["id"])
        t1, t2s = rec["output"][0], rec["output"][1:]
        refl_msgs = P.reflection_messages(TASK, item, t1["scratchpad"], "1-1-1")
        expected = {"trial1": [hf_ids(hf, P.trial_messages(TASK, item), P.response_prefix)],
                    "reflect": [hf_ids(hf, refl_msgs)],
                    "trial2": [hf_ids(hf, P.trial2_messages(item, refl_msgs, t2["reflections"][-1]), P.response_prefix)
                               for t2 in t2s]}
        assert [t1["reason_prompt"]] == [t for t, _ in expected["trial1"]]
        assert [t2["reflection_prompt"] for t2 in t2s] == [t for t, _ in expected["reflect"]] * 2
        assert sorted(t2["reason_prompt"] for t2 in t2s) == sorted(t for t, _ in expected["trial2"])
        for phase, want in expected.items():
            got = run.gen.sent(phase, rec["id"])
            assert sorted(got) == sorted(ids for _, ids in want), phase
            for ids in got:
                text = run.texts[tuple(ids)]
                n_bos = text.count("<s>")                 # Mistral: one; Llama-2: one per user turn
                assert ids[0] == BOS and ids[1] != BOS and ids.count(BOS) == n_bos >= 1
                assert ids.count(EOS) == text.count("</s>")
                # the post-processor's BOS would double the template's: the loop must encode without it
                assert tok.encode(text)[:2] == [BOS, BOS] and tok.encode(text)[1:] == ids
    # eval: the test-time conversations, the same way
    for rec in run.eval_raw:
        item = next(it for it in ITEMS if it["id"] == rec["id"])
        msgs = P.test_reflection_messages(TASK, item, rec["output"][0]["scratchpad"])
        assert run.ev.sent("reflect", rec["id"]) == [hf_ids(hf, msgs)[1]]
        want = hf_ids(hf, P.trial2_messages(item, msgs, rec["output"][1]["reflections"][-1]), P.response_prefix)
        assert run.ev.sent("trial2", rec["id"]) == [want[1]]


@pytest.mark.parametrize("name", ["mistral-v0.2", "llama2"])
def test_the_opened_thought_is_the_templates_own_assistant_turn(name, tmp_path_factory):
    """A trial prompt opens the assistant turn with "Thought:": the text (and ids) must be the template's own
    rendering of an assistant turn that starts with it, as transformers prefills one."""
    r = pipeline(name, tmp_path_factory)
    for rec in r.raw + r.eval_raw:
        item = next(it for it in ITEMS if it["id"] == rec["id"])
        t1 = rec["output"][0]
        text, ids = hf_prefill(r.hf, P.trial_messages(TASK, item), P.response_prefix)
        assert t1["reason_prompt"] == text
        assert r.gen.sent("trial1", rec["id"]) == [ids], first_difference(r.tok, r.gen.sent("trial1", rec["id"])[0],
                                                                          ids)
        assert text.endswith("[/INST] Thought:" if name == "llama2" else "[/INST]Thought:")   # Mistral: as it was
        pieces = [r.tok.backend.id_to_token(i) for i in ids[-4:]]
        after = pieces[pieces.index("▁[/INST]") + 1]                # Llama-2 "▁Thought", Mistral "T" "hought:"
        assert after.startswith("▁") == (name == "llama2"), pieces


GGUF_NOT_LLAMA_CPP = pytest.mark.xfail(strict=True, reason=(
    "model/gguf_tokenizer.py follows transformers' GGUF tokenizer (Metaspace prepend_scheme='first': no '▁' in "
    "front of text after a special token, '<s>[INST]' -> <s> '[' ...); llama.cpp (add_space_prefix), "
    "mistral-common and the Llama-2 reference code encode '<s>▁[INST]' and '</s>▁[INST]'. Matching llama.cpp "
    "breaks the transformers parity tests/test_gguf_spm_tokenizer.py asserts: the project has to choose."))


@pytest.mark.parametrize("name", [pytest.param(n, marks=GGUF_NOT_LLAMA_CPP) if n in GGUF else n for n in VARIANTS])
def test_loop_prompts_are_the_ids_llama_cpp_gives(name, tmp_path_factory):
    """The Hub layout (LlamaTokenizer, legacy) puts "▁" after <s> / </s> as llama.cpp does; the GGUF one not."""
    run = pipeline(name, tmp_path_factory)
    for _, _, ids in run.gen.calls + run.ev.calls:
        want = llama_cpp_ids(run.tok, run.texts[tuple(ids)])
        assert ids == want, first_difference(run.tok, ids, want)


@pytest.mark.parametrize("name", GGUF)
def test_llama_cpp_differs_only_by_the_space_after_special_tokens(name, tmp_path_factory):
    """Where the two part: ours encodes each piece of text between special tokens as it stands, llama.cpp with a
    space in front ("<s>[INST]": ours <s> '[' ..., llama.cpp <s> '▁[' ...); everything else is the same."""
    run = pipeline(name, tmp_path_factory)
    tok = run.tok
    for _, _, ids in run.gen.calls + run.ev.calls:
        text = run.texts[tuple(ids)]
        assert ids != llama_cpp_ids(tok, text)
        parts = fragments(text)
        assert parts[0] == "<s>" and "".join(parts) == text
        assert ids == [i for f in parts for i in ([tok.token_to_id(f)] if f in SPECIAL_TEXTS else
                                                   spm_pieces(tok, f, space_prefix=False))]
        assert tok.backend.id_to_token(ids[1]).startswith("[")                  # "<s>[INST": no "▁" after <s>
        assert tok.backend.id_to_token(llama_cpp_ids(tok, text)[1]).startswith("▁[")


# ------------------------------------------------------------------------------------------------- (b) SFT
def test_reflect_sft_example_is_eval_prompt_plus_generated_reflection(run):
    tok = run.tok
    for rec in run.d_plus:
        ex = example(tok, rec, "reflect")
        assert [ex.prompt] == run.ev.sent("reflect", rec["id"]), first_difference(tok, ex.prompt,
                                                                                   run.ev.sent("reflect", rec["id"])[0])
        want = known(run, generated(run, "reflect", rec["id"], GOOD))
        assert ex.responses == [want], first_difference(tok, ex.responses[0], want)
        assert tok.backend.id_to_token(ex.responses[0][0]) == "▁Check"   # the space after [/INST] is the model's
        _check_labels(ex, dpo=False)


def test_correct_sft_example_is_eval_trial2_prompt_plus_generated_trial(run):
    tok = run.tok
    for rec in run.d_plus:
        ex = example(tok, rec, "correct")
        at_eval = run.ev.sent("trial2", rec["id"])
        assert [ex.prompt] == at_eval, first_difference(tok, ex.prompt, at_eval[0])
        assert tok.decode(ex.prompt).endswith("[/INST] Thought:" if run.name == "llama2" else "[/INST]Thought:")
        text = trial2_text(rec["answer"]).strip()
        want = known(run, generated(run, "trial2", rec["id"], text))
        assert ex.responses == [want], first_difference(tok, ex.responses[0], want)
        written = {len(ids) for p, q, t, ids, _ in run.script.generated if (p, q, t) == ("trial2", rec["id"], text)}
        if rec["id"] == ITEMS[-1]["id"]:        # it ran on into an Observation: the target ends where the stop cut
            assert min(written) > len(want)
        # the "Thought:" seam: the model's "▁So", not "So" nor "▁" + "▁So"
        assert tok.backend.id_to_token(ex.responses[0][0]) == "▁So"
        assert strip_observation(rec["second_trial_reasoning"]) == "Thought:" + trial2_text(rec["answer"])
        _check_labels(ex, dpo=False)


# ------------------------------------------------------------------------------------------------- (c) DPO
def test_dpo_example_is_eval_reflector_prompt_plus_generated_reflections(run):
    tok = run.tok
    for pair in run.d_pm:
        ex = example(tok, pair)
        assert [ex.prompt] == run.ev.sent("reflect", pair["id"])
        assert (pair["reflection_chosen"], pair["reflection_rejected"]) == (GOOD, BAD)
        want = [known(run, generated(run, "reflect", pair["id"], t)) for t in (GOOD, BAD)]
        assert ex.responses == want, [first_difference(tok, a, b) for a, b in zip(ex.responses, want)]
        assert [tok.backend.id_to_token(r[0]) for r in ex.responses] == ["▁Check", "▁Read"]
        _check_labels(ex, dpo=True)


def known(run, ids: list[int]) -> list[int]:
    """Generated ids as the trainer takes them: the target is the template's closed turn, so with Llama-2 a trial
    the stop string cut (no " " written before its </s>) still ends "▁" </s> ("content </s>"); otherwise as they
    are."""
    space = run.tok.token_to_id("▁")
    if run.name == "llama2" and ids[-2:] != [space, EOS]:
        return ids[:-1] + [space, EOS]
    return ids


def _check_labels(ex, dpo: bool):
    seqs = sequences_of([ex], dpo=dpo)
    assert len(seqs) == len(ex.responses)
    for (inp, labels), resp in zip(seqs, ex.responses):
        assert inp == (ex.prompt + resp)[:-1]
        assert labels == [IGNORE] * (len(ex.prompt) - 1) + resp        # exactly the response and its </s>
        assert resp[-1] == EOS and resp.count(EOS) == 1 and BOS not in resp


# ------------------------------------------------------------------------------------------------- Llama-2: "▁</s>"
@pytest.mark.parametrize("mode", ["reflect", "correct", "dpo"])
def test_llama2_targets_keep_the_space_the_template_puts_before_eos(mode, tmp_path_factory):
    r = pipeline("llama2", tmp_path_factory)
    for rec in (r.d_pm if mode == "dpo" else r.d_plus):
        if mode == "correct" and rec["id"] == ITEMS[-1]["id"]:
            continue                                # its trial ran on into an Observation: no </s> written there
        ex = example(r.tok, rec, None if mode == "dpo" else mode)
        phase, texts = (("trial2", [trial2_text(rec["answer"]).strip()]) if mode == "correct" else
                        ("reflect", [GOOD, BAD] if mode == "dpo" else [GOOD]))
        want = [generated(r, phase, rec["id"], t) for t in texts]
        assert [w[-2:] for w in want] == [[r.tok.token_to_id("▁"), EOS]] * len(want)
        assert ex.responses == want, first_difference(r.tok, ex.responses[0], want[0])


# ------------------------------------------------------------------------------------------------- Hub layout
HUB_TEXTS = ["<s>[INST] hi [/INST]Thought: So it is 8.", " So it is 8.\nAction: Finish[8]", "So it is", "  two",
             "a</s>[INST] b", "<s> x", " ", "", "Check the carry. "]


@pytest.mark.parametrize("legacy,prefix", [(True, None), (False, None), (None, None), (True, False)])
def test_hub_llama_tokenizer_dir_encodes_as_transformers_loads_it(legacy, prefix, tmp_path):
    """A Hub directory of Mistral-7B-Instruct-v0.2 / Llama-2 (tokenizer.json with the legacy SentencePiece
    normalizer, tokenizer_config naming LlamaTokenizer): transformers 5 rebuilds that class's pipeline (Metaspace,
    "always" with legacy true, else "first"); ``Tokenizer.from_dir`` must give its ids. With the file's normalizer
    as it stands, " So it is 8." (the "correct" target after "Thought:") was "▁" "▁So"..., where the model writes
    "▁So" and transformers encodes "▁So"."""
    write_gguf(tmp_path / "t.gguf", MISTRAL_TEMPLATE)
    _, gguf_tok = load_model(tmp_path / "t.gguf", dtype="float32")
    d = hub_dir(gguf_tok, tmp_path / "hub", legacy=legacy, **({} if prefix is None else {"add_prefix_space": prefix}))
    ours, hf = Tokenizer.from_dir(d), transformers.AutoTokenizer.from_pretrained(str(d))
    for text in HUB_TEXTS:
        for special in (True, False):
            assert ours.encode(text, add_special_tokens=special) == hf.encode(text, add_special_tokens=special), text
        ids = hf.encode(text)
        assert ours.decode(ids) == hf.decode(ids) and ours.decode(ids, True) == hf.decode(ids, skip_special_tokens=True)
    pieces = [ours.backend.id_to_token(i) for i in ours.encode(" So it", add_special_tokens=False)]
    assert pieces == ["▁So", "▁it"]
    after_bos = ours.backend.id_to_token(ours.encode("<s>[INST]", add_special_tokens=False)[1])
    assert after_bos == ("▁[INST]" if legacy and prefix is None else "[")
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "So it is."},
            {"role": "user", "content": "again"}]
    text = ours.apply_chat_template(msgs)
    assert text == hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert ours.encode(text, add_special_tokens=False) == hf.encode(text, add_special_tokens=False)


def test_other_tokenizer_dirs_keep_their_pipeline(tmp_path):
    """Only a SentencePiece tokenizer.json of a LlamaTokenizer is rebuilt: the same file filed under another class,
    or a byte-level BPE filed under LlamaTokenizer (some Llama-3 derivatives), keeps the file's pipeline."""
    import json

    write_gguf(tmp_path / "t.gguf", MISTRAL_TEMPLATE)
    _, gguf_tok = load_model(tmp_path / "t.gguf", dtype="float32")
    d = hub_dir(gguf_tok, tmp_path / "hub", tokenizer_class="PreTrainedTokenizerFast")
    assert json.loads(Tokenizer.from_dir(d).backend.to_str())["normalizer"]["type"] == "Sequence"
    assert Tokenizer.from_dir(d).encode(" So", add_special_tokens=False)[:1] == [gguf_tok.token_to_id("▁")]
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    bpe = HFTokenizer(models.BPE(vocab={"a": 0, "Ġ": 1, "Ġa": 2}, merges=[("Ġ", "a")]))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    (tmp_path / "bl").mkdir()
    bpe.save(str(tmp_path / "bl" / "tokenizer.json"))
    (tmp_path / "bl" / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer",
                                                                        "legacy": True}))
    assert json.loads(Tokenizer.from_dir(tmp_path / "bl").backend.to_str())["pre_tokenizer"]["type"] == "ByteLevel"
