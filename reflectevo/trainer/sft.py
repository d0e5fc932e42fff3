"""Supervised fine-tuning (settings I and II): token-mean cross-entropy on the response + end-of-turn tokens.

Loss of an optimizer step = sum of CE over every labelled token of its micro-batches / their number, computed
with ``linear_cross_entropy`` on the hidden states of the labelled positions only (the prompt's hidden states
never meet the lm_head; the [N, V] logits are never built).
"""
from __future__ import annotations

import torch

from reflectevo.trainer.config import TrainConfig, TrainError
from reflectevo.trainer.data import IGNORE, Batch, Example, tokenize_records


def labelled_hidden(model, batch: Batch):
    """(hidden [M, H], labels [M], seq_index [M]) at the positions that carry a label."""
    seq_ids = batch.seq_ids if batch.meta.get("packed", True) else None
    h = model.hidden_states(batch.input_ids, positions=batch.positions, seq_ids=seq_ids)
    # the count is known on the host (batch.num_labels): no device-to-host sync, as each boolean-mask index would be
    idx = torch.nonzero_static((batch.labels != IGNORE).reshape(-1), size=batch.num_labels).squeeze(1)
    return (h.reshape(-1, h.shape[-1]).index_select(0, idx), batch.labels.reshape(-1).index_select(0, idx),
            batch.seq_index.reshape(-1).index_select(0, idx))


class SFTObjective:
    def step_normaliser(self, batches: list[Batch]) -> int:
        return max(1, sum(b.num_labels for b in batches))

    def micro_step(self, model, batch: Batch, norm: int):
        from reflectevo.kernels.linear_cross_entropy import linear_cross_entropy

        h, labels, _ = labelled_hidden(model, batch)
        loss = linear_cross_entropy(h, model.lm_head.weight, labels, ignore_index=IGNORE, reduction="sum") / norm
        return loss, {"loss": loss.detach()}


def split_eval(records: list, cfg: TrainConfig) -> tuple[list, list]:
    """(train, eval) records: cfg.eval_data when given, else a seeded cfg.eval_fraction of the records."""
    if cfg.eval_data is not None:
        return records, list(cfg.eval_data)
    if cfg.eval_fraction <= 0:
        return records, []
    g = torch.Generator().manual_seed(cfg.seed)
    perm = torch.randperm(len(records), generator=g).tolist()
    n_eval = max(1, int(round(cfg.eval_fraction * len(records))))
    if n_eval >= len(records):
        raise TrainError(f"--eval-fraction {cfg.eval_fraction}: leaves no training records out of {len(records)}")
    held = set(perm[:n_eval])
    return [r for i, r in enumerate(records) if i not in held], [records[i] for i in sorted(held)]


def with_lines(records: list) -> list[tuple[int, dict]]:
    """Accept [record] or [(line, record)] (records read from a file keep their line numbers)."""
    if records and isinstance(records[0], tuple):
        return list(records)
    return [(i + 1, r) for i, r in enumerate(records)]


def prepare_examples(tokenizer, records, cfg: TrainConfig, dpo: bool) -> tuple[list[Example], list[Example]]:
    pairs = with_lines(records)
    if not pairs:
        raise TrainError(f"{cfg.data_path}: no training records")
    train_recs, eval_recs = split_eval(pairs, cfg)
    eval_recs = with_lines(eval_recs)
    train, skipped = tokenize_records(train_recs, tokenizer, cfg, dpo, cfg.data_path)
    if not train:
        raise TrainError(f"{cfg.data_path}: dataset empty after filtering ({skipped} of {len(train_recs)} records "
                         f"too long for --max-length {cfg.max_length})")
    eval_where = cfg.extra.get("eval_path", cfg.data_path) if cfg.eval_data is not None else cfg.data_path
    evals, eval_skipped = tokenize_records(eval_recs, tokenizer, cfg, dpo, eval_where)
    if not evals and (cfg.eval_data is not None or cfg.eval_fraction > 0):   # asked for, but nothing to evaluate
        raise TrainError(f"{eval_where}: no held-out records to evaluate" +
                         (f" ({eval_skipped} of {len(eval_recs)} too long for --max-length {cfg.max_length})"
                          if eval_skipped else ""))
    for ex in evals:  # held-out keys never collide with training keys (the DPO reference cache is keyed by them)
        ex.key = "eval:" + ex.key
    return train, evals


def train_sft(model, tokenizer, records, cfg: TrainConfig, out_dir) -> dict:
    """Train LoRA adapters on D+ records for cfg.mode; writes out_dir/{metrics.jsonl, adapter/, state/, ...}.

    ``records``: list of dicts (or (line, dict) pairs). The model is used in place (LoRA attached if absent).
    Returns the run summary (also in out_dir/summary.json).
    """
    from reflectevo.trainer.loop import check_out_dir, prepare_model, run_training
    from reflectevo.trainer.state import seed_everything

    cfg.validate(dpo=False)
    check_out_dir(out_dir, cfg)
    train, evals = prepare_examples(tokenizer, records, cfg, dpo=False)
    seed_everything(cfg.seed)
    params = prepare_model(model, cfg, model.device)
    return run_training(model, tokenizer, cfg, out_dir, SFTObjective(), train, evals, dpo=False, params=params)

