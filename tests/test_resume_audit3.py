"""An eval killed mid-run and resumed ends with the same RESULT.json as the uninterrupted run (but for the run's
own path and time), in every reflector mode, with an empty or a filled trial-1 cache: ``forced_actions`` and
``trial1_from_cache`` count the trials of the result's questions (from their raw records), not what the last
invocation happened to compute."""
from __future__ import annotations

import json

import pytest

from reflectevo.data.eval_run import raw_path_for, run_eval
from reflectevo.data.jsonl import read_jsonl
from reflectevo.data.loop import LoopConfig
from test_no_reflection import ITEMS, TASK, TOK
from test_no_reflection import Engine as RetryEngine
from test_one_stage import Engine as OneStageEngine

# trial 1 without an action for q1 (the forced action, in the first chunk, answers it), trial 2 without one for q3
# (forced, modes none and two-stage)


class Engine(RetryEngine):
    def generate(self, prompts, params=None, **kw):
        outs = super().generate(prompts, params, **kw)
        for ids, o in zip(prompts, outs):
            text = TOK.decode(ids)
            if text.count("<user>") == 1 and "QUESTION-1:" in text and not text.endswith("Action:"):
                o[0].text = " I cannot tell."
        return outs


class Killed(Exception):
    pass


def dying(engine):
    """``engine``, killed by the first request on a question of the second chunk (q2, q3)."""
    class Dying:
        def generate(self, prompts, params=None, **kw):
            if any(f"QUESTION-{q}:" in TOK.decode(ids) for ids in prompts for q in (2, 3)):
                raise Killed
            return engine.generate(prompts, params, **kw)
    return Dying()


def cfg(mode):
    return LoopConfig(reflector_mode=mode, chunk_size=2, reasoning_source="base",
                      reflection_source="base" if mode != "one-stage" else "base + A")


def engines(mode):
    return (Engine(), OneStageEngine()) if mode == "one-stage" else (Engine(), Engine())


def comparable(result):
    return {k: v for k, v in result.items() if k not in ("raw", "seconds")}


@pytest.mark.parametrize("filled", [False, True])
@pytest.mark.parametrize("mode", ["none", "one-stage", "two-stage"])
def test_a_killed_and_resumed_eval_writes_the_result_of_an_uninterrupted_one(mode, filled, tmp_path):
    def cache(name):
        path = tmp_path / name
        if filled:   # a trial-1 cache from another setting, holding the first three questions
            seed = tmp_path / f"seed_{name}.json"
            run_eval(TASK, ITEMS[:3], *engines("none"), TOK, seed, cfg("none"), log=None)
            path.write_text("".join(json.dumps({k: r[k] for k in ("id", "question", "answer")}
                                               | {"output": r["output"][:1]}) + "\n"
                                    for r in read_jsonl(raw_path_for(seed))))
        return path

    full = run_eval(TASK, ITEMS, *engines(mode), TOK, tmp_path / "full.json", cfg(mode), log=None,
                    trial1_cache=cache("c_full.jsonl"))
    assert full["forced_actions"] >= 1
    trial, second = engines(mode)
    with pytest.raises(Killed):   # dies in the second chunk, after the first chunk's records are on disk
        run_eval(TASK, ITEMS, dying(trial), dying(second), TOK, tmp_path / "part.json",
                 cfg(mode), log=None, trial1_cache=cache("c_part.jsonl"))
    assert len(read_jsonl(tmp_path / "part.raw.jsonl")) == 2
    part = run_eval(TASK, ITEMS, *engines(mode), TOK, tmp_path / "part.json", cfg(mode), log=None, resume=True,
                    trial1_cache=tmp_path / "c_part.jsonl")
    assert comparable(part) == comparable(full)
    assert part["trial1_from_cache"] == (3 if filled else 0)
    strip = (lambda path: path.read_text().replace("part", "X").replace("full", "X"))
    assert strip(tmp_path / "part.raw.jsonl") == strip(tmp_path / "full.raw.jsonl")
