"""Records -> token ids (packing into micro-batches: :mod:`reflectevo.trainer.packing`).

Prompts and targets per setting (docs/paper.md), taken from the official fields:

    one-stage  prompt = one-stage prompt****      response = reflection + "\\n\\n" + second_trial_reasoning*
    reflect    prompt = test-time reflection**    response = reflection
    correct    prompt = test-time trial 2***      response = second_trial_reasoning*
    dpo        prompt = reflection_prompt         chosen / rejected = reflection_chosen / reflection_rejected

(``reflections`` may be a string or a list: its last non-empty entry is used, the reflection that trial 2 was
answered with, as in :mod:`reflectevo.data.curate`.) A record without a stored prompt gets one
from :mod:`reflectevo.data.prompts` when that module offers it, else a TrainError names the record. A stored
trial-2 prompt that already contains the trial-2 answer (a defect of the official code, paper.md defect 2) has
that text removed so the model never sees its own target. * A trial transcript used as a target loses the
oracle Observation line that ends it (feedback from the environment, not text the model writes).
** The prompt eval reflects on (paper.md defect 4: the official code trained on one reflection prompt and tested
on another): the record's ``test_reflection_prompt`` (our curation writes it), else built from ``question`` and
``first_trial_reasoning``; ``reflect_prompt`` (the data-generation request) when neither is there, or with
``--sft-prompt stored``.
**** The prompt eval's one-stage mode sends (``reflectevo.data.one_stage``; setting I): the test-time reflection
conversation whose last request asks for a reflection AND a new attempt in the task's answer format, built from the
record's stored ``test_reflection_prompt`` (its request swapped) or from ``question`` + ``first_trial_reasoning``
(one plain message); ``TrainConfig.prompts`` names a --prompts file when eval uses one. A record with neither falls
back to its ``reflect_prompt`` (with a warning: that data-generation request asks not to give the answer). With
``--sft-prompt stored`` one-stage trains on ``reflect_prompt`` as before (the official fields, for comparison; its
request contradicts the one-stage target).
*** The trial-2 prompt eval answers (after the test-time reflection request, not the data-generation one): the
record's ``test_trial2_prompt`` (curation copies it from our loop's raw records), else ``reason_prompt[1]``, which
``--sft-prompt stored`` always uses. Either loses a leaked trial-2 answer (*).
Records that store no prompt of eval's (the official data: no ``test_reflection_prompt`` / ``test_trial2_prompt``,
a pair's ``reflection_prompt`` that is no conversation of eval's) with their task known (``TrainConfig.task``, i.e.
``--task``, else the record's "task" field) get eval's conversation for the mode, built from their fields by
:mod:`reflectevo.data.official` and rendered with this model's template (:func:`official_prompt`); a field it
needs and the record lacks is a TrainError naming file:line and the field. Without a task they keep the prompts
above (one plain message, the data-generation prompt), which differ from eval's: one warning line says so.

Token layout: a plain-text prompt (the official data) is rendered with the model's chat template (one user turn,
generation prompt added); a prompt stored already rendered with this template (our raw records save prompts
exactly as the model saw them: multi-turn conversations ending in an opened assistant turn, see
:func:`chat_prompt`) is used as it is. A stored prompt that is one of eval's conversations (the test-time
reflection, one-stage and trial-2 prompts) is rendered again with this model's template first
(:func:`reflectevo.data.rerender.rerender`): records another model generated hold its template, eval renders ours. Either is encoded with
add_special_tokens=False; the response is the assistant content tokens (minus any start of the assistant turn the
stored prompt already holds, such as "Thought:") plus what the template renders after them up to the end-of-turn
token (Llama-2: " </s>"). Only response tokens and those carry labels. Too long: the prompt loses tokens from
the left (a leading BOS is kept); the response is never shortened - one that cannot fit is an error (or skipped).
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from reflectevo.errors import ReflectEvoError
from reflectevo.trainer.config import TrainError
from reflectevo.trainer.packing import IGNORE, Batch, make_batch, pack, sequences_of  # noqa: F401 (re-exported)

ONE_STAGE_SEPARATOR = "\n\n"
_SENTINEL = "\ue000user text\ue000"     # stands for the user message when the chat template is rendered bare


@dataclass
class Example:
    key: str                    # unique: record id (+ "#k" for the k-th repeat of an id)
    where: str                  # file:line, for messages
    prompt: list[int]
    responses: list[list[int]]  # SFT: [response]; DPO: [chosen, rejected] (each ends with the eot token)

    @property
    def num_tokens(self) -> int:
        return sum(len(self.prompt) + len(r) - 1 for r in self.responses)


# ------------------------------------------------------------------------------------------------------------
# records -> texts
# ------------------------------------------------------------------------------------------------------------
def _field(record: dict, name: str, where: str, why: str):
    if name not in record or record[name] is None:
        raise TrainError(f"{where}: missing field {name!r} ({why})")
    return record[name]


def _text(value, name: str, where: str) -> str:
    if isinstance(value, list):
        value = next((v for v in reversed(value) if isinstance(v, str) and v.strip()), None)
    if not isinstance(value, str) or not value.strip():
        raise TrainError(f"{where}: field {name!r} is empty or not text")
    return value


def _prompts_module():
    try:
        from reflectevo.data import prompts
    except Exception:
        return None
    return prompts


def _built_prompt(kind: str, record: dict, where: str, stored_names: tuple) -> str:
    """A prompt for a record that stores none, from reflectevo.data.prompts (our test-time prompts).

    reflect: the test-time reflection prompt (question + trial-1 transcript); trial2: the trial-2 prompt, which
    also needs the record's "task" (its answer format) and reflection."""
    prompts = _prompts_module()
    missing = " / ".join(repr(n) for n in stored_names)
    try:
        if kind == "reflect" and prompts is not None and hasattr(prompts, "test_time_reflection_prompt"):
            return prompts.test_time_reflection_prompt(record)
        if kind == "trial2" and prompts is not None and hasattr(prompts, "DEFAULT") and record.get("task"):
            reflection = record.get("reflections") or record.get("reflection_chosen") or ""
            reflection = _text(reflection, "reflections", where) if isinstance(reflection, list) else reflection
            return prompts.DEFAULT.trial2_prompt(record["task"], record, str(reflection),
                                                 record["first_trial_reasoning"])
    except Exception as e:  # the builder needs fields the record lacks
        raise TrainError(f"{where}: missing field {missing} and building one failed "
                         f"({' '.join(str(e).split())})") from None
    raise TrainError(f"{where}: missing field {missing}" +
                     (" (or 'task' to build the trial-2 prompt)" if kind == "trial2" else ""))


