"""`merv extract` on Ray: decode tasks on CPUs feed encoder actors that write whole shards.

Embedded by default (a fresh local Ray session in-process); on a cluster with `--ray-address`,
`RAY_ADDRESS`, or under `ray job submit` (which sets RAY_ADDRESS). Nothing else changes.

Flow control is by bytes, not shards: a shard holds as many samples as its *features* fit in
~128 MiB, which says nothing about decoded frames (a 720p clip decodes to ~88 MB). The driver
streams each open shard through its actor in batches and submits a decode only while the bytes
of decoded frames alive (decoding, waiting, being encoded) stay under `max_inflight_bytes`
(default: a fraction of Ray's object store), so a manifest of any size or resolution holds a
bounded amount in flight and nothing is spilled. Faults: a sample that fails to decode or encode
is recorded in its shard's commit; an actor that dies is restarted by Ray and its open shards are
redone from their decodes; a killed job leaves uncommitted shards, which the next run's plan
redoes. SIGINT / SIGTERM stop submitting, let shards whose samples are all decoded commit (within
`stop_grace_s`), abandon the rest and report what is left; a dead Ray node ends the job with a
clear error instead of a hang.
"""

from __future__ import annotations

import os
import re
import time
from collections import deque
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
from rich.text import Text

from merv import MervError
from merv.store import FeatureStore, LeaseLostError, parse_grid
from merv.store.codecs import compressors
from merv.store.group import lease_key
from merv.store.lease import DEFAULT_TTL_S, HEARTBEATS_PER_TTL, HeldBy, Lease, default_owner, try_acquire_all
from merv.store.paper import PAPER_ENCODER_NAMES

from .pixels import RESIZE_AT, DecodePlan
from .plan import Plan, ShardJob, decode_frames, group_spec, plan_shards, record_digest, upsampling_notes
from .ray_runtime import (
    ExtractError,
    NodeHealth,
    ObjectStoreMonitor,
    StopSignals,
    forwarded_env,
    init_ray,
    object_store_capacity,
    short_error,
)
from .sources import discover
from .worker import Decoded, ShardEncoder, ShardGrewError, ShardResult, WorkerConfig, decode_split

__all__ = ["ExtractError", "ExtractOptions", "ExtractSummary", "init_ray", "prepare_store", "run_extraction"]

MAX_ACTOR_REPLACEMENTS = 3  # per worker slot, after Ray's own restarts are used up
MAX_SHARD_ATTEMPTS = 3  # a shard whose actor died is redone at most this many times
INFLIGHT_FRACTION = 0.25  # default byte budget: this share of the cluster's object store
DECODES_PER_SLOT = 2  # decode tasks submitted per CPU slot: keeps decoders fed, bounds a mis-estimate
WAIT_S = 0.5  # the scheduler wakes at least this often (signals, health, progress)
# Ray frees unreferenced objects in batches, every `free_objects_period_milliseconds` (1 s by
# default): an encoded batch's frames stay in the object store that long after the call returns,
# so the budget keeps counting them for this long.
FREE_LAG_S = 1.5
RECHECK_S = 2.0  # how often shards held by another run are looked at again (committed? lease free?)


