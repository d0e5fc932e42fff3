"""The ReflectEvo loop: trial 1 -> reflections -> trial 2 for many questions at once, resumable.

Questions are processed in chunks (``chunk_size``, 32 by default). Inside a chunk every phase sends ALL its
prompts to ONE ``engine.generate`` call, so the sampler batches across questions:

1. trial 1 for every question (greedy);
2. ``n_reflections`` reflections for every failed question (one request with ``n`` samples per question:
   temperature 0.8, top_p 0.9, at most 512 tokens, seeded by (seed, question id), so a question gets the same
   reflections whatever else shares the batch and after a resume);
3. trial 2 for every reflection (greedy), each built on the SAVED trial-1 transcript (never on another
   reflection's trial 2: defect 1 of the public code).

Each question is ONE growing chat conversation (``prompts.py``): trial 1 = [user: trial prompt] + "Thought:";
the reflection prompt adds the trial-1 transcript (with its observation) as the assistant turn and the
reflection request as a user turn; trial 2 adds the reflection as the assistant turn and the retry request.
Prompts go to the engine as the tokenizer's own ids of the saved text (the ids the trainer encodes from a curated
record, so a trained reflector is asked with exactly the ids it learned from; ``conversation.py``). They begin
with the ids the engine computed in the previous phase (prompt + generated tokens) up to the first seam the
tokenizer encodes otherwise (none in our SmolLM2 runs; with Llama-3's pre-tokeniser often the line break after
the trial-1 action), so the prefix cache holds nearly all of a trial-2 prompt, and every task's conversations
share the instructions and worked examples. Only when trial and
reflection engines are the same (no adapter) does a phase hit the blocks of the other engine's phase; with an
adapter each engine still reuses its own.

A trial is one greedy call: the prompt ends with "Thought:" inside the assistant turn and the model writes its
thought and its action; generation stops before an "Observation" (the environment writes that). Thought,
action and answer are parsed from the text (``Prompts.parse_trial``; an Action line without its wrapper, e.g.
"Action: B", is read as a bare answer). When the model ended without an action (it ran out of tokens or closed
its turn before an "Action:" line, or left that line empty), a second greedy call, batched over all such trials,
continues exactly that text with "\\nAction:" (after the empty "Action:" itself when there is one) and gives the
action (the official code's second call; ``forced.py``, which the attempt of a one-stage reply uses too). The
oracle observation (right / wrong, from the gold answer) then ends the transcript; an answer whose check raises is
wrong, with the reason in its ``error`` (``ReflectLoop.verify``).

Prompts are saved exactly as the engine received them (the text its ids decode to, which is the chat
template's rendering of the conversation): ``reason_prompt`` / ``reflection_prompt`` are the prompts of the
first call (for a forced action, the second call's prompt is ``reason_prompt`` + the generated text + the
"Action:" cue, recoverable from the record). A record whose trial 1 failed also stores
``test_reflection_prompt``: the test-time reflection conversation on its trial 1 (the prompt of the DPO pairs
curated from it; equal to ``reflection_prompt`` in evaluation mode), and each of its trial-2 entries an extra
``test_reason_prompt``: that trial 2 as eval would render it (test-time request, the same reflection, the retry
request), which the "correct" SFT stage trains on; equal to ``reason_prompt`` in evaluation mode.

Records use the official raw schema (``id, question, answer, [test_list], output: [...]``, ``output[0]`` =
trial 1, then one trial-2 entry per reflection; ours besides: ``forced_action`` true on a trial whose action came
from the forced call, ``trial1_from_cache`` true on a record whose trial 1 was read from a cache) and are appended
one line each (flushed) when their chunk completes, with an fsync per chunk. A rerun on the same file skips the
questions already complete (a torn last line from a killed run is cut off first), so a kill loses at most one
chunk and nothing is written twice. A question is complete when the file holds its id WITH the same question
text: ids of files without official ids are line numbers, so an id there with another question is an error
(another data file), never a skip.

Evaluation mode (``test_time=True``): one reflection per failure with the test-time reflection request (no
demand), and trial-1 outputs may come from a cache (keyed by id) so that settings share the same first trials
(their conversation is rebuilt from the cached transcript, so its ids are the same as when computed). With
``reflector_mode="one-stage"`` (evaluation only; the paper's setting I) the reflector answers the one-stage
request with its reflection AND its new attempt in one reply, which is split and verified as trial 2 (no trial-2
generation; ``one_stage.py``); the trial-2 entry's ``reason_prompt`` / ``reflection_prompt`` are that prompt, its
``reflections`` the reflection part, its ``scratchpad`` the attempt's transcript, ``one_stage_output`` the whole
reply, and its ``reasoning_source`` the reflector's (``trial2_source``). With ``reflector_mode="none"`` (evaluation
only; the paper's "prompt w/o reflection" baseline, ``no_reflection.py``) no reflection is written: trial 2 follows
the failed trial 1 and a retry request directly; its entry has ``reflections`` [] and ``reflection_source`` "none".
"""
from __future__ import annotations

