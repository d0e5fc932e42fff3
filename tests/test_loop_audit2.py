"""Audit of generate / eval: a verifier that raises, a run's raw file used as a trial-1 cache, and reruns with
other prompts or a quantized model. Scripted engines (test_loop.py); no model is loaded."""
import json

import pytest
from test_loop import ITEMS, FakeTokenizer, ScriptedEngine, is_reflection_request, is_trial2, make_loop, script_a

from reflectevo.cli import main
from reflectevo.data import get_task
from reflectevo.data.eval_run import is_run_raw, run_eval
from reflectevo.data.jsonl import DataError, read_jsonl
from reflectevo.data.loop import LoopConfig, ReflectLoop

NO_MODEL = "/nonexistent/model"  # loading it fails: a guard that fires later than the model load shows as this

# ------------------------------------------------------------------------------------- a verifier that raises
MATH_ITEMS = [{"id": i, "question": f"QUESTION-{i}: find x.", "answer": "5"} for i in range(3)]
HUGE = "9" * 5000  # Fraction() of it raised ValueError (Python's int string-conversion limit) in math_equiv


class FragileMath(type(get_task("math"))):
    """The MATH task with a checker that raises on one answer, as math_equiv did on HUGE before it was fixed."""

    def check(self, prediction, item):
        if prediction == HUGE:
            raise ValueError("Exceeds the limit (4300 digits) for integer string conversion")
        return super().check(prediction, item)


def script_math(prompt, sp):
    """Q0 answers a 5000-digit number at trial 1 (the checker raises), then 5 after reflecting; Q1 right at
    once; Q2 wrong at both trials."""
    q = int(prompt.rsplit("QUESTION-", 1)[1].split(":")[0])
    if is_reflection_request(prompt):
        return [f"reflection {j} on Q{q}" for j in range(sp.n)]
    if is_trial2(prompt):
        return [" again. Action: Finish<<<5>>>" if q == 0 else " again. Action: Finish<<<7>>>"]
    first = {0: f" big. Action: Finish<<<{HUGE}>>>", 1: " x=5. Action: Finish<<<5>>>", 2: " no. Action: Finish<<<6>>>"}
    return [first[q]]


def test_an_answer_the_checker_cannot_take_is_wrong_and_the_run_goes_on(tmp_path):
    out = tmp_path / "raw.jsonl"
    eng = ScriptedEngine(script_math)
    stats = ReflectLoop(FragileMath(), eng, eng, FakeTokenizer(), LoopConfig(n_reflections=2), log=None).run(
        MATH_ITEMS, out)
    recs = read_jsonl(out)
    assert [r["id"] for r in recs] == [0, 1, 2] and stats["t1_correct"] == 1
    first = recs[0]["output"][0]
    assert first["is_correct"] is False and first["generated_answer"] == HUGE
    assert first["error"].startswith("verification failed: ValueError") and "\n" not in first["error"]
    assert [o["is_correct"] for o in recs[0]["output"][1:]] == [True, True]  # its reflections still run
    assert recs[1]["output"][0]["is_correct"] and recs[1]["output"][0]["error"] is None  # the others: as usual
    assert [o["is_correct"] for o in recs[2]["output"]] == [False, False, False]
    # eval counts it as a wrong trial 1: Acc@t1 1/3, Acc@t2 2/3
    eng = ScriptedEngine(script_math)
    res = run_eval(FragileMath(), MATH_ITEMS, eng, eng, FakeTokenizer(), tmp_path / "r.json", LoopConfig(), log=None)
    assert (res["n"], res["t1_correct"], res["t2_fixed"]) == (3, 1, 1)


def test_bad_data_raised_by_a_checker_still_stops_the_run(tmp_path):
    class Strict(type(get_task("arithmetic"))):
        def check(self, prediction, item):
            raise DataError(f"item {item['id']}: bad gold")

    eng = ScriptedEngine(script_a)
    with pytest.raises(DataError, match="bad gold"):
        ReflectLoop(Strict(), eng, eng, FakeTokenizer(), LoopConfig(), log=None).run(ITEMS, tmp_path / "raw.jsonl")


