"""JSONL I/O, tasks, instruction pool, prompts, curation and evaluation metrics."""
import json
import os
import random

import pytest

from reflectevo.data import (DEMANDS, TASKS, DataError, Prompts, append_jsonl, completed_ids, curate_file,
                             curate_records, evaluate_file, evaluate_records, format_table, get_task,
                             load_prompt_overrides, parse_demand, read_jsonl, sample_demand, split_of,
                             write_jsonl_atomic)
from reflectevo.data.prompts import DEFAULT as P

# ---------------------------------------------------------------------------------------------- JSONL


def test_read_jsonl_errors_name_file_and_line(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"id": 1, "question": "q"}\n{"id": 2, "question": \n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: malformed JSON"):
        read_jsonl(f)
    f.write_text('{"id": 1, "question": "q"}\n\n{"id": 2}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:3: missing field 'question'"):
        read_jsonl(f, required_fields=("id", "question"))
    f.write_text('[1, 2]\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:1: expected a JSON object"):
        read_jsonl(f)
    with pytest.raises(DataError, match="file not found"):
        read_jsonl(tmp_path / "missing.jsonl")
    for err in (DataError("x"),):
        assert isinstance(err, ValueError)


def test_append_atomic_and_resume_after_torn_line(tmp_path):
    f = tmp_path / "raw.jsonl"
    assert completed_ids(f) == set()
    append_jsonl(f, {"id": 1, "text": "line\nbreak"})
    append_jsonl(f, {"id": 2}, fsync=True)
    with open(f, "a") as fh:
        fh.write('{"id": 3, "tex')  # a run killed mid-write
    assert completed_ids(f) == {1, 2}
    append_jsonl(f, {"id": 3})
    assert [r["id"] for r in read_jsonl(f)] == [1, 2, 3]
    # a garbage last line that does end with a newline is cut too
    with open(f, "a") as fh:
        fh.write('{"id": 4,\n')
    assert completed_ids(f) == {1, 2, 3}
    assert read_jsonl(f)[-1] == {"id": 3}
    with open(f, "a") as fh:
        fh.write('{"id": 5}')  # complete record, newline missing: kept and terminated
    assert completed_ids(f) == {1, 2, 3, 5}
    append_jsonl(f, {"id": 6})
    assert [r["id"] for r in read_jsonl(f)] == [1, 2, 3, 5, 6]
    out = tmp_path / "sub" / "atomic.jsonl"
    assert write_jsonl_atomic(out, [{"a": 1}, {"a": 2}]) == 2
    assert read_jsonl(out) == [{"a": 1}, {"a": 2}]
    assert os.listdir(out.parent) == ["atomic.jsonl"]


def test_completed_ids_rejects_corruption_in_the_middle(tmp_path):
    f = tmp_path / "raw.jsonl"
    f.write_text('{"id": 1}\nnot json\n{"id": 3}\n')
    with pytest.raises(DataError, match=r"raw\.jsonl:2"):
        completed_ids(f)

# ---------------------------------------------------------------------------------------------- tasks


def test_get_task_errors():
    with pytest.raises(DataError, match="unknown task 'squad'; known tasks: logiqa, math, mbpp, bigbench, "
                                        "bigbench-free, arithmetic"):
        get_task("squad")
    assert set(TASKS) == {"logiqa", "math", "mbpp", "bigbench", "bigbench-free", "arithmetic"}
    for name in ("logiqa", "math", "mbpp", "bigbench", "bigbench-free"):
        with pytest.raises(DataError, match="needs a data file"):
            get_task(name).load()


def test_arithmetic_family():
    easy = get_task("arithmetic", difficulty=1, seed=3).load(limit=50)
    assert len(easy) == 50 and len({it["id"] for it in easy}) == 50
    assert easy == get_task("arithmetic", difficulty=1, seed=3, size=50).load()  # deterministic
    assert easy[:5] == get_task("arithmetic", difficulty=1, seed=3).load(limit=5)
    assert easy != get_task("arithmetic", difficulty=1, seed=4).load(limit=50)
    for it in easy:
        assert len(it["steps"]) == 2 and 0 <= int(it["answer"]) <= 18
        assert all(int(s.split()[-1]) <= 9 for s in it["steps"])
        assert eval(" ".join(it["steps"])) == int(it["answer"])  # the steps reproduce the answer
    task = get_task("arithmetic")
    assert task.check(easy[0]["answer"], easy[0]) and not task.check(str(int(easy[0]["answer"]) + 1), easy[0])
    hard = get_task("arithmetic", difficulty=4, seed=0).load(limit=30)
    for it in hard:
        value = int(it["steps"][0])
        for step in it["steps"][1:]:
            op, x = step.split()
            if op == "/":
                assert value % int(x) == 0
            value = {"+": value + int(x), "-": value - int(x), "*": value * int(x), "/": value // max(1, int(x))}[op]
            assert value >= 0
        assert value == int(it["answer"])
    with pytest.raises(DataError):
        get_task("arithmetic", difficulty=0)


def test_file_tasks_normalise_and_check(tmp_path):
    f = tmp_path / "logiqa.jsonl"
    f.write_text(json.dumps({"id": 7, "question": "Q?\nA.x\nB.y", "answer": "B "}) + "\n")
    (item,) = get_task("logiqa").load(f)
    assert item["id"] == 7 and item["answer"] == "b" and get_task("logiqa").check("(B)", item)
    f.write_text("".join(json.dumps({"id": 1, "question": "q", "answer": "a"}) + "\n" for _ in range(2)))
    with pytest.raises(DataError, match=r"logiqa\.jsonl:2: duplicate id 1"):
        get_task("logiqa").load(f)
    m = tmp_path / "math.jsonl"
    m.write_text(json.dumps({"problem": "p", "solution": "so $\\boxed{\\frac{1}{2}}$"}) + "\n"
                 + json.dumps({"problem": "p2", "solution": "no box"}) + "\n")
    with pytest.raises(DataError, match=r"math\.jsonl:2: no \\boxed"):
        get_task("math").load(m)
    assert get_task("math").load(m, limit=0) == []
    with pytest.raises(DataError, match="limit"):
        get_task("math").load(m, limit=-1)
    (mi,) = get_task("math").load(m, limit=1)
    assert mi["question"] == "p" and mi["answer"] == "\\frac{1}{2}" and get_task("math").check("0.5", mi)
    b = tmp_path / "bb.jsonl"
    b.write_text(json.dumps({"id": 5, "question": "Claim?\nOptions:\nA. True\nB. False", "answer": "a"}) + "\n"
                 + json.dumps({"question": "Text.\n\nQuestion: Who?", "answer": "The court"}) + "\n")
    items = get_task("bigbench").load(b)
    assert [it["kind"] for it in items] == ["mc", "free"] and items[0]["source_id"] == 5
    assert [it["id"] for it in items] == [0, 1]
    bb = get_task("bigbench")
    assert bb.check("A. True", items[0]) and bb.check("True", items[0]) and not bb.check("B", items[0])
    assert bb.check("the Court.", items[1]) and not bb.check("court house", items[1])
    assert bb.score("court house", items[1]) == pytest.approx(2 / 3)
    free = get_task("bigbench-free").load(b)
    assert [it["id"] for it in free] == [1]


def test_mbpp_task_in_sandbox(tmp_path):
    f = tmp_path / "mbpp.jsonl"
    rec = {"text": "Add two numbers.", "code": "def add(a, b):\n    return a + b", "task_id": 3,
           "test_setup_code": "", "test_list": ["assert add(1, 2) == 3"], "challenge_test_list": []}
    f.write_text(json.dumps(rec) + "\n")
    task = get_task("mbpp")
    (item,) = task.load(f)
    assert item["id"] == 3 and "assert add(1, 2) == 3" in item["question"]
    assert task.check(item["answer"], item)
    assert task.check_many([item["answer"], "def add(a, b):\n    return a", None], [item] * 3) == [True, False, False]

# ---------------------------------------------------------------------------------------------- demands/prompts


def test_instruction_pool():
    assert len(DEMANDS) == 32 and len(set(DEMANDS.values())) == 32
    assert parse_demand(None).key == "1-1-1" and parse_demand("2-8-2").key == "2-8-2"
    for bad in ("3-1-1", "1-9-1", "1-1", "x", "1-1-3"):
        with pytest.raises(DataError, match="a-b-c"):
            parse_demand(bad)
    keys = [sample_demand(random.Random(0)).key for _ in range(3)]
    assert len(set(keys)) == 1
    rng = random.Random(1)
    assert len({sample_demand(rng).key for _ in range(400)}) == 32
    assert "calculation" in parse_demand("1-1-1").text and "high-level" in parse_demand("1-1-1").text
    assert "low-level" in parse_demand("2-7-2").text and "quickly" in parse_demand("2-7-2").text


@pytest.mark.parametrize("name,action", [("logiqa", "Finish[B]"), ("math", "Finish<<<\\frac{1}{2}>>>"),
                                         ("mbpp", "[BEGIN]\ndef f():\n    return 1\n[END]"),
                                         ("bigbench", "Finish[C]"), ("bigbench-free", "Finish[the soup]"),
                                         ("arithmetic", "Finish[11]")])
def test_trial_prompts_share_prefix_and_show_format(name, action):
    task = get_task(name)
    a, b = P.trial_prompt(task, {"question": "first?"}), P.trial_prompt(task, {"question": "second?"})
    prefix = P.prefix(task)
    assert a.startswith(prefix) and b.startswith(prefix) and len(prefix) > 200
    assert a.endswith("first?") and action.split("\n")[0].split("[")[0].split("<")[0] in prefix
    assert prefix.count("Question:") >= 2 and prefix.count("Action:") >= 3
    trial = P.parse_trial(task, "Thought: think hard\n" + "Action: " + action + "\nObservation: whatever")
    assert trial.thought == "think hard" and trial.action == action and trial.answer is not None
    transcript = P.transcript(trial, False)
    assert transcript.startswith("Thought: think hard\nAction: ") and transcript.endswith(P.templates[
        "observation_incorrect"])
    # one conversation: trial prompt, trial-1 transcript, reflection request, reflection, retry request
    item = {"question": "first?"}
    refl = P.reflection_messages(task, item, transcript, "1-1-1")
    t2 = P.trial2_messages(item, refl, " Look at step 2.\n")
    assert [m["role"] for m in t2] == ["user", "assistant", "user", "assistant", "user"] and t2[:3] == refl
    assert t2[0]["content"] == a and t2[1]["content"] == transcript and t2[3]["content"] == "Look at step 2."
    assert t2[4]["content"] == P.retry_request(item) and t2[2]["content"] == P.reflection_request(item, "1-1-1")
    flat = P.trial2_prompt(task, item, "Look at step 2.", transcript)   # records without a conversation
    assert flat.startswith(a) and flat.index(transcript) < flat.index("Look at step 2.") < flat.index(t2[4]["content"])


def test_parse_trial_is_lenient():
    math = get_task("math")
    t = P.parse_trial(math, " x is 2 so Finish<<<2>>>")
    assert t.answer == "2" and t.action == "Finish<<<2>>>"
    t = P.parse_trial(get_task("logiqa"), "I cannot decide.")
    assert t.answer is None and t.action == "" and t.thought == "I cannot decide."
    t = P.parse_trial(get_task("mbpp"), "Plan.\n[BEGIN]\ndef g():\n    return 2\n")
    assert t.answer == "def g():\n    return 2" and t.action.endswith("[END]")
    assert P.transcript(t, True).endswith(P.templates["observation_correct"])
    assert P.templates["observation_correct"] != P.templates["observation_incorrect"]


def test_reflection_prompts():
    task = get_task("arithmetic")
    item = {"question": "What is 2+2?", "answer": "4"}
    tr = "Thought: 2+2=5\nAction: Finish[5]\nObservation: The answer is wrong."
    data = P.reflection_messages(task, item, tr, "1-5-2")
    assert data == P.trial_messages(task, item) + [{"role": "assistant", "content": tr},
                                                   {"role": "user", "content": P.reflection_request(item, "1-5-2")}]
    request = data[-1]["content"]
    assert parse_demand("1-5-2").text in request and "100 words" in request and "wrong" in request
    test = P.test_reflection_messages(task, item, tr)
    assert test[:2] == data[:2] and test[2]["content"] == P.test_reflection_request(item)
    assert len(test[2]["content"]) < len(request) and parse_demand("1-5-2").text not in test[2]["content"]
    assert P.reflection_messages(task, item, tr)[-1]["content"] == P.reflection_request(item, "1-1-1")
    flat = P.test_reflection_prompt(item, tr)   # records without a rendered conversation
    assert "What is 2+2?" in flat and tr in flat and flat.endswith(P.test_reflection_request(item))


def test_prompt_overrides(tmp_path):
    f = tmp_path / "p.json"
    f.write_text(json.dumps({"reflection_request_test": "Q={question} {not_a_placeholder} \\frac{1}{2}",
                             "retry_request": "Again: {question}",
                             "examples_logiqa": "Question: x\nThought: y\nAction: Finish[A]"}))
    p = load_prompt_overrides(f)
    assert p.test_reflection_request({"question": "q"}) == "Q=q {not_a_placeholder} \\frac{1}{2}"
    assert p.trial2_messages({"question": "q"}, [], "r")[-1]["content"] == "Again: q"
    assert "Question: x\nThought: y" in p.trial_prompt(get_task("logiqa"), {"question": "z"})
    assert isinstance(p, Prompts) and P.test_reflection_request({"question": "q"}) != "Q=q"
    f.write_text(json.dumps({"reflection_tset": "x"}))
    with pytest.raises(DataError, match="unknown prompt 'reflection_tset'"):
        load_prompt_overrides(f)
    f.write_text(json.dumps({"reflection_request_test": "{demand}"}))
    with pytest.raises(DataError, match="placeholder"):
        load_prompt_overrides(f)
    f.write_text(json.dumps({"retry_request": "Reflection: {reflection}"}))   # an earlier turn now
    with pytest.raises(DataError, match=r"'retry_request' uses placeholder\(s\) \['reflection'\].*earlier turn"):
        load_prompt_overrides(f)
    f.write_text(json.dumps({"trial2": "{question} {reflection} {transcript}"}))   # the single-turn layout
    with pytest.raises(DataError, match="'trial2' belongs to the older single-turn layout.*'retry_request'"):
        load_prompt_overrides(f)
    f.write_text(json.dumps({"trial": "no question here"}))
    with pytest.raises(DataError, match="must contain"):
        load_prompt_overrides(f)
    f.write_text("{bad json")
    with pytest.raises(DataError, match=r"p\.json:1: malformed JSON"):
        load_prompt_overrides(f)

# ---------------------------------------------------------------------------------------------- curation/eval


def _out(answer, correct, trial, reflection=None, reasoning=None):
    return {"generated_answer": answer, "reflections": [reflection] if reflection else [],
            "scratchpad": reasoning or f"Thought: t\nAction: Finish[{answer}]", "is_correct": correct,
            "error": "", "trail": trial, "reasoning_source": "m", "reflection_source": "m",
            "reason_prompt": f"prompt-{trial}-{answer}", "reflection_prompt": "reflect-prompt" if trial == 2 else ""}


def _raw_records():
    return [
        {"id": "q1", "question": "Which? A.x B.y", "answer": "b",
         "output": [_out("A", False, 1), _out("B", True, 2, "Reflection one about option y and the rule."),
                    _out("A", False, 2, "Reflection two, still wrong."),
                    _out("B", True, 2, "Reflection three, also leads to the right option y, longer text here.")]},
        {"id": "q2", "question": "2+2?", "answer": "4", "output": [_out("4", True, 1)]},
        {"id": "q3", "question": "3+3?", "answer": "6",
         "output": [_out("5", False, 1), _out("7", False, 2, "r1"), _out("8", False, 2, "r2")]},
        {"id": "q4", "question": "4+4?", "answer": "8",
         "output": [_out("9", False, 1), _out("8", True, 2, "same"), _out("8", True, 2, "same")]},
    ]


D_PLUS_KEYS = {"id", "question", "answer", "first_trial_reasoning", "first_trial_answer", "second_trial_reasoning",
               "second_trial_answer", "reflections", "reason_prompt", "reflect_prompt"}
PAIR_KEYS = {"id", "question", "answer", "first_trial_reasoning", "first_trial_answer",
             "second_trial_reasoning_chosen", "second_trial_reasoning_rejected", "second_trial_answer_chosen",
             "second_trial_answer_rejected", "reflection_chosen", "reflection_rejected", "reason_prompt",
             "reflection_prompt"}


def test_curation_synthetic(tmp_path):
    calls = []

    def judge(item, a, b):
        calls.append((item["id"], a, b))
        return 1  # prefer the second

    sets, counts = curate_records(_raw_records(), eval_fraction=0.0, judge=judge)
    assert counts["records"] == 4 and counts["trial1_wrong"] == 3 and counts["trial1_correct"] == 1
    assert (counts["d_plus"], counts["d_pm"], counts["d_pref"]) == (3, 2, 1)  # q4's twin reflections count once
    assert all(set(r) == D_PLUS_KEYS | {"test_reflection_prompt"} for r in sets["d_plus"])  # + one field of ours
    assert all(set(r) == PAIR_KEYS for r in sets["d_pm"] + sets["d_pref"])
    first = sets["d_plus"][0]
    assert first["reason_prompt"] == ["prompt-1-A", "prompt-2-B"] and first["reflect_prompt"] == "reflect-prompt"
    assert first["reflections"].startswith("Reflection one")
    assert {r["reflection_rejected"] for r in sets["d_pm"]} == {"Reflection two, still wrong."}
    assert all(r["second_trial_answer_chosen"] == "B" and r["second_trial_answer_rejected"] == "A"
               for r in sets["d_pm"])
    (pref,) = sets["d_pref"]
    assert len(calls) == 1 and pref["reflection_chosen"].startswith("Reflection three")
    # the pair prompt is the test-time reflection prompt on the trial-1 transcript
    assert pref["reflection_prompt"] == P.test_reflection_prompt(_raw_records()[0], first["first_trial_reasoning"])
    assert pref["reason_prompt"] == "prompt-1-A"
    from reflectevo.data.prompts import test_time_reflection_prompt
    assert test_time_reflection_prompt(pref) == pref["reflection_prompt"]
    assert test_time_reflection_prompt(_raw_records()[0]) == pref["reflection_prompt"]
    stored = [dict(r, test_reflection_prompt=f"<rendered test conversation {r['id']}>") for r in _raw_records()]
    loop_sets, _ = curate_records(stored, eval_fraction=0.0)   # raw records of our loop carry it rendered
    assert {r["reflection_prompt"] for r in loop_sets["d_pm"] + loop_sets["d_pref"]} == {
        "<rendered test conversation q1>"}
    assert test_time_reflection_prompt(stored[0]) == "<rendered test conversation q1>"
    raw_sets, _ = curate_records(_raw_records(), eval_fraction=0.0, pair_prompt="raw")
    assert raw_sets["d_pm"][0]["reflection_prompt"] == "reflect-prompt"
    assert len(raw_sets["d_pref"]) == 1  # the heuristic picks one order


def test_raw_record_builders_round_trip():
    from reflectevo.data.curate import make_output, make_raw_record
    item = {"id": 5, "question": "2+3?", "answer": "5", "test_list": ["assert True"]}
    outs = [make_output(1, "6", "Thought: a\nAction: Finish[6]", False, "p1"),
            make_output(2, "5", "Thought: b\nAction: Finish[5]", True, "p2", "add again", "rp"),
            make_output(2, None, "Thought: c\nAction:", False, "p3", "guess", "rp")]
    rec = make_raw_record(item, outs)
    assert list(rec) == ["id", "question", "answer", "test_list", "output"]
    assert set(outs[0]) == {"generated_answer", "reflections", "scratchpad", "is_correct", "error", "trail",
                            "reasoning_source", "reflection_source", "reason_prompt", "reflection_prompt"}
    sets, counts = curate_records([json.loads(json.dumps(rec))], eval_fraction=0.0)
    assert (counts["d_plus"], counts["d_pm"], counts["d_pref"]) == (1, 1, 0)
    assert sets["d_plus"][0]["reason_prompt"] == ["p1", "p2"] and sets["d_pm"][0]["reflection_rejected"] == "guess"
    with pytest.raises(DataError):
        make_output(3, "x", "t", True, "p")


def test_curate_file_split_and_errors(tmp_path):
    raw = tmp_path / "raw.jsonl"
    many = []
    for i in range(40):
        rec = _raw_records()[0]
        rec["id"] = i
        many.append(rec)
    write_jsonl_atomic(raw, many)
    counts = curate_file(raw, tmp_path / "out", eval_fraction=0.25)
    files = sorted(os.listdir(tmp_path / "out"))
    assert files == sorted(f"{n}{s}.jsonl" for n in ("d_plus", "d_pm", "d_pref") for s in ("", ".eval"))
    n_eval = sum(split_of(i, 0.25) == "eval" for i in range(40))
    assert 0 < n_eval < 40
    assert counts["d_plus.eval"] == 2 * n_eval and counts["d_plus"] == 2 * (40 - n_eval)
    assert len(read_jsonl(tmp_path / "out" / "d_pm.eval.jsonl")) == 2 * n_eval
    eval_ids = {r["id"] for r in read_jsonl(tmp_path / "out" / "d_plus.eval.jsonl")}
    train_ids = {r["id"] for r in read_jsonl(tmp_path / "out" / "d_plus.jsonl")}
    assert not eval_ids & train_ids
    assert curate_file(raw, tmp_path / "out2", eval_fraction=0.25) == counts  # deterministic
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(many[0]) + "\n" + json.dumps({"id": 9, "question": "q", "answer": "a"}) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:2: missing field 'output'"):
        curate_file(bad, tmp_path / "out3")


def test_evaluate_hand_computed():
    recs = [
        {"id": 1, "question": "q", "answer": "a", "output": [_out("a", True, 1)]},
        {"id": 2, "question": "q", "answer": "a", "output": [_out("b", False, 1), _out("a", True, 2, "r")]},
        {"id": 3, "question": "q", "answer": "a",
         "output": [_out("b", False, 1), _out("c", False, 2, "r"), _out("a", True, 2, "r2")]},
        {"id": 4, "question": "q", "answer": "a", "output": [_out("b", False, 1)]},
    ]
    r = evaluate_records(recs)
    assert (r["n"], r["acc_t1"], r["acc_t2"], r["delta"]) == (4, 25.0, 50.0, 25.0)
    free = [
        {"id": 1, "question": "Text.\n\nQuestion: What?", "answer": "the soup",
         "output": [_out("salad", False, 1), _out("soup", True, 2, "r")]},
        {"id": 2, "question": "Text.\n\nQuestion: Who?", "answer": "white noise machines",
         "output": [_out("noise machines", False, 1), _out("machines", False, 2, "r")]},
        {"id": 3, "question": "Claim\nOptions:\nA. True\nB. False", "answer": "a", "output": [_out("A", True, 1)]},
    ]
    r = evaluate_records(free, task="bigbench")
    assert r["n"] == 3 and r["n_free"] == 2
    assert r["acc_t1"] == pytest.approx(100 / 3) and r["acc_t2"] == pytest.approx(200 / 3)
    assert r["f1_t1"] == pytest.approx(100 * (0 + 0.8) / 2) and r["f1_t2"] == pytest.approx(100 * (1 + 0.5) / 2)
    assert r["f1_gain"] == pytest.approx(35.0)
    table = format_table({"base": r, "tuned": evaluate_records(recs)})
    lines = table.splitlines()
    assert lines[0].split()[:4] == ["name", "N", "Acc@t1", "Acc@t2"] and "66.7" in lines[2] and "+25.0" in lines[3]
    assert "F1@t1" in lines[0] and lines[3].split()[-3:] == ["-", "-", "-"]
    no_free = format_table({"tuned": evaluate_records(recs)}).splitlines()
    assert no_free[0].split() == ["name", "N", "Acc@t1", "Acc@t2", "delta"] and len(no_free[2].split()) == 5
    with pytest.raises(DataError, match="record 1"):
        evaluate_records([{"id": 1}])

# ---------------------------------------------------------------------------------------------- shared data


def test_official_test_files_load_and_gold_verifies(shared_data):
    base = shared_data / "reflectevo_test"
    sizes = {"logiqa": 500, "math": 500, "mbpp": 500, "bigbench": 500, "bigbench-free": 144}
    for name, size in sizes.items():
        task = get_task(name)
        items = task.load(base / f"{name.split('-')[0]}_test.jsonl")
        assert len(items) == size and len({it["id"] for it in items}) == size
        assert all(isinstance(it["question"], str) and it["question"] and "answer" in it for it in items)
        if name == "mbpp":
            sample = items[:10]
            assert task.check_many([it["code"] for it in sample], sample, workers=4) == [True] * 10
            assert not any(task.check_many(["def nothing():\n    pass"] * 3, sample[:3]))
            continue
        assert all(task.check(it["answer"], it) for it in items)
        if name == "math":
            assert all(task.check(it["solution"], it) for it in items)  # the boxed answer of the solution
    bb = get_task("bigbench").load(base / "bigbench_test.jsonl")
    assert sum(it["kind"] == "mc" for it in bb) == 356
    assert get_task("logiqa").load(base / "logiqa_test.jsonl", limit=7)[6]["id"] == read_jsonl(
        base / "logiqa_test.jsonl")[6]["id"]


def test_official_examples_curate(shared_data, tmp_path):
    ex = shared_data / "reflectevo_examples"
    raw = read_jsonl(ex / "example_Reflection_raw.jsonl")  # pretty-printed objects
    assert len(raw) == 10
    sets, counts = curate_records(raw, eval_fraction=0.0)
    # hand count from the sample: t2 correct for ids 2 (both), 6 (both) and 10 (first only)
    assert (counts["d_plus"], counts["d_pm"], counts["d_pref"]) == (5, 1, 2)
    assert {r["id"] for r in sets["d_pref"]} == {2, 6} and sets["d_pm"][0]["id"] == 10
    assert set(read_jsonl(ex / "example_D+.jsonl")[0]) == set(sets["d_plus"][0]) - {"test_reflection_prompt"} \
        == D_PLUS_KEYS
    assert set(read_jsonl(ex / "example_D+-.jsonl")[0]) == set(sets["d_pm"][0]) == PAIR_KEYS
    assert set(read_jsonl(ex / "example_Dpref.jsonl")[0]) == set(sets["d_pref"][0]) == PAIR_KEYS
    r = evaluate_records(raw)
    assert (r["acc_t1"], r["acc_t2"]) == (0.0, 30.0)
    assert evaluate_file(ex / "example_Reflection_raw.jsonl") == r