def reflection_prompt_text(record: dict, where: str, dpo: bool, sft_prompt: str = "test-time") -> str:
    """DPO: the pair's stored test-time prompt. SFT: with "test-time", the prompt eval reflects on (the record's
    test_reflection_prompt, else built from its question and trial-1 transcript), so training and evaluation see
    one prompt; a record that has neither, or "stored", uses its reflect_prompt (the data-generation request)."""
    prompts = _prompts_module()
    if not dpo and sft_prompt == "test-time" and prompts is not None:
        try:
            return prompts.test_time_reflection_prompt(record)
        except (ReflectEvoError, KeyError, TypeError, AttributeError):
            pass  # not enough fields to build it: the stored prompt below
    names = ("reflection_prompt", "reflect_prompt") if dpo else ("reflect_prompt", "reflection_prompt")
    for n in names:
        if isinstance(record.get(n), str) and record[n].strip():
            return record[n]
    return _built_prompt("reflect", record, where, names)


def trial2_prompt_text(record: dict, where: str, answer_text: str, sft_prompt: str = "test-time") -> str:
    """The trial-2 prompt of --mode correct: with "test-time", the one eval answers (``test_trial2_prompt``) when
    the record has it; else (or "stored") ``reason_prompt[1]``, the data-generation conversation."""
    rp = record.get("reason_prompt")
    prompt = rp[1] if isinstance(rp, list) and len(rp) > 1 and isinstance(rp[1], str) else None
    test = record.get("test_trial2_prompt")
    if sft_prompt == "test-time" and isinstance(test, str) and test.strip():
        prompt = test
    if prompt is None:
        return _built_prompt("trial2", record, where, ("reason_prompt",))
    leaked = answer_text.strip()
    if leaked and leaked in prompt:
        prompt = prompt.replace(leaked, "", 1)
    return prompt


