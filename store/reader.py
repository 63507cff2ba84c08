"""Reading committed features: random access (id, index, batch) and shard streaming.

A sample is returned only when every selected encoder group has a valid commit record covering
it and it is not recorded as failed there; everything else is invisible as data. What such a
sample returns is its stored data or an error: a committed row whose shard object or chunk is
gone raises MissingShardDataError (never zeros), a corrupt one ChunkChecksumError, both naming
the store, encoder group, kind, shard and sample ids.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from zarr.core.sync import sync

from .errors import SampleNotFoundError, SampleUnavailableError, StoreDataError
from .grid import broadcast_frames, pool_grid
from .group import EncoderGroup
from .schema import KINDS, CommitRecord
from .store import FeatureStore


@dataclass
class ShardBatch:
    """The available samples of one shard: ids, sample-table indices, features per encoder name."""

    kind: str
    shard: int
    ids: list[str]
    indices: np.ndarray
    features: dict[str, Any]


class FeatureReader:
    """Reads features of a chosen encoder subset from a store.

    encoders: names (`dinov2`) or full keys (`dinov2-1a2b...`); None means every group.
    pool_to: (h, w) to pool a native-grid cache to at load time; None keeps the stored grid.
    as_torch: return torch tensors instead of numpy arrays.
    Output arrays are float16, shaped (t, h, w, d) per sample; images of frame-wise encoders are
    broadcast from their single stored frame to t frames.
    """

    def __init__(
        self,
        store: FeatureStore | str,
        encoders: Sequence[str] | None = None,
        *,
        fingerprints: dict[str, str] | None = None,
        pool_to: tuple[int, int] | None = None,
        as_torch: bool = False,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        self.store = store if isinstance(store, FeatureStore) else FeatureStore.open(store, storage_options=storage_options)
        names = list(encoders) if encoders is not None else self.store.encoder_keys()
        fps = fingerprints or {}
        self.groups: dict[str, EncoderGroup] = {}
        for name in names:
            group = self.store.resolve(name, fps.get(name))
            if group.name in self.groups:
                raise ValueError(f"encoder {group.name!r} selected twice ({self.groups[group.name].key}, {group.key})")
            self.groups[group.name] = group
        self.pool_to = tuple(pool_to) if pool_to else None
        self.as_torch = as_torch
        self.table = self.store.samples
        self._commits: dict[tuple[str, str], dict[int, CommitRecord]] = {}

    # ------------------------------------------------------------------ availability
    def commits(self, name: str, kind: str) -> dict[int, CommitRecord]:
        if (name, kind) not in self._commits:
            self._commits[(name, kind)] = self.groups[name].commits(kind)
        return self._commits[(name, kind)]

    def refresh(self) -> None:
        """Re-read commit records (a reader opened during extraction sees new shards)."""
        self._commits.clear()

    def state(self, index: int) -> tuple[str, str | None, str | None]:
        """("ok" | "pending" | "failed", encoder at fault, failure reason) of a sample."""
        kind = self.table.kind_of(index)
        row = int(self.table.rows[index])
        for name, group in self.groups.items():
            shard = row // group.samples_per_shard[kind]
            rec = self.commits(name, kind).get(shard)
            if rec is None:
                return "pending", name, None
            reason = rec.failed.get(str(row))
            if reason is not None:
                return "failed", name, reason
        return "ok", None, None

    def available_indices(self, kind: str | None = None) -> np.ndarray:
        """Sample-table indices of every sample readable with all selected encoders."""
        out = []
        for k in (kind,) if kind else KINDS:
            for shard in self.committed_shards(k):
                out.append(self._shard_available(k, shard)[0])
        return np.sort(np.concatenate(out)) if out else np.zeros(0, dtype=np.int64)

    @property
    def ids(self) -> list[str]:
        return [self.table.ids[i] for i in self.available_indices()]

    def committed_shards(self, kind: str) -> list[int]:
        """Shards committed in every selected group."""
        sets = [set(self.commits(name, kind)) for name in self.groups]
        return sorted(set.intersection(*sets)) if sets else []

    def _shard_available(self, kind: str, shard: int) -> tuple[np.ndarray, np.ndarray]:
        """(sample indices, local row offsets) of the readable samples of a shard."""
        per = self.store.meta.samples_per_shard[kind]
        start = shard * per
        count = min(per, self.table.count(kind) - start)
        keep = np.ones(count, dtype=bool)
        for name in self.groups:
            rec = self.commits(name, kind)[shard]
            for row in rec.failed:
                keep[int(row) - start] = False
        local = np.nonzero(keep)[0]
        return self.table.indices_of_rows(kind, start + local), local

    # ------------------------------------------------------------------ random access
    def get(self, sample_id: str) -> dict[str, Any]:
        """Features of one sample by id: {encoder name: (t, h, w, d)}."""
        if sample_id not in self.table.index:
            raise SampleNotFoundError(self.store.url, sample_id)
        return self.get_index(self.table.index[sample_id])

    def get_index(self, index: int) -> dict[str, Any]:
        batch = self.get_batch_indices([index])
        return {name: arr[0] for name, arr in batch.items()}

    def get_batch(self, ids: Sequence[str]) -> dict[str, Any]:
        """Features of several ids: {encoder name: (B, t, h, w, d)} in the order given."""
        missing = [i for i in ids if i not in self.table.index]
        if missing:
            raise SampleNotFoundError(self.store.url, missing[0])
        return self.get_batch_indices([self.table.index[i] for i in ids])

    def get_batch_indices(self, indices: Sequence[int], out: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
        """Features of several sample-table indices: {encoder name: (B, t, h, w, d)}.

        `out`: {encoder name: C-contiguous float16 (B, t, h, w, d) array} to fill and return
        (a loader worker passes shared memory); the common batch (one kind, no pooling) is
        decoded straight into it, anything else is copied in at the end."""
        indices = [int(i) for i in indices]
        for i in indices:
            if not 0 <= i < len(self.table):
                raise IndexError(f"sample index {i} out of range (store has {len(self.table)} samples)")
            state, enc, reason = self.state(i)
            if state != "ok":
                raise SampleUnavailableError(self.table.ids[i], str(enc), state, reason)
        kinds = [self.table.kind_of(i) for i in indices]
        positions = {kind: [p for p, k in enumerate(kinds) if k == kind] for kind in KINDS}
        requests = [(name, kind) for name in self.groups for kind in KINDS if positions[kind]]
        direct = {(name, kind): self._direct_target(name, kind, len(positions[kind]) == len(indices), out)
                  for name, kind in requests}

        rows = {kind: self.table.rows[[indices[p] for p in positions[kind]]] for kind in KINDS}
        reads = [self.groups[name].fetch_rows(kind, rows[kind], must_exist=rows[kind], out=direct[(name, kind)])
                 for name, kind in requests]  # built here: opening arrays is sync, the gather is not

        async def fetch_all() -> list[Any]:  # every group and kind in one gather (see fetch_rows)
            return await asyncio.gather(*reads)

        fetched = dict(zip(requests, self._named(fetch_all())))
        result: dict[str, Any] = {}
        for name, group in self.groups.items():
            t = group.spec.grid[0]
            target = (out or {}).get(name) if self.pool_to is None else None
            merged: np.ndarray | None = None
            for kind in KINDS:
                pos = positions[kind]
                if not pos:
                    continue
                data = group.decode(*fetched[(name, kind)], out=direct[(name, kind)])
                if len(pos) == len(indices) and data.shape[1] == t:
                    merged = data  # one kind, nothing to broadcast: use the read as is
                    break
                if merged is None:
                    merged = target if target is not None else np.empty((len(indices), t, *data.shape[2:]), data.dtype)
                merged[pos] = broadcast_frames(data, t, axis=1)  # an image's single stored frame
            result[name] = self._finish(merged, None if out is None else out.get(name))  # type: ignore[arg-type]
        return result

    def _direct_target(self, name: str, kind: str, whole_batch: bool, out: dict[str, np.ndarray] | None) -> np.ndarray | None:
        """`out[name]` when the read of (name, kind) is the batch itself (one kind, all frames stored,
        no pooling): it is then decoded in place; otherwise None."""
        if out is None or name not in out or not whole_batch or self.pool_to is not None:
            return None
        group = self.groups[name]
        return out[name] if group.spec.stored_shape(kind)[0] == group.spec.grid[0] else None

    # ------------------------------------------------------------------ streaming
    def iter_shards(self, kind: str | None = None, shards: Sequence[tuple[str, int]] | None = None) -> Iterator[ShardBatch]:
        """Yield committed shards whole (one read per encoder per shard): the streaming unit.

        `shards` is an explicit order of (kind, shard) pairs (e.g. a shuffled epoch plan);
        by default every committed shard of `kind` (or of both kinds) in order.
        """
        if shards is None:
            shards = [(k, s) for k in ((kind,) if kind else KINDS) for s in self.committed_shards(k)]
        for k, shard in shards:
            yield self.read_shard(k, shard)

    def read_shard(self, kind: str, shard: int) -> ShardBatch:
        if shard not in self.committed_shards(kind):
            raise SampleUnavailableError(f"<{kind} shard {shard}>", ",".join(self.groups), "pending")
        indices, local = self._shard_available(kind, shard)
        per = self.store.meta.samples_per_shard[kind]
        start = shard * per
        stop = min(start + per, self.table.count(kind))
        feats: dict[str, Any] = {}
        for name, group in self.groups.items():
            # one whole-shard read through zarr; the rows returned must be stored (failed ones need not)
            raw = self._named(group.fetch_rows(kind, slice(start, stop), must_exist=start + local))
            data = group.decode(*raw)[local]
            feats[name] = self._finish(broadcast_frames(data, group.spec.grid[0], axis=1))
        return ShardBatch(kind, shard, [self.table.ids[i] for i in indices], indices, feats)

    # ------------------------------------------------------------------ data errors
    def _named(self, reads: Any) -> Any:
        """Run the reads; a data error leaves naming the sample ids of its rows."""
        try:
            return sync(reads)
        except StoreDataError as exc:
            raise exc.located(samples=self._ids_of_rows(exc.where.get("kind"), exc.rows) or None) from exc

    def _ids_of_rows(self, kind: str | None, rows: list[int]) -> list[str]:
        if kind not in KINDS or not rows:
            return []
        rows = [r for r in rows if 0 <= r < self.table.count(kind)]
        return [self.table.ids[int(i)] for i in self.table.indices_of_rows(kind, np.array(rows, dtype=np.int64))]

    # ------------------------------------------------------------------ helpers
    def _finish(self, x: np.ndarray, out: np.ndarray | None = None) -> Any:
        if self.pool_to is not None:
            x = pool_grid(x, self.pool_to)  # type: ignore[arg-type]
        if out is not None and x is not out:
            out[...] = x
            x = out
        if self.as_torch:
            import torch

            return torch.from_numpy(np.ascontiguousarray(x))
        return x
