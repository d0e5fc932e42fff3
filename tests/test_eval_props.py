"""Seeded property tests of what a user relies on when comparing eval settings (``reflectevo eval``).

A scripted engine answers every phase from a random per-question plan (right / wrong / no action, then a forced
right, wrong or empty action / an answer the checker raises on), so the expected numbers are known. Over many seeds:
1. RESULT.json's acc_t1 / acc_t2 / delta and counts equal a recount from the raw records beside it and from the plan,
   Acc@t2 counting only the FIRST reflection's trial 2 (also for generate records with several);
2. ``--limit``, item order and N through the CLI (unparsable answers and raising checks are wrong and counted);
3. a run killed at any byte of its writes (raw records, trial-1 cache), then resumed, ends with the RESULT.json, raw
   records and cache of an uninterrupted run;
4. a trial-1 cache shared by settings gives each the same trial 1s; a second writer, a torn line left by a killed one,
   or a run's raw file used as the cache (never written) do not spoil it;
5. every --reflector-mode (auto, one-stage, two-stage, none) gives t1_correct + t2_fixed + still wrong = n.
"""
from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from reflectevo.data.eval_run import load_trial1_cache, raw_path_for, run_eval, settings_path_for
from reflectevo.data.evaluate import evaluate_file
from reflectevo.data.jsonl import read_jsonl
from reflectevo.data.loop import LoopConfig, ReflectLoop
from reflectevo.data.tasks import ArithmeticTask
from test_loop import FakeTokenizer  # chat turns as tags, one token per character

TOK = FakeTokenizer()
GOOD = ("R", "FR")                               # the codes whose trial ends correct
T_CODES = ("R", "W", "FR", "FW", "FN", "B")      # R/W right/wrong; F*: no action, forced R/W/nothing; B: raises
ONE_STAGE_CODES = T_CODES + ("N",)               # N: a reflection without an attempt
MODES = ("two-stage", "one-stage", "none")


class FragileArithmetic(ArithmeticTask):
    """Arithmetic whose checker raises on the answer "BOOM" (the loop counts it wrong, with the reason)."""

    def check(self, prediction, item):
        if prediction == "BOOM":
            raise ValueError("cannot take BOOM")
        return super().check(prediction, item)


TASK = FragileArithmetic()


def _final(code: str, ans: str) -> str:   # the answer a code ends with (R, W, B; FR, FW as forced)
    return {"R": ans, "FR": ans, "W": str(int(ans) + 1000), "FW": str(int(ans) + 1000), "B": "BOOM"}[code]


def trial_text(code: str, q: int, ans: str, tag: str) -> str:
    if code in ("R", "W", "B"):
        return f" {tag} on Q{q}.\nAction: Finish[{_final(code, ans)}]"
    return f" {tag} on Q{q}, unsure."                # no action: the forced call answers


def forced_text(code: str, ans: str) -> str:
    return "" if code == "FN" else f" Finish[{_final(code, ans)}]"


def one_stage_text(code: str, q: int, ans: str) -> str:
    if code == "N":
        return f"I slipped on Q{q} and will recount next time."
    head = f"I slipped on Q{q}.\n\nThought: second look at Q{q}."
    return head + (f"\nAction: Finish[{_final(code, ans)}]" if code in ("R", "W", "B") else "")


class PlanEngine:
    """Answers each request from ``plan[q]`` (q: the QUESTION-q number): {"answer", "t1", "t2": [codes]}."""

    def __init__(self, plan: dict, one_stage: bool = False):
        self.plan, self.one_stage, self.calls = plan, one_stage, []

    def generate(self, prompts, params=None, **kw):
        plist = params if isinstance(params, list) else [params] * len(prompts)
        outs = []
        for ids, sp in zip(prompts, plist):
            text = TOK.decode(ids)
            q = int(re.findall(r"QUESTION-(\d+):", text)[-1])
            spec, users = self.plan[q], text.count("<user>")
            j = int((re.findall(r"reflection (\d+) on Q\d+", text) or [0])[-1])   # trial 2 after reflection j
            if text.endswith("Action:"):
                phase, replies = "forced", [forced_text(spec["t1"] if users == 1 else spec["t2"][j], spec["answer"])]
            elif sp.temperature > 0 and self.one_stage:
                phase, replies = "one-stage", [one_stage_text(spec["t2"][0], q, spec["answer"])]
            elif sp.temperature > 0:
                phase, replies = "reflect", [f"reflection {k} on Q{q}" for k in range(sp.n)]
            elif users == 1:
                phase, replies = "trial1", [trial_text(spec["t1"], q, spec["answer"], "first try")]
            else:
                phase, replies = "trial2", [trial_text(spec["t2"][j], q, spec["answer"], "second try")]
            self.calls.append((phase, q))
            outs.append([SimpleNamespace(text=t, token_ids=TOK.encode(t), finish_reason="stop") for t in replies])
        return outs


