"""Regression tests for the data-side audit: resume and curation keyed on (id, question), hedged multiple-choice
answers, eval with a trial-2 adapter, the test-time reflection prompt in D+, bare actions, the MBPP main block,
a torn trial-1 cache, MATH choice letters and option blocks."""
import json

import pytest
from test_loop import ITEMS, FakeTokenizer, ScriptedEngine, is_reflection_request, is_trial2, make_loop, script_a

from reflectevo.cli import main
from reflectevo.data import get_task
from reflectevo.data.curate import curate_file, make_output, make_raw_record
from reflectevo.data.eval_run import run_eval
from reflectevo.data.jsonl import DataError, read_jsonl
from reflectevo.data.loop import LoopConfig, ReflectLoop
from reflectevo.data.math_equiv import is_equiv
from reflectevo.data.prompts import DEFAULT as P
from reflectevo.data.prompts import bare_answer, test_reflection_prompt
from reflectevo.data.sandbox import run_program
from reflectevo.data.verifiers import parse_choice, parse_options

Q = "Which is true?\nA. The cat is black.\nB. Dogs bark.\nC. Fish fly.\nD. None of the above."


# ------------------------------------------------------------------------------ 1. resume / curation by id + question
def _math_file(path, problems):
    path.write_text("".join(json.dumps({"problem": p, "solution": f"so \\boxed{{{i}}}"}) + "\n"
                            for i, p in enumerate(problems)))
    return path


def test_resume_refuses_an_id_with_another_question(tmp_path):
    task = get_task("math")
    part1 = task.load(_math_file(tmp_path / "p1.jsonl", ["What is 0+0?", "What is 0+1?"]))
    part2 = task.load(_math_file(tmp_path / "p2.jsonl", ["What is 5+5?", "What is 5+6?"]))
    assert [it["id"] for it in part1] == [it["id"] for it in part2] == [0, 1]  # line numbers: the ids collide
    out = tmp_path / "raw.jsonl"
    eng = ScriptedEngine(lambda p, sp: [" x\nAction: Finish<<<7>>>"] * sp.n)

    def loop():
        return ReflectLoop(task, eng, eng, FakeTokenizer(), LoopConfig(n_reflections=1), log=None)

    assert loop().run(part1, out)["questions"] == 2
    before = out.read_text()
    with pytest.raises(DataError, match=rf"{out}:1: id 0 is already there with another question"):
        loop().run(part2, out)
    assert out.read_text() == before
    assert loop().run(part1, out)["skipped_complete"] == 2  # the same questions are still a resume


def test_curation_refuses_colliding_ids_and_counts_true_duplicates(tmp_path):
    def rec(qid, question):
        return make_raw_record({"id": qid, "question": question, "answer": "1"}, [
            make_output(1, "2", "Thought: t\nAction: Finish[2]", False, "p1"),
            make_output(2, "1", "Thought: u\nAction: Finish[1]", True, "p2", reflection="fix it")])

    raw = tmp_path / "raw.jsonl"
    raw.write_text("".join(json.dumps(r) + "\n" for r in [rec(0, "q-a"), rec(0, "q-a"), rec(1, "q-b")]))
    counts = curate_file(raw, tmp_path / "cur", eval_fraction=0.0)
    assert counts["records"] == 2 and counts["duplicates"] == 1 and counts["d_plus"] == 2
    with open(raw, "a") as f:
        f.write(json.dumps(rec(1, "another question")) + "\n")
    with pytest.raises(DataError, match=rf"{raw}:4: id 1 is also on {raw}:3 with another question"):
        curate_file(raw, tmp_path / "cur2", eval_fraction=0.0)


# ------------------------------------------------------------------------------------------------ 2. parse_choice
@pytest.mark.parametrize("hedge", ["A or B", "A and C", "A, B, C or D", "a nice guess", "A dog", "(A) or (B)",
                                   "the answer is option A or B", "A. Dogs bark"])
def test_hedged_or_contradictory_choice_names_no_option(hedge):
    assert parse_choice(hedge, Q) is None
    assert not get_task("logiqa").check(hedge, {"question": Q, "answer": "a"})


@pytest.mark.parametrize("pred, letter", [
    ("(B)", "b"), ("[B]", "b"), ("B.", "b"), ("B)", "b"), ("Answer: (B)", "b"), ("the answer is B.", "b"),
    ("**B**", "b"), ("B. Dogs bark.", "b"), ("Dogs bark", "b"), ("Option B: Dogs bark", "b"), ("B is correct", "b"),
    ("B, because dogs bark", "b"), ("B - Dogs bark", "b"), ("B — dogs", "b"), ("a", "a"), ("A", "a"),
    ("A The cat is black.", "a"), ("The correct answer is option B.", "b"), ("None of the above", "d")])
def test_choice_forms_still_read(pred, letter):
    assert parse_choice(pred, Q) == letter