import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..errors import ReflectEvoError
from .conversation import Prompt, PromptBuilder
from .forced import force_actions, needs_action
from .instructions import parse_demand, question_seed, sample_demand
from .jsonl import DataError, append_jsonl, completed_records, iter_jsonl
from .no_reflection import NO_REFLECTION, run_retry
from .one_stage import REFLECTOR_MODES
from .prompts import DEFAULT, Prompts, Trial, answer_format

__all__ = ["LoopConfig", "ReflectLoop", "AdapterOffEngine", "question_seed", "check_resumed_sources"]


@dataclass
class LoopConfig:
    n_reflections: int = 2
    demand: str = "1-1-1"               # an a-b-c key, or "random" (one demand drawn per question, seeded)
    seed: int = 0
    max_tokens: int = 256               # one trial (thought + action)
    action_max_tokens: int = 48         # the forced action of a trial that stopped before "Action:" (code: max_tokens)
    reflection_max_tokens: int = 512
    reflection_temperature: float = 0.8
    reflection_top_p: float = 0.9
    test_time: bool = False             # evaluation: test-time reflection prompt, no demand
    force_action: bool = True
    chunk_size: int = 32
    verify_workers: int | None = None   # MBPP sandbox workers (None: the task's default)
    reasoning_source: str = "N/A"       # names written into the records
    reflection_source: str = "N/A"
    trial2_source: str | None = None    # trial 2's reasoning_source when another model answers it (None: the same)
    prompts_id: str | None = None       # fingerprint of the prompt templates when not the built-in ones (settings)
    reflector_mode: str = "two-stage"   # eval only: "one-stage" (one_stage.py) | "none" (no_reflection.py)

    def validate(self) -> None:
        if self.n_reflections < 1:
            raise DataError(f"--n-reflections must be >= 1, got {self.n_reflections}")
        if self.chunk_size < 1:
            raise DataError(f"chunk size must be >= 1, got {self.chunk_size}")
        for name in ("max_tokens", "action_max_tokens", "reflection_max_tokens"):
            if getattr(self, name) < 1:
                raise DataError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if str(self.demand).strip().lower() != "random":
            parse_demand(self.demand)
        if self.reflector_mode not in REFLECTOR_MODES:
            raise DataError(f"--reflector-mode must be one of {', '.join(REFLECTOR_MODES)}, "
                            f"got {self.reflector_mode!r}")
        if self.reflector_mode != "two-stage" and not self.test_time:
            raise DataError(f"--reflector-mode {self.reflector_mode}: for evaluation only (generate samples "
                            "reflections, then trial 2 from the generator)")


ONE_STAGE_TRIAL2 = ("--trial2-adapter: not with the one-stage reflector mode (the one-stage model answers trial 2 "
                    "itself); drop it, or pass --reflector-mode two-stage")


def check_resumed_sources(path, cfg: LoopConfig, ids, trial1_ids=()) -> None:
    """Refuse to resume ``path`` when a record of one of ``ids`` was written by another model / adapter than
    ``cfg`` names (its entries' reasoning_source / reflection_source); trial-1 entries of ``trial1_ids`` (from a
    trial-1 cache) are not checked. One-line DataError naming file:line and both values."""
    path = Path(path)
    if not path.exists():
        return
    wanted, seen = {repr(i) for i in ids}, set()
    trial2 = cfg.trial2_source or cfg.reasoning_source
    skip_t1 = {repr(i) for i in trial1_ids}
    for line, rec in iter_jsonl(path, ("id",)):
        key = repr(rec["id"])
        if key not in wanted or key in seen:
            continue
        seen.add(key)
        for entry in rec.get("output") or []:
            if not isinstance(entry, dict):
                continue
            t2 = int(entry.get("trail", entry.get("trial", 1)) or 1) == 2
            expect = {"reasoning_source": trial2 if t2 else cfg.reasoning_source}
            if t2:
                expect["reflection_source"] = cfg.reflection_source
            elif key in skip_t1:
                continue
            for name, want in expect.items():
                got = entry.get(name)
                if got is not None and got != want:
                    raise DataError(f"{path}:{line}: id {rec['id']!r} was written with {name} {got!r}, this run "
                                    f"has {want!r}; write this run to another file (or start it over)")