@dataclass
class ExtractOptions:
    """One extraction job: what to read, where to write, which encoders, how to run on Ray.

    The config of `merv extract` (YAML / JSON with `--config`, dotted `--set`, or the CLI flags,
    which map onto these keys one to one); every default is defined here and nowhere else.
    """

    source: str | None = None  # manifest / directory / tar(s); None: (re-)extract what the store lists
    store: str | None = None  # the feature store (path or fsspec URL)
    encoders: list[str] = field(default_factory=lambda: list(PAPER_ENCODER_NAMES))
    size: str = "paper"  # "paper" weights, or "small" / "tiny" random-initialised architectures
    weights: str | None = None  # a directory of weights, "random", or None: the HF cache (offline)
    grid: str | None = "8x8"  # "native" / None keeps each encoder's grid
    encoding: str = "fp16"  # fp16 | bitround | int8
    workers: int | None = None  # encoder actors; default one per GPU, else 1
    batch_size: int = 8  # clips per encoder forward, across videos
    inflight_per_worker: int = 2  # shards open per actor: bounds the actors' feature buffers
    retry_failed: bool = False
    ray_address: str | None = None
    device: str = "auto"  # auto | cpu | cuda
    allow_download: bool = False
    shard_bytes: int | None = None
    samples_per_shard: int | None = None
    decode_cpus: float = 1.0  # logical CPUs per decode task
    worker_cpus: float | None = None  # per actor; default 1 with GPUs, 0 on CPU-only clusters (see _layout)
    torch_threads: int | None = None  # per actor; default: the CPUs each actor may use
    env: dict[str, str] = field(default_factory=dict)  # extra environment for the actors
    max_inflight_bytes: int | str | None = None  # decoded frames alive at once ("4GiB" ok); default INFLIGHT_FRACTION of the object store
    stop_grace_s: float = 60.0  # after SIGINT / SIGTERM: how long shards with every sample decoded may finish
    storage_options: dict[str, Any] = field(default_factory=dict)  # fsspec's, for URL sources, videos and the store
    decoder: str = "auto"  # auto (= PyAV, fastest in decode_bench) | pyav | decord | torchcodec: identical frames
    resize_at: str = "decode"  # decode: decode tasks ship each encoder's resized pixels | encoder: full frames (see pixels.py)
    codec: str | None = None  # codec chain of new groups' values (none | zstd-3 | blosc-lz4-5-bitshuffle ...); None: the encoding's measured default (store/codecs.py)

    def __post_init__(self) -> None:
        from merv.store.encoder_names import EncoderNameError, canonical_encoder_name

        try:  # one spelling per encoder: group names, worker configs and plans key by it
            self.encoders = [canonical_encoder_name(n) for n in self.encoders]
        except EncoderNameError as exc:
            raise ExtractError(f"--encoders: {exc}") from exc
        if self.max_inflight_bytes is not None:
            self.max_inflight_bytes = parse_bytes(self.max_inflight_bytes, "max_inflight_bytes")
        for name in ("batch_size", "inflight_per_worker"):
            if getattr(self, name) < 1:
                raise ExtractError(f"{name} must be at least 1, not {getattr(self, name)}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ExtractError(f"device {self.device!r}: use auto, cpu or cuda")
        if self.resize_at not in RESIZE_AT:
            raise ExtractError(f"resize_at {self.resize_at!r}: use decode (decode tasks ship resized pixels) or encoder")
        if self.codec is not None:
            try:
                compressors(self.codec)
            except ValueError as exc:
                raise ExtractError(f"codec: {exc}") from exc
        from .video import check_backend

        check_backend(self.decoder)


def load_extract_options(file: str | None = None, overrides: list[str] | tuple[str, ...] = (),
                         flags: dict[str, Any] | None = None) -> ExtractOptions:
    """The job's options from a config file, the CLI's flags and `--set` overrides (in that order)."""
    from merv.train.configurable import load_config

    return load_config(ExtractOptions, file=file, overrides=overrides, extra=flags)


_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12,
          "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str | int, option: str = "size") -> int:
    """`4GiB`, `500MB`, `1.5g`, `123456` -> bytes (decimal units for KB/MB/GB, binary for KiB/...)."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS or float(match.group(1)) <= 0:
        raise ExtractError(f"{option} {text!r}: expected a positive size such as 4GiB, 500MB or 2000000000")
    return int(float(match.group(1)) * _UNITS[unit])


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
    stopped: str | None = None  # the signal that stopped the job (SIGINT / SIGTERM), if one did
    by_other_runs: int = 0  # samples of planned shards that a concurrent run on the store committed
    notes: list[str] = field(default_factory=list)  # things the user should know (e.g. a grid kept native)
    left: int = 0  # samples of the plan not committed by this run
    inflight_budget_bytes: int = 0
    peak_inflight_bytes: int = 0  # decoded frames alive at once, as the driver accounted them
    object_store_peak_bytes: int | None = None  # Ray's object-store use, sampled
    spilled_bytes: int | None = None  # spilled to disk by Ray during the job

    @property
    def ok(self) -> bool:
        return not self.unfinished and not self.stopped

    def line(self) -> str:
        rate = (self.extracted + len(self.failed)) / self.seconds if self.seconds else 0.0
        text = (f"extracted {self.extracted}, skipped {self.skipped} (already committed), failed {len(self.failed)}; "
                f"{self.shards} shards, {self.bytes_written / 2**20:.2f} MiB written in {self.seconds:.1f}s "
                f"({rate:.2f} videos/s)")
        if self.by_other_runs:
            text += f"; {self.by_other_runs} committed by another run on this store"
        if self.failed_before:
            text += f"; {len(self.failed_before)} failed in earlier runs (--retry-failed retries them)"
        if self.stopped:
            text += f"; stopped by {self.stopped}: {self.left} samples left (re-run the same command to continue)"
        elif self.unfinished:
            text += f"; {len(self.unfinished)} shards NOT written (re-run to retry)"
        return text

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class _RateColumn(ProgressColumn):
    def render(self, task: Any) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed or 0:.2f} videos/s")


# ----------------------------------------------------------------------------------------- ray
def worker_env(opts: ExtractOptions, on_gpus: bool) -> dict[str, str]:
    """The environment the actors and decode tasks need: the driver's forwarded variables and
    `opts.env`; on CPUs also OMP_WAIT_POLICY=PASSIVE, because encoder threads share the cores with
    decode tasks and idle OpenMP threads must sleep, not spin at barriers (spinning threads steal
    the decoders' CPU; see the benchmark)."""
    env = forwarded_env(opts.env)
    if not on_gpus:
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return env


def _local_gpus() -> int:
    """GPUs a Ray session started on this machine would find (before starting it)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


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


# ----------------------------------------------------------------------------------------- store
def _encoder_infos(names: list[str], size: str, weights: str | None) -> dict[str, Any]:
    """Encoder identities for the group fingerprints. Paper models are built on the meta device
    (identity does not depend on reading the weights); small / tiny ones for real, since their weights
    file is fingerprinted by its hash."""
    from merv.store.encoder_names import EncoderNameError

    from .encoders import ENCODERS, build_encoder
    from .encoders.registry import check_encoder_name

    if not names:
        raise ExtractError(f"--encoders: no encoder given; known: {', '.join(ENCODERS)}, or timm:... / hf:... specs")
    try:
        names = [check_encoder_name(n) for n in names]
    except EncoderNameError as exc:
        raise ExtractError(f"--encoders: {exc}") from exc
    infos = {}
    for n in names:
        try:
            infos[n] = build_encoder(n, size=size, weights=weights, meta=size == "paper").info
        except EncoderNameError as exc:  # a generic spec naming a model the library does not have
            raise ExtractError(f"--encoders: {exc}") from exc
        except ValueError as exc:  # the size variant (or a weights option) the encoder does not have
            if isinstance(exc, MervError):
                raise
            raise ExtractError(f"--size {size}: {exc}") from exc
    return infos


def cluster_address(opts: ExtractOptions) -> str | None:
    return opts.ray_address or os.environ.get("RAY_ADDRESS") or None


def check_weights_here(infos: dict[str, Any], opts: ExtractOptions) -> None:
    """Fail before touching the store when published weights are missing on this machine (the
    embedded workers read the same disk). On a cluster the workers' disks decide, so each actor
    reports instead (see `_Run._check_actors`)."""
    from .encoders import resolve_weights

    if opts.size != "paper" or opts.weights == "random" or opts.allow_download:
        return
    from merv.store.encoder_names import slug

    for name, info in infos.items():
        if name.startswith("hf:"):  # its build (see _encoder_infos) already read the repo from disk
            continue
        resolve_weights(info.model_id, opts.weights, aliases=(name, slug(name)))


def prepare_store(source: str | None, store_url: str, opts: ExtractOptions) -> tuple[FeatureStore, list[str], DecodePlan]:
    """Discover samples, open / create the store, add samples and groups (driver only).

    Returns the store, the requested group keys and the decode plan (the frame count every sample
    is decoded at, and what each encoder's input is resized to in the decode task).
    `source` None extracts what the store already lists (e.g. a new encoder for an existing store).
    """
    try:
        pooled = parse_grid(opts.grid)
    except ValueError as exc:
        raise ExtractError(f"--grid {opts.grid!r}: {exc}; use HxW (8x8) or 'native'") from exc
    infos = _encoder_infos(opts.encoders, opts.size, opts.weights)
    if cluster_address(opts) is None:
        check_weights_here(infos, opts)
    frames = decode_frames([i.frames for i in infos.values()])
    try:
        specs = [group_spec(infos[n], pooled, opts.encoding, frames) for n in opts.encoders]
    except ValueError as exc:
        raise ExtractError(f"--encoding {opts.encoding!r}: {exc}") from exc
    so = opts.storage_options or None
    if store_url.startswith("memory://"):
        raise ExtractError(f"--store {store_url}: a memory:// store lives inside one process, and extraction writes "
                           "from Ray worker processes; use a local path or an object-store URL")
    records = discover(source, so) if source is not None else []
    create: dict[str, Any] = {"grid": pooled, "storage_options": so,
                              "bytes_per_sample": {k: max(s.bytes_per_sample(k) for s in specs) for k in ("video", "image")}}
    if opts.shard_bytes:
        create["shard_bytes"] = opts.shard_bytes
    if opts.samples_per_shard:
        create["samples_per_shard"] = opts.samples_per_shard
    store = FeatureStore.open_or_create(store_url, **create)
    if opts.samples_per_shard and set(store.meta.samples_per_shard.values()) != {opts.samples_per_shard}:
        raise ExtractError(f"store {store_url!r} has {store.meta.samples_per_shard} samples per shard; "
                           f"--samples-per-shard {opts.samples_per_shard} cannot change an existing store")
    with store.metadata_lock():  # a concurrent run on this store adds its samples before or after ours
        try:
            store.add_samples(records)
        except ValueError as exc:  # an id already in the store for another video / window
            raise ExtractError(str(exc)) from exc
        keys = [store.ensure_group(s, chain=opts.codec).key for s in specs]
    return store, keys, DecodePlan.for_encoders(frames, infos, opts.resize_at)


# ----------------------------------------------------------------------------------------- run
def run_extraction(source: str | None, store_url: str, opts: ExtractOptions, console: Console | None = None,
                   show_progress: bool = True) -> ExtractSummary:
    """Plan, then run every missing shard on Ray; returns what happened (also on partial failure
    and after a stop signal: `summary.stopped`)."""
    console = console or Console(stderr=True)
    t0 = time.perf_counter()
    store, keys, decode_plan = prepare_store(source, store_url, opts)
    plan = plan_shards(store, keys, retry_failed=opts.retry_failed)
    summary = ExtractSummary(samples=len(store.samples), skipped=plan.skipped_samples,
                             failed_before=plan.skipped_failed, groups=plan.groups,
                             notes=upsampling_notes([store.group(k).spec for k in keys], parse_grid(opts.grid)))
    if plan.jobs:
        address = cluster_address(opts)
        env = None if address else worker_env(opts, on_gpus=opts.device != "cpu" and _local_gpus() > 0)
        ray, started = init_ray(address, env)
        try:
            # only a session started here, on this machine, was given the workers' environment
            _Run(ray, store, plan, decode_plan, opts, summary, env_inherited=started and address is None).execute(
                console, show_progress)
        finally:
            if started:
                ray.shutdown()
    summary.seconds = time.perf_counter() - t0
    return summary


@dataclass
class _OpenShard:
    """A shard being extracted: its samples stream decode -> ready -> encode batch -> commit.

    Invariant: `next_sample` samples were submitted for decoding; of those, `decoding` are being
    decoded, `ready` wait for a batch, `encoding` are in encode calls, and `encoded` are done."""

    job: ShardJob
    slot: int
    attempt: int
    ids: list[str]
    sources: list[tuple[str, tuple[float | None, float | None, int | None]]]
    next_sample: int = 0
    decoding: int = 0
    ready: list[tuple[Decoded, Any]] = field(default_factory=list)  # (description, frames ref)
    ready_bytes: int = 0
    encoding: int = 0
    encoded: int = 0
    committing: bool = False

    @property
    def size(self) -> int:
        return len(self.ids)

    @property
    def all_submitted(self) -> bool:
        return self.next_sample == self.size

    @property
    def key(self) -> tuple[str, int]:
        return (self.job.kind, self.job.shard)


class _Run:
    """One execution of a plan: actors, decode tasks, the byte budget, result accounting.

    The driver's loop is the only place that submits work, so every bound is enforced in one
    place: open shards per actor (`inflight_per_worker`: bounds the actors' feature buffers),
    decoded bytes alive (`max_inflight_bytes`), decode tasks submitted (DECODES_PER_SLOT per CPU
    slot: a decode not yet running holds no memory, so this only bounds a mis-estimate)."""

    def __init__(self, ray: Any, store: FeatureStore, plan: Plan, decode_plan: DecodePlan, opts: ExtractOptions,
                 summary: ExtractSummary, env_inherited: bool = False) -> None:
        self.ray, self.store, self.plan, self.opts, self.summary = ray, store, plan, opts, summary
        self.table = store.samples
        needed = sorted({store.group(k).name for job in plan.jobs for k in job.group_keys})
        # decode tasks prepare inputs only for the encoders whose shards are still to do
        self.decode_plan = replace(decode_plan, encoders={n: e for n, e in decode_plan.encoders.items() if n in needed})
        workers, gpus, cpus, threads = _layout(ray, opts)
        self.config = WorkerConfig(
            needed, {n: k for n, k in plan.groups.items() if n in needed}, size=opts.size, weights=opts.weights,
            batch_size=opts.batch_size, device=opts.device, allow_download=opts.allow_download, torch_threads=threads,
            storage_options=dict(opts.storage_options),
        )
        # a session this run started already gave its workers the environment (see init_ray)
        env = {} if env_inherited else worker_env(opts, on_gpus=bool(gpus))
        # Calls made while an actor restarts are replayed on the new process; a shard whose
        # buffered features died with the old one is then caught at commit and redone (see _redo).
        options: dict[str, Any] = dict(num_cpus=cpus, num_gpus=gpus, max_restarts=3, max_task_retries=3,
                                       scheduling_strategy="SPREAD")
        if env:
            options["runtime_env"] = {"env_vars": env}
        self.actor_cls = ray.remote(_ExtractActor).options(**options)
        decode_options: dict[str, Any] = dict(num_cpus=opts.decode_cpus, max_retries=3, num_returns=2)
        if env:
            decode_options["runtime_env"] = {"env_vars": env}
        self.decode = ray.remote(decode_split).options(**decode_options)
        self.actors = [self._start_actor() for _ in range(workers)]
        self.replaced = [0] * workers
        cluster_cpus = float(ray.cluster_resources().get("CPU", 1))
        self.decode_cap = max(1, DECODES_PER_SLOT * int(cluster_cpus // max(opts.decode_cpus, 1e-3)))
        capacity = object_store_capacity(ray)
        self.budget = int(opts.max_inflight_bytes or max(1, INFLIGHT_FRACTION * capacity))
        summary.inflight_budget_bytes = self.budget
        # scheduler state
        self.pending: deque[tuple[ShardJob, int]] = deque((job, 1) for job in plan.jobs)
        self.open: list[_OpenShard] = []
        self.waiting: dict[Any, tuple[str, _OpenShard, Any]] = {}  # ref -> (what, shard, detail)
        self.decodes = 0  # decode tasks submitted and not yet described
        self.held = 0  # bytes reserved for decoded frames alive (estimates until a decode reports)
        self.committed = 0  # samples of shards committed by this run
        # one writer per shard across concurrent runs on this store: a lease per (group, shard)
        self.owner = default_owner()
        self.leases: dict[tuple[str, int], dict[str, Lease]] = {}  # open shard -> group key -> lease
        self.deferred: list[tuple[ShardJob, int, float]] = []  # (job, attempt, when to look again)
        self.next_beat = time.monotonic() + DEFAULT_TTL_S / HEARTBEATS_PER_TTL
        self.releasing: deque[tuple[float, int]] = deque()  # (when Ray has freed them, bytes) of encoded batches
        self.estimate: dict[str, int] = {}  # largest decoded sample seen, per kind
        self.progress: Any = None
        self.bar: Any = None

    def _start_actor(self) -> Any:
        return self.actor_cls.remote(self.config, self.store.url)

    def _check_actors(self) -> None:
        """Fail fast, with the worker's own reason, when the encoders cannot be built."""
        try:
            self.summary.workers = self.ray.get([a.ready.remote() for a in self.actors])
        except self.ray.exceptions.RayError as exc:
            raise ExtractError(f"extraction workers could not start: {short_error(exc)}") from exc

    # ------------------------------------------------------------------------------ the loop
    def execute(self, console: Console | None, show_progress: bool) -> None:
        progress = Progress(TextColumn("[bold]extract"), BarColumn(), MofNCompleteColumn(), _RateColumn(),
                            TextColumn("eta"), TimeRemainingColumn(), console=console,
                            disable=not show_progress or console is None)
        health = NodeHealth(self.ray)
        monitor = ObjectStoreMonitor(self.ray)
        try:
            with StopSignals() as stop, monitor.running():
                self._check_actors()
                with progress:
                    self.progress, self.bar = progress, progress.add_task("extract", total=self.plan.samples)
                    self._loop(stop, health)
        finally:
            self.summary.object_store_peak_bytes = monitor.use.peak_bytes
            self.summary.spilled_bytes = monitor.use.spilled_bytes
            self.summary.left = self.plan.samples - self.committed - self.summary.by_other_runs
            for leases in self.leases.values():
                self._release(leases)
            if not self.summary.stopped:
                for shard in self.open:
                    self.summary.unfinished.setdefault(f"{shard.job.kind} shard {shard.job.shard}", "not finished")
            for actor in self.actors:
                try:
                    self.ray.kill(actor)
                except Exception:  # noqa: BLE001 - the runtime may be gone already
                    pass

    def _loop(self, stop: StopSignals, health: NodeHealth) -> None:
        deadline: float | None = None
        while self.pending or self.open or self.deferred:
            dead = health.dead()
            if dead:
                raise ExtractError(f"{dead}: the Ray runtime under this job died. Committed shards are kept; "
                                   "re-run the same `merv extract` command to continue")
            if stop.requested and deadline is None:
                self.summary.stopped = stop.name
                deadline = time.monotonic() + self.opts.stop_grace_s
                self._stop_accepting()
            if deadline is not None and (len(stop.received) > 1 or time.monotonic() > deadline):
                for shard in list(self.open):
                    self._drop(shard, f"stopped by {self.summary.stopped} before it was written")
                break
            self._release_freed()
            self._keep_leases()
            if deadline is None:
                self._recheck_deferred()
                self._open_shards()
                self._submit_decodes()
            self._submit_batches()
            if not self.waiting:  # cannot happen with open shards (something is always submittable)
                time.sleep(WAIT_S)
                continue
            done, _ = self.ray.wait(list(self.waiting), num_returns=1, timeout=WAIT_S)
            if done:  # take everything finished by now, not one at a time
                done, _ = self.ray.wait(list(self.waiting), num_returns=len(self.waiting), timeout=0)
            for ref in done:
                entry = self.waiting.pop(ref, None)
                if entry is not None:
                    getattr(self, f"_on_{entry[0]}")(ref, entry[1], entry[2])
            if done and self.progress is not None:  # encoded samples count: a big shard moves the bar too
                self.progress.update(self.bar, completed=self.committed + sum(s.encoded for s in self.open))

    def _stop_accepting(self) -> None:
        """First stop signal: nothing new starts; shards still waiting for decodes are abandoned
        (they could take arbitrarily long), shards whose samples are all decoded may finish."""
        self.pending.clear()
        self.deferred.clear()
        for shard in list(self.open):
            if not shard.all_submitted:
                self._drop(shard, f"stopped by {self.summary.stopped} before it was written")

    # ------------------------------------------------------------------------------ submitting
    def _open_shards(self) -> None:
        per_actor = max(1, self.opts.inflight_per_worker)
        for slot in range(len(self.actors)):
            while self.pending and sum(s.slot == slot for s in self.open) < per_actor:
                job, attempt = self.pending.popleft()
                claimed = self._claim(job, attempt)
                if claimed is None:
                    continue
                job = claimed
                idx = self.table.indices_of_rows(job.kind, range(*job.rows))
                records = [self.table.record(int(i)) for i in idx]
                self.open.append(_OpenShard(job, slot, attempt, [r.id for r in records],
                                            [(r.source, (r.start, r.end, r.end_frame)) for r in records]))

    # ------------------------------------------------------------------------------ leases
    def _claim(self, job: ShardJob, attempt: int) -> ShardJob | None:
        """Take the write lease of the shard in every group the job writes (all or none), then
        drop the groups another run committed meanwhile. None: the shard is held by another run
        (looked at again later) or was finished by one."""
        kind, shard = job.kind, job.shard
        groups = [self.store.group(k) for k in job.group_keys]
        rows = groups[0].shard_range(kind, shard, fresh=True)
        if (rows.start, rows.stop) != job.rows:  # another run appended samples to this (last) shard
            self.store.refresh()
            self.table = self.store.samples
            groups = [self.store.group(k) for k in job.group_keys]
            job = replace(job, rows=(rows.start, rows.stop))
        got = try_acquire_all([(g.kv, lease_key(kind, shard)) for g in groups], owner=self.owner)
        if isinstance(got, HeldBy):
            self.deferred.append((job, attempt, time.monotonic() + RECHECK_S))
            return None
        todo: dict[str, Lease] = {}
        seen = dict(zip(job.group_keys, job.seen))
        for group, lease in zip(groups, got):
            if _committed_since(group, kind, shard, seen.get(group.key, "")):
                lease.release()
            else:
                todo[group.key] = lease
        if not todo:
            self.summary.by_other_runs += job.size
            return None
        self.leases[(kind, shard)] = todo
        return replace(job, group_keys=tuple(todo), seen=tuple(seen.get(k, "") for k in todo))

    def _recheck_deferred(self) -> None:
        now = time.monotonic()
        due = [d for d in self.deferred if d[2] <= now]
        for item in due:
            self.deferred.remove(item)
            self.pending.append(item[:2])

    def _keep_leases(self) -> None:
        """Heartbeat every held lease a few times per ttl; a shard whose lease was lost (this
        driver stalled past the ttl and another run took over) is given up to that run."""
        if time.monotonic() < self.next_beat:
            return
        self.next_beat = time.monotonic() + DEFAULT_TTL_S / HEARTBEATS_PER_TTL
        for key, leases in list(self.leases.items()):
            try:
                for lease in leases.values():
                    lease.heartbeat()
            except LeaseLostError:
                shard = next(s for s in self.open if s.key == key)
                self._drop(shard, "its lease was taken over by another run on this store (that run writes it)")
            except OSError:
                continue  # a network blip: the next beat is still well within the ttl

    @staticmethod
    def _release(leases: dict[str, Lease]) -> None:
        for lease in leases.values():
            try:
                lease.release()
            except Exception:  # noqa: BLE001 - an unreleased lease only expires later
                pass

    def _cost(self, kind: str) -> int | None:
        """Bytes to reserve for one more decode of `kind`: the largest sample of that kind seen so
        far; None while none has been decoded (then a single probe decode runs)."""
        return self.estimate.get(kind)

    def _submit_decodes(self) -> None:
        """Round-robin over actors, oldest open shard first within each: every actor gets work
        and batches fill up shard by shard."""
        progressed = True
        while progressed and self.decodes < self.decode_cap:
            progressed = False
            for slot in range(len(self.actors)):
                shard = next((s for s in self.open if s.slot == slot and not s.all_submitted), None)
                if shard is None or self.decodes >= self.decode_cap:
                    continue
                cost = self._cost(shard.job.kind)
                if cost is None:  # no sample of this kind decoded yet: one probe at a time
                    if any(what == "decode" and s.job.kind == shard.job.kind for what, s, _ in self.waiting.values()):
                        continue
                elif self.held + cost > self.budget and self.held > 0:
                    return  # over budget (a single sample larger than the budget still runs alone)
                self._submit_decode(shard, cost)
                progressed = True

    def _submit_decode(self, shard: _OpenShard, cost: int | None) -> None:
        i = shard.next_sample
        source, window = shard.sources[i]
        row = shard.job.rows[0] + i
        meta_ref, frames_ref = self.decode.remote(source, window, row, self.decode_plan, self.opts.storage_options or None,
                                                  self.opts.decoder)
        self.waiting[meta_ref] = ("decode", shard, (frames_ref, cost, row))
        shard.next_sample += 1
        shard.decoding += 1
        self.decodes += 1
        self.held += cost or 0
        self._track_peak()

    def _submit_batches(self) -> None:
        """A batch goes to the shard's actor when full, or when the shard can get no more samples
        soon (all submitted, or none decoding: then waiting could only deadlock the budget)."""
        batch = max(1, self.opts.batch_size)
        for shard in self.open:
            while len(shard.ready) >= batch or (shard.ready and shard.decoding == 0):
                items, shard.ready = shard.ready[:batch], shard.ready[batch:]
                nbytes = sum(d.nbytes for d, _ in items)
                shard.ready_bytes -= nbytes
                ref = self.actors[shard.slot].encode_batch.remote(
                    shard.job.kind, shard.job.shard, list(shard.job.group_keys), [d for d, _ in items],
                    *[f for _, f in items])
                self.waiting[ref] = ("encode", shard, (len(items), nbytes))
                shard.encoding += len(items)
            if shard.encoded == shard.size and not shard.committing:
                states = {k: lease.state for k, lease in self.leases[shard.key].items()}
                ref = self.actors[shard.slot].commit.remote(shard.job.kind, shard.job.shard, shard.ids,
                                                             shard.job.rows[0], states)
                self.waiting[ref] = ("commit", shard, None)
                shard.committing = True

    def _release_freed(self) -> None:
        now = time.monotonic()
        while self.releasing and self.releasing[0][0] <= now:
            self.held -= self.releasing.popleft()[1]

    def _track_peak(self) -> None:
        self.summary.peak_inflight_bytes = max(self.summary.peak_inflight_bytes, self.held)

    # ------------------------------------------------------------------------------ results
    def _on_decode(self, ref: Any, shard: _OpenShard, detail: Any) -> None:
        frames_ref, cost, row = detail
        shard.decoding -= 1
        self.decodes -= 1
        try:
            decoded: Decoded = self.ray.get(ref)
        except self.ray.exceptions.RayError as exc:  # the decode worker itself died (Ray's retries spent)
            decoded = Decoded(row, None, error=f"decode task failed: {short_error(exc)}")
        kind = shard.job.kind
        if decoded.nbytes:
            self.estimate[kind] = max(self.estimate.get(kind, 0), decoded.nbytes)
        self.held += decoded.nbytes - (cost or 0)
        self._track_peak()
        shard.ready.append((decoded, None if decoded.error else frames_ref))
        shard.ready_bytes += decoded.nbytes

    def _on_encode(self, ref: Any, shard: _OpenShard, detail: Any) -> None:
        count, nbytes = detail
        self.releasing.append((time.monotonic() + FREE_LAG_S, nbytes))
        shard.encoding -= count
        try:
            self.ray.get(ref)
        except self.ray.exceptions.RayError as exc:
            self._redo(shard, exc)
            return
        shard.encoded += count

    def _on_commit(self, ref: Any, shard: _OpenShard, _detail: Any) -> None:
        try:
            result: ShardResult = self.ray.get(ref)
        except self.ray.exceptions.RayError as exc:
            self._redo(shard, exc)
            return
        self.open.remove(shard)
        self._release(self.leases.pop(shard.key, {}))
        self.committed += shard.size
        summary = self.summary
        summary.shards += 1
        summary.extracted += result.samples - len(result.failed)
        summary.failed.update(result.failed)
        summary.bytes_written += result.bytes_written

    # ------------------------------------------------------------------------------ faults
    def _drop(self, shard: _OpenShard, why: str) -> None:
        """Give a shard up: forget its work in flight, free its budget; nothing is committed."""
        later = time.monotonic() + FREE_LAG_S  # dropped objects are freed like encoded ones
        for ref, (what, owner, detail) in list(self.waiting.items()):
            if owner is shard:
                del self.waiting[ref]
                if what == "decode":
                    self.decodes -= 1
                    self.releasing.append((later, detail[1] or 0))
                elif what == "encode":
                    self.releasing.append((later, detail[1]))
        self.releasing.append((later, shard.ready_bytes))
        shard.ready, shard.ready_bytes = [], 0
        if shard in self.open:
            self.open.remove(shard)
        self._release(self.leases.pop(shard.key, {}))
        try:
            self.actors[shard.slot].abandon.remote(shard.job.kind, shard.job.shard)
        except Exception:  # noqa: BLE001 - a dead actor has nothing to forget
            pass
        self.summary.unfinished[f"{shard.job.kind} shard {shard.job.shard}"] = why

    def _redo(self, shard: _OpenShard, exc: BaseException) -> None:
        """An encode or commit failed (its actor died or restarted): redo the whole shard, from its
        decodes, up to MAX_SHARD_ATTEMPTS times; after Ray's own restarts are spent, replace the
        actor."""
        why = short_error(exc)
        self._drop(shard, why)
        if isinstance(getattr(exc, "cause", None), LeaseLostError):
            return  # another run owns the shard now; it stays in `unfinished` for this run
        if isinstance(getattr(exc, "cause", None), ShardGrewError):
            shard.attempt -= 1  # not a fault: the shard is re-read (see _claim) and done again
        if isinstance(exc, self.ray.exceptions.ActorDiedError) and self.replaced[shard.slot] < MAX_ACTOR_REPLACEMENTS:
            self.replaced[shard.slot] += 1
            self.actors[shard.slot] = self._start_actor()
        if shard.attempt < MAX_SHARD_ATTEMPTS and not self.summary.stopped:
            del self.summary.unfinished[f"{shard.job.kind} shard {shard.job.shard}"]
            self.pending.appendleft((shard.job, shard.attempt + 1))


def _committed_since(group: Any, kind: str, shard: int, seen: str) -> bool:
    """The shard holds a valid commit record other than the one the plan saw (digest `seen`):
    another run committed it after this run planned (also what --retry-failed must not redo)."""
    record = group.commits_of(kind, [shard]).get(shard)
    return record is not None and record_digest(record) != seen


class _ExtractActor:
    """Ray actor: loads the encoders once, then encodes shards batch by batch and writes them."""

    def __init__(self, config: WorkerConfig, store_url: str) -> None:
        self.encoder = ShardEncoder(config, store_url)

    def ready(self) -> dict[str, Any]:
        import torch

        return {"worker": self.encoder.worker, "device": str(self.encoder.device), "threads": torch.get_num_threads(),
                "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}

    def encode_batch(self, kind: str, shard: int, group_keys: list[str], decoded: list[Decoded],
                     *frames: Any) -> int:
        for d, f in zip(decoded, frames):
            d.frames = f
        return self.encoder.encode_batch(kind, shard, group_keys, decoded)

    def commit(self, kind: str, shard: int, ids: list[str], start: int, leases: dict[str, Any]) -> ShardResult:
        return self.encoder.commit(kind, shard, ids, start, leases)

    def abandon(self, kind: str, shard: int) -> None:
        self.encoder.abandon(kind, shard)

    def process(self, kind: str, shard: int, group_keys: list[str], ids: list[str], *decoded: Decoded) -> ShardResult:
        """A whole shard from already decoded samples in one call (the benchmark's encode-only run)."""
        return self.encoder.process(kind, shard, group_keys, ids, list(decoded))
