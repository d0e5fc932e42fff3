"""One-stage reflection (the paper's setting I): one reply holds the reflection AND the corrected attempt.

A one-stage model is trained on input = question + failed trial 1 -> target = reflection + blank line +
corrected trial (``reflectevo sft --mode one-stage``). Its prompt is the test-time reflection conversation
(``Prompts.test_reflection_messages``) whose last user turn is ``reflect_and_retry_request`` instead of the
test-time reflection request (which asks NOT to give the answer, the opposite of this target):

    [user: trial prompt, assistant: trial-1 transcript (with its observation), user: reflect_and_retry_request]

Evaluation in one-stage mode (``reflectevo eval --reflector-mode one-stage``, or automatically for an adapter whose
run directory's config.json says ``{"kind": "sft", "mode": "one-stage"}``): for every wrong trial 1 the reflector
writes one reply to that prompt (the reflection sampling settings, seeded per question, with
``reflection_max_tokens + max_tokens`` tokens and the trial's stop sequences); :func:`split_output` cuts it into
the reflection and the new attempt, the attempt is parsed like any trial (``Prompts.parse_trial``) and checked by
the task's verifier; there is no separate trial-2 generation. An attempt that stopped before its action (a Thought
and no "Action:" line, or an empty one) gets the forced action of every trial (``forced.py``): one greedy call on
the reflector continuing the one-stage prompt + the whole reply + "\\nAction:", with the settings of the other
modes' forced action; that trial 2 says ``forced_action: true``. A reply without an attempt (a reflection only) or
whose action holds no parsable answer is wrong, as any unparsable answer is.

The split (:func:`split_output`): the attempt starts at the first line that begins with ``Thought:``; without one,
at the first line that begins with ``Action:``; without either, at the LAST answer marker of the task's format
(``Finish[``, ``Finish<<<``, ``[BEGIN]``: a reflection may quote the failed answer before giving its own); the
reflection is the text before it (possibly empty: an answer only). Without any of these the whole reply is the
reflection and the attempt is empty (no answer: wrong). Cues are matched case-insensitively, at the start of a
line only (a reflection that mentions "the Thought: part" mid-sentence is not cut there). A cue line that repeats
a line of the failed trial 1 (``quoted``: the reflection quoting the failed attempt) is passed over while a later
cue line of the same kind does not; when every one does, the last is the attempt (the model retried the same
thing). When the attempt holds two Thought/Action rounds, the first action counts (``parse_trial``: text after
it is the model running on).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from .jsonl import DataError
from .prompts import DEFAULT, Prompts, Trial, answer_format

__all__ = ["REFLECTOR_MODES", "split_output", "infer_answer_format", "one_stage_prompt", "detect_reflector_mode",
           "run_one_stage"]

REFLECTOR_MODES = ("two-stage", "one-stage", "none")   # none: no reflection at all (no_reflection.py)
_THOUGHT = re.compile(r"^[ \t]*Thought[ \t]*:", flags=re.I | re.M)
_ACTION = re.compile(r"^[ \t]*Action[ \t]*:", flags=re.I | re.M)
_MARKERS = {"brackets": r"Finish\s*\[", "angles": r"Finish\s*<<<", "code": r"\[BEGIN\]"}


def _line_key(line: str) -> str:
    return " ".join(line.split()).lower()


def _attempt_cue(cue: re.Pattern, text: str, quoted: set[str]):
    """The first match of ``cue`` whose line is not one of the ``quoted`` lines, else the last match, else None."""
    found = list(cue.finditer(text))
    for m in found:
        end = text.find("\n", m.start())
        if _line_key(text[m.start():end if end >= 0 else len(text)]) not in quoted:
            return m
    return found[-1] if found else None


def split_output(task, text: str | None, quoted: str | None = None) -> tuple[str, str]:
    """(reflection, attempt) of a one-stage reply (see the module docstring for the rule); both stripped.
    ``quoted``: the failed trial-1 transcript, whose lines a reflection may repeat before the new attempt."""
    text = text or ""
    lines = {_line_key(line) for line in (quoted or "").splitlines() if line.strip()}
    m = _attempt_cue(_THOUGHT, text, lines) or _attempt_cue(_ACTION, text, lines)
    if m is not None:
        return text[:m.start()].strip(), text[m.start():].strip()
    markers = list(re.finditer(_MARKERS[answer_format(task)], text, flags=re.I))
    if markers:
        at = markers[-1].start()
        return text[:at].strip(), text[at:].strip()
    return text.strip(), ""


def infer_answer_format(text: str | None) -> str:
    """The answer format a trial transcript uses: "code" ([BEGIN]), "angles" (Finish<<<), else "brackets"."""
    text = text or ""
    if "[BEGIN]" in text:
        return "code"
    if re.search(r"Finish\s*<<<", text, flags=re.I):
        return "angles"
    return "brackets"


def _format_of(record: dict, stored: str | None, prompts: Prompts) -> str:
    """The answer format of a record: its "task", else the answer rule its stored conversation shows (the trial
    instructions hold it), else the trial-1 transcript's."""
    task = record.get("task")
    if task:
        return answer_format(task)
    if stored:
        found = [f for f in ("code", "angles", "brackets") if prompts.templates[f"answer_rule_{f}"] in stored]
        if len(found) == 1:
            return found[0]
    return infer_answer_format(record.get("first_trial_reasoning"))


