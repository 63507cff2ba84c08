"""Tiny, fully local stand-ins for the LLM and its tokenizer (tests, the demo, CPU smoke runs).

No weights or tokenizers can be downloaded here, so the project trains its own byte-level BPE
tokenizer in-process on a small embedded corpus and initialises small LLaMA / Qwen2 models from a
seed. The flavours match the tokenizer behaviours the model must handle:
  "llama"    BOS-prefixed, "</s>" EOS, plain prompt formats (like LLaMA-2)
  "qwen2"    no BOS, "<|im_end|>" end of turn, a short ChatML chat template
  "qwen2.5"  Qwen2.5-Instruct's tokenizer: no BOS, "<|endoftext|>" pad, "<|im_end|>" EOS, its
             pre-tokenizer pattern and its chat template (ChatML with Qwen's default system turn)
  "llama3"   LLaMA-3-Instruct's tokenizer: "<|begin_of_text|>" BOS, "<|eot_id|>" EOS, no pad token
             (the pad policy adds "<PAD>"), its pre-tokenizer pattern and its chat template
             (<|start_header_id|>role<|end_header_id|> headers, turns closed by <|eot_id|>)
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
import torch.nn as nn

from .llm import ensure_pad_token
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


# Qwen2.5-Instruct's chat template without its tool-calling branches (tokenizer_config.json)
QWEN25_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
QWEN25_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\n" + QWEN25_SYSTEM + "<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' or (message.role == 'system' and not loop.first) or message.role == 'assistant' %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
# Meta-Llama-3-8B-Instruct's special tokens and chat template (tokenizer_config.json)
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim "
    "+ '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
# The pre-tokenizer patterns of the two families' tokenizer.json (Qwen2: single digits; LLaMA-3: up to 3)
_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}%s| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
            r"|\s+(?!\S)|\s+")
PRETOKENIZE_PATTERNS = {"qwen2.5": _PATTERN % "", "llama3": _PATTERN % "{1,3}"}
FLAVORS = ("llama", "qwen2", "qwen2.5", "llama3")
_SPECIALS = {"llama": LLAMA_SPECIALS, "qwen2": QWEN_SPECIALS, "qwen2.5": QWEN_SPECIALS, "llama3": LLAMA3_SPECIALS}


def _unknown(flavor: str, what: str) -> ValueError:
    return ValueError(f"tiny {what} flavor {flavor!r} is unknown; use one of {', '.join(FLAVORS)}")


def tiny_corpus() -> list[str]:
    """Deterministic small corpus of captions, questions and prompt-format fragments."""
    lines = [f"{s} {v} {p}." for s, v, p in itertools.product(_SUBJECTS, _VERBS, _PLACES)]
    lines += [f"In: {q}\nOut: {s} {v}." for q, s, v in zip(itertools.cycle(_QUESTIONS), _SUBJECTS * 3, _VERBS * 3)]
    lines += _QUESTIONS + _FORMAT_TEXT
    return lines


def build_tiny_tokenizer(flavor: str = "llama", vocab_size: int = 640, model_max_length: int = 1024) -> Any:
    """Byte-level BPE trained in-process (no unknown characters), wrapped as a HF fast tokenizer."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if flavor not in FLAVORS:
        raise _unknown(flavor, "tokenizer")
    tok = Tokenizer(models.BPE())
    if flavor in PRETOKENIZE_PATTERNS:  # the family's own split, then bytes (as its tokenizer.json does)
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(PRETOKENIZE_PATTERNS[flavor]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=_SPECIALS[flavor],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(tiny_corpus(), trainer)
    common = {"padding_side": "right", "model_max_length": model_max_length}
    if flavor in ("llama", "llama3"):
        bos = "<s>" if flavor == "llama" else "<|begin_of_text|>"
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    if flavor == "llama":
        return PreTrainedTokenizerFast(
            tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>", **common
        )
    if flavor == "llama3":  # no pad token, as LLaMA-3's: merv.train.llm.ensure_pad_token adds "<PAD>"
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                       additional_special_tokens=LLAMA3_SPECIALS[1:4], **common)
        fast.chat_template = LLAMA3_CHAT_TEMPLATE
        return fast
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
        **common,
    )
    fast.chat_template = QWEN_CHAT_TEMPLATE if flavor == "qwen2" else QWEN25_CHAT_TEMPLATE
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
    tie_word_embeddings: bool = False,
) -> nn.Module:
    """Randomly initialised (seeded) LlamaForCausalLM / Qwen2ForCausalLM sized for CPU tests.

    `vocab_size` (default: the tokenizer's) may exceed the tokenizer: rows it never uses, so a
    shape-only model can carry a real LLM's embedding and LM-head cost. `tie_word_embeddings`:
    one matrix for the embedding and the LM head (Qwen2.5 0.5B / 1.5B)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    cfg_cls = {"llama": LlamaConfig, "llama3": LlamaConfig, "qwen2": Qwen2Config, "qwen2.5": Qwen2Config}.get(flavor)
    if cfg_cls is None:
        raise _unknown(flavor, "LLM")
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
        tie_word_embeddings=tie_word_embeddings,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        llm = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype)
        ensure_pad_token(llm, tokenizer)  # the real LLMs' pad policy (llama3: "<PAD>", rows padded to 64)
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
