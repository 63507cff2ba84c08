"""Per-step training metrics to JSONL, TensorBoard and optionally wandb (rank 0 only).

A resumed run redoes the steps after its checkpoint: their rows from the interrupted run are dropped
first (metrics.jsonl is rewritten atomically; TensorBoard purges them), so every step has one row.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from merv.jsonl import jsonl_rows

METRICS_FILE = "metrics.jsonl"


def _row_step(line: str) -> int | None:
    """The step of a metrics row; None for a torn or foreign line (a write cut short by a kill)."""
    try:
        row = json.loads(line)
    except ValueError:
        return None
    step = row.get("step") if isinstance(row, dict) else None
    return step if isinstance(step, int) else None


def drop_rows_after(path: str | os.PathLike[str], step: int) -> int:
    """Keep only the rows of steps <= `step` (and no torn lines); returns how many rows were dropped."""
    path = Path(path)
    if not path.exists():
        return 0
    lines = path.read_text(errors="replace").splitlines()
    keep = [line for line in lines if (s := _row_step(line)) is not None and s <= step]
    if len(keep) == len(lines):
        return 0
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(f"{line}\n" for line in keep))
    os.replace(tmp, path)
    return len(lines) - len(keep)


class MetricsLogger:
    """Appends one JSON row per step; `start_step` is the step the run (re)starts after."""

    def __init__(self, out_dir: str | os.PathLike[str], enabled: bool = True, tensorboard: bool = True,
                 start_step: int = 0, wandb: Any = None, run_config: dict[str, Any] | None = None) -> None:
        """`wandb`: a `WandbConfig` (merv.train.config); when enabled, its run also gets `run_config`."""
        self.enabled = enabled
        self.path = Path(out_dir) / METRICS_FILE
        self._fh = None
        self._tb = None
        self._wandb = None
        if not enabled:
            return
        if wandb is not None and wandb.enabled:  # first: a missing wandb fails before any file is touched
            from .tracking import WandbLogger

            self._wandb = WandbLogger(wandb, out_dir, run_config or {}, resuming=start_step > 0)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        drop_rows_after(self.path, start_step)
        self._fh = self.path.open("a")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                # events of steps > start_step come from the interrupted run: hide them
                self._tb = SummaryWriter(str(Path(out_dir) / "tensorboard"), purge_step=start_step + 1)
            except ImportError:  # pragma: no cover - tensorboard is a dependency
                self._tb = None

    def log(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **values}
        assert self._fh is not None
        self._fh.write(json.dumps(record) + "\n")
        self._fh.flush()
        if self._tb is not None:
            for key, val in values.items():
                if isinstance(val, (int, float)):
                    self._tb.add_scalar(f"train/{key}", val, step)
        if self._wandb is not None:
            self._wandb.log(step, values)

    def close(self) -> None:
        if self._fh:
            self._fh.close()
            self._fh = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.close()
            self._wandb = None


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl (a torn last line from a killed run is skipped)."""
    return [row for _, row in jsonl_rows(Path(path).read_text(errors="replace"), on_broken=lambda *_: None)]
