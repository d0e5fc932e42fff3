"""One-stage eval (``--reflector-mode one-stage``) forces the action of an attempt that stopped before it, as the
other modes do for every trial: one greedy call on the reflector continuing the one-stage prompt + the reply +
"\\nAction:", with the settings of the loop's forced action; the trial 2 it fixes is verified, counted, and says
``forced_action: true``; a reply without an attempt stays wrong; a killed and resumed run gives the same result."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from reflectevo.data.eval_run import run_eval
from reflectevo.data.forced import action_cue
from reflectevo.data.jsonl import read_jsonl
from reflectevo.data.loop import LoopConfig
from reflectevo.data.prompts import DEFAULT as P
from test_one_stage import ITEMS, TASK, TOK

REPLIES = {  # trial 1: Q0 right, the others wrong; one-stage replies:
    1: "I misread the count.\n\nThought: recount gives 11.",                 # no Action line: forced -> 11 (right)
    2: "Sum slip.\n\nThought: it is 12 after all.\nAction:",                # an empty Action line: forced after it
    3: "I misread the count and will recount next time.",                  # no attempt at all: wrong, nothing forced
    4: "Sum slip.\nThought: 14\nAction: Finish[14]",                         # an action: nothing forced (right)
}
FORCED = {1: " Finish[11]", 2: " Finish[99]"}


class Engine:
    """Scripted on the question number; ``calls``: (phase, question, params, prompt text)."""

    def __init__(self, replies=REPLIES, die_on=()):
        self.replies, self.die_on, self.calls = replies, die_on, []

    def generate(self, prompts, params=None, **kw):
        plist = params if isinstance(params, list) else [params] * len(prompts)
        outs = []
        for ids, sp in zip(prompts, plist):
            text = TOK.decode(ids)
            q = int(text.rsplit("QUESTION-", 1)[1].split(":")[0])
            if q in self.die_on:
                raise KeyboardInterrupt
            if text.count("<user>") == 1:
                phase, reply = "trial1", f" let me think. Action: Finish[{10 if q == 0 else 98}]"
            elif text.endswith("Action:"):
                phase, reply = "forced", FORCED[q]
            else:
                assert P.reflect_and_retry_request(TASK, ITEMS[q]) in text.rsplit("<user>", 1)[1]
                phase, reply = "one-stage", self.replies[q]
            self.calls.append((phase, q, sp, text))
            outs.append([SimpleNamespace(text=reply, token_ids=TOK.encode(reply), finish_reason="stop")])
        return outs

    def phase(self, name):
        return {q: (sp, text) for p, q, sp, text in self.calls if p == name}


def cfg(**kw):
    return LoopConfig(reflector_mode="one-stage", reasoning_source="base", reflection_source="base + A",
                      max_tokens=40, action_max_tokens=7, **kw)


def test_an_attempt_without_its_action_gets_the_forced_action_on_the_reflector(tmp_path):
    trial, model = Engine(), Engine()
    res = run_eval(TASK, ITEMS, trial, model, TOK, tmp_path / "r.json", cfg(), log=None)
    assert not trial.phase("forced") and set(model.phase("forced")) == {1, 2}      # on the reflector, 1 and 2 only
    raw = {r["id"]: r for r in read_jsonl(tmp_path / "r.raw.jsonl")}
    for q, (sp, text) in model.phase("forced").items():
        t2 = raw[f"q{q}"]["output"][1]
        # the continuation of the same prompt: the one-stage prompt + the whole reply + the cue
        assert text == t2["reason_prompt"] + action_cue(REPLIES[q]) and t2["one_stage_output"] == REPLIES[q]
        assert text.endswith(REPLIES[q] + "\nAction:" if q == 1 else REPLIES[q])
        # the loop's forced-action settings (greedy, action_max_tokens, the line break and the trial stops)
        assert (sp.temperature, sp.max_tokens, sp.n) == (0.0, 7, 1)
        assert sp.stop == ["\n"] + P.stop_sequences(TASK)
        assert t2["forced_action"] is True
    got = {q: (raw[f"q{q}"]["output"][1]["generated_answer"], raw[f"q{q}"]["output"][1]["is_correct"],
               raw[f"q{q}"]["output"][1].get("forced_action", False)) for q in (1, 2, 3, 4)}
    assert got == {1: ("11", True, True), 2: ("99", False, True), 3: (None, False, False), 4: ("14", True, False)}
    t2 = raw["q1"]["output"][1]
    assert t2["reflections"] == ["I misread the count."]
    assert t2["scratchpad"] == "Thought: recount gives 11.\nAction: Finish[11]\n" + P.templates["observation_correct"]
    assert "no attempt after its reflection" in raw["q3"]["output"][1]["error"]
    assert (res["acc_t1"], res["acc_t2"], res["t2_fixed"], res["forced_actions"]) == (20.0, 60.0, 2, 2)
    # LoopConfig.force_action=False turns it off here too: those attempts have no answer
    model = Engine()
    res = run_eval(TASK, ITEMS, Engine(), model, TOK, tmp_path / "off.json", cfg(force_action=False), log=None)
    assert not model.phase("forced") and res["forced_actions"] == 0 and res["acc_t2"] == 40.0
    raw = {r["id"]: r for r in read_jsonl(tmp_path / "off.raw.jsonl")}
    assert "no valid action in its attempt" in raw["q1"]["output"][1]["error"]


@pytest.mark.parametrize("cached", [False, True])
def test_a_killed_and_resumed_one_stage_eval_with_forced_actions_writes_the_same_result(cached, tmp_path):
    def run(name, model, **kw):   # cached: each run with its own (empty) trial-1 cache file
        return run_eval(TASK, ITEMS, Engine(), model, TOK, tmp_path / f"{name}.json", cfg(chunk_size=2), log=None,
                        trial1_cache=(tmp_path / f"{name}_t1.jsonl") if cached else None, **kw)

    full = run("full", Engine())
    assert full["forced_actions"] == 2
    with pytest.raises(KeyboardInterrupt):   # dies on q2, in the second chunk: q0, q1 (one forced action) on disk
        run("part", Engine(die_on=(2,)))
    assert len(read_jsonl(tmp_path / "part.raw.jsonl")) == 2
    part = run("part", Engine(), resume=True)
    assert {k: v for k, v in part.items() if k not in ("raw", "seconds")} == \
        {k: v for k, v in full.items() if k not in ("raw", "seconds")}
    assert (tmp_path / "part.raw.jsonl").read_text() == (tmp_path / "full.raw.jsonl").read_text()
