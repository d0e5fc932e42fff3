"""Records of the generate loop: trial transcripts, answer fields, worked examples vs. generated items."""
from reflectevo.data import get_task
from reflectevo.data.jsonl import read_jsonl
from reflectevo.data.prompts import DEFAULT as P

from test_loop import ITEMS, ScriptedEngine, make_loop, script_a


def test_inline_action_label_is_not_kept_in_the_thought(tmp_path):
    """A model that writes "... Action: Finish[X]" on one line gets a transcript with ONE Action label."""
    for name, text, action in [("arithmetic", " 6 + 3 = 9. Action: Finish[9]", "Finish[9]"),
                               ("math", " so x = 5. action:Finish<<<5>>>", "Finish<<<5>>>"),
                               ("mbpp", " easy. Action: [BEGIN]\ndef f():\n    return 1\n[END]",
                                "[BEGIN]\ndef f():\n    return 1\n[END]")]:
        trial = P.parse_trial(get_task(name), text)
        assert trial.action == action and "action" not in trial.thought.lower()
        assert P.transcript(trial, False).count("Action:") == 1
    # a thought that merely talks about an action keeps its words
    trial = P.parse_trial(get_task("arithmetic"), " the course of action: add them. Finish[9]")
    assert trial.thought == "the course of action: add them."
    # so the raw records (reflection prompts, trial 2 prompts, D+ transcripts) have no "Action:\nAction:"
    make_loop(ScriptedEngine(script_a)).run(ITEMS, tmp_path / "raw.jsonl")
    for rec in read_jsonl(tmp_path / "raw.jsonl"):
        for out in rec["output"]:
            assert out["scratchpad"].count("Action:") == 1, out["scratchpad"]
            assert "Action:\nAction:" not in out["reason_prompt"] + out["reflection_prompt"]


def test_generated_arithmetic_items_are_never_worked_examples():
    """The worked examples of the trial prompt must not be questions of the run (with their answers)."""
    from reflectevo.data.fewshot import EXAMPLES
    from reflectevo.data.tasks import _NAMES

    shown = {question for question, _, _ in EXAMPLES["arithmetic"]}
    for difficulty in (1, 2):
        task = get_task("arithmetic", difficulty=difficulty)
        assert not [it["id"] for it in task.load(limit=400) if it["question"] in shown]
        assert not [it["id"] for it in task.load(limit=400) if it["question"] in P.prefix(task)]
    # and none can be generated at all: every generated question names its person from the generator's pool
    for question in shown:
        assert question.split()[0] not in _NAMES
