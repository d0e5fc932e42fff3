"""The forced action: a second greedy call for a trial whose text ended without one (the official code's second call).

A trial whose text has no answer and no action (the model ran out of tokens or closed its turn before an "Action:"
line, or left that line empty) is continued where it stopped: the same prompt + the text so far + the cue
"\\nAction:" (after the empty "Action:" itself when there is one), greedy, at most ``action_max_tokens`` tokens
(code: ``max_tokens``), ending at the line break (code: at "[END]") or at the trial's stop sequences. The action
it writes is read as any action (``action_answer``: the answer in its wrapper, else a bare answer).

Every mode uses it the same way: the trials of the loop (``ReflectLoop.run_trials``: trial 1, and trial 2 after a
reflection or, in mode none, after the retry request) and the attempt of a one-stage reply
(``one_stage.run_one_stage``: the continuation of the one-stage prompt + the whole reply, on the reflector).
The trial it fixes says ``forced_action: true`` in the raw records and counts in the result's ``forced_actions``.
"""
from __future__ import annotations

import re

from .prompts import Trial, action_answer, answer_format, format_action

__all__ = ["action_cue", "needs_action", "force_actions"]


def action_cue(text: str) -> str:
    """A trial's text ending where the forced action starts: after its empty "Action:" line, else a new one."""
    text = text.rstrip()
    return text if re.search(r"(?:^|\n)\s*Action\s*:$", text, flags=re.I) else text + "\nAction:"


def needs_action(trial: Trial) -> bool:
    """Whether a parsed trial ended without an action: no answer and no action text."""
    return trial.answer is None and not trial.action.strip()


def force_actions(loop, engine, jobs: list[tuple[str, str, str]]) -> list[tuple[Trial, str]]:
    """The forced call for each ``(prompt text, text generated so far, its thought)`` of ``loop`` (a
    ``ReflectLoop``), in one batch on ``engine``: [(the trial with the forced action, the call's finish reason)]."""
    if not jobs:
        return []
    task, P = loop.task, loop.P
    is_code = answer_format(task) == "code"
    params = loop.SamplingParams(temperature=0.0, max_tokens=loop.cfg.max_tokens if is_code else
                                 loop.cfg.action_max_tokens,
                                 stop=(["[END]"] if is_code else ["\n"]) + P.stop_sequences(task))
    prompts = [loop.build.start(prompt + action_cue(text)) for prompt, text, _ in jobs]
    loop.stats["forced_actions"] += len(jobs)
    results = []
    for (_, _, thought), out in zip(jobs, engine.generate([p.ids for p in prompts], params)):
        action = out[0].text
        if is_code and "[BEGIN]" in action and "[END]" not in action:
            action += "\n[END]"
        answer = action_answer(task, action)
        trial = Trial(thought=thought, action=format_action(task, answer) if answer is not None else action.strip(),
                      answer=answer)
        results.append((trial, out[0].finish_reason))
    return results