def test_choice_gold_and_option_texts_on_the_test_sets(shared_data):
    for name in ("logiqa", "bigbench"):
        task = get_task(name)
        for it in task.load(shared_data / "reflectevo_test" / f"{name}_test.jsonl"):
            assert task.check(it["answer"], it) and task.check(it["answer"].upper(), it)
            if it.get("kind", "mc") != "mc":
                continue
            for letter, text in parse_options(it["question"]).items():
                assert parse_choice(f"{letter.upper()}. {text}", it["question"]) == letter, (name, it["id"])


# ---------------------------------------------------------------------------------------- 3. eval --trial2-adapter
def test_eval_trial2_engine_answers_trial2_only(tmp_path):
    trial, refl, second = ScriptedEngine(script_a), ScriptedEngine(script_a), ScriptedEngine(script_a)
    cfg = LoopConfig(reasoning_source="base", reflection_source="base + R", trial2_source="base + C")
    cache = tmp_path / "t1.jsonl"
    res = run_eval(get_task("arithmetic"), ITEMS, trial, refl, FakeTokenizer(), tmp_path / "r.json", cfg,
                   trial1_cache=cache, log=None, trial2_engine=second)
    assert res["acc_t1"] == 25.0 and res["acc_t2"] == 75.0
    assert [len(c[0]) for c in trial.calls] == [4] and not any(is_trial2(p) for p in trial.calls[0][0])
    assert all(is_reflection_request(p) for c in refl.calls for p in c[0])
    assert second.calls and all(is_trial2(p) for c in second.calls for p in c[0])
    for rec in read_jsonl(tmp_path / "r.raw.jsonl"):
        assert rec["output"][0]["reasoning_source"] == "base"
        assert all(o["reasoning_source"] == "base + C" for o in rec["output"][1:])
    assert res["settings"]["trial2_source"] == "base + C"
    # trial 1 is shared with runs without a trial-2 adapter: it comes from the cache, no trial-1 call
    trial2 = ScriptedEngine(script_a)
    res2 = run_eval(get_task("arithmetic"), ITEMS, trial2, trial2, FakeTokenizer(), tmp_path / "r2.json",
                    LoopConfig(), trial1_cache=cache, log=None)
    assert res2["trial1_from_cache"] == 4
    assert all(is_trial2(p) or is_reflection_request(p) for c in trial2.calls for p in c[0])


def test_cli_trial2_adapter_checked_before_the_model_loads(tmp_path, capsys):
    code = main(["eval", "--task", "arithmetic", "--limit", "1", "--model", "/nonexistent/model",
                 "--trial2-adapter", str(tmp_path), "--out", str(tmp_path / "r.json")])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert code == 2 and len(err) == 1 and "--trial2-adapter" in err[0] and "adapter_config.json" in err[0]


# ------------------------------------------------------------------------------ 4. test-time reflection prompt in D+
def test_d_plus_carries_the_eval_reflection_prompt(tmp_path):
    task = get_task("arithmetic")
    make_loop(ScriptedEngine(script_a)).run(ITEMS, tmp_path / "raw.jsonl")
    curate_file(tmp_path / "raw.jsonl", tmp_path / "cur", eval_fraction=0.0)
    d_plus = read_jsonl(tmp_path / "cur" / "d_plus.jsonl")
    pairs = {r["id"]: r["reflection_prompt"] for r in read_jsonl(tmp_path / "cur" / "d_pm.jsonl")}
    eng = ScriptedEngine(script_a)
    run_eval(task, ITEMS, eng, eng, FakeTokenizer(), tmp_path / "res.json", LoopConfig(), log=None)
    at_eval = {r["id"]: r["output"][1]["reflection_prompt"] for r in read_jsonl(tmp_path / "res.raw.jsonl")
               if len(r["output"]) > 1}
    assert d_plus
    for rec in d_plus:
        assert rec["test_reflection_prompt"] == at_eval[rec["id"]] != rec["reflect_prompt"]
        assert rec["id"] not in pairs or pairs[rec["id"]] == rec["test_reflection_prompt"]
        # rebuilt from the official fields alone (question, first_trial_reasoning) with task and tokenizer
        official = {k: v for k, v in rec.items() if k != "test_reflection_prompt"}
        assert test_reflection_prompt(official, task, FakeTokenizer()) == rec["test_reflection_prompt"]
        assert test_reflection_prompt(rec) == rec["test_reflection_prompt"]
    # an official record and no tokenizer: the plain one-message form
    assert test_reflection_prompt(official).startswith(f"Question: {official['question']}")


# ------------------------------------------------------------------------------------------------- 5. bare actions
@pytest.mark.parametrize("text, answer", [(" dogs bark.\nAction: A", "A"), (" x\nAction: (A)", "(A)"),
                                          (" x\nAction: The answer is A.", "A"), (" x\nAction: **B**", "B")])
def test_action_without_finish_is_read(text, answer):
    trial = P.parse_trial(get_task("logiqa"), text)
    assert trial.answer == answer and trial.action == f"Finish[{answer}]"
    assert get_task("logiqa").check(trial.answer, {"question": Q, "answer": answer.strip("()").lower()})


