"""Shape metadata of one cached encoder, as the training side needs it.

`train` must not import `merv.extract`, so the connector is built from this small record, which can
be filled from a store group (`FeatureSpec.from_group_spec`) or written by hand (recipes, tests).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class FeatureSpec:
    """One encoder's cached features: `(t, h, w, dim)` per sample.

    `has_cls` marks a cache that holds only the CLS token of each frame (grid `(t, 1, 1)`), the
    input of the "class token" projector-free baseline. Patch caches never include CLS.
    """

    name: str
    grid: tuple[int, int, int]
    dim: int
    has_cls: bool = False

    def __post_init__(self) -> None:
        grid = tuple(int(v) for v in self.grid)
        object.__setattr__(self, "grid", grid)
        if len(grid) != 3 or min(grid) < 1 or int(self.dim) < 1:
            raise ValueError(f"FeatureSpec {self.name!r}: grid must be (t, h, w) >= 1 and dim >= 1, got {self.grid}, {self.dim}")
        if self.has_cls and grid[1:] != (1, 1):
            raise ValueError(f"FeatureSpec {self.name!r}: a CLS-token cache has grid (t, 1, 1), got {grid}")

    @property
    def frames(self) -> int:
        return self.grid[0]

    @property
    def tokens(self) -> int:
        """Cached tokens per sample (t * h * w)."""
        t, h, w = self.grid
        return t * h * w

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["grid"] = list(self.grid)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FeatureSpec:
        return cls(name=d["name"], grid=tuple(d["grid"]), dim=int(d["dim"]), has_cls=bool(d.get("has_cls", False)))

    @classmethod
    def from_group_spec(cls, spec: Any, name: str | None = None) -> FeatureSpec:
        """From a `merv.store.EncoderGroupSpec` (duck-typed: `.name`, `.grid`, `.dim`, `.info`).

        A group whose `info` says `"token": "cls"` (or `"cls": true`) is a CLS-token cache.
        """
        info = getattr(spec, "info", None) or {}
        has_cls = bool(info.get("cls", False)) or info.get("token") == "cls"
        return cls(name=name or spec.name, grid=tuple(spec.grid), dim=int(spec.dim), has_cls=has_cls)
