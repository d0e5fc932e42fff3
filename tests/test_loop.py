"""The generate loop, eval and the CLI around them.

Fast tests use a scripted fake engine (deterministic, no model, one token per character); two tests run SmolLM2
on a few arithmetic questions with small token budgets (schema, exact prompts as one chat conversation, resume
after a kill, prefix-cache hits of the trial-2 phase).
"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from reflectevo.data import get_task
from reflectevo.data.eval_run import run_eval
from reflectevo.data.jsonl import DataError, read_jsonl
from reflectevo.data.loop import LoopConfig, ReflectLoop, question_seed
from reflectevo.data.prompts import DEFAULT as P

ROOT = Path(__file__).resolve().parents[1]
ENTRY_FIELDS = {"generated_answer", "reflections", "scratchpad", "is_correct", "error", "trail", "reasoning_source",
                "reflection_source", "reason_prompt", "reflection_prompt"}


class FakeTokenizer:
    """Chat turns as tags, one token per character."""

    def apply_chat_template(self, messages, add_generation_prompt=True):
        return "".join(f"<{m['role']}>{m['content']}</{m['role']}>" for m in messages) + "<assistant>"

    def encode(self, text, add_special_tokens=False):
        return [ord(c) for c in text]

    def decode(self, ids, skip_special_tokens=False):
        return "".join(map(chr, ids))


def render(messages, opener=""):
    return FakeTokenizer().apply_chat_template(messages) + opener


class Out:
    def __init__(self, text, finish_reason="stop"):
        self.text, self.token_ids, self.finish_reason = text, FakeTokenizer().encode(text), finish_reason


class ScriptedEngine:
    """Answers by a script keyed on the question number; records every call (prompts as text and as sent)."""

    def __init__(self, script):
        self.script, self.calls, self.sent = script, [], []

    def generate(self, prompts, params=None, **kw):
        plist = params if isinstance(params, list) else [params] * len(prompts)
        texts = [p if isinstance(p, str) else FakeTokenizer().decode(p) for p in prompts]
        self.calls.append((texts, plist))
        self.sent.append(list(prompts))
        return [[Out(t) for t in self.script(p, sp)] for p, sp in zip(texts, plist)]


def _qnum(prompt):
    return int(re.findall(r"QUESTION-(\d+)", prompt)[-1])


def last_user_turn(prompt):
    return prompt.rsplit("<user>", 1)[1]


def is_reflection_request(prompt):
    return last_user_turn(prompt).startswith("That answer was wrong.")


def is_trial2(prompt):
    return last_user_turn(prompt).startswith("Your reflection above")


def script_a(prompt, sp):
    """Q0 right at t1; Q1 wrong, fixed by reflection 0 only; Q2 wrong, never fixed; Q3 wrong, fixed by both."""
    q = _qnum(prompt)
    if is_reflection_request(prompt):
        return [f"reflection {j} on Q{q}" for j in range(sp.n)]
    if is_trial2(prompt):
        j = int(re.findall(r"<assistant>reflection (\d+) on Q", prompt)[-1])
        good = (q == 1 and j == 0) or q == 3
        return [f" adding up. Action: Finish[{q + 10 if good else 99}]"]
    return [f" let me think. Action: Finish[{q + 10 if q == 0 else 98}]"]


ITEMS = [{"id": f"q{i}", "question": f"QUESTION-{i}: how many?", "answer": str(i + 10)} for i in range(4)]


def make_loop(engine, tmp_cfg=None, **cfg):
    return ReflectLoop(get_task("arithmetic"), engine, engine, FakeTokenizer(), LoopConfig(**cfg), log=None)


def test_loop_schema_and_trial2_from_trial1(tmp_path):
    eng = ScriptedEngine(script_a)
    out = tmp_path / "raw.jsonl"
    stats = make_loop(eng, chunk_size=32).run(ITEMS, out)
    recs = read_jsonl(out)
    assert [r["id"] for r in recs] == ["q0", "q1", "q2", "q3"]
    assert stats["t1_correct"] == 1 and stats["reflections"] == 6 and stats["t2_correct"] == 3
    # one generate call per phase: trial 1, reflections, trial 2
    assert len(eng.calls) == 3
    assert len(eng.calls[0][0]) == 4 and len(eng.calls[1][0]) == 3 and len(eng.calls[2][0]) == 6
    fed = set(eng.calls[0][0]) | set(eng.calls[1][0]) | set(eng.calls[2][0])
    for r in recs:
        assert set(r) >= {"id", "question", "answer", "output"}
        first = r["output"][0]
        assert set(first) >= ENTRY_FIELDS and first["trail"] == 1 and first["reflections"] == []
        assert first["reason_prompt"] in fed and first["reason_prompt"].endswith("<assistant>Thought:")
        if first["is_correct"]:
            assert len(r["output"]) == 1
            continue
        assert len(r["output"]) == 3  # one trial 2 per reflection
        item = ITEMS[int(r["id"][1])]
        refl_msgs = P.reflection_messages(get_task("arithmetic"), item, first["scratchpad"], "1-1-1")
        assert r["test_reflection_prompt"] == render(P.test_reflection_messages(get_task("arithmetic"), item,
                                                                                first["scratchpad"]))
        for j, t2 in enumerate(r["output"][1:]):
            assert set(t2) >= ENTRY_FIELDS and t2["trail"] == 2
            assert t2["reflections"] == [f"reflection {j} on Q{r['id'][1]}"]
            assert t2["reason_prompt"] in fed and t2["reflection_prompt"] in fed
            # one conversation: trial 1 -> its transcript + reflection request -> the reflection + retry request
            assert t2["reflection_prompt"] == render(refl_msgs)
            assert t2["reason_prompt"] == render(P.trial2_messages(item, refl_msgs, t2["reflections"][0]),
                                                 "Thought:")
            assert t2["reflection_prompt"].startswith(first["reason_prompt"])
            assert t2["reason_prompt"].startswith(t2["reflection_prompt"] + t2["reflections"][0])
            # defect 1: every trial 2 is built on the trial-1 transcript, never on another trial 2
            assert first["scratchpad"] in t2["reason_prompt"]
            for other in r["output"][1:]:
                assert other["scratchpad"] not in t2["reason_prompt"]
            # defect 2: the saved prompt is the one sent, without the trial-2 answer
            assert t2["scratchpad"] not in t2["reason_prompt"]
        assert first["scratchpad"].endswith("Observation: The answer is wrong.")
    q1 = recs[1]["output"]
    assert [o["is_correct"] for o in q1] == [False, True, False] and q1[1]["generated_answer"] == "11"
    # reflections: n samples, the paper's sampling settings, seeded per question
    params = eng.calls[1][1]
    assert all(p.n == 2 and p.temperature == 0.8 and p.top_p == 0.9 and p.max_tokens == 512 for p in params)
    assert [p.seed for p in params] == [question_seed(0, i) for i in ("q1", "q2", "q3")]
    assert all(p.temperature == 0.0 for p in eng.calls[0][1] + eng.calls[2][1])
    assert recs[1]["demand"] == "1-1-1" and "test_reflection_prompt" not in recs[0]
    # prompts are sent as token ids, each phase's ids extending the previous phase's prompt + generated ids
    sent_t1, sent_refl, sent_t2 = eng.sent
    # (the generated " let me think. Action: ..." is reused as far as the transcript's text agrees with it)
    gen = FakeTokenizer().encode(" let me think.")
    for ids, prev in zip(sent_refl, sent_t1[1:]):
        assert isinstance(ids, list) and ids[:len(prev) + len(gen)] == prev + gen
    for k, ids in enumerate(sent_t2):
        prev = sent_refl[k // 2]
        gen = FakeTokenizer().encode(f"reflection {k % 2} on Q{k // 2 + 1}")
        assert ids[:len(prev) + len(gen)] == prev + gen


def test_forced_action_batched(tmp_path):
    """A trial that stops before "Action:" gets a second greedy call continuing its exact text."""
    def script(prompt, sp):
        if prompt.endswith("\nAction:"):
            return [" Finish[10]"]
        return [" 4 plus 6 is 10"]

    eng = ScriptedEngine(script)
    make_loop(eng).run(ITEMS[:2], tmp_path / "raw.jsonl")
    prompts, params = eng.calls[1]
    first = read_jsonl(tmp_path / "raw.jsonl")[0]["output"][0]
    assert prompts[0] == first["reason_prompt"] + " 4 plus 6 is 10\nAction:"
    assert params[0].temperature == 0.0 and "\n" in params[0].stop
    assert first["is_correct"] and first["generated_answer"] == "10"
    assert first["scratchpad"].startswith("Thought: 4 plus 6 is 10\nAction: Finish[10]")


def test_resume_after_kill_no_loss_no_duplicates(tmp_path):
    out = tmp_path / "raw.jsonl"

    class Killed(Exception):
        pass

    def kill(chunk, records):
        raise Killed

    with pytest.raises(Killed):
        make_loop(ScriptedEngine(script_a), chunk_size=2).run(ITEMS, out, after_chunk=kill)
    assert [r["id"] for r in read_jsonl(out)] == ["q0", "q1"]
    with open(out, "a") as f:  # a torn line, as a kill in the middle of a write leaves
        f.write('{"id": "q2", "question": "QUES')
    eng = ScriptedEngine(script_a)
    stats = make_loop(eng, chunk_size=2).run(ITEMS, out)
    assert stats["skipped_complete"] == 2 and stats["questions"] == 2
    ids = [r["id"] for r in read_jsonl(out)]
    assert ids == ["q0", "q1", "q2", "q3"]
    # the resumed records equal those of an uninterrupted run (seeded, batch-independent)
    ref = tmp_path / "ref.jsonl"
    make_loop(ScriptedEngine(script_a), chunk_size=32).run(ITEMS, ref)
    assert read_jsonl(ref) == read_jsonl(out)
    # a third run does nothing
    eng = ScriptedEngine(script_a)
    assert make_loop(eng).run(ITEMS, out)["questions"] == 0 and eng.calls == []


def test_duplicate_ids_rejected(tmp_path):
    with pytest.raises(DataError, match="duplicate question id"):
        make_loop(ScriptedEngine(script_a)).run([ITEMS[0], ITEMS[0]], tmp_path / "raw.jsonl")


def test_eval_counts_and_trial1_cache(tmp_path):
    eng = ScriptedEngine(script_a)
    task = get_task("arithmetic")
    cache = tmp_path / "t1.jsonl"
    res = run_eval(task, ITEMS, eng, eng, FakeTokenizer(), tmp_path / "res.json", LoopConfig(),
                   trial1_cache=cache, log=None)
    # hand count: t1 right: Q0; first reflection fixes Q1 and Q3 (Q2 never): Acc@t1 1/4, Acc@t2 3/4
    assert res["n"] == 4 and res["acc_t1"] == 25.0 and res["acc_t2"] == 75.0 and res["delta"] == 50.0
    assert json.loads((tmp_path / "res.json").read_text())["acc_t2"] == 75.0
    # test time: one reflection, the test-time prompt (no demand)
    assert all(p.n == 1 for p in eng.calls[1][1])
    assert all(last_user_turn(p) == P.test_reflection_request({"question": ""}) + "</user><assistant>"
               for p in eng.calls[1][0])
    assert [r["id"] for r in read_jsonl(cache)] == ["q0", "q1", "q2", "q3"]

    # second run with another reflector: trial 1 comes from the cache (no trial-1 call at all)
    def script_b(prompt, sp):
        if is_trial2(prompt):
            return [" Action: Finish[99]"]  # the new reflections fix nothing
        return script_a(prompt, sp)

    eng2 = ScriptedEngine(script_b)
    res2 = run_eval(task, ITEMS, eng2, eng2, FakeTokenizer(), tmp_path / "res2.json", LoopConfig(),
                    trial1_cache=cache, log=None)
    assert res2["trial1_from_cache"] == 4 and res2["acc_t1"] == 25.0 and res2["acc_t2"] == 25.0
    assert len(eng2.calls) == 2 and all(is_reflection_request(p) for p in eng2.calls[0][0])
    # the conversation of a cached trial 1 is rebuilt from its saved transcript
    rec = read_jsonl(tmp_path / "res2.raw.jsonl")[1]
    assert rec["output"][1]["reflection_prompt"] == rec["test_reflection_prompt"] == render(
        P.test_reflection_messages(task, ITEMS[1], rec["output"][0]["scratchpad"]))
    # a cache made for other questions is refused
    other = [dict(ITEMS[0], question="something else")]
    with pytest.raises(DataError, match="another question"):
        run_eval(task, other, eng2, eng2, FakeTokenizer(), tmp_path / "res3.json", LoopConfig(),
                 trial1_cache=cache, log=None)


def test_eval_refuses_its_own_raw_file_as_trial1_cache(tmp_path):
    task = get_task("arithmetic")
    out = tmp_path / "base.json"
    run_eval(task, ITEMS, ScriptedEngine(script_a), ScriptedEngine(script_a), FakeTokenizer(), out, LoopConfig(),
             log=None)
    raw = tmp_path / "base.raw.jsonl"
    before = raw.read_text()
    eng = ScriptedEngine(script_a)
    with pytest.raises(DataError, match="--trial1-cache"):
        run_eval(task, ITEMS, eng, eng, FakeTokenizer(), out, LoopConfig(), trial1_cache=raw, log=None)
    assert eng.calls == [] and raw.read_text() == before and len(read_jsonl(raw)) == len(ITEMS)


def _cli(*args, timeout=120):
    env = dict(os.environ, REFLECTEVO_CACHE=os.environ.get("REFLECTEVO_CACHE", "/tmp/rcache"))
    return subprocess.run([sys.executable, "-m", "reflectevo", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=env)


def test_cli_bad_input_one_line_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1, "question": "q", "answer": "a"}\n{"id": 2, "question": \n')
    missing = tmp_path / "missing.jsonl"
    missing.write_text('{"id": 1, "question": "q"}\n')
    bad_raw = tmp_path / "bad_raw.jsonl"
    bad_raw.write_text(json.dumps({"id": 1, "question": "q", "answer": "a", "output": [
        {"generated_answer": "b", "is_correct": False, "trail": 1}]}) + "\n" + '{"id": 2, "output": [}\n')
    out = str(tmp_path / "raw.jsonl")
    cases = [
        (["generate", "--task", "logiqa", "--data", str(bad), "--out", out], f"{bad}:2"),
        (["generate", "--task", "logiqa", "--data", str(missing), "--out", out], f"{missing}:1"),
        (["generate", "--task", "nosuchtask", "--out", out], "nosuchtask"),
        (["eval", "--task", "arithmetic", "--demand", "1-1-1", "--out", out], "unrecognized"),
        (["curate", str(bad_raw), "--out", str(tmp_path / "cur")], f"{bad_raw}:2"),
        (["curate", str(missing), "--out", str(tmp_path / "cur")], f"{missing}:1: missing field 'answer'"),
        (["generate", "--task", "arithmetic", "--demand", "9-9-9", "--out", out], "--demand"),
    ]
    for args, needle in cases:
        r = _cli(*args)
        assert r.returncode != 0, args
        lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
        if needle != "unrecognized":  # argparse's own usage error has two lines
            assert len(lines) == 1, (args, r.stderr)
        assert needle in r.stderr, (args, r.stderr)
    assert not Path(out).exists()


# ------------------------------------------------------------------------------------------- SmolLM2 (real)
@pytest.fixture(scope="module")
def smollm():
    import torch

    from reflectevo.model import load_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # several test processes share 2 cores: oversubscribed OpenMP GEMMs crawl
    yield load_model("smollm2-135m")
    torch.set_num_threads(threads)


class Recording:
    """Wraps an engine and keeps every prompt it was fed (as text and as sent) and the engine's prefill counts."""

    def __init__(self, engine):
        self.engine, self.fed, self.calls = engine, [], []

    def generate(self, prompts, params=None, **kw):
        before = dict(self.engine.stats)
        outs = self.engine.generate(prompts, params, **kw)
        tok = self.engine.tokenizer
        self.fed.extend(p if isinstance(p, str) else tok.decode(p) for p in prompts)
        counts = {k: self.engine.stats[k] - before[k] for k in ("prefill_tokens_computed", "prefix_cache_hit_tokens")}
        plist = params if isinstance(params, list) else [params] * len(prompts)
        self.calls.append({"prompts": list(prompts), "params": plist, "outs": outs, **counts})
        return outs


