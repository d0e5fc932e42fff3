"""Records -> token ids -> packed micro-batches.

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

Token layout: a plain-text prompt (the official data) is rendered with the model's chat template (one user turn,
generation prompt added); a prompt stored already rendered with this template (our raw records save prompts
exactly as the model saw them: multi-turn conversations ending in an opened assistant turn, see
:func:`chat_prompt`) is used as it is. A stored prompt that is one of eval's conversations (the test-time
reflection, one-stage and trial-2 prompts) is rendered again with this model's template first
(:func:`reflectevo.data.rerender.rerender`): records another model generated hold its template, eval renders ours. Either is encoded with
add_special_tokens=False; the response is the assistant content tokens plus the end-of-turn token (minus any
start of the assistant turn the stored prompt already holds, such as "Thought:"). Only response tokens and the
end-of-turn token carry labels. Too long: the prompt loses tokens from the left (a leading BOS is kept); the
response is never shortened - one that cannot fit is an error (or skipped).

Packing: the sequences of a micro-batch go into one row, back to back (no padding token is computed); each keeps
its own ``seq_ids`` value and positions restarting at 0, so attention never crosses a sequence boundary
(flash-attn varlen, or one causal SDPA per sequence). ``pack`` can also fill rows of a fixed length
first-fit-decreasing. Input = ids[:-1], labels = ids[1:] masked to -100 on prompt targets.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from reflectevo.errors import ReflectEvoError
from reflectevo.trainer.config import TrainError

IGNORE = -100
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


@dataclass
class Batch:
    input_ids: torch.Tensor     # [R, T]
    positions: torch.Tensor     # [R, T]
    seq_ids: torch.Tensor       # [R, T] sequence number inside its row, -1 on padding
    labels: torch.Tensor        # [R, T] next token, IGNORE on prompt and padding
    seq_index: torch.Tensor     # [R, T] index of the sequence in the batch (for per-sequence sums), -1 on padding
    num_seqs: int
    keys: list[str]
    num_tokens: int             # real (non-padding) tokens
    num_labels: int             # tokens that carry a label
    meta: dict = field(default_factory=dict)

    def to(self, device) -> "Batch":
        move = {k: getattr(self, k).to(device, non_blocking=True)
                for k in ("input_ids", "positions", "seq_ids", "labels", "seq_index")}
        return Batch(**move, num_seqs=self.num_seqs, keys=self.keys, num_tokens=self.num_tokens,
                     num_labels=self.num_labels, meta=self.meta)


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
              warn: list | None = None) -> tuple[str, str]:
    """(prompt text, response text) of one D+ record for an SFT mode (trial transcripts without observation)."""
    if mode in ("one-stage", "reflect"):
        refl = _text(_field(record, "reflections", where, f"the target of --mode {mode}"), "reflections", where)
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
    return trial2_prompt_text(record, where, second, sft_prompt), _trial_target(second, where)


def _trial_target(transcript: str, where: str) -> str:
    """The trial transcript without its oracle observation; TrainError when nothing else is left."""
    target = strip_observation(transcript)
    if not target:
        raise TrainError(f"{where}: field 'second_trial_reasoning' holds only the oracle observation "
                         f"(no answer to train on)")
    return target


def dpo_texts(record: dict, where: str) -> tuple[str, str, str]:
    """(test-time reflection prompt, chosen reflection, rejected reflection) of one D± / Dpref record.

    The responses are reflections, which never carry an oracle observation (only trial transcripts do)."""
    chosen = _text(_field(record, "reflection_chosen", where, "the chosen reflection"), "reflection_chosen", where)
    rejected = _text(_field(record, "reflection_rejected", where, "the rejected reflection"),
                     "reflection_rejected", where)
    return reflection_prompt_text(record, where, dpo=True), chosen.strip(), rejected.strip()


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
    eot = tokenizer.eot_token_id
    if eot is None:
        raise TrainError("tokenizer: no end-of-turn token (chat template / eos) to end the response with")
    return tokenizer.encode(text, add_special_tokens=False) + [eot]


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
    out, skipped = [], 0
    keys = example_keys(records_with_lines)
    budget = cfg.prompt_budget() if dpo else cfg.max_length
    frame = chat_frame(tokenizer)
    prompts, fallback = load_prompts(getattr(cfg, "prompts", None)), []
    for key, (line, rec) in zip(keys, records_with_lines):
        where = f"{path}:{line}"
        if not isinstance(rec, dict):
            raise TrainError(f"{where}: expected a JSON object")
        if dpo:
            p, *texts = dpo_texts(rec, where)
        else:
            p, *texts = sft_texts(rec, cfg.mode, where, cfg.sft_prompt, prompts, fallback)
        p = eval_rendering(rec, p, tokenizer, frame, prompts)
        prompt, opened = chat_prompt(tokenizer, p, frame)
        responses = [encode_response(tokenizer, continue_turn(opened, t)) for t in texts]
        ex = make_example(key, where, tokenizer.encode(prompt, add_special_tokens=False), responses, cfg.max_length,
                          budget, tokenizer.bos_token_id, cfg.on_too_long)
        if ex is None:
            skipped += 1
        else:
            out.append(ex)
    if fallback:
        import sys

        print(f"[reflectevo] warning: {len(fallback)} record(s) (first {fallback[0]}) lack 'question' / "
              "'first_trial_reasoning' to build the one-stage prompt: trained on their reflect_prompt (a "
              "reflection request that asks not to give the answer)", file=sys.stderr, flush=True)
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


# ------------------------------------------------------------------------------------------------------------
# packing
# ------------------------------------------------------------------------------------------------------------
def sequences_of(examples: list[Example], dpo: bool) -> list[tuple[list[int], list[int]]]:
    """(inputs, labels) per sequence; DPO order: all chosen, then all rejected."""
    def one(prompt, resp):
        ids = prompt + resp
        labels = [IGNORE] * (len(prompt) - 1) + resp
        return ids[:-1], labels

    if not dpo:
        return [one(ex.prompt, ex.responses[0]) for ex in examples]
    return [one(ex.prompt, ex.responses[0]) for ex in examples] + [one(ex.prompt, ex.responses[1]) for ex in examples]


def pack(seqs: list[tuple[list[int], list[int]]], row_len: int, keys: list[str], pad_id: int = 0) -> Batch:
    """First-fit-decreasing packing of sequences into rows of at most row_len tokens."""
    order = sorted(range(len(seqs)), key=lambda i: (-len(seqs[i][0]), i))
    rows: list[list[int]] = []
    fill: list[int] = []
    for i in order:
        n = len(seqs[i][0])
        if n > row_len:
            raise TrainError(f"internal: sequence of {n} tokens exceeds the row length {row_len}")
        for r, f in enumerate(fill):
            if f + n <= row_len:
                rows[r].append(i)
                fill[r] += n
                break
        else:
            rows.append([i])
            fill.append(n)
    R, T = len(rows), max(fill)
    ids = torch.full((R, T), pad_id, dtype=torch.long)
    pos = torch.zeros((R, T), dtype=torch.long)
    sid = torch.full((R, T), -1, dtype=torch.long)
    lab = torch.full((R, T), IGNORE, dtype=torch.long)
    sidx = torch.full((R, T), -1, dtype=torch.long)
    for r, members in enumerate(rows):
        at = 0
        for local, i in enumerate(sorted(members)):
            inp, labels = seqs[i]
            n = len(inp)
            ids[r, at:at + n] = torch.tensor(inp)
            lab[r, at:at + n] = torch.tensor(labels)
            pos[r, at:at + n] = torch.arange(n)
            sid[r, at:at + n] = local
            sidx[r, at:at + n] = i
            at += n
    # rows holding one sequence each need no per-sequence attention (trailing padding is never attended)
    meta = {"packed": any(len(m) > 1 for m in rows)}
    return Batch(ids, pos, sid, lab, sidx, len(seqs), keys, sum(fill), int((lab != IGNORE).sum()), meta)


def make_batch(examples: list[Example], cfg, dpo: bool, pad_id: int | None) -> Batch:
    """The micro-batch as one packed row (each sequence already fits ``cfg.max_length``)."""
    seqs = sequences_of(examples, dpo)
    return pack(seqs, sum(len(inp) for inp, _ in seqs), [ex.key for ex in examples], pad_id or 0)


def load_examples(path: str | Path, tokenizer, cfg, dpo: bool) -> list[Example]:
    records = read_records(path)
    examples, _ = tokenize_records(records, tokenizer, cfg, dpo, str(path))
    return examples
