"""The published configs of the registry's LLMs, kept in code: sizing needs no download.

Each entry is the model's Hub `config.json` (the fields that shape the weights and the rotary
embedding; checked by hand against the Hub files). `published_config(name)` is that config;
`trained_config(name)` is the shape MERV trains, which differs where the pad-token policy
(`merv.train.llm.ensure_pad_token`) adds a `<PAD>` row and pads the vocabulary to a multiple of 64
(LLaMA-2 and LLaMA-3 have no pad token; Qwen2.5 has `<|endoftext|>`, LLaMA-3.1 a reserved one).
"""

from __future__ import annotations

from typing import Any

from .llm import LLAMA2_7B, PAD_MULTIPLE

_LLAMA3_8B: dict[str, Any] = {  # meta-llama/Meta-Llama-3-8B(-Instruct) config.json
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "bos_token_id": 128000,  # <|begin_of_text|>
    "eos_token_id": 128009,  # <|eot_id|> (the instruct model's end of turn)
}
_QWEN25_COMMON: dict[str, Any] = {  # shared by every Qwen/Qwen2.5-*-Instruct config.json
    "model_type": "qwen2",
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "hidden_act": "silu",
    "use_sliding_window": False,
    "bos_token_id": 151643,  # <|endoftext|>: in the config, but the tokenizer adds no BOS
    "eos_token_id": 151645,  # <|im_end|>
}

PUBLISHED_CONFIGS: dict[str, dict[str, Any]] = {
    "llama2-7b-pure": {"model_type": "llama", **LLAMA2_7B},
    "llama3-8b-instruct": _LLAMA3_8B,
    # LLaMA-3.1 keeps LLaMA-3's shapes; 128k context through the "llama3" RoPE scaling
    "llama3.1-8b-instruct": {
        **_LLAMA3_8B,
        "max_position_embeddings": 131072,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192},
        "eos_token_id": [128001, 128008, 128009],  # <|end_of_text|>, <|eom_id|>, <|eot_id|>
    },
    "qwen2.5-7b-instruct": {
        **_QWEN25_COMMON, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
        "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064, "tie_word_embeddings": False,
    },
    "qwen2.5-1.5b-instruct": {
        **_QWEN25_COMMON, "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
        "num_attention_heads": 12, "num_key_value_heads": 2, "vocab_size": 151936, "tie_word_embeddings": True,
    },
    "qwen2.5-0.5b-instruct": {
        **_QWEN25_COMMON, "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
        "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936, "tie_word_embeddings": True,
    },
}
# Tokens in the tokenizer (len(tokenizer)) where it is smaller than the embedding (Qwen pads its
# embedding past the tokenizer already), and whether the tokenizer has a pad token.
_TOKENIZER: dict[str, tuple[int, bool]] = {
    "llama2-7b-pure": (32000, False),
    "llama3-8b-instruct": (128256, False),
    "llama3.1-8b-instruct": (128256, True),  # pads with its reserved <|finetune_right_pad_id|> (merv.train.llm)
    "qwen2.5-7b-instruct": (151665, True),
    "qwen2.5-1.5b-instruct": (151665, True),
    "qwen2.5-0.5b-instruct": (151665, True),
}


def _config(values: dict[str, Any]) -> Any:
    from transformers import AutoConfig

    fields = dict(values)
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


def published_config(name: str) -> Any:
    """The Hub config of a registry LLM as a transformers config object (KeyError if not kept here)."""
    return _config(PUBLISHED_CONFIGS[name])


def trained_vocab(name: str) -> int:
    """Embedding rows as MERV trains the LLM: a tokenizer without a pad token gets `<PAD>` and the
    rows are padded to a multiple of 64 (LLaMA-2: 32064, LLaMA-3: 128320); others keep theirs."""
    vocab = PUBLISHED_CONFIGS[name]["vocab_size"]
    tokens, has_pad = _TOKENIZER[name]
    if has_pad:
        return vocab
    return max(vocab, -(-(tokens + 1) // PAD_MULTIPLE) * PAD_MULTIPLE)


def trained_config(name: str) -> Any:
    """`published_config` with the embedding rows MERV trains (`trained_vocab`)."""
    return _config({**PUBLISHED_CONFIGS[name], "vocab_size": trained_vocab(name)})


def sizing_config(name: str) -> Any:
    """The config `merv model info` sizes `model.llm.name` by, without weights: the trained shape of
    a registry LLM kept here (`llama2-7b-shape` is LLaMA-2 7B's), else a local directory's config.json."""
    import os

    from merv import MervError

    alias = {"llama2-7b-shape": "llama2-7b-pure"}.get(name, name)
    if alias in PUBLISHED_CONFIGS:
        return trained_config(alias)
    if os.path.isfile(os.path.join(name, "config.json")):
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(name, local_files_only=True, trust_remote_code=False)
    raise MervError(f"LLM {name!r} has no config kept in code ({', '.join(sorted(PUBLISHED_CONFIGS))}) and is no "
                    "local directory with a config.json; size a recipe with one of those LLMs (--set model.llm.name=...)")