def test_smollm_loop_records_and_resume(smollm, tmp_path):
    from reflectevo.gen import Engine

    model, tok = smollm
    task = get_task("arithmetic")
    items = task.load(limit=4)
    cfg = dict(max_tokens=24, action_max_tokens=8, reflection_max_tokens=16, chunk_size=2)
    eng = Recording(Engine(model, tok, kv_cache_gib=0.25))
    out = tmp_path / "raw.jsonl"

    def kill(chunk, records):
        raise KeyboardInterrupt

    loop = ReflectLoop(task, eng, eng, tok, LoopConfig(**cfg), log=None)
    with pytest.raises(KeyboardInterrupt):
        loop.run(items, out, after_chunk=kill)
    assert len(read_jsonl(out)) == 2
    ReflectLoop(task, eng, eng, tok, LoopConfig(**cfg), log=None).run(items, out)
    recs = read_jsonl(out)
    assert [r["id"] for r in recs] == [it["id"] for it in items]
    fed = set(eng.fed)

    def chat(messages, opener=""):  # the model's own template, as transformers renders it
        return tok.apply_chat_template(messages, add_generation_prompt=True) + opener

    for r, item in zip(recs, items):
        assert r["question"] == item["question"] and r["answer"] == item["answer"]
        first = r["output"][0]
        assert set(first) >= ENTRY_FIELDS and first["trail"] == 1
        assert first["reason_prompt"] in fed
        assert first["reason_prompt"] == chat(P.trial_messages(task, item), "Thought:")
        assert first["is_correct"] == task.check(first["generated_answer"], item)
        n_t2 = len(r["output"]) - 1
        assert n_t2 == (0 if first["is_correct"] else 2)
        refl_msgs = P.reflection_messages(task, item, first["scratchpad"], r.get("demand"))
        for t2 in r["output"][1:]:
            assert t2["trail"] == 2 and len(t2["reflections"]) == 1
            assert t2["reason_prompt"] in fed and t2["reflection_prompt"] in fed
            assert first["scratchpad"] in t2["reason_prompt"]
            assert t2["reflection_prompt"] == chat(refl_msgs)
            assert t2["reason_prompt"] == chat(P.trial2_messages(item, refl_msgs, t2["reflections"][0]), "Thought:")
        if n_t2:
            assert r["test_reflection_prompt"] == chat(P.test_reflection_messages(task, item, first["scratchpad"]))


