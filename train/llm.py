"""The causal LLM: loading any HF `AutoModelForCausalLM` offline, pad-token policy, attention
backend choice, and the LLaMA-2 7B configuration in code (sizing without weights; the other
registry LLMs' configs are in merv.train.llm_configs).

Weights come from a local directory or the HF cache only (`local_files_only=True`), never with
`trust_remote_code`; a missing model raises `LLMNotFoundError` naming what to download.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from merv import MervError

# LLaMA-2 7B (meta-llama/Llama-2-7b-hf config.json), kept in code so sizing needs no download.
LLAMA2_7B: dict[str, Any] = {
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "vocab_size": 32000,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
}

# The reference adds a "<PAD>" token to tokenizers without one and resizes the embeddings to a
# multiple of 64 (LLaMA-2: 32000 -> 32001 -> 32064 rows); published checkpoints have that shape.
PAD_TOKEN = "<PAD>"
PAD_MULTIPLE = 64
# LLaMA-2's 32000 rows + the added <PAD>, padded to a multiple of 64 (as the reference does)
LLAMA2_7B_PADDED_VOCAB = -(-(LLAMA2_7B["vocab_size"] + 1) // PAD_MULTIPLE) * PAD_MULTIPLE


@dataclass(frozen=True)
class LLMEntry:
    """A named LLM: where it lives on the Hub and which prompt format it was trained with."""

    repo: str
    prompt_format: str  # see merv.train.prompts.PROMPT_FORMATS
    gated: bool = False
    pad_token: str | None = None  # a token of its own vocabulary to pad with when the tokenizer names none


LLM_REGISTRY: dict[str, LLMEntry] = {
    "llama2-7b-pure": LLMEntry("meta-llama/Llama-2-7b-hf", "pure", gated=True),
    "llama2-13b-pure": LLMEntry("meta-llama/Llama-2-13b-hf", "pure", gated=True),
    "llama2-7b-chat": LLMEntry("meta-llama/Llama-2-7b-chat-hf", "llama2-chat", gated=True),
    "vicuna-v15-7b": LLMEntry("lmsys/vicuna-7b-v1.5", "vicuna-v15"),
    "vicuna-v15-13b": LLMEntry("lmsys/vicuna-13b-v1.5", "vicuna-v15"),
    "llama3-8b-pure": LLMEntry("meta-llama/Meta-Llama-3-8B", "pure", gated=True),
    "llama3-8b-instruct": LLMEntry("meta-llama/Meta-Llama-3-8B-Instruct", "chat-template", gated=True),
    # LLaMA-3.1 reserves a pad token (the reference pads with it; no new embedding rows)
    "llama3.1-8b-instruct": LLMEntry("meta-llama/Llama-3.1-8B-Instruct", "chat-template", gated=True,
                                     pad_token="<|finetune_right_pad_id|>"),
    "qwen2.5-0.5b-instruct": LLMEntry("Qwen/Qwen2.5-0.5B-Instruct", "chat-template"),
    "qwen2.5-1.5b-instruct": LLMEntry("Qwen/Qwen2.5-1.5B-Instruct", "chat-template"),
    "qwen2.5-3b-instruct": LLMEntry("Qwen/Qwen2.5-3B-Instruct", "chat-template"),
    "qwen2.5-7b-instruct": LLMEntry("Qwen/Qwen2.5-7B-Instruct", "chat-template"),
}
DEFAULT_LLM = "llama2-7b-pure"


class LLMNotFoundError(MervError, FileNotFoundError):
    """The LLM (or its tokenizer) is neither a local directory nor in the HF cache."""


def resolve_llm_source(source: str) -> str:
    """Registry id -> Hub repo; a local directory or any other repo id passes through."""
    if os.path.isdir(source):
        return source
    entry = LLM_REGISTRY.get(source)
    return entry.repo if entry else source


def default_prompt_format(source: str, tokenizer: Any = None) -> str:
    """Prompt format of a registry id; otherwise the tokenizer's chat template if it has one, else `pure`."""
    entry = LLM_REGISTRY.get(source)
    if entry:
        return entry.prompt_format
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return "chat-template"
    return "pure"


def choose_attn_implementation(device: str | torch.device | None = None) -> str:
    """flash_attention_2 when flash_attn is importable and the model runs on CUDA, else sdpa."""
    on_cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
    if on_cuda and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def _not_found(source: str, what: str, err: Exception) -> LLMNotFoundError:
    repo = resolve_llm_source(source)
    entry = LLM_REGISTRY.get(source)
    access = " (gated: accept the licence on the Hub and log in first)" if entry and entry.gated else ""
    return LLMNotFoundError(
        f"LLM {source!r}: no local {what} found (looked for directory {repo!r} and for {repo!r} in the HF cache, "
        f"offline). Download it where the Hub is reachable{access}: `hf download {repo}` fills the HF cache (copy "
        f"HF_HUB_CACHE here if offline), or `hf download {repo} --local-dir DIR` and pass `merv train --llm DIR`. "
        f"({type(err).__name__}: {_short(err)})"
    )


