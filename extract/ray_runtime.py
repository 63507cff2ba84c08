"""The Ray runtime around an extraction job: joining or starting Ray, stop signals, liveness of
the local Ray node, and what the object store holds.

Kept apart from the scheduler (`job.py`) because every piece here talks to Ray or to the
operating system rather than to the plan: each can be read (and tested) on its own.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from merv import MervError

# The driver's model-cache, object-store (credentials, endpoints) and merv variables reach the actors
# and decode tasks on every node, as they would on this machine.
FORWARD_ENV_PREFIXES = ("HF_", "HUGGINGFACE_", "TRANSFORMERS_", "TORCH_HOME", "MERV_", "AWS_", "GOOGLE_", "FSSPEC_")
HEALTH_EVERY_S = 1.0  # how often the driver checks that its Ray node is alive
MONITOR_EVERY_S = 0.25  # object-store usage sampling period


class ExtractError(MervError, RuntimeError):
    """The job cannot run at all, or the Ray runtime under it died; says why and what to do."""


# ------------------------------------------------------------------------------------ joining
def _use_local_token() -> None:
    """Ray >= 2.5x clusters use token auth whenever a token exists, but a client that is given an
    explicit address only sends one when RAY_AUTH_MODE=token. Turn that on when this machine has
    a token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token) and the user chose nothing."""
    if os.environ.get("RAY_AUTH_MODE"):
        return
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or str(Path.home() / ".ray" / "auth_token")
    if not (os.environ.get("RAY_AUTH_TOKEN") or (os.path.isfile(path) and os.path.getsize(path))):
        return
    os.environ["RAY_AUTH_MODE"] = "token"
    try:  # ray caches its config at import: refresh it, as ray's own CLI does
        from ray._raylet import Config

        Config.initialize("")
    except (ImportError, AttributeError):  # pragma: no cover - other ray versions read the env at init
        pass


def init_ray(address: str | None, env: dict[str, str] | None = None) -> tuple[Any, bool]:
    """(ray, started_here). Join the cluster at `address` (the option or RAY_ADDRESS, which
    `ray job submit` sets), else start a fresh local session; reuse a session this process has.

    `env`: variables the workers need. A session started here is given them at start, so every
    worker inherits them and Ray's prestarted workers can run actors and tasks at once; elsewhere
    the caller passes them to each actor and task as a runtime_env (each then needs a worker of
    its own, about 2 s apiece to start)."""
    import ray

    if ray.is_initialized():
        return ray, False
    if address:
        _use_local_token()
        try:
            ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
        except ConnectionError as exc:
            raise ExtractError(
                f"cannot join the Ray cluster at {address!r} ({exc}). Is it running? With token auth (Ray's "
                "default) this machine also needs the cluster's token: ~/.ray/auth_token, RAY_AUTH_TOKEN or "
                "RAY_AUTH_TOKEN_PATH"
            ) from exc
    else:
        # Ray announces its default token auth for every new local session: noise for a private one.
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
        # A private session on this machine: keep every Ray socket on loopback.
        with exported(env or {}):  # the node's processes, and so every worker, start with them
            ray.init(address="local", include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING,
                     _node_ip_address="127.0.0.1")
    return ray, True


@contextmanager
def exported(env: dict[str, str]) -> Iterator[None]:
    """`env` in this process's environment for the duration, then the previous values back."""
    before = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def forwarded_env(extra: dict[str, str]) -> dict[str, str]:
    """The driver's variables of FORWARD_ENV_PREFIXES, for actors and tasks on other nodes."""
    env = {k: v for k, v in os.environ.items() if k.startswith(FORWARD_ENV_PREFIXES)}
    return {**env, **extra}


def short_error(exc: BaseException) -> str:
    """The root cause of a Ray error in one line (Ray wraps it in tracebacks)."""
    cause = getattr(exc, "cause", None) or exc.__cause__
    if isinstance(cause, BaseException) and cause is not exc:
        return f"{type(cause).__name__}: {cause}"[:1500]
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip() and not set(ln.strip()) <= set("^~")]
    return (lines[-1] if lines else type(exc).__name__)[:1500]


