"""DPO on reflections (settings III and IV): chosen and rejected reflections packed in one forward.

    token log-probs = linear_logprobs(hidden at labelled positions, lm_head.weight, labels)   (no [N, V] logits)
    per-sequence sums = sequence_logps(token log-probs, sequence index, 2P)  -> chosen [P], rejected [P]
                        (IPO: per-token means, average=True, for the policy and the reference, as TRL)
    loss, TRL metrics = dpo_loss(chosen, rejected, ref chosen, ref rejected, beta, loss_type, label_smoothing)

Reference log-probs come from the same model (no second copy of the weights): with the adapters switched off
(``adapters_disabled``) for a fresh adapter, or - when training continues from an --adapter - from that initial
policy itself, scored before the first step. They are computed once per example before training and cached in
RUN/state/ref_logps.json keyed by example id (with a digest of the data, model and settings), or recomputed per
batch with ``ref_on_the_fly`` (adapters off only). A step's loss is the mean over its pairs.
"""
from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path

import torch

from reflectevo.trainer.config import TrainConfig, TrainError
from reflectevo.trainer.data import IGNORE, Batch, Example, data_digest, make_batch
from reflectevo.trainer.sft import labelled_hidden, prepare_examples


def policy_logps(model, batch: Batch, average: bool = False) -> torch.Tensor:
    """[2P] summed (``average``: per-token mean) response log-probs of the packed batch (chosen first, then
    rejected)."""
    from reflectevo.kernels.dpo_loss import sequence_logps
    from reflectevo.kernels.linear_logprobs import linear_logprobs

    h, labels, sidx = labelled_hidden(model, batch)
    logp = linear_logprobs(h, model.lm_head.weight, labels, ignore_index=IGNORE)
    return sequence_logps(logp, sidx, batch.num_seqs, average=average, check=False)  # sidx: from make_batch


def mean_logps(cfg: TrainConfig) -> bool:
    """IPO compares per-token mean log-probs of the answers (as TRL does), the other losses their sums."""
    return cfg.loss_type == "ipo"


def _reference_context(model, use_adapters: bool):
    if use_adapters:
        return contextlib.nullcontext()
    from reflectevo.model.lora import adapters_disabled

    return adapters_disabled(model)


class DPOObjective:
    def __init__(self, cfg: TrainConfig, ref: dict | None, ref_with_adapters: bool = False):
        self.cfg, self.ref, self.ref_with_adapters = cfg, ref, ref_with_adapters

    def step_normaliser(self, batches: list[Batch]) -> int:
        return sum(b.num_seqs // 2 for b in batches)

    def reference(self, model, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        p = batch.num_seqs // 2
        if self.ref is None:
            with torch.no_grad(), _reference_context(model, self.ref_with_adapters):
                seq = policy_logps(model, batch, mean_logps(self.cfg)).detach()
            return seq[:p], seq[p:]
        device = batch.input_ids.device
        vals = torch.tensor([self.ref[k] for k in batch.keys], dtype=torch.float32, device=device)
        return vals[:, 0], vals[:, 1]

    def micro_step(self, model, batch: Batch, norm: int):
        from reflectevo.kernels.dpo_loss import dpo_loss

        p = batch.num_seqs // 2
        ref_c, ref_r = self.reference(model, batch)
        seq = policy_logps(model, batch, mean_logps(self.cfg))
        loss, metrics = dpo_loss(seq[:p], seq[p:], ref_c, ref_r, beta=self.cfg.beta, loss_type=self.cfg.loss_type,
                                 label_smoothing=self.cfg.label_smoothing)
        w = p / norm
        stats = {"loss": loss.detach() * w}
        stats.update({k: v.detach() * w for k, v in metrics.items()})
        return loss * w, stats


@torch.no_grad()
def compute_reference(model, examples: list[Example], cfg: TrainConfig, pad_id, use_adapters: bool) -> dict:
    """{example key: [chosen logp, rejected logp]} scored by the reference model in eval mode."""
    from reflectevo.trainer.loop import _autocast

    was_training = model.training
    model.eval()
    out = {}
    device = model.device
    with _reference_context(model, use_adapters):
        for k in range(0, len(examples), cfg.batch_size):
            chunk = examples[k:k + cfg.batch_size]
            batch = make_batch(chunk, cfg, True, pad_id).to(device)
            with _autocast(device, cfg):
                seq = policy_logps(model, batch, mean_logps(cfg)).float().cpu()
            p = len(chunk)
            for i, ex in enumerate(chunk):
                out[ex.key] = [float(seq[i]), float(seq[p + i])]
    model.train(was_training)
    return out


def adapter_digest(model) -> str:
    """Identifies the adapter the model carries by its weights and scaling (not by the path it came from)."""
    from reflectevo.model.lora import lora_modules

    h = hashlib.sha256()
    for name, m in sorted(lora_modules(model).items()):
        h.update(f"{name} {m.scaling!r}".encode())
        for t in (m.lora_A.weight, m.lora_B.weight):
            h.update(t.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def train_dpo(model, tokenizer, records, cfg: TrainConfig, out_dir, init_adapter: str | None = None) -> dict:
    """DPO on D± / Dpref records; writes out_dir/{metrics.jsonl, adapter/, state/, summary.json}.

    init_adapter: the model already carries that adapter (loaded by the caller); it is trained further and the
    reference is that initial policy. Otherwise a fresh LoRA is attached and the reference is the base model.
    """
    from reflectevo.trainer.loop import check_out_dir, model_identity, prepare_model, run_training
    from reflectevo.trainer import state as st

    cfg.validate(dpo=True)
    check_out_dir(out_dir, cfg)
    train, evals = prepare_examples(tokenizer, records, cfg, dpo=True)
    use_adapters = init_adapter is not None
    if cfg.ref_on_the_fly and use_adapters:
        raise TrainError("--ref-on-the-fly: not available with --adapter (the reference is the initial adapter, "
                         "scored once before training); drop one of the two")
    st.seed_everything(cfg.seed)
    params = prepare_model(model, cfg, model.device)
    ref = None
    if not cfg.ref_on_the_fly:
        out = Path(out_dir)
        identity = model_identity(model, cfg, model.device)
        digest = "|".join([data_digest(train + evals), *(f"{k}={v}" for k, v in identity.items()),
                           str(cfg.max_length), str(cfg.prompt_budget()), "init-adapter" if use_adapters else "base",
                           adapter_digest(model) if use_adapters else ""]
                          + (["token-mean"] if mean_logps(cfg) else []))
        cache = out / "state" / "ref_logps.json"
        ref = st.load_ref_cache(cache, digest)
        missing = [ex for ex in train + evals if ex.key not in ref]
        if missing:
            if use_adapters and cfg.resume and (out / "state" / st.CHECKPOINT).exists():
                raise TrainError(f"{cache}: no reference log-probs for this --adapter, data and --max-length "
                                 f"(the run started from another adapter or settings, or the cache was removed); "
                                 f"resume with those or start a new --out")
            rng = st.rng_state()
            ref.update(compute_reference(model, missing, cfg, tokenizer.pad_token_id, use_adapters))
            st.set_rng_state(rng)
            st.save_ref_cache(cache, digest, ref)
    objective = DPOObjective(cfg, ref, use_adapters)
    return run_training(model, tokenizer, cfg, out_dir, objective, train, evals, dpo=True, params=params,
                        extra_fingerprint={"reference": "init-adapter" if use_adapters else "base"})
