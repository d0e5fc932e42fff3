"""Eval's conversations for records that store none (the paper's released D+ / D± / Dpref data), from their fields.

The official records keep the question, the failed trial-1 transcript (``first_trial_reasoning``), the
reflection(s) and the data-generation prompts, but none of the prompts ``reflectevo eval`` sends (our loop's
records store those: ``test_reflection_prompt``, ``test_trial2_prompt``). Given the task, the same ``Prompts``
methods and the same ``PromptBuilder.render`` eval uses (``loop.py``, ``one_stage.py``) build them here:

    reflect    [user: trial prompt, assistant: trial-1 transcript, user: test-time reflection request]
               (the reflector's prompt in two-stage eval, and the DPO pairs' prompt)
    one-stage  [user: trial prompt, assistant: trial-1 transcript, user: reflect_and_retry_request]
    trial2     [... reflect ..., assistant: the record's reflection, user: retry request] + "Thought:"

rendered with the given tokenizer's chat template: for the trained model's tokenizer, the text (and so the ids)
eval sends that model after the same trial 1.

* The trial-1 transcript is the one eval writes for that trial: eval parses what the model generated
  (``Prompts.parse_trial``) and keeps ``Prompts.transcript(trial, correct)``, "Thought: ...\\nAction: <the answer
  in the task's syntax>\\n<our observation line>". The official text ("\\nThought: \\n\\n...\\n\\nAction: \\nFinish[A]
  \\n\\nObservation: Answer is INCORRECT") goes through the same two functions: its own observation line is left
  out by the parse, ours ("Observation: The answer is wrong.") ends it. These records exist because trial 1
  failed, so the observation is always the wrong-answer one.
* The question is the one eval shows (the task's ``item["question"]``): for MBPP the description followed by the
  asserts the code must pass (``tasks.mbpp_question``). A record whose question already holds them (ours) is
  kept; else its ``test_list`` is added; without one the prompt cannot be eval's (:class:`MissingField`).
"""
from __future__ import annotations

from .conversation import PromptBuilder
from .jsonl import DataError
from .prompts import DEFAULT, Prompts, _task_name, _trial1_transcript
from .tasks import mbpp_question

__all__ = ["KINDS", "MissingField", "eval_item", "trial1_transcript", "eval_messages", "eval_prompt"]

KINDS = ("reflect", "one-stage", "trial2")
_TESTS_HEAD = mbpp_question("\0", ["\0"]).split("\0")[1].strip()    # "Your code should pass these tests:"


class MissingField(DataError):
    """A record lacks a field eval's prompt needs (``field`` names it)."""

    def __init__(self, field: str, why: str):
        super().__init__(f"missing field {field!r} ({why})")
        self.field = field


def _text_field(record: dict, name: str, why: str) -> str:
    value = record.get(name)
    if isinstance(value, list):
        value = next((v for v in reversed(value) if isinstance(v, str) and v.strip()), None)
    if not isinstance(value, str) or not value.strip():
        raise MissingField(name, why)
    return value


def eval_item(task, record: dict) -> dict:
    """The record as eval's item of ``task`` (a task or a task name): its ``question`` the text eval shows."""
    question = _text_field(record, "question", "the question of eval's trial prompt")
    if _task_name(task) != "mbpp" or _TESTS_HEAD in question:
        return record
    tests = record.get("test_list")
    if isinstance(tests, str):
        tests = [t for t in tests.splitlines() if t.strip()]
    if not isinstance(tests, list) or not tests or not all(isinstance(t, str) for t in tests):
        raise MissingField("test_list", "eval's mbpp trial prompt shows the asserts the code must pass; the "
                                        "question does not hold them")
    return {**record, "question": mbpp_question(question, tests)}


def trial1_transcript(task, record: dict, prompts: Prompts | None = None) -> str:
    """The record's failed trial 1 as eval's transcript of it (module docstring)."""
    P, text = prompts or DEFAULT, _trial1_transcript(record)
    if not isinstance(text, str) or not text.strip():
        raise MissingField("first_trial_reasoning", "the failed trial 1 of eval's conversation")
    return P.transcript(P.parse_trial(task, text), False)


def eval_messages(kind: str, task, record: dict, prompts: Prompts | None = None) -> tuple[list[dict], str]:
    """(chat messages, the opened start of the assistant turn) of eval's ``kind`` prompt for ``record``."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    P = prompts or DEFAULT
    item = eval_item(task, record)
    transcript = trial1_transcript(task, record, P)
    if kind == "one-stage":
        return P.one_stage_messages(task, item, transcript), ""
    reflect = P.test_reflection_messages(task, item, transcript)
    if kind == "reflect":
        return reflect, ""
    reflection = _text_field(record, "reflections", "the reflection trial 2 answers with")
    return P.trial2_messages(item, reflect, reflection), P.response_prefix


def eval_prompt(kind: str, task, record: dict, tokenizer, prompts: Prompts | None = None) -> tuple[str, str]:
    """(eval's ``kind`` prompt for ``record`` rendered with ``tokenizer``'s chat template, its opened start of the
    assistant turn: "Thought:" for trial 2, else "")."""
    messages, opener = eval_messages(kind, task, record, prompts)
    return PromptBuilder(tokenizer).render(messages, opener), opener