# ------------------------------------------------------------------------- a run's raw file as trial-1 cache
def test_eval_reads_a_generate_raw_as_trial1_cache_and_never_appends_to_it(tmp_path):
    raw = tmp_path / "RAW.jsonl"
    make_loop(ScriptedEngine(script_a)).run(ITEMS[:2], raw)  # generate on the first two questions
    before = raw.read_bytes()
    assert is_run_raw(raw)
    eng = ScriptedEngine(script_a)
    res = run_eval(get_task("arithmetic"), ITEMS, eng, eng, FakeTokenizer(), tmp_path / "r.json", LoopConfig(),
                   trial1_cache=raw, log=None)
    assert res["trial1_from_cache"] == 2 and (res["acc_t1"], res["acc_t2"]) == (25.0, 75.0)
    assert raw.read_bytes() == before  # no trial-1-only records of q2, q3 in it
    # so generate, rerun on all four, gives q2 and q3 their reflections: the file an uninterrupted run writes
    stats = make_loop(ScriptedEngine(script_a)).run(ITEMS, raw)
    assert stats["skipped_complete"] == 2 and stats["questions"] == 2
    ref = tmp_path / "ref.jsonl"
    make_loop(ScriptedEngine(script_a)).run(ITEMS, ref)
    assert read_jsonl(raw) == read_jsonl(ref)


def test_eval_raw_as_trial1_cache_of_another_eval_is_left_intact(tmp_path):
    eng = ScriptedEngine(script_a)
    run_eval(get_task("arithmetic"), ITEMS[:2], eng, eng, FakeTokenizer(), tmp_path / "a.json", LoopConfig(), log=None)
    a_raw = tmp_path / "a.raw.jsonl"
    before = a_raw.read_bytes()
    eng = ScriptedEngine(script_a)
    run_eval(get_task("arithmetic"), ITEMS, eng, eng, FakeTokenizer(), tmp_path / "b.json", LoopConfig(),
             trial1_cache=a_raw, log=None)
    assert a_raw.read_bytes() == before
    # resuming run a on all four questions then evaluates q2 and q3 in full (not as trial-1-only records)
    eng = ScriptedEngine(script_a)
    res = run_eval(get_task("arithmetic"), ITEMS, eng, eng, FakeTokenizer(), tmp_path / "a.json", LoopConfig(),
                   resume=True, log=None)
    assert (res["acc_t1"], res["acc_t2"]) == (25.0, 75.0)
    # a file of trial-1 entries only is still a cache that grows; one whose questions were all right at trial 1
    # is a run's raw file when its settings file is beside it
    cache = tmp_path / "t1.jsonl"
    eng = ScriptedEngine(script_a)
    run_eval(get_task("arithmetic"), ITEMS[:1], eng, eng, FakeTokenizer(), tmp_path / "c.json", LoopConfig(),
             trial1_cache=cache, log=None)
    assert not is_run_raw(cache) and [r["id"] for r in read_jsonl(cache)] == ["q0"]
    assert is_run_raw(tmp_path / "c.raw.jsonl")