class AdapterOffEngine:
    """An engine whose calls run with the model's LoRA adapters switched off (the base model = the generator).

    It must not share a prefix cache with the adapter model's engine: the same tokens have other K/V there.
    """

    def __init__(self, engine, model):
        self.engine, self.model = engine, model

    def generate(self, prompts, params=None, **kwargs):
        from reflectevo.model.lora import adapters_disabled

        with adapters_disabled(self.model):
            return self.engine.generate(prompts, params, **kwargs)


def _log_stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class _Trial:
    prompt: Prompt                                  # the first call's prompt (saved as reason_prompt)
    trial: Trial
    correct: bool = False
    error: str | None = None
    transcript: str = ""
    forced: bool = False                            # its action came from the second (forced) call


@dataclass
class _Pending:
    """One question moving through the phases of its chunk."""
    item: dict
    t1: _Trial | dict | None = None       # dict: a cached trial-1 output entry
    demand: str | None = None
    reflection_messages: list[dict] = field(default_factory=list)
    reflection_prompt: Prompt | None = None
    test_reflection_prompt: str = ""
    reflections: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)     # one-stage: the whole replies the reflections came from
    t2: list[_Trial] = field(default_factory=list)

    @property
    def t1_correct(self) -> bool:
        return bool(self.t1["is_correct"]) if isinstance(self.t1, dict) else self.t1.correct

    @property
    def t1_transcript(self) -> str:
        return self.t1["scratchpad"] if isinstance(self.t1, dict) else self.t1.transcript


