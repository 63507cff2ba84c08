"""`merv store info` and `merv store verify`: what a store holds, and whether every byte is sound."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from zarr.core.sync import sync

from . import shard_reader
from .codecs import describe
from .errors import ChunkChecksumError
from .group import EncoderGroup, commit_key
from .schema import KINDS, CommitRecord
from .store import FeatureStore


def _bytes_under(store: FeatureStore, prefix: str) -> int:
    zstore = store.root.store_path.store
    base = store.root.store_path.path.strip("/")
    full = f"{base}/{prefix}" if base else prefix
    return int(sync(zstore.getsize_prefix(full)))


def group_status(group: EncoderGroup, kind: str) -> dict[str, int]:
    """Sample counts: committed (readable), failed, pending (not yet committed)."""
    rows = group.rows(kind)
    commits = group.commits(kind)
    covered = sum(r.count for r in commits.values())
    failed = sum(len(r.failed) for r in commits.values())
    return {"rows": rows, "committed": covered - failed, "failed": failed, "pending": rows - covered,
            "shards": group.num_shards(kind), "shards_committed": len(commits)}


def store_info(store: FeatureStore) -> dict[str, Any]:
    out: dict[str, Any] = store.info()
    groups = []
    for key in store.encoder_keys():
        group = store.group(key)
        spec = group.spec
        status = {k: group_status(group, k) for k in KINDS}
        on_disk = _bytes_under(store, key)
        per_kind = {}
        for kind in KINDS:
            kind_bytes = _bytes_under(store, f"{key}/{kind}")
            if spec.encoding == "int8":
                kind_bytes += _bytes_under(store, f"{key}/{kind}_scales")
            done = status[kind]["committed"] + status[kind]["failed"]
            per_kind[kind] = (kind_bytes / done) if done else None
        groups.append({
            "key": key,
            "name": spec.name,
            "fingerprint": spec.fingerprint,
            "group_fingerprint": spec.group_fingerprint(),
            "grid": list(spec.grid),
            "dim": spec.dim,
            "framewise": spec.framewise,
            "encoding": spec.encoding + (f"(keepbits={spec.bitround_keepbits})" if spec.encoding == "bitround" else ""),
            "dtype": str(group.array("video").dtype),
            "codecs": dict(zip(("values", "scales"), map(describe, _arrays(group, "video")))),  # images: the same
            "stored_shape": {k: list(spec.stored_shape(k)) for k in KINDS},
            "status": status,
            "bytes_on_disk": on_disk,
            "bytes_per_sample": per_kind,
            "info": spec.info,
        })
    out["encoders"] = groups
    return out


@dataclass
class Problem:
    group: str
    kind: str
    shard: int
    message: str
    samples: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        who = f" samples: {', '.join(self.samples)}" if self.samples else ""
        return f"{self.group} {self.kind} shard {self.shard}: {self.message}{who}"


@dataclass
class VerifyReport:
    shards_checked: int = 0
    samples_checked: int = 0
    problems: list[Problem] = field(default_factory=list)
    uncommitted_shards: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


def _arrays(group: EncoderGroup, kind: str) -> list[Any]:
    return [group.array(kind)] + ([group.scales(kind)] if group.spec.encoding == "int8" else [])


def _read_all(group: EncoderGroup, kind: str, rows: range) -> None:
    for arr in _arrays(group, kind):
        arr[rows.start : rows.stop]


def _ids(table: Any, kind: str, rows: list[int]) -> list[str]:
    return [table.ids[int(i)] for i in table.indices_of_rows(kind, np.array(rows, dtype=np.int64))]


def _absent_rows(group: EncoderGroup, kind: str, shard: int, rows: range, failed: set[int]) -> tuple[list[int], list[str], bool]:
    """(committed rows without stored data, what is missing, whether any row is stored at all).

    Failed rows need no data: a shard whose every sample failed may have no object (stores
    written before zarr's write_empty_chunks was applied on every open dropped all-zero chunks)."""
    absent: set[int] = set()
    notes: list[str] = []
    any_stored = False
    for arr in _arrays(group, kind):
        stored = sync(shard_reader.stored_rows(arr, shard))
        gone = [row for row in rows if stored is None or not stored[row - rows.start]]
        any_stored = any_stored or len(gone) < len(rows)
        needed = [row for row in gone if row not in failed]
        if needed:
            absent.update(needed)
            notes.append(f"its data object {shard_reader.shard_object_name(arr, shard)!r} is missing" if stored is None else
                         f"{len(needed)} committed chunk(s) are missing from {shard_reader.shard_object_name(arr, shard)!r}")
    return sorted(absent), notes, any_stored


def _check_shard(group: EncoderGroup, kind: str, shard: int, rec: CommitRecord, table: Any) -> Problem | None:
    """The problem of one committed shard, or None: every non-failed row stored and checksummed."""
    rows = group.shard_range(kind, shard)
    failed = {int(r) for r in rec.failed}
    try:
        missing, notes, any_stored = _absent_rows(group, kind, shard, rows, failed)
    except ChunkChecksumError as exc:
        return Problem(group.key, kind, shard, f"corrupt shard index ({exc.problem})", _ids(table, kind, list(rows)))
    if missing:
        return Problem(group.key, kind, shard, f"committed but {'; '.join(notes)}", _ids(table, kind, missing))
    if not any_stored:
        return None  # every sample failed and nothing was stored: nothing to checksum
    try:
        _read_all(group, kind, rows)
    except Exception as exc:  # noqa: BLE001 - any decode failure is corruption to report
        bad = []
        for row in rows:
            try:
                _read_all(group, kind, range(row, row + 1))
            except Exception:  # noqa: BLE001
                bad.append(row)
        return Problem(group.key, kind, shard, f"corrupt data ({type(exc).__name__}: {exc})", _ids(table, kind, bad))
    return None


def verify_store(store: FeatureStore, progress: Callable[[int, int], None] | None = None) -> VerifyReport:
    """Re-read and checksum every committed chunk; name each corrupt or missing shard and sample.

    A committed shard is sound when every row not recorded as failed has stored data that passes
    its checksums; a shard whose samples all failed is sound with or without stored zeros."""
    report = VerifyReport()
    table = store.samples
    if len(set(table.ids)) != len(table.ids):
        report.problems.append(Problem("samples", "-", -1, "duplicate ids in the sample table"))
    jobs = [(store.group(key), kind) for key in store.encoder_keys() for kind in KINDS]
    total = sum(g.num_shards(k) for g, k in jobs)
    done = 0
    for group, kind in jobs:
        commits = group.commits(kind)
        for shard in range(group.num_shards(kind)):
            done += 1
            if progress:
                progress(done, total)
            if shard not in commits:
                raw = group.kv.get(commit_key(kind, shard))
                if raw is not None:
                    try:
                        CommitRecord.from_bytes(raw)
                    except (ValueError, TypeError, KeyError):
                        report.problems.append(Problem(group.key, kind, shard, "commit record is unreadable (corrupt)"))
                        continue
                report.uncommitted_shards += 1
                continue
            report.shards_checked += 1
            report.samples_checked += len(group.shard_range(kind, shard))
            problem = _check_shard(group, kind, shard, commits[shard], table)
            if problem is not None:
                report.problems.append(problem)
    return report
