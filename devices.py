"""The one rule that turns a user's `--device` into a torch device, for every command.

"auto" means this process's GPU when CUDA is available, else the CPU; "cuda" means this
process's GPU under torchrun (LOCAL_RANK), so extraction actors, trainer ranks and evaluation
ranks resolve the same string the same way.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def local_rank() -> int:
    """torchrun's LOCAL_RANK, 0 outside a launcher."""
    return int(os.environ.get("LOCAL_RANK") or 0)


def resolve_device(device: "str | torch.device" = "auto", rank: int | None = None) -> "torch.device":
    """A torch device for `device` ("auto", "cpu", "cuda", "cuda:1", "mps", ...); `rank` picks the GPU for a bare "cuda"."""
    import torch

    if isinstance(device, torch.device):
        return device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        return torch.device("cuda", local_rank() if rank is None else rank)
    return torch.device(device)
