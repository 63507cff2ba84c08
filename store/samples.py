"""The sample table: which ids a store holds, of which kind, from which source."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from .schema import KIND_CODES, KINDS


@dataclass(frozen=True)
class SampleRecord:
    """One input of the store. `id` joins with the instruction data; the window is optional."""

    id: str
    source: str
    kind: str = "video"
    start: float | None = None  # seconds
    end: float | None = None  # seconds
    end_frame: int | None = None  # last frame to use (Perception Test style annotations)

    def __post_init__(self) -> None:
        if not self.id:
            raise ValueError(f"sample from {self.source!r} has an empty id")
        if self.kind not in KIND_CODES:
            raise ValueError(f"sample {self.id!r}: kind must be one of {', '.join(KINDS)}, got {self.kind!r}")

    def window(self) -> dict[str, Any]:
        return {"start": self.start, "end": self.end, "end_frame": self.end_frame}


class SampleTable:
    """In-memory view of the `samples/` arrays with an id -> index map."""

    def __init__(
        self,
        ids: np.ndarray,
        kinds: np.ndarray,
        sources: np.ndarray,
        rows: np.ndarray,
        starts: np.ndarray,
        ends: np.ndarray,
        end_frames: np.ndarray,
    ) -> None:
        self.ids = [str(i) for i in ids]
        self.kinds = np.asarray(kinds, dtype=np.uint8)
        self.sources = [str(s) for s in sources]
        self.rows = np.asarray(rows, dtype=np.int64)
        self.starts = np.asarray(starts, dtype=np.float64)
        self.ends = np.asarray(ends, dtype=np.float64)
        self.end_frames = np.asarray(end_frames, dtype=np.int64)
        self.index = {sid: i for i, sid in enumerate(self.ids)}
        self._by_row: dict[str, np.ndarray] = {}
        for kind, code in KIND_CODES.items():
            members = np.nonzero(self.kinds == code)[0]
            order = np.empty(len(members), dtype=np.int64)
            order[self.rows[members]] = members
            self._by_row[kind] = order

    def __len__(self) -> int:
        return len(self.ids)

    def kind_of(self, index: int) -> str:
        return KINDS[int(self.kinds[index])]

    def count(self, kind: str) -> int:
        return len(self._by_row[kind])

    def indices_of_rows(self, kind: str, rows: np.ndarray | range) -> np.ndarray:
        """Sample-table indices of the given rows of one kind's feature arrays."""
        return self._by_row[kind][np.asarray(rows, dtype=np.int64)]

    def record(self, index: int) -> SampleRecord:
        def opt_float(v: float) -> float | None:
            return None if math.isnan(v) else float(v)

        ef = int(self.end_frames[index])
        return SampleRecord(
            id=self.ids[index],
            source=self.sources[index],
            kind=self.kind_of(index),
            start=opt_float(self.starts[index]),
            end=opt_float(self.ends[index]),
            end_frame=None if ef < 0 else ef,
        )

    @staticmethod
    def columns(records: list[SampleRecord], first_rows: dict[str, int]) -> dict[str, np.ndarray]:
        """Column arrays for new records; rows continue each kind's numbering."""
        next_row = dict(first_rows)
        rows = []
        for r in records:
            rows.append(next_row[r.kind])
            next_row[r.kind] += 1
        return {
            "id": np.array([r.id for r in records], dtype=object),
            "kind": np.array([KIND_CODES[r.kind] for r in records], dtype=np.uint8),
            "source": np.array([r.source for r in records], dtype=object),
            "row": np.array(rows, dtype=np.int64),
            "start": np.array([np.nan if r.start is None else r.start for r in records], dtype=np.float64),
            "end": np.array([np.nan if r.end is None else r.end for r in records], dtype=np.float64),
            "end_frame": np.array([-1 if r.end_frame is None else r.end_frame for r in records], dtype=np.int64),
        }
