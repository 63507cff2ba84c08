"""Store schema: metadata records, encodings, fingerprints and shard sizing.

Everything here is plain data (JSON in zarr attributes), so a store can be inspected with any
zarr v3 reader and nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

FORMAT_NAME = "merv-features"
FORMAT_VERSION = 1

Kind = Literal["video", "image"]
KINDS: tuple[Kind, ...] = ("video", "image")
KIND_CODES: dict[str, int] = {"video": 0, "image": 1}

Encoding = Literal["fp16", "bitround", "int8"]
ENCODINGS: tuple[str, ...] = ("fp16", "bitround", "int8")

# A shard is the unit of I/O and of atomic commit. 128 MiB keeps object-store GETs large while
# a whole shard still fits comfortably in a worker's memory.
DEFAULT_SHARD_BYTES = 128 * 2**20
MAX_SAMPLES_PER_SHARD = 4096

def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def fingerprint_of(obj: Any, length: int = 16) -> str:
    """Stable short hash of a JSON-able description of everything that changes the numbers."""
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()[:length]


def parse_grid(grid: str | tuple[int, int] | list[int] | None) -> tuple[int, int] | None:
    """`native`/None -> None; `8x8`, `64` (square token count), (8, 8) -> (8, 8)."""
    if grid is None:
        return None
    if isinstance(grid, (tuple, list)):
        h, w = (int(v) for v in grid)
        return (h, w)
    text = str(grid).strip().lower()
    if text == "native":
        return None
    if "x" in text:
        h, w = text.split("x", 1)
        return (int(h), int(w))
    tokens = int(text)
    side = int(round(tokens**0.5))
    if side * side != tokens:
        raise ValueError(f"grid {grid!r}: a token count must be a square (1, 4, 16, 64, ...); or write HxW")
    return (side, side)


def choose_samples_per_shard(bytes_per_sample: int, shard_bytes: int = DEFAULT_SHARD_BYTES) -> int:
    """Samples per shard so that one shard holds about `shard_bytes` of uncompressed features."""
    if bytes_per_sample <= 0:
        raise ValueError("bytes_per_sample must be positive")
    return int(max(1, min(MAX_SAMPLES_PER_SHARD, shard_bytes // bytes_per_sample)))


def paper_bytes_per_sample(grid: tuple[int, int] | None) -> dict[str, int]:
    """Uncompressed fp16 bytes of the largest paper encoder, for videos and images: the shard
    size when the caller gives no per-sample estimate."""
    from .paper import largest_paper_feature_bytes

    video = largest_paper_feature_bytes(grid)
    # Images keep every frame only for temporal encoders; size them like a video so that the
    # largest group still lands near the target.
    return {"video": video, "image": video}


@dataclass
class StoreMeta:
    """Root attributes of a store."""

    grid: list[int] | None  # None = native grid, else the pooled (h, w) every group was pooled to
    samples_per_shard: dict[str, int]
    created: str
    created_by: str
    format: str = FORMAT_NAME
    version: int = FORMAT_VERSION

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "StoreMeta":
        """Raises ValueError / TypeError / KeyError for attributes a reader could not use."""
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        meta = cls(**known)
        grid, per = meta.grid, meta.samples_per_shard
        if grid is not None and (not isinstance(grid, list) or len(grid) != 2 or not all(isinstance(v, int) and v > 0 for v in grid)):
            raise ValueError(f"grid must be null or [h, w], got {grid!r}")
        if not isinstance(per, dict) or not all(isinstance(per.get(k), int) and per[k] > 0 for k in KINDS):
            raise ValueError(f"samples_per_shard must give a positive count for {', '.join(KINDS)}, got {per!r}")
        return meta

    @property
    def grid_mode(self) -> str:
        return "native" if self.grid is None else f"pooled {self.grid[0]}x{self.grid[1]}"


@dataclass
class EncoderGroupSpec:
    """What a writer declares when it creates an encoder group.

    `fingerprint` is the encoder's own (weights, config, frames, preprocessing, layer); the store
    folds in the stored grid and the encoding, which also change the cached numbers.
    """

    name: str
    fingerprint: str
    grid: tuple[int, int, int]  # (t, h, w) as stored for a video sample
    dim: int
    framewise: bool  # each frame encoded alone: an image stores one frame and is broadcast on read
    encoding: Encoding = "fp16"
    bitround_keepbits: int = 7
    info: dict[str, Any] = field(default_factory=dict)  # layer, preprocessing, versions, pooling...

    def __post_init__(self) -> None:
        if self.encoding not in ENCODINGS:
            raise ValueError(f"encoding {self.encoding!r} is not one of {', '.join(ENCODINGS)}")
        if not (1 <= self.bitround_keepbits <= 10):
            raise ValueError("bitround_keepbits must be in 1..10 for float16 features")
        self.grid = tuple(int(v) for v in self.grid)  # type: ignore[assignment]
        if len(self.grid) != 3 or min(self.grid) < 1 or self.dim < 1:
            raise ValueError(f"encoder {self.name!r}: grid must be (t, h, w) >= 1 and dim >= 1, got {self.grid}, {self.dim}")

    def group_fingerprint(self) -> str:
        desc = {
            "encoder": self.fingerprint,
            "grid": list(self.grid),
            "dim": self.dim,
            "framewise": self.framewise,
            "encoding": self.encoding,
            "keepbits": self.bitround_keepbits if self.encoding == "bitround" else None,
        }
        return fingerprint_of(desc, 10)

    def key(self) -> str:
        """`<name>-<group fingerprint>`; a generic spec's `/ : ? & =` become `_` (a zarr path / URL key)."""
        from .encoder_names import slug

        return f"{slug(self.name)}-{self.group_fingerprint()}"

    def stored_shape(self, kind: str) -> tuple[int, int, int, int]:
        t, h, w = self.grid
        if kind == "image" and self.framewise:
            t = 1
        return (t, h, w, self.dim)

    def bytes_per_sample(self, kind: str = "video") -> int:
        t, h, w, d = self.stored_shape(kind)
        per_value = 1 if self.encoding == "int8" else 2
        return t * h * w * d * per_value

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["grid"] = list(self.grid)
        data["group_fingerprint"] = self.group_fingerprint()
        data["key"] = self.key()
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "EncoderGroupSpec":
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)


@dataclass
class CommitRecord:
    """Written after a shard's data: its presence (and validity) is what makes the shard visible."""

    shard: int
    start: int  # first row of the shard in the kind's array
    count: int  # rows covered by this commit
    failed: dict[str, str]  # str(absolute row in the kind's array) -> reason
    worker: str = ""
    written: str = ""
    bytes: int = 0

    def to_bytes(self) -> bytes:
        return canonical_json(asdict(self)).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> "CommitRecord":
        data = json.loads(raw.decode())
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})

    def covers(self, row: int) -> bool:
        return self.start <= row < self.start + self.count