def test_smollm_trial2_prefill_is_mostly_cache_hits(smollm, tmp_path):
    """Each phase's ids begin with the previous phase's prompt + generated ids, so the engine's prefix cache
    holds nearly all of a trial-2 prompt; the prompts decode to exactly the texts saved in the records."""
    from reflectevo.gen import Engine

    model, tok = smollm
    task = get_task("arithmetic")
    items = task.load(limit=2)
    eng = Recording(Engine(model, tok, kv_cache_gib=0.25))
    cfg = LoopConfig(max_tokens=24, action_max_tokens=8, reflection_max_tokens=32, chunk_size=2)
    ReflectLoop(task, eng, eng, tok, cfg, log=None).run(items, tmp_path / "raw.jsonl")
    recs = read_jsonl(tmp_path / "raw.jsonl")
    assert all(not r["output"][0]["is_correct"] for r in recs), "the test needs failed trial 1s"
    refl_call = next(c for c in eng.calls if c["params"][0].temperature > 0)
    t2_call = eng.calls[eng.calls.index(refl_call) + 1]
    for k, ids in enumerate(t2_call["prompts"]):
        q, j = divmod(k, 2)
        prev = refl_call["prompts"][q]
        sample = refl_call["outs"][q][j]
        assert isinstance(ids, list) and ids[:len(prev)] == prev
        # the reflection's generated ids are reused at least up to where its text (stripped, as saved) ends
        # (an end-of-turn token it stopped on is the template's too)
        assert tok.decode(ids[len(prev):]).startswith(sample.text.strip())
        reused = 0
        while reused < len(sample.token_ids) and ids[len(prev) + reused] == sample.token_ids[reused]:
            reused += 1
        assert tok.decode(sample.token_ids[:reused], skip_special_tokens=True).strip() == sample.text.strip()
        t2 = recs[q]["output"][1 + j]
        assert tok.decode(ids) == t2["reason_prompt"] and tok.decode(prev) == t2["reflection_prompt"]
    prompt_tokens = sum(len(p) for p in t2_call["prompts"])
    computed, hits = t2_call["prefill_tokens_computed"], t2_call["prefix_cache_hit_tokens"]
    assert computed + hits == prompt_tokens
    assert computed < 0.2 * prompt_tokens, (computed, prompt_tokens)


