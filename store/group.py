"""One encoder configuration inside a store: feature arrays per kind plus shard commit records."""

from __future__ import annotations

import asyncio
import datetime as _dt
import os
import socket
import warnings
from collections.abc import Coroutine
from typing import Any

import numpy as np
import zarr
from zarr.codecs.numcodecs import BitRound
from zarr.core.sync import sync

from . import shard_reader
from .codecs import compressors, default_chain
from .encodings import FP16_MAX, dequantize_int8, quantize_int8
from .errors import StoreDataError, StoreMetadataError
from .kv import GroupKV
from .lease import DEFAULT_TTL_S, HeldBy, Lease, try_acquire
from .schema import KINDS, CommitRecord, EncoderGroupSpec

# BitRound is a numcodecs codec, not (yet) in the zarr v3 spec; the store records it in its
# metadata and our reader undoes it, so zarr's portability warning is noise here.
warnings.filterwarnings("ignore", message="Numcodecs codecs are not in the Zarr version 3", category=UserWarning)

# Every row of a written shard is stored, zeros included (failed rows): a shard's bytes never
# depend on its values, and an absent chunk of a committed shard can only mean damage. zarr keeps
# this setting only on the Array object it was given to, so every open applies it (`array()`).
ARRAY_CONFIG = {"write_empty_chunks": True}


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def commit_key(kind: str, shard: int) -> str:
    return f"commits/{kind}/{shard:08d}.json"


def lease_key(kind: str, shard: int) -> str:
    """The lease a writer of one shard of this group holds (see `EncoderGroup.try_lease`)."""
    return f"leases/{kind}/{shard:08d}"


def node_file(url: str, path: str) -> str:
    """The zarr.json of a node, as a user finds it: `<store url>/<path>/zarr.json`."""
    return "/".join(p for p in (url.rstrip("/"), path.strip("/"), "zarr.json") if p)


# What zarr raises on a zarr.json that is not UTF-8, not JSON, or JSON of the wrong shape.
METADATA_ERRORS = (ValueError, TypeError, KeyError, AttributeError, IndexError)


