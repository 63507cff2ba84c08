"""Prompt formats (exact strings), answer-only labels, chat templates, the project-built tokenizer."""

from __future__ import annotations

import pytest
import torch
from testkit import llm as H

from merv.train.prompts import (
    IGNORE_INDEX,
    encode_prompt,
    get_prompt_builder,
    tokenize_caption,
    tokenize_conversation,
)


@pytest.fixture(scope="module")
def llama_tok():
    return H.build_tiny_tokenizer("llama")


@pytest.fixture(scope="module")
def qwen_tok():
    return H.build_tiny_tokenizer("qwen2")


def _build(fmt: str, tok=None) -> str:
    b = get_prompt_builder(fmt, tok)
    for turn in H.CONVERSATION:
        b.add_turn(turn["from"], turn["value"])
    return b.prompt


def test_pure_format_is_prismatic_pure_prompt() -> None:
    assert _build("pure") == (
        "In: What is happening in this video?\nOut: a dog is running in a park.</s>"
        "In: Who is in the video?\nOut: a dog.</s>"
    )
    b = get_prompt_builder("pure")
    b.add_turn("human", "<image>\nDescribe it.")
    assert b.get_prompt() == "In: Describe it.\nOut:"


def test_llama2_chat_and_vicuna_formats() -> None:
    sys_prompt = "Be brief."
    b = get_prompt_builder("llama2-chat", system_prompt=sys_prompt)
    b.add_turn("human", "Q1")
    b.add_turn("gpt", "A1")
    b.add_turn("human", "Q2")
    assert b.prompt == "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nQ1 [/INST] A1</s><s>[INST] Q2 [/INST] "
    assert b.get_prompt() == "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nQ1 [/INST] A1</s><s>[INST] Q2 [/INST]"
    v = get_prompt_builder("vicuna-v15", system_prompt=sys_prompt)
    v.add_turn("human", "Q1")
    v.add_turn("gpt", "A1")
    v.add_turn("human", "Q2")
    assert v.get_prompt() == "Be brief. USER: Q1 ASSISTANT: A1</s>USER: Q2 ASSISTANT:"


def test_roles_must_alternate_and_format_must_exist() -> None:
    b = get_prompt_builder("pure")
    with pytest.raises(ValueError, match="turn 0 must come from 'human'"):
        b.add_turn("gpt", "x")
    with pytest.raises(ValueError, match="prompt format 'nope' is unknown"):
        get_prompt_builder("nope")
    with pytest.raises(ValueError, match="needs the tokenizer"):
        get_prompt_builder("chat-template")


@pytest.mark.parametrize("fmt", ["pure", "llama2-chat", "vicuna-v15"])
def test_only_answer_tokens_carry_labels(fmt: str, llama_tok) -> None:
    ids, labels = tokenize_conversation(get_prompt_builder(fmt, llama_tok), llama_tok, H.CONVERSATION)
    assert ids.dtype == torch.long and ids.shape == labels.shape
    assert ids[0] == llama_tok.bos_token_id and labels[0] == IGNORE_INDEX
    labelled = labels != IGNORE_INDEX
    assert torch.equal(ids[labelled], labels[labelled])
    # the labelled tokens are exactly the two answers, each closed by EOS
    answers = [llama_tok(t["value"] + "</s>", add_special_tokens=False).input_ids for t in H.CONVERSATION[1::2]]
    assert labels[labelled].tolist() == answers[0] + answers[1]
    # the human turns (everything else) decode to the prompt text without placeholders
    human = llama_tok.decode(ids[~labelled].tolist(), skip_special_tokens=False)
    assert "<video>" not in human and "What is happening in this video?" in human and "Who is in the video?" in human


def test_truncation_and_fresh_builder(llama_tok) -> None:
    b = get_prompt_builder("pure", llama_tok)
    ids, labels = tokenize_conversation(b, llama_tok, H.CONVERSATION, max_length=7)
    assert len(ids) == len(labels) == 7
    with pytest.raises(ValueError, match="fresh PromptBuilder"):
        tokenize_conversation(b, llama_tok, H.CONVERSATION)


def test_chat_template_turns_and_labels(qwen_tok) -> None:
    assert qwen_tok.bos_token_id is None
    b = get_prompt_builder("chat-template", qwen_tok)
    ids, labels = tokenize_conversation(b, qwen_tok, H.CONVERSATION)
    full = qwen_tok.apply_chat_template(
        [{"role": "user" if t["from"] == "human" else "assistant", "content": t["value"].replace("<video>", "").strip()} for t in H.CONVERSATION],
        tokenize=False,
    )
    assert b.prompt == full
    assert qwen_tok.decode(ids.tolist(), skip_special_tokens=False) == full
    answers = qwen_tok.decode(labels[labels != IGNORE_INDEX].tolist(), skip_special_tokens=False)
    assert answers == "a dog is running in a park.<|im_end|>\na dog.<|im_end|>\n"
    prompt = encode_prompt("chat-template", qwen_tok, "Describe the video.")
    assert qwen_tok.decode(prompt).endswith("<|im_start|>assistant\n")


def test_caption_sample(llama_tok) -> None:
    ids, labels = tokenize_caption(llama_tok, "a cat walks on a street.")
    assert ids[0] == llama_tok.bos_token_id and ids[-1] == llama_tok.eos_token_id
    assert labels[0] == IGNORE_INDEX and torch.equal(labels[1:], ids[1:])


def test_project_tokenizer_is_deterministic_and_round_trips(tmp_path, llama_tok) -> None:
    again = H.build_tiny_tokenizer("llama")
    assert again.get_vocab() == llama_tok.get_vocab()
    text = "In: Is the camera moving? Answer yes or no.\nOut: no ünïcode ok"
    ids = llama_tok(text).input_ids
    assert llama_tok.decode(ids, skip_special_tokens=True) == text  # byte-level: no unknown characters
    llama_tok.save_pretrained(tmp_path)
    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert loaded(text).input_ids == ids and loaded.pad_token == "<pad>" and loaded.padding_side == "right"
