"""Official D+ / D± / Dpref records (the paper's released data, no stored test-time prompt) trained with the task
known (``--task``, or the record's own "task" field) train on the ids eval sends the trained model for the same
question and trial 1 (paper.md defect 4, "train/test prompt mismatches"), in every mode: one-stage, reflect,
correct and DPO; for LogiQA, MATH and MBPP records built like ../shared/data/reflectevo_examples/ and for those
sample files themselves (BIG-bench). Eval is driven by scripted engines in the tokenizer's ids whose trial 1 writes
the record's official trial-1 text, so eval's own prompt builders make the transcript and every later prompt.
Without a task such records keep today's prompts and one warning line says so; a field eval's prompt needs and
the record lacks is a one-line error naming file:line and the field."""
from __future__ import annotations

import argparse
import json
from types import SimpleNamespace

import pytest

from reflectevo.data import get_task
from reflectevo.data.eval_run import run_eval
from reflectevo.data.jsonl import read_jsonl
from reflectevo.data.loop import LoopConfig
from reflectevo.data.official import trial1_transcript
from reflectevo.data.prompts import DEFAULT as P
from reflectevo.trainer import TrainError
from reflectevo.trainer.data import tokenize_records
from test_prompt_parity_audit2 import pipeline, tokenizer, where_they_differ
from trainer_tiny import cfg

BIG = 1 << 20
OBS_WRONG, OBS_RIGHT = "\n\nObservation: Answer is INCORRECT", "\n\nObservation: Answer is CORRECT"
SOURCES = {   # task -> (item as in the official test file, the question of the official record, wrong / right actions)
    "logiqa": ({"id": 7, "question": "Every student of the class passed the exam. Kim is a student of the class.\n"
                "Which statement must be true?\nA.Kim failed the exam\nB.Kim passed the exam\nC.Kim did not take the "
                "exam\nD.Nobody passed", "answer": "b"}, None, "Finish[A]", "Finish[B]"),
    "math": ({"problem": "What is $2 + 3 \\cdot 4$?", "solution": "Multiply first: $2 + 12 = \\boxed{14}$."}, None,
             "Finish<<<20>>>", "Finish<<<14>>>"),
    "mbpp": ({"task_id": 11, "text": "Write a function to add two numbers.", "code": "def add(a, b):\n    return a + b",
              "test_list": ["assert add(1, 2) == 3", "assert add(2, 2) == 4"], "test_setup_code": ""},
             "Write a function to add two numbers.", "[BEGIN]\ndef add(a, b):\n    return a - b\n[END]",
             "[BEGIN]\ndef add(a, b):\n    return a + b\n[END]"),
}
REFLECTION = "1. **Error:** the attempt misread the task.\n\n2. **Plan:** read it again and check every step."
REJECTED = "1. The answer was probably fine.\n2. Try harder."
QUIET = (lambda msg: None)


def official_trial(thought: str, action: str, correct: bool) -> str:
    """A trial transcript as the official data writes it (blank lines, spaces before line breaks, its observation)."""
    return f"\nThought: \n\n{thought} \n\n\n\nAction: \n{action} \n" + (OBS_RIGHT if correct else OBS_WRONG)


def records(task: str, tmp_path):
    """(eval's item loaded from an official-format test file, a D+ record, a D± record) for ``task``."""
    source, question, wrong, right = SOURCES[task]
    path = tmp_path / f"{task}_test.jsonl"
    path.write_text(json.dumps(source) + "\n")
    (item,) = get_task(task).load(path)
    base = {"id": item["id"], "question": question or item["question"], "answer": item["answer"],
            "first_trial_reasoning": official_trial("I read it quickly and answer.", wrong, False),
            "first_trial_answer": "A"}
    d_plus = {**base, "second_trial_reasoning": official_trial("Now carefully, step by step.", right, True),
              "second_trial_answer": "B", "reflections": REFLECTION,
              "reason_prompt": ["In this task. You are required to solve a question ...", "... (END)\n"],
              "reflect_prompt": "You are an advanced reasoning agent ... Do not provide the answer directly."}
    d_pm = {**base, "second_trial_reasoning_chosen": d_plus["second_trial_reasoning"],
            "second_trial_reasoning_rejected": base["first_trial_reasoning"], "second_trial_answer_chosen": "B",
            "second_trial_answer_rejected": "A", "reflection_chosen": REFLECTION, "reflection_rejected": REJECTED,
            "reason_prompt": "In this task ...", "reflection_prompt": "Previous trial and your incorrect solution: ..."}
    if task == "mbpp":
        d_plus["test_list"] = d_pm["test_list"] = source["test_list"]
    return item, d_plus, d_pm


