"""What an encoder costs, measured: parameters and forward FLOPs per sample from a meta-device build.

Works for every registry name and generic spec alike (no weights are read, no memory is used):
the encoder's own `forward` runs on meta pixels of one clip under torch's FlopCounterMode, so the
count is of exactly what extraction runs (e.g. timm's `stop_early` truncation at the chosen layer).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class EncoderMeasure:
    name: str  # canonical
    grid: tuple[int, int, int]
    dim: int
    params: int
    flops: int  # forward FLOPs of one sample (`frames` input frames)


def measure_encoder(name: str, size: str = "paper") -> EncoderMeasure:
    from torch.utils.flop_counter import FlopCounterMode

    from .registry import build_encoder

    enc = build_encoder(name, size=size, meta=True)
    s = enc.info.image_size
    pixels = torch.empty(1, enc.info.frames, 3, s, s, device="meta")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        enc.forward(pixels)
    return EncoderMeasure(enc.info.name, tuple(enc.info.grid), enc.info.dim,  # type: ignore[arg-type]
                          sum(p.numel() for p in enc.parameters()), int(counter.get_total_flops()))
