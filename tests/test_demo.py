"""``reflectevo demo`` pieces that run without a model."""
import argparse
import json

from reflectevo.data.curate import curate_file
from reflectevo.data.jsonl import read_jsonl
from reflectevo.demo import _split_items, add_demo_options


def _demo_split(n_train, n_eval):
    args = add_demo_options(argparse.ArgumentParser()).parse_args(["--n-train", str(n_train), "--n-eval", str(n_eval)])
    return _split_items(args)


def _fixed_by_reflection(item):
    """A raw record whose trial 1 is wrong and whose one reflection fixed it (one D+ row)."""
    return {"id": item["id"], "question": item["question"], "answer": item["answer"], "output": [
        {"generated_answer": "0", "is_correct": False, "scratchpad": "Action: Finish[0]", "trail": 1,
         "reflections": [], "reason_prompt": "p1"},
        {"generated_answer": item["answer"], "is_correct": True, "scratchpad": f"Action: Finish[{item['answer']}]",
         "trail": 2, "reflections": ["check the sum"], "reason_prompt": "p2", "reflection_prompt": "r"}]}


def test_rerun_with_fewer_train_questions_does_not_train_on_held_out_ones(tmp_path):
    # an earlier run with --n-train 6 left raw.jsonl behind; the rerun with --n-train 2 resumes it
    _, earlier_train, _ = _demo_split(6, 2)
    raw = tmp_path / "raw.jsonl"
    raw.write_text("".join(json.dumps(_fixed_by_reflection(it)) + "\n" for it in earlier_train))
    _, train, held = _demo_split(2, 2)
    assert {it["id"] for it in held} <= {it["id"] for it in earlier_train}  # what the rerun holds out was trained on

    counts = curate_file(raw, tmp_path / "curated", eval_fraction=0.0, ids=[it["id"] for it in train])  # as the demo
    d_plus_ids = [r["id"] for r in read_jsonl(tmp_path / "curated" / "d_plus.jsonl")]
    assert d_plus_ids == [it["id"] for it in train] and counts["records"] == len(train)
    assert len(read_jsonl(raw)) == len(earlier_train)  # the earlier records stay in raw.jsonl
