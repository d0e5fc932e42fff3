"""Prompt texts (our own wording, the paper's structure), answer extraction and observations.

Pieces: the trial prompt (instructions, per-task answer syntax, worked examples, the question), the trial-2
prompt (the same prefix, the question, a header saying the reflection below helps fix the failed solution,
the reflection, a note that the previous attempt failed, the failed trial-1 transcript, the question again),
the data-generation reflection prompt (with one demand of the instruction pool, ~100 words, no answer) and
the shorter test-time reflection prompt (no demand). Answer syntax: ``Finish[X]`` (logiqa, bigbench,
bigbench-free, arithmetic), ``Finish<<<X>>>`` (math), code between ``[BEGIN]`` and ``[END]`` (mbpp).

The instructions and worked examples come first and do not depend on the question, so every prompt of a
task starts with the same text (good for the sampler's prefix cache). Chat templating is the caller's job:
``*_messages`` return ``[{"role": "user", "content": text}]``.

Templates can be replaced from a JSON file mapping prompt name -> template (``load_prompt_overrides``), e.g.
to run the paper's exact prompts. Placeholders are ``{name}`` for the names listed in ``PLACEHOLDERS``; any
other brace is literal text, so LaTeX and code need no escaping.

Typical flow for a generate loop::

    from reflectevo.data import get_task, prompts, parse_demand
    task = get_task("logiqa"); item = task.load("logiqa_test.jsonl")[0]
    P = prompts.DEFAULT                      # or prompts.load_prompt_overrides("paper_prompts.json")
    text = render(P.trial_messages(task, item)) + P.response_prefix      # render = the chat template
    out = generate(text, temperature=0, stop=P.stop_sequences(task))
    trial1 = P.parse_trial(task, out)        # Trial(thought, action, answer)
    ok = task.check(trial1.answer, item)
    transcript1 = P.transcript(trial1, ok)   # "Thought: ...\\nAction: ...\\nObservation: ..."
    if not ok:
        refl_prompt = P.reflection_prompt(item, transcript1, parse_demand("1-1-1"))   # data generation
        # (P.test_reflection_prompt(item, transcript1) at evaluation time)
        for reflection in sample(refl_prompt, n=2, temperature=0.8, top_p=0.9):
            t2 = P.trial2_messages(task, item, reflection, transcript1)   # always from the TRIAL-1 transcript
            trial2 = P.parse_trial(task, generate(render(t2) + P.response_prefix, ...))
            transcript2 = P.transcript(trial2, task.check(trial2.answer, item))

Save each prompt exactly as it was sent (the rendered text), never rebuilt afterwards.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from .fewshot import examples_block
from .instructions import Demand, parse_demand
from .jsonl import DataError
from .math_equiv import last_boxed

__all__ = ["Trial", "Prompts", "DEFAULT", "DEFAULT_TEMPLATES", "PLACEHOLDERS", "load_prompt_overrides",
           "extract_answer", "format_action", "answer_format", "observation", "test_time_reflection_prompt"]

DEFAULT_TEMPLATES: dict[str, str] = {
    "trial_instructions": (
        "Solve the question below. Reason first in a Thought, then give your final answer in an Action.\n"
        "Reply in exactly this form:\nThought: <your reasoning>\nAction: {answer_rule}\n"
        "After your Action you will receive an Observation telling you whether the answer was right."),
    "answer_rule_brackets": "Finish[<answer>] (for a multiple-choice question the answer is the option letter)",
    "answer_rule_angles": "Finish<<<answer>>> (the answer as a number or LaTeX expression, nothing else)",
    "answer_rule_code": "[BEGIN]\n<your Python code>\n[END]",
    "trial": "{instructions}\n\nWorked examples:\n\n{examples}\n\n(End of examples)\n\nQuestion: {question}",
    "trial2": (
        "{instructions}\n\nWorked examples:\n\n{examples}\n\n(End of examples)\n\nQuestion: {question}\n\n"
        "You already tried this question and failed. The reflection below was written about that failed "
        "attempt; it points out what went wrong and how to fix the solution. Use it.\n"
        "Reflection:\n{reflection}\n\n"
        "Your previous attempt, which was wrong:\n{transcript}\n\n"
        "Now solve the question again with a new Thought and Action.\nQuestion: {question}"),
    "reflection_data": (
        "You tried to answer the question below and your answer was wrong. Write a self-reflection that will "
        "help you get it right on the next attempt.\n\nQuestion: {question}\n\n"
        "Your failed attempt:\n{transcript}\n\n"
        "How to reflect: {demand}\n\n"
        "Write four short numbered parts: 1. the step where the attempt goes wrong; 2. why it went wrong; "
        "3. what to change; 4. the plan asked for above. Do not state the final answer. Use about 100 words "
        "and no opening or closing remarks."),
    "reflection_test": (
        "Your earlier attempt at the question below was wrong. In a few sentences, explain the most likely "
        "cause of the mistake and give a short plan that avoids it on the next attempt. Do not state the "
        "final answer.\n\nQuestion: {question}\n\nFailed attempt:\n{transcript}"),
    "observation_correct": "Observation: The answer is right.",
    "observation_incorrect": "Observation: The answer is wrong.",
}

PLACEHOLDERS: dict[str, tuple[str, ...]] = {
    "trial_instructions": ("answer_rule",),
    "trial": ("instructions", "examples", "question"),
    "trial2": ("instructions", "examples", "question", "reflection", "transcript"),
    "reflection_data": ("question", "transcript", "demand"),
    "reflection_test": ("question", "transcript"),
}

_FORMATS = {"logiqa": "brackets", "bigbench": "brackets", "bigbench-free": "brackets", "arithmetic": "brackets",
            "math": "angles", "mbpp": "code"}


def answer_format(task) -> str:
    """ "brackets" | "angles" | "code" for a task object or name."""
    fmt = getattr(task, "answer_format", None)
    if fmt:
        return fmt
    try:
        return _FORMATS[str(task)]
    except KeyError:
        raise DataError(f"unknown task {task!r}; known tasks: {', '.join(_FORMATS)}") from None


def _task_name(task) -> str:
    return getattr(task, "name", None) or str(task)


def format_action(task, answer: str) -> str:
    """The action text that submits ``answer`` in the task's syntax."""
    fmt = answer_format(task)
    if fmt == "angles":
        return f"Finish<<<{answer}>>>"
    if fmt == "code":
        return f"[BEGIN]\n{answer.strip(chr(10))}\n[END]"
    return f"Finish[{answer}]"


