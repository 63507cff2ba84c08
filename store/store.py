"""FeatureStore: create / open a zarr v3 feature store and manage its sample table and groups."""

from __future__ import annotations

import datetime as _dt
import getpass
import os
import socket
from collections.abc import Sequence
from typing import Any

import numpy as np
import zarr

from .errors import (
    AmbiguousEncoderError,
    FingerprintMismatchError,
    IncompatibleStoreError,
    NotAStoreError,
    StoreExistsError,
    StoreNotFoundError,
    UnknownEncoderError,
)
from .group import EncoderGroup
from .samples import SampleRecord, SampleTable
from .schema import (
    DEFAULT_SHARD_BYTES,
    FORMAT_NAME,
    FORMAT_VERSION,
    KINDS,
    EncoderGroupSpec,
    StoreMeta,
    choose_samples_per_shard,
    paper_bytes_per_sample,
    parse_grid,
)

SAMPLE_COLUMNS = ("id", "kind", "source", "row", "start", "end", "end_frame")
SAMPLE_CHUNK = 65536
_RESERVED = {"samples"}


def _is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def _local_path(url: str) -> str:
    return url[len("file://") :] if url.startswith("file://") else url


def _zarr_target(url: str) -> str:
    """Local paths (also file:// URLs) go to zarr's LocalStore, everything else through fsspec."""
    return _local_path(url) if _is_local(url) else url


