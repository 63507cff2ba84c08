"""The work itself, free of Ray: decode one sample, encode and write one whole shard.

`job.py` wraps these in Ray tasks (decoding, CPU) and actors (encoders, loaded once), so the
same code runs in-process for tests and debugging.

Decode tasks import only this module's top level, `sources` and `video` (no torch, no zarr:
several seconds per fresh worker process); torch and the store are imported where encoding starts.

Determinism: a sample's features do not depend on which other samples share its batch or on the
worker's thread count (checked bitwise by the tests on CPU), so a re-run, a retried shard or an
added encoder reproduces exactly what an uninterrupted run writes.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from dataclasses import KW_ONLY, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from merv.devices import resolve_device

if TYPE_CHECKING:

    from merv.store import EncoderGroup
    from merv.store.lease import LeaseState

    from .pixels import DecodePlan, EncoderInput

# Fault injection for the tests: when set to a path that does not exist yet, the first shard
# written in any worker creates it and kills its process after writing one group (mid-shard).
CRASH_ONCE_ENV = "MERV_TEST_CRASH_ONCE"


@dataclass
class Decoded:
    """A decoded sample or the reason it could not be decoded (recorded as a failure)."""

    row: int
    frames: np.ndarray | dict[str, EncoderInput] | None  # uint8 (T, H, W, 3) (T == 1 for images), or per-encoder inputs
    is_image: bool = False
    backend: str = ""
    error: str | None = None
    seconds: float = 0.0
    nbytes: int = 0  # bytes of `frames` (set by `decode_split`, which ships them separately)


class ShardIncompleteError(RuntimeError):
    """`commit` of a shard whose samples this actor has not all encoded: the actor restarted (its
    buffer is gone) or a batch was lost. The driver redoes the shard from its decodes."""


class ShardGrewError(ShardIncompleteError):
    """The store's last shard gained rows (a concurrent run added samples) since it was planned:
    the driver re-reads the shard's rows and redoes it."""


@dataclass
class _ShardBuffer:
    """Features of a shard being encoded batch by batch, kept until the whole shard is written.

    fp16 / bitround groups keep float16 (what is stored; the write rounds float32 to float16
    exactly once either way), int8 keeps float32 (the per-token scales are computed from it)."""

    group_keys: list[str]
    features: dict[str, dict[int, np.ndarray]] = field(default_factory=dict)  # group key -> row -> (t, h, w, d)
    failed: dict[str, dict[int, str]] = field(default_factory=dict)  # group key -> row -> reason
    decode_failed: dict[int, str] = field(default_factory=dict)
    rows_seen: set[int] = field(default_factory=set)
    decode_seconds: float = 0.0
    encode_seconds: float = 0.0


@dataclass
class ShardResult:
    kind: str
    shard: int
    samples: int
    failed: dict[str, str]  # sample id -> reason
    bytes_written: int  # bytes of the shard objects as stored (compressed)
    decode_seconds: float
    encode_seconds: float
    worker: str = ""


@dataclass
class WorkerConfig:
    encoders: list[str]
    groups: dict[str, str]  # encoder name -> group key, checked against the built encoder
    _: KW_ONLY  # the rest by name: a positional list silently shifts when a field goes
    size: str = "paper"
    weights: str | None = None
    batch_size: int = 8
    device: str = "auto"
    allow_download: bool = False
    torch_threads: int | None = None
    extra: dict[str, str] = field(default_factory=dict)
    storage_options: dict[str, Any] = field(default_factory=dict)  # fsspec's, for a store behind a URL