class EncoderGroup:
    """Features of one encoder configuration.

    Layout under the group: `<kind>` is a (rows, t, h, w, d) array with one chunk per sample and
    `samples_per_shard[kind]` samples per zarr shard; `<kind>_scales` (int8 encoding only) holds
    the per-token scales; `commits/<kind>/<shard>.json` are the commit records.
    """

    def __init__(self, group: zarr.Group, samples_per_shard: dict[str, int], url: str) -> None:
        self.group = group
        self.url = url
        self.file = node_file(url, group.path)
        self.folder = f"{url.rstrip('/')}/{group.path}"
        try:
            self.spec = EncoderGroupSpec.from_json(dict(group.attrs["merv_encoder"]))
        except METADATA_ERRORS as exc:
            raise StoreMetadataError.of(self.file, f"bad merv_encoder attributes: {type(exc).__name__}: {exc}",
                                        self.folder) from exc
        self.key = self.spec.key()
        self.name = self.spec.name
        self.samples_per_shard = dict(samples_per_shard)
        self.kv = GroupKV(group)
        self._arrays: dict[str, zarr.Array] = {}

    # ---------------------------------------------------------------- creation / layout
    @staticmethod
    def create(
        root: zarr.Group, spec: EncoderGroupSpec, rows: dict[str, int], samples_per_shard: dict[str, int], url: str,
        chain: str | None = None,
    ) -> "EncoderGroup":
        """Create the group's arrays. `chain` names the values' codec chain (`merv.store.codecs`);
        None takes the encoding's measured default. It is lossless, so not part of the fingerprint."""
        group = root.create_group(spec.key(), attributes={"merv_encoder": spec.to_json()})
        for kind in KINDS:
            EncoderGroup._create_arrays(group, spec, kind, rows[kind], samples_per_shard[kind], chain)
        return EncoderGroup(group, samples_per_shard, url)

    @staticmethod
    def _create_arrays(group: zarr.Group, spec: EncoderGroupSpec, kind: str, rows: int, per_shard: int,
                       chain: str | None) -> None:
        shape = spec.stored_shape(kind)
        dtype = "int8" if spec.encoding == "int8" else "float16"
        filters: Any = [BitRound(keepbits=spec.bitround_keepbits)] if spec.encoding == "bitround" else None
        group.create_array(
            kind,
            shape=(rows, *shape),
            chunks=(1, *shape),
            shards=(per_shard, *shape),
            dtype=dtype,
            filters=filters,
            compressors=compressors(chain or default_chain(spec.encoding)),
            fill_value=0,
            config=ARRAY_CONFIG,
            dimension_names=("sample", "t", "h", "w", "d"),
        )
        if spec.encoding == "int8":
            group.create_array(
                f"{kind}_scales",
                shape=(rows, *shape[:3]),
                chunks=(1, *shape[:3]),
                shards=(per_shard, *shape[:3]),
                dtype="float32",
                compressors=compressors(default_chain(spec.encoding, scales=True)),
                fill_value=0,
                config=ARRAY_CONFIG,
                dimension_names=("sample", "t", "h", "w"),
            )

    def array(self, kind: str) -> zarr.Array:
        """The `kind` (or `<kind>_scales`) array, checked against the group's spec, with ARRAY_CONFIG."""
        if kind not in self._arrays:
            self._arrays[kind] = self._open_array(kind)
        return self._arrays[kind]

    def _open_array(self, name: str) -> zarr.Array:
        file = node_file(self.url, f"{self.group.path}/{name}")
        try:
            arr = self.group[name]
        except METADATA_ERRORS as exc:
            if isinstance(exc, KeyError) and not self.kv.exists(f"{name}/zarr.json"):
                raise StoreMetadataError.of(file, "the file is missing", self.folder) from exc
            raise StoreMetadataError.of(file, f"{type(exc).__name__}: {exc}", self.folder) from exc
        if not isinstance(arr, zarr.Array):
            raise StoreMetadataError.of(file, "a group where an array belongs", self.folder)
        kind = name.removesuffix("_scales")
        want = self.spec.stored_shape(kind)[: 3 if name.endswith("_scales") else 4]
        dtype = "float32" if name.endswith("_scales") else ("int8" if self.spec.encoding == "int8" else "float16")
        per = self.samples_per_shard.get(kind)
        shards = arr.shards or arr.chunks
        if tuple(arr.shape[1:]) != tuple(want) or str(arr.dtype) != dtype or (per is not None and shards[0] != per):
            raise StoreMetadataError.of(
                file, f"array of shape {tuple(arr.shape)}, {arr.dtype}, {shards[0]} rows per shard, but the encoder "
                      f"group needs (rows, {', '.join(map(str, want))}), {dtype}, {per} rows per shard", self.folder)
        return arr.with_config(ARRAY_CONFIG)

    def scales(self, kind: str) -> zarr.Array:
        return self.array(f"{kind}_scales")

    def resize(self, rows: dict[str, int]) -> None:
        for kind in KINDS:
            arr = self.array(kind)
            arr.resize((rows[kind], *arr.shape[1:]))
            if self.spec.encoding == "int8":
                sc = self.scales(kind)
                sc.resize((rows[kind], *sc.shape[1:]))
        self._arrays.clear()

    # ---------------------------------------------------------------- shards
    def rows(self, kind: str) -> int:
        return int(self.array(kind).shape[0])

    def num_shards(self, kind: str) -> int:
        per = self.samples_per_shard[kind]
        return -(-self.rows(kind) // per)

    def shard_range(self, kind: str, shard: int, fresh: bool = False) -> range:
        """Rows of a shard; `fresh` re-reads the array size (another process may have added samples,
        which grows the last shard)."""
        if fresh:
            self._arrays.clear()
        per = self.samples_per_shard[kind]
        start = shard * per
        return range(start, min(start + per, self.rows(kind)))

    def commits(self, kind: str) -> dict[int, CommitRecord]:
        """Valid commit records that still cover their whole shard; anything else is pending."""
        keys = [k for k in self.kv.list_prefix(f"commits/{kind}/") if k.endswith(".json")]
        return self._valid_records(kind, self.kv.get_many(keys).values())

    def commits_of(self, kind: str, shards: list[int]) -> dict[int, CommitRecord]:
        """`commits` restricted to some shards, read fresh without a listing (one get each)."""
        return self._valid_records(kind, self.kv.get_many([commit_key(kind, s) for s in shards]).values())

    def _valid_records(self, kind: str, raws: Any) -> dict[int, CommitRecord]:
        out: dict[int, CommitRecord] = {}
        for raw in raws:
            if raw is None:
                continue
            try:
                rec = CommitRecord.from_bytes(raw)
            except (ValueError, TypeError, KeyError):
                continue  # a torn or foreign record is not a commit
            if rec.shard < self.num_shards(kind):
                expected = self.shard_range(kind, rec.shard)
                if rec.start == expected.start and rec.count == len(expected):
                    out[rec.shard] = rec
        return out

    def is_committed(self, kind: str, shard: int) -> bool:
        return shard in self.commits_of(kind, [shard])

    def write_shard(
        self,
        kind: str,
        shard: int,
        features: np.ndarray,
        failed: dict[int, str] | None = None,
        worker: str | None = None,
    ) -> CommitRecord:
        """Write one whole shard, then commit it.

        `features` is (n, t, h, w, d) for the n rows of the shard (rows listed in `failed` are
        ignored and stored as zeros). For a frame-wise encoder, image features may be given with
        one frame or with all frames (the first is kept). The old commit record is removed first,
        so a rewrite is never visible half-done.
        """
        self._arrays.clear()  # fresh metadata: another process may have grown the arrays
        rows = self.shard_range(kind, shard)
        if len(rows) == 0:
            raise IndexError(f"{self.key}: shard {shard} of {kind} is out of range ({self.num_shards(kind)} shards)")
        failed = {int(k): str(v) for k, v in (failed or {}).items()}
        data = self._prepare(kind, np.asarray(features), len(rows), failed)
        self.kv.delete(commit_key(kind, shard))
        nbytes = 0
        if self.spec.encoding == "int8":
            q, s = quantize_int8(data)
            self.array(kind)[rows.start : rows.stop] = q
            self.scales(kind)[rows.start : rows.stop] = s
            nbytes = q.nbytes + s.nbytes
        else:
            self.array(kind)[rows.start : rows.stop] = data.astype(np.float16)
            nbytes = data.shape[0] * int(np.prod(data.shape[1:])) * 2
        record = CommitRecord(
            shard=shard,
            start=rows.start,
            count=len(rows),
            failed={str(rows.start + k): v for k, v in sorted(failed.items())},  # absolute rows
            worker=worker or f"{socket.gethostname()}:{os.getpid()}",
            written=_now(),
            bytes=nbytes,
        )
        self.kv.set(commit_key(kind, shard), record.to_bytes())
        return record

    def _prepare(self, kind: str, data: np.ndarray, n: int, failed: dict[int, str]) -> np.ndarray:
        t, h, w, d = self.spec.stored_shape(kind)
        if data.ndim != 5 or data.shape[0] != n:
            raise ValueError(
                f"{self.key}: shard of {kind} needs features of shape ({n}, t, h, w, d), got {tuple(data.shape)}"
            )
        if kind == "image" and self.spec.framewise and data.shape[1] != 1:
            data = data[:, :1]
        if tuple(data.shape[1:]) != (t, h, w, d):
            raise ValueError(
                f"{self.key}: {kind} features must be {(n, t, h, w, d)} (grid and dim of this group), "
                f"got {tuple(data.shape)}"
            )
        bad = [i for i in failed if not 0 <= i < n]
        if bad:
            raise ValueError(f"{self.key}: failed rows {bad} are outside the shard (0..{n - 1})")
        data = np.array(data, dtype=np.float32, copy=True)
        if failed:
            data[sorted(failed)] = 0.0
        ok = np.ones(n, dtype=bool)
        ok[list(failed)] = False
        if ok.any() and not np.isfinite(data[ok]).all():
            raise ValueError(f"{self.key}: features contain NaN or Inf; record those samples as failed instead")
        if self.spec.encoding != "int8" and ok.any() and np.abs(data[ok]).max() > FP16_MAX:
            raise ValueError(f"{self.key}: features exceed the float16 range; use encoding='int8' or rescale")
        return data

    def try_lease(self, kind: str, shard: int, owner: str | None = None, ttl: float = DEFAULT_TTL_S) -> Lease | HeldBy:
        """The write lease of one shard of this group (one writer per shard; see `merv.store.lease`)."""
        return try_acquire(self.kv, lease_key(kind, shard), owner, ttl)

    # ---------------------------------------------------------------- reading
    def read_rows(self, kind: str, rows: np.ndarray | slice, must_exist: np.ndarray | None = None,
                  out: np.ndarray | None = None) -> np.ndarray:
        """Decoded float16 features of the given rows (no commit check: callers do that).

        Arbitrary rows go through `merv.store.shard_reader` (one index read per shard, chunks fetched
        and decoded concurrently); slices, and layouts it does not know, through zarr. Absent data
        reads as zeros, except rows in `must_exist` (committed, not failed): MissingShardDataError.
        `out`: a C-contiguous float16 array of the result's shape to decode into (see `fetch_rows`).
        """
        return self.decode(*sync(self.fetch_rows(kind, rows, must_exist, out)), out=out)

    def fetch_rows(
        self, kind: str, rows: np.ndarray | slice, must_exist: np.ndarray | None = None, out: np.ndarray | None = None
    ) -> Coroutine[Any, Any, tuple[np.ndarray, np.ndarray | None]]:
        """Awaitable (stored values, int8 scales or None) of `rows`, both fetched concurrently.

        A coroutine so a reader can fetch every group of a batch in one gather: zarr then decodes
        all their chunks in its thread pool at once instead of one group after another. The
        arrays are opened here, outside the event loop (opening is itself a sync zarr call).
        With `out`, float16 values are decoded straight into it by the shard reader (a loader
        worker passes shared memory: the batch then crosses to the trainer without a copy);
        `decode(..., out=out)` completes the job for int8 and zarr's paths.
        Data errors leave with this group's store, key and kind in their message."""
        arrays = [self.array(kind)] + ([self.scales(kind)] if self.spec.encoding == "int8" else [])
        idx = None if isinstance(rows, slice) else np.asarray(rows, dtype=np.int64)
        direct = out if self.spec.encoding != "int8" else None

        async def read(arr: zarr.Array, dest: np.ndarray | None) -> Any:
            if idx is not None and shard_reader.supports(arr):
                return await shard_reader.read_rows(arr, idx, must_exist, out=dest)
            if must_exist is not None:  # zarr would answer absent chunks with zeros: look first
                await shard_reader.require_stored(arr, must_exist)
            return await (arr._async_array.getitem(rows) if idx is None else _read_runs(arr, idx))

        async def fetch() -> tuple[np.ndarray, np.ndarray | None]:
            try:
                got = [np.asarray(x) for x in await asyncio.gather(read(arrays[0], direct),
                                                                   *(read(a, None) for a in arrays[1:]))]
            except StoreDataError as exc:
                raise exc.located(url=self.url, group=self.key, kind=kind) from exc
            return got[0], (got[1] if len(got) > 1 else None)

        return fetch()

    @staticmethod
    def decode(raw: np.ndarray, scales: np.ndarray | None, out: np.ndarray | None = None) -> np.ndarray:
        """Stored values -> float16 features (int8: undo the per-token scales), into `out` if given."""
        if scales is not None:
            return dequantize_int8(raw, scales, out)
        if out is None or raw is out:
            return raw
        out[...] = raw
        return out

    def info(self) -> dict[str, Any]:
        return {"key": self.key, **self.spec.to_json()}


async def _read_runs(arr: zarr.Array, rows: np.ndarray) -> np.ndarray:
    """arr[rows] for any row order, one concurrent slice read per run of consecutive rows."""
    out = np.empty((len(rows), *arr.shape[1:]), dtype=arr.dtype)
    if len(rows) == 0:
        return out
    order = np.argsort(rows, kind="stable")
    sorted_rows = rows[order]
    breaks = np.nonzero(np.diff(sorted_rows) != 1)[0] + 1
    starts = np.concatenate([[0], breaks])
    stops = np.concatenate([breaks, [len(rows)]])
    runs = [(int(sorted_rows[a]), int(sorted_rows[b - 1]) + 1) for a, b in zip(starts, stops)]

    pieces = await asyncio.gather(*(arr._async_array.getitem(slice(a, b)) for a, b in runs))
    if len(pieces) == 1 and len(rows) == int(sorted_rows[-1] - sorted_rows[0]) + 1 and (order == np.arange(len(rows))).all():
        return np.asarray(pieces[0])  # one ascending run: zarr's array is the answer, no copy
    pos = 0
    for piece in pieces:  # one copy of each piece into its output slots
        n = len(piece)
        out[order[pos : pos + n]] = np.asarray(piece)
        pos += n
    return out
