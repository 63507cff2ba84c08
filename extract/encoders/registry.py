"""Encoder registry: one name -> one builder, with the same arguments for every encoder.

Besides the named entries, two generic specs build any model of a library (see
`merv.store.encoder_names` for the syntax and canonical form): `timm:<arch>.<tag>` (`generic_timm`)
and `hf:<repo id | dir>` (`generic_hf`), each with `?layer=N&frames=N`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from merv.store.encoder_names import SPEC_SYNTAX, EncoderNameError, canonical_encoder_name, is_generic, parse_generic
from merv.store.paper import PAPER_ENCODER_NAMES
from merv.store.paper import PAPER_ENCODERS as PAPER

from .base import FrozenEncoder
from .hiera import FRAMES as HIERA_FRAMES
from .hiera import MODEL_ID as HIERA_ID
from .hiera import build_hiera
from .languagebind import build_languagebind
from .timm_vit import DINOV2, SIGLIP, build_timm_encoder
from .vivit import build_vivit

SIZES = ("paper", "small", "tiny")


@dataclass(frozen=True)
class EncoderEntry:
    name: str
    model_id: str
    frames: int  # frames the paper feeds this encoder per sample
    build: Callable[..., FrozenEncoder]
    summary: str


_SUMMARIES = {  # model ids and frame counts come from the one table, merv.store.paper
    "dinov2": (partial(build_timm_encoder, DINOV2),
               "spatial expert; per frame; penultimate block; patch tokens (16x16, d=1024)"),
    "siglip": (partial(build_timm_encoder, SIGLIP),
               "image-language expert; per frame; penultimate block (14x14, d=768)"),
    "vivit": (build_vivit, "temporal expert; 32 frames -> 16 tubelets; last hidden state without CLS (16x14x14, d=768)"),
    "languagebind": (build_languagebind,
                     "video-language expert; 2 x 8-frame clips; penultimate layer without CLS (16x16x16, d=1024)"),
}
ENCODERS: dict[str, EncoderEntry] = {
    name: EncoderEntry(name, PAPER[name].model_id, PAPER[name].frames, *_SUMMARIES[name]) for name in PAPER_ENCODER_NAMES
}
# Beyond the paper's four: encoders the reference also supports.
ENCODERS["hiera"] = EncoderEntry("hiera", HIERA_ID, HIERA_FRAMES, build_hiera,
                                 "video expert (reference `hiera-base-video`); 16 frames; last stage (8x7x7, d=768)")
PAPER_ENCODERS = PAPER_ENCODER_NAMES  # the reference's order


def build_encoder(
    name: str,
    size: str = "paper",
    weights: str | Path | None = None,
    device: str | torch.device = "cpu",
    allow_download: bool = False,
    meta: bool = False,
    seed: int = 0,
) -> FrozenEncoder:
    """Build a frozen encoder by registry name or generic spec (`timm:<arch>.<tag>`, `hf:<repo | dir>`).

    size: "paper" (the published architecture), "small" (same classes, inputs and token grids as the
        paper, widths / depths cut ~8x / 4x: CPU benchmarks) or "tiny" (4x4 grids, widths 32: tests).
    weights: None -> paper: the HF cache (offline), small / tiny: random init with `seed`;
        a file or directory -> load it; "random" -> random init with `seed` at any size.
    allow_download: let a paper build fetch missing weights from the hub (never when
        HF_HUB_OFFLINE is set). Without it a missing checkpoint raises `WeightsNotFoundError`.
    meta: build on the meta device (no weights, no memory) to learn shapes, parameter counts and
        the fingerprint of the paper configuration.
    """
    name = check_encoder_name(name)
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, not {size!r}")
    kwargs = dict(size=size, weights=weights, device=device, allow_download=allow_download, meta=meta, seed=seed)
    if is_generic(name):
        spec = parse_generic(name)
        if spec.kind == "timm":
            from .generic_timm import build_timm_generic

            return build_timm_generic(spec, **kwargs)  # type: ignore[arg-type]
        from .generic_hf import build_hf_generic

        return build_hf_generic(spec, **kwargs)  # type: ignore[arg-type]
    return ENCODERS[name].build(**kwargs)


def check_encoder_name(name: str) -> str:
    """The canonical name of a registry entry or generic spec; UnknownEncoderNameError otherwise
    (syntax only: whether timm / the HF repo has the model is checked when it is built)."""
    canonical = canonical_encoder_name(name)
    if canonical not in ENCODERS and not is_generic(canonical):
        raise UnknownEncoderNameError(f"unknown encoder {name!r}; known: {', '.join(ENCODERS)}, or {SPEC_SYNTAX}")
    return canonical


class UnknownEncoderNameError(EncoderNameError, KeyError):
    """Neither a registry name nor a generic spec."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])