def decode_sample(source: str, window: tuple[float | None, float | None, int | None], row: int,
                  num_frames: int, storage_options: dict[str, Any] | None = None, decoder: str = "auto") -> Decoded:
    """Decode `num_frames` uniformly sampled frames of `source` (a path, a tar member or an fsspec
    URL) within `window` (start, end, end_frame) with `decoder` (see `merv.extract.video.load_clip`),
    or the reason it cannot be decoded."""
    from .sources import local_file
    from .video import load_clip

    start, end, end_frame = window
    t0 = time.perf_counter()
    try:
        with local_file(source, storage_options) as path:
            clip = load_clip(path, num_frames, start=start, end=end, end_frame=end_frame, backend=decoder)  # type: ignore[arg-type]
        return Decoded(row, clip.frames, clip.is_image, clip.backend, None, time.perf_counter() - t0)
    except Exception as exc:  # noqa: BLE001 - every failure is recorded with its reason, the job goes on
        return Decoded(row, None, error=f"{type(exc).__name__}: {exc}", seconds=time.perf_counter() - t0)


def decode_split(source: str, window: tuple[float | None, float | None, int | None], row: int,
                 plan: DecodePlan, storage_options: dict[str, Any] | None = None,
                 decoder: str = "auto") -> tuple[Decoded, np.ndarray | dict[str, EncoderInput] | None]:
    """`decode_sample` as two objects: the small description (with `nbytes`, read by the
    driver's memory budget) and the payload passed on to an encoder actor, never to the driver:
    each encoder's resized input (`pixels.prepare_inputs`), or the decoded frames when the plan
    resizes in the encoders."""
    from .pixels import prepare_inputs, shipped_bytes

    decoded = decode_sample(source, window, row, plan.frames, storage_options, decoder)
    frames, decoded.frames = decoded.frames, None
    payload: np.ndarray | dict[str, EncoderInput] | None = frames
    if frames is not None and plan.encoders:
        t0 = time.perf_counter()
        payload = prepare_inputs(frames, decoded.is_image, plan)
        decoded.seconds += time.perf_counter() - t0
    decoded.nbytes = shipped_bytes(payload)
    return decoded, payload