def strip_observation(transcript: str) -> str:
    """A trial transcript without the oracle observation line that ends it.

    The loop appends :func:`reflectevo.data.prompts.observation` ("Observation: The answer is right.") after
    the action; the official data ends with "Observation: Answer is CORRECT". Both are a last line that starts
    with the label of that observation; any other text is returned unchanged (stripped of outer whitespace).
    """
    from reflectevo.data.prompts import observation

    text = transcript.strip()
    label = observation(True).partition(":")[0].strip()
    starts = list(re.finditer(rf"(?:^|\n)[ \t]*{re.escape(label)}[ \t]*:", text, flags=re.IGNORECASE))
    if not starts or "\n" in text[starts[-1].end():]:
        return text
    return text[:starts[-1].start()].strip()


def one_stage_prompt_text(record: dict, where: str, sft_prompt: str = "test-time", prompts=None,
                          warn: list | None = None) -> str:
    """The prompt of --mode one-stage: with "test-time" the one eval's one-stage mode sends
    (:func:`reflectevo.data.one_stage.one_stage_prompt`; ``prompts``: the templates eval uses); a record without
    the fields to build it, or "stored", uses its reflect_prompt (``warn`` collects the ``where`` of the former)."""
    if sft_prompt == "test-time":
        from reflectevo.data.jsonl import DataError
        from reflectevo.data.one_stage import one_stage_prompt

        has_stored = isinstance(record.get("test_reflection_prompt"), str) and record["test_reflection_prompt"].strip()
        try:
            return one_stage_prompt(record, prompts=prompts)
        except (DataError, KeyError, TypeError, AttributeError) as e:
            if has_stored:  # it is there but does not fit these prompts: training on another prompt is wrong
                raise TrainError(f"{where}: the one-stage prompt cannot be built: {e}") from None
        if warn is not None:
            warn.append(where)
    return reflection_prompt_text(record, where, dpo=False, sft_prompt="stored")


def sft_texts(record: dict, mode: str, where: str, sft_prompt: str = "test-time", prompts=None,
              warn: list | None = None, prompt: str | None = None) -> tuple[str, str]:
    """(prompt text, response text) of one D+ record for an SFT mode (trial transcripts without observation);
    ``prompt``: the prompt the caller built (eval's conversation, :func:`official_prompt`), else the record's."""
    if mode in ("one-stage", "reflect"):
        refl = _text(_field(record, "reflections", where, f"the target of --mode {mode}"), "reflections", where)
        if prompt is None:
            prompt = (one_stage_prompt_text(record, where, sft_prompt, prompts, warn) if mode == "one-stage" else
                      reflection_prompt_text(record, where, dpo=False, sft_prompt=sft_prompt))
        if mode == "reflect":
            return prompt, refl.strip()
        second = _text(_field(record, "second_trial_reasoning", where, "the corrected answer of --mode one-stage"),
                       "second_trial_reasoning", where)
        return prompt, refl.strip() + ONE_STAGE_SEPARATOR + _trial_target(second, where)
    second = _text(_field(record, "second_trial_reasoning", where, "the target of --mode correct"),
                   "second_trial_reasoning", where)
    # the leak check looks for the whole stored transcript, observation included (the official leak holds it)
    if prompt is None:
        prompt = trial2_prompt_text(record, where, second, sft_prompt)
    return prompt, _trial_target(second, where)


def _trial_target(transcript: str, where: str) -> str:
    """The trial transcript without its oracle observation; TrainError when nothing else is left."""
    target = strip_observation(transcript)
    if not target:
        raise TrainError(f"{where}: field 'second_trial_reasoning' holds only the oracle observation "
                         f"(no answer to train on)")
    return target


