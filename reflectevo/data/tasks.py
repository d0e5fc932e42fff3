"""Tasks: loaders for the official JSONL test files, answer checkers, and a generated arithmetic family.

``get_task(name, **options)`` -> a :class:`Task` with ``load(path=None, limit=None) -> list[dict]`` and
``check(prediction, item) -> bool`` (``prediction`` is the answer inside the action: a letter, LaTeX, code or
text). Every item keeps its official fields and gains ``id`` (unique), ``question`` (the text shown to the
model) and ``answer`` (the gold answer in the form ``check`` expects):

============== ======================================= ===================================== =================
task           official fields                         question                              answer / id
============== ======================================= ===================================== =================
logiqa         id, question, answer (a-d)              question (options included)           letter; id
math           problem, solution, level, type          problem                               last ``\\boxed``
                                                                                             of solution;
                                                                                             id = line index
mbpp           text, code, task_id, test_list,         text + the asserts to satisfy         reference code;
               test_setup_code, challenge_test_list                                          id = task_id
bigbench       question, answer [, id]                 question                              letter or text;
                                                                                             id = line index
bigbench-free  (the free-text items of the same file)  question                              text
arithmetic     generated: difficulty, steps            word problem                          integer string
============== ======================================= ===================================== =================

BIG-bench: the official test file mixes multiple-choice items (an "Options:" block with lettered lines and a
one-letter gold answer; these carry an official ``id``, which is not unique) with free-text reading questions
(no ``id``, a short text answer). ``bigbench`` loads every item and checks each by its ``kind``: "mc" items
with the tolerant letter matcher, "free" items with SQuAD exact match. ``bigbench-free`` loads only the free
items (same checker; ``score`` gives token F1). In both, ``id`` is the 0-based line index in the file and the
official id, when present, is kept as ``source_id``.

File tasks need an explicit path (``--data FILE``); ``arithmetic`` needs none (``path`` may name a JSONL file of
previously generated items with ``question`` and ``answer``).
"""
from __future__ import annotations

import random
from typing import Callable, Sequence

from .jsonl import DataError, iter_jsonl
from .math_equiv import last_boxed
from .verifiers import (check_choice, check_code, check_math, check_number, exact_match, f1_score,
                        parse_options)

__all__ = ["Task", "TASKS", "get_task", "LogiQATask", "MathTask", "MBPPTask", "BigBenchTask", "ArithmeticTask"]


class Task:
    """Base task: subclasses set ``name``, ``answer_format`` and implement ``_normalize`` and ``check``."""

    name = "task"
    answer_format = "brackets"  # "brackets": Finish[X]; "angles": Finish<<<X>>>; "code": [BEGIN] ... [END]
    required_fields: tuple[str, ...] = ()

    def load(self, path=None, limit: int | None = None) -> list[dict]:
        if path is None:
            raise DataError(f"task {self.name!r} needs a data file: pass --data FILE (the official "
                            f"{self.name} JSONL, e.g. {self.name}_test.jsonl)")
        if limit is not None and limit < 0:
            raise DataError(f"limit must be >= 0, got {limit}")
        items, seen = [], {}
        if limit == 0:
            return items
        for index, (line_no, record) in enumerate(iter_jsonl(path, self.required_fields)):
            item = self._normalize(dict(record), index, f"{path}:{line_no}")
            if item is None:
                continue
            if item["id"] in seen:
                raise DataError(f"{path}:{line_no}: duplicate id {item['id']!r} (first on line {seen[item['id']]})")
            seen[item["id"]] = line_no
            items.append(item)
            if limit is not None and len(items) >= limit:
                break
        return items

    def _normalize(self, record: dict, index: int, where: str) -> dict | None:
        raise NotImplementedError

    def check(self, prediction: str | None, item: dict) -> bool:
        raise NotImplementedError

    def score(self, prediction: str | None, item: dict) -> float:
        """A graded score in [0, 1]: token F1 for free text, else 1.0/0.0 from ``check``."""
        return float(self.check(prediction, item))

    def check_many(self, predictions: Sequence[str | None], items: Sequence[dict], workers: int | None = None
                   ) -> list[bool]:
        """``check`` for many (prediction, item) pairs; MBPP runs them in parallel sandboxes."""
        return [self.check(p, it) for p, it in zip(predictions, items)]

    def __repr__(self) -> str:
        return f"<task {self.name}>"