class ShardEncoder:
    """Holds the frozen encoders (weights loaded once) and turns decoded clips into written shards."""

    def __init__(self, config: WorkerConfig, store_url: str) -> None:
        import torch

        from merv.store import FeatureStore

        from .encoders import build_encoder

        if config.torch_threads:
            torch.set_num_threads(config.torch_threads)
        self.config = config
        self.device = resolve_device(config.device)
        self.encoders = {
            name: build_encoder(name, size=config.size, weights=config.weights, device=str(self.device),
                                allow_download=config.allow_download)
            for name in config.encoders
        }
        self.store = FeatureStore.open(store_url, mode="a", storage_options=config.storage_options or None)
        for name, key in config.groups.items():
            have, want = self.encoders[name].info.fingerprint(), self.store.group(key).spec.fingerprint
            if have != want:
                raise RuntimeError(
                    f"encoder {name!r} built on {socket.gethostname()} has fingerprint {have[:16]}, but the store group "
                    f"{key} was planned for {want[:16]}: the worker sees other weights than the driver "
                    "(check --weights / the HF cache on every node)"
                )
        # each group's stored grid: the requested one, or the encoder's own where that is smaller
        self.stored_hw = {name: tuple(self.store.group(key).spec.grid[-2:]) for name, key in config.groups.items()}
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        self._open: dict[tuple[str, int], _ShardBuffer] = {}

    # ------------------------------------------------------------------ encoding
    def encode_clips(self, name: str, clips: list[np.ndarray | dict[str, EncoderInput]], is_image: bool) -> list[np.ndarray]:
        """float32 (t, h, w, d) features per clip, pooled to its group's stored grid.

        A clip is the decoded frames or the decode task's per-encoder inputs (`pixels`). Clips are
        batched `batch_size` at a time across videos; each clip is preprocessed on its own (videos
        differ in resolution), exactly as `FrozenEncoder.encode` would.
        """
        import torch

        from merv.store.grid import pool_grid_torch

        enc = self.encoders[name]
        out: list[np.ndarray] = []
        autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda"
                    else contextlib.nullcontext())
        for start in range(0, len(clips), max(1, self.config.batch_size)):
            chunk = clips[start : start + self.config.batch_size]
            with torch.inference_mode():
                pixels = [self._pixels(name, c, is_image) for c in chunk]
                with autocast:
                    feats = enc(torch.cat(pixels)).float()
                if name in self.stored_hw:
                    feats = pool_grid_torch(feats, self.stored_hw[name])  # a no-op at the native grid
                out.extend(feats.cpu().numpy())
        return out

    def _pixels(self, name: str, clip: np.ndarray | dict[str, EncoderInput], is_image: bool) -> Any:
        """Model pixels (1, n, 3, S, S) on the device for one clip of encoder `name`."""

        from merv.extract.preprocess import finish_pixels
        from merv.store.grid import frames_to_encode

        from .video import subsample

        enc = self.encoders[name]
        n = frames_to_encode(enc.info.frames, enc.info.framewise, is_image)
        if isinstance(clip, np.ndarray):
            return enc.preprocess(_tensor(subsample(clip, n))[None].to(self.device))
        given = clip[name]
        if given.frames != n or given.preprocessing != enc.info.preprocessing:
            raise RuntimeError(f"{name}: the decode task prepared {given.frames} frames with another preprocessing "
                               "than this encoder's (driver and worker disagree on the encoder)")
        if given.stage == "frames":
            return enc.preprocess(_tensor(subsample(given.array, n))[None].to(self.device))
        return finish_pixels(_tensor(given.array).to(self.device), enc.info.preprocessing)

    def _encode_group(self, name: str, ok: list[Decoded], is_image: bool) -> tuple[dict[int, np.ndarray], dict[int, str]]:
        """Features by row; a failing batch falls back to one clip at a time so one bad sample
        (or an out-of-memory batch) costs only itself."""
        feats: dict[int, np.ndarray] = {}
        failed: dict[int, str] = {}
        try:
            for d, f in zip(ok, self.encode_clips(name, [d.frames for d in ok], is_image)):  # type: ignore[misc]
                feats[d.row] = f
        except Exception:  # noqa: BLE001 - retried per clip below
            for d in ok:
                try:
                    feats[d.row] = self.encode_clips(name, [d.frames], is_image)[0]  # type: ignore[list-item]
                except Exception as one:  # noqa: BLE001 - recorded as this sample's failure
                    failed[d.row] = f"{name} encoder: {type(one).__name__}: {one}"
        from merv.store.encodings import FP16_MAX

        limit = FP16_MAX if self.store.group(self.config.groups[name]).spec.encoding != "int8" else np.inf
        for row, f in list(feats.items()):
            if not np.isfinite(f).all() or np.abs(f).max(initial=0.0) > limit:
                failed[row] = f"{name} encoder: features are non-finite or exceed the float16 range"
                del feats[row]
        return feats, failed

    # ------------------------------------------------------------------ one shard
    def encode_batch(self, kind: str, shard: int, group_keys: list[str], decoded: list[Decoded]) -> int:
        """Encode some samples of a shard with each group's encoder and keep the features until
        `commit`: a shard of any size streams through in batches, so the decoded frames held at
        once are bounded by the driver's byte budget, not by the shard. Returns the sample count."""
        buffer = self._open.setdefault((kind, shard), _ShardBuffer(list(group_keys)))
        decoded = sorted(decoded, key=lambda d: d.row)
        buffer.decode_failed.update({d.row: str(d.error) for d in decoded if d.error})
        buffer.decode_seconds += sum(d.seconds for d in decoded)
        ok = [d for d in decoded if not d.error]
        t0 = time.perf_counter()
        for key in buffer.group_keys:
            group = self.store.group(key)
            feats, failed = self._encode_group(group.name, ok, kind == "image") if ok else ({}, {})
            keep = np.float32 if group.spec.encoding == "int8" else np.float16
            buffer.features.setdefault(key, {}).update({row: f.astype(keep) for row, f in feats.items()})
            buffer.failed.setdefault(key, {}).update(failed)
        buffer.encode_seconds += time.perf_counter() - t0
        buffer.rows_seen.update(d.row for d in decoded)
        return len(decoded)

    def commit(self, kind: str, shard: int, ids: list[str], start: int,
               leases: dict[str, LeaseState] | None = None) -> ShardResult:
        """Write every group of a fully encoded shard (one whole shard object each), then its
        commit record. With `leases` (group key -> the driver's lease on this shard), each group
        is written only while that lease is still the driver's: a run that lost it (expired,
        taken over) writes nothing, since another run owns the shard now."""
        from merv.store import LeaseLostError
        from merv.store.group import lease_key
        from merv.store.lease import Lease

        buffer = self._open.pop((kind, shard), None)
        rows = range(start, start + len(ids))
        if buffer is None or any(r not in buffer.rows_seen for r in rows):
            missing = len(rows) if buffer is None else sum(r not in buffer.rows_seen for r in rows)
            raise ShardIncompleteError(f"{kind} shard {shard}: {missing} of {len(rows)} samples were not encoded "
                                       "by this worker (it restarted?); the shard is redone")
        t0 = time.perf_counter()
        nbytes = 0
        all_failed = dict(buffer.decode_failed)
        for i, key in enumerate(buffer.group_keys):
            group = self.store.group(key)
            if group.shard_range(kind, shard, fresh=True) != rows:
                raise ShardGrewError(f"{kind} shard {shard}: another run added samples to it while it was encoded "
                                     f"(rows {rows.start}..{rows.stop - 1} are now {group.shard_range(kind, shard)})")
            failed = {**buffer.decode_failed, **buffer.failed[key]}
            out = np.zeros((len(rows), *group.spec.stored_shape(kind)), dtype=np.float32)
            for row, f in buffer.features[key].items():
                out[row - start] = f
            if leases is not None and not Lease(group.kv, lease_key(kind, shard), leases[key]).still_mine():
                raise LeaseLostError(f"{kind} shard {shard} of {key}: this run's lease on it expired or was taken "
                                     "over; nothing more is written (the other run owns the shard)")
            group.write_shard(kind, shard, out, failed={r - start: v for r, v in failed.items()}, worker=self.worker)
            nbytes += shard_bytes(group, kind, shard)
            all_failed.update(failed)
            if i == 0:
                _maybe_crash_for_test()
        return ShardResult(kind, shard, len(rows), {ids[r - start]: why for r, why in sorted(all_failed.items())},
                           nbytes, buffer.decode_seconds, buffer.encode_seconds + time.perf_counter() - t0,
                           self.worker)

    def abandon(self, kind: str, shard: int) -> None:
        """Forget a shard's buffered features (the driver gave the shard up or restarts it)."""
        self._open.pop((kind, shard), None)

    def process(self, kind: str, shard: int, group_keys: list[str], ids: list[str], decoded: list[Decoded]) -> ShardResult:
        """A whole shard in one call (in-process use, benchmarks): the same batches and commit
        as the streamed path."""
        self.abandon(kind, shard)
        decoded = sorted(decoded, key=lambda d: d.row)
        step = max(1, self.config.batch_size)
        for i in range(0, len(decoded), step):
            self.encode_batch(kind, shard, group_keys, decoded[i : i + step])
        return self.commit(kind, shard, ids, decoded[0].row)


def _tensor(array: np.ndarray) -> Any:
    """A torch view of an array Ray handed over (read-only: it lives in the object store; only read here)."""
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(np.ascontiguousarray(array))


def shard_bytes(group: EncoderGroup, kind: str, shard: int) -> int:
    """Stored (compressed) size of one shard's data objects."""
    keys = [f"{kind}/c/{shard}/0/0/0/0"]
    if group.spec.encoding == "int8":
        keys.append(f"{kind}_scales/c/{shard}/0/0/0")
    return sum(group.kv.size(k) for k in keys)


def _maybe_crash_for_test() -> None:
    marker = os.environ.get(CRASH_ONCE_ENV)
    if not marker:
        return
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)  # exactly one worker wins
    except FileExistsError:
        return
    os.write(fd, f"{socket.gethostname()}:{os.getpid()}\n".encode())
    os.close(fd)
    os._exit(1)
