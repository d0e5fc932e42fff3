"""Trainer data: prompts, masking, truncation, packing, bad records (tiny tokenizer of trainer_tiny)."""
from __future__ import annotations

import json

from types import SimpleNamespace

import pytest
import torch

from reflectevo.trainer import TrainError, train_sft
from reflectevo.trainer.data import (IGNORE, encode_prompt, encode_response, make_batch, opened_assistant_turn,
                                    sequences_of, sft_texts, tokenize_records)
from trainer_tiny import cfg, d_plus, d_pm, tiny_model, tiny_tokenizer


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
    from reflectevo.data.eval_run import run_eval
    from reflectevo.data.jsonl import read_jsonl
    from reflectevo.data.loop import LoopConfig, ReflectLoop
    from reflectevo.data.prompts import Prompts

    tok = tiny_tokenizer()
    overrides = {"trial": "question : {question}", "reflection_request": "why the first trial failed",
                 "reflection_request_test": "why failed", "retry_request": "fix again",
                 "reflect_and_retry_request": "why failed , then fix again : {answer_rule}"}
    P = Prompts(overrides)
    (tmp_path / "prompts.json").write_text(json.dumps(overrides))   # the same templates for the trainer

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
    # correct trains on trial 2 as eval sends it: after the test-time request, not the data-generation one
    test_msgs = P.test_reflection_messages(task, item, t1)
    assert rec["test_trial2_prompt"] == tok.apply_chat_template(
        P.trial2_messages(item, test_msgs, rec["reflections"]), add_generation_prompt=True) + "Thought:"
    assert rec["test_trial2_prompt"] != rec["reason_prompt"][1]
    run_eval(task, [item], engine, engine, tok, tmp_path / "eval.json", LoopConfig(), prompts=P, log=None)
    (at_eval,) = read_jsonl(tmp_path / "eval.raw.jsonl")
    assert at_eval["output"][1]["reflections"] == [rec["reflections"]]
    assert at_eval["output"][1]["reason_prompt"] == at_eval["output"][1]["test_reason_prompt"] \
        == rec["test_trial2_prompt"]
    start = tok.token_to_id("<|im_start|>")
    second = "Thought: alpha step\nAction: Finish[7]"
    # reflect trains on the prompt eval reflects on (the pair's), one-stage on the prompt eval's one-stage mode
    # sends (that conversation asking for a reflection and a new attempt), or with "stored" on reflect_prompt
    assert rec["test_reflection_prompt"] == pair["reflection_prompt"]
    one_stage = tok.apply_chat_template(P.one_stage_messages(task, item, t1), add_generation_prompt=True)
    assert one_stage == rec["test_reflection_prompt"].replace("why failed", "why failed , then fix again : " +
                                                              P.answer_rule(task))
    cases = [("reflect", "test-time", rec["test_reflection_prompt"], rec["reflections"], 4),
             ("one-stage", "test-time", one_stage, rec["reflections"] + "\n\n" + second, 4),
             ("reflect", "stored", rec["reflect_prompt"], rec["reflections"], 4),
             ("one-stage", "stored", rec["reflect_prompt"], rec["reflections"] + "\n\n" + second, 4),
             ("correct", "test-time", rec["test_trial2_prompt"], second[len("Thought:"):], 6),  # "Thought:" opens it
             ("correct", "stored", rec["reason_prompt"][1], second[len("Thought:"):], 6)]
    for mode, sft_prompt, prompt, response, turns in cases:
        (ex,), _ = tokenize_records([(1, rec)], tok, cfg(mode=mode, sft_prompt=sft_prompt, max_length=512,
                                                         prompts=str(tmp_path / "prompts.json")), False, "d_plus")
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


def test_official_d_plus_trains_on_the_test_time_reflection_prompt():
    """An official D+ record stores only the data-generation request (reflect_prompt); SFT rebuilds the prompt eval
    reflects on from its question and trial-1 transcript (paper.md defect 4: no train / test prompt mismatch)."""
    from reflectevo.data.prompts import test_time_reflection_prompt

    rec = dict(d_plus(1)[0], question="alpha beta question", first_trial_reasoning="thought : alpha action : B")
    expected = test_time_reflection_prompt(rec)
    assert expected != rec["reflect_prompt"]
    assert sft_texts(rec, "reflect", "f")[0] == expected
    assert sft_texts(rec, "reflect", "f", sft_prompt="stored")[0] == rec["reflect_prompt"]
    assert sft_texts(d_plus(1)[0], "reflect", "f")[0] == d_plus(1)[0]["reflect_prompt"]  # nothing to rebuild from


def test_correct_stage_prompt_falls_back_to_the_stored_trial2_prompt():
    """--mode correct: test_trial2_prompt (our curation's, eval's trial 2) when the record has it, else (official
    D+) reason_prompt[1]; --sft-prompt stored keeps reason_prompt[1]. A leaked trial-2 answer leaves either."""
    rec = d_plus(1)[0]
    assert "test_trial2_prompt" not in rec
    target = sft_texts(rec, "correct", "f")[1]
    assert sft_texts(rec, "correct", "f")[0] == rec["reason_prompt"][1]
    ours = dict(rec, test_trial2_prompt="eval trial two alpha " + rec["second_trial_reasoning"])  # leaked answer
    assert sft_texts(ours, "correct", "f") == ("eval trial two alpha ", target)
    assert sft_texts(ours, "correct", "f", sft_prompt="stored")[0] == rec["reason_prompt"][1]
    assert sft_texts(dict(rec, test_trial2_prompt="  "), "correct", "f")[0] == rec["reason_prompt"][1]
