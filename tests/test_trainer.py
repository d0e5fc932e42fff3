"""Trainer behaviour on a tiny random Llama-family model (trainer_tiny): overfitting, DPO, resume, PEFT export."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from reflectevo.model import ModelConfig, Transformer
from reflectevo.trainer import TrainError, train_dpo, train_sft
from reflectevo.trainer.data import make_batch, tokenize_records
from trainer_tiny import (ROOT, cfg, d_plus, d_pm, read_metrics, tiny_model, tiny_model_with_random_lora,
                          tiny_tokenizer)


# ------------------------------------------------------------------------------------------------------------
# training behaviour
# ------------------------------------------------------------------------------------------------------------
def test_sft_overfits_four_examples(tmp_path):
    tok, model = tiny_tokenizer(), tiny_model()
    summary = train_sft(model, tok, d_plus(4), cfg(mode="one-stage", max_steps=40, lr=1e-2, lora_r=8),
                        tmp_path / "run")
    losses = [m["loss"] for m in read_metrics(tmp_path / "run")]
    assert len(losses) == 40 and [m["step"] for m in read_metrics(tmp_path / "run")] == list(range(1, 41))
    assert losses[-1] < 0.1 * losses[0], (losses[0], losses[-1])
    for key in ("loss", "lr", "grad_norm", "tokens_per_s"):
        assert key in read_metrics(tmp_path / "run")[0]
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == summary["steps"] == 40


def test_dpo_raises_margins_and_accuracy(tmp_path):
    tok, model = tiny_tokenizer(), tiny_model()
    train_dpo(model, tok, d_pm(4), cfg(max_steps=25, lr=1e-2, beta=0.5),
              tmp_path / "run")
    ms = read_metrics(tmp_path / "run")
    assert ms[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-5)   # fresh adapter == reference
    assert ms[-1]["rewards/margins"] > 1.0 and ms[-1]["rewards/accuracies"] == 1.0
    assert ms[-1]["loss"] < ms[0]["loss"]
    for key in ("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"):
        assert key in ms[0]
    ref = json.loads((tmp_path / "run" / "state" / "ref_logps.json").read_text())["logps"]
    assert sorted(ref) == ["0", "1", "2", "3"]


def test_reference_logps_with_adapters_off_equal_base(tmp_path):
    from reflectevo.model.lora import attach_lora
    from reflectevo.trainer.dpo import compute_reference

    tok = tiny_tokenizer()
    exs, _ = tokenize_records(list(enumerate(d_pm(3), 1)), tok, cfg(), True, "f")
    base = tiny_model()
    want = compute_reference(base, exs, cfg(), 0, use_adapters=True)
    lora = tiny_model()
    attach_lora(lora, r=4, alpha=8)
    with torch.no_grad():
        for n, p in lora.named_parameters():
            if "lora_B" in n:
                p.normal_()
    got = compute_reference(lora, exs, cfg(), 0, use_adapters=False)
    on = compute_reference(lora, exs, cfg(), 0, use_adapters=True)
    assert got == want
    assert on != want


def test_dpo_step_matches_naive_full_logits():
    from reflectevo.model.lora import adapters_disabled
    from reflectevo.trainer.dpo import DPOObjective, compute_reference

    tok = tiny_tokenizer()
    c = cfg(beta=0.3, max_length=128)
    exs, _ = tokenize_records(list(enumerate(d_pm(3), 1)), tok, c, True, "f")
    model, params = tiny_model_with_random_lora()
    ref = compute_reference(model, exs, c, 0, use_adapters=False)
    batch = make_batch(exs, c, True, 0)
    loss, stats = DPOObjective(c, ref).micro_step(model, batch, batch.num_seqs // 2)
    loss.backward()
    ours = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None

    def seq_logp(prompt, resp):
        ids = torch.tensor([prompt + resp])
        logp = torch.log_softmax(model(ids)[0, :-1].float(), -1)
        tgt = ids[0, 1:]
        picked = logp.gather(-1, tgt[:, None])[:, 0]
        return picked[len(prompt) - 1:].sum()

    pol = torch.stack([torch.stack([seq_logp(e.prompt, e.responses[0]), seq_logp(e.prompt, e.responses[1])])
                       for e in exs])
    with torch.no_grad(), adapters_disabled(model):
        refs = torch.stack([torch.stack([seq_logp(e.prompt, e.responses[0]), seq_logp(e.prompt, e.responses[1])])
                            for e in exs])
    u = (pol[:, 0] - pol[:, 1]) - (refs[:, 0] - refs[:, 1])
    naive = -torch.nn.functional.logsigmoid(c.beta * u).mean()
    naive.backward()
    torch.testing.assert_close(loss, naive, rtol=1e-5, atol=1e-6)
    for g, p in zip(ours, params):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-6)
    assert stats["rewards/margins"] == pytest.approx(float(c.beta * u.detach().mean()), rel=1e-4, abs=1e-6)


# ------------------------------------------------------------------------------------------------------------
# run directory: SIGKILL + resume, PEFT export
# ------------------------------------------------------------------------------------------------------------
def save_tiny_model_dir(path: Path) -> Path:
    from reflectevo.model.safetensors_io import write_safetensors

    path.mkdir(parents=True, exist_ok=True)
    model = tiny_model()
    hf = model.config.to_hf()
    (path / "config.json").write_text(json.dumps(hf))
    state = {("lm_head.weight" if k == "lm_head.weight" else f"model.{k}"): v.contiguous()
             for k, v in model.state_dict().items() if k != "lm_head.weight"}   # tied to the embeddings
    write_safetensors(state, path / "model.safetensors", metadata={"format": "pt"})
    tiny_tokenizer().save(path)
    return path


def _cli(args, env):
    return [sys.executable, "-m", "reflectevo.trainer", *args]


def test_sigkill_and_resume_equals_uninterrupted(tmp_path):
    model_dir = save_tiny_model_dir(tmp_path / "tiny")
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in d_plus(6)))
    env = {**os.environ, "REFLECTEVO_KERNELS": "torch", "OMP_NUM_THREADS": "1"}
    common = ["sft", "--data", str(data), "--model", str(model_dir), "--device", "cpu", "--max-steps", "14",
              "--batch-size", "2", "--grad-accum", "2", "--lora-r", "4", "--lora-dropout", "0.1", "--save-every", "3",
              "--lr", "1e-2", "--max-length", "96", "--eval-every", "5", "--eval-fraction", "0.2", "--no-progress"]
    full = tmp_path / "full"
    subprocess.run(_cli([*common, "--out", str(full)], env), env=env, check=True, capture_output=True, cwd=ROOT)

    run = tmp_path / "killed"
    env_slow = {**env, "REFLECTEVO_TRAIN_STEP_DELAY": "0.15"}
    for extra, kill_after in (([], 4), (["--resume"], 9)):   # killed twice, at different points
        proc = subprocess.Popen(_cli([*common, "--out", str(run), *extra], env_slow), env=env_slow, cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while time.time() < deadline:
            m = run / "metrics.jsonl"
            if m.exists() and m.read_text().count("\n") >= kill_after:
                break
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        killed_at = (run / "metrics.jsonl").read_text().count("\n")
        assert kill_after <= killed_at < 14
    res = subprocess.run(_cli([*common, "--out", str(run), "--resume"], env), env=env, capture_output=True,
                         text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    a, b = read_metrics(full), read_metrics(run)
    assert [m["step"] for m in b] == list(range(1, 15))
    assert [m["loss"] for m in a] == [m["loss"] for m in b]          # bitwise (JSON floats round-trip exactly)
    assert [m["grad_norm"] for m in a] == [m["grad_norm"] for m in b]
    ea = (full / "eval.jsonl").read_text().splitlines()
    eb = (run / "eval.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in eb] == [5, 10, 14] and ea == eb
    wa = __import__("safetensors.torch", fromlist=["load_file"]).load_file(str(full / "adapter/adapter_model.safetensors"))
    wb = __import__("safetensors.torch", fromlist=["load_file"]).load_file(str(run / "adapter/adapter_model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # a second run into the same directory without --resume is refused with one line
    again = subprocess.run(_cli([*common, "--out", str(run)], env), env=env, capture_output=True, text=True, cwd=ROOT)
    assert again.returncode != 0 and "already holds a run" in again.stderr


def test_adapter_loads_in_peft(tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    hf_cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    hf.save_pretrained(tmp_path / "hf")
    tiny_tokenizer().save(tmp_path / "hf")
    from reflectevo.model import load_model

    model, tok = load_model(tmp_path / "hf")
    train_sft(model, tok, d_plus(4), cfg(max_steps=5, lr=2e-2, lora_r=4), tmp_path / "run")
    peft_model = peft.PeftModel.from_pretrained(hf, str(tmp_path / "run" / "adapter")).eval()
    ids = torch.tensor([tok.encode("the question failed because alpha beta", add_special_tokens=False)])
    with torch.no_grad():
        ours = model(ids)
        theirs = peft_model(input_ids=ids).logits.float()
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    with torch.no_grad(), peft_model.disable_adapter():
        plain = peft_model(input_ids=ids).logits.float()
    assert (plain - theirs).abs().max() > 1e-3                          # the adapter really changes the output


def test_adapter_for_another_model_is_refused(tmp_path):
    from reflectevo.model.lora import attach_lora
    from reflectevo.model.peft_io import save_adapter
    from reflectevo.trainer.cli_args import load_adapter_checked

    tok = tiny_tokenizer()
    src = tiny_model()
    attach_lora(src, r=4, alpha=8)
    save_adapter(src, tmp_path / "adapter")
    torch.manual_seed(1)
    other = Transformer(ModelConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                                    num_kv_heads=2, tie_word_embeddings=True))
    with pytest.raises(TrainError, match=r"--adapter .*adapter"):
        load_adapter_checked(other, tmp_path / "adapter")
    with pytest.raises(TrainError, match="no adapter_config.json"):
        load_adapter_checked(other, tmp_path)
    # resuming a run directory with another model
    train_sft(tiny_model(), tok, d_plus(2), cfg(max_steps=2), tmp_path / "run")
    with pytest.raises(TrainError, match="made for another model"):
        train_sft(other, tok, d_plus(2), cfg(max_steps=4, resume=True), tmp_path / "run")
