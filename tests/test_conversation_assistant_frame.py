"""Where a chat template puts an assistant message's content (data/conversation.py ``assistant_frame``): the loop
opens the assistant turn ("Thought:") there, and the trainer ends a target with what the template renders between
the content and its end-of-turn token.

Only a template that really inserts whitespace there changes (Llama-2: "[/INST] Thought:" and " </s>"); ChatML
(SmolLM2), Llama-3 and Mistral-v0.2 prompts and targets are byte for byte what they were (generation prompt +
opener; content ids + the end-of-turn id), and a Qwen3-style template that puts reasoning markup in front of the
final assistant turn's content keeps them too (the markup is not put into our prompts)."""
from __future__ import annotations

import pytest

from reflectevo.data import get_task
from reflectevo.data.conversation import PromptBuilder, assistant_frame
from reflectevo.data.official import eval_prompt
from reflectevo.data.prompts import DEFAULT as P
from reflectevo.data.rerender import rerender
from reflectevo.trainer.data import chat_prompt, continue_turn, encode_response
from test_gguf_spm_tokenizer import LLAMA2_TEMPLATE, MISTRAL_TEMPLATE
from test_prompt_parity_audit2 import LLAMA3, MISTRAL, _bpe, tokenizer
from trainer_tiny import tiny_tokenizer

TASK = get_task("arithmetic")
ITEM = {"id": "q0", "question": "Tom has 3 apples and buys 5 more. How many apples does he have?", "answer": "8"}
TRANSCRIPT = "Thought: I add the numbers and get 99.\nAction: Finish[99]\nObservation: The answer is wrong."
REFLECTION = "Check the carry in the sum and add the two numbers again."
RECORD = {**ITEM, "first_trial_reasoning": TRANSCRIPT, "reflections": [REFLECTION]}
QWEN3_STYLE = (   # Qwen3's rule: an assistant turn after the last user message renders an (empty) think block
    "{%- set ns = namespace(last=-1) %}{%- for m in messages %}{%- if m.role == 'user' %}"
    "{%- set ns.last = loop.index0 %}{%- endif %}{%- endfor %}{%- for m in messages %}"
    "{%- if m.role == 'assistant' and loop.index0 > ns.last %}"
    "{{- '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' + m.content + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
_TOKS: dict = {}


def tok_of(name: str):
    if name not in _TOKS:
        _TOKS[name] = {
            "smollm2": lambda: tokenizer("smollm2"), "llama3": lambda: tokenizer("llama3"),
            "mistral": lambda: tokenizer("mistral"), "chatml": tiny_tokenizer,
            "mistral-v0.2": lambda: _bpe(MISTRAL_TEMPLATE, ["<s>", "</s>"], "<s>", "</s>", False),
            "qwen3-style": lambda: _bpe(QWEN3_STYLE, ["<|im_start|>", "<|im_end|>"], "<|im_start|>", "<|im_end|>",
                                        False),
            "llama2": lambda: _bpe(LLAMA2_TEMPLATE, ["<s>", "</s>"], "<s>", "</s>", False)}[name]()
    return _TOKS[name]


def conversations():
    reflect = P.test_reflection_messages(TASK, ITEM, TRANSCRIPT)
    return [P.trial_messages(TASK, ITEM), reflect, P.trial2_messages(ITEM, reflect, REFLECTION)]


@pytest.mark.parametrize("name", ["smollm2", "chatml", "llama3", "mistral", "mistral-v0.2", "qwen3-style"])
def test_templates_that_insert_nothing_keep_todays_prompts_and_targets(name):
    tok = tok_of(name)
    assert assistant_frame(tok) == ("", "")
    build = PromptBuilder(tok)
    for messages in conversations():
        today = tok.apply_chat_template(messages, add_generation_prompt=True)
        assert build.render(messages) == today
        assert build.render(messages, "Thought:") == today + "Thought:"
    for text in (REFLECTION, " So it is 8.\nAction: Finish[8]"):
        assert encode_response(tok, text) == tok.encode(text, add_special_tokens=False) + [tok.eot_token_id]
    if name != "qwen3-style":     # Qwen3 would prefill "<think>\n\n</think>\n\n": kept out on purpose
        messages = P.trial_messages(TASK, ITEM) + [{"role": "assistant", "content": "Thought:"}]
        assert build.render(messages[:-1], "Thought:") == tok.apply_chat_template(messages,
                                                                                  continue_final_message=True)


def test_llama2_opens_and_closes_the_assistant_turn_as_its_template():
    tok = tok_of("llama2")
    assert assistant_frame(tok) == (" ", " ")
    build = PromptBuilder(tok)
    for messages in conversations():
        base = tok.apply_chat_template(messages, add_generation_prompt=True)
        assert build.render(messages) == base                    # no opener: the model writes " Check ..."
        opened = build.render(messages, "Thought:")
        assert opened == base + " Thought:" and opened.endswith("[/INST] Thought:")
        assert opened == tok.apply_chat_template(messages + [{"role": "assistant", "content": "Thought:"}],
                                                 continue_final_message=True)
        # a closed turn as the template renders it: the target's ids are the content's + " </s>"'s
        closed = tok.apply_chat_template(messages + [{"role": "assistant", "content": REFLECTION}],
                                         add_generation_prompt=False)
        assert closed.endswith(REFLECTION + " </s>")
    eot = tok.eot_token_id
    assert encode_response(tok, REFLECTION) == tok.encode(REFLECTION + " ", add_special_tokens=False) + [eot]
    assert encode_response(tok, REFLECTION) != tok.encode(REFLECTION, add_special_tokens=False) + [eot]


def test_llama2_stored_prompts_official_and_rerendered_agree():
    """eval's trial-2 prompt built from fields (official.py), a stored one re-rendered (rerender.py; one stored
    before this fix as "[/INST]Thought:" too) and the trainer's opened turn: the same text, "Thought:" taken off
    the target once."""
    tok = tok_of("llama2")
    built, opener = eval_prompt("trial2", TASK, RECORD, tok)
    assert opener == "Thought:" and built.endswith("[/INST] Thought:")
    assert rerender(RECORD, built, tok) == built
    old = built[:-len(" Thought:")] + "Thought:"
    assert rerender(RECORD, old, tok) == built
    prompt, opened = chat_prompt(tok, built)
    assert prompt == built and opened == " Thought:"
    assert continue_turn(opened, "Thought: So it is 8.\nAction: Finish[8]") == " So it is 8.\nAction: Finish[8]"
    mistral = tok_of("mistral-v0.2")
    built_m, _ = eval_prompt("trial2", TASK, RECORD, mistral)
    assert built_m.endswith("[/INST]Thought:") and rerender(RECORD, built_m, mistral) == built_m


def test_a_template_that_raises_or_renders_no_assistant_turn_inserts_nothing():
    class Raising:
        chat_template = "x"

        def apply_chat_template(self, messages, add_generation_prompt=True):
            if messages[-1]["role"] == "assistant":
                raise ValueError("no assistant turn")
            return "U: " + messages[-1]["content"] + "\nA:"

    assert assistant_frame(Raising()) == ("", "")
    assert PromptBuilder(Raising()).render([{"role": "user", "content": "hi"}], "Thought:") == "U: hi\nA:Thought:"