def one_stage_prompt(record: dict, task=None, tokenizer=None, prompts: Prompts | None = None) -> str:
    """The one-stage prompt of a raw or curated record (D+), as eval sends it for that trial 1.

    * With ``task`` and ``tokenizer``: the conversation built from ``question`` and ``first_trial_reasoning``
      (or ``output[0].scratchpad``) by :mod:`reflectevo.data.official` (the transcript as eval writes it, an MBPP
      question with its asserts), rendered with the chat template: eval's text for the same trial 1.
    * Else, a record that stores its test-time reflection prompt (``test_reflection_prompt``: our loop's raw
      records and the D+ curated from them, rendered as the model saw it) gets that text with its last
      test-time reflection request replaced by the one-stage request: the same conversation eval renders
      (a DataError when the stored prompt does not hold the request of ``prompts``: written with other --prompts).
    * Else (official data): question + trial-1 transcript + the one-stage request as one plain user message
      (``Prompts.one_stage_prompt``), which the trainer renders with the chat template.
    DataError when the record has neither a stored prompt nor ``question`` and a trial-1 transcript."""
    from .prompts import _trial1_transcript

    P = prompts or DEFAULT
    if task is not None and tokenizer is not None:
        from .official import eval_prompt

        return eval_prompt("one-stage", task, record, tokenizer, P)[0]
    stored = record.get("test_reflection_prompt")
    if isinstance(stored, str) and stored.strip():
        if "question" not in record:
            raise DataError("record needs 'question' (to fill the one-stage request)")
        old = P.test_reflection_request(record)
        head, found, tail = stored.rpartition(old) if old else ("", "", "")
        if not found:
            raise DataError("its test_reflection_prompt does not hold the test-time reflection request of these "
                            "prompts (written with other --prompts?)")
        return head + P.reflect_and_retry_request(_format_of(record, stored, P), record) + tail
    transcript = _trial1_transcript(record)
    if transcript is None or "question" not in record:
        raise DataError("record needs 'question' and 'first_trial_reasoning' (or output[0].scratchpad)")
    return P.one_stage_prompt(_format_of(record, None, P), record, transcript)


def detect_reflector_mode(adapter) -> tuple[str, str]:
    """(mode, why) for ``reflectevo eval`` without --reflector-mode: "one-stage" when the adapter's run directory
    (its parent, which ``reflectevo sft`` writes as RUN/adapter/) holds a config.json saying
    {"kind": "sft", "mode": "one-stage"}; "two-stage" otherwise."""
    if not adapter:
        return "two-stage", "no --adapter"
    config = Path(adapter).resolve().parent / "config.json"
    if not config.is_file():
        return "two-stage", f"no {config} beside the adapter"
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        return "two-stage", f"{config} unreadable ({' '.join(str(e).split())[:80]})"
    if not isinstance(data, dict):
        return "two-stage", f"{config} is not a training run's config"
    kind, mode = data.get("kind"), data.get("mode")
    if kind == "sft" and mode == "one-stage":
        return "one-stage", f"{config} says kind sft, mode one-stage"
    return "two-stage", f"{config} says kind {kind}" + (f", mode {mode}" if kind == "sft" else "")


