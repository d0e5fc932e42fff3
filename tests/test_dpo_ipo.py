"""IPO as TRL computes it: the policy and reference log-probs of each answer are means over its tokens."""
from __future__ import annotations

import torch

from reflectevo.model.lora import adapters_disabled
from reflectevo.trainer.data import make_batch, tokenize_records
from reflectevo.trainer.dpo import DPOObjective, compute_reference
from trainer_tiny import cfg, d_pm, tiny_model_with_random_lora, tiny_tokenizer


def _mean_logps(model, exs):
    """[P, 2] per-token mean log-probs of the chosen and rejected answers, from full logits."""
    def one(prompt, resp):
        ids = torch.tensor([prompt + resp])
        logp = torch.log_softmax(model(ids)[0, :-1].float(), -1)
        picked = logp.gather(-1, ids[0, 1:, None])[:, 0]
        return picked[len(prompt) - 1:].mean()

    return torch.stack([torch.stack([one(e.prompt, e.responses[0]), one(e.prompt, e.responses[1])]) for e in exs])


def test_ipo_step_uses_per_token_mean_logps():
    c = cfg(beta=0.3, max_length=128, loss_type="ipo")
    exs, _ = tokenize_records(list(enumerate(d_pm(3), 1)), tiny_tokenizer(), c, True, "f")
    assert len({len(e.responses[0]) for e in exs} | {len(e.responses[1]) for e in exs}) > 1
    model, params = tiny_model_with_random_lora()
    ref = compute_reference(model, exs, c, 0, use_adapters=False)
    with torch.no_grad(), adapters_disabled(model):
        refs = _mean_logps(model, exs)
    torch.testing.assert_close(torch.tensor([ref[e.key] for e in exs]), refs, rtol=1e-5, atol=1e-6)

    batch = make_batch(exs, c, True, 0)
    for objective in (DPOObjective(c, ref), DPOObjective(c, None)):  # cached reference, and on the fly
        loss, stats = objective.micro_step(model, batch, batch.num_seqs // 2)
        (ours,) = torch.autograd.grad(loss, params[:1])
        pol = _mean_logps(model, exs)
        u = (pol[:, 0] - pol[:, 1]) - (refs[:, 0] - refs[:, 1])
        naive = ((u - 1 / (2 * c.beta)) ** 2).mean()
        (want,) = torch.autograd.grad(naive, params[:1])
        torch.testing.assert_close(loss, naive, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours, want, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(stats["logps/chosen"], pol[:, 0].mean().detach(), rtol=1e-5, atol=1e-6)