def dpo_texts(record: dict, where: str, prompt: str | None = None) -> tuple[str, str, str]:
    """(test-time reflection prompt, chosen reflection, rejected reflection) of one D± / Dpref record
    (``prompt``: the prompt the caller built, else the record's).

    The responses are reflections, which never carry an oracle observation (only trial transcripts do)."""
    chosen = _text(_field(record, "reflection_chosen", where, "the chosen reflection"), "reflection_chosen", where)
    rejected = _text(_field(record, "reflection_rejected", where, "the rejected reflection"),
                     "reflection_rejected", where)
    if prompt is None:
        prompt = reflection_prompt_text(record, where, dpo=True)
    return prompt, chosen.strip(), rejected.strip()


# ------------------------------------------------------------------------------------------------------------
# records that store no prompt of eval's (the official data): eval's conversation built for the task
# ------------------------------------------------------------------------------------------------------------
_STORED = {"reflect": "test_reflection_prompt", "one-stage": "test_reflection_prompt",
           "correct": "test_trial2_prompt", "dpo": "reflection_prompt"}
_BUILT = {"reflect": "reflect", "one-stage": "one-stage", "correct": "trial2", "dpo": "reflect"}


def stores_eval_prompt(record: dict, kind: str, tokenizer, frame, prompts=None) -> bool:
    """Whether ``record`` stores eval's prompt of ``kind`` (an SFT mode or "dpo"): a conversation rendered with this
    tokenizer's template, or one of eval's conversations rendered with another (:mod:`reflectevo.data.rerender`)."""
    from reflectevo.data.rerender import rerender

    text = record.get(_STORED[kind])
    if not isinstance(text, str) or not text.strip():
        return False
    return opened_assistant_turn(frame, text) is not None or rerender(record, text, tokenizer, prompts) is not None


def record_task(record: dict, task: str | None, where: str):
    """The task of a record: ``task`` (--task), else the record's "task" field, else None."""
    from reflectevo.data.jsonl import DataError
    from reflectevo.data.tasks import TASKS, get_task

    name = task or record.get("task")
    if not name:
        return None
    try:
        return get_task(name)
    except DataError:
        what = "--task" if task else f"{where}: field 'task'"
        raise TrainError(f"{what}: unknown task {name!r}; known tasks: {', '.join(TASKS)}") from None


def official_prompt(record: dict, kind: str, where: str, task: str | None, tokenizer, frame, prompts=None,
                    unbuilt: list | None = None) -> tuple[str, str] | None:
    """(eval's prompt of ``kind`` rendered with ``tokenizer``, its opened start of the assistant turn) for a record
    that stores none (:func:`stores_eval_prompt`) when its task is known (:func:`record_task`), built from its
    fields by :mod:`reflectevo.data.official`; TrainError naming file:line and the field it lacks. None: the record's
    own prompt stands (it stores eval's, or the task is unknown: ``unbuilt`` then collects ``where`` when the record
    has the fields to build eval's)."""
    from reflectevo.data.official import MissingField, eval_prompt

    if stores_eval_prompt(record, kind, tokenizer, frame, prompts):
        return None
    found = record_task(record, task, where)
    if found is None:
        if unbuilt is not None and all(isinstance(record.get(f), str) and record[f].strip()
                                       for f in ("question", "first_trial_reasoning")):
            unbuilt.append(where)
        return None
    try:
        return eval_prompt(_BUILT[kind], found, record, tokenizer, prompts)
    except MissingField as e:
        raise TrainError(f"{where}: {e}; eval's {found.name} prompt cannot be built") from None


# ------------------------------------------------------------------------------------------------------------
# texts -> token ids (chat template, truncation)
# ------------------------------------------------------------------------------------------------------------
def chat_frame(tokenizer) -> tuple[str, str]:
    """(before, after): what the chat template renders around one user message (``after`` ends with the
    generation prompt); ("", "") when the template does not render the message verbatim (nothing detectable)."""
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": _SENTINEL}], add_generation_prompt=True)
    before, found, after = rendered.partition(_SENTINEL)
    return (before, after) if found and _SENTINEL not in after else ("", "")


