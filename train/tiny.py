"""Tiny, fully local stand-ins for the LLM and its tokenizer (tests, the demo, CPU smoke runs).

No weights or tokenizers can be downloaded here, so the project trains its own byte-level BPE
tokenizer in-process on a small embedded corpus and initialises small LLaMA / Qwen2 models from a
seed. Two flavours match the two tokenizer behaviours the model must handle:
  "llama"  BOS-prefixed, "</s>" EOS, plain prompt formats (like LLaMA-2)
  "qwen2"  no BOS, "<|im_end|>" end of turn, a chat template (like Qwen2.5 instruct)
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
import torch.nn as nn

from .specs import FeatureSpec

_SUBJECTS = ["a man", "a woman", "a dog", "a cat", "two children", "a chef", "a player", "the camera", "a bird", "a car"]
_VERBS = ["is running", "is cooking", "jumps", "walks", "is talking", "plays guitar", "opens the door", "moves left", "turns around", "is eating"]
_PLACES = ["in a kitchen", "on a street", "in a park", "on a stage", "at the beach", "in a room", "near a river", "in the snow"]
_QUESTIONS = [
    "What is happening in this video?",
    "Describe the video.",
    "Who is in the video?",
    "Where does this take place?",
    "What does the person do next?",
    "Is the camera moving? Answer yes or no.",
    "How many people are there?",
    "What color is the car?",
]
_FORMAT_TEXT = [
    "In: ", "\nOut: ", "USER: ", " ASSISTANT: ", "[INST] ", " [/INST] ", "<<SYS>>\n", "\n<</SYS>>\n\n",
    "system\n", "user\n", "assistant\n", "You are a helpful assistant.", "A chat between a curious user and an assistant.",
    "Answer: A B C D yes no True False 0 1 2 3 4 5 6 7 8 9",
]

LLAMA_SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
QWEN_CHAT_TEMPLATE = (
    "{%- if not messages or messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for m in messages %}"
    "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)


def tiny_corpus() -> list[str]:
    """Deterministic small corpus of captions, questions and prompt-format fragments."""
    lines = [f"{s} {v} {p}." for s, v, p in itertools.product(_SUBJECTS, _VERBS, _PLACES)]
    lines += [f"In: {q}\nOut: {s} {v}." for q, s, v in zip(itertools.cycle(_QUESTIONS), _SUBJECTS * 3, _VERBS * 3)]
    lines += _QUESTIONS + _FORMAT_TEXT
    return lines


def build_tiny_tokenizer(flavor: str = "llama", vocab_size: int = 640, model_max_length: int = 1024) -> Any:
    """Byte-level BPE trained in-process (no unknown characters), wrapped as a HF fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if flavor not in ("llama", "qwen2"):
        raise ValueError(f"tiny tokenizer flavor {flavor!r} is unknown; use 'llama' or 'qwen2'")
    specials = LLAMA_SPECIALS if flavor == "llama" else QWEN_SPECIALS
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(tiny_corpus(), trainer)
    common = {"padding_side": "right", "model_max_length": model_max_length}
    if flavor == "llama":
        bos_id = tok.token_to_id("<s>")
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
        )
        return PreTrainedTokenizerFast(
            tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>", **common
        )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
        **common,
    )
    fast.chat_template = QWEN_CHAT_TEMPLATE
    return fast


def build_tiny_llm(
    tokenizer: Any,
    flavor: str = "llama",
    *,
    hidden_size: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate_size: int = 128,
    max_positions: int = 2048,
    vocab_size: int | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """Randomly initialised (seeded) LlamaForCausalLM / Qwen2ForCausalLM sized for CPU tests.

    `vocab_size` (default: the tokenizer's) may exceed the tokenizer: rows it never uses, so a
    shape-only model can carry a real LLM's embedding and LM-head cost."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    cfg_cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}.get(flavor)
    if cfg_cls is None:
        raise ValueError(f"tiny LLM flavor {flavor!r} is unknown; use 'llama' or 'qwen2'")
    config = cfg_cls(
        vocab_size=max(vocab_size or 0, len(tokenizer)),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        llm = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype)
    llm.eval()
    return llm


def tiny_feature_specs() -> list[FeatureSpec]:
    """Two small encoders with different grids / widths and the same frame count (4)."""
    return [FeatureSpec("enc_a", (4, 6, 6), 32), FeatureSpec("enc_b", (4, 4, 4), 24)]


def build_tiny_merv(
    specs: list[FeatureSpec] | None = None,
    connector_config: Any = None,
    flavor: str = "llama",
    seed: int = 0,
    **llm_kwargs: Any,
) -> tuple[Any, Any]:
    """A complete tiny `MervModel` and its tokenizer (connector seeded too)."""
    from .connector import Connector, ConnectorConfig
    from .model import MervModel

    tokenizer = build_tiny_tokenizer(flavor)
    llm = build_tiny_llm(tokenizer, flavor, seed=seed, **llm_kwargs)
    cfg = connector_config or ConnectorConfig(tokens_per_frame=4, fusion_embed_dim=48)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        connector = Connector(specs or tiny_feature_specs(), llm.config.hidden_size, cfg)
    fmt = "pure" if flavor == "llama" else "chat-template"
    return MervModel(connector, llm, tokenizer=tokenizer, prompt_format=fmt), tokenizer