class LogiQATask(Task):
    name = "logiqa"
    required_fields = ("question", "answer")

    def _normalize(self, record, index, where):
        record.setdefault("id", index)
        record["answer"] = str(record["answer"]).strip().lower()
        return record

    def check(self, prediction, item):
        return check_choice(prediction, item["answer"], item["question"])


class MathTask(Task):
    name = "math"
    answer_format = "angles"
    required_fields = ("problem", "solution")

    def _normalize(self, record, index, where):
        gold = last_boxed(record["solution"])
        if gold is None:
            raise DataError(f"{where}: no \\boxed{{...}} answer in 'solution'")
        record.setdefault("id", record.get("unique_id", index))
        record["question"] = record["problem"]
        record["answer"] = gold
        return record

    def check(self, prediction, item):
        return check_math(prediction, item["answer"])


class MBPPTask(Task):
    name = "mbpp"
    answer_format = "code"
    required_fields = ("text", "test_list")

    def __init__(self, timeout: float = 5.0, workers: int | None = None):
        self.timeout, self.workers = timeout, workers

    def _normalize(self, record, index, where):
        if not isinstance(record["test_list"], list) or not all(isinstance(t, str) for t in record["test_list"]):
            raise DataError(f"{where}: 'test_list' must be a list of assert strings")
        record["id"] = record.get("task_id", index)
        record.setdefault("test_setup_code", "")
        record["question"] = mbpp_question(record["text"], record["test_list"])
        record["answer"] = record.get("code", "")
        return record

    def check(self, prediction, item):
        return check_code(prediction, item["test_list"], item.get("test_setup_code", ""), timeout=self.timeout)

    def check_many(self, predictions, items, workers=None):
        from .sandbox import run_many

        jobs = [(p or "", it["test_list"], it.get("test_setup_code", "")) for p, it in zip(predictions, items)]
        results = run_many(jobs, workers=workers or self.workers, timeout=self.timeout)
        return [bool(p and p.strip()) and r.passed for p, r in zip(predictions, results)]


def mbpp_question(text: str, tests: Sequence[str]) -> str:
    """The MBPP problem as shown to the model: the description and the asserts the code must pass."""
    return text.strip() + "\nYour code should pass these tests:\n" + "\n".join(t.strip() for t in tests)


def bigbench_kind(question: str, answer: str) -> str:
    """ "mc" when the gold is one option letter of a lettered options block in the question, else "free"."""
    gold = str(answer).strip().lower()
    if len(gold) == 1 and gold in parse_options(question):
        return "mc"
    return "free"


class BigBenchTask(Task):
    required_fields = ("question", "answer")

    def __init__(self, free_only: bool = False):
        self.free_only = free_only
        self.name = "bigbench-free" if free_only else "bigbench"

    def _normalize(self, record, index, where):
        kind = bigbench_kind(record["question"], record["answer"])
        if self.free_only and kind != "free":
            return None
        if "id" in record:
            record["source_id"] = record["id"]
        record["id"] = index
        record["kind"] = kind
        record["answer"] = str(record["answer"]).strip()
        if kind == "mc":
            record["answer"] = record["answer"].lower()
        return record

    def check(self, prediction, item):
        if item.get("kind") == "mc":
            return check_choice(prediction, item["answer"], item["question"])
        return exact_match(prediction, item["answer"])

    def score(self, prediction, item):
        if item.get("kind") == "mc":
            return float(self.check(prediction, item))
        return f1_score(prediction, item["answer"])


_NAMES = ["Ava", "Ben", "Cleo", "Dan", "Eva", "Finn", "Gia", "Hugo", "Ivy", "Jack", "Kim", "Leo", "Mia", "Noah"]
_THINGS = ["apples", "stickers", "marbles", "books", "coins", "pencils", "cards", "shells", "cookies", "stamps"]


def _count(n: int, things: str) -> str:
    return f"{n} {things[:-1] if n == 1 else things}"


