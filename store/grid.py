"""Extraction's per-encoder rules, shared by the extraction worker, the reader and the online path:
which frames an encoder sees, how an image's single stored frame is broadcast, and the spatial
pooling of cached grids (pool before caching, or a native-grid cache at load time).

Uses torch's adaptive average pooling, the same operation as the paper's pre-fusion projector,
so a pooled cache and pooling at load time give the same numbers up to float16 rounding.
torch is imported on first use: opening, inspecting or locking a store does not pay for it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch


def pool_grid_torch(x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """(..., t, h, w, d) -> (..., t, H, W, d) by adaptive average pooling, computed in float32."""
    import torch.nn.functional as F

    *lead, t, h, w, d = x.shape
    if (h, w) == tuple(hw):
        return x
    y = x.reshape(-1, h, w, d).permute(0, 3, 1, 2).float()
    y = F.adaptive_avg_pool2d(y, hw)
    return y.permute(0, 2, 3, 1).reshape(*lead, t, hw[0], hw[1], d).to(x.dtype)


def pool_grid(x: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Numpy front of `pool_grid_torch`; keeps the input dtype."""
    import torch

    if tuple(x.shape[-3:-1]) == tuple(hw):
        return x
    out = pool_grid_torch(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), hw)
    return out.numpy().astype(x.dtype)


def frames_to_encode(encoder_frames: int, framewise: bool, is_image: bool) -> int:
    """Frames an encoder is given for one sample: its own count (uniformly subsampled from the
    decoded clip), except an image for a frame-wise encoder, which is encoded once and stored as
    one frame (identical frames would give identical outputs: 16x the work and bytes for nothing)."""
    return 1 if (is_image and framewise) else int(encoder_frames)


def broadcast_frames(x: Any, t: int, axis: int = 0) -> Any:
    """An image's single stored frame repeated to `t` frames along `axis` (numpy or torch; a view
    where the library allows). Anything that already has `t` frames is returned as it is."""
    if x.shape[axis] == t:
        return x
    if x.shape[axis] != 1:
        raise ValueError(f"cannot broadcast {x.shape[axis]} frames to {t}")
    if isinstance(x, np.ndarray):
        return np.repeat(x, t, axis=axis)
    shape = list(x.shape)
    shape[axis] = t
    return x.expand(*shape)
