"""Small synchronous key/value access to the zarr store behind a group.

Commit records are tiny JSON objects living next to the arrays. They go through the same zarr
`Store` as the features, so local paths, `memory://` and fsspec URLs (s3://, gs://) all work.
"""

from __future__ import annotations

from collections.abc import Iterable

import zarr
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync


class GroupKV:
    """Raw bytes under a group's prefix (keys are relative to the group)."""

    def __init__(self, group: zarr.Group) -> None:
        self._store = group.store_path.store
        self._prefix = group.store_path.path.strip("/")

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

    def exists(self, key: str) -> bool:
        return bool(sync(self._store.exists(self._key(key))))

    def list_prefix(self, prefix: str) -> list[str]:
        """Keys (relative to the group) that start with `prefix`."""
        full = self._key(prefix)

        async def collect() -> list[str]:
            return [k async for k in self._store.list_prefix(full)]

        strip = len(self._prefix) + 1 if self._prefix else 0
        return sorted(k[strip:] for k in sync(collect()))

    def get_many(self, keys: Iterable[str]) -> dict[str, bytes | None]:
        """Concurrent gets: listing thousands of commit records on an object store stays fast."""
        keys = list(keys)
        proto = default_buffer_prototype()

        async def fetch_all() -> list[object]:
            import asyncio

            return await asyncio.gather(*(self._store.get(self._key(k), prototype=proto) for k in keys))

        bufs = sync(fetch_all())
        return {k: (None if b is None else b.to_bytes()) for k, b in zip(keys, bufs)}  # type: ignore[union-attr]
