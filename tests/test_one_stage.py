"""One-stage reflection (setting I) at evaluation: the split of a reply into reflection and attempt, the eval run
(the reply's answer is trial 2's, no trial-2 generation), the mode's selection (explicit / from RUN/config.json),
its refusals (--trial2-adapter, a resume in another mode) and the raw records it writes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from reflectevo.data import get_task
from reflectevo.data.eval_run import run_eval
from reflectevo.data.jsonl import DataError, read_jsonl
from reflectevo.data.loop import LoopConfig
from reflectevo.data.prompts import DEFAULT as P

ROOT = Path(__file__).resolve().parents[1]
TASK = get_task("arithmetic")
ITEMS = [{"id": f"q{i}", "question": f"QUESTION-{i}: how many?", "answer": str(i + 10)} for i in range(5)]


# ------------------------------------------------------------------------------------------------ the split
def split(task, text):
    from reflectevo.data.one_stage import split_output

    return split_output(get_task(task), text)


@pytest.mark.parametrize("task,text,reflection,attempt", [
    ("arithmetic", "I added wrongly.\n\nThought: 3 + 4 = 7.\nAction: Finish[7]",
     "I added wrongly.", "Thought: 3 + 4 = 7.\nAction: Finish[7]"),
    # no cue at all: everything is the reflection, no attempt
    ("arithmetic", "I added wrongly; next time I will add carefully.", "I added wrongly; next time I will add "
     "carefully.", ""),
    # the cue twice: the attempt starts at the first one (its first action counts, see below)
    ("arithmetic", "Wrong sum.\nThought: it is 8\nAction: Finish[8]\nThought: no, 7\nAction: Finish[7]",
     "Wrong sum.", "Thought: it is 8\nAction: Finish[8]\nThought: no, 7\nAction: Finish[7]"),
    # an answer only
    ("arithmetic", "Finish[7]", "", "Finish[7]"),
    ("arithmetic", "Thought: 7.\nAction: Finish[7]", "", "Thought: 7.\nAction: Finish[7]"),
    # an Action line without a Thought
    ("logiqa", "The option B ignores the premise.\nAction: Finish[C]", "The option B ignores the premise.",
     "Action: Finish[C]"),
    # no cue line: the LAST answer marker (the reflection quotes the failed Finish[B] first)
    ("logiqa", "Answering Finish[B] was wrong, the premise rules it out, so Finish[C]",
     "Answering Finish[B] was wrong, the premise rules it out, so", "Finish[C]"),
    # a cue word inside a sentence is not a cue; the format's own markers
    ("math", "My Thought: part skipped a sign.\n\n  thought : x = -2\nAction: Finish<<<-2>>>",
     "My Thought: part skipped a sign.", "thought : x = -2\nAction: Finish<<<-2>>>"),
    ("mbpp", "The loop stops early.\n[BEGIN]\ndef f(x):\n    return x\n[END]", "The loop stops early.",
     "[BEGIN]\ndef f(x):\n    return x\n[END]"),
    ("arithmetic", "", "", ""),
])
def test_split_output(task, text, reflection, attempt):
    assert split(task, text) == (reflection, attempt)


def test_the_first_attempt_of_a_reply_with_two_counts():
    _, attempt = split("arithmetic", "Wrong sum.\nThought: it is 8\nAction: Finish[8]\nThought: 7\nAction: Finish[7]")
    assert P.parse_trial(TASK, attempt).answer == "8"


# ------------------------------------------------------------------------------------------------ fake engine
from test_loop import FakeTokenizer  # noqa: E402  (chat turns as tags, one token per character)

TOK = FakeTokenizer()
REPLIES = {  # trial 1: Q0 right, the others wrong; one-stage replies:
    1: "I misread the count.\n\nThought: recount gives 11.\nAction: Finish[11]",          # fixed
    2: "I misread the count.\n\nThought: still 99.\nAction: Finish[99]",                  # still wrong
    3: "I misread the count and will recount next time.",                                # no attempt: wrong
    4: "Sum slip.\nThought: 99\nAction: Finish[99]\nThought: 14\nAction: Finish[14]",     # first action counts: wrong
}


class Engine:
    """Scripted on the question number; ``calls``: (last user turn, params) of every request."""

    def __init__(self, replies=REPLIES):
        self.replies, self.calls = replies, []

    def generate(self, prompts, params=None, **kw):
        plist = params if isinstance(params, list) else [params] * len(prompts)
        outs = []
        for ids, sp in zip(prompts, plist):
            text = TOK.decode(ids)
            q = int(text.rsplit("QUESTION-", 1)[1].split(":")[0])
            last = text.rsplit("<user>", 1)[1]
            self.calls.append((last, sp, text))
            if last.startswith(P.reflect_and_retry_request(TASK, ITEMS[q])):
                reply = self.replies[q]
            elif last.startswith("Your reflection above"):
                reply = f" Action: Finish[{q + 10}]"          # a two-stage trial 2 would fix everything
            elif sp.temperature > 0:
                reply = "a reflection"
            else:
                reply = f" let me think. Action: Finish[{q + 10 if q == 0 else 98}]"
            outs.append([SimpleNamespace(text=reply, token_ids=TOK.encode(reply), finish_reason="stop")])
        return outs


def one_stage_cfg(**kw):
    return LoopConfig(reflector_mode="one-stage", reasoning_source="base", reflection_source="base + adapter A",
                      **kw)


def test_eval_checks_the_answer_of_the_one_stage_reply_and_generates_no_trial2(tmp_path):
    trial, reflector = Engine(), Engine()
    cfg = one_stage_cfg(max_tokens=40, reflection_max_tokens=60)
    res = run_eval(TASK, ITEMS, trial, reflector, TOK, tmp_path / "r.json", cfg, log=None)
    assert (res["acc_t1"], res["acc_t2"], res["delta"], res["t2_fixed"]) == (20.0, 40.0, 20.0, 1)
    assert res["settings"]["reflector_mode"] == "one-stage"
    # the trial engine answered trial 1 only; the reflector got one request per wrong trial 1, nothing else
    assert len(trial.calls) == 5 and all(not last.startswith(("Your reflection", "That")) for last, _, _ in trial.calls)
    assert len(reflector.calls) == 4
    for last, sp, _ in reflector.calls:
        assert last.startswith(P.reflect_and_retry_request(TASK, {"question": ""}))
        assert sp.n == 1 and sp.max_tokens == 100 and sp.temperature == 0.8 and sp.top_p == 0.9 and sp.seed
        assert "\nObservation" in sp.stop
    raw = {r["id"]: r for r in read_jsonl(tmp_path / "r.raw.jsonl")}
    assert len(raw["q0"]["output"]) == 1
    sent = {text.rsplit("QUESTION-", 1)[1].split(":")[0]: text for _, _, text in reflector.calls}
    for q in (1, 2, 3, 4):
        rec, reply = raw[f"q{q}"], REPLIES[q]
        assert len(rec["output"]) == 2
        t2 = rec["output"][1]
        prompt = TOK.apply_chat_template(P.one_stage_messages(TASK, ITEMS[q], rec["output"][0]["scratchpad"]))
        assert t2["reason_prompt"] == t2["reflection_prompt"] == prompt == sent[str(q)]   # as the model saw it
        assert "Do not state" not in prompt
        assert t2["one_stage_output"] == reply and t2["trail"] == 2
        assert t2["reflections"] == [reply.split("\n", 1)[0].strip() if q != 3 else reply]
        assert t2["reasoning_source"] == t2["reflection_source"] == "base + adapter A"
        # the record's test-time fields keep their meaning: the two-stage test-time conversations
        test_msgs = P.test_reflection_messages(TASK, ITEMS[q], rec["output"][0]["scratchpad"])
        assert rec["test_reflection_prompt"] == TOK.apply_chat_template(test_msgs)
        assert t2["test_reason_prompt"] == TOK.apply_chat_template(
            P.trial2_messages(ITEMS[q], test_msgs, t2["reflections"][0])) + "Thought:"
    got = {q: (raw[f"q{q}"]["output"][1]["generated_answer"], raw[f"q{q}"]["output"][1]["is_correct"])
           for q in (1, 2, 3, 4)}
    assert got == {1: ("11", True), 2: ("99", False), 3: (None, False), 4: ("99", False)}
    assert raw["q1"]["output"][1]["scratchpad"] == "Thought: recount gives 11.\nAction: Finish[11]\n" + \
        P.templates["observation_correct"]
    assert "no attempt after its reflection" in raw["q3"]["output"][1]["error"]
    # curation reads these records as any raw file
    from reflectevo.data.curate import curate_records

    sets, _ = curate_records(list(raw.values()), eval_fraction=0.0)
    (d_plus,) = sets["d_plus"]
    assert d_plus["id"] == "q1" and d_plus["second_trial_answer"] == "11"
    assert d_plus["reflections"] == "I misread the count."


def test_two_stage_default_is_unchanged(tmp_path):
    trial, reflector = Engine(), Engine()
    res = run_eval(TASK, ITEMS, trial, reflector, TOK, tmp_path / "r.json", LoopConfig(), log=None)
    assert res["acc_t2"] == 100.0 and res["settings"]["reflector_mode"] == "two-stage"
    assert all(not last.startswith(P.reflect_and_retry_request(TASK, {"question": ""}))
               for last, _, _ in reflector.calls)


def test_one_stage_eval_on_a_real_engine_and_a_tiny_random_model(tmp_path):
    from reflectevo.gen import Engine as RealEngine
    from trainer_tiny import tiny_model, tiny_tokenizer

    tok = tiny_tokenizer()
    engine = RealEngine(tiny_model(), tok, kv_cache_gib=0.05, progress=False)

    class Recording:
        def __init__(self):
            self.calls = []

        def generate(self, prompts, params=None, **kw):
            self.calls.append(params)
            return engine.generate(prompts, params, **kw)

    trial, reflector = Recording(), Recording()
    items = [{"id": i, "question": f"alpha {w} beta", "answer": "9"} for i, w in enumerate(["gamma", "delta"])]
    res = run_eval(TASK, items, trial, reflector, tok, tmp_path / "r.json",
                   one_stage_cfg(max_tokens=6, action_max_tokens=3, reflection_max_tokens=6), log=None)
    assert res["n"] == 2 and res["acc_t2"] >= res["acc_t1"]
    assert len(reflector.calls) == (1 if res["t1_correct"] < 2 else 0)
    assert all(p.max_tokens != 12 for call in trial.calls for p in (call if isinstance(call, list) else [call]))
    for rec in read_jsonl(tmp_path / "r.raw.jsonl"):
        if not rec["output"][0]["is_correct"]:
            t2 = rec["output"][1]
            assert P.reflect_and_retry_request(TASK, rec) in t2["reason_prompt"]
            assert isinstance(t2["one_stage_output"], str) and t2["is_correct"] in (True, False)


# ------------------------------------------------------------------------------------------------ refusals, resume
def test_trial2_engine_is_refused_in_one_stage_mode(tmp_path):
    with pytest.raises(DataError, match="--trial2-adapter: not with the one-stage"):
        run_eval(TASK, ITEMS, Engine(), Engine(), TOK, tmp_path / "r.json", one_stage_cfg(), log=None,
                 trial2_engine=Engine())
    assert not (tmp_path / "r.raw.jsonl").exists()


def test_resume_in_another_mode_is_refused_and_the_same_mode_resumes(tmp_path):
    out = tmp_path / "r.json"
    run_eval(TASK, ITEMS[:3], Engine(), Engine(), TOK, out, LoopConfig(reasoning_source="base",
             reflection_source="base + adapter A"), log=None)
    before = (tmp_path / "r.raw.jsonl").read_text()
    with pytest.raises(DataError, match="reflector_mode 'two-stage', this run has 'one-stage'"):
        run_eval(TASK, ITEMS, Engine(), Engine(), TOK, out, one_stage_cfg(), resume=True, log=None)
    # a settings file from before the mode was recorded counts as two-stage
    sidecar = tmp_path / "r.raw.settings.json"
    settings = json.loads(sidecar.read_text())
    del settings["reflector_mode"]
    sidecar.write_text(json.dumps(settings))
    with pytest.raises(DataError, match="reflector_mode"):
        run_eval(TASK, ITEMS, Engine(), Engine(), TOK, out, one_stage_cfg(), resume=True, log=None)
    assert (tmp_path / "r.raw.jsonl").read_text() == before
    # one-stage, killed after 3 questions, resumed in one-stage: only the rest runs; trial 1 from a cache file
    out2, cache = tmp_path / "o.json", tmp_path / "t1.jsonl"
    run_eval(TASK, ITEMS[:3], Engine(), Engine(), TOK, out2, one_stage_cfg(), log=None, trial1_cache=cache)
    trial, reflector = Engine(), Engine()
    res = run_eval(TASK, ITEMS, trial, reflector, TOK, out2, one_stage_cfg(), resume=True, log=None,
                   trial1_cache=cache)
    assert len(trial.calls) == 2 and len(reflector.calls) == 2       # q3, q4 only
    assert (res["acc_t1"], res["acc_t2"]) == (20.0, 40.0)
    assert [r["id"] for r in read_jsonl(cache)] == [it["id"] for it in ITEMS]
    with pytest.raises(DataError, match="reflector_mode 'one-stage', this run has 'two-stage'"):
        run_eval(TASK, ITEMS, Engine(), Engine(), TOK, out2, LoopConfig(reasoning_source="base",
                 reflection_source="base + adapter A"), resume=True, log=None)
    # a third setting reuses trial 1 from the cache: no trial-1 generation at all
    trial = Engine()
    res = run_eval(TASK, ITEMS, trial, Engine(), TOK, tmp_path / "c.json", one_stage_cfg(), log=None,
                   trial1_cache=cache)
    assert trial.calls == [] and res["trial1_from_cache"] == 5 and res["acc_t2"] == 40.0


def test_one_stage_is_for_evaluation_only():
    from reflectevo.data.loop import ReflectLoop

    with pytest.raises(DataError, match="for evaluation only"):
        ReflectLoop(TASK, Engine(), Engine(), TOK, LoopConfig(reflector_mode="one-stage"), log=None)
    with pytest.raises(DataError, match="--reflector-mode must be"):
        LoopConfig(reflector_mode="one_stage", test_time=True).validate()


# ------------------------------------------------------------------------------------------------ mode selection
def run_dir(tmp_path, name, config):
    run = tmp_path / name
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "adapter_config.json").write_text("{}")
    if config is not None:
        (run / "config.json").write_text(json.dumps(config))
    return str(run / "adapter")


def test_mode_is_detected_from_the_run_config_and_the_explicit_option_wins(tmp_path, capsys, monkeypatch):
    from reflectevo.cli_loop import LoopArgError, resolve_reflector_mode

    one = run_dir(tmp_path, "one", {"kind": "sft", "mode": "one-stage", "lr": 1e-3})
    cases = [(one, "auto", None, "one-stage", "says kind sft, mode one-stage"),
             (run_dir(tmp_path, "refl", {"kind": "sft", "mode": "reflect"}), "auto", None, "two-stage", "mode reflect"),
             (run_dir(tmp_path, "dpo", {"kind": "dpo"}), "auto", None, "two-stage", "kind dpo"),
             (run_dir(tmp_path, "none", None), "auto", None, "two-stage", "no "),
             (None, "auto", None, "two-stage", "no --adapter"),
             (one, "two-stage", None, "two-stage", "--reflector-mode"),
             (run_dir(tmp_path, "c", {"kind": "sft", "mode": "correct"}), "one-stage", None, "one-stage",
              "--reflector-mode"),
             (one, "two-stage", one, "two-stage", "--reflector-mode")]    # two-stage + --trial2-adapter: fine
    for adapter, flag, trial2, want, why in cases:
        args = SimpleNamespace(adapter=adapter, reflector_mode=flag, trial2_adapter=trial2)
        mode, reason = resolve_reflector_mode(args)
        assert mode == want == args.reflector_mode and why in reason
    for flag in ("auto", "one-stage"):
        with pytest.raises(LoopArgError, match="--trial2-adapter: not with the one-stage"):
            resolve_reflector_mode(SimpleNamespace(adapter=one, reflector_mode=flag, trial2_adapter=one))
    # the command logs one line with the mode and why, once its checks pass (before the model loads)
    from reflectevo import cli_loop
    from reflectevo.cli import main

    class Stop(BaseException):
        pass

    def stop(*a, **k):
        raise Stop

    monkeypatch.setattr(cli_loop, "load_generation_model", stop)
    for extra, line in ((["--adapter", one], f"eval: reflector mode one-stage ({Path(one).parent / 'config.json'} says "
                                             "kind sft, mode one-stage; --reflector-mode overrides)"),
                        (["--adapter", one, "--reflector-mode", "two-stage"], "eval: reflector mode two-stage "
                                                                                "(--reflector-mode)")):
        with pytest.raises(Stop):
            main(["eval", "--task", "arithmetic", "--limit", "2", "--out", str(tmp_path / "r.json"), *extra])
        assert line in capsys.readouterr().err.splitlines()


def test_the_trainers_run_directory_selects_one_stage(tmp_path):
    from reflectevo.data.one_stage import detect_reflector_mode
    from reflectevo.trainer import train_sft
    from trainer_tiny import cfg, d_plus, tiny_model, tiny_tokenizer

    for mode in ("one-stage", "reflect"):
        train_sft(tiny_model(), tiny_tokenizer(), d_plus(2), cfg(mode=mode, max_steps=1), tmp_path / mode)
        assert (tmp_path / mode / "adapter" / "adapter_config.json").is_file()
        got = detect_reflector_mode(tmp_path / mode / "adapter")[0]
        assert got == ("one-stage" if mode == "one-stage" else "two-stage")


def _cli(*args):
    env = dict(os.environ, REFLECTEVO_CACHE=os.environ.get("REFLECTEVO_CACHE", "/tmp/rcache"))
    return subprocess.run([sys.executable, "-m", "reflectevo", *args], capture_output=True, text=True, timeout=120,
                          cwd=ROOT, env=env)


def test_cli_refuses_one_stage_with_a_trial2_adapter_in_one_line(tmp_path):
    one = run_dir(tmp_path, "one", {"kind": "sft", "mode": "one-stage"})
    two = run_dir(tmp_path, "two", {"kind": "sft", "mode": "correct"})
    r = _cli("eval", "--task", "arithmetic", "--limit", "2", "--adapter", one, "--trial2-adapter", two,
             "--out", str(tmp_path / "r.json"))
    assert r.returncode != 0
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "--trial2-adapter: not with the one-stage" in lines[0], r.stderr
    assert "config.json" in lines[0] and not (tmp_path / "r.raw.jsonl").exists()


def test_a_reflection_quoting_the_failed_attempt_is_not_the_attempt():
    from reflectevo.data.one_stage import split_output

    t1 = "Thought: 3 + 5 = 9.\nAction: Finish[9]\nObservation: The answer is wrong."
    reply = ("I wrote\nThought: 3 + 5 = 9.\nAction: Finish[9]\nbut 3 + 5 is 8.\n\n"
             "Thought: 3 + 5 = 8.\nAction: Finish[8]")
    reflection, attempt = split_output(get_task("arithmetic"), reply, quoted=t1)
    assert attempt == "Thought: 3 + 5 = 8.\nAction: Finish[8]"
    assert reflection.startswith("I wrote\nThought: 3 + 5 = 9.") and reflection.endswith("but 3 + 5 is 8.")
    assert P.parse_trial(TASK, attempt).answer == "8"
    # the same retry as trial 1: every cue line is quoted, the last one is the attempt
    same = "The sum is right after all.\n\nThought: 3 + 5 = 9.\nAction: Finish[9]"
    assert split_output(get_task("arithmetic"), same, quoted=t1)[1] == "Thought: 3 + 5 = 9.\nAction: Finish[9]"
    # quoted Action line only, then a new Action
    act = "Action: Finish[9] was wrong.\nAction: Finish[8]"
    assert split_output(get_task("arithmetic"), act, quoted="Thought: x\nAction: Finish[9] was wrong.")[1] == \
        "Action: Finish[8]"
