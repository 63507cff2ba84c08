"""The one error type of evaluation (its own module so every other module can raise it)."""

from __future__ import annotations

from merv import MervError


class EvalError(MervError, ValueError):
    """A benchmark, store or result set that cannot be evaluated as asked; the message says why."""
