"""DPO losses (TRL-compatible) and packed per-sequence log-prob sums. Pure PyTorch: [B]-sized math.

With policy log-probs pi_c, pi_r and reference log-probs ref_c, ref_r of the chosen / rejected answers::

    u = (pi_c - pi_r) - (ref_c - ref_r)                 (log-ratio margin)
    sigmoid: -(1 - eps) * logsigmoid(beta u) - eps * logsigmoid(-beta u)          (eps: label smoothing,
             conservative DPO)
    robust:  (-(1 - eps) * logsigmoid(beta u) + eps * logsigmoid(-beta u)) / (1 - 2 eps)
    hinge:   relu(1 - beta u)
    ipo:     (u - 1 / (2 beta))^2          (use sequence_logps(..., average=True) for IPO's length-normalised logps)
    loss = mean over pairs

Metrics (0-d detached float32 tensors, TRL names): rewards/chosen = mean beta (pi_c - ref_c), rewards/rejected =
mean beta (pi_r - ref_r), rewards/accuracies = mean [chosen reward > rejected reward], rewards/margins = mean of
their difference, logps/chosen = mean pi_c, logps/rejected = mean pi_r.

Single pass over a packed batch: ``linear_logprobs(hidden, lm_head, labels)`` gives per-token log-probs for every
chosen and rejected sequence packed together; ``sequence_logps`` sums them per sequence id; split the [num_seqs]
result into chosen / rejected halves and call ``dpo_loss``. The fused kernel's FLOPs/memory notes are in
:mod:`reflectevo.kernels.linear_logprobs`; this module adds O(N + B) work.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")


def sequence_logps(token_logps: torch.Tensor, seq_ids: torch.Tensor, num_seqs: int, average: bool = False,
                   valid: torch.Tensor | None = None, check: bool = True) -> torch.Tensor:
    """Per-sequence sums (or means over valid tokens) of per-token log-probs.

    token_logps [N] float, seq_ids [N] int in [0, num_seqs) or -1 for tokens that belong to no sequence (prompt,
    padding, ignored labels). A token counts when seq_id >= 0 and ``valid`` (optional bool [N], e.g.
    ``labels != ignore_index``) is true. average=True divides by the number of counted tokens; a sequence with no
    counted token gets 0 (never NaN). Returns [num_seqs] float32, differentiable w.r.t. token_logps.
    ``check=False`` skips the range check of seq_ids (two reads back to the host, which wait for the device) for
    callers whose ids are valid by construction.
    """
    if token_logps.dim() != 1 or seq_ids.shape != token_logps.shape:
        raise ValueError(f"token_logps/seq_ids: expected two [N] tensors, got {tuple(token_logps.shape)} and "
                         f"{tuple(seq_ids.shape)}")
    if seq_ids.dtype.is_floating_point or seq_ids.dtype == torch.bool:
        raise ValueError(f"seq_ids: expected an integer tensor, got {seq_ids.dtype}")
    if num_seqs < 0:
        raise ValueError(f"num_seqs: must be >= 0, got {num_seqs}")
    if check and seq_ids.numel() and (int(seq_ids.max()) >= num_seqs or int(seq_ids.min()) < -1):
        raise ValueError(f"seq_ids: values must lie in [-1, {num_seqs})")
    counted = seq_ids >= 0
    if valid is not None:
        if valid.shape != token_logps.shape:
            raise ValueError(f"valid: expected shape {tuple(token_logps.shape)}, got {tuple(valid.shape)}")
        counted = counted & valid.bool()
    index = torch.where(counted, seq_ids, 0).long()
    values = torch.where(counted, token_logps.float(), 0.0)
    if num_seqs == 0:  # no sequence (every id -1): index_add would reject the placeholder index 0
        return values[:0]
    sums = torch.zeros(num_seqs, dtype=torch.float32, device=token_logps.device).index_add(0, index, values)
    if not average:
        return sums
    counts = torch.zeros(num_seqs, dtype=torch.float32, device=token_logps.device).index_add(
        0, index, counted.float())
    return sums / counts.clamp(min=1.0)


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, beta: float = 0.1,
             loss_type: str = "sigmoid", label_smoothing: float = 0.0):
    """Mean DPO loss over pairs and a dict of TRL-named metrics (0-d detached tensors). See module docstring."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type: expected one of {LOSS_TYPES}, got {loss_type!r}")
    if not (beta > 0 and math.isfinite(beta)):  # beta = inf turns every loss and reward into NaN / inf
        raise ValueError(f"beta: must be a finite number > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing: must lie in [0, 0.5), got {label_smoothing}")
    tensors = (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    if any(t.shape != policy_chosen_logps.shape for t in tensors):
        raise ValueError("policy/ref chosen/rejected logps: all four must have the same shape, got "
                         + ", ".join(str(tuple(t.shape)) for t in tensors))
    if policy_chosen_logps.numel() == 0:
        raise ValueError("policy_chosen_logps: empty batch, need at least one pair")
    pc, pr, rc, rr = (t.float() for t in tensors)
    rc, rr = rc.detach(), rr.detach()
    u = (pc - pr) - (rc - rr)
    eps = label_smoothing
    if loss_type == "sigmoid":
        losses = -(1 - eps) * F.logsigmoid(beta * u) - eps * F.logsigmoid(-beta * u)
    elif loss_type == "robust":
        losses = (-(1 - eps) * F.logsigmoid(beta * u) + eps * F.logsigmoid(-beta * u)) / (1 - 2 * eps)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * u)
    else:
        losses = (u - 1 / (2 * beta)) ** 2
    chosen_rewards = beta * (pc - rc).detach()
    rejected_rewards = beta * (pr - rr).detach()
    metrics = {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "logps/chosen": pc.detach().mean(),
        "logps/rejected": pr.detach().mean(),
    }
    return losses.mean(), metrics
