"""`merv extract` on Ray: decode tasks on CPUs feed encoder actors that write whole shards.

Embedded by default (a fresh local Ray session in-process); on a cluster with `--ray-address`,
`RAY_ADDRESS`, or under `ray job submit` (which sets RAY_ADDRESS). Nothing else changes.

Flow control: the driver keeps at most `inflight_per_worker` shards per actor submitted (their
decode tasks included), so objects in flight stay bounded whatever the manifest size. Faults:
a sample that fails to decode or encode is recorded in its shard's commit; an actor process that
dies is restarted by Ray and its shard retried (shards are rewritten whole, so a retry is
harmless); a killed job leaves uncommitted shards, which the next run's plan redoes.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
from rich.text import Text

from merv import MervError
from merv.store import FeatureStore, parse_grid

from .plan import Plan, ShardJob, decode_frames, group_spec, plan_shards
from .sources import discover
from .worker import Decoded, ShardEncoder, ShardResult, WorkerConfig, decode_sample

FORWARD_ENV_PREFIXES = ("HF_", "HUGGINGFACE_", "TRANSFORMERS_", "TORCH_HOME", "MERV_")
MAX_ACTOR_REPLACEMENTS = 3  # per worker slot, after Ray's own restarts are used up


class ExtractError(MervError, RuntimeError):
    """The job cannot run at all (e.g. no worker can load the encoders); says why."""


@dataclass
class ExtractOptions:
    encoders: list[str]
    size: str = "paper"  # "paper" weights, or "small" / "tiny" random-initialised architectures
    weights: str | None = None
    grid: str | None = "8x8"  # "native" / None keeps each encoder's grid
    encoding: str = "fp16"
    workers: int | None = None  # encoder actors; default one per GPU, else 1
    batch_size: int = 8  # clips per encoder forward, across videos
    inflight_per_worker: int = 2  # shards submitted per actor: bounds memory on any manifest size
    retry_failed: bool = False
    ray_address: str | None = None
    device: str = "auto"
    allow_download: bool = False
    shard_bytes: int | None = None
    samples_per_shard: int | None = None
    decode_cpus: float = 1.0  # logical CPUs per decode task
    worker_cpus: float | None = None  # per actor; default 1 with GPUs, 0 on CPU-only clusters (see _layout)
    torch_threads: int | None = None  # per actor; default: the CPUs each actor may use
    env: dict[str, str] = field(default_factory=dict)  # extra environment for the actors


@dataclass
class ExtractSummary:
    samples: int = 0  # in the store
    extracted: int = 0
    skipped: int = 0  # in shards committed before this run (every requested encoder)
    failed: dict[str, str] = field(default_factory=dict)  # sample id -> reason, this run
    failed_before: dict[str, str] = field(default_factory=dict)  # recorded by earlier runs (skipped)
    unfinished: dict[str, str] = field(default_factory=dict)  # "kind shard N" -> why it was not written
    bytes_written: int = 0
    shards: int = 0
    seconds: float = 0.0
    groups: dict[str, str] = field(default_factory=dict)
    workers: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.unfinished

    def line(self) -> str:
        rate = (self.extracted + len(self.failed)) / self.seconds if self.seconds else 0.0
        text = (f"extracted {self.extracted}, skipped {self.skipped} (already committed), failed {len(self.failed)}; "
                f"{self.shards} shards, {self.bytes_written / 2**20:.2f} MiB written in {self.seconds:.1f}s "
                f"({rate:.2f} videos/s)")
        if self.failed_before:
            text += f"; {len(self.failed_before)} failed in earlier runs (--retry-failed retries them)"
        if self.unfinished:
            text += f"; {len(self.unfinished)} shards NOT written (re-run to retry)"
        return text

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class _RateColumn(ProgressColumn):
    def render(self, task: Any) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed or 0:.2f} videos/s")


# ----------------------------------------------------------------------------------------- ray
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


def init_ray(address: str | None) -> tuple[Any, bool]:
    """(ray, started_here). Join the cluster at `address` (see `cluster_address`: the option or
    RAY_ADDRESS, which `ray job submit` sets), else start a fresh local session; reuse a session
    this process already has."""
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
        ray.init(address="local", include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING,
                 _node_ip_address="127.0.0.1")
    return ray, True


def _layout(ray: Any, opts: ExtractOptions) -> tuple[int, float, float, int]:
    """(workers, GPUs per worker, logical CPUs per worker, torch threads per worker).

    With GPUs: one actor per GPU by default (more share GPUs fractionally), 1 CPU each; decoding
    gets the other CPUs. On CPUs only, encoding and decoding share the cores: actors reserve no
    logical CPU (every CPU stays schedulable for decode tasks) and run `cpus / workers` torch
    threads, so whichever stage has work uses the cores (the benchmark measures how close this
    gets to the sharing limit).
    """
    resources = ray.cluster_resources()
    gpus = 0 if opts.device == "cpu" else int(resources.get("GPU", 0))
    cpus = int(resources.get("CPU", 1))
    node_cpus = max((int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")), default=cpus)
    workers = opts.workers or max(1, gpus)
    per_gpu = min(1.0, gpus / workers) if gpus else 0.0
    worker_cpus = opts.worker_cpus if opts.worker_cpus is not None else (1.0 if gpus else 0.0)
    threads = opts.torch_threads or (max(1, int(worker_cpus)) if gpus else max(1, min(node_cpus, cpus // workers)))
    if cpus - workers * worker_cpus < opts.decode_cpus:
        raise ExtractError(
            f"{workers} workers x {worker_cpus} CPUs leave no CPU for a decode task ({opts.decode_cpus} CPUs) "
            f"on a cluster with {cpus} CPUs; lower --workers or --worker-cpus"
        )
    return workers, per_gpu, worker_cpus, threads


def _forwarded_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k.startswith(FORWARD_ENV_PREFIXES)}
    return {**env, **extra}


def _short_error(exc: BaseException) -> str:
    """The root cause of a Ray error in one line (Ray wraps it in tracebacks)."""
    cause = getattr(exc, "cause", None) or exc.__cause__
    if isinstance(cause, BaseException) and cause is not exc:
        return f"{type(cause).__name__}: {cause}"[:1500]
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip() and not set(ln.strip()) <= set("^~")]
    return (lines[-1] if lines else type(exc).__name__)[:1500]


# ----------------------------------------------------------------------------------------- store
def _encoder_infos(names: list[str], size: str, weights: str | None) -> dict[str, Any]:
    """Encoder identities for the group fingerprints. Paper models are built on the meta device
    (identity does not depend on reading the weights); small / tiny ones for real, since their weights
    file is fingerprinted by its hash."""
    from .encoders import ENCODERS, build_encoder

    unknown = [n for n in names if n not in ENCODERS]
    if unknown or not names:
        raise ValueError(f"unknown encoder(s) {', '.join(unknown) or '(none given)'}; known: {', '.join(ENCODERS)}")
    return {n: build_encoder(n, size=size, weights=weights, meta=size == "paper").info for n in names}


def cluster_address(opts: ExtractOptions) -> str | None:
    return opts.ray_address or os.environ.get("RAY_ADDRESS") or None


def check_weights_here(infos: dict[str, Any], opts: ExtractOptions) -> None:
    """Fail before touching the store when published weights are missing on this machine (the
    embedded workers read the same disk). On a cluster the workers' disks decide, so each actor
    reports instead (see `_Run._check_actors`)."""
    from .encoders import resolve_weights

    if opts.size != "paper" or opts.weights == "random" or opts.allow_download:
        return
    for name, info in infos.items():
        resolve_weights(info.model_id, opts.weights, aliases=(name,))


def prepare_store(source: str | None, store_url: str, opts: ExtractOptions) -> tuple[FeatureStore, list[str], int]:
    """Discover samples, open / create the store, add samples and groups (driver only).

    Returns the store, the requested group keys and the frame count every sample is decoded at.
    `source` None extracts what the store already lists (e.g. a new encoder for an existing store).
    """
    pooled = parse_grid(opts.grid)
    infos = _encoder_infos(opts.encoders, opts.size, opts.weights)
    if cluster_address(opts) is None:
        check_weights_here(infos, opts)
    frames = decode_frames([i.frames for i in infos.values()])
    specs = [group_spec(infos[n], pooled, opts.encoding, frames) for n in opts.encoders]
    records = discover(source) if source is not None else []
    create: dict[str, Any] = {"grid": pooled,
                              "bytes_per_sample": {k: max(s.bytes_per_sample(k) for s in specs) for k in ("video", "image")}}
    if opts.shard_bytes:
        create["shard_bytes"] = opts.shard_bytes
    if opts.samples_per_shard:
        create["samples_per_shard"] = opts.samples_per_shard
    store = FeatureStore.open_or_create(store_url, **create)
    if opts.samples_per_shard and set(store.meta.samples_per_shard.values()) != {opts.samples_per_shard}:
        raise ValueError(f"store {store_url!r} has {store.meta.samples_per_shard} samples per shard; "
                         f"--samples-per-shard {opts.samples_per_shard} cannot change an existing store")
    store.add_samples(records)
    keys = [store.ensure_group(s).key for s in specs]
    return store, keys, frames


# ----------------------------------------------------------------------------------------- run
def run_extraction(source: str | None, store_url: str, opts: ExtractOptions, console: Console | None = None,
                   show_progress: bool = True) -> ExtractSummary:
    """Plan, then run every missing shard on Ray; returns what happened (also on partial failure)."""
    console = console or Console(stderr=True)
    t0 = time.perf_counter()
    store, keys, frames = prepare_store(source, store_url, opts)
    plan = plan_shards(store, keys, retry_failed=opts.retry_failed)
    summary = ExtractSummary(samples=len(store.samples), skipped=plan.skipped_samples,
                             failed_before=plan.skipped_failed, groups=plan.groups)
    if plan.jobs:
        ray, started = init_ray(cluster_address(opts))
        try:
            _Run(ray, store, plan, frames, opts, summary).execute(console, show_progress)
        finally:
            if started:
                ray.shutdown()
    summary.seconds = time.perf_counter() - t0
    return summary


class _Run:
    """One execution of a plan: actors, decode tasks, bounded submission, result accounting."""

    def __init__(self, ray: Any, store: FeatureStore, plan: Plan, frames: int, opts: ExtractOptions,
                 summary: ExtractSummary) -> None:
        self.ray, self.store, self.plan, self.frames, self.opts, self.summary = ray, store, plan, frames, opts, summary
        self.table = store.samples
        needed = sorted({store.group(k).name for job in plan.jobs for k in job.group_keys})
        workers, gpus, cpus, threads = _layout(ray, opts)
        self.config = WorkerConfig(
            needed, {n: k for n, k in plan.groups.items() if n in needed}, opts.size, opts.weights,
            tuple(store.meta.grid) if store.meta.grid else None, opts.batch_size, opts.device,  # type: ignore[arg-type]
            opts.allow_download, torch_threads=threads,
        )
        env = _forwarded_env(opts.env)
        if not gpus:
            # Encoder threads share the cores with decode tasks: idle OpenMP threads must sleep,
            # not spin at barriers (spinning threads steal the decoders' CPU; see the benchmark).
            env.setdefault("OMP_WAIT_POLICY", os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))
        options: dict[str, Any] = dict(num_cpus=cpus, num_gpus=gpus, max_restarts=3, max_task_retries=3,
                                       scheduling_strategy="SPREAD")
        if env:
            options["runtime_env"] = {"env_vars": env}
        self.actor_cls = ray.remote(_ExtractActor).options(**options)
        self.decode = ray.remote(decode_sample).options(num_cpus=opts.decode_cpus, max_retries=3)
        self.actors = [self._start_actor() for _ in range(workers)]
        self.replaced = [0] * workers

    def _start_actor(self) -> Any:
        return self.actor_cls.remote(self.config, self.store.url)

    def _check_actors(self) -> None:
        """Fail fast, with the worker's own reason, when the encoders cannot be built."""
        try:
            self.summary.workers = self.ray.get([a.ready.remote() for a in self.actors])
        except self.ray.exceptions.RayError as exc:
            raise ExtractError(f"extraction workers could not start: {_short_error(exc)}") from exc

    def _submit(self, job: ShardJob, actor: Any) -> Any:
        idx = self.table.indices_of_rows(job.kind, range(*job.rows))
        refs = []
        for i, row in zip(idx, range(*job.rows)):
            rec = self.table.record(int(i))
            refs.append(self.decode.remote(rec.source, (rec.start, rec.end, rec.end_frame), row, self.frames))
        ids = [self.table.ids[int(i)] for i in idx]
        return actor.process.remote(job.kind, job.shard, list(job.group_keys), ids, *refs)

    def execute(self, console: Console, show_progress: bool) -> None:
        ray, limit = self.ray, max(1, self.opts.inflight_per_worker)
        pending = deque(self.plan.jobs)
        inflight: dict[Any, tuple[ShardJob, int]] = {}
        load = [0] * len(self.actors)
        progress = Progress(TextColumn("[bold]extract"), BarColumn(), MofNCompleteColumn(), _RateColumn(),
                            TextColumn("eta"), TimeRemainingColumn(), console=console, disable=not show_progress)
        try:
            self._check_actors()
            with progress:
                bar = progress.add_task("extract", total=self.plan.samples)
                while pending or inflight:
                    for slot, actor in enumerate(self.actors):
                        while pending and load[slot] < limit:
                            job = pending.popleft()
                            inflight[self._submit(job, actor)] = (job, slot)
                            load[slot] += 1
                    done, _ = ray.wait(list(inflight), num_returns=1)
                    for ref in done:
                        job, slot = inflight.pop(ref)
                        load[slot] -= 1
                        self._account(ref, job, slot)
                        progress.advance(bar, job.size)
        finally:
            for actor in self.actors:
                ray.kill(actor)

    def _account(self, ref: Any, job: ShardJob, slot: int) -> None:
        summary = self.summary
        try:
            result: ShardResult = self.ray.get(ref)
        except self.ray.exceptions.RayError as exc:
            # Ray's own retries are spent: leave the shard uncommitted for the next run.
            summary.unfinished[f"{job.kind} shard {job.shard}"] = _short_error(exc)
            if isinstance(exc, self.ray.exceptions.ActorDiedError) and self.replaced[slot] < MAX_ACTOR_REPLACEMENTS:
                self.replaced[slot] += 1
                self.actors[slot] = self._start_actor()
            return
        summary.shards += 1
        summary.extracted += result.samples - len(result.failed)
        summary.failed.update(result.failed)
        summary.bytes_written += result.bytes_written


class _ExtractActor:
    """Ray actor: loads the encoders once, then processes whole shards."""

    def __init__(self, config: WorkerConfig, store_url: str) -> None:
        self.encoder = ShardEncoder(config, store_url)

    def ready(self) -> dict[str, Any]:
        import torch

        return {"worker": self.encoder.worker, "device": str(self.encoder.device), "threads": torch.get_num_threads()}

    def process(self, kind: str, shard: int, group_keys: list[str], ids: list[str], *decoded: Decoded) -> ShardResult:
        return self.encoder.process(kind, shard, group_keys, ids, list(decoded))
