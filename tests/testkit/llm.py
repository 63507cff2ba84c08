"""Tiny LLM / tokenizer / feature builders shared by the train tests (library code in merv.train.tiny)."""

from __future__ import annotations

import torch

from merv.train.specs import FeatureSpec
from merv.train.tiny import (  # noqa: F401  (re-exported)
    build_tiny_llm,
    build_tiny_merv,
    build_tiny_tokenizer,
    tiny_corpus,
    tiny_feature_specs,
)

CONVERSATION = [
    {"from": "human", "value": "<video>\nWhat is happening in this video?"},
    {"from": "gpt", "value": "a dog is running in a park."},
    {"from": "human", "value": "Who is in the video?"},
    {"from": "gpt", "value": "a dog."},
]


def random_features(specs: list[FeatureSpec], batch: int, seed: int = 0, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """Cached-feature stand-ins: float16 (B, t, h, w, d) per encoder, as the store serves them."""
    g = torch.Generator().manual_seed(seed)
    return {s.name: torch.randn(batch, *s.grid, s.dim, generator=g).to(dtype) for s in specs}


def pad_right(rows: list[torch.Tensor], value: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad 1-D id tensors -> (ids (B, T), attention mask (B, T))."""
    n = max(len(r) for r in rows)
    ids = torch.full((len(rows), n), value, dtype=torch.long)
    mask = torch.zeros((len(rows), n), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
        mask[i, : len(r)] = 1
    return ids, mask
