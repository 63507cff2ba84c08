"""`import timm` without its optional wandb import.

timm's `timm.utils.summary` imports wandb whenever it is installed, for a logging helper merv never
calls. wandb costs about 1.7 s of CPU per process (measured here: driver, every Ray encoder actor,
every test process), which on a 2-core machine is time taken from the work itself. Every merv
module imports timm through this one, so timm is always loaded without it; merv's own tracking
(`merv.train.tracking`) imports wandb later, normally, when a run asks for it.
"""

from __future__ import annotations

import sys


def _import_timm():
    hide = "wandb" not in sys.modules
    if hide:
        sys.modules["wandb"] = None  # type: ignore[assignment]  # `import wandb` raises ImportError meanwhile
    try:
        import timm
        import timm.models
    finally:
        if hide and sys.modules.get("wandb", 0) is None:
            del sys.modules["wandb"]
    return timm


timm = _import_timm()

__all__ = ["timm"]
