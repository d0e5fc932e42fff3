"""Prompt texts (our own wording, the paper's content), answer extraction and observations.

The loop runs ONE chat conversation per question; each phase's prompt is the previous one + the model's reply
+ a new user turn (so the sampler's prefix cache holds everything but the new turn, see ``conversation.py``):

    trial 1      [user: trial]                                                          + assistant "Thought:"
    reflection   [user: trial, assistant: trial-1 transcript (ends with the Observation),
                  user: reflection_request (data generation, with one demand) | reflection_request_test]
    trial 2      [... the reflection conversation ..., assistant: the reflection, user: retry_request]
                                                                                        + assistant "Thought:"
    trial 2 without a reflection (eval --reflector-mode none): [user: trial, assistant: trial-1 transcript,
                  user: retry_without_reflection_request]                               + assistant "Thought:"

So the reflection prompt holds the question, the failed trial and the demand, and trial 2 the question, the
failed trial (with the observation that it failed) and the reflection, as in the paper; only the layout is
multi-turn. Answer syntax: ``Finish[X]`` (logiqa, bigbench, bigbench-free, arithmetic), ``Finish<<<X>>>``
(math), code between ``[BEGIN]`` and ``[END]`` (mbpp). The instructions and worked examples come first and do
not depend on the question, so every conversation of a task starts with the same text.

``*_messages`` return the conversation as chat messages; rendering (the model's own chat template) and token
ids are the caller's job (``conversation.PromptBuilder``). Save each prompt exactly as it was sent.

Templates (``DEFAULT_TEMPLATES``) can be replaced from a JSON file mapping name -> template
(``load_prompt_overrides``). Names and the placeholders each may use (``PLACEHOLDERS``):

    trial_instructions       {answer_rule}                     the task instructions (inside ``trial``)
    answer_rule_brackets / answer_rule_angles / answer_rule_code   how to write the answer, per format
    trial                    {instructions} {examples} {question}  first user turn ({question} required)
    reflection_request       {demand} {question}               user turn asking for a reflection (generation)
    reflection_request_test  {question}                        the same at test time (no demand)
    retry_request            {question}                        user turn asking for trial 2 after the reflection
    reflect_and_retry_request                                  one-stage (setting I, ``one_stage.py``): instead of
                             {answer_rule} {question}          reflection_request_test, asks for a reflection AND
                                                               a new attempt in the task's answer format, in one reply
    retry_without_reflection_request                           the "prompt w/o reflection" baseline
                             {answer_rule} {question}          (``no_reflection.py``): right after the failed trial 1,
                                                               says it was wrong and asks for a new attempt in the
                                                               task's format
    observation_correct / observation_incorrect                the line that ends a trial's transcript
    examples_<task>                                            a literal worked-examples block

The failed attempt and the reflection are earlier turns of the conversation, not placeholders: a template
using ``{transcript}`` or ``{reflection}`` (or a placeholder of another template) is rejected, and so are the
single-turn names of the older layout (``trial2``, ``reflection_data``, ``reflection_test``), with a message
naming their replacement. Any other brace is literal text, so LaTeX and code need no escaping.

Typical flow (see ``loop.ReflectLoop`` for the batched, cache-friendly version)::

    P = prompts.DEFAULT                      # or prompts.load_prompt_overrides("my_prompts.json")
    msgs = P.trial_messages(task, item)
    out = generate(render(msgs) + P.response_prefix, temperature=0, stop=P.stop_sequences(task))
    trial1 = P.parse_trial(task, out)        # Trial(thought, action, answer)
    transcript1 = P.transcript(trial1, task.check(trial1.answer, item))   # "Thought: ...\\nAction: ..."
    refl_msgs = P.reflection_messages(task, item, transcript1, parse_demand("1-1-1"))
    for reflection in sample(render(refl_msgs), n=2, temperature=0.8, top_p=0.9):
        t2 = P.trial2_messages(item, refl_msgs, reflection)   # on the TRIAL-1 transcript
        trial2 = P.parse_trial(task, generate(render(t2) + P.response_prefix, ...))

``Prompts.test_reflection_prompt`` / ``Prompts.trial2_prompt`` give the same content as ONE plain user message,
for records that carry no rendered conversation (official data); the trainer renders such text itself. The
module function :func:`test_reflection_prompt` gives a record's test-time reflection prompt as eval renders it.
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

__all__ = ["Trial", "Prompts", "DEFAULT", "DEFAULT_TEMPLATES", "PLACEHOLDERS", "RETIRED_NAMES",
           "load_prompt_overrides", "extract_answer", "bare_answer", "action_answer", "format_action", "answer_format",
           "observation", "test_time_reflection_prompt", "test_reflection_prompt"]

DEFAULT_TEMPLATES: dict[str, str] = {
    "trial_instructions": (
        "Solve the question below. Reason first in a Thought, then give your final answer in an Action.\n"
        "Reply in exactly this form:\nThought: <your reasoning>\nAction: {answer_rule}\n"
        "After your Action you will receive an Observation telling you whether the answer was right."),
    "answer_rule_brackets": "Finish[<answer>] (for a multiple-choice question the answer is the option letter)",
    "answer_rule_angles": "Finish<<<answer>>> (the answer as a number or LaTeX expression, nothing else)",
    "answer_rule_code": "[BEGIN]\n<your Python code>\n[END]",
    "trial": "{instructions}\n\nWorked examples:\n\n{examples}\n\n(End of examples)\n\nQuestion: {question}",
    "reflection_request": (
        "That answer was wrong. Before you try again, write a self-reflection on your attempt above that will "
        "help you get it right next time.\nHow to reflect: {demand}\n"
        "Write four short numbered parts: 1. the step where the attempt goes wrong; 2. why it went wrong; "
        "3. what to change; 4. the plan asked for above. Do not state the final answer. Use about 100 words "
        "and no opening or closing remarks."),
    "reflection_request_test": (
        "That answer was wrong. In a few sentences, explain the most likely cause of the mistake and give a "
        "short plan that avoids it on the next attempt. Do not state the final answer."),
    "retry_request": (
        "Your reflection above points out what went wrong in your failed attempt and how to fix it. Use it and "
        "solve the question again, in the same form as before: a new Thought, then an Action."),
    "reflect_and_retry_request": (
        "That answer was wrong. First write a short reflection: the most likely cause of the mistake and a plan "
        "that avoids it. Then leave a blank line and solve the question again in the same form as before:\n"
        "Thought: <your new reasoning>\nAction: {answer_rule}"),
    "retry_without_reflection_request": (
        "That answer was wrong. Solve the question again with a fresh attempt, in the same form as before:\n"
        "Thought: <your new reasoning>\nAction: {answer_rule}"),
    "observation_correct": "Observation: The answer is right.",
    "observation_incorrect": "Observation: The answer is wrong.",
}

PLACEHOLDERS: dict[str, tuple[str, ...]] = {
    "trial_instructions": ("answer_rule",),
    "trial": ("instructions", "examples", "question"),
    "reflection_request": ("demand", "question"),
    "reflection_request_test": ("question",),
    "retry_request": ("question",),
    "reflect_and_retry_request": ("answer_rule", "question"),
    "retry_without_reflection_request": ("answer_rule", "question"),
}
# placeholders of the single-turn layout: these texts are earlier turns of the conversation now
RETIRED_PLACEHOLDERS = ("transcript", "reflection")
RETIRED_NAMES = {"trial2": "retry_request", "reflection_data": "reflection_request",
                 "reflection_test": "reflection_request_test"}

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
    (nested brackets kept, unclosed -> rest of the line); angles: the first ``Finish<<<...>>>`` (unclosed ->
    the rest of the line without a short closer ">>" or ">"), else a
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
            if end >= 0:
                return rest[:end].strip()
            return re.sub(r">{1,2}\s*$", "", rest.split("\n", 1)[0]).strip()  # a short closer: "Finish<<<15>>"
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


_ANSWER_LEAD = re.compile(r"^(?:finish\b\s*:?\s*)?(?:(?:so\s*,?\s*)?(?:the\s+)?(?:final\s+)?(?:correct\s+)?answer\b"
                          r"\s*(?:is\b|:)?\s*:?\s*)?", flags=re.I)


def bare_answer(task, action_text: str | None) -> str | None:
    """The answer of an action written without its wrapper ("B", "(B)", "The answer is 12."): the first line of
    the action without markdown, quotes, a "the answer is" lead-in and a closing period, for the task's checker
    to read. None for code tasks and for an empty or over-long line (200 characters: prose, not an answer)."""
    if not action_text or answer_format(task) == "code":
        return None
    line = next((ln.strip() for ln in action_text.splitlines() if ln.strip()), "")
    line = line.strip("*`\"' ").strip()
    line = _ANSWER_LEAD.sub("", line).strip().strip("*`\"'").strip()
    line = re.sub(r"(?<!\.)\.$", "", line).strip()
    return line if line and len(line) <= 200 else None


def action_answer(task, action_text: str | None) -> str | None:
    """The answer of an action: inside its wrapper (:func:`extract_answer`), else :func:`bare_answer`."""
    found = extract_answer(task, action_text)
    return found if found is not None else bare_answer(task, action_text)


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

    # -- user turns ---------------------------------------------------------------------------------------
    def trial_prompt(self, task, item: dict) -> str:
        """The first user turn: instructions, worked examples, the question."""
        return _fill(self.templates["trial"], PLACEHOLDERS["trial"], instructions=self.instructions(task),
                     examples=self.examples(task), question=item["question"])

    def reflection_request(self, item: dict, demand: Demand | str | None = None) -> str:
        """The user turn asking for a reflection with one demand of the instruction pool (default 1-1-1)."""
        return _fill(self.templates["reflection_request"], PLACEHOLDERS["reflection_request"],
                     question=item["question"], demand=parse_demand(demand).text)

    def test_reflection_request(self, item: dict) -> str:
        """The test-time user turn asking for a reflection (no demand); also the DPO pairs' request."""
        return _fill(self.templates["reflection_request_test"], PLACEHOLDERS["reflection_request_test"],
                     question=item["question"])

    def answer_rule(self, task) -> str:
        """The answer rule text of ``task`` (a task, a task name, or a format: brackets | angles | code)."""
        fmt = task if task in ("brackets", "angles", "code") else answer_format(task)
        return self.templates[f"answer_rule_{fmt}"]

    def reflect_and_retry_request(self, task, item: dict) -> str:
        """One-stage (setting I): the user turn asking for a reflection, then a new attempt in the task's answer
        format, in one reply (``task``: a task, a task name or an answer format)."""
        return _fill(self.templates["reflect_and_retry_request"], PLACEHOLDERS["reflect_and_retry_request"],
                     question=item["question"], answer_rule=self.answer_rule(task))

    def retry_without_reflection_request(self, task, item: dict) -> str:
        """The "prompt w/o reflection" baseline: the user turn right after a failed trial 1 asking for a new attempt."""
        return _fill(self.templates["retry_without_reflection_request"],
                     PLACEHOLDERS["retry_without_reflection_request"], question=item["question"],
                     answer_rule=self.answer_rule(task))

    def retry_request(self, item: dict) -> str:
        """The user turn after the reflection asking for trial 2."""
        return _fill(self.templates["retry_request"], PLACEHOLDERS["retry_request"], question=item["question"])

    # -- conversations ------------------------------------------------------------------------------------
    def trial_messages(self, task, item: dict) -> list[dict]:
        return [{"role": "user", "content": self.trial_prompt(task, item)}]

    def reflection_messages(self, task, item: dict, transcript: str, demand: Demand | str | None = None,
                            test_time: bool = False) -> list[dict]:
        """Trial 1 (``transcript``: its saved transcript, observation included) + the reflection request
        (``test_time``: the test-time request, ``demand`` unused)."""
        request = self.test_reflection_request(item) if test_time else self.reflection_request(item, demand)
        return self.trial_messages(task, item) + [{"role": "assistant", "content": transcript.strip()},
                                                  {"role": "user", "content": request}]

    def test_reflection_messages(self, task, item: dict, transcript: str) -> list[dict]:
        return self.reflection_messages(task, item, transcript, test_time=True)

    def one_stage_messages(self, task, item: dict, transcript: str) -> list[dict]:
        """The test-time reflection conversation with the one-stage request as its last turn: what a one-stage
        model (setting I) answers with its reflection and its new attempt."""
        request = self.reflect_and_retry_request(task, item)
        return self.trial_messages(task, item) + [{"role": "assistant", "content": transcript.strip()},
                                                  {"role": "user", "content": request}]

    def retry_messages(self, task, item: dict, transcript: str) -> list[dict]:
        """Trial 2 without a reflection (``no_reflection.py``): trial 1 (its transcript, observation included) + the
        retry request; the caller opens the assistant turn with ``response_prefix``."""
        request = self.retry_without_reflection_request(task, item)
        return self.trial_messages(task, item) + [{"role": "assistant", "content": transcript.strip()},
                                                  {"role": "user", "content": request}]

    def trial2_messages(self, item: dict, reflection_messages: list[dict], reflection: str) -> list[dict]:
        """The reflection conversation (built on the TRIAL-1 transcript, never on another trial 2) + the
        reflection + the retry request."""
        return list(reflection_messages) + [{"role": "assistant", "content": reflection.strip()},
                                            {"role": "user", "content": self.retry_request(item)}]

    # -- the same content as one plain user message (records without a rendered conversation) ---------------
    def test_reflection_prompt(self, item: dict, transcript: str) -> str:
        return (f"Question: {item['question']}\n\nYour attempt:\n{transcript.strip()}\n\n"
                + self.test_reflection_request(item))

    def one_stage_prompt(self, task, item: dict, transcript: str) -> str:
        """The one-stage prompt as one message (``task``: a task, a task name or an answer format)."""
        return (f"Question: {item['question']}\n\nYour attempt:\n{transcript.strip()}\n\n"
                + self.reflect_and_retry_request(task, item))

    def trial2_prompt(self, task, item: dict, reflection: str, transcript: str) -> str:
        """Trial 2 as one message: ``transcript`` must be the saved TRIAL-1 transcript."""
        return (f"{self.trial_prompt(task, item)}\n\nYour attempt:\n{transcript.strip()}\n\n"
                f"Your reflection on it:\n{reflection.strip()}\n\n{self.retry_request(item)}")

    # -- model output -------------------------------------------------------------------------------------
    def stop_sequences(self, task) -> list[str]:
        """Where a trial generation should stop: before an Observation or a new question."""
        return ["\nObservation", "Observation:", "\nQuestion:"]

    def parse_trial(self, task, text: str) -> Trial:
        """Split a generated trial into Thought and Action and extract the answer (None when absent): the first
        wrapped answer of the action, else of the thought, else the Action line read as a bare answer."""
        text = (text or "").strip()
        text = re.sub(r"^\s*Thought\s*:\s*", "", text, flags=re.I)
        m = re.search(r"(?:^|\n)\s*Action\s*:", text, flags=re.I)
        if m:
            thought, action = text[: m.start()], text[m.end():]
        else:
            marker = {"code": r"\[BEGIN\]", "angles": r"Finish\s*<<<"}.get(answer_format(task), r"Finish\s*\[")
            m = re.search(marker, text, flags=re.I)
            thought, action = (text[: m.start()], text[m.start():]) if m else (text, "")
            if m:  # "... so it is 9. Action: Finish[9]": that label belongs to the action, not the thought
                thought = re.sub(r"\bAction\s*:\s*$", "", thought, flags=re.I)
        # whatever follows the action (an invented Observation, the next question) is not part of it
        action = re.split(r"\n\s*(?:Observation|Question|Thought)\s*:", action, maxsplit=1, flags=re.I)[0]
        thought = re.split(r"\n\s*Observation\s*:", thought, maxsplit=1, flags=re.I)[0]
        answer = extract_answer(task, action)
        if answer is None:
            answer = extract_answer(task, thought)
        if answer is None and m is not None:  # an Action line without its wrapper: "Action: B"
            answer = bare_answer(task, action)
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
    """The test-time reflection prompt of a raw or curated record: a raw record of our loop stores the rendered
    conversation (``test_reflection_prompt``); otherwise the default test-time request with the question and
    the trial-1 transcript as one plain user message (``transcript``, else ``first_trial_reasoning``, else
    ``output[0]``'s ``scratchpad``/``reasoning``), which the trainer renders with the chat template."""
    stored = record.get("test_reflection_prompt")
    if transcript is None and isinstance(stored, str) and stored.strip():
        return stored
    if transcript is None:
        transcript = _trial1_transcript(record)
    if transcript is None or "question" not in record:
        raise DataError("record needs 'question' and 'first_trial_reasoning' (or output[0].scratchpad)")
    return DEFAULT.test_reflection_prompt(record, transcript)