def _balanced_after(text: str, start: int, open_: str, close: str) -> str:
    """Text from ``start`` up to the bracket closing the one just before it (nesting counted)."""
    depth = 1
    for i in range(start, len(text)):
        if text[i] == open_:
            depth += 1
        elif text[i] == close:
            depth -= 1
            if depth == 0:
                return text[start:i]
    return text[start:].split("\n", 1)[0]  # unclosed: the rest of the line


def _finish_brackets(text: str) -> str | None:
    m = re.search(r"Finish\s*\[", text, flags=re.I)
    return None if m is None else _balanced_after(text, m.end(), "[", "]").strip()


def _strip_fences(code: str) -> str:
    m = re.search(r"```[a-zA-Z0-9_+-]*\n(.*?)(?:```|$)", code, flags=re.S)
    return m.group(1) if m else code


def extract_answer(task, action_text: str | None) -> str | None:
    """The answer inside an action, or None when the action has none.

    The first action counts (text after it is the model running on): brackets: the first ``Finish[...]``
    (nested brackets kept, unclosed -> rest of the line); angles: the first ``Finish<<<...>>>``, else a
    ``Finish[...]``, else the last ``\\boxed{...}``; code: the text after the last ``[BEGIN]`` up to ``[END]``
    (which may be missing when generation stopped on it), markdown fences removed, else a fenced block.
    """
    if not action_text:
        return None
    fmt = answer_format(task)
    if fmt == "brackets":
        return _finish_brackets(action_text)
    if fmt == "angles":
        m = re.search(r"Finish\s*<<<", action_text, flags=re.I)
        if m:
            rest = action_text[m.end():]
            end = rest.find(">>>")
            return (rest[:end] if end >= 0 else rest.split("\n", 1)[0]).strip()
        found = _finish_brackets(action_text)
        return found if found is not None else last_boxed(action_text)
    begin = action_text.rfind("[BEGIN]")
    if begin >= 0:
        body = action_text[begin + len("[BEGIN]"):]
        end = body.find("[END]")
        code = _strip_fences(body[:end] if end >= 0 else body)
        return code.strip("\n") if code.strip() else None
    if "```" in action_text:
        code = _strip_fences(action_text)
        return code.strip("\n") if code.strip() else None
    return None