class FeatureStore:
    """A MERV feature store at a local path or any fsspec URL (`memory://`, `s3://`, ...)."""

    def __init__(self, root: zarr.Group, url: str, writable: bool) -> None:
        self.root = root
        self.url = url
        self.writable = writable
        attrs = dict(root.attrs)
        self.meta = StoreMeta.from_json(dict(attrs["merv_store"]))
        self._samples: SampleTable | None = None
        self._groups: dict[str, EncoderGroup] = {}

    # ------------------------------------------------------------------ open / create
    @classmethod
    def create(
        cls,
        url: str | os.PathLike[str],
        *,
        grid: str | tuple[int, int] | None = None,
        samples_per_shard: dict[str, int] | int | None = None,
        shard_bytes: int = DEFAULT_SHARD_BYTES,
        bytes_per_sample: dict[str, int] | None = None,
        storage_options: dict[str, Any] | None = None,
        overwrite: bool = False,
    ) -> "FeatureStore":
        """Create an empty store.

        `grid`: None / "native" keeps each encoder's native grid; "8x8" (or 64) means every
        group is pooled to that grid at extraction. Samples per shard default to about
        `shard_bytes` of uncompressed features per shard, from `bytes_per_sample` (the largest
        encoder's, per kind) or the paper's largest encoder at this grid.
        """
        url = os.fspath(url)
        pooled = parse_grid(grid)
        if not overwrite and cls.exists(url, storage_options):
            raise StoreExistsError(url)
        if isinstance(samples_per_shard, int):
            samples_per_shard = {k: samples_per_shard for k in KINDS}
        if samples_per_shard is None:
            sizes = bytes_per_sample or paper_bytes_per_sample(pooled)
            samples_per_shard = {k: choose_samples_per_shard(sizes[k], shard_bytes) for k in KINDS}
        for kind, per in samples_per_shard.items():
            if kind not in KINDS or int(per) < 1:
                raise ValueError(f"samples_per_shard: {kind}={per} (kinds are {KINDS}, counts >= 1)")
        meta = StoreMeta(
            grid=list(pooled) if pooled else None,
            samples_per_shard={k: int(v) for k, v in samples_per_shard.items()},
            created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            created_by=f"{getpass.getuser()}@{socket.gethostname()}",
        )
        root = zarr.open_group(
            _zarr_target(url), mode="w" if overwrite else "w-", zarr_format=3, storage_options=storage_options
        )
        root.attrs["merv_store"] = meta.to_json()
        samples = root.create_group("samples")
        for name, dtype in (("id", str), ("kind", "uint8"), ("source", str), ("row", "int64"),
                            ("start", "float64"), ("end", "float64"), ("end_frame", "int64")):
            samples.create_array(name, shape=(0,), chunks=(SAMPLE_CHUNK,), dtype=dtype,
                                 fill_value=None if dtype is str else 0)
        return cls(root, url, writable=True)

    @classmethod
    def exists(cls, url: str | os.PathLike[str], storage_options: dict[str, Any] | None = None) -> bool:
        url = os.fspath(url)
        if _is_local(url):
            return os.path.exists(os.path.join(_local_path(url), "zarr.json"))
        try:
            zarr.open_group(url, mode="r", zarr_format=3, storage_options=storage_options)
            return True
        except (FileNotFoundError, zarr.errors.GroupNotFoundError, KeyError):  # type: ignore[attr-defined]
            return False

    @classmethod
    def open(
        cls, url: str | os.PathLike[str], mode: str = "r", storage_options: dict[str, Any] | None = None
    ) -> "FeatureStore":
        """Open an existing store; `mode` is "r" (read) or "a" (read and write)."""
        url = os.fspath(url)
        if mode not in ("r", "a", "r+"):
            raise ValueError("mode must be 'r' or 'a'")
        if _is_local(url):
            path = _local_path(url)
            if not os.path.exists(path):
                raise StoreNotFoundError(url)
            if not os.path.isdir(path):
                raise NotAStoreError(url, "it is a file, not a directory")
            if not os.path.exists(os.path.join(path, "zarr.json")):
                raise NotAStoreError(url, "no zarr.json at its top level")
        try:
            root = zarr.open_group(_zarr_target(url), mode="r" if mode == "r" else "r+", zarr_format=3,
                                   storage_options=storage_options)
        except (FileNotFoundError, zarr.errors.GroupNotFoundError) as exc:  # type: ignore[attr-defined]
            raise StoreNotFoundError(url) from exc
        except (ValueError, TypeError, KeyError) as exc:
            raise NotAStoreError(url, f"not a zarr v3 group: {exc}") from exc
        info = dict(root.attrs).get("merv_store")
        if not isinstance(info, dict) or info.get("format") != FORMAT_NAME:
            raise NotAStoreError(url, "a zarr group without MERV store metadata")
        if int(info.get("version", 0)) > FORMAT_VERSION:
            raise NotAStoreError(url, f"store format v{info.get('version')} is newer than this merv (v{FORMAT_VERSION}); upgrade merv")
        return cls(root, url, writable=mode != "r")

    @classmethod
    def open_or_create(cls, url: str | os.PathLike[str], **create_kwargs: Any) -> "FeatureStore":
        """Open for writing if present (checking the grid agrees), else create."""
        url = os.fspath(url)
        opts = create_kwargs.get("storage_options")
        if not cls.exists(url, opts):
            return cls.create(url, **create_kwargs)
        store = cls.open(url, mode="a", storage_options=opts)
        want = parse_grid(create_kwargs.get("grid"))
        have = tuple(store.meta.grid) if store.meta.grid else None
        if want != have:
            raise IncompatibleStoreError(
                f"store {url!r} caches the {store.meta.grid_mode} grid but {('native' if want is None else f'{want[0]}x{want[1]}')} "
                "was asked; use the store's grid (--grid) or a new store path"
            )
        return store

    def _require_writable(self) -> None:
        if not self.writable:
            raise PermissionError(f"store {self.url!r} was opened read-only; open it with mode='a' to write")

    # ------------------------------------------------------------------ samples
    @property
    def samples(self) -> SampleTable:
        if self._samples is None:
            g = self.root["samples"]
            cols = {name: np.asarray(g[name][:]) for name in SAMPLE_COLUMNS}  # type: ignore[index]
            # A writer killed inside `add_samples` can leave some columns longer than others;
            # only rows every column holds exist (the next `add_samples` rewrites the rest).
            n = min(len(c) for c in cols.values())
            cols = {name: c[:n] for name, c in cols.items()}
            self._samples = SampleTable(
                cols["id"], cols["kind"], cols["source"], cols["row"], cols["start"], cols["end"], cols["end_frame"]
            )
        return self._samples

    def refresh(self) -> None:
        """Forget cached tables and groups (after another process changed the store)."""
        self._samples = None
        self._groups.clear()

    def rows_per_kind(self) -> dict[str, int]:
        table = self.samples
        return {k: table.count(k) for k in KINDS}

    def add_samples(self, records: Sequence[SampleRecord]) -> list[SampleRecord]:
        """Append new samples (one writer at a time: the job driver). Returns those added.

        An id already present with the same source and window is skipped; with a different one
        it is an error, because cached features would silently belong to another video.
        """
        self._require_writable()
        table = self.samples
        new: list[SampleRecord] = []
        seen: dict[str, SampleRecord] = {}
        for rec in records:
            if rec.id in seen:
                if seen[rec.id] != rec:
                    raise ValueError(f"sample id {rec.id!r} appears twice with different sources/windows")
                continue
            seen[rec.id] = rec
            if rec.id in table.index:
                old = table.record(table.index[rec.id])
                if old != rec:
                    raise ValueError(
                        f"sample id {rec.id!r} is already in {self.url!r} as {old.source!r} ({old.kind}, "
                        f"{old.window()}); it cannot now be {rec.source!r} ({rec.kind}, {rec.window()}). "
                        "Give the new video a different id or use a new store."
                    )
                continue
            new.append(rec)
        if not new:
            self._size_groups()
            return []
        cols = SampleTable.columns(new, self.rows_per_kind())
        g = self.root["samples"]
        n0 = len(table)
        for name in SAMPLE_COLUMNS:
            arr = g[name]  # type: ignore[index]
            arr.resize((n0 + len(new),))
            arr[n0:] = cols[name]
        self._samples = None
        self._size_groups()
        return new

    def _size_groups(self) -> None:
        """Give every group one row per sample; also repairs an `add_samples` killed between
        the sample table and the groups (a re-run then adds nothing new but still needs this)."""
        rows = self.rows_per_kind()
        for key in self.encoder_keys():
            group = self.group(key)
            if any(group.rows(kind) != rows[kind] for kind in KINDS):
                group.resize(rows)

    # ------------------------------------------------------------------ encoder groups
    def encoder_keys(self) -> list[str]:
        return sorted(
            name for name, node in self.root.groups() if name not in _RESERVED and "merv_encoder" in node.attrs
        )

    def group(self, key: str) -> EncoderGroup:
        if key not in self._groups:
            if key not in self.encoder_keys():
                raise UnknownEncoderError(self.url, key, self.encoder_keys())
            self._groups[key] = EncoderGroup(self.root[key], self.meta.samples_per_shard, self.url)  # type: ignore[arg-type]
        return self._groups[key]

    def resolve(self, name_or_key: str, fingerprint: str | None = None) -> EncoderGroup:
        """A group by full key, or by encoder name when exactly one configuration of it is present.

        With `fingerprint` (the encoder's or the group's), a group of that name made with another
        configuration raises FingerprintMismatchError instead of silently mixing numbers.
        """
        keys = self.encoder_keys()
        if name_or_key in keys:
            group = self.group(name_or_key)
            candidates = [group]
        else:
            candidates = [self.group(k) for k in keys if self.group(k).name == name_or_key]
        if not candidates:
            raise UnknownEncoderError(self.url, name_or_key, keys)
        if fingerprint is not None:
            match = [g for g in candidates if fingerprint in (g.spec.fingerprint, g.spec.group_fingerprint())]
            if not match:
                found = [f"{g.key} (encoder {g.spec.fingerprint})" for g in candidates]
                raise FingerprintMismatchError(self.url, name_or_key, fingerprint, found)
            candidates = match
        if len(candidates) > 1:
            raise AmbiguousEncoderError(self.url, name_or_key, [g.key for g in candidates])
        return candidates[0]

    def ensure_group(self, spec: EncoderGroupSpec) -> EncoderGroup:
        """Open the group for this exact configuration, creating it (and nothing else) if absent."""
        key = spec.key()
        if key in self.encoder_keys():
            group = self.group(key)
            if group.spec.group_fingerprint() != spec.group_fingerprint():
                raise FingerprintMismatchError(self.url, spec.name, spec.group_fingerprint(), [group.key])
            return group
        self._require_writable()
        if self.meta.grid is not None and tuple(spec.grid[1:]) != tuple(self.meta.grid):
            raise IncompatibleStoreError(
                f"store {self.url!r} is pooled to {self.meta.grid_mode}, but encoder {spec.name!r} "
                f"would store a {spec.grid[1]}x{spec.grid[2]} grid; pool at extraction or use a native store"
            )
        group = EncoderGroup.create(self.root, spec, self.rows_per_kind(), self.meta.samples_per_shard, self.url)
        self._groups[key] = group
        return group

    def info(self) -> dict[str, Any]:
        return {"url": self.url, **self.meta.to_json(), "samples": len(self.samples), "rows": self.rows_per_kind()}