def engines(mode: str, plan: dict):
    """(trial engine, reflect engine) for ``mode``: none has no reflector, one-stage a one-stage one."""
    eng = PlanEngine(plan)
    return eng, {"none": None, "one-stage": PlanEngine(plan, one_stage=True)}.get(mode, eng)


def make_items(rng: random.Random, n: int) -> list[dict]:
    ids = rng.sample(range(10_000), n)
    return [{"id": f"item-{ids[q]}", "question": f"QUESTION-{q}: Ava has {q + 3} coins. How many now?",
             "answer": str(rng.randint(0, 99))} for q in range(n)]


def make_plan(rng: random.Random, items: list[dict], mode: str = "two-stage", k: int = 1) -> dict:
    codes = ONE_STAGE_CODES if mode == "one-stage" else T_CODES
    return {q: {"answer": it["answer"], "t1": rng.choice(T_CODES), "t2": [rng.choice(codes) for _ in range(k)]}
            for q, it in enumerate(items)}


def cfg(mode: str, chunk: int = 32, **kw) -> LoopConfig:
    return LoopConfig(reflector_mode=mode, chunk_size=chunk, reasoning_source="base",
                      reflection_source="base + A" if mode == "one-stage" else "base", **kw)


def recount(records: list[dict]) -> tuple[int, int, int, int]:
    """(n, right at trial 1, wrong at trial 1 and right at the FIRST trial 2, still wrong) from raw records."""
    t1 = fixed = still = 0
    for r in records:
        first, rest = r["output"][0], r["output"][1:]
        assert first["trail"] == 1 and all(o["trail"] == 2 for o in rest)
        if first["is_correct"]:
            t1 += 1
            assert not rest
        elif rest and rest[0]["is_correct"]:
            fixed += 1
        else:
            still += 1
    return len(records), t1, fixed, still


def expected(plan: dict, qs: list) -> tuple[int, int, int, int]:
    t1 = sum(plan[q]["t1"] in GOOD for q in qs)
    fixed = sum(plan[q]["t1"] not in GOOD and plan[q]["t2"][0] in GOOD for q in qs)
    return len(qs), t1, fixed, sum(plan[q]["t1"] not in GOOD and plan[q]["t2"][0] not in GOOD for q in qs)


def check_numbers(result: dict, counts: tuple[int, int, int, int]) -> None:
    """The result's counts and percentages are these counts; correct_t1 + fixed_t2 + still wrong = N."""
    n, t1, fixed, still = counts
    assert (result["n"], result["t1_correct"], result["t2_fixed"]) == (n, t1, fixed) and t1 + fixed + still == n
    assert result["acc_t1"] == 100.0 * t1 / n and result["acc_t2"] == 100.0 * (t1 + fixed) / n
    assert result["delta"] == 100.0 * fixed / n
    assert abs(result["delta"] - (result["acc_t2"] - result["acc_t1"])) < 1e-9


def check_errors(records: list[dict], plan: dict) -> None:
    """Unparsable answers and answers the checker raised on are wrong, with their reason in ``error``."""
    for r in records:
        for entry, code in zip(r["output"], [plan[qnum(r)]["t1"], plan[qnum(r)]["t2"][0]]):
            assert entry["is_correct"] == (code in GOOD)
            assert bool(entry.get("forced_action")) == code.startswith("F")
            if code == "B":
                assert entry["error"].startswith("verification failed: ValueError")
            elif code in ("FN", "N"):
                assert entry["generated_answer"] is None and entry["error"].startswith("no answer")
            else:
                assert entry["error"] is None


