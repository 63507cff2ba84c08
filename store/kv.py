"""Small synchronous key/value access to the zarr store behind a group.

Commit records and leases are tiny JSON objects living next to the arrays. They go through the
same zarr `Store` as the features, so local paths, `memory://` and fsspec URLs (s3://, gs://) all
work.
"""

from __future__ import annotations

import asyncio
import errno
import os
import uuid
from collections.abc import Iterable
from typing import Any

import zarr
from zarr.abc.store import Store
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import FsspecStore, LocalStore, MemoryStore


class GroupKV:
    """Raw bytes under a group's prefix (keys are relative to the group)."""

    def __init__(self, group: zarr.Group) -> None:
        self._store: Store = group.store_path.store
        self._prefix = group.store_path.path.strip("/")

    @classmethod
    def at(cls, store: Store, prefix: str = "") -> "GroupKV":
        """Keys under `prefix` of a zarr Store (e.g. a store's root before its group exists)."""
        kv = cls.__new__(cls)
        kv._store, kv._prefix = store, prefix.strip("/")
        return kv

    @property
    def writable(self) -> bool:
        return not self._store.read_only

    def _key(self, key: str) -> str:
        return f"{self._prefix}/{key}" if self._prefix else key

    def set(self, key: str, value: bytes) -> None:
        buf = default_buffer_prototype().buffer.from_bytes(value)
        sync(self._store.set(self._key(key), buf))

    def get(self, key: str) -> bytes | None:
        buf = sync(self._store.get(self._key(key), prototype=default_buffer_prototype()))
        return None if buf is None else buf.to_bytes()

    def delete(self, key: str) -> None:
        sync(self._store.delete(self._key(key)))

    def size(self, key: str) -> int:
        """Stored bytes of one object (0 when absent): what extraction reports as written."""
        try:
            return int(sync(self._store.getsize(self._key(key))))
        except FileNotFoundError:
            return 0

    def exists(self, key: str, fresh: bool = False) -> bool:
        """`fresh`: not from a listing cache (see `list_prefix`), for decisions other processes race on."""
        if fresh:
            self._forget_listings(self._key(key))
        return bool(sync(self._store.exists(self._key(key))))

    def list_prefix(self, prefix: str, fresh: bool = False) -> list[str]:
        """Keys (relative to the group) that start with `prefix`.

        `fresh`: drop the filesystem's listing cache first (s3fs caches listings without expiry,
        so another process's new objects would stay invisible; leases must see them)."""
        full = self._key(prefix)
        if fresh:
            self._forget_listings(full)

        async def collect() -> list[str]:
            return [k async for k in self._store.list_prefix(full)]

        strip = len(self._prefix) + 1 if self._prefix else 0
        return sorted(k[strip:] for k in sync(collect()))

    def list_dir(self, prefix: str = "") -> list[str]:
        """Names of the direct children (objects and folders) under `prefix`, listed afresh
        (s3fs would otherwise answer from a listing cache that never sees other processes' groups)."""
        full = self._key(prefix).rstrip("/")
        self._forget_listings(full)

        async def collect() -> list[str]:
            return [k async for k in self._store.list_dir(full)]

        return sorted(sync(collect()))

    def _forget_listings(self, full_key: str) -> None:
        if isinstance(self._store, FsspecStore) and hasattr(self._store.fs, "invalidate_cache"):
            self._store.fs.invalidate_cache(_fsspec_path(self._store, full_key))

    def create(self, key: str, value: bytes) -> bool:
        """Write `key` only if it does not exist; True if this call created it.

        Atomic (exactly one of any number of concurrent callers gets True, and nobody ever sees a
        partial object) on local disks (hard link of a complete temporary file, as zarr's own
        `set_if_not_exists`), on S3 (conditional PUT `If-None-Match: *`) and in memory. Other
        fsspec backends get what their `pipe_file(mode="create")` gives: fsspec's default is
        check-then-put, which is NOT atomic (see `merv.store.lease` for what still holds then).
        """
        return bool(sync(_create(self._store, self._key(key), value)))

    def get_many(self, keys: Iterable[str]) -> dict[str, bytes | None]:
        """Concurrent gets: listing thousands of commit records on an object store stays fast."""
        keys = list(keys)
        proto = default_buffer_prototype()

        async def fetch_all() -> list[object]:
            return await asyncio.gather(*(self._store.get(self._key(k), prototype=proto) for k in keys))

        bufs = sync(fetch_all())
        return {k: (None if b is None else b.to_bytes()) for k, b in zip(keys, bufs)}  # type: ignore[union-attr]


def _fsspec_path(store: FsspecStore, key: str) -> str:
    return f"{store.path.rstrip('/')}/{key.lstrip('/')}" if key else store.path


async def _create(store: Store, key: str, value: bytes) -> bool:
    """One atomic create-if-absent per store kind (see `GroupKV.create`)."""
    if store.read_only:
        raise PermissionError(f"cannot create {key!r}: the store is opened read-only")
    if isinstance(store, LocalStore):
        return await asyncio.to_thread(_link_create, os.path.join(str(store.root), key), value)
    if isinstance(store, FsspecStore):
        try:
            await store.fs._pipe_file(_fsspec_path(store, key), value, mode="create")
            return True
        except FileExistsError:
            return False
        except OSError as exc:
            if exc.errno == errno.EBUSY:  # S3 409 ConditionalRequestConflict: a concurrent create won
                return False
            raise
    if isinstance(store, MemoryStore):
        buf = default_buffer_prototype().buffer.from_bytes(value)
        before = store._store_dict.get(key)
        await store.set_if_not_exists(key, buf)  # a dict setdefault: atomic within the process
        return before is None and store._store_dict.get(key) is buf
    raise TypeError(f"no atomic create for {type(store).__name__}; use a local path or an fsspec URL")


def _link_create(path: str, value: bytes) -> bool:
    """Complete temporary file, then os.link: the name appears atomically, whole, or not at all."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{uuid.uuid4().hex}.partial"
    with open(tmp, "wb") as fh:
        fh.write(value)
        fh.flush()
        os.fsync(fh.fileno())
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        os.unlink(tmp)


def store_of(url: str, storage_options: dict[str, Any] | None = None, mode: str = "a") -> Store:
    """The zarr Store at `url` (a local path or an fsspec URL), whether or not a group exists there.

    `url` must be the store's root (what `GroupKV.at` keys are relative to)."""
    from zarr.storage._common import make_store_path

    path = sync(make_store_path(url, mode=mode, storage_options=storage_options))  # type: ignore[arg-type]
    if path.path:
        raise ValueError(f"{url!r}: expected the root of a zarr store, got a path inside one ({path.path!r})")
    return path.store
