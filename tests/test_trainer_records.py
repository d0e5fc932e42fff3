"""Trainer data edge cases: keys of repeated ids, leaked trial-2 answers, list-valued reflections."""
from __future__ import annotations

import torch

from reflectevo.trainer.data import example_keys, tokenize_records
from reflectevo.trainer.dpo import compute_reference
from trainer_tiny import cfg, d_plus, d_pm, tiny_model, tiny_tokenizer


def test_keys_stay_unique_when_an_id_looks_like_a_repeat():
    ids = ["3", 3, "3#1", "3", "_", None, "", "3#2"]
    keys = example_keys([(i, {"id": v}) for i, v in enumerate(ids)])
    assert len(set(keys)) == len(keys)
    assert keys[:3] == ["3", "3#1", "3#1#1"] and keys[3] == "3#2"


def test_reference_cache_keeps_one_entry_per_pair_with_look_alike_ids():
    tok = tiny_tokenizer()
    recs = d_pm(3)
    recs[0]["id"], recs[1]["id"], recs[2]["id"] = "7", "7", "7#1"   # two pairs of question 7, then id "7#1"
    exs, _ = tokenize_records(list(enumerate(recs, 1)), tok, cfg(max_length=128), True, "f")
    ref = compute_reference(tiny_model(), exs, cfg(max_length=128), tok.pad_token_id, use_adapters=False)
    assert len(ref) == 3
    alone = compute_reference(tiny_model(), exs[1:2], cfg(max_length=128), tok.pad_token_id, use_adapters=False)
    assert torch.allclose(torch.tensor(ref[exs[1].key]), torch.tensor(alone[exs[1].key]), atol=1e-5)


def test_list_of_reflections_trains_on_the_one_trial_2_was_answered_with():
    from reflectevo.data.curate import _reflection

    tok = tiny_tokenizer()
    rec = d_plus(1)[0]
    old, new = "reflection : alpha beta gamma", "reflection : delta epsilon zeta"
    rec["reflections"] = [old, new, " "]       # accumulated reflections, the latest last (and an empty tail)
    assert _reflection({"reflections": [old, new]}) == new    # curation's reading of the same field
    for mode, start in (("reflect", new), ("one-stage", new + "\n\n")):
        ex = tokenize_records([(1, rec)], tok, cfg(mode=mode), False, "f")[0][0]
        assert tok.decode(ex.responses[0], skip_special_tokens=True).startswith(tok.decode(
            tok.encode(start, add_special_tokens=False)))
        assert "alpha" not in tok.decode(ex.responses[0])
