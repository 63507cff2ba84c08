"""FeatureStore: create / open a zarr v3 feature store and manage its sample table and groups."""

from __future__ import annotations

import datetime as _dt
import getpass
import os
import socket
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import zarr
from zarr.core.sync import sync

from . import lease as _lease
from .codecs import compressors
from .errors import (
    AmbiguousEncoderError,
    FingerprintMismatchError,
    IncompatibleStoreError,
    NotAStoreError,
    StoreAccessError,
    StoreError,
    StoreExistsError,
    StoreMetadataError,
    StoreNotFoundError,
    UnknownEncoderError,
)
from .group import METADATA_ERRORS, EncoderGroup, node_file
from .kv import GroupKV, store_of
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
LEASES = "leases"  # lease objects (merv.store.lease): the store's metadata lock, groups' shard leases
METADATA_LEASE = f"{LEASES}/metadata"
_RESERVED = {"samples", LEASES, "zarr.json"}
# The metadata lock guards seconds-long changes (create, add_samples, ensure_group); a writer that
# finds it held waits this long for it, and a crashed holder's lock frees itself after the ttl.
METADATA_LOCK_WAIT_S = 120.0
METADATA_LOCK_TTL_S = 60.0


# fsspec backends and the client libraries under them: their errors mean "cannot reach the store"
_REMOTE_LIBRARIES = {"botocore", "aiobotocore", "aiohttp", "s3fs", "gcsfs", "google", "adlfs", "azure", "fsspec"}
_EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}


