"""A judge model ranking Dpref pairs (two reflections whose trial 2 are both correct), run through our sampler.

``curate_file`` asks its judge one pair at a time; to keep the sampler batched the curation runs twice:
pass 1 with a judge that only records the pairs it is asked about, then ONE ``engine.generate`` call answers
every pair in both orders (A/B swapped, against position bias), then pass 2 writes the files with the stored
verdicts. A pair is ordered only when both orders agree; otherwise the judge declines (-1) and curate drops it.
"""
from __future__ import annotations

import re

from .curate import curate_file, curate_records
from .jsonl import iter_jsonl

__all__ = ["JUDGE_PROMPT", "BatchedJudge", "curate_with_judge"]

JUDGE_PROMPT = (
    "A student answered the question below wrongly, then wrote two different reflections on the mistake. "
    "Which reflection is more useful for getting the question right on the next attempt? Prefer a reflection "
    "that names the actual error and gives a concrete plan, and that does not simply reveal the answer.\n\n"
    "Question: {question}\n\nReflection A:\n{a}\n\nReflection B:\n{b}\n\n"
    "Reply with one letter: A or B.")


def _key(item, a: str, b: str) -> tuple:
    return (repr(item.get("id")), a, b)


class BatchedJudge:
    """Collects pairs (pass 1), answers them in one batched call, then serves the verdicts (pass 2)."""

    def __init__(self, engine, tokenizer, max_tokens: int = 4):
        self.engine, self.tokenizer, self.max_tokens = engine, tokenizer, max_tokens
        self.pending: dict[tuple, tuple] = {}
        self.verdicts: dict[tuple, int] = {}

    def record(self, item: dict, a: str, b: str) -> int:
        self.pending[_key(item, a, b)] = (item, a, b)
        return -1

    def prompt(self, item: dict, a: str, b: str) -> str:
        text = JUDGE_PROMPT.format(question=item.get("question", ""), a=a.strip(), b=b.strip())
        return self.tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)

    @staticmethod
    def parse(text: str) -> int | None:
        m = re.search(r"\b([AB])\b", text or "")
        return None if m is None else (0 if m.group(1) == "A" else 1)

    def answer_pending(self) -> int:
        from reflectevo.gen import SamplingParams

        keys = list(self.pending)
        if not keys:
            return 0
        prompts = []
        for k in keys:
            item, a, b = self.pending[k]
            prompts += [self.prompt(item, a, b), self.prompt(item, b, a)]
        outs = self.engine.generate(prompts, SamplingParams(temperature=0.0, max_tokens=self.max_tokens))
        for i, k in enumerate(keys):
            first, swapped = self.parse(outs[2 * i][0].text), self.parse(outs[2 * i + 1][0].text)
            # consistent: "A" first means a; "B" in the swapped order also means a
            if first is not None and swapped is not None and first != swapped:
                self.verdicts[k] = first
            else:
                self.verdicts[k] = -1
        self.pending.clear()
        return len(keys)

    def __call__(self, item: dict, a: str, b: str) -> int:
        return self.verdicts.get(_key(item, a, b), -1)


def curate_with_judge(raw_path, out_dir, judge: BatchedJudge, **kwargs) -> dict:
    """curate_file with a batched judge model for Dpref (see module docstring); returns counts (+ judged pairs)."""
    records = (rec for _, rec in iter_jsonl(raw_path, torn_tail_ok=True))
    curate_records(records, judge=judge.record, source=str(raw_path),
                   **{k: v for k, v in kwargs.items() if k in ("eval_fraction", "prompts", "pair_prompt")})
    judged = judge.answer_pending()
    counts = curate_file(raw_path, out_dir, judge=judge, **kwargs)
    counts["judged_pairs"] = judged
    counts["judge_declined"] = sum(v == -1 for v in judge.verdicts.values())
    return counts