def _trial1_transcript(record: dict) -> str | None:
    transcript = record.get("first_trial_reasoning")
    if transcript is None and record.get("output"):
        first = record["output"][0]
        transcript = first.get("scratchpad", first.get("reasoning"))
    return transcript


def test_reflection_prompt(record: dict, task=None, tokenizer=None, prompts: Prompts | None = None) -> str:
    """The test-time reflection prompt of a raw or curated record (D+, D±, Dpref): exactly what ``eval`` sends
    the reflector for that question's trial 1.

    A record that stores it (``test_reflection_prompt``: raw records of our loop, D+ records curated from them)
    gives it back. Otherwise, with ``task`` and ``tokenizer``, the conversation is rebuilt from ``question`` and
    ``first_trial_reasoning`` (or ``output[0].scratchpad``) alone: [user: trial prompt, assistant: the trial-1
    transcript, user: test-time request] rendered with the tokenizer's chat template (``prompts``: the templates
    the evaluation uses, default ours); the same text as eval's for the same trial 1. Without them: the plain
    one-message form (:func:`test_time_reflection_prompt`)."""
    stored = record.get("test_reflection_prompt")
    if isinstance(stored, str) and stored.strip():
        return stored
    if task is None or tokenizer is None:
        return test_time_reflection_prompt(record)
    from .official import eval_prompt   # the transcript as eval writes it, an MBPP question with its asserts

    return eval_prompt("reflect", task, record, tokenizer, prompts)[0]