@dataclass
class Trial:
    thought: str
    action: str
    answer: str | None


def observation(correct: bool, templates: dict[str, str] | None = None) -> str:
    """The observation line appended after an action."""
    t = templates or DEFAULT_TEMPLATES
    return t["observation_correct"] if correct else t["observation_incorrect"]


def _fill(template: str, allowed: tuple[str, ...], **values: str) -> str:
    pattern = re.compile(r"\{(" + "|".join(map(re.escape, allowed)) + r")\}")
    return pattern.sub(lambda m: str(values[m.group(1)]), template)


class Prompts:
    """A set of prompt templates and the functions that fill them (``DEFAULT`` holds ours)."""

    response_prefix = "Thought:"

    def __init__(self, overrides: dict[str, str] | None = None):
        self.templates = dict(DEFAULT_TEMPLATES)
        self._examples: dict[str, str] = {}
        for name, text in (overrides or {}).items():
            if name.startswith("examples_"):
                self._examples[name[len("examples_"):]] = text
            else:
                self.templates[name] = text

    # -- pieces -------------------------------------------------------------------------------------------
    def instructions(self, task) -> str:
        rule = self.templates[f"answer_rule_{answer_format(task)}"]
        return _fill(self.templates["trial_instructions"], PLACEHOLDERS["trial_instructions"], answer_rule=rule)

    def examples(self, task) -> str:
        name = _task_name(task)
        if name not in self._examples:
            self._examples[name] = examples_block(name, lambda a: format_action(task, a))
        return self._examples[name]

    def prefix(self, task) -> str:
        """The question-independent start shared by every trial prompt of ``task``."""
        return self.trial_prompt(task, {"question": "\0"}).split("\0", 1)[0]

    # -- prompts ------------------------------------------------------------------------------------------
    def trial_prompt(self, task, item: dict) -> str:
        return _fill(self.templates["trial"], PLACEHOLDERS["trial"], instructions=self.instructions(task),
                     examples=self.examples(task), question=item["question"])

    def trial2_prompt(self, task, item: dict, reflection: str, transcript: str) -> str:
        """Trial 2: ``transcript`` must be the saved TRIAL-1 transcript (never another trial 2)."""
        return _fill(self.templates["trial2"], PLACEHOLDERS["trial2"], instructions=self.instructions(task),
                     examples=self.examples(task), question=item["question"], reflection=reflection.strip(),
                     transcript=transcript.strip())

    def reflection_prompt(self, item: dict, transcript: str, demand: Demand | str | None = None) -> str:
        """Data-generation reflection prompt with one demand of the instruction pool (default 1-1-1)."""
        return _fill(self.templates["reflection_data"], PLACEHOLDERS["reflection_data"],
                     question=item["question"], transcript=transcript.strip(), demand=parse_demand(demand).text)

    def test_reflection_prompt(self, item: dict, transcript: str) -> str:
        """Test-time reflection prompt (no demand); also the prompt of the DPO pairs."""
        return _fill(self.templates["reflection_test"], PLACEHOLDERS["reflection_test"],
                     question=item["question"], transcript=transcript.strip())

    @staticmethod
    def messages(text: str) -> list[dict]:
        return [{"role": "user", "content": text}]

    def trial_messages(self, task, item):
        return self.messages(self.trial_prompt(task, item))

    def trial2_messages(self, task, item, reflection, transcript):
        return self.messages(self.trial2_prompt(task, item, reflection, transcript))

    def reflection_messages(self, item, transcript, demand=None):
        return self.messages(self.reflection_prompt(item, transcript, demand))

    def test_reflection_messages(self, item, transcript):
        return self.messages(self.test_reflection_prompt(item, transcript))

    # -- model output -------------------------------------------------------------------------------------
    def stop_sequences(self, task) -> list[str]:
        """Where a trial generation should stop: before an Observation or a new question."""
        return ["\nObservation", "Observation:", "\nQuestion:"]

    def parse_trial(self, task, text: str) -> Trial:
        """Split a generated trial into Thought and Action and extract the answer (None when absent)."""
        text = (text or "").strip()
        text = re.sub(r"^\s*Thought\s*:\s*", "", text, flags=re.I)
        m = re.search(r"(?:^|\n)\s*Action\s*:", text, flags=re.I)
        if m:
            thought, action = text[: m.start()], text[m.end():]
        else:
            marker = {"code": r"\[BEGIN\]", "angles": r"Finish\s*<<<"}.get(answer_format(task), r"Finish\s*\[")
            m = re.search(marker, text, flags=re.I)
            thought, action = (text[: m.start()], text[m.start():]) if m else (text, "")
        # whatever follows the action (an invented Observation, the next question) is not part of it
        action = re.split(r"\n\s*(?:Observation|Question|Thought)\s*:", action, maxsplit=1, flags=re.I)[0]
        thought = re.split(r"\n\s*Observation\s*:", thought, maxsplit=1, flags=re.I)[0]
        answer = extract_answer(task, action)
        if answer is None:
            answer = extract_answer(task, thought)
        action = format_action(task, answer) if answer is not None else action.strip()
        return Trial(thought=thought.strip(), action=action, answer=answer)

    def transcript(self, trial: Trial, correct: bool | None) -> str:
        """``Thought: ...\\nAction: ...`` plus the Observation line when ``correct`` is known."""
        text = f"Thought: {trial.thought}\nAction: {trial.action}"
        if correct is not None:
            text += "\n" + observation(correct, self.templates)
        return text


