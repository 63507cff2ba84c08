"""Build a `MervModel` from (feature specs, connector config, LLM source), whatever the LLM (tiny
in-process or a local HF model); reached through `merv.train.config.ModelConfig.build`."""

from __future__ import annotations

from typing import Any

import torch

from .connector import Connector, ConnectorConfig
from .llm import LLAMA2_7B, LLAMA2_7B_PADDED_VOCAB, default_prompt_format, load_llm
from .model import MervModel
from .specs import FeatureSpec

# LLMs built in-process from a seed with the project's own tokenizer (no files): name -> (flavor, shape).
IN_PROCESS_LLMS: dict[str, tuple[str, dict[str, Any]]] = {
    "tiny-llama": ("llama", {}),
    "tiny-qwen2": ("qwen2", {}),
    # the tokenizers, templates and pad policies of Qwen2.5-Instruct (tied like its 0.5B / 1.5B) and LLaMA-3-Instruct
    "tiny-qwen2.5": ("qwen2.5", {"tie_word_embeddings": True}),
    "tiny-llama3": ("llama3", {}),
    # CPU benchmark scale: 25.3M parameters in the decoder layers, ~6x the `small` encoders (paper:
    # LLaMA-2 7B vs 0.89B of encoders, 7.6x); LLaMA-2's 128-wide heads and ~2.7x MLP.
    "small-llama": ("llama", dict(hidden_size=512, layers=8, heads=4, kv_heads=4, intermediate_size=1376)),
    # LLaMA-2 7B's shapes as MERV trains it (padded vocab; 6.74B parameters), random weights:
    # GPU benchmarks of the paper's compute without downloading anything
    "llama2-7b-shape": ("llama", dict(
        hidden_size=LLAMA2_7B["hidden_size"], layers=LLAMA2_7B["num_hidden_layers"],
        heads=LLAMA2_7B["num_attention_heads"], kv_heads=LLAMA2_7B["num_key_value_heads"],
        intermediate_size=LLAMA2_7B["intermediate_size"], vocab_size=LLAMA2_7B_PADDED_VOCAB,
        max_positions=LLAMA2_7B["max_position_embeddings"])),
}


def build_merv(
    specs: list[FeatureSpec],
    connector_config: ConnectorConfig,
    llm_source: str,
    *,
    model_max_length: int,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    attn_implementation: str | None = None,
    prompt_format: str | None = None,
    seed: int = 0,
    tiny_llm_kwargs: dict[str, Any] | None = None,
) -> MervModel:
    """Connector (seeded) + LLM. `llm_source`: a registry id, a local HF directory, or one of
    `IN_PROCESS_LLMS` (built in-process with the project's own tokenizer, no files needed).

    The hyper-parameters have no defaults here: `merv.train.config.ModelConfig.build` is the way
    in, and its config holds them."""
    if llm_source in IN_PROCESS_LLMS:
        from .tiny import build_tiny_llm, build_tiny_tokenizer

        flavor, shape = IN_PROCESS_LLMS[llm_source]
        tokenizer = build_tiny_tokenizer(flavor, model_max_length=model_max_length)
        llm = build_tiny_llm(tokenizer, flavor, seed=seed, dtype=dtype or torch.float32,
                             **{**shape, **(tiny_llm_kwargs or {})})
    else:
        llm, tokenizer = load_llm(
            llm_source, dtype=dtype or torch.bfloat16, attn_implementation=attn_implementation, model_max_length=model_max_length
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        connector = Connector(specs, llm.config.hidden_size, connector_config)
    fmt = prompt_format or default_prompt_format(llm_source, tokenizer)
    model = MervModel(connector, llm, tokenizer=tokenizer, prompt_format=fmt, llm_source=llm_source)
    if device is not None:
        model.to(device)
    return model
