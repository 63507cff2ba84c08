"""Weights & Biases as an optional experiment tracker next to TensorBoard (rank 0 only).

Enabled by `logging.wandb.mode` online / offline (default disabled; wandb is an optional extra,
`pip install 'merv[wandb]'`). A run logs the resolved run config once and, per step, the same
numbers TensorBoard gets (`train/<metric>`, against the `step` axis). The wandb run id is kept in
the run directory, so a resumed run continues the same wandb run; the steps it redoes after its
checkpoint are logged again against their step (wandb cannot delete rows; the metric axis is the
training step, not wandb's own counter, so nothing is dropped or warned about; an offline run
resumes under the same id in a new offline-run directory). Files go to
RUN/wandb unless WANDB_DIR says otherwise; `wandb sync RUN/wandb/offline-run-*` uploads an offline run.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from merv import MervError

RUN_ID_FILE = "wandb_run_id"  # in the run directory: the wandb run a resume continues
STEP_KEY = "step"  # the x-axis of every train/* metric


class WandbMissingError(MervError, ImportError):
    """logging.wandb asks for wandb, which is not installed."""


class WandbStartError(MervError, RuntimeError):
    """wandb refused to start the run (not logged in, no such entity / project, ...)."""


def require_wandb() -> Any:
    """The wandb module, or one error line saying how to install it."""
    try:
        import wandb
    except ImportError as exc:
        raise WandbMissingError("logging.wandb.mode is online / offline but wandb is not installed: pip install "
                                "'merv[wandb]' (or set logging.wandb.mode=disabled)") from exc
    return wandb


class WandbLogger:
    """One wandb run per training run directory; `log` takes what MetricsLogger writes."""

    def __init__(self, settings: Any, run_dir: str | os.PathLike[str], run_config: dict[str, Any], *,
                 resuming: bool) -> None:
        wandb = require_wandb()
        run_dir = Path(run_dir)
        id_file = run_dir / RUN_ID_FILE
        run_id = id_file.read_text().strip() if resuming and id_file.is_file() else None
        directory = os.environ.get("WANDB_DIR") or str(run_dir)
        Path(directory).mkdir(parents=True, exist_ok=True)
        try:
            with _no_sentry_deprecation():
                self.run = wandb.init(
                    project=settings.project, entity=settings.entity, mode=settings.mode,
                    tags=list(settings.tags) or None, name=settings.name or run_dir.name, config=run_config,
                    dir=directory, id=run_id, resume="allow" if run_id and settings.mode == "online" else None,
                    settings=wandb.Settings(quiet=True, console="off"))
        except wandb.errors.Error as exc:  # e.g. online without `wandb login`
            raise WandbStartError(f"wandb could not start the run ({' '.join(str(exc).split())[:300]}); log in with "
                                  "`wandb login`, or set logging.wandb.mode=offline (sync later) or disabled") from exc
        self.run.define_metric(STEP_KEY, hidden=True)
        self.run.define_metric("train/*", step_metric=STEP_KEY)
        id_file.write_text(self.run.id)

    def log(self, step: int, values: dict[str, Any]) -> None:
        scalars = {f"train/{k}": v for k, v in values.items() if isinstance(v, (int, float))}  # as TensorBoard
        with _no_sentry_deprecation():
            self.run.log({STEP_KEY: step, **scalars})

    def close(self) -> None:
        with _no_sentry_deprecation():
            self.run.finish()


@contextlib.contextmanager
def _no_sentry_deprecation() -> Iterator[None]:
    """wandb's own error reporter calls a deprecated wandb helper (wandb 0.25 `analytics/sentry.py`):
    its DeprecationWarning is wandb's business, not the user's."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Read the `app_url` setting", category=DeprecationWarning,
                                module="wandb.analytics.sentry")
        yield