def qnum(rec: dict) -> int:
    return int(re.match(r"QUESTION-(\d+):", rec["question"]).group(1))


# ------------------------------------------------------------------------------------------- 1 and 5: the numbers
def test_result_json_is_the_recount_of_its_raw_records_in_every_mode(tmp_path):
    for seed in range(30):
        rng = random.Random(seed)
        mode = MODES[seed % 3]
        items = make_items(rng, rng.randint(1, 9))
        plan = make_plan(rng, items, mode)
        trial, refl = engines(mode, plan)
        out = tmp_path / f"r{seed}.json"
        # eval asks for ONE reflection per failure whatever n_reflections the config had
        returned = run_eval(TASK, items, trial, refl, TOK, out, cfg(mode, rng.randint(1, 4), n_reflections=3),
                            log=None)
        result = json.loads(out.read_text())
        assert result == json.loads(json.dumps(returned, default=str))
        assert result["settings"]["reflector_mode"] == mode
        records = read_jsonl(raw_path_for(out))
        assert [r["id"] for r in records] == [it["id"] for it in items]
        assert [len(r["output"]) for r in records] == [1 if plan[qnum(r)]["t1"] in GOOD else 2 for r in records]
        check_numbers(result, recount(records))
        check_numbers(result, expected(plan, list(range(len(items)))))
        check_errors(records, plan)
        assert result["forced_actions"] == sum(bool(o.get("forced_action")) for r in records for o in r["output"])
        phases = {"none": "trial2", "two-stage": "reflect", "one-stage": "one-stage"}[mode]
        asked = [q for phase, q in (refl or trial).calls if phase == phases]
        assert sorted(asked) == sorted(q for q in plan if plan[q]["t1"] not in GOOD)


def test_acc_t2_counts_only_the_first_reflections_trial_2(tmp_path):
    """Generate records carry one trial 2 per reflection; Acc@t2 takes the first, whatever the others did."""
    for seed in range(12):
        rng = random.Random(100 + seed)
        items, k = make_items(rng, rng.randint(2, 8)), rng.randint(2, 4)
        plan = make_plan(rng, items, k=k)
        plan[0]["t1"], plan[0]["t2"] = "W", ["W"] + ["R"] * (k - 1)       # only later reflections fix it
        plan[1]["t1"], plan[1]["t2"] = "FW", ["FR"] + ["W"] * (k - 1)      # only the first one fixes it
        eng, raw = PlanEngine(plan), tmp_path / f"g{seed}.jsonl"
        ReflectLoop(TASK, eng, eng, TOK, LoopConfig(n_reflections=k, chunk_size=rng.randint(1, 3)), log=None).run(
            items, raw)
        records = read_jsonl(raw)
        for r in records:
            spec = plan[qnum(r)]
            if spec["t1"] in GOOD:
                continue
            assert len(r["output"]) == 1 + k
            for j, entry in enumerate(r["output"][1:]):
                assert entry["reflections"] == [f"reflection {j} on Q{qnum(r)}"]
                assert entry["is_correct"] == (spec["t2"][j] in GOOD)
        result = evaluate_file(raw, TASK)
        check_numbers(result, recount(records))
        check_numbers(result, expected(plan, list(range(len(items)))))


# ------------------------------------------------------------------------------------------- 2 and 5: the CLI
def _cli(monkeypatch, plan: dict, one_stage: bool):
    """``reflectevo eval`` with the model loading replaced by the scripted engines (and the fragile checker)."""
    from reflectevo import cli_loop
    import reflectevo.data as data

    monkeypatch.setattr(cli_loop, "load_generation_model", lambda *a, **k: (SimpleNamespace(), TOK))
    monkeypatch.setattr(cli_loop, "build_engines", lambda *a, **k: engines("one-stage" if one_stage else "", plan))
    monkeypatch.setattr(data, "get_task", lambda name, **kw: FragileArithmetic(**kw))


