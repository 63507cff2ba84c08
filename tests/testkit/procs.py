"""Targets of the processes the store tests spawn.

They live here, not in the test modules: a spawned child re-imports its target's module by name, and
`tests.test_*` is not importable there (lmms-eval's dependency latex2sympy2 installs a top-level
`tests` package into site-packages, which shadows this directory); `testkit` is on every child's path.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from merv.store import EncoderGroupSpec, FeatureStore, SampleRecord
from merv.store import lease as L
from merv.store.kv import GroupKV
from merv.store.store import METADATA_LEASE

JOIN_S = 240  # how long a spawned process may take to start and finish (two busy cores)


def lease_spec() -> EncoderGroupSpec:
    return EncoderGroupSpec("dinov2", "fp-a", (2, 2, 2), 4, framewise=True)


def race_for_lease(url: str, opts: dict | None, shard: int, owner: str, barrier: Any, out: Any) -> None:
    group = FeatureStore.open(url, mode="a", storage_options=opts).resolve("dinov2")
    barrier.wait(JOIN_S)
    got = group.try_lease("video", shard, owner=owner, ttl=3600)
    out.put(("won", owner, got.generation) if isinstance(got, L.Lease) else ("held", got.owner, -1))


def grow_store(url: str, opts: dict | None, ids: list[str], barrier: Any) -> None:
    barrier.wait(JOIN_S)
    store = FeatureStore.open_or_create(url, samples_per_shard=2, storage_options=opts)
    store.add_samples([SampleRecord(i, f"/videos/{i}.mp4", kind="image" if i.startswith("img") else "video")
                       for i in ids])
    store.ensure_group(lease_spec())
    store.ensure_group(EncoderGroupSpec("siglip", "fp-s", (2, 2, 2), 4, framewise=True))


def crash_holding_the_lock(url: str) -> None:
    store = FeatureStore.open(url, mode="a")
    L.acquire(GroupKV(store.root), METADATA_LEASE, ttl=1.0)
    os._exit(3)  # killed while holding it: no release, no heartbeat


def hold_then_exit(url: str, key: str, started: Any, release_evt: Any) -> None:
    """Take a lease and keep it (alive, no heartbeats needed within the ttl), or die holding it."""
    kv = GroupKV(FeatureStore.open(url, mode="a").root)
    got = L.try_acquire(kv, key, ttl=600)
    assert isinstance(got, L.Lease)
    started.set()
    if release_evt is None:
        os._exit(0)  # killed while holding: no release, heartbeat still fresh
    release_evt.wait(120)


def write_shards(path: str, shards: list[int], grid: tuple[int, ...], dim: int) -> None:
    """Shard `k` of the store's dinov2 group filled with each row's own index."""
    group = FeatureStore.open(path, mode="a").resolve("dinov2")
    for shard in shards:
        rows = group.shard_range("video", shard)
        group.write_shard("video", shard, np.stack([np.full((*grid, dim), row, np.float16) for row in rows]))
