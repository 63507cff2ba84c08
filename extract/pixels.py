"""Resize at decode: what a decode task ships to the encoder actors for each encoder.

A decoded clip is full resolution (a 4K frame is 25 MB of uint8), but every encoder first resizes
it to about 224 px. Shipping full frames through Ray's object store made a 4K sample cost ~760 MB
in flight; shipping each encoder's resized pixels makes it cost what a 224 px source does. The
decode task runs the resolution-dependent half of each encoder's own preprocessing
(`preprocess.resize_frames`, the same code the encoder runs) and the actor runs the rest
(`preprocess.finish_pixels`), so features are bitwise unchanged (tested).

Per encoder the smaller of two forms is shipped: the resized pixels (uint8 for the PIL
pipelines, which re-quantise after resizing; float32 for LanguageBind, which normalises first),
or the encoder's subsampled uint8 frames when those are smaller (a 640x272 source is smaller as
uint8 than LanguageBind's float32 224x224 crop); the actor then preprocesses them as before. When
the decoded clip itself is smaller than all of that, it is shipped once for every encoder, so a
sample never costs more than it did with full frames.
This module imports only numpy and torch (`preprocess`): decode workers never load timm or
transformers.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

if TYPE_CHECKING:
    from .preprocess import Preprocessing

RESIZE_AT = ("decode", "encoder")  # where frames are resized: the decode task (default) or the encoder actor


@dataclass(frozen=True)
class EncoderPixels:
    """What a decode task needs to know of one encoder to make its input."""

    frames: int  # the encoder's frame count (subsampled from the decoded clip)
    framewise: bool
    preprocessing: Preprocessing


@dataclass(frozen=True)
class DecodePlan:
    """How every sample of a job is decoded: frame count, and per encoder the pixels to ship
    (empty `encoders`: ship the decoded frames; the actors resize, as with `resize_at="encoder"`)."""

    frames: int
    encoders: dict[str, EncoderPixels] = field(default_factory=dict)

    @classmethod
    def for_encoders(cls, frames: int, infos: dict[str, Any], resize_at: str = RESIZE_AT[0]) -> DecodePlan:
        """From `EncoderInfo`s by name; `resize_at` "encoder" keeps today's full-frame shipping."""
        if resize_at not in RESIZE_AT:
            raise ValueError(f"resize_at {resize_at!r}: use one of {', '.join(RESIZE_AT)}")
        if resize_at == "encoder":
            return cls(frames)
        return cls(frames, {n: EncoderPixels(i.frames, i.framewise, i.preprocessing) for n, i in infos.items()})


@dataclass
class EncoderInput:
    """One encoder's input for one sample, as made by the decode task.

    `stage` "resized": `resize_frames` output (1, n, 3, h, w) for `finish_pixels`; "frames": uint8
    frames (T, H, W, 3), the decoded clip or its subsample to n, which the actor subsamples to the
    encoder's n frames (a no-op when T == n) and preprocesses whole."""

    stage: Literal["resized", "frames"]
    array: np.ndarray
    frames: int
    preprocessing: Preprocessing

    @property
    def nbytes(self) -> int:
        return int(self.array.nbytes)


def prepare_inputs(frames: np.ndarray, is_image: bool, plan: DecodePlan) -> dict[str, EncoderInput]:
    """Every planned encoder's input from one decoded clip (uint8 (T, H, W, 3)), the cheaper of:

    - per encoder, its resized pixels or its subsampled frames, whichever is smaller; encoders whose
      resize gives the same pixels (DINOv2 and SigLIP: both PIL bicubic to 224, only their
      normalisation differs, which the actor applies) share one array, as do equal subsamples;
    - the decoded clip itself, shared by all (a 640x272 clip is smaller than four encoders' crops).

    Sizes are known from shapes, so only what is shipped is resized. Shared arrays are one object:
    Ray pickles them once, and `shipped_bytes` counts them once."""
    from merv.store.grid import frames_to_encode

    from .preprocess import resized_frame_bytes
    from .video import subsample

    _, h, w, _ = frames.shape
    choice: dict[str, tuple[str, int, Preprocessing]] = {}
    cost: dict[tuple[Any, ...], int] = {}  # each distinct array once
    for name, enc in plan.encoders.items():
        n = frames_to_encode(enc.frames, enc.framewise, is_image)
        resized = n * resized_frame_bytes(enc.preprocessing)
        if resized <= n * h * w * 3:
            choice[name] = ("resized", n, enc.preprocessing)
            cost[("resized", n, _resize_key(enc.preprocessing))] = resized
        else:
            choice[name] = ("frames", n, enc.preprocessing)
            cost[("frames", n)] = n * h * w * 3
    if sum(cost.values()) > frames.nbytes:  # the clip, shared, is cheaper: the actors resize
        return {name: EncoderInput("frames", frames, n, spec) for name, (_, n, spec) in choice.items()}
    arrays: dict[tuple[Any, ...], np.ndarray] = {}
    out: dict[str, EncoderInput] = {}
    for name, (stage, n, spec) in choice.items():
        if ("frames", n) not in arrays:
            arrays[("frames", n)] = np.ascontiguousarray(subsample(frames, n))
        key: tuple[Any, ...] = ("resized", n, _resize_key(spec)) if stage == "resized" else ("frames", n)
        if key not in arrays:
            try:
                arrays[key] = _resize(arrays[("frames", n)], spec)
            except ValueError:  # e.g. a frame too small to crop: the encoder reports it for this sample
                stage, key = "frames", ("frames", n)
        out[name] = EncoderInput(stage, arrays[key], n, spec)  # type: ignore[arg-type]
    return out


def _resize_key(spec: Preprocessing) -> Preprocessing:
    """What `resize_frames`' output depends on: not the normalisation of resize-then-normalise
    pipelines (applied by `finish_pixels` in the actor), nor the documentation field."""
    if spec.order == "resize_then_normalize":
        return replace(spec, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), reference="")
    return replace(spec, reference="")


def _resize(frames: np.ndarray, spec: Preprocessing) -> np.ndarray:
    import torch

    from .preprocess import resize_frames

    with torch.inference_mode():
        return resize_frames(torch.from_numpy(frames)[None], spec).numpy()


def shipped_bytes(payload: np.ndarray | dict[str, EncoderInput] | None) -> int:
    """Bytes a decode task's payload puts in the object store (shared arrays counted once)."""
    if payload is None:
        return 0
    if isinstance(payload, np.ndarray):
        return int(payload.nbytes)
    arrays = {id(x.array): x.array for x in payload.values()}
    return sum(int(a.nbytes) for a in arrays.values())