def after_thought(transcript: str) -> str:
    """What a model wrote after the opened "Thought:" (generation stops before "\\nObservation")."""
    return transcript.split("Thought:", 1)[1].split("\nObservation", 1)[0]


class Engine:
    """Scripted in the tokenizer's ids on official records (found by their question in the prompt): trial 1 writes
    the record's failed trial, the reflector its reflection (one-stage: + a blank line + the corrected trial), trial
    2 the corrected trial. ``calls``: (phase, record id, prompt ids)."""

    def __init__(self, tok, recs, one_stage=False):
        self.tok, self.recs, self.one_stage, self.calls = tok, recs, one_stage, []

    def generate(self, prompts, params=None, **kw):
        plist = params if isinstance(params, list) else [params] * len(prompts)
        outs = []
        for ids, sp in zip(prompts, plist):
            text = self.tok.decode(ids)
            rec = next(r for r in self.recs if r["question"] in text)
            refl = rec.get("reflections") or rec.get("reflection_chosen")
            second = rec.get("second_trial_reasoning") or rec.get("second_trial_reasoning_chosen")
            if sp.temperature > 0:
                phase = "one-stage" if self.one_stage else "reflect"
                reply = refl + "\n\n" + second.strip().split("\nObservation")[0] if self.one_stage else refl
            elif P.retry_request(rec) in text:
                phase, reply = "trial2", after_thought(second)
            else:
                phase, reply = "trial1", after_thought(rec["first_trial_reasoning"])
            self.calls.append((phase, rec["id"], list(ids)))
            ids_out = self.tok.encode(reply, add_special_tokens=False) + [self.tok.eot_token_id]
            outs.append([SimpleNamespace(text=reply, token_ids=ids_out, finish_reason="stop")])
        return outs

    def sent(self, phase):
        return {rid: ids for p, rid, ids in self.calls if p == phase}


def eval_sends(tok, task, items, recs, tmp_path):
    """The ids eval sends the trained model per record id: two-stage (reflect, trial2) and one-stage; + raw records."""
    trial, reflector = Engine(tok, recs), Engine(tok, recs)
    run_eval(task, items, trial, reflector, tok, tmp_path / "two.json", LoopConfig(), log=QUIET)
    trial1, model = Engine(tok, recs), Engine(tok, recs, one_stage=True)
    run_eval(task, items, trial1, model, tok, tmp_path / "one.json", LoopConfig(reflector_mode="one-stage"), log=QUIET)
    assert not trial1.sent("trial2") and not model.sent("reflect")
    sent = {"reflect": reflector.sent("reflect"), "trial2": trial.sent("trial2"), "one-stage": model.sent("one-stage")}
    return sent, read_jsonl(tmp_path / "two.raw.jsonl")


def prompt_ids(tok, rec, mode, **kw):
    """The training example's prompt ids (mode None: DPO)."""
    (ex,), _ = tokenize_records([(1, rec)], tok, cfg(mode=mode or "one-stage", max_length=BIG, **kw), mode is None,
                                "f.jsonl")
    return ex.prompt


PHASES = (("one-stage", "one-stage"), ("reflect", "reflect"), ("correct", "trial2"))


# ------------------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("name", ["smollm2", "llama3", "mistral"])
@pytest.mark.parametrize("task_name", ["logiqa", "math", "mbpp"])
def test_official_records_with_task_train_on_the_ids_eval_sends(task_name, name, tmp_path):
    tok, task = tokenizer(name), get_task(task_name)
    item, d_plus, d_pm = records(task_name, tmp_path)
    sent, raw = eval_sends(tok, task, [item], [d_plus], tmp_path)
    # eval's transcript of that trial 1 is the one built from the official text (our observation, not theirs)
    assert raw[0]["output"][0]["scratchpad"] == trial1_transcript(task, d_plus)
    assert "INCORRECT" not in raw[0]["output"][0]["scratchpad"] and not raw[0]["output"][0]["is_correct"]
    for mode, phase in PHASES:
        got, want = prompt_ids(tok, d_plus, mode, task=task_name), sent[phase][item["id"]]
        assert got == want, f"{mode}: " + where_they_differ(tok, got, want)
    got = prompt_ids(tok, d_pm, None, task=task_name)
    assert got == sent["reflect"][item["id"]], "dpo: " + where_they_differ(tok, got, sent["reflect"][item["id"]])
    if task_name == "mbpp":   # the record's question is the description only: eval's shows the asserts too
        assert "assert add(1, 2) == 3" in tok.decode(got) and "assert" not in d_plus["question"]