# ------------------------------------------------------------------ reruns with other prompts / quantization
def _last_error(capsys, code):
    assert code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_generate_rerun_with_other_prompts_or_quantization_is_refused(tmp_path, capsys):
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({"retry_request": "Try {question} again."}))
    raw = tmp_path / "raw.jsonl"
    args = ["generate", "--task", "arithmetic", "--limit", "2", "--model", NO_MODEL, "--out", str(raw)]
    assert NO_MODEL in _last_error(capsys, main(args))  # got as far as the model: settings file written
    raw.write_text('{"id": 0}\n')  # records of that run
    line = _last_error(capsys, main([*args, "--prompts", str(prompts)]))
    assert "was written with prompts_id None" in line
    line = _last_error(capsys, main([*args, "--quantize", "nf4"]))
    assert "reasoning_source" in line and f"{NO_MODEL} (nf4)" in line
    assert NO_MODEL in _last_error(capsys, main(args))  # the same settings: goes on to the model
    # the other way round: a run with prompts and nf4 refuses a rerun without them; the same file passes
    raw2 = tmp_path / "raw2.jsonl"
    args2 = [*args[:-1], str(raw2), "--prompts", str(prompts), "--quantize", "nf4"]
    assert NO_MODEL in _last_error(capsys, main(args2))
    raw2.write_text('{"id": 0}\n')
    assert "prompts_id" in _last_error(capsys, main(args2[:-4] + ["--quantize", "nf4"]))
    prompts.write_text(json.dumps({"retry_request": "Try {question} again."}, indent=4))  # same templates
    assert NO_MODEL in _last_error(capsys, main(args2))


def test_eval_resume_with_other_prompts_or_quantization_is_refused(tmp_path, capsys):
    out = tmp_path / "r.json"
    eng = ScriptedEngine(script_a)
    run_eval(get_task("arithmetic"), ITEMS, eng, eng, FakeTokenizer(), out,
             LoopConfig(reasoning_source=NO_MODEL, reflection_source=NO_MODEL), log=None)
    capsys.readouterr()
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({"retry_request": "Try {question} again."}))
    base = ["eval", "--task", "arithmetic", "--limit", "4", "--model", NO_MODEL, "--out", str(out), "--resume"]
    assert "prompts_id" in _last_error(capsys, main([*base, "--prompts", str(prompts)]))
    assert f"{NO_MODEL} (nf4)" in _last_error(capsys, main([*base, "--quantize", "nf4"]))
    assert NO_MODEL in _last_error(capsys, main(base))  # the same settings: goes on to the model
    assert len(read_jsonl(tmp_path / "r.raw.jsonl")) == len(ITEMS)


def test_eval_warns_when_the_trial1_cache_was_answered_by_another_model(tmp_path):
    """The cache is matched on (id, question): trial 1 (so Acc@t1) from another model would pass unnoticed."""
    cache = tmp_path / "t1.jsonl"
    eng = ScriptedEngine(script_a)
    run_eval(get_task("arithmetic"), ITEMS[:2], eng, eng, FakeTokenizer(), tmp_path / "a.json",
             LoopConfig(reasoning_source="model-A"), trial1_cache=cache, log=None)
    lines = []
    for source, out in (("model-A", "b.json"), ("model-B", "c.json")):
        eng = ScriptedEngine(script_a)
        run_eval(get_task("arithmetic"), ITEMS, eng, eng, FakeTokenizer(), tmp_path / out,
                 LoopConfig(reasoning_source=source), trial1_cache=cache, log=lines.append)
    warnings = [x for x in lines if "warning" in x]
    assert len(warnings) == 1 and "trial 1 of 4 questions comes from it, answered by 'model-A'" in warnings[0]
    assert "this run's model is 'model-B'" in warnings[0]


def test_a_trial1_cache_entry_with_a_string_is_correct_is_a_clear_error(tmp_path):
    """bool("False") is True: a foreign cache writing strings would have counted every trial 1 as correct."""
    cache = tmp_path / "t1.jsonl"
    eng = ScriptedEngine(script_a)
    run_eval(get_task("arithmetic"), ITEMS[:2], eng, eng, FakeTokenizer(), tmp_path / "a.json", LoopConfig(),
             trial1_cache=cache, log=None)
    recs = read_jsonl(cache)
    recs[1]["output"][0]["is_correct"] = "False"
    cache.write_text("".join(json.dumps(r) + "\n" for r in recs))
    eng = ScriptedEngine(script_a)
    with pytest.raises(DataError, match=r"t1\.jsonl:2: output\[0\]\.is_correct is 'False'; expected true or false"):
        run_eval(get_task("arithmetic"), ITEMS, eng, eng, FakeTokenizer(), tmp_path / "b.json", LoopConfig(),
                 trial1_cache=cache, log=None)