def opened_assistant_turn(frame: tuple[str, str], text: str) -> str | None:
    """For a prompt already rendered with the chat template of ``frame``: the text after its generation prompt
    (the start of the assistant turn the prompt holds, e.g. "Thought:", often ""). None for plain text.

    Rendered means: it starts with the template's first line (later lines of a system header may vary, e.g. a
    date) and holds the suffix the template renders after the user message, generation prompt included."""
    if not frame[1].strip():
        return None
    opening = frame[0].partition("\n")[0]
    at = text.rfind(frame[1])
    if not text.startswith(opening) or at < len(opening):
        return None
    return text[at + len(frame[1]):]


def chat_prompt(tokenizer, text: str, frame: tuple[str, str] | None = None) -> tuple[str, str]:
    """(the prompt exactly as generation sees it, the start of the assistant turn it already holds).

    A stored prompt already rendered with this tokenizer's chat template is kept as it is; plain text gets the
    template once (one user turn + the generation prompt). ``frame``: :func:`chat_frame` of the tokenizer
    (computed here when None)."""
    if frame is None:
        frame = chat_frame(tokenizer)
    opened = opened_assistant_turn(frame, text)
    if opened is not None:
        return text, opened
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True), ""


def continue_turn(opened: str, response: str) -> str:
    """The response without the start of the assistant turn that the prompt already holds."""
    head = opened.strip()
    if head and response.startswith(head):
        return response[len(head):]
    return response


def format_prompt(tokenizer, text: str) -> str:
    """The chat-formatted prompt exactly as generation sees it (see :func:`chat_prompt`)."""
    return chat_prompt(tokenizer, text)[0]