@pytest.mark.parametrize("name", ["smollm2", "mistral"])
def test_the_official_sample_files_train_on_the_ids_eval_sends(name, shared_data, tmp_path):
    folder = shared_data / "reflectevo_examples"
    files = {k: folder / f"example_{k}.jsonl" for k in ("D+", "D+-", "Dpref")}
    if not all(p.exists() for p in files.values()):
        pytest.skip(f"official sample files not found in {folder}")
    tok, task = tokenizer(name), get_task("bigbench")
    for kind, path in files.items():
        recs = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        questions = list(dict.fromkeys(r["question"] for r in recs))
        test = tmp_path / f"{kind}_test.jsonl"
        test.write_text("".join(json.dumps({"question": q, "answer": next(r["answer"] for r in recs
                                                                          if r["question"] == q)}) + "\n"
                                for q in questions))
        items = task.load(test)
        # eval's records are keyed by the item's id: find the item of each record by its question
        item_of = {q: it["id"] for q, it in zip(questions, items)}
        sent, raw = eval_sends(tok, task, items, [{**r, "id": item_of[r["question"]]} for r in recs],
                               tmp_path / kind.replace("+", "p").replace("-", "m"))
        assert all(not r["output"][0]["is_correct"] for r in raw)
        for line, rec in enumerate(recs, 1):
            qid = item_of[rec["question"]]
            if kind == "D+":
                for mode, phase in PHASES:
                    (ex,), _ = tokenize_records([(line, rec)], tok, cfg(mode=mode, max_length=BIG, task="bigbench"),
                                                False, str(path))
                    assert ex.prompt == sent[phase][qid], f"{path}:{line} {mode}: " + \
                        where_they_differ(tok, ex.prompt, sent[phase][qid])
            else:
                (ex,), _ = tokenize_records([(line, rec)], tok, cfg(max_length=BIG, task="bigbench"), True, str(path))
                assert ex.prompt == sent["reflect"][qid], f"{path}:{line} dpo: " + \
                    where_they_differ(tok, ex.prompt, sent["reflect"][qid])


def test_the_records_task_field_stands_for_the_option(tmp_path):
    tok = tokenizer("llama3")
    _, d_plus, d_pm = records("math", tmp_path)
    for mode in ("one-stage", "reflect", "correct", None):
        rec = d_plus if mode else d_pm
        want = prompt_ids(tok, rec, mode, task="math")
        assert prompt_ids(tok, {**rec, "task": "math"}, mode) == want
        assert prompt_ids(tok, {**rec, "task": "logiqa"}, mode, task="math") == want     # the option wins
        assert prompt_ids(tok, {**rec, "task": "logiqa"}, mode) != want
    with pytest.raises(TrainError, match=r"^f.jsonl:1: field 'task': unknown task 'chess'"):
        prompt_ids(tok, {**d_plus, "task": "chess"}, "reflect")


# ------------------------------------------------------------------------------------------------- without a task
def test_without_a_task_the_prompts_stay_and_one_line_says_to_pass_task(tmp_path, capsys):
    tok = tokenizer("llama3")
    _, d_plus, d_pm = records("logiqa", tmp_path)
    plain = {"reflect": P.test_reflection_prompt(d_plus, d_plus["first_trial_reasoning"]),
             "one-stage": P.one_stage_prompt("brackets", d_plus, d_plus["first_trial_reasoning"]),
             "correct": d_plus["reason_prompt"][1], None: d_pm["reflection_prompt"]}
    for mode, text in plain.items():
        rec = d_plus if mode else d_pm
        recs = [(k, {**rec, "id": k}) for k in (1, 2, 3)]
        examples, _ = tokenize_records(recs, tok, cfg(mode=mode or "one-stage", max_length=BIG), mode is None,
                                       "f.jsonl")
        want = tok.encode(tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True),
                          add_special_tokens=False)
        assert all(ex.prompt == want for ex in examples), mode
        lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
        assert len(lines) == 1 and "3 record(s) (first f.jsonl:1)" in lines[0] and "--task" in lines[0], lines
        assert "differ from the conversation eval sends" in lines[0]
    # one line per run: the held-out records of the same run do not repeat it
    from reflectevo.trainer.sft import prepare_examples

    train, evals = prepare_examples(tok, [{**d_plus, "id": k} for k in range(8)],
                                    cfg(mode="reflect", max_length=BIG, eval_fraction=0.5), False)
    assert train and evals
    assert len([ln for ln in capsys.readouterr().err.splitlines() if "--task" in ln]) == 1