def test_bare_answer_per_format():
    assert P.parse_trial(get_task("math"), " x\nAction: 1/2").answer == "1/2"
    assert P.parse_trial(get_task("arithmetic"), " x\nAction: So the answer is 12.").answer == "12"
    assert bare_answer("mbpp", "def f(): pass") is None and bare_answer("logiqa", "x" * 300) is None
    assert P.parse_trial(get_task("logiqa"), " no action here").answer is None


def test_empty_action_line_is_forced_after_its_label(tmp_path):
    def script(prompt, sp):
        if prompt.endswith("Action:"):
            return [" Finish[10]"]
        return [" 4 plus 6 is 10\nAction:" if "QUESTION-0" in prompt else " 4 and 7.\nAction: 11"]

    eng = ScriptedEngine(script)
    make_loop(eng).run(ITEMS[:2], tmp_path / "raw.jsonl")
    first, second = (r["output"][0] for r in read_jsonl(tmp_path / "raw.jsonl"))
    assert eng.calls[1][0] == [first["reason_prompt"] + " 4 plus 6 is 10\nAction:"]  # one forced action: Q0
    assert first["is_correct"] and first["generated_answer"] == "10"
    assert second["is_correct"] and second["generated_answer"] == "11" and second["error"] is None


# ------------------------------------------------------------------------------------------ 6. MBPP main block
@pytest.mark.parametrize("plain", [True, False])
def test_mbpp_main_block_is_not_run(plain, monkeypatch):
    if plain:
        monkeypatch.setenv("REFLECTEVO_SANDBOX", "plain")
    else:
        monkeypatch.delenv("REFLECTEVO_SANDBOX", raising=False)  # namespaces where this machine has them
    code = ("import pickle\nclass P:\n    pass\ndef f(x):\n    return 2 * x\n"
            "if __name__ == '__main__':\n    print(f(int(input())))\n    assert f(3) == 5\n")
    r = run_program(code, ["assert f(2) == 4", "assert __name__ != '__main__'",
                           "assert type(pickle.loads(pickle.dumps(P()))) is P"])
    assert r.passed, r.stderr


# ---------------------------------------------------------------------------------------- 7. trial-1 cache tail
def test_torn_trial1_cache_line_is_cut_and_lines_are_appended_per_chunk(tmp_path):
    task = get_task("arithmetic")
    cache = tmp_path / "t1.jsonl"

    class Killed(Exception):
        pass

    eng = ScriptedEngine(script_a)
    calls = {"n": 0}

    def reflect_then_die(prompts, params=None, **kw):
        calls["n"] += 1
        if calls["n"] == 2:  # the second chunk's reflections: killed mid-run
            raise Killed
        return eng.generate(prompts, params, **kw)

    dying = type("Dying", (), {"generate": staticmethod(reflect_then_die)})()
    with pytest.raises(Killed):
        run_eval(task, ITEMS, eng, dying, FakeTokenizer(), tmp_path / "a.json", LoopConfig(chunk_size=2),
                 trial1_cache=cache, log=None)
    assert [r["id"] for r in read_jsonl(cache)] == ["q0", "q1"]  # the first chunk's trial 1 is kept
    cache.write_text(cache.read_text()[:-40])  # and its last line torn, as a kill mid-append leaves it
    res = run_eval(task, ITEMS, eng, eng, FakeTokenizer(), tmp_path / "b.json", LoopConfig(chunk_size=2),
                   trial1_cache=cache, log=None)
    assert res["trial1_from_cache"] == 1 and res["acc_t1"] == 25.0 and res["acc_t2"] == 75.0
    assert [r["id"] for r in read_jsonl(cache)] == ["q0", "q1", "q2", "q3"]


# ------------------------------------------------------------------------------ 8. MATH letters, option blocks
def test_math_choice_letter_in_text_or_parentheses():
    assert is_equiv("E", "\\text{(E)}") and is_equiv("(C)", "\\textbf{(C)}") and is_equiv("\\text{(A)}", "A")
    assert not is_equiv("(A)", "(B)") and not is_equiv("E", "\\text{(F)}")


def test_options_are_the_last_block_not_dialogue_lines():
    dialogue = ("A: When can you begin?\nB: In <MASK>.\nA: Good.\nOptions:\nA. 40 years\nB. 3 days\nC. 3 years")
    assert parse_options(dialogue) == {"a": "40 years", "b": "3 days", "c": "3 years"}
    assert parse_choice("3 days", dialogue) == "b"
    no_header = "A: hello\nB: hi there\nA. first\nB. second"
    assert parse_options(no_header) == {"a": "first", "b": "second"}
    reordered = "Q?\nA.F\nC.J\nB.G\nD.N"
    assert parse_options(reordered) == {"a": "F", "c": "J", "b": "G", "d": "N"}
    assert parse_options("Q?\nA.A.B, and C are Kenyan.\nB. x")["a"] == "A.B, and C are Kenyan."
    assert parse_options("Q?\nA. A. twice\nB. B. again")["a"] == "twice"