def encode_prompt(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(format_prompt(tokenizer, text), add_special_tokens=False)


def encode_response(tokenizer, text: str) -> list[int]:
    """The content's ids, then what the template renders after it up to its end-of-turn token (Llama-2 " </s>")."""
    from reflectevo.data.conversation import assistant_frame

    eot = tokenizer.eot_token_id
    if eot is None:
        raise TrainError("tokenizer: no end-of-turn token (chat template / eos) to end the response with")
    return tokenizer.encode(text + assistant_frame(tokenizer)[1], add_special_tokens=False) + [eot]


def truncate_prompt(prompt: list[int], keep: int, bos_id: int | None) -> list[int]:
    """The last ``keep`` tokens of the prompt (a leading BOS stays in front)."""
    if len(prompt) <= keep:
        return prompt
    if bos_id is not None and prompt and prompt[0] == bos_id and keep >= 2:
        return [bos_id] + prompt[len(prompt) - keep + 1:]
    return prompt[len(prompt) - keep:]


def make_example(key, where, prompt, responses, max_length, prompt_budget, bos_id, on_too_long):
    """Truncate the prompt to fit every response in max_length; None (skip) or TrainError when impossible."""
    longest = max(len(r) for r in responses)
    keep = min(prompt_budget, max_length - longest)
    if keep < 1:
        if on_too_long == "skip":
            return None
        raise TrainError(f"{where}: the response has {longest} tokens; with the prompt it cannot fit "
                         f"--max-length {max_length} (no room left for the prompt)")
    return Example(key, where, truncate_prompt(prompt, keep, bos_id), responses)


def example_keys(records_with_lines) -> list[str]:
    """One key per record: its id, and "id#k" for the k-th repeat (k raised past any id spelled that way)."""
    used: set[str] = set()
    repeats: dict[str, int] = {}
    keys = []
    for _, rec in records_with_lines:
        base = str(rec.get("id", "")) or "_"
        key, k = base, repeats.get(base, 0)
        while key in used:
            k += 1
            key = f"{base}#{k}"
        repeats[base] = k
        used.add(key)
        keys.append(key)
    return keys


def tokenize_records(records_with_lines, tokenizer, cfg, dpo: bool, path: str) -> tuple[list[Example], int]:
    """Examples for [(line, record)], plus how many were skipped as too long."""
    from reflectevo.trainer.clock import fixed_clock

    out, skipped, tokenizer = [], 0, fixed_clock(tokenizer)   # one date: the data must not change with the day
    keys = example_keys(records_with_lines)
    budget = cfg.prompt_budget() if dpo else cfg.max_length
    frame = chat_frame(tokenizer)
    prompts, fallback, unbuilt = load_prompts(getattr(cfg, "prompts", None)), [], []
    kind = "dpo" if dpo else cfg.mode
    for key, (line, rec) in zip(keys, records_with_lines):
        where = f"{path}:{line}"
        if not isinstance(rec, dict):
            raise TrainError(f"{where}: expected a JSON object")
        built = None
        if dpo or cfg.sft_prompt == "test-time":
            built = official_prompt(rec, kind, where, getattr(cfg, "task", None), tokenizer, frame, prompts, unbuilt)
        if dpo:
            p, *texts = dpo_texts(rec, where, None if built is None else built[0])
        else:
            p, *texts = sft_texts(rec, cfg.mode, where, cfg.sft_prompt, prompts, fallback,
                                  None if built is None else built[0])
        if built is None:
            p = eval_rendering(rec, p, tokenizer, frame, prompts)
        prompt, opened = chat_prompt(tokenizer, p, frame) if built is None else built
        responses = [encode_response(tokenizer, continue_turn(opened, t)) for t in texts]
        ex = make_example(key, where, tokenizer.encode(prompt, add_special_tokens=False), responses, cfg.max_length,
                          budget, tokenizer.bos_token_id, cfg.on_too_long)
        if ex is None:
            skipped += 1
        else:
            out.append(ex)
    if fallback and not getattr(cfg, "_told_fallback", False):   # once per run, as the --task warning below
        import sys

        cfg._told_fallback = True
        print(f"[reflectevo] warning: {len(fallback)} record(s) (first {fallback[0]}) lack 'question' / "
              "'first_trial_reasoning' to build the one-stage prompt: trained on their reflect_prompt (a "
              "reflection request that asks not to give the answer)", file=sys.stderr, flush=True)
    if unbuilt and not getattr(cfg, "_told_task", False):   # once per run (training and held-out records alike)
        import sys

        cfg._told_task = True
        print(f"[reflectevo] warning: {len(unbuilt)} record(s) (first {unbuilt[0]}) store no prompt of eval's "
              "(official data): trained on their own one-message / data-generation prompts, which differ from the "
              "conversation eval sends the trained model; pass --task T (the task of the data) to train on eval's "
              "prompts", file=sys.stderr, flush=True)
    return out, skipped


def eval_rendering(record: dict, text: str, tokenizer, frame, prompts=None) -> str:
    """``text``, or when it is one of eval's conversations stored with another chat template (another model's
    records), the same conversation as eval renders it for this model (:mod:`reflectevo.data.rerender`). A text
    this template rendered on another day (a template with a clock, ``strftime_now``) is kept: a run's data must
    not change with the date (its --resume checks the data)."""
    from reflectevo.data.rerender import rerender

    fresh = rerender(record, text, tokenizer, prompts)
    if fresh is None or fresh == text:
        return text
    clock = "strftime_now" in (getattr(tokenizer, "chat_template", None) or "")
    return text if clock and opened_assistant_turn(frame, text) is not None else fresh


def load_prompts(path):
    """The prompt templates of a --prompts file (None: ours), as eval loads them."""
    if not path:
        return None
    from reflectevo.data.jsonl import DataError
    from reflectevo.data.prompts import load_prompt_overrides

    try:
        return load_prompt_overrides(path)
    except DataError as e:
        raise TrainError(f"--prompts {e}") from None


def read_records(path) -> list[tuple[int, dict]]:
    """[(line, record)] of a JSONL file; one-line errors name file:line."""
    from reflectevo.data.jsonl import DataError, iter_jsonl

    try:
        return list(iter_jsonl(path))
    except DataError as e:
        raise TrainError(str(e)) from None


def data_digest(examples: list[Example]) -> str:
    h = hashlib.sha256()
    for ex in examples:
        h.update(ex.key.encode())
        h.update(str(ex.prompt).encode())
        for r in ex.responses:
            h.update(str(r).encode())
    return h.hexdigest()[:16]


def load_examples(path: str | Path, tokenizer, cfg, dpo: bool) -> list[Example]:
    records = read_records(path)
    examples, _ = tokenize_records(records, tokenizer, cfg, dpo, str(path))
    return examples