# ------------------------------------------------------------------------------------------------ eval phase
def run_one_stage(loop, pending: list) -> list:
    """The one-stage phase of ``loop`` (a ``ReflectLoop``) for its ``pending`` questions whose trial 1 failed:
    one reply each from the reflection engine, split into reflection and attempt, the attempt verified. Fills
    each question's reflection_messages / reflection_prompt (the one-stage prompt) / test_reflection_prompt
    (the two-stage test-time conversation, its documented meaning) / reflections / outputs / t2; returns the
    trial-2 results in order."""
    from .forced import force_actions, needs_action
    from .loop import _Trial, question_seed

    if not pending:
        return []
    P, build, cfg, task = loop.P, loop.build, loop.cfg, loop.task
    params = []
    for p in pending:
        p.demand = None
        p.reflection_messages = P.one_stage_messages(task, p.item, p.t1_transcript)
        p.reflection_prompt = build.start(build.render(p.reflection_messages))
        p.test_reflection_prompt = build.render(P.test_reflection_messages(task, p.item, p.t1_transcript))
        params.append(loop.SamplingParams(n=1, temperature=cfg.reflection_temperature, top_p=cfg.reflection_top_p,
                                          max_tokens=cfg.reflection_max_tokens + cfg.max_tokens,
                                          stop=P.stop_sequences(task), seed=question_seed(cfg.seed, p.item["id"])))
    outs = loop.reflect_engine.generate([p.reflection_prompt.ids for p in pending], params)
    results, reasons = [], []
    for p, o in zip(pending, outs):
        text = o[0].text
        reflection, attempt = split_output(task, text, quoted=p.t1_transcript)
        trial = P.parse_trial(task, attempt) if attempt else Trial(thought="", action="", answer=None)
        p.reflections, p.outputs = [reflection], [text]
        results.append(_Trial(p.reflection_prompt, trial))
        reasons.append((o[0].finish_reason, bool(attempt)))
    # an attempt that stopped before its action: the forced action, as for every trial (continuing the reply)
    need = [i for i, (tr, (_, has_attempt)) in enumerate(zip(results, reasons))
            if has_attempt and needs_action(tr.trial)] if cfg.force_action else []
    jobs = [(pending[i].reflection_prompt.text, pending[i].outputs[0], results[i].trial.thought) for i in need]
    for i, (trial, reason) in zip(need, force_actions(loop, loop.reflect_engine, jobs)):
        results[i].trial, results[i].forced, reasons[i] = trial, True, (reason, True)
    is_code = answer_format(task) == "code"
    kwargs = {"workers": cfg.verify_workers} if is_code else {}
    verdicts, failures = loop.verify([r.trial.answer for r in results], [p.item for p in pending], kwargs)
    for p, tr, ok, failure, (reason, has_attempt) in zip(pending, results, verdicts, failures, reasons):
        tr.correct = bool(ok)
        if tr.trial.answer is None:
            tr.error = ("no answer: the one-stage output has " +
                        ("no valid action in its attempt" if has_attempt else "no attempt after its reflection") +
                        (" (generation hit max_tokens)" if reason == "length" else ""))
        elif failure is not None:
            tr.error = failure
        tr.transcript = P.transcript(tr.trial, tr.correct)
        p.t2 = [tr]
    loop.stats["reflections"] += len(pending)
    return results


def trained_prompts_mismatch(adapter, prompts_path) -> str | None:
    """A warning when the adapter's run (RUN/config.json beside RUN/adapter/) was trained with other --prompts than
    eval is given (compared by the files' JSON content; a file that is gone by its path); None when they agree or
    nothing says."""
    if not adapter:
        return None
    config = Path(adapter).resolve().parent / "config.json"
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("kind") not in ("sft", "dpo") or "prompts" not in data:
        return None

    def content(path):
        if not path:
            return None
        try:
            return json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return str(Path(path).resolve())

    trained = data.get("prompts")
    if content(trained) == content(prompts_path):
        return None
    return (f"the adapter was trained with --prompts {trained or '(none: the default prompts)'} ({config}), eval "
            f"runs with --prompts {prompts_path or '(none: the default prompts)'}: its prompts differ from training")
