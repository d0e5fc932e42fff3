"""Trainer tests on a tiny random Llama-family model with a tiny word-level ChatML tokenizer (CPU, fast)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tokenizers import AddedToken, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from reflectevo.model import ModelConfig, Tokenizer, Transformer
from reflectevo.trainer import TrainConfig, TrainError, train_dpo, train_sft
from reflectevo.trainer.data import (IGNORE, encode_prompt, encode_response, make_batch, opened_assistant_turn,
                                    sequences_of, sft_texts, tokenize_records)

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


# ------------------------------------------------------------------------------------------------------------
# data: prompts, masking, truncation, packing
# ------------------------------------------------------------------------------------------------------------
def test_masking_only_response_and_eot_carry_labels():
    tok = tiny_tokenizer()
    rec = d_plus(1)[0]
    exs, _ = tokenize_records([(1, rec)], tok, cfg(mode="reflect"), False, "f.jsonl")
    ex = exs[0]
    assert ex.prompt == encode_prompt(tok, rec["reflect_prompt"])
    assert ex.prompt[0] == tok.token_to_id("<|im_start|>") and ex.prompt[-1] == tok.token_to_id("assistant")
    assert ex.responses[0] == tok.encode(rec["reflections"], add_special_tokens=False) + [tok.eot_token_id]
    (inp, labels), = sequences_of(exs, dpo=False)
    full = ex.prompt + ex.responses[0]
    assert inp == full[:-1]
    labelled = [t for t in labels if t != IGNORE]
    assert labelled == ex.responses[0]                     # response tokens + eot, nothing of the prompt
    assert labels[:len(ex.prompt) - 1] == [IGNORE] * (len(ex.prompt) - 1)


def test_modes_pick_official_fields_and_strip_leaked_trial2():
    tok = tiny_tokenizer()
    rec = d_plus(1)[0]
    rec["reason_prompt"][1] += " " + rec["second_trial_reasoning"]  # the official code's leak
    one, _ = tokenize_records([(1, rec)], tok, cfg(mode="one-stage"), False, "f")
    target = tok.decode(one[0].responses[0])
    assert target.startswith("reflection") and "finish" in target
    cor, _ = tokenize_records([(1, rec)], tok, cfg(mode="correct"), False, "f")
    assert "finish" not in tok.decode(cor[0].prompt)
    assert tok.decode(cor[0].responses[0]).startswith("thought")


def chat(tok, text):
    return tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)


def test_already_formatted_prompt_is_used_as_is():
    tok = tiny_tokenizer()
    plain = d_plus(2)
    stored = [dict(r, reflect_prompt=chat(tok, r["reflect_prompt"])) for r in plain]   # as the loop saves them
    start = tok.token_to_id("<|im_start|>")
    for mode in ("one-stage", "reflect"):
        a, _ = tokenize_records(list(enumerate(plain, 1)), tok, cfg(mode=mode), False, "f")
        b, _ = tokenize_records(list(enumerate(stored, 1)), tok, cfg(mode=mode), False, "f")
        assert [e.prompt for e in a] == [e.prompt for e in b] and [e.responses for e in a] == [e.responses for e in b]
        assert b[0].prompt == tok.encode(stored[0]["reflect_prompt"], add_special_tokens=False)
        assert b[0].prompt.count(start) == 2                       # user + assistant header: one template only
    pairs = [dict(r, reflection_prompt=chat(tok, r["reflection_prompt"])) for r in d_pm(2)]
    a, _ = tokenize_records(list(enumerate(d_pm(2), 1)), tok, cfg(), True, "f")
    b, _ = tokenize_records(list(enumerate(pairs, 1)), tok, cfg(), True, "f")
    assert [(e.prompt, e.responses) for e in a] == [(e.prompt, e.responses) for e in b]


def test_formatted_trial_prompt_with_opened_turn_masks_only_the_continuation():
    tok = tiny_tokenizer()
    rec = d_plus(1)[0]
    rec["reason_prompt"][1] = chat(tok, rec["reason_prompt"][1]) + "thought :"   # loop: render + response prefix
    ex = tokenize_records([(1, rec)], tok, cfg(mode="correct"), False, "f")[0][0]
    assert ex.prompt == tok.encode(rec["reason_prompt"][1], add_special_tokens=False)
    continuation = rec["second_trial_reasoning"][len("thought :"):]         # "thought :" is the prompt's
    assert ex.responses[0] == encode_response(tok, continuation)
    (inp, labels), = sequences_of([ex], dpo=False)
    assert inp == (ex.prompt + ex.responses[0])[:-1]
    assert [t for t in labels if t != IGNORE] == ex.responses[0]
    assert labels[:len(ex.prompt) - 1] == [IGNORE] * (len(ex.prompt) - 1)


def test_formatted_prompt_detection():
    turn = "<|im_end|>\n<|im_start|>assistant\n"
    frame = ("<|im_start|>system\ntoday 26 jul<|im_end|>\n<|im_start|>user\n", turn)
    other_day = "<|im_start|>system\ntoday 27 jul<|im_end|>\n<|im_start|>user\nq" + turn   # its header differs
    assert opened_assistant_turn(frame, other_day) == ""
    assert opened_assistant_turn(frame, other_day + "Thought:") == "Thought:"
    assert opened_assistant_turn(frame, "question : what <|im_end|> now") is None
    assert opened_assistant_turn(frame, "plain question") is None
    assert opened_assistant_turn(("", ""), other_day) is None    # a template that hides the message: plain


@pytest.mark.parametrize("official", [False, True])
def test_trial_targets_drop_the_oracle_observation(official):
    from reflectevo.data.prompts import observation

    tok = tiny_tokenizer()
    rec = d_plus(1)[0]
    trial = "thought : fix alpha\naction : finish [ B ]"
    rec["second_trial_reasoning"] = trial + ("\n\nObservation: Answer is CORRECT" if official else
                                             "\n" + observation(True))   # the loop's transcript ending
    one = sft_texts(rec, "one-stage", "f")[1]
    assert one == rec["reflections"] + "\n\n" + trial and "Observation" not in one
    assert sft_texts(rec, "correct", "f")[1] == trial
    ex = tokenize_records([(1, rec)], tok, cfg(mode="one-stage"), False, "f")[0][0]
    assert ex.responses[0] == encode_response(tok, one)
    (_, labels), = sequences_of([ex], dpo=False)
    assert [t for t in labels if t != IGNORE] == ex.responses[0]   # response + eot only


def test_loop_conversation_records_train_with_one_template(tmp_path):
    """Raw records of the loop (one multi-turn conversation per question) -> curation -> the trainer uses the
    stored conversations as they are (one template rendering) and puts labels on the response only."""
    from reflectevo.data import get_task
    from reflectevo.data.curate import curate_records
    from reflectevo.data.jsonl import read_jsonl
    from reflectevo.data.loop import LoopConfig, ReflectLoop
    from reflectevo.data.prompts import Prompts

    tok = tiny_tokenizer()
    P = Prompts({"trial": "question : {question}", "reflection_request": "why the first trial failed",
                 "reflection_request_test": "why failed", "retry_request": "fix again"})

    def out(text):
        return SimpleNamespace(text=text, token_ids=tok.encode(text, add_special_tokens=False), finish_reason="stop")

    class Engine:   # trial 1 wrong; the reflection naming the calculation fixes trial 2, the other does not
        def generate(self, prompts, params=None, **kw):
            if (params[0] if isinstance(params, list) else params).temperature > 0:
                return [[out("plan : check the calculation"), out("plan : verify again")] for _ in prompts]
            return [[out(f" alpha step\nAction: Finish[{7 if good else 5}]")] for good in (
                "fix again" in tok.decode(ids) and "calculation" in tok.decode(ids).rsplit("plan", 1)[-1]
                for ids in prompts)]

    task = get_task("arithmetic")
    item = {"id": "q1", "question": "alpha beta", "answer": "7"}
    engine = Engine()
    ReflectLoop(task, engine, engine, tok, LoopConfig(), prompts=P, log=None).run([item], tmp_path / "raw.jsonl")
    (raw,) = read_jsonl(tmp_path / "raw.jsonl")
    assert [o["is_correct"] for o in raw["output"]] == [False, True, False]
    sets, _ = curate_records([raw], eval_fraction=0.0, prompts=P)
    (rec,), (pair,) = sets["d_plus"], sets["d_pm"]
    t1 = raw["output"][0]["scratchpad"]
    refl_msgs = P.reflection_messages(task, item, t1)
    assert rec["reflect_prompt"] == tok.apply_chat_template(refl_msgs, add_generation_prompt=True)
    assert rec["reason_prompt"][1] == tok.apply_chat_template(
        P.trial2_messages(item, refl_msgs, rec["reflections"]), add_generation_prompt=True) + "Thought:"
    assert pair["reflection_prompt"] == tok.apply_chat_template(P.test_reflection_messages(task, item, t1),
                                                                add_generation_prompt=True)
    start = tok.token_to_id("<|im_start|>")
    second = "Thought: alpha step\nAction: Finish[7]"
    cases = [("reflect", rec["reflect_prompt"], rec["reflections"], 4),
             ("one-stage", rec["reflect_prompt"], rec["reflections"] + "\n\n" + second, 4),
             ("correct", rec["reason_prompt"][1], second[len("Thought:"):], 6)]   # "Thought:" opens the turn
    for mode, prompt, response, turns in cases:
        (ex,), _ = tokenize_records([(1, rec)], tok, cfg(mode=mode, max_length=512), False, "d_plus")
        assert ex.prompt == tok.encode(prompt, add_special_tokens=False)   # as stored: no second template
        assert ex.prompt.count(start) == turns                               # the conversation's turns only
        assert ex.responses[0] == encode_response(tok, response)
        (_, labels), = sequences_of([ex], dpo=False)
        assert [t for t in labels if t != IGNORE] == ex.responses[0]
        assert labels[:len(ex.prompt) - 1] == [IGNORE] * (len(ex.prompt) - 1)
    (ex,), _ = tokenize_records([(1, pair)], tok, cfg(max_length=512), True, "d_pm")
    assert ex.prompt == tok.encode(pair["reflection_prompt"], add_special_tokens=False)
    assert ex.prompt.count(start) == 4
    assert ex.responses == [encode_response(tok, "plan : check the calculation"),
                            encode_response(tok, "plan : verify again")]


def test_left_truncation_keeps_the_response():
    tok = tiny_tokenizer()
    rec = d_plus(1)[0]
    rec["reflect_prompt"] = " ".join(["alpha"] * 80) + " omega tail question"
    exs, _ = tokenize_records([(3, rec)], tok, cfg(mode="reflect", max_length=40), False, "f")
    ex = exs[0]
    assert len(ex.prompt) + len(ex.responses[0]) == 40
    assert ex.responses[0][-1] == tok.eot_token_id
    full_prompt = encode_prompt(tok, rec["reflect_prompt"])
    assert ex.prompt == full_prompt[-len(ex.prompt):]       # cut from the left, the end of the prompt intact


def test_packing_keeps_sequences_apart():
    tok = tiny_tokenizer()
    exs, _ = tokenize_records(list(enumerate(d_pm(3), 1)), tok, cfg(max_length=128), True, "f")
    b = make_batch(exs, cfg(max_length=128), True, 0)
    assert b.num_seqs == 6 and b.input_ids.shape[0] < 6    # several sequences share a row
    for r in range(b.input_ids.shape[0]):
        for s in b.seq_ids[r].unique().tolist():
            if s < 0:
                continue
            pos = b.positions[r][b.seq_ids[r] == s]
            assert pos.tolist() == list(range(len(pos)))      # positions restart per sequence
    # packed per-sequence hidden states equal each sequence run alone
    model = tiny_model()
    h = model.hidden_states(b.input_ids, positions=b.positions, seq_ids=b.seq_ids)
    seqs = sequences_of(exs, True)
    for i, (inp, _) in enumerate(seqs):
        alone = model.hidden_states(torch.tensor([inp]))[0]
        torch.testing.assert_close(h[b.seq_index == i], alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["empty", "missing", "too_long", "bad_mode"])
def test_bad_input_errors(tmp_path, case):
    tok, model = tiny_tokenizer(), tiny_model()
    recs, kw = d_plus(2), {}
    if case == "empty":
        recs = []
    elif case == "missing":
        del recs[1]["reflections"]
    elif case == "too_long":
        recs[0]["reflections"] = " ".join(["alpha"] * 200)
        kw["max_length"] = 64
    else:
        kw["mode"] = "two-stage"
    with pytest.raises(TrainError) as e:
        train_sft(model, tok, recs, cfg(**kw), tmp_path / "run")
    msg = str(e.value)
    assert "\n" not in msg
    expected = {"empty": "no training records", "missing": "f.jsonl:2: missing field 'reflections'",
                "too_long": "f.jsonl:1:", "bad_mode": "--mode"}[case]
    if case == "missing":
        with pytest.raises(TrainError, match="f.jsonl:2: missing field 'reflections'"):
            train_sft(model, tok, recs, cfg(data_path="f.jsonl"), tmp_path / "run2")
    elif case == "too_long":
        with pytest.raises(TrainError, match=r"f.jsonl:1: .*--max-length 64"):
            train_sft(model, tok, recs, cfg(data_path="f.jsonl", **kw), tmp_path / "run3")
        with pytest.raises(TrainError, match="empty after filtering"):
            train_sft(model, tok, recs[:1], cfg(on_too_long="skip", **kw), tmp_path / "run4")
    else:
        assert expected in msg
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_official_example_files_tokenize(shared_data):
    from reflectevo.trainer.data import read_records

    tok = tiny_tokenizer()
    ex_dir = shared_data / "reflectevo_examples"
    for mode in ("one-stage", "reflect", "correct"):
        exs, _ = tokenize_records(read_records(ex_dir / "example_D+.jsonl"), tok, cfg(mode=mode, max_length=4096),
                                  False, "D+")
        assert len(exs) == 5
    for name in ("example_D+-.jsonl", "example_Dpref.jsonl"):
        exs, _ = tokenize_records(read_records(ex_dir / name), tok, cfg(max_length=4096), True, name)
        assert len(exs) == 5 and all(len(e.responses) == 2 for e in exs)


def test_non_finite_loss_names_step_and_examples(tmp_path):
    tok, model = tiny_tokenizer(), tiny_model()
    with torch.no_grad():
        model.layers[0].mlp.down_proj.weight.fill_(float("nan"))
    with pytest.raises(TrainError, match=r"step 1: non-finite loss .* examples \d"):
        train_sft(model, tok, d_plus(2), cfg(max_steps=2), tmp_path / "run")


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