# ------------------------------------------------------------------------------------ signals
class StopSignals:
    """SIGINT / SIGTERM (Ctrl-C, Slurm and Kubernetes preemption) become a request to stop that
    the scheduler reads at its next step, instead of an exception (or Ray's own SIGTERM handler,
    which tears the node down mid-write). The previous handlers are restored on exit. Only the
    main thread can install handlers; elsewhere this is inert."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.received: list[int] = []
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> int | None:
        """The first signal received, if any."""
        return self.received[0] if self.received else None

    @property
    def name(self) -> str | None:
        return signal.Signals(self.received[0]).name if self.received else None

    def _handle(self, signum: int, _frame: Any) -> None:
        self.received.append(signum)

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


# ------------------------------------------------------------------------------------ liveness
def _unix_socket_alive(path: str) -> bool:
    """A Ray node's raylet listens on this socket; a refused connection means it is gone."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(2.0)
        try:
            sock.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            return False
        except OSError:
            return True  # a timeout or a full backlog: busy, not dead
        return True


class NodeHealth:
    """Whether the Ray node this driver talks to is still alive.

    When the local raylet dies, `ray.wait` keeps returning nothing forever (checked on Ray 2.60),
    so the driver polls: the raylet's socket on every node kind, and, for a session this process
    started, the exit status of the raylet and GCS processes. Agents fate-share with their raylet.
    """

    def __init__(self, ray: Any) -> None:
        worker = ray._private.worker.global_worker
        node = getattr(worker, "node", None)
        self.socket = getattr(node, "raylet_socket_name", None)
        own = getattr(ray._private.worker, "_global_node", None)
        procs = getattr(own, "all_processes", {}) or {}
        self.processes = {name: [p.process for p in procs.get(name, []) if getattr(p, "process", None)]
                          for name in ("raylet", "gcs_server")}
        self._next = 0.0

    def dead(self) -> str | None:
        """None when alive, else what died (at most one check per HEALTH_EVERY_S)."""
        now = time.monotonic()
        if now < self._next:
            return None
        self._next = now + HEALTH_EVERY_S
        for name, procs in self.processes.items():
            for proc in procs:
                if proc.poll() is not None:
                    return f"the Ray {name} process (pid {proc.pid}) exited with status {proc.returncode}"
        if self.socket and not _unix_socket_alive(self.socket):
            return f"the local Ray raylet stopped answering on {self.socket}"
        return None


# ------------------------------------------------------------------------------------ object store
@dataclass
class StoreUse:
    """What Ray's object store held during the job (sampled), and what it spilled to disk."""

    peak_bytes: int | None = None
    spilled_bytes: int | None = None
    capacity_bytes: int | None = None


class ObjectStoreMonitor:
    """Samples the cluster's object-store use in a thread (Ray keeps no peak), and reads the bytes
    spilled to disk at the end. Uses Ray's own memory report (`ray memory --stats-only` reads the
    same reply); when that internal API is unavailable the figures stay None."""

    def __init__(self, ray: Any, every_s: float = MONITOR_EVERY_S) -> None:
        self.ray = ray
        self.every_s = every_s
        self.use = StoreUse()
        self._start_spilled: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="merv-object-store-monitor", daemon=True)

    def _stats(self) -> Any:
        from ray._private import internal_api, state

        return internal_api.get_memory_info_reply(state.state, timeout_seconds=5.0).store_stats

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.sample()

    def sample(self) -> None:
        try:
            stats = self._stats()
        except Exception:  # noqa: BLE001 - monitoring must never break the job
            return
        used = int(stats.object_store_bytes_used)
        self.use.peak_bytes = max(self.use.peak_bytes or 0, used)
        self.use.capacity_bytes = int(stats.object_store_bytes_avail)
        spilled = int(stats.spilled_bytes_total)
        if self._start_spilled is None:
            self._start_spilled = spilled
        self.use.spilled_bytes = spilled - self._start_spilled

    @contextmanager
    def running(self) -> Iterator[StoreUse]:
        self.sample()
        self._thread.start()
        try:
            yield self.use
        finally:
            self._stop.set()
            self._thread.join(timeout=10)
            self.sample()


def object_store_capacity(ray: Any) -> int:
    """Bytes of object store across the cluster (Ray's `object_store_memory` resource)."""
    return int(ray.cluster_resources().get("object_store_memory", 0))
