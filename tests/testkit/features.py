"""What an encoder returns when called directly, for comparing with what extraction stored."""

from __future__ import annotations

import numpy as np

from merv.extract.encoders import FrozenEncoder
from merv.extract.plan import PAPER_DECODE_FRAMES
from merv.extract.video import load_clip, subsample
from merv.store.grid import pool_grid_torch


def direct_features(path: str, encoder: FrozenEncoder, grid: tuple[int, int], *, start: float | None = None,
                    end: float | None = None, end_frame: int | None = None) -> np.ndarray:
    """Decode at extraction's frame count, subsample to the encoder's frames (an image is encoded
    once by a frame-wise encoder), encode, pool to `grid`, float16: extraction's steps, one call each."""
    clip = load_clip(path, PAPER_DECODE_FRAMES, start=start, end=end, end_frame=end_frame)
    n = 1 if (clip.is_image and encoder.info.framewise) else encoder.info.frames
    feats = encoder.encode(subsample(clip.frames, n)[None])[0]
    return pool_grid_torch(feats, grid).numpy().astype(np.float16)