def _short(err: Exception, limit: int = 200) -> str:
    """The first words of a library error: the cause, not transformers' multi-paragraph advice."""
    text = " ".join(str(err).split())
    return text if len(text) <= limit else text[:limit] + "..."


def load_tokenizer(source: str, *, model_max_length: int | None = None) -> Any:
    """Fast tokenizer, right padding (training), offline. `model_max_length`: the run's
    `model.llm.max_length` (None keeps the tokenizer's own)."""
    from transformers import AutoTokenizer

    path = resolve_llm_source(source)
    limit = {} if model_max_length is None else {"model_max_length": model_max_length}
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False, padding_side="right",
                                            **limit)
    except (OSError, ValueError) as err:
        raise _not_found(source, "tokenizer", err) from err
    return tok


def load_llm(
    source: str = DEFAULT_LLM,
    *,
    dtype: torch.dtype = torch.bfloat16,
    attn_implementation: str | None = None,
    with_weights: bool = True,
    device: str | torch.device | None = None,
    model_max_length: int | None = None,
    pad_to_multiple_of: int = PAD_MULTIPLE,
) -> tuple[nn.Module, Any]:
    """Load `(llm, tokenizer)` offline; `with_weights=False` builds the architecture from its config
    only (the published MERV checkpoints carry the LLM weights themselves)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = resolve_llm_source(source)
    attn = attn_implementation or choose_attn_implementation(device)
    tokenizer = load_tokenizer(source, model_max_length=model_max_length)
    try:
        if with_weights:
            llm = AutoModelForCausalLM.from_pretrained(
                path, local_files_only=True, trust_remote_code=False, dtype=dtype, attn_implementation=attn
            )
        else:
            config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
            llm = empty_llm(config, dtype=dtype, attn_implementation=attn)
    except (OSError, ValueError) as err:
        raise _not_found(source, "weights" if with_weights else "config", err) from err
    entry = LLM_REGISTRY.get(source)
    ensure_pad_token(llm, tokenizer, pad_to_multiple_of=pad_to_multiple_of, reserved=entry.pad_token if entry else None)
    if device is not None:
        llm.to(device)
    return llm, tokenizer


def ensure_pad_token(llm: nn.Module, tokenizer: Any, *, pad_to_multiple_of: int = PAD_MULTIPLE,
                     reserved: str | None = None) -> bool:
    """Give a pad-less tokenizer a pad token: `reserved` when its vocabulary has it (LLaMA-3.1's
    `<|finetune_right_pad_id|>`), else the reference's `<PAD>`, resizing the LLM to fit.

    Returns True when a token was added. Resizing pads to a multiple of 64 as the reference did,
    so LLaMA-2 gets 32064 embedding rows (LLaMA-3: 128320), the shape of the published checkpoints.
    The new rows keep the model's plain init (no mean resizing): the pad row is masked out of
    attention and loss, and the rows past the tokenizer are never looked up.
    """
    added = False
    if tokenizer.pad_token is None and reserved is not None and reserved in tokenizer.get_vocab():
        tokenizer.pad_token = reserved
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
        added = True
    if llm.get_input_embeddings().weight.shape[0] < len(tokenizer):
        llm.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=pad_to_multiple_of, mean_resizing=False)
    llm.config.pad_token_id = tokenizer.pad_token_id
    return added


def empty_llm(config: Any, *, dtype: torch.dtype = torch.bfloat16, attn_implementation: str = "sdpa") -> nn.Module:
    """Allocate an LLM from its config without running the random init (weights are loaded next)."""
    from transformers import AutoModelForCausalLM

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers < 5
        from transformers.modeling_utils import no_init_weights  # type: ignore[no-redef]
    with no_init_weights():
        return AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation, trust_remote_code=False)


def llama2_7b_config(vocab_size: int | None = None, **overrides: Any) -> Any:
    """`LlamaConfig` of LLaMA-2 7B; vocab defaults to the reference's padded 32064 rows."""
    from transformers import LlamaConfig

    values = dict(LLAMA2_7B)
    values["vocab_size"] = vocab_size or LLAMA2_7B_PADDED_VOCAB
    values.update(overrides)
    return LlamaConfig(**values)


def decoder_layers(llm: nn.Module) -> nn.ModuleList:
    """The LLM's decoder layers (the FSDP wrapping / activation-checkpointing unit); inside a PEFT
    wrapper, those of the base model it wraps."""
    if hasattr(llm, "peft_config") and hasattr(llm, "get_base_model"):
        llm = llm.get_base_model()
    base = getattr(llm, "model", None) or getattr(llm, getattr(llm, "base_model_prefix", ""), None)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(f"cannot find decoder layers on {type(llm).__name__}; expected `.model.layers`")
    return layers
