"""``reflectevo demo`` evaluates the base model retrying without a reflection right before it evaluates prompted
reflection, on the same held-out questions and the same trial-1 answers (a tiny random model stands in for
SmolLM2, so this runs in seconds)."""
from __future__ import annotations

import argparse

import reflectevo.data.eval_run  # noqa: F401  (imported before the patches below, with the real loop)
from reflectevo.data.jsonl import read_jsonl
from reflectevo.demo import add_demo_options, run_demo

RETRY, PROMPTED = "base (retry without reflection)", "base (prompted reflection)"


def test_the_demo_evaluates_the_retry_row_first_on_the_same_trial_1(tmp_path, monkeypatch, capsys):
    import reflectevo.model
    from trainer_tiny import tiny_model, tiny_tokenizer

    monkeypatch.setattr(reflectevo.model, "load_model", lambda *a, **k: (tiny_model(), tiny_tokenizer()))
    out = tmp_path / "demo"
    args = add_demo_options(argparse.ArgumentParser()).parse_args(
        ["--out", str(out), "--n-train", "2", "--n-eval", "3", "--max-tokens", "6", "--reflection-max-tokens", "6",
         "--kv-cache-gib", "0.05", "--device", "cpu"])
    summary = run_demo(args)
    rows = list(summary["results"])
    assert rows[:2] == [RETRY, PROMPTED]
    retry, prompted = summary["results"][RETRY], summary["results"][PROMPTED]
    assert retry["settings"]["reflector_mode"] == "none" and prompted["settings"]["reflector_mode"] == "two-stage"
    assert retry["n"] == prompted["n"] == 3 and retry["acc_t1"] == prompted["acc_t1"]
    # the retry row computes trial 1 into the cache, the prompted row reads every answer from it
    assert (retry["trial1_from_cache"], prompted["trial1_from_cache"]) == (0, 3)
    a, b = read_jsonl(out / "eval_retry.raw.jsonl"), read_jsonl(out / "eval_base.raw.jsonl")
    assert [r["id"] for r in a] == [r["id"] for r in b] == [r["id"] for r in read_jsonl(out / "trial1_cache.jsonl")]
    assert [r["output"][0] for r in a] == [r["output"][0] for r in b]
    for rec in a:
        for t2 in rec["output"][1:]:
            assert t2["reflections"] == [] and t2["reflection_source"] == "none"
    table = capsys.readouterr().out
    assert table.index(RETRY) < table.index(PROMPTED)
