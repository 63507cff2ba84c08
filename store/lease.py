"""Leases: one owner at a time for a named piece of a store (a shard to write, the store's metadata).

Why: two `merv extract` runs on one store must neither do the same shard twice (partial concurrent
writes to a zarr shard lose data) nor race on the sample table and group creation. A lease is a
small JSON object in the store itself, so it works wherever the store does (local disk, S3, any
fsspec URL) and needs no lock server.

Protocol. The lease `K` is a series of generation objects `K/<generation>.json`; the highest
generation is the current one. Its JSON holds the owner (`host:pid`), a random token, the acquired
and heartbeat times (UTC seconds), the ttl and a `released` flag.

- acquire: list the generations. If the highest is live (not released, heartbeat younger than its
  ttl) the lease is held: `HeldBy`. Otherwise atomically create generation `top + 1` (create fails
  if it exists), then list again and read the object back: the caller holds the lease only if its
  generation is still the highest and holds its token. Takeover of an expired or released lease is
  the same step, so of any number of contenders racing, exactly one creates that generation.
  Old generations are then deleted (safe: a contender that re-creates a deleted old generation
  sees a higher one when it checks, and backs off). The current generation is never deleted.
- heartbeat: rewrite the own generation object with a new heartbeat time, after checking it is
  still the highest and ours; `LeaseLostError` otherwise.
- release: mark the own generation `released` (never delete it: that would let a contender with
  an old listing re-create it). The next contender takes over at once.
- still_mine: the own generation is the highest, holds our token, is not released, and our last
  heartbeat is younger than the ttl (after that someone may take over at any moment).

Guarantees. Expiry compares the holder's heartbeat time with the contender's clock: clocks must
agree to well within the ttl. A holder that stops heartbeating for a ttl (paused, partitioned) can
lose the lease while still working; call `still_mine()` right before committing. Atomic create:
local disks (hard link of a complete temporary file; also NFS), S3 and S3-compatible servers
(conditional PUT `If-None-Match: *`), `memory://`. On an fsspec backend without an atomic create
(fsspec's default `pipe_file(mode="create")` is check-then-put) two contenders can both write one
generation; the read-back then gives it to the last writer, and the other notices at its next
`still_mine()` / `heartbeat()` (a window of one round trip, not a guarantee).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

from .errors import LeaseLostError, StoreBusyError
from .kv import GroupKV

DEFAULT_TTL_S = 120.0  # a holder heartbeats every ttl / HEARTBEATS_PER_TTL seconds
HEARTBEATS_PER_TTL = 4
POLL_S = 0.2  # how often a waiting contender looks again (see `acquire`)
_GEN_WIDTH = 12
_MAX_ROUNDS = 100  # listings that changed under us before giving up (only under extreme churn)
_SUFFIX = ".json"


def default_owner() -> str:
    """`host:pid`: what a refusal shows to say who holds a lease."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _pid_namespace() -> str:
    """This process's PID namespace (Linux), so a pid is only judged where it means the same
    process: containers sharing a host name have their own pid numbers."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _iso(t: float) -> str:
    return _dt.datetime.fromtimestamp(t, _dt.timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class LeaseState:
    """The JSON of one generation object."""

    owner: str
    token: str
    generation: int
    acquired: float
    heartbeat: float
    ttl: float
    released: bool = False
    pid_namespace: str = ""  # the holder's (see `_pid_namespace`); "" where unknown

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> "LeaseState | None":
        """None for anything that is not a whole lease object (it then counts as expired)."""
        try:
            data = json.loads(raw.decode())
            return cls(str(data["owner"]), str(data["token"]), int(data["generation"]), float(data["acquired"]),
                       float(data["heartbeat"]), float(data["ttl"]), bool(data.get("released", False)),
                       str(data.get("pid_namespace", "")))
        except (ValueError, TypeError, KeyError, AttributeError):
            return None

    def live(self, now: float) -> bool:
        return not self.released and now - self.heartbeat <= self.ttl

    def holder_gone(self) -> bool:
        """True when the holder is a process of this machine (same host and PID namespace) that
        no longer runs: a killed run's leases are taken over at once instead of after the ttl.
        A reused pid only makes a dead holder look alive (then the ttl decides): never the
        other way round."""
        host, _, pid = self.owner.rpartition(":")
        return (host == socket.gethostname() and pid.isdigit() and bool(self.pid_namespace)
                and self.pid_namespace == _pid_namespace() and not _pid_running(int(pid)))

    def holds(self, now: float) -> bool:
        """Live and held by a process that may still be running."""
        return self.live(now) and not self.holder_gone()


@dataclass(frozen=True)
class HeldBy:
    """Why a lease was not granted: who holds it, since when, last heartbeat (UTC seconds)."""

    key: str
    owner: str
    since: float
    heartbeat: float
    ttl: float

    def describe(self, held: str = "") -> str:
        """`<held> by host:pid since <time> (...)`; `held` defaults to "lease '<key>' is held"."""
        held = held or f"lease {self.key!r} is held"
        return (f"{held} by {self.owner} since {_iso(self.since)} (last heartbeat {_iso(self.heartbeat)}; "
                f"a lease expires {self.ttl:.0f} s after its last heartbeat)")


def _gen_key(key: str, generation: int) -> str:
    return f"{key}/{generation:0{_GEN_WIDTH}d}{_SUFFIX}"


def _generations(kv: GroupKV, key: str) -> list[int]:
    """Generation numbers present under `key`, ascending (temporary and foreign files ignored)."""
    out = []
    for name in kv.list_prefix(f"{key}/", fresh=True):
        stem = name[len(key) + 1 :]
        if stem.endswith(_SUFFIX) and stem[: -len(_SUFFIX)].isdigit() and "/" not in stem:
            out.append(int(stem[: -len(_SUFFIX)]))
    return sorted(out)


class Lease:
    """A granted lease. Keep it alive with `heartbeat()` (or `kept_alive()`), end it with `release()`."""

    def __init__(self, kv: GroupKV, key: str, state: LeaseState) -> None:
        self.kv = kv
        self.key = key
        self.state = state

    @property
    def owner(self) -> str:
        return self.state.owner

    @property
    def generation(self) -> int:
        return self.state.generation

    def _current(self) -> tuple[bool, LeaseState | None]:
        """(our generation is the highest, the stored state of our generation)."""
        gens = _generations(self.kv, self.key)
        raw = self.kv.get(_gen_key(self.key, self.generation))
        state = LeaseState.from_bytes(raw) if raw is not None else None
        return bool(gens) and gens[-1] == self.generation, state

    def still_mine(self, now: float | None = None) -> bool:
        """True while nobody else can hold this lease: check right before committing work."""
        now = time.time() if now is None else now
        top, state = self._current()
        return top and state is not None and state.token == self.state.token and state.live(now)

    def heartbeat(self) -> None:
        """Prove liveness; raises LeaseLostError if the lease expired or was taken over."""
        now = time.time()
        if not self.still_mine(now):
            raise LeaseLostError(f"lease {self.key!r} of {self.owner} was lost (expired or taken over); "
                                 "its work must not be committed")
        new = LeaseState(**{**asdict(self.state), "heartbeat": now})
        self.kv.set(_gen_key(self.key, self.generation), new.to_bytes())
        self.state = new

    def release(self) -> None:
        """Free the lease for the next contender at once (a no-op if it was already lost)."""
        top, state = self._current()
        if top and state is not None and state.token == self.state.token and not state.released:
            gone = LeaseState(**{**asdict(self.state), "released": True})
            self.kv.set(_gen_key(self.key, self.generation), gone.to_bytes())
            self.state = gone

    @contextmanager
    def kept_alive(self, interval_s: float | None = None) -> Iterator["Lease"]:
        """Heartbeat in a background thread while the block runs; release at the end.

        A lost lease stops the heartbeats; the block should call `still_mine()` before committing.
        """
        interval = interval_s if interval_s is not None else self.state.ttl / HEARTBEATS_PER_TTL
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(interval):
                try:
                    self.heartbeat()
                except LeaseLostError:
                    return
                except OSError:
                    continue  # a network blip: the next beat may still be in time

        thread = threading.Thread(target=beat, name=f"lease-heartbeat:{self.key}", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            stop.set()
            thread.join()
            self.release()


def try_acquire(kv: GroupKV, key: str, owner: str | None = None, ttl: float = DEFAULT_TTL_S) -> Lease | HeldBy:
    """Take the lease `key` if it is free, expired or released; else say who holds it. Never waits."""
    if ttl <= 0:
        raise ValueError("a lease ttl must be positive")
    owner = owner or default_owner()
    token = secrets.token_hex(16)
    for _ in range(_MAX_ROUNDS):
        gens = _generations(kv, key)
        nxt = 0
        if gens:
            raw = kv.get(_gen_key(key, gens[-1]))
            if raw is None:  # deleted since the listing (old generation collected): look again
                continue
            state = LeaseState.from_bytes(raw)
            now = time.time()
            if state is not None and state.holds(now):
                return HeldBy(key, state.owner, state.acquired, state.heartbeat, state.ttl)
            nxt = gens[-1] + 1
        now = time.time()
        mine = LeaseState(owner, token, nxt, now, now, float(ttl), pid_namespace=_pid_namespace())
        if kv.create(_gen_key(key, nxt), mine.to_bytes()):
            lease = Lease(kv, key, mine)
            top, stored = lease._current()
            if top and stored is not None and stored.token == token:
                _collect(kv, key, nxt)
                return lease
            # a stale listing let us re-create an old generation: drop it, the higher one rules
            if stored is not None and stored.token == token:
                kv.delete(_gen_key(key, nxt))
        # lost the race for this generation: report whoever won (or look again if it is gone)
        held = _holder(kv, key)
        if held is not None:
            return held
    raise StoreBusyError(f"lease {key!r}: its generations kept changing over {_MAX_ROUNDS} attempts; try again",
                         key=key)


def _holder(kv: GroupKV, key: str) -> HeldBy | None:
    gens = _generations(kv, key)
    if not gens:
        return None
    raw = kv.get(_gen_key(key, gens[-1]))
    state = LeaseState.from_bytes(raw) if raw is not None else None
    if state is None or not state.holds(time.time()):
        return None
    return HeldBy(key, state.owner, state.acquired, state.heartbeat, state.ttl)


def _collect(kv: GroupKV, key: str, current: int) -> None:
    """Delete generations below the current one (see the module docstring for why it is safe)."""
    for gen in _generations(kv, key):
        if gen < current:
            kv.delete(_gen_key(key, gen))


def acquire(
    kv: GroupKV,
    key: str,
    *,
    owner: str | None = None,
    ttl: float = DEFAULT_TTL_S,
    timeout_s: float = 0.0,
    held: str = "",
    sleep: Callable[[float], None] = time.sleep,
) -> Lease:
    """Take the lease, waiting up to `timeout_s` for the holder to release it or expire.

    Raises StoreBusyError naming the holder (host:pid) and since when, after the wait (`held`
    words the refusal, see `HeldBy.describe`).
    """
    deadline = time.monotonic() + timeout_s
    while True:
        got = try_acquire(kv, key, owner, ttl)
        if isinstance(got, Lease):
            return got
        if time.monotonic() >= deadline:
            raise StoreBusyError(
                f"{got.describe(held)}; waited {timeout_s:.0f} s for it. Let that process finish or stop it "
                "(a crashed holder's lease frees itself), then run again",
                owner=got.owner, key=key,
            )
        sleep(min(POLL_S, max(0.0, deadline - time.monotonic())))


def try_acquire_all(
    items: list[tuple[GroupKV, str]], owner: str | None = None, ttl: float = DEFAULT_TTL_S
) -> list[Lease] | HeldBy:
    """All of several leases (e.g. one shard in every encoder group a job writes) or none of them."""
    taken: list[Lease] = []
    for kv, key in items:
        got = try_acquire(kv, key, owner, ttl)
        if isinstance(got, HeldBy):
            for lease in taken:
                lease.release()
            return got
        taken.append(got)
    return taken