class ReflectLoop:
    """Runs the loop over items with a trial engine (generator) and a reflection engine (reflector).

    Engines need ``generate(prompts: list[list[int]], params | list[params]) -> outs[i][j]`` with ``.text``,
    ``.token_ids`` and ``.finish_reason`` (reflectevo.gen). With no adapter both may be the same engine (then
    each phase hits the previous phase's cached blocks); with an adapter pass ``AdapterOffEngine`` for the
    trials. ``trial2_engine`` (default: the trial engine) answers trial 2 alone, e.g. the second-stage adapter of
    two-stage SFT (not with ``cfg.reflector_mode="one-stage"``, where the reflector's reply is trial 2; with
    "none" it answers trial 2 right after trial 1 and ``reflect_engine`` is not used).
    ``tokenizer``: ``apply_chat_template``, ``encode(text, add_special_tokens=False)``, ``decode``.
    """

    def __init__(self, task, trial_engine, reflect_engine, tokenizer, cfg: LoopConfig | None = None,
                 prompts: Prompts | None = None, log: Callable[[str], None] | None = _log_stderr,
                 trial2_engine=None):
        from reflectevo.gen import SamplingParams

        self.task, self.cfg = task, cfg or LoopConfig()
        self.cfg.validate()
        if self.cfg.reflector_mode == "one-stage":
            if trial2_engine is not None:
                raise DataError(ONE_STAGE_TRIAL2)
            self.cfg.trial2_source = self.cfg.trial2_source or self.cfg.reflection_source  # it answers trial 2
        elif self.cfg.reflector_mode == NO_REFLECTION:
            self.cfg.reflection_source = NO_REFLECTION  # no reflector: trial 2 from trial2_engine, right after trial 1
        self.trial_engine, self.reflect_engine = trial_engine, reflect_engine
        self.trial2_engine = trial2_engine if trial2_engine is not None else trial_engine
        self.build = PromptBuilder(tokenizer)
        self.P = prompts or DEFAULT
        self.log = log or (lambda msg: None)
        self.SamplingParams = SamplingParams
        self.stats = {"questions": 0, "t1_correct": 0, "reflections": 0, "t2_correct": 0, "forced_actions": 0,
                      "seconds": 0.0}

    # ---------------------------------------------------------------------------------------------- prompts
    def trial1_prompt(self, item: dict) -> Prompt:
        return self.build.start(self.build.render(self.P.trial_messages(self.task, item), self.P.response_prefix))

    def reflection_prompt(self, p: _Pending) -> Prompt:
        """The reflection conversation of ``p`` (messages set), after its trial 1."""
        return self.build.start(self.build.render(p.reflection_messages))

    def trial2_prompt(self, p: _Pending, j: int) -> Prompt:
        """Trial 2 with reflection ``j``, after the reflection request and that reflection."""
        messages = self.P.trial2_messages(p.item, p.reflection_messages, p.reflections[j])
        return self.build.start(self.build.render(messages, self.P.response_prefix))

    def test_trial2_text(self, p: _Pending, reflection: str, prompt: Prompt) -> str:
        """Trial 2 on ``reflection`` as evaluation renders it (after the test-time reflection request)."""
        if self.cfg.test_time and self.cfg.reflector_mode != "one-stage":  # two-stage; none: the retry prompt
            return prompt.text
        messages = self.P.test_reflection_messages(self.task, p.item, p.t1_transcript)
        return self.build.render(self.P.trial2_messages(p.item, messages, reflection), self.P.response_prefix)

    def demand_for(self, item: dict):
        if self.cfg.test_time:
            return None
        if str(self.cfg.demand).strip().lower() == "random":
            return sample_demand(random.Random(question_seed(self.cfg.seed, item["id"]) ^ 0x5DEECE66D))
        return parse_demand(self.cfg.demand)

    # ---------------------------------------------------------------------------------------------- phases
    def run_trials(self, engine, prompts: list[Prompt], items: list[dict]) -> list[_Trial]:
        """One greedy trial per prompt (batched), forced actions where needed (batched), then verification."""
        if not prompts:
            return []
        SP = self.SamplingParams
        stops = self.P.stop_sequences(self.task)
        outs = engine.generate([p.ids for p in prompts], SP(temperature=0.0, max_tokens=self.cfg.max_tokens,
                                                            stop=stops))
        texts = [o[0].text for o in outs]
        reasons = [o[0].finish_reason for o in outs]
        trials = [_Trial(p, self.P.parse_trial(self.task, t)) for p, t in zip(prompts, texts)]
        is_code = answer_format(self.task) == "code"
        need = [i for i, tr in enumerate(trials) if needs_action(tr.trial)] if self.cfg.force_action else []
        jobs = [(prompts[i].text, texts[i], trials[i].trial.thought) for i in need]
        for i, (trial, reason) in zip(need, force_actions(self, engine, jobs)):
            trials[i].trial, trials[i].forced, reasons[i] = trial, True, reason
        answers = [tr.trial.answer for tr in trials]
        kwargs = {"workers": self.cfg.verify_workers} if is_code else {}
        verdicts, failures = self.verify(answers, items, kwargs)
        for tr, ok, failure, reason in zip(trials, verdicts, failures, reasons):
            tr.correct = bool(ok)
            if tr.trial.answer is None:
                tr.error = ("no answer: the output has no valid action" +
                            (" (generation hit max_tokens)" if reason == "length" else ""))
            elif failure is not None:
                tr.error = failure
            tr.transcript = self.P.transcript(tr.trial, tr.correct)
        return trials

    def verify(self, answers: list, items: list[dict], kwargs: dict) -> tuple[list[bool], list[str | None]]:
        """The task's verdicts on ``answers``. An answer whose check raises (e.g. a MATH answer with a number too
        long for Python's int conversion) is wrong, with the reason as its error, instead of ending the run (and
        every rerun of it: greedy trials give the same answer again). Bad data (ReflectEvoError) and OS failures
        (the sandbox cannot start) still stop the run: they are not the answer's fault."""
        try:
            return list(self.task.check_many(answers, items, **kwargs)), [None] * len(answers)
        except (ReflectEvoError, OSError):
            raise
        except Exception:
            pass
        verdicts, failures = [], []
        for answer, item in zip(answers, items):  # find the answer(s) the checker cannot take
            try:
                verdicts.append(bool(self.task.check_many([answer], [item], **kwargs)[0]))
                failures.append(None)
            except (ReflectEvoError, OSError):
                raise
            except Exception as e:
                msg = " ".join(str(e).split())
                verdicts.append(False)
                failures.append(f"verification failed: {type(e).__name__}: {msg[:200]}")
        return verdicts, failures

    def run_reflections(self, pending: list[_Pending]) -> None:
        if not pending:
            return
        n = 1 if self.cfg.test_time else self.cfg.n_reflections
        params = []
        for p in pending:
            demand = self.demand_for(p.item)
            p.demand = demand.key if demand is not None else None
            p.reflection_messages = self.P.reflection_messages(self.task, p.item, p.t1_transcript, demand,
                                                               test_time=self.cfg.test_time)
            p.reflection_prompt = self.reflection_prompt(p)
            p.test_reflection_prompt = p.reflection_prompt.text if self.cfg.test_time else self.build.render(
                self.P.test_reflection_messages(self.task, p.item, p.t1_transcript))
            params.append(self.SamplingParams(n=n, temperature=self.cfg.reflection_temperature,
                                              top_p=self.cfg.reflection_top_p,
                                              max_tokens=self.cfg.reflection_max_tokens,
                                              seed=question_seed(self.cfg.seed, p.item["id"])))
        outs = self.reflect_engine.generate([p.reflection_prompt.ids for p in pending], params)
        for p, o in zip(pending, outs):
            p.reflections = [s.text.strip() for s in o]
        self.stats["reflections"] += sum(len(p.reflections) for p in pending)

    # ---------------------------------------------------------------------------------------------- records
    def _entry(self, tr: _Trial, trail: int, reflections: list[str], reflection_prompt: str) -> dict:
        return {"generated_answer": tr.trial.answer, "reflections": list(reflections), "scratchpad": tr.transcript,
                "is_correct": tr.correct, "error": tr.error, "trail": trail,
                "reasoning_source": (self.cfg.trial2_source or self.cfg.reasoning_source) if trail == 2
                else self.cfg.reasoning_source,
                "reflection_source": self.cfg.reflection_source if trail == 2 else "N/A",
                "reason_prompt": tr.prompt.text, "reflection_prompt": reflection_prompt,
                **({"forced_action": True} if tr.forced else {})}

    def record(self, p: _Pending) -> dict:
        item = p.item
        rec = {"id": item["id"], "question": item["question"], "answer": item["answer"]}
        if "test_list" in item:
            rec["test_list"] = item["test_list"]
            if item.get("test_setup_code"):
                rec["test_setup_code"] = item["test_setup_code"]
        if p.demand is not None:
            rec["demand"] = p.demand
        if p.test_reflection_prompt:
            rec["test_reflection_prompt"] = p.test_reflection_prompt
        if isinstance(p.t1, dict):
            rec["trial1_from_cache"] = True
        first = dict(p.t1) if isinstance(p.t1, dict) else self._entry(p.t1, 1, [], "")
        # mode none: one trial 2 per failure and no reflection (nor reflection prompt) behind it
        reflections = p.reflections if self.cfg.reflector_mode != NO_REFLECTION else [None] * len(p.t2)
        asked = p.reflection_prompt.text if p.reflection_prompt is not None else ""
        rec["output"] = [first] + [{**self._entry(t2, 2, [] if r is None else [r], asked),
                                    "test_reason_prompt": self.test_trial2_text(p, r or "", t2.prompt)}
                                   for r, t2 in zip(reflections, p.t2)]
        for entry, text in zip(rec["output"][1:], p.outputs):
            entry["one_stage_output"] = text
        return rec

    # ---------------------------------------------------------------------------------------------- driver
    def run_chunk(self, items: list[dict], trial1_cache: dict | None = None) -> list[dict]:
        """All phases for one chunk of questions; returns their records (input order)."""
        pending = [_Pending(item) for item in items]
        fresh = []
        for p in pending:
            cached = (trial1_cache or {}).get(p.item["id"])
            if cached is not None:
                p.t1 = cached
            else:
                fresh.append(p)
        t0 = time.perf_counter()
        trials = self.run_trials(self.trial_engine, [self.trial1_prompt(p.item) for p in fresh],
                                 [p.item for p in fresh])
        for p, tr in zip(fresh, trials):
            p.t1 = tr
        failed = [p for p in pending if not p.t1_correct]
        self.log(f"  trial 1: {len(pending) - len(failed)}/{len(pending)} correct"
                 f"{f' ({len(pending) - len(fresh)} from the trial-1 cache)' if len(fresh) < len(pending) else ''}"
                 f" [{time.perf_counter() - t0:.1f} s]")
        t0 = time.perf_counter()
        if self.cfg.reflector_mode == "one-stage":
            from .one_stage import run_one_stage

            t2 = run_one_stage(self, failed)
            if failed:
                self.log(f"  one-stage reflection + new attempt: {sum(t.correct for t in t2)}/{len(t2)} correct "
                         f"[{time.perf_counter() - t0:.1f} s]")
            jobs = []
        elif self.cfg.reflector_mode == NO_REFLECTION:
            t2 = run_retry(self, failed)
            jobs = [(p, 0) for p in failed]
        else:
            self.run_reflections(failed)
            if failed:
                self.log(f"  reflections: {sum(len(p.reflections) for p in failed)} for {len(failed)} wrong answers "
                         f"[{time.perf_counter() - t0:.1f} s]")
            t0 = time.perf_counter()
            jobs = [(p, j) for p in failed for j in range(len(p.reflections))]
            t2 = self.run_trials(self.trial2_engine, [self.trial2_prompt(p, j) for p, j in jobs],
                                 [p.item for p, _ in jobs])
            for (p, _), tr in zip(jobs, t2):
                p.t2.append(tr)
        if jobs:
            fixed = sum(any(t.correct for t in p.t2) for p in failed)
            how = "without a reflection" if self.cfg.reflector_mode == NO_REFLECTION else "by some reflection"
            self.log(f"  trial 2: {sum(t.correct for t in t2)}/{len(t2)} correct, {fixed}/{len(failed)} questions "
                     f"fixed {how} [{time.perf_counter() - t0:.1f} s]")
        records = [self.record(p) for p in pending]
        self.stats["questions"] += len(records)
        self.stats["t1_correct"] += sum(p.t1_correct for p in pending)
        self.stats["t2_correct"] += sum(t.correct for t in t2)
        return records

    def run(self, items: list[dict], out_path, trial1_cache: dict | None = None,
            after_chunk: Callable[[int, list[dict]], None] | None = None) -> dict:
        """Process ``items`` into ``out_path`` (JSONL), skipping ids already complete there; returns stats.

        ``after_chunk(chunk_index, records)`` is called after each chunk is on disk (progress, tests).
        """
        out_path = Path(out_path)
        ids = [it["id"] for it in items]
        if len(set(map(repr, ids))) != len(ids):
            seen, dup = set(), None
            for i in ids:
                if repr(i) in seen:
                    dup = i
                    break
                seen.add(repr(i))
            raise DataError(f"duplicate question id {dup!r} in the input")
        out_path.parent.mkdir(parents=True, exist_ok=True)
        done = completed_records(out_path)
        todo = []
        for it in items:
            if it["id"] not in done:
                todo.append(it)
                continue
            line_no, question = done[it["id"]]
            if question != it["question"]:
                raise DataError(f"{out_path}:{line_no}: id {it['id']!r} is already there with another question than "
                                "the input's (records of another data file?); write this run to another file")
        if done:
            check_resumed_sources(out_path, self.cfg, [it["id"] for it in items if it["id"] in done],
                                  [i for i in (trial1_cache or {})])
            self.log(f"{out_path}: {len(items) - len(todo)} of {len(items)} questions already complete, resuming")
        start = time.perf_counter()
        size = self.cfg.chunk_size
        n_chunks = (len(todo) + size - 1) // size
        for c in range(n_chunks):
            chunk = todo[c * size:(c + 1) * size]
            self.log(f"chunk {c + 1}/{n_chunks}: {len(chunk)} questions")
            records = self.run_chunk(chunk, trial1_cache)
            for rec in records:
                append_jsonl(out_path, rec)
            with open(out_path, "a", encoding="utf-8") as f:
                os.fsync(f.fileno())
            if after_chunk is not None:
                after_chunk(c, records)
        self.stats["seconds"] += time.perf_counter() - start
        self.stats["skipped_complete"] = len(items) - len(todo)
        return dict(self.stats)
