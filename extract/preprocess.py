"""Batched tensor preprocessing that reproduces each encoder's original image pipeline.

Two pipelines occur in the MERV reference:

* timm / torchvision on PIL images (DINOv2, SigLIP, ViViT with `resize-naive`): resize the uint8
  image, `ToTensor` (x / 255), `Normalize(mean, std)`. PIL antialiases and re-quantises to uint8
  after resizing; we reproduce that with `antialias=True` + round + clamp (`quantize=True`).
  PIL's bicubic uses a = -0.5, which is what torch's antialiased bicubic uses too; results agree
  with PIL to about one grey level, not bit for bit.
* LanguageBind's video transform on float tensors: x / 255, normalise, *then* short-side scale
  with bilinear `F.interpolate` (no antialias, align_corners=False), then a center crop. This one is
  reproduced exactly. The reference also applies `RandomHorizontalFlipVideo(p=0.5)` at inference;
  that is a training augmentation left on and would make cached features random, so it is omitted
  (recorded in the spec as `hflip: "none"`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F

CHUNK_FRAMES = 16  # frames resized per call: bounds float memory on long, high-resolution clips


@dataclass(frozen=True)
class Preprocessing:
    """Everything about turning uint8 RGB frames into model pixels (part of the fingerprint)."""

    resize: Literal["exact", "shortest_side"]
    size: tuple[int, int] | int  # (h, w) for exact, the short side for shortest_side
    interpolation: Literal["bicubic", "bilinear"]
    antialias: bool
    crop: tuple[int, int]  # center crop (h, w); a no-op after an exact resize to the same size
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    order: Literal["resize_then_normalize", "normalize_then_resize"]
    quantize: bool  # round + clamp to uint8 levels after resizing (PIL pipelines)
    hflip: str = "none"
    reference: str = ""  # where the recipe comes from (documentation; not a number changer)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["size"] = list(self.size) if isinstance(self.size, tuple) else self.size
        data["crop"] = list(self.crop)
        data["mean"] = list(self.mean)
        data["std"] = list(self.std)
        return data

    def __call__(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 (B, T, H, W, 3) -> float32 (B, T, 3, crop_h, crop_w)."""
        return preprocess_frames(frames, self)


def _resized_shape(h: int, w: int, spec: Preprocessing) -> tuple[int, int]:
    if spec.resize == "exact":
        size = spec.size if isinstance(spec.size, tuple) else (spec.size, spec.size)
        return int(size[0]), int(size[1])
    short = int(spec.size if isinstance(spec.size, int) else min(spec.size))
    # LanguageBind's ShortSideScale: floor of the scaled long side.
    if w < h:
        return int(math.floor(h / w * short)), short
    return short, int(math.floor(w / h * short))


def _center_crop(x: torch.Tensor, crop: tuple[int, int]) -> torch.Tensor:
    h, w = x.shape[-2:]
    th, tw = crop
    if (h, w) == (th, tw):
        return x
    if h < th or w < tw:
        raise ValueError(f"cannot center-crop {h}x{w} to {th}x{tw}")
    top = int(round((h - th) / 2.0))  # torchvision's formula (banker's rounding included)
    left = int(round((w - tw) / 2.0))
    return x[..., top : top + th, left : left + tw]


def preprocess_frames(frames: torch.Tensor, spec: Preprocessing) -> torch.Tensor:
    """Apply `spec` to uint8 frames (B, T, H, W, 3); returns float32 (B, T, 3, h, w)."""
    return finish_pixels(resize_frames(frames, spec), spec)


def resized_frame_bytes(spec: Preprocessing) -> int:
    """Bytes of one frame of `resize_frames`' output (always the crop size, whatever the source)."""
    h, w = spec.crop
    return 3 * int(h) * int(w) * (1 if keeps_uint8(spec) else 4)


def keeps_uint8(spec: Preprocessing) -> bool:
    """The resize stage ends on uint8 levels (PIL pipelines): its output is exactly a uint8 image."""
    return spec.order == "resize_then_normalize" and spec.quantize


def resize_frames(frames: torch.Tensor, spec: Preprocessing) -> torch.Tensor:
    """The resolution-dependent half of `spec`: uint8 (B, T, H, W, 3) -> (B, T, 3, crop_h, crop_w).

    uint8 when the pipeline re-quantises after resizing (then the result is exactly what
    `preprocess_frames` normalises); float32 otherwise (LanguageBind normalises before resizing,
    so its resized pixels are already the model input). Split from `finish_pixels` so extraction's
    decode tasks can ship resized frames instead of full-resolution ones (`extract/pixels.py`):
    every operation is per pixel or per frame, so the split changes no number.
    """
    if frames.dim() != 5 or frames.shape[-1] != 3:
        raise ValueError(f"expected uint8 frames (B, T, H, W, 3), got shape {tuple(frames.shape)}")
    if frames.dtype != torch.uint8:
        raise ValueError(f"expected uint8 frames, got {frames.dtype}")
    b, t, h, w, _ = frames.shape
    flat = frames.reshape(b * t, h, w, 3).permute(0, 3, 1, 2)
    out_hw = _resized_shape(h, w, spec)
    chunks = []
    for i in range(0, flat.shape[0], CHUNK_FRAMES):
        x = flat[i : i + CHUNK_FRAMES].float()
        if spec.order == "normalize_then_resize":
            x = _resize(_normalize(x, spec), out_hw, spec)
        else:
            x = _resize(x, out_hw, spec)
            if spec.quantize:
                x = x.round().clamp_(0, 255)
        x = _center_crop(x, spec.crop)
        chunks.append(x.to(torch.uint8) if keeps_uint8(spec) else x)
    out = torch.cat(chunks) if len(chunks) > 1 else chunks[0]
    return out.reshape(b, t, 3, *out.shape[-2:]).contiguous()


def finish_pixels(x: torch.Tensor, spec: Preprocessing) -> torch.Tensor:
    """The rest of `spec` on `resize_frames`' output: float32 (B, T, 3, h, w) model pixels."""
    if spec.order == "normalize_then_resize":
        return x
    b, t = x.shape[:2]
    flat = _normalize(x.reshape(b * t, *x.shape[2:]).float(), spec)
    return flat.reshape(x.shape).contiguous()


def _normalize(x: torch.Tensor, spec: Preprocessing) -> torch.Tensor:
    mean = torch.tensor(spec.mean, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    return (x / 255.0 - mean) / std


def _resize(x: torch.Tensor, out_hw: tuple[int, int], spec: Preprocessing) -> torch.Tensor:
    if tuple(x.shape[-2:]) == out_hw:
        return x
    if x.device.type == "cpu" and spec.interpolation == "bilinear" and not spec.antialias:
        # torch's CPU bilinear kernel picks a different (differently rounding) implementation
        # for 3-channel images when the process runs ONE intra-op thread, so features would
        # depend on the extracting worker's thread count. Resizing single-channel planes
        # always takes the generic kernel: identical numbers at any thread count (and faster).
        n, c, h, w = x.shape
        planes = F.interpolate(x.reshape(n * c, 1, h, w), size=out_hw, mode="bilinear", align_corners=False)
        return planes.reshape(n, c, *out_hw)
    return F.interpolate(x, size=out_hw, mode=spec.interpolation, align_corners=False, antialias=spec.antialias)
