"""Spatial pooling of cached grids, shared by extraction (pool before caching) and the reader
(pool a native-grid cache to the training grid at load time).

Uses torch's adaptive average pooling, the same operation as the paper's pre-fusion projector,
so a pooled cache and pooling at load time give the same numbers up to float16 rounding.
torch is imported on first use: opening, inspecting or locking a store does not pay for it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

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
