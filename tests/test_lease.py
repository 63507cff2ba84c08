"""Leases and the store's metadata lock, with real processes racing on real stores (local disk and
moto's S3 server): exactly one winner, expiry and takeover, heartbeats, release, refusals."""

from __future__ import annotations

import multiprocessing as mp
import queue as _queue
import time

import numpy as np
import pytest
from testkit import procs

from merv.store import FeatureStore, SampleRecord
from merv.store import lease as L
from merv.store.errors import LeaseLostError, StoreBusyError
from merv.store.group import lease_key
from merv.store.kv import GroupKV
from merv.store.store import METADATA_LEASE

RACERS = 4  # processes per race: enough to collide, few enough for two cores
JOIN_S = procs.JOIN_S


class FakeClock:
    """Wall time the test moves by hand: expiry without sleeping."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(L.time, "time", fake)
    return fake


def _local_kv(tmp_path) -> tuple[str, dict | None]:
    url = str(tmp_path / "s.zarr")
    FeatureStore.create(url, samples_per_shard=2).ensure_group(procs.lease_spec())
    return url, None


def _s3_kv(s3_server) -> tuple[str, dict | None]:
    url = f"s3://{s3_server['new_bucket']()}/s.zarr"
    opts = s3_server["storage_options"]
    FeatureStore.create(url, samples_per_shard=2, storage_options=opts).ensure_group(procs.lease_spec())
    return url, opts


@pytest.fixture(params=["local", "s3"])
def where(request, tmp_path) -> tuple[str, dict | None]:
    """A store with one encoder group, on local disk or on the moto S3 server."""
    if request.param == "local":
        return _local_kv(tmp_path)
    return _s3_kv(request.getfixturevalue("s3_server"))




def _group_kv(url: str, opts: dict | None) -> GroupKV:
    return FeatureStore.open(url, mode="a", storage_options=opts).resolve("dinov2").kv


# --------------------------------------------------------------------------- racing processes


def _run_race(url: str, opts: dict | None, shard: int) -> list[tuple[str, str, int]]:
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(RACERS), ctx.Queue()
    racers = [ctx.Process(target=procs.race_for_lease, args=(url, opts, shard, f"racer-{i}", barrier, out))
              for i in range(RACERS)]
    for p in racers:
        p.start()
    results = []
    for _ in racers:
        try:
            results.append(out.get(timeout=JOIN_S))
        except _queue.Empty:
            break
    for p in racers:
        p.join(JOIN_S)
    assert [p.exitcode for p in racers] == [0] * RACERS
    return results


def _assert_one_winner(results: list[tuple[str, str, int]], kv: GroupKV, key: str) -> tuple[str, int]:
    winners = [r for r in results if r[0] == "won"]
    assert len(results) == RACERS and len(winners) == 1, results
    _, owner, gen = winners[0]
    assert all(r[1] == owner for r in results if r[0] == "held"), results  # every loser names the winner
    held = L.try_acquire(kv, key, owner="late-comer")
    assert isinstance(held, L.HeldBy) and held.owner == owner
    assert L._generations(kv, key) == [gen]  # old generations collected, no stray re-creations left
    return owner, gen


@pytest.mark.integration
def test_processes_racing_for_a_free_lease_exactly_one_wins(where):
    url, opts = where
    results = _run_race(url, opts, 0)
    _assert_one_winner(results, _group_kv(url, opts), lease_key("video", 0))


@pytest.mark.integration
def test_processes_racing_to_take_over_an_expired_lease_exactly_one_wins(where):
    url, opts = where
    kv = _group_kv(url, opts)
    key = lease_key("video", 1)
    old = time.time() - 7200  # a holder that crashed two hours ago, ttl one hour
    dead = L.LeaseState("crashed-host:1", "t0k3n", 0, old, old, 3600.0)
    assert kv.create(L._gen_key(key, 0), dead.to_bytes())
    owner, gen = _assert_one_winner(_run_race(url, opts, 1), kv, key)
    assert gen == 1 and owner != dead.owner
    ghost = L.Lease(kv, key, dead)
    assert not ghost.still_mine()
    with pytest.raises(LeaseLostError, match="lost"):
        ghost.heartbeat()


# --------------------------------------------------------------------------- protocol, in one process
def test_heartbeat_keeps_the_lease_and_expiry_frees_it(tmp_path, clock):
    url, _ = _local_kv(tmp_path)
    kv = _group_kv(url, None)
    lease = L.try_acquire(kv, "k", owner="a", ttl=10)
    assert isinstance(lease, L.Lease) and lease.still_mine()
    for _ in range(5):  # 40 s of heartbeats every 8 s: never expires
        clock.now += 8
        lease.heartbeat()
        held = L.try_acquire(kv, "k", owner="b", ttl=10)
        assert isinstance(held, L.HeldBy) and held.owner == "a" and held.heartbeat == clock.now
    clock.now += 11  # no heartbeat for longer than the ttl
    assert not lease.still_mine()
    taken = L.try_acquire(kv, "k", owner="b", ttl=10)
    assert isinstance(taken, L.Lease) and taken.generation == lease.generation + 1
    with pytest.raises(LeaseLostError):
        lease.heartbeat()
    lease.release()  # releasing a lost lease must not free the new holder's
    assert isinstance(L.try_acquire(kv, "k", owner="c"), L.HeldBy) and taken.still_mine()


def test_release_frees_the_lease_at_once_and_keeps_one_object(tmp_path, clock):
    url, _ = _local_kv(tmp_path)
    kv = _group_kv(url, None)
    first = L.try_acquire(kv, "k", owner="a")
    assert isinstance(first, L.Lease)
    assert isinstance(L.try_acquire(kv, "k", owner="b"), L.HeldBy)
    first.release()
    assert not first.still_mine()
    second = L.try_acquire(kv, "k", owner="b")
    assert isinstance(second, L.Lease) and second.generation == first.generation + 1
    assert L._generations(kv, "k") == [second.generation]


def test_a_stale_listing_cannot_resurrect_a_collected_generation(tmp_path, monkeypatch):
    """A contender that listed before a takeover re-creates generation 0 (collected since); the
    check after its create sees generation 1 and backs off, removing what it made."""
    url, _ = _local_kv(tmp_path)
    kv = _group_kv(url, None)
    a = L.try_acquire(kv, "k", owner="a")
    a.release()
    b = L.try_acquire(kv, "k", owner="b")
    assert isinstance(b, L.Lease) and L._generations(kv, "k") == [1]
    real = L._generations
    calls = {"n": 0}

    def stale_first(kv_: GroupKV, key: str) -> list[int]:
        calls["n"] += 1
        return [] if calls["n"] == 1 else real(kv_, key)

    monkeypatch.setattr(L, "_generations", stale_first)
    got = L.try_acquire(kv, "k", owner="stale")
    monkeypatch.undo()
    assert isinstance(got, L.HeldBy) and got.owner == "b"
    assert L._generations(kv, "k") == [1] and b.still_mine()


def test_kept_alive_heartbeats_in_the_background_and_releases(tmp_path, clock):
    url, _ = _local_kv(tmp_path)
    kv = _group_kv(url, None)
    lease = L.try_acquire(kv, "k", owner="a", ttl=10)
    with lease.kept_alive(interval_s=0.01):
        clock.now += 8
        deadline = time.monotonic() + 60
        while lease.state.heartbeat != clock.now and time.monotonic() < deadline:
            time.sleep(0.01)
        assert lease.state.heartbeat == clock.now  # the thread beat at the new time
        clock.now += 8  # 16 s after acquiring, 8 s after the beat: still held
        assert isinstance(L.try_acquire(kv, "k", owner="b", ttl=10), L.HeldBy)
    assert isinstance(L.try_acquire(kv, "k", owner="b"), L.Lease)  # released on exit


def test_all_or_none_of_several_leases(tmp_path):
    url, _ = _local_kv(tmp_path)
    kv = _group_kv(url, None)
    held = L.try_acquire(kv, "leases/video/00000002", owner="other")
    got = L.try_acquire_all([(kv, "leases/video/00000001"), (kv, "leases/video/00000002")], owner="me")
    assert isinstance(got, L.HeldBy) and got.owner == "other"
    assert isinstance(L.try_acquire(kv, "leases/video/00000001", owner="third"), L.Lease)  # given back
    held.release()


# --------------------------------------------------------------------------- the store's metadata lock


@pytest.mark.integration
@pytest.mark.parametrize("backend", ["local", "s3"])
def test_concurrent_open_or_create_and_add_samples_give_one_consistent_store(backend, tmp_path, request):
    if backend == "local":
        url, opts = str(tmp_path / "new.zarr"), None
    else:
        s3 = request.getfixturevalue("s3_server")
        url, opts = f"s3://{s3['new_bucket']()}/new.zarr", s3["storage_options"]
    common = [f"v{i}" for i in range(5)] + ["img0"]
    lists = [common + [f"a{i}" for i in range(3)], list(reversed(common)) + [f"b{i}" for i in range(4)] + ["img1"],
             common + [f"a{i}" for i in range(3)]]
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(len(lists))
    growers = [ctx.Process(target=procs.grow_store, args=(url, opts, ids, barrier)) for ids in lists]
    for p in growers:
        p.start()
    for p in growers:
        p.join(JOIN_S)
    assert [p.exitcode for p in growers] == [0] * len(lists)
    store = FeatureStore.open(url, storage_options=opts)
    table = store.samples
    want = set().union(*map(set, lists))
    assert sorted(table.ids) == sorted(want)  # each id once, none lost
    for kind in ("video", "image"):
        members = [i for i in range(len(table)) if table.kind_of(i) == kind]
        assert sorted(table.rows[members].tolist()) == list(range(len(members)))  # rows 0..n-1, no gaps
    assert [store.group(k).name for k in store.encoder_keys()] == ["dinov2", "siglip"]  # one group per spec
    for key in store.encoder_keys():
        assert {k: store.group(key).rows(k) for k in ("video", "image")} == store.rows_per_kind()
    assert L._holder(GroupKV(store.root), METADATA_LEASE) is None  # every lock released


def test_a_held_metadata_lock_refuses_with_who_and_since(tmp_path):
    url = str(tmp_path / "s.zarr")
    FeatureStore.create(url, samples_per_shard=2)
    holder = FeatureStore.open(url, mode="a")
    other = FeatureStore.open(url, mode="a")
    with holder.metadata_lock():
        with holder.metadata_lock():  # re-entrant for its holder
            holder.add_samples([SampleRecord("v0", "/v0.mp4")])
        busy = rf"store '{url}' is being modified by {L.default_owner()} since \d{{4}}-"
        with pytest.raises(StoreBusyError, match=busy), other.metadata_lock(timeout_s=0):
            pass
    with other.metadata_lock(timeout_s=0):
        other.add_samples([SampleRecord("v1", "/v1.mp4")])
    assert FeatureStore.open(url).samples.ids == ["v0", "v1"]




def test_a_crashed_holders_metadata_lock_expires(tmp_path):
    url = str(tmp_path / "s.zarr")
    FeatureStore.create(url, samples_per_shard=2)
    proc = mp.get_context("spawn").Process(target=procs.crash_holding_the_lock, args=(url,))
    proc.start()
    proc.join(JOIN_S)
    assert proc.exitcode == 3
    store = FeatureStore.open(url, mode="a")
    store.add_samples([SampleRecord("v0", "/v0.mp4")])  # waits out the 1 s ttl, then proceeds
    assert FeatureStore.open(url).samples.ids == ["v0"]
    assert np.array_equal(store.samples.rows, [0])


def test_overwrite_under_the_lock_leaves_a_fresh_store(tmp_path):
    url = str(tmp_path / "s.zarr")
    old = FeatureStore.create(url, samples_per_shard=2)
    old.add_samples([SampleRecord("v0", "/v0.mp4")])
    old.ensure_group(procs.lease_spec())
    new = FeatureStore.create(url, samples_per_shard=3, overwrite=True)
    again = FeatureStore.open(url)
    assert len(again.samples) == 0 and again.encoder_keys() == [] and again.meta.samples_per_shard["video"] == 3
    assert L._holder(GroupKV(new.root), METADATA_LEASE) is None
    new.add_samples([SampleRecord("v1", "/v1.mp4")])  # the lock still works after the wipe
    assert FeatureStore.open(url).samples.ids == ["v1"]




def test_a_lease_of_a_dead_process_on_this_machine_is_taken_over_at_once(tmp_path):
    """A killed run's leases do not block the next run for a whole ttl: the holder is a process of
    this host and PID namespace that no longer runs. A live holder still blocks."""
    url, _ = _local_kv(tmp_path)
    kv = GroupKV(FeatureStore.open(url, mode="a").root)
    ctx = mp.get_context("spawn")
    started, release = ctx.Event(), ctx.Event()
    alive = ctx.Process(target=procs.hold_then_exit, args=(url, "leases/x", started, release))
    alive.start()
    assert started.wait(JOIN_S)
    held = L.try_acquire(kv, "leases/x", ttl=600)
    assert isinstance(held, L.HeldBy) and held.owner.endswith(f":{alive.pid}")
    release.set()
    alive.join(JOIN_S)
    started = ctx.Event()
    dead = ctx.Process(target=procs.hold_then_exit, args=(url, "leases/y", started, None))
    dead.start()
    assert started.wait(JOIN_S)
    dead.join(JOIN_S)
    got = L.try_acquire(kv, "leases/y", ttl=600)  # its heartbeat is seconds old, the ttl ten minutes
    assert isinstance(got, L.Lease) and got.generation == 1
