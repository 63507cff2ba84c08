"""Extraction planning: which encoder groups a store needs and which shards still need work.

Runs on the driver only, before any worker starts, so groups are created by one process. The
plan is derived from commit records alone, which is what makes a re-run (after a crash, a
SIGKILL, or with a new encoder) redo exactly the missing shards and nothing else.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
from dataclasses import dataclass, field
from typing import Any

from merv.store import KINDS, CommitRecord, EncoderGroupSpec, FeatureStore

# Every sample is decoded once at this many frames (the most any MERV encoder takes: ViViT's 32)
# and each encoder takes a uniform subsample, as the reference does (`video[::max // n]`).
# Fixed rather than "max of the encoders in this run", so an encoder's cached frames never depend
# on which other encoders were extracted alongside it.
PAPER_DECODE_FRAMES = 32


@dataclass(frozen=True)
class ShardJob:
    """One unit of work: a whole shard of one kind, for the groups that still miss it."""

    kind: str
    shard: int
    rows: tuple[int, int]  # [start, stop) rows of the kind's arrays
    group_keys: tuple[str, ...]
    seen: tuple[str, ...] = ()  # per group key: digest of its commit record at plan time ("" for none)

    @property
    def size(self) -> int:
        return self.rows[1] - self.rows[0]


@dataclass
class Plan:
    jobs: list[ShardJob]
    skipped_samples: int  # samples in shards committed in every requested group
    skipped_failed: dict[str, str] = field(default_factory=dict)  # sample id -> reason, failed earlier
    groups: dict[str, str] = field(default_factory=dict)  # encoder name -> group key

    @property
    def samples(self) -> int:
        return sum(job.size for job in self.jobs)


def decode_frames(frames_per_encoder: list[int]) -> int:
    return max([PAPER_DECODE_FRAMES, *frames_per_encoder])


def _versions() -> dict[str, str]:
    out = {}
    for pkg in ("torch", "timm", "transformers", "decord", "av", "merv"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def stored_grid(native: tuple[int, int], pooled: tuple[int, int] | None) -> tuple[int, int]:
    """The spatial grid a group stores: the requested one, but never more tokens than the encoder
    has (pooling 4x4 "to 8x8" would only repeat values: 4x the bytes, nothing gained)."""
    if pooled is None:
        return tuple(native)  # type: ignore[return-value]
    return (min(native[0], pooled[0]), min(native[1], pooled[1]))


def upsampling_notes(specs: list[EncoderGroupSpec], pooled: tuple[int, int] | None) -> list[str]:
    """What `stored_grid` kept below the requested grid, said to the user once (each group
    records the grid it stores)."""
    notes = []
    for spec in specs:
        kept = tuple(spec.grid[1:])
        if pooled is not None and kept != tuple(pooled):
            notes.append(f"{spec.name}: its native {kept[0]}x{kept[1]} grid is smaller than the requested "
                         f"{pooled[0]}x{pooled[1]}; stored at {kept[0]}x{kept[1]} (no upsampling)")
    return notes


def group_spec(info: Any, pooled: tuple[int, int] | None, encoding: str, frames_decoded: int) -> EncoderGroupSpec:
    """Store group spec of an encoder: its fingerprint plus the grid actually stored."""
    t, h, w = info.grid
    stored = stored_grid((h, w), pooled)
    grid = (t, *stored)
    pooling = (f"adaptive_avg_pool2d per frame to {stored[0]}x{stored[1]} in float32, then float16"
               if stored != (h, w) else "none")
    return EncoderGroupSpec(
        name=info.name,
        fingerprint=info.fingerprint(),
        grid=grid,
        dim=info.dim,
        framewise=bool(info.framewise),
        encoding=encoding,  # type: ignore[arg-type]
        info={
            "encoder": info.to_json(),
            "native_grid": [t, h, w],
            "pooling": pooling,
            "decoding": {
                "frames_decoded": frames_decoded,
                "indices": f"floor(linspace(first, last, {frames_decoded})) over the clip window, then a uniform "
                           f"subsample to {info.frames} (frames[::{max(1, frames_decoded // info.frames)}] when it divides)",
                "images": ("one frame encoded and stored once (broadcast on read)" if info.framewise
                           else f"the single frame repeated {info.frames} times"),
            },
            "versions": _versions(),
        },
    )


def record_digest(record: CommitRecord | None) -> str:
    """Identity of a commit record: a different one than planned means another run committed."""
    return "" if record is None else hashlib.sha256(record.to_bytes()).hexdigest()[:16]


def plan_shards(store: FeatureStore, group_keys: list[str], retry_failed: bool = False) -> Plan:
    """Shards that some requested group has not committed (or committed with failures, when
    retrying). A shard is redone whole, only for the groups that miss it."""
    jobs: list[ShardJob] = []
    skipped = 0
    skipped_failed: dict[str, str] = {}
    groups = [store.group(k) for k in group_keys]
    table = store.samples
    for kind in KINDS:
        if not groups:
            break
        commits = {g.key: g.commits(kind) for g in groups}
        for shard in range(groups[0].num_shards(kind)):
            rows = groups[0].shard_range(kind, shard)
            need, seen = [], []
            failed: dict[str, str] = {}
            for g in groups:
                rec = commits[g.key].get(shard)
                if rec is None or (retry_failed and rec.failed):
                    need.append(g.key)
                    seen.append(record_digest(rec))
                elif rec.failed:
                    for row, reason in rec.failed.items():
                        failed.setdefault(row, reason)
            if need:
                jobs.append(ShardJob(kind, shard, (rows.start, rows.stop), tuple(need), tuple(seen)))
                continue
            skipped += len(rows)
            for row, reason in failed.items():
                index = int(table.indices_of_rows(kind, [int(row)])[0])
                skipped_failed[table.ids[index]] = reason
    return Plan(jobs, skipped, skipped_failed, {g.name: g.key for g in groups})
