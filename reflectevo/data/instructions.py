"""The instruction pool: 32 reflection "demands" keyed ``a-b-c`` (our own wording, the paper's structure).

* ``a`` how to review the failed attempt: 1 = verify it step by step, 2 = skim it quickly for the error;
* ``b`` which error class to look for: 1 calculation, 2 algorithm / order of steps, 3 logical coherence,
  4 internal consistency, 5 context / requirements, 6 relevance / completeness, 7 format, 8 facts;
* ``c`` which plan to end with: 1 = a high-level plan, 2 = a low-level (step-by-step) plan.

``parse_demand("1-1-1")`` -> :class:`Demand`; ``sample_demand(rng)`` draws one uniformly; ``DEMANDS`` maps every
key to its text; ``DEFAULT_DEMAND = "1-1-1"``.
"""
from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass

from .jsonl import DataError

__all__ = ["Demand", "DEMANDS", "DEFAULT_DEMAND", "REVIEW_STYLES", "ERROR_CLASSES", "PLAN_STYLES",
           "parse_demand", "sample_demand", "demand_text", "all_demands", "question_seed"]

DEFAULT_DEMAND = "1-1-1"

REVIEW_STYLES = {
    1: "Re-check the failed attempt one step at a time, confirming each step before moving to the next.",
    2: "Read quickly through the failed attempt and go straight to the step that most likely broke it.",
}

ERROR_CLASSES = {
    1: ("calculation", "Focus on calculation slips: wrong arithmetic, values copied wrongly between steps, "
                       "sign, rounding or unit mistakes."),
    2: ("algorithm/order", "Focus on the method and the order of the steps: an approach that cannot reach the "
                           "answer, a missing step, or steps taken in the wrong sequence."),
    3: ("logical coherence", "Focus on the reasoning chain: conclusions that do not follow from what came "
                             "before, invalid inferences, or confusing a condition with its converse."),
    4: ("internal consistency", "Focus on contradictions: places where the attempt states one thing and later "
                                "relies on something incompatible with it."),
    5: ("context/requirements", "Focus on what the question actually asks: conditions, constraints, units or "
                                "details of the text that the attempt ignored or misread."),
    6: ("relevance/completeness", "Focus on gaps and detours: options, cases or parts of the question left "
                                  "unchecked, and effort spent on points that do not matter."),
    7: ("format", "Focus on the form of the answer: the wrong kind of answer, an answer outside the allowed "
                  "options, or an action that does not follow the required syntax."),
    8: ("facts", "Focus on knowledge: definitions, formulas, rules or world facts that the attempt got wrong "
                 "or assumed without support."),
}

PLAN_STYLES = {
    1: "Close with a high-level plan: the general strategy that avoids this kind of mistake on this question "
       "and on similar ones.",
    2: "Close with a low-level plan: the concrete steps, in order, that redo the faulty part of this attempt "
       "correctly.",
}


@dataclass(frozen=True)
class Demand:
    review: int
    error_class: int
    plan: int

    @property
    def key(self) -> str:
        return f"{self.review}-{self.error_class}-{self.plan}"

    @property
    def text(self) -> str:
        return demand_text(self.review, self.error_class, self.plan)

    def __str__(self) -> str:
        return self.key


def demand_text(review: int, error_class: int, plan: int) -> str:
    """The instruction sentence block for one demand."""
    return " ".join((REVIEW_STYLES[review], ERROR_CLASSES[error_class][1], PLAN_STYLES[plan]))


def all_demands() -> list[Demand]:
    return [Demand(a, b, c) for a in REVIEW_STYLES for b in ERROR_CLASSES for c in PLAN_STYLES]


DEMANDS: dict[str, str] = {d.key: d.text for d in all_demands()}


def parse_demand(key: str | Demand | None) -> Demand:
    """``"a-b-c"`` -> :class:`Demand` (None -> the default 1-1-1); a one-line error on a bad key."""
    if isinstance(key, Demand):
        return key
    if key is None:
        key = DEFAULT_DEMAND
    m = re.fullmatch(r"\s*([12])\s*-\s*([1-8])\s*-\s*([12])\s*", str(key))
    if not m:
        raise DataError(f"--demand must be a-b-c with a in 1-2, b in 1-8, c in 1-2 (e.g. 1-1-1), got {key!r}")
    return Demand(int(m.group(1)), int(m.group(2)), int(m.group(3)))


def sample_demand(rng: random.Random | None = None) -> Demand:
    """One demand drawn uniformly from the 32 (``rng`` defaults to the ``random`` module)."""
    rng = rng or random
    return Demand(rng.choice(list(REVIEW_STYLES)), rng.choice(list(ERROR_CLASSES)), rng.choice(list(PLAN_STYLES)))


def question_seed(seed: int, item_id) -> int:
    """A 63-bit seed that depends only on (seed, question id): a question's reflection sampling and random demand."""
    digest = hashlib.sha256(f"reflectevo|{seed}|{item_id!r}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") & ((1 << 63) - 1)