class ArithmeticTask(Task):
    """Generated multi-step integer word problems; ``difficulty`` d gives d + 1 numbers (d operations).

    d=1: one addition/subtraction of numbers 1-9 ("Ava has 3 apples. She gets 4 more."); d=2: two add/sub
    steps with numbers up to 20; d=3: three steps up to 50 with small multiplications; d>=4: d steps up to
    100 with multiplications and exact divisions. Item ``i`` depends only on (seed, difficulty, i).
    """

    name = "arithmetic"

    def __init__(self, difficulty: int = 1, seed: int = 0, size: int = 200):
        if int(difficulty) < 1:
            raise DataError(f"arithmetic difficulty must be >= 1, got {difficulty}")
        self.difficulty, self.seed, self.size = int(difficulty), int(seed), int(size)

    def load(self, path=None, limit=None):
        if limit is not None and limit < 0:
            raise DataError(f"limit must be >= 0, got {limit}")
        if path is not None:
            items = []
            if limit == 0:
                return items
            for index, (line_no, rec) in enumerate(iter_jsonl(path, ("question", "answer"))):
                rec.setdefault("id", index)
                rec["answer"] = str(rec["answer"]).strip()
                items.append(rec)
                if limit is not None and len(items) >= limit:
                    break
            return items
        n = self.size if limit is None else int(limit)
        return [self.generate(i) for i in range(n)]

    def generate(self, index: int) -> dict:
        d = self.difficulty
        rng = random.Random(f"arith|{self.seed}|{d}|{index}")
        top = {1: 9, 2: 20, 3: 50}.get(d, 100)
        ops = ["+", "-"] + (["*"] if d >= 3 else []) + (["/"] if d >= 4 else [])
        name, things = rng.choice(_NAMES), rng.choice(_THINGS)
        value = rng.randint(1, top)
        sentences = [f"{name} has {_count(value, things)}."]
        steps = [str(value)]
        for _ in range(d):
            op = rng.choice(ops)
            if op == "-" and value < 2:
                op = "+"
            if op == "/" and not [k for k in range(2, 6) if value % k == 0]:
                op = "+"
            if op == "+":
                x = rng.randint(1, top)
                sentences.append(rng.choice([f"Then {name} gets {x} more.", f"{name} finds {x} more.",
                                             f"A friend gives {name} {_count(x, things)} more."]))
                value += x
            elif op == "-":
                x = rng.randint(1, min(value - 1, top))
                sentences.append(rng.choice([f"Then {name} gives away {x}.", f"{name} loses {_count(x, things)}.",
                                             f"{name} uses {x} of the {things}."]))
                value -= x
            elif op == "*":
                x = rng.randint(2, 4 if d < 5 else 9)
                word = {2: "doubles", 3: "triples"}.get(x)
                sentences.append(f"Then {name} {word} the number of {things}." if word else
                                 f"Then the number of {things} becomes {x} times as many.")
                value *= x
            else:
                x = rng.choice([k for k in range(2, 6) if value % k == 0])
                sentences.append(f"{name} splits the {things} into {x} equal piles and keeps only one pile.")
                value //= x
            steps.append(f"{op} {x}")
        question = " ".join(sentences) + f" How many {things} does {name} have now?"
        return {"id": f"arith-d{d}-s{self.seed}-{index}", "question": question, "answer": str(value),
                "difficulty": d, "steps": steps}

    def check(self, prediction, item):
        return check_number(prediction, item["answer"])


_FACTORIES: dict[str, Callable[..., Task]] = {
    "logiqa": LogiQATask,
    "math": MathTask,
    "mbpp": MBPPTask,
    "bigbench": lambda **kw: BigBenchTask(free_only=False, **kw),
    "bigbench-free": lambda **kw: BigBenchTask(free_only=True, **kw),
    "arithmetic": ArithmeticTask,
}
TASKS: tuple[str, ...] = tuple(_FACTORIES)


def get_task(name: str | Task, **options) -> Task:
    """The task called ``name`` (options go to its constructor, e.g. ``difficulty=2`` for arithmetic)."""
    if isinstance(name, Task):
        return name
    key = str(name).strip().lower().replace("_", "-")
    if key not in _FACTORIES:
        raise DataError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    try:
        return _FACTORIES[key](**options)
    except TypeError as e:
        raise DataError(f"task {key!r}: bad option ({e})") from None