test_reflection_prompt.__test__ = False  # a library function, not a test, when a test module imports it


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
    all_fields = {f for fields in PLACEHOLDERS.values() for f in fields} | set(RETIRED_PLACEHOLDERS)
    for name, text in data.items():
        if name in RETIRED_NAMES:
            new = RETIRED_NAMES[name]
            raise DataError(f"{path}: prompt {name!r} belongs to the older single-turn layout; the loop now runs "
                            f"one conversation per question: write {new!r} instead (placeholders: "
                            f"{', '.join('{' + f + '}' for f in PLACEHOLDERS[new])}; the failed attempt and the "
                            "reflection are earlier turns of the conversation)")
        if name not in known:
            raise DataError(f"{path}: unknown prompt {name!r}; known: {', '.join(sorted(known))}")
        allowed = set(PLACEHOLDERS.get(name, ()))
        used = set(re.findall(r"\{([a-z_]+)\}", text)) & all_fields
        if used - allowed:
            retired = sorted(used & set(RETIRED_PLACEHOLDERS))
            why = (f" ({', '.join('{' + f + '}' for f in retired)}: an earlier turn of the conversation now, not "
                   "a placeholder)") if retired else ""
            raise DataError(f"{path}: prompt {name!r} uses placeholder(s) {sorted(used - allowed)}; "
                            f"allowed: {sorted(allowed) or 'none'}{why}")
        if name == "trial" and "{question}" not in text:
            raise DataError(f"{path}: prompt 'trial' must contain {{question}}")
    return Prompts(data)