DEFAULT = Prompts()


def test_time_reflection_prompt(record: dict, transcript: str | None = None) -> str:
    """The default test-time reflection prompt for a curated or raw record (its trial-1 transcript is
    ``first_trial_reasoning``, or ``output[0]``'s ``scratchpad``/``reasoning``, unless ``transcript`` is given)."""
    if transcript is None:
        transcript = record.get("first_trial_reasoning")
        if transcript is None and record.get("output"):
            first = record["output"][0]
            transcript = first.get("scratchpad", first.get("reasoning"))
    if transcript is None or "question" not in record:
        raise DataError("record needs 'question' and 'first_trial_reasoning' (or output[0].scratchpad)")
    return DEFAULT.test_reflection_prompt(record, transcript)


def load_prompt_overrides(path) -> Prompts:
    """A :class:`Prompts` whose templates are replaced by a JSON file {prompt name: template}.

    Names: those of ``DEFAULT_TEMPLATES`` plus ``examples_<task>`` (a literal worked-examples block). A
    template may use only the placeholders ``PLACEHOLDERS`` lists for it; errors are one line naming the file.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
    if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
        raise DataError(f"{path}: expected a JSON object mapping prompt names to template strings")
    known = set(DEFAULT_TEMPLATES) | {f"examples_{t}" for t in _FORMATS}
    for name, text in data.items():
        if name not in known:
            raise DataError(f"{path}: unknown prompt {name!r}; known: {', '.join(sorted(known))}")
        allowed = set(PLACEHOLDERS.get(name, ()))
        all_fields = {f for fields in PLACEHOLDERS.values() for f in fields}
        used = set(re.findall(r"\{([a-z_]+)\}", text)) & all_fields
        if used - allowed:
            raise DataError(f"{path}: prompt {name!r} uses placeholder(s) {sorted(used - allowed)}; "
                            f"allowed: {sorted(allowed) or 'none'}")
        if name in ("trial", "trial2") and "{question}" not in text:
            raise DataError(f"{path}: prompt {name!r} must contain {{question}}")
    return Prompts(data)
