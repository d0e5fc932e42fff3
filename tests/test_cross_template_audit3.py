"""Training a model on records another model generated: the prompts are the ones eval sends THIS model.

Our raw records (and the D+ / D± curated from them) store each prompt rendered with the chat template of the
model that generated them. Trained on another model (the usual case: a bigger or other generator, a small
student), such a stored prompt must not be wrapped as text into the student's own template (the generator's
special tokens inside a user turn): eval renders the same conversation with the student's template. Checked for
one-stage, reflect, correct and DPO, token for token against what eval sends the student for the same trial 1
(read from the generator's trial-1 outputs), for templates that differ everywhere (Llama-3 / Mistral) and for two
ChatML templates that differ only in their default system turn (e.g. SmolLM2 and Qwen2.5)."""
from __future__ import annotations

import json

import pytest

from reflectevo.data.eval_run import run_eval
from reflectevo.data.loop import LoopConfig
from test_one_stage_parity import one_stage_eval
from test_prompt_parity_audit2 import (_TOKENIZERS, ITEMS, TASK, TokenEngine, _bpe, example, pipeline, tokenizer,
                                       where_they_differ)

CHATML = ("{% if messages[0]['role'] != 'system' %}<|im_start|>system\nSYSTEM<|im_end|>\n{% endif %}"
          "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _chatml(name: str, system: str):
    if name not in _TOKENIZERS:
        _TOKENIZERS[name] = _bpe(CHATML.replace("SYSTEM", system), ["<|im_start|>", "<|im_end|>"], "<|im_start|>",
                                 "<|im_end|>", False)
    return _TOKENIZERS[name]


def student_eval(run, student, tmp_path):
    """What eval sends ``student`` for the generator's trial 1s: reflection and trial-2 ids (two-stage) and the
    one-stage prompt ids."""
    cache = tmp_path / "generator_trial1.jsonl"
    cache.write_text("".join(json.dumps({k: r[k] for k in ("id", "question", "answer")} | {"output": r["output"][:1]})
                             + "\n" for r in run.evals[0].raw))
    trial, reflector = TokenEngine(student), TokenEngine(student)
    run_eval(TASK, ITEMS, trial, reflector, student, tmp_path / "two.json", LoopConfig(), log=None, trial1_cache=cache)
    assert not trial.sent("trial1")
    one = one_stage_eval(student, "canonical", tmp_path / "one.json", cache)
    return {"reflect": reflector.sent("reflect"), "trial2": trial.sent("trial2"), "one-stage": one.sent}


@pytest.mark.parametrize("generator,student", [("llama3", "mistral"), ("mistral", "llama3"),
                                               ("chatml_qwen", "chatml_smol")])
def test_records_of_another_model_train_on_the_prompts_eval_sends_this_model(generator, student, tmp_path_factory,
                                                                             tmp_path):
    _chatml("chatml_qwen", "You are Qwen, a helpful assistant.")
    tok_s = _chatml("chatml_smol", "You are SmolLM, trained by Hugging Face.") if student == "chatml_smol" else None
    run = pipeline(generator, "canonical", tmp_path_factory)
    tok_s = tok_s or tokenizer(student)
    sent = student_eval(run, tok_s, tmp_path)
    for rec, pair in zip(run.d_plus, run.d_pm):
        for mode, phase in (("one-stage", "one-stage"), ("reflect", "reflect"), ("correct", "trial2")):
            got, want = example(tok_s, rec, mode).prompt, sent[phase][rec["id"]]
            assert got == want, f"{mode}: " + where_they_differ(tok_s, got, want)
        got = example(tok_s, pair).prompt
        assert got == sent["reflect"][pair["id"]], "dpo: " + where_they_differ(tok_s, got, sent["reflect"][pair["id"]])


def test_the_generators_own_records_are_unchanged_and_other_prompts_stay_stored(tmp_path_factory):
    """Same model: the stored text (what the parity tests check). Prompts that are not one of eval's
    conversations (--sft-prompt stored: the data-generation reflection request with its demand) are kept."""
    run = pipeline("llama3", "canonical", tmp_path_factory)
    tok = run.tok
    rec = run.d_plus[0]
    assert tok.decode(example(tok, rec, "reflect").prompt) == rec["test_reflection_prompt"]
    assert tok.decode(example(tok, rec, "correct").prompt) == rec["test_trial2_prompt"]
    stored = example(tok, rec, "reflect", sft_prompt="stored").prompt
    assert tok.decode(stored) == rec["reflect_prompt"]


def test_a_template_with_a_clock_keeps_its_own_records_of_another_day(tmp_path_factory):
    """A template that writes today's date (Llama-3.2: strftime_now) renders the generator's own records with
    another date than the day they were made: kept as stored, so a run's data (which --resume checks) does not
    change with the day. Records of another template are still rendered with this one."""
    from reflectevo.trainer.data import chat_frame, eval_rendering

    dated = CHATML.replace("SYSTEM", "Today is {{ strftime_now('%d %b %Y') }}.")
    tok = _TOKENIZERS.setdefault("chatml_dated", _bpe(dated, ["<|im_start|>", "<|im_end|>"], "<|im_start|>",
                                                      "<|im_end|>", False))
    run = pipeline("llama3", "canonical", tmp_path_factory)
    rec = dict(run.d_plus[0])
    today = eval_rendering(rec, rec["test_reflection_prompt"], tok, chat_frame(tok))
    assert today.startswith("<|im_start|>system\nToday is ") and "<|start_header_id|>" not in today
    rec["test_reflection_prompt"] = today.replace("Today is ", "Today is 01 Jan 1999, not ", 1)
    kept = eval_rendering(rec, rec["test_reflection_prompt"], tok, chat_frame(tok))
    assert kept == rec["test_reflection_prompt"]
    assert run.tok.decode(example(run.tok, rec, "reflect").prompt) != kept      # the llama3 student re-renders