def test_judge_batched_and_position_consistent(tmp_path):
    """Dpref ranking by a judge model: one batched call, both A/B orders, inconsistent verdicts dropped."""
    from reflectevo.data.judge import BatchedJudge, curate_with_judge

    def refl_script(prompt, sp):
        if is_reflection_request(prompt):
            return ["a GOOD precise reflection", "a vague reflection"] if _qnum(prompt) == 0 else \
                ["first idea", "second idea"]
        if is_trial2(prompt):
            return [f" Action: Finish[{_qnum(prompt) + 10}]"]  # every trial 2 is right
        return [" Action: Finish[0]"]

    raw = tmp_path / "raw.jsonl"
    make_loop(ScriptedEngine(refl_script)).run(ITEMS[:2], raw)

    def judge_script(prompt, sp):
        a = prompt.split("Reflection A:\n", 1)[1].split("\n\nReflection B:", 1)[0]
        if "GOOD" in prompt:
            return ["A" if "GOOD" in a else "B"]
        return ["A"]  # always "A": position bias -> inconsistent -> declined

    eng = ScriptedEngine(judge_script)
    counts = curate_with_judge(raw, tmp_path / "cur", BatchedJudge(eng, FakeTokenizer()), eval_fraction=0.0)
    assert len(eng.calls) == 1 and len(eng.calls[0][0]) == 4  # 2 pairs x 2 orders, one call
    assert counts["judged_pairs"] == 2 and counts["judge_declined"] == 1 and counts["d_pref"] == 1
    pref = read_jsonl(tmp_path / "cur" / "d_pref.jsonl")
    assert pref[0]["reflection_chosen"] == "a GOOD precise reflection"
    assert counts["d_plus"] == 4 and counts["d_pm"] == 0