def one_stage_adapter(tmp_path) -> str:
    adapter = tmp_path / "run1" / "adapter"
    adapter.mkdir(parents=True, exist_ok=True)
    (adapter / "adapter_config.json").write_text("{}")
    (adapter.parent / "config.json").write_text(json.dumps({"kind": "sft", "mode": "one-stage"}))
    return str(adapter)


@pytest.mark.parametrize("flag", ["auto", "auto+adapter", "two-stage", "one-stage", "none"])
def test_cli_limit_order_and_denominator(flag, tmp_path, monkeypatch, capsys):
    from reflectevo.cli import main

    mode = {"auto": "two-stage", "auto+adapter": "one-stage"}.get(flag, flag)
    for seed in range(4):
        rng = random.Random(f"{flag}-{seed}")
        items = make_items(rng, rng.randint(1, 8))
        rng.shuffle(items)   # file order is not question-number order
        (data := tmp_path / f"d{seed}.jsonl").write_text("".join(json.dumps(it) + "\n" for it in items))
        plan = make_plan(rng, sorted(items, key=qnum), mode)
        limit = rng.randint(1, len(items) + 2)
        _cli(monkeypatch, plan, mode == "one-stage")
        out = tmp_path / f"{seed}" / "res.json"
        argv = ["eval", "--task", "arithmetic", "--data", str(data), "--limit", str(limit), "--out", str(out),
                "--kv-cache-gib", "1", "--chunk-size", str(rng.randint(1, 3)), "--no-progress"]
        argv += ["--reflector-mode", flag] if not flag.startswith("auto") else []
        argv += ["--adapter", one_stage_adapter(tmp_path)] if flag == "auto+adapter" else []
        assert main(argv) == 0, capsys.readouterr().err
        assert f"eval: reflector mode {mode} (" in capsys.readouterr().err
        result = json.loads(out.read_text())
        assert result["reflector_mode"] == result["settings"]["reflector_mode"] == mode
        assert json.loads(settings_path_for(out).read_text())["reflector_mode"] == mode
        wanted = items[:limit]
        records = read_jsonl(raw_path_for(out))
        assert [(r["id"], r["question"]) for r in records] == [(it["id"], it["question"]) for it in wanted]
        check_numbers(result, recount(records))
        check_numbers(result, expected(plan, [qnum(it) for it in wanted]))
        check_errors(records, plan)


