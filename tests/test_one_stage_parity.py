"""One-stage SFT (setting I) trains on exactly the prompt eval's one-stage mode sends, token for token, and that
prompt asks for what the target holds (a reflection, then a new attempt in the task's answer format).

The pipelines (generate -> curate with scripted engines in the tokenizers' own ids, three chat templates, three
ways of generating) are those of test_prompt_parity_audit2.py."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from reflectevo.data.eval_run import run_eval
from reflectevo.data.jsonl import read_jsonl
from reflectevo.data.loop import LoopConfig
from reflectevo.data.prompts import DEFAULT as P
from reflectevo.data.prompts import load_prompt_overrides
from reflectevo.trainer import TrainError
from reflectevo.trainer.data import sft_texts, strip_observation, tokenize_records
from test_prompt_parity_audit2 import (GOOD, ITEMS, TASK, TEMPLATES, WAYS, TokenEngine, example, pipeline,
                                       where_they_differ)
from trainer_tiny import cfg, d_plus

NO_ANSWER = "Do not state the final answer"    # the test-time reflection request's words


class OneStageEngine(TokenEngine):
    """A one-stage model: to the one-stage request it replies reflection + blank line + the right attempt."""
    prompts = P

    def generate(self, prompts, params=None, **kw):
        plist = params if isinstance(params, list) else [params] * len(prompts)
        outs = []
        for ids, sp in zip(prompts, plist):
            text = self.tok.decode(ids)
            item = next(it for it in ITEMS if it["question"] in text)
            assert P.test_reflection_request(item) not in text.rsplit(P.trial_prompt(TASK, item), 1)[1]
            assert sp.temperature > 0 and self.prompts.reflect_and_retry_request(TASK, item) in text
            self.calls.append(("one-stage", item["id"], list(ids)))
            answer = item["answer"]
            outs.append([self.out(f"{GOOD}\n\nThought: So it is {answer}.\nAction: Finish[{answer}]")])
        return outs


def one_stage_eval(tok, how, out, cache, prompts=None):
    trial, model = TokenEngine(tok, how), OneStageEngine(tok, how)
    model.prompts = prompts or P
    res = run_eval(TASK, ITEMS, trial, model, tok, out, LoopConfig(reflector_mode="one-stage"), log=None,
                   trial1_cache=cache, prompts=prompts)
    assert not trial.sent("trial2") and not trial.sent("reflect")        # no trial-2 generation
    return SimpleNamespace(result=res, sent=model.sent("one-stage"), trial1=trial.sent("trial1"),
                           raw=read_jsonl(out.with_name(out.stem + ".raw.jsonl")))


@pytest.mark.parametrize("how", WAYS)
@pytest.mark.parametrize("name", TEMPLATES)
def test_one_stage_training_prompt_is_the_ids_eval_sends_in_one_stage_mode(name, how, tmp_path_factory, tmp_path):
    run = pipeline(name, how, tmp_path_factory)
    tok, cache = run.tok, tmp_path / "t1.jsonl"
    evals = [one_stage_eval(tok, how, tmp_path / f"e{k}.json", cache) for k in range(2)]
    assert evals[0].trial1 and not evals[1].trial1                       # the second from the trial-1 cache
    for ev in evals:
        assert ev.result["acc_t1"] == 0.0 and ev.result["acc_t2"] == 100.0
    for rec in run.d_plus:
        sent = [ev.sent[rec["id"]] for ev in evals]
        assert sent[0] == sent[1], where_they_differ(tok, sent[0], sent[1])
        raw = next(r for r in evals[0].raw if r["id"] == rec["id"])
        assert tok.decode(sent[0]) == raw["output"][1]["reason_prompt"]
        ex = example(tok, rec, "one-stage")
        assert ex.prompt == sent[0], where_they_differ(tok, ex.prompt, sent[0])
        # the prompt asks for what the target holds, and nothing contradicts it
        text = tok.decode(ex.prompt)
        assert NO_ANSWER not in text and NO_ANSWER in rec["test_reflection_prompt"]
        assert P.reflect_and_retry_request(TASK, rec) in text and "Action: Finish[<answer>]" in text
        second = strip_observation(rec["second_trial_reasoning"])
        assert ex.responses[0] == tok.encode(GOOD + "\n\n" + second, add_special_tokens=False) + [tok.eot_token_id]
        # what the one-stage model wrote at eval is its training target, split back into reflection and attempt
        assert raw["output"][1]["reflections"] == [GOOD] and raw["output"][1]["is_correct"]
        assert strip_observation(raw["output"][1]["scratchpad"]) == second


def test_prompt_overrides_reach_training_and_eval_alike(tmp_path_factory, tmp_path):
    run = pipeline("llama3", "canonical", tmp_path_factory)
    tok = run.tok
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps({"reflect_and_retry_request": "Say what went wrong, then answer anew.\n"
                                                             "Action: {answer_rule}"}))
    ev = one_stage_eval(tok, "canonical", tmp_path / "e.json", None, prompts=load_prompt_overrides(path))
    for rec in run.d_plus:
        got = example(tok, rec, "one-stage", prompts=str(path)).prompt
        assert got == ev.sent[rec["id"]], where_they_differ(tok, got, ev.sent[rec["id"]])
        assert "Say what went wrong" in tok.decode(got)
        assert example(tok, rec, "one-stage").prompt != got
    with pytest.raises(TrainError, match="--prompts .*unknown prompt"):
        path.write_text(json.dumps({"nope": "x"}))
        example(tok, run.d_plus[0], "one-stage", prompts=str(path))


def test_a_stored_prompt_of_other_prompts_is_an_error_not_another_prompt(tmp_path_factory):
    run = pipeline("llama3", "canonical", tmp_path_factory)
    rec = dict(run.d_plus[0])
    rec["test_reflection_prompt"] = rec["test_reflection_prompt"].replace("That answer was wrong.", "Wrong.")
    with pytest.raises(TrainError, match=r"f.jsonl:1: the one-stage prompt cannot be built: .*other --prompts"):
        example(run.tok, rec, "one-stage")


def test_official_records_get_the_plain_one_stage_prompt_in_their_answer_format(shared_data):
    path = shared_data / "reflectevo_examples" / "example_D+.jsonl"
    if not path.exists():
        pytest.skip(f"{path} not found")
    rec = json.loads(path.read_text().splitlines()[0])
    prompt, target = sft_texts(rec, "one-stage", "f")
    assert prompt == P.one_stage_prompt("brackets", rec, rec["first_trial_reasoning"])
    assert prompt.startswith("Question: " + rec["question"]) and rec["first_trial_reasoning"].strip() in prompt
    assert NO_ANSWER not in prompt and prompt.endswith(P.reflect_and_retry_request(TASK, rec))
    assert target.startswith(rec["reflections"].strip() + "\n\n") and "Finish[B]" in target
    math = dict(rec, first_trial_reasoning="Thought: 2x = 4\nAction: Finish<<<3>>>\nObservation: wrong")
    assert sft_texts(math, "one-stage", "f")[0].endswith(P.answer_rule("angles"))
    code = dict(rec, task="mbpp")
    assert sft_texts(code, "one-stage", "f")[0].endswith(P.answer_rule("code"))
    # --sft-prompt stored: the data-generation reflection prompt, as before (documented)
    assert sft_texts(rec, "one-stage", "f", "stored")[0] == rec["reflect_prompt"]


def test_records_without_question_fall_back_to_reflect_prompt_with_a_warning(capsys):
    from trainer_tiny import tiny_tokenizer

    recs = d_plus(2)
    (a, b), _ = tokenize_records(list(enumerate(recs, 1)), tiny_tokenizer(), cfg(mode="one-stage"), False, "f")
    err = capsys.readouterr().err
    assert "2 record(s) (first f:1)" in err and "reflect_prompt" in err
    assert sft_texts(recs[0], "one-stage", "f")[0] == recs[0]["reflect_prompt"]