@contextmanager
def remote_errors(url: str) -> Iterator[None]:
    """Reaching a store behind an fsspec URL: a missing backend package, refused credentials, an
    unreachable endpoint become one StoreAccessError naming the URL and the fix. FileNotFoundError
    passes through (callers turn it into StoreNotFoundError), as do merv's own errors."""
    if _is_local(url):
        yield
        return
    protocol = url.split("://", 1)[0]
    try:
        yield
    except (StoreError, FileNotFoundError):
        raise
    except ImportError as exc:
        extra = _EXTRAS.get(protocol)
        fix = f"pip install 'merv[{extra}]'" if extra else f"install the fsspec backend for {protocol}://"
        raise StoreAccessError(f"store {url!r}: {protocol}:// needs a package that is not installed ({exc}); "
                               f"{fix}") from exc
    except Exception as exc:  # noqa: BLE001 - sorted right here: backend errors become one line, bugs do not
        if not isinstance(exc, (OSError, TimeoutError)) and type(exc).__module__.split(".")[0] not in _REMOTE_LIBRARIES:
            raise
        detail = " ".join(f"{type(exc).__name__}: {exc}".split())[:400]
        raise StoreAccessError(
            f"cannot reach the store {url!r} ({detail}). Check the endpoint (AWS_ENDPOINT_URL or storage options "
            "client_kwargs.endpoint_url), the credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, "
            "GOOGLE_APPLICATION_CREDENTIALS) and the network") from exc


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
        try:
            self.meta = StoreMeta.from_json(dict(dict(root.attrs)["merv_store"]))
        except METADATA_ERRORS as exc:
            raise StoreMetadataError.of(node_file(url, ""), f"bad merv_store attributes: {type(exc).__name__}: {exc}") from exc
        self._samples: SampleTable | None = None
        self._groups: dict[str, EncoderGroup] = {}
        self._lock_depth = 0

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
        with remote_errors(url):
            kv = GroupKV.at(store_of(_zarr_target(url), storage_options))
        with remote_errors(url), _metadata_lease(kv, url):
            if not overwrite and cls.exists(url, storage_options):  # created while we waited
                raise StoreExistsError(url)
            return cls._create_locked(url, kv, pooled, samples_per_shard, shard_bytes, bytes_per_sample,
                                      storage_options, overwrite)

    @classmethod
    def _create_locked(
        cls,
        url: str,
        kv: GroupKV,
        pooled: tuple[int, int] | None,
        samples_per_shard: dict[str, int] | int | None,
        shard_bytes: int,
        bytes_per_sample: dict[str, int] | None,
        storage_options: dict[str, Any] | None,
        overwrite: bool,
    ) -> "FeatureStore":
        """`create` once the metadata lock is held (the lock object lives in the store: keep it)."""
        if overwrite:
            _clear_except_leases(kv)
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
        root = zarr.open_group(_zarr_target(url), mode="a", zarr_format=3, storage_options=storage_options)
        root.attrs["merv_store"] = meta.to_json()
        samples = root.create_group("samples")
        for name, dtype in (("id", str), ("kind", "uint8"), ("source", str), ("row", "int64"),
                            ("start", "float64"), ("end", "float64"), ("end_frame", "int64")):
            samples.create_array(name, shape=(0,), chunks=(SAMPLE_CHUNK,), dtype=dtype,
                                 fill_value=None if dtype is str else 0)
        return cls(root, url, writable=True)

    @classmethod
    def exists(cls, url: str | os.PathLike[str], storage_options: dict[str, Any] | None = None) -> bool:
        """Whether a store's root document is there (not whether it is sound: `open` checks that)."""
        url = os.fspath(url)
        if _is_local(url):
            return os.path.exists(os.path.join(_local_path(url), "zarr.json"))
        try:
            with remote_errors(url):
                return GroupKV.at(store_of(url, storage_options, mode="r")).exists("zarr.json", fresh=True)
        except FileNotFoundError:
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
            with remote_errors(url):
                root = zarr.open_group(_zarr_target(url), mode="r" if mode == "r" else "r+", zarr_format=3,
                                       storage_options=storage_options)
        except (FileNotFoundError, zarr.errors.GroupNotFoundError) as exc:  # type: ignore[attr-defined]
            raise StoreNotFoundError(url) from exc
        except METADATA_ERRORS as exc:
            raise StoreMetadataError.of(node_file(url, ""), f"{type(exc).__name__}: {exc}") from exc
        if not isinstance(root, zarr.Group):
            raise NotAStoreError(url, "a zarr array, not a group")
        info = dict(root.attrs).get("merv_store")
        if not isinstance(info, dict) or info.get("format") != FORMAT_NAME:
            raise NotAStoreError(url, "a zarr group without MERV store metadata")
        if int(info.get("version", 0)) > FORMAT_VERSION:
            raise NotAStoreError(url, f"store format v{info.get('version')} is newer than this merv (v{FORMAT_VERSION}); upgrade merv")
        return cls(root, url, writable=mode != "r")

    @classmethod
    def open_or_create(cls, url: str | os.PathLike[str], **create_kwargs: Any) -> "FeatureStore":
        """Open for writing if present (checking the grid agrees), else create.

        Safe when several processes do it at once: creation happens under the metadata lock, and
        whoever finds the store created meanwhile opens it."""
        url = os.fspath(url)
        opts = create_kwargs.get("storage_options")
        if not cls.exists(url, opts):
            try:
                return cls.create(url, **create_kwargs)
            except StoreExistsError:
                pass  # another process created it while we waited for the lock
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

    @contextmanager
    def metadata_lock(self, timeout_s: float = METADATA_LOCK_WAIT_S) -> Iterator[None]:
        """Hold the store's metadata lock (re-entrant): one process at a time changes the sample
        table or creates groups. Waits up to `timeout_s`, then StoreBusyError ("... held by
        host:pid since ..."). Re-reads the store on entry, since another process may have changed it.
        """
        self._require_writable()
        if self._lock_depth:
            self._lock_depth += 1
            try:
                yield
            finally:
                self._lock_depth -= 1
            return
        with _metadata_lease(GroupKV(self.root), self.url, timeout_s):
            self._lock_depth = 1
            self.refresh()
            try:
                yield
            finally:
                self._lock_depth = 0

    # ------------------------------------------------------------------ samples
    def _node(self, path: str) -> Any:
        """root[path], with a corrupt or missing zarr.json named as such."""
        top = path.split("/")[0]
        group_dir = None if top in _RESERVED else f"{self.url.rstrip('/')}/{top}"
        try:
            return self.root[path]
        except METADATA_ERRORS as exc:
            file = node_file(self.url, path)
            if isinstance(exc, KeyError) and not GroupKV(self.root).exists(f"{path}/zarr.json"):
                raise StoreMetadataError.of(file, "the file is missing", group_dir) from exc
            raise StoreMetadataError.of(file, f"{type(exc).__name__}: {exc}", group_dir) from exc

    def _sample_column(self, name: str) -> np.ndarray:
        arr = self._node(f"samples/{name}")
        if not isinstance(arr, zarr.Array) or arr.ndim != 1:
            raise StoreMetadataError.of(node_file(self.url, f"samples/{name}"), "not a one-dimensional array")
        return np.asarray(arr[:])

    @property
    def samples(self) -> SampleTable:
        if self._samples is None:
            cols = {name: self._sample_column(name) for name in SAMPLE_COLUMNS}
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
        """Append new samples under the metadata lock (so concurrent runs agree). Returns those added.

        An id already present with the same source and window is skipped; with a different one
        it is an error, because cached features would silently belong to another video.
        """
        self._require_writable()
        with self.metadata_lock():
            return self._add_samples_locked(records)

    def _add_samples_locked(self, records: Sequence[SampleRecord]) -> list[SampleRecord]:
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
        """Keys of the encoder groups; a child whose zarr.json is corrupt is an error naming it."""
        kv = GroupKV(self.root)
        keys = []
        for name in kv.list_dir(""):
            if name in _RESERVED or name.startswith("."):
                continue
            if not kv.exists(f"{name}/zarr.json"):
                if kv.list_prefix(f"{name}/commits/"):
                    raise StoreMetadataError.of(node_file(self.url, name), "the file is missing from an encoder group",
                                                f"{self.url.rstrip('/')}/{name}")
                continue  # not a zarr node (a stray folder or object)
            node = self._node(name)
            if isinstance(node, zarr.Group) and "merv_encoder" in node.attrs:
                keys.append(name)
        return sorted(keys)

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
        from .encoder_names import canonical_encoder_name

        keys = self.encoder_keys()
        if name_or_key not in keys:
            name_or_key = canonical_encoder_name(name_or_key)  # a generic spec in any spelling
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

    def ensure_group(self, spec: EncoderGroupSpec, chain: str | None = None) -> EncoderGroup:
        """Open the group for this exact configuration, creating it (and nothing else) if absent.

        Creation happens under the metadata lock: two runs adding one encoder make one group.
        `chain` names the codec chain of a new group's values (`merv.store.codecs`; None: the
        encoding's default); an existing group keeps the chain it was written with."""
        if chain is not None:
            compressors(chain)  # a bad name fails here, before anything is created
        key = spec.key()
        if key in self.encoder_keys():
            return self._checked(self.group(key), spec)
        self._require_writable()
        with self.metadata_lock():
            if key in self.encoder_keys():  # another process created it meanwhile
                return self._checked(self.group(key), spec)
            return self._create_group_locked(spec, chain)

    def _checked(self, group: EncoderGroup, spec: EncoderGroupSpec) -> EncoderGroup:
        if group.spec.group_fingerprint() != spec.group_fingerprint():
            raise FingerprintMismatchError(self.url, spec.name, spec.group_fingerprint(), [group.key])
        return group

    def _create_group_locked(self, spec: EncoderGroupSpec, chain: str | None = None) -> EncoderGroup:
        key = spec.key()
        native = tuple(spec.info.get("native_grid", spec.grid))[1:]
        allowed = None if self.meta.grid is None else tuple(min(n, g) for n, g in zip(native, self.meta.grid))
        if allowed is not None and tuple(spec.grid[1:]) != allowed:
            raise IncompatibleStoreError(
                f"store {self.url!r} is pooled to {self.meta.grid_mode}, but encoder {spec.name!r} "
                f"would store a {spec.grid[1]}x{spec.grid[2]} grid; pool at extraction or use a native store"
            )
        group = EncoderGroup.create(self.root, spec, self.rows_per_kind(), self.meta.samples_per_shard, self.url, chain)
        self._groups[key] = group
        return group

    def info(self) -> dict[str, Any]:
        return {"url": self.url, **self.meta.to_json(), "samples": len(self.samples), "rows": self.rows_per_kind()}


@contextmanager
def _metadata_lease(kv: GroupKV, url: str, timeout_s: float = METADATA_LOCK_WAIT_S) -> Iterator[None]:
    """The store-wide lock for metadata changes, heartbeaten while held."""
    lease = _lease.acquire(kv, METADATA_LEASE, ttl=METADATA_LOCK_TTL_S, timeout_s=timeout_s,
                           held=f"store {url!r} is being modified")
    with lease.kept_alive():
        yield


def _clear_except_leases(kv: GroupKV) -> None:
    """Everything of an old store but its lease objects (`create(overwrite=True)` holds one)."""
    store = kv._store
    for name in kv.list_dir(""):
        if name == LEASES:
            continue
        key = kv._key(name)
        sync(store.delete(key))
        sync(store.delete_dir(key))