def test_records_that_store_evals_prompts_are_unchanged_by_task_and_warn_nothing(tmp_path_factory, capsys):
    run = pipeline("llama3", "canonical", tmp_path_factory)
    for rec, pair in zip(run.d_plus, run.d_pm):
        for mode in ("one-stage", "reflect", "correct"):
            assert prompt_ids(run.tok, rec, mode, task="arithmetic") == prompt_ids(run.tok, rec, mode)
        assert prompt_ids(run.tok, pair, None, task="arithmetic") == prompt_ids(run.tok, pair, None)
    assert "--task" not in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------- missing fields
def test_a_field_evals_prompt_needs_is_a_one_line_error_naming_file_line_and_field(tmp_path):
    tok = tokenizer("llama3")
    item, d_plus, d_pm = records("mbpp", tmp_path)
    for mode in ("one-stage", "reflect", "correct", None):
        rec = {k: v for k, v in (d_plus if mode else d_pm).items() if k != "test_list"}
        with pytest.raises(TrainError, match=r"^f.jsonl:1: missing field 'test_list'") as e:
            prompt_ids(tok, rec, mode, task="mbpp")
        assert "\n" not in str(e.value)
        # a question that already shows the asserts (eval's item question, as our records keep it) needs none
        assert prompt_ids(tok, {**rec, "question": item["question"]}, mode, task="mbpp") == \
            prompt_ids(tok, d_plus if mode else d_pm, mode, task="mbpp")
    rec = {k: v for k, v in d_plus.items() if k != "first_trial_reasoning"}
    with pytest.raises(TrainError, match=r"^f.jsonl:1: missing field 'first_trial_reasoning'"):
        prompt_ids(tok, rec, "reflect", task="mbpp")
    with pytest.raises(TrainError, match=r"^f.jsonl:1: missing field 'question'"):
        prompt_ids(tok, {k: v for k, v in d_plus.items() if k != "question"}, "correct", task="logiqa")


# ------------------------------------------------------------------------------------------------- the option
@pytest.mark.parametrize("dpo", [False, True])
def test_sft_and_dpo_take_task_with_the_task_names(dpo, tmp_path):
    from reflectevo.data.tasks import TASKS
    from reflectevo.trainer.cli_args import add_train_args, config_from_args

    parser = add_train_args(argparse.ArgumentParser(), dpo)
    base = ["--data", str(tmp_path / "d.jsonl"), "--out", str(tmp_path / "run")]
    assert config_from_args(parser.parse_args(base), dpo).task is None
    for name in TASKS:
        assert config_from_args(parser.parse_args(base + ["--task", name]), dpo).task == name
    with pytest.raises(SystemExit):
        parser.parse_args(base + ["--task", "chess"])


def test_dpo_takes_prompts_and_builds_the_pair_prompt_with_them(tmp_path):
    """`reflectevo dpo --prompts F`: an official pair's prompt (built with --task) uses F's test-time request."""
    from reflectevo.trainer.cli_args import add_train_args, config_from_args

    override = tmp_path / "prompts.json"
    override.write_text(json.dumps({"reflection_request_test": "Say plainly why it failed: {question}"}))
    parser = add_train_args(argparse.ArgumentParser(), True)
    args = parser.parse_args(["--data", str(tmp_path / "d.jsonl"), "--out", str(tmp_path / "run"),
                              "--prompts", str(override), "--task", "logiqa"])
    assert config_from_args(args, True).prompts == str(override)
    tok = tokenizer("smollm2")
    _, _, d_pm = records("logiqa", tmp_path)
    ours = tok.decode(prompt_ids(tok, d_pm, None, task="logiqa", prompts=str(override)))
    default = tok.decode(prompt_ids(tok, d_pm, None, task="logiqa"))
    assert "Say plainly why it failed:" in ours and "Say plainly why it failed:" not in default