def test_cli_a_malformed_data_line_inside_the_limit_stops_the_run(tmp_path, monkeypatch, capsys):
    from reflectevo.cli import main

    rng = random.Random(7)
    items, bad = make_items(rng, 6), rng.randint(1, 4)
    lines = [json.dumps(it) + "\n" for it in items]
    lines[bad] = lines[bad][: len(lines[bad]) // 2] + "\n"
    (data := tmp_path / "d.jsonl").write_text("".join(lines))
    _cli(monkeypatch, make_plan(rng, items), False)
    for limit in range(1, len(items) + 1):
        out = tmp_path / f"l{limit}" / "res.json"
        rc = main(["eval", "--task", "arithmetic", "--data", str(data), "--limit", str(limit), "--out", str(out),
                   "--kv-cache-gib", "1", "--no-progress"])
        err = capsys.readouterr().err
        if limit <= bad:   # the first `limit` questions parse: they are the run
            assert rc == 0 and json.loads(out.read_text())["n"] == limit
        else:              # never a silently smaller N
            assert rc == 2 and f"{data}:{bad + 1}: malformed JSON" in err
            assert not out.exists() and not raw_path_for(out).exists()


# ------------------------------------------------------------------------------------------- 3: killed and resumed
def _comparable(result: dict) -> dict:
    return {k: v for k, v in result.items() if k not in ("raw", "seconds")}


def test_a_run_killed_at_any_byte_and_resumed_ends_as_an_uninterrupted_one(tmp_path):
    kinds = ("boundary", "mid-line", "before-newline", "anywhere")
    for seed in range(24):
        rng = random.Random(200 + seed)
        mode, kind = MODES[seed % 3], kinds[(seed // 3) % 4]
        items = make_items(rng, rng.randint(2, 9))
        plan = make_plan(rng, items, mode)
        chunk = rng.randint(1, 4)
        work = tmp_path / f"s{seed}"
        work.mkdir()
        cache0 = work / "c0.jsonl"
        if rng.random() < 0.5:   # a cache another setting filled with some trial 1s
            subset = rng.sample(items, rng.randint(1, len(items)))
            t1_only = {q: {**spec, "t2": ["W"]} for q, spec in plan.items()}   # trial 1 as this setting's
            run_eval(TASK, subset, *engines("none", t1_only), TOK, work / "other.json", cfg("none"), log=None,
                     trial1_cache=cache0)
        start = cache0.read_bytes() if cache0.exists() else b""
        (work / "ca.jsonl").write_bytes(start)
        full = run_eval(TASK, items, *engines(mode, plan), TOK, work / "a.json", cfg(mode, chunk), log=None,
                        trial1_cache=work / "ca.jsonl")
        # what the uninterrupted run wrote, in order: per chunk its raw lines, then its new cache lines
        raw_lines = raw_path_for(work / "a.json").read_bytes().splitlines(keepends=True)
        new_cache = (work / "ca.jsonl").read_bytes().splitlines(keepends=True)[len(start.splitlines()):]
        index = {it["id"]: i for i, it in enumerate(items)}
        events = []
        for c in range((len(items) + chunk - 1) // chunk):
            events += [("raw", line) for i, line in enumerate(raw_lines) if i // chunk == c]
            events += [("cache", line) for line in new_cache if index[json.loads(line)["id"]] // chunk == c]
        e = rng.randrange(len(events))
        size = len(events[e][1])
        cut = {"boundary": 0, "mid-line": rng.randint(1, size - 2), "before-newline": size - 1,
               "anywhere": rng.randint(0, size)}[kind]
        written = {"raw": b"", "cache": start}
        for what, line in events[:e]:
            written[what] += line
        written[events[e][0]] += events[e][1][:cut]
        raw_b = raw_path_for(work / "b.json")
        if written["raw"] or events[e][0] == "raw":
            raw_b.write_bytes(written["raw"])
        shutil.copy(settings_path_for(work / "a.json"), settings_path_for(work / "b.json"))
        (work / "cb.jsonl").write_bytes(written["cache"])
        part = run_eval(TASK, items, *engines(mode, plan), TOK, work / "b.json", cfg(mode, rng.randint(1, 4)),
                        log=None, resume=True, trial1_cache=work / "cb.jsonl")
        where = f"seed {seed}: mode {mode}, kill in event {e} ({events[e][0]}) at byte {cut}/{size}"
        on_disk = [_comparable(json.loads((work / f"{x}.json").read_text())) for x in "ab"]
        assert _comparable(part) == _comparable(full) == on_disk[0] == on_disk[1], where
        assert raw_b.read_bytes() == raw_path_for(work / "a.json").read_bytes(), where
        check_cache(work / "cb.jsonl")
        assert load_trial1_cache(work / "cb.jsonl") == load_trial1_cache(work / "ca.jsonl"), where


def check_cache(path: Path) -> None:
    """Every line a whole record, one line per (id, question), each a trial-1 entry."""
    data = path.read_bytes()
    records = read_jsonl(path) if data else []
    assert not data or data.endswith(b"\n")
    assert len({(repr(r["id"]), r["question"]) for r in records}) == len(records)
    assert all(len(r["output"]) == 1 and r["output"][0]["trail"] == 1 for r in records)


def test_resume_with_another_limit_reports_the_questions_of_this_run(tmp_path):
    """A resume under another --limit reports its own first N questions (the raw file may hold more)."""
    for seed in range(10):
        rng = random.Random(400 + seed)
        mode = MODES[seed % 3]
        items = make_items(rng, rng.randint(2, 9))
        plan = make_plan(rng, items, mode)
        l1, l2 = rng.randint(1, len(items)), rng.randint(1, len(items))
        work = tmp_path / f"s{seed}"
        run_eval(TASK, items[:l1], *engines(mode, plan), TOK, work / "a.json", cfg(mode, rng.randint(1, 3)), log=None)
        trial, refl = engines(mode, plan)
        resumed = run_eval(TASK, items[:l2], trial, refl, TOK, work / "a.json", cfg(mode), log=None, resume=True)
        fresh = run_eval(TASK, items[:l2], *engines(mode, plan), TOK, work / "f.json", cfg(mode), log=None)
        assert _comparable(resumed) == _comparable(fresh)
        assert sorted(q for phase, q in trial.calls if phase == "trial1") == list(range(l1, l2))
        records = read_jsonl(raw_path_for(work / "a.json"))
        assert [r["id"] for r in records] == [it["id"] for it in items[:max(l1, l2)]]
        check_numbers(resumed, recount(records[:l2]))


# ------------------------------------------------------------------------------------------- 4: the trial-1 cache
def test_a_shared_trial1_cache_gives_every_setting_the_same_trial1(tmp_path):
    for seed in range(15):
        rng = random.Random(300 + seed)
        items = make_items(rng, rng.randint(2, 9))
        mx, my, mz = rng.sample(MODES, 3)   # three settings; Y's and Z's models would answer trial 1 otherwise
        px, py, pz = (make_plan(rng, items, m) for m in (mx, my, mz))
        work = tmp_path / f"s{seed}"
        cache = work / "t1.jsonl"
        first = rng.sample(items, rng.randint(1, len(items)))
        run_eval(TASK, first, *engines(mx, px), TOK, work / "x.json", cfg(mx, rng.randint(1, 3)), log=None,
                 trial1_cache=cache)
        x = {r["id"]: r for r in read_jsonl(raw_path_for(work / "x.json"))}
        if rng.random() < 0.5:   # a writer killed mid-line left a torn last line
            with open(cache, "ab") as f:
                f.write(b'{"id": "item-torn", "question": "QUEST')
        second = items[:]
        rng.shuffle(second)
        trial, refl = engines(my, py)
        ry = run_eval(TASK, second, trial, refl, TOK, work / "y.json", cfg(my, rng.randint(1, 3)), log=None,
                      trial1_cache=cache)
        y = read_jsonl(raw_path_for(work / "y.json"))
        assert [r["id"] for r in y] == [it["id"] for it in second]
        for r in y:
            if r["id"] in x:   # the cached trial 1, as setting X computed it
                assert r["output"][0] == x[r["id"]]["output"][0] and r.get("trial1_from_cache") is True
            else:
                assert "trial1_from_cache" not in r and r["output"][0]["is_correct"] == (py[qnum(r)]["t1"] in GOOD)
        t1_asked = sorted(q for phase, q in trial.calls if phase == "trial1")
        assert t1_asked == sorted(qnum(it) for it in items if it["id"] not in x)
        assert ry["trial1_from_cache"] == len(x)
        check_numbers(ry, recount(y))
        check_cache(cache)
        assert {k[0] for k in load_trial1_cache(cache)} == {repr(it["id"]) for it in items}
        # a third setting on the full cache: the same trial 1 as Y, nothing computed or appended
        before = cache.read_bytes()
        trial_z, refl_z = engines(mz, pz)
        rz = run_eval(TASK, items, trial_z, refl_z, TOK, work / "z.json", cfg(mz), log=None, trial1_cache=cache)
        assert cache.read_bytes() == before and not [c for c in trial_z.calls if c[0] == "trial1"]
        z = {r["id"]: r for r in read_jsonl(raw_path_for(work / "z.json"))}
        assert all(z[r["id"]]["output"][0] == r["output"][0] for r in y)
        assert (rz["t1_correct"], rz["acc_t1"], rz["trial1_from_cache"]) == (ry["t1_correct"], ry["acc_t1"], len(items))
        # a run's raw file as the cache of another setting: read, never written (not even a torn last line: the
        # run may be writing it; the regression test below)
        raw_x = raw_path_for(work / "x.json")
        line = raw_x.read_bytes().splitlines(keepends=True)[-1]
        cut = rng.randint(1, len(line) - 2)
        with open(raw_x, "ab") as f:
            f.write(line[:cut])
        kept = raw_x.read_bytes()
        run_eval(TASK, items, *engines(my, py), TOK, work / "w.json", cfg(my), log=None, trial1_cache=raw_x)
        assert raw_x.read_bytes() == kept
        w = {r["id"]: r for r in read_jsonl(raw_path_for(work / "w.json"))}
        assert all(w[i]["output"][0] == x[i]["output"][0] for i in x)


class Interleaved(PlanEngine):
    """A setting X paused before its second trial-1 batch while ``other()`` (setting Y, same cache) runs whole."""

    def __init__(self, plan, other):
        super().__init__(plan)
        self.other, self.batches = other, 0

    def generate(self, prompts, params=None, **kw):
        texts = [TOK.decode(ids) for ids in prompts]
        self.batches += all(t.count("<user>") == 1 and not t.endswith("Action:") for t in texts)   # trial 1s
        if self.batches == 2 and self.other:
            self.other, other = None, self.other
            other()
        return super().generate(prompts, params, **kw)


def test_two_settings_writing_one_cache_in_turns_keep_it_readable_and_agree(tmp_path):
    """Two runs on one cache, the second started while the first is between chunks: both append (the first does
    not see the second's lines, so a question may be there twice, which the cache allows: the later line wins),
    every line stays whole, and both settings get the same trial 1 for every question."""
    for seed in range(10):
        rng = random.Random(500 + seed)
        items = make_items(rng, rng.randint(3, 9))
        mx, my = rng.sample(MODES, 2)
        px, py = make_plan(rng, items, mx), make_plan(rng, items, my)
        for q in py:   # the same base model: the same trial 1
            py[q]["t1"] = px[q]["t1"]
        work = tmp_path / f"s{seed}"
        cache, ys = work / "t1.jsonl", items[:]
        rng.shuffle(ys)

        def run_y():
            run_eval(TASK, ys, *engines(my, py), TOK, work / "y.json", cfg(my, rng.randint(1, 3)), log=None,
                     trial1_cache=cache)

        trial = Interleaved(px, run_y)
        refl = {"none": None, "one-stage": PlanEngine(px, one_stage=True)}.get(mx, trial)
        rx = run_eval(TASK, items, trial, refl, TOK, work / "x.json", cfg(mx, rng.randint(1, len(items) - 1)),
                      log=None, trial1_cache=cache)
        assert trial.batches >= 2 and (work / "y.json").exists()
        entries = {}
        for r in read_jsonl(cache):   # every line whole; a question there twice has the same entry twice
            assert entries.setdefault((repr(r["id"]), r["question"]), r["output"][0]) == r["output"][0]
        assert {k[0] for k in entries} == {repr(it["id"]) for it in items}
        x = {r["id"]: r["output"][0] for r in read_jsonl(raw_path_for(work / "x.json"))}
        y = {r["id"]: r["output"][0] for r in read_jsonl(raw_path_for(work / "y.json"))}
        assert x == y
        ry = json.loads((work / "y.json").read_text())
        assert (rx["t1_correct"], rx["acc_t1"]) == (ry["t1_correct"], ry["acc_t1"])


def test_regression_a_runs_raw_file_as_the_cache_keeps_its_torn_last_line(tmp_path):
    """The raw file of a run (X) is only read when another setting (Y) uses it as the trial-1 cache: Y used to cut
    off its torn last line (repair_tail, for writers), so the rest X then wrote began a malformed line mid-file."""
    rng = random.Random(0)
    items = make_items(rng, 3)
    plan = make_plan(rng, items)
    run_eval(TASK, items[:2], *engines("none", plan), TOK, tmp_path / "x.json", cfg("none"), log=None)
    raw_x = raw_path_for(tmp_path / "x.json")
    line = raw_x.read_bytes().splitlines(keepends=True)[0]
    with open(raw_x, "ab") as f:   # X is writing its next record (or was killed doing so)
        f.write(line[:40])
    kept = raw_x.read_bytes()
    ry = run_eval(TASK, items, *engines("two-stage", plan), TOK, tmp_path / "y.json", cfg("two-stage"), log=None,
                  trial1_cache=raw_x)
    assert raw_x.read_bytes() == kept and ry["trial1_from_cache"] == 2
    with open(raw_x, "ab") as f:   # X finishes the line: its file is whole
        f.write(line[40:])
    assert len(read_jsonl(raw_x)) == 3
