"""The tiny random Llama-family model, word-level ChatML tokenizer and records the trainer tests share."""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import torch
from tokenizers import AddedToken, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from reflectevo.model import ModelConfig, Tokenizer, Transformer
import reflectevo.trainer.state as st
from reflectevo.trainer import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("the a question answer trial failed because reflection plan check step calculation logic error fix "
         "thought action finish option correct wrong first second why how what verify again carefully "
         "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi pi rho sigma tau "
         "user assistant system A B C D [ ] : . , 0 1 2 3 4 5 6 7 8 9").split()
SPECIALS = ["<|im_start|>", "<|im_end|>", "<unk>"]
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny_tokenizer() -> Tokenizer:
    vocab = {w: i for i, w in enumerate(SPECIALS + sorted(set(WORDS)))}
    backend = HFTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS[:2]])
    return Tokenizer(backend, TEMPLATE, {"eos_token": "<|im_end|>"}, eos_token_ids=[1])


def tiny_model(seed=0, vocab=96) -> Transformer:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                      num_kv_heads=2, tie_word_embeddings=True)
    model = Transformer(cfg)
    with torch.no_grad():
        model.embed_tokens.weight.normal_(0, 0.3)   # tied head: logits up to ~|h| * 2.4, far from saturation
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def words(i, n, off=0):
    pool = WORDS[20:44]
    return " ".join(pool[(i * 7 + k * 3 + off) % len(pool)] for k in range(n))


def d_plus(n=4):
    return [{"id": i, "reflect_prompt": f"why the first trial failed : {words(i, 6)}",
             "reflections": f"reflection : {words(i, 10, 1)}",
             "second_trial_reasoning": f"thought : fix {words(i, 4, 2)} action : finish [ {'ABCD'[i % 4]} ]",
             "reason_prompt": [f"question {words(i, 3)}", f"question {words(i, 3)} reflection : {words(i, 10, 1)}"]}
            for i in range(n)]


def d_pm(n=4):
    return [{"id": i, "reflection_prompt": f"question : {words(i, 8)} first trial failed",
             "reflection_chosen": f"plan : {words(i, 6, 5)} verify step", "reflection_rejected": f"{words(i, 5, 9)} wrong",
             "reason_prompt": "x"} for i in range(n)]


def cfg(**kw):
    base = dict(max_length=96, batch_size=4, lora_r=8, warmup_ratio=0.0, scheduler="constant", progress=False,
                log_every=1000)
    base.update(kw)
    return TrainConfig(**base)


def tiny_model_with_random_lora(r=4, alpha=8, std=0.2):
    """tiny_model with LoRA (r, alpha) whose A and B are random, so adapters on and off differ; (model, params)."""
    from reflectevo.model.lora import attach_lora, lora_parameters

    model = tiny_model()
    attach_lora(model, r=r, alpha=alpha)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.normal_(0, std)
    return model, lora_parameters(model)


def read_metrics(run):
    return [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]


class Killed(BaseException):
    """Stands for a SIGKILL in the middle of a run (a BaseException: nothing in the trainer catches it)."""


@contextlib.contextmanager
def killed_after_step(monkeypatch, step: int):
    """The run inside the block dies right after metrics.jsonl gets the line of ``step``; the block expects it."""
    real = st.append_line

    def append_then_die(path, obj):
        real(path, obj)
        if path.name == "metrics.jsonl" and obj["step"] == step:
            raise Killed

    monkeypatch.setattr(st, "append_line", append_then_die)
    try:
        with pytest.raises(Killed):
            yield
    finally:
        monkeypatch.setattr(st, "append_line", real)
