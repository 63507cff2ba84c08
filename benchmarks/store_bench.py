"""Store benchmark: bytes per sample and read throughput per encoding at the paper's shapes.

For each (grid, dim, encoding) it writes a local store of random features (16 frames), then
measures (a) streaming whole shards through `FeatureReader.iter_shards`, (b) random access by
id, and (c) the practical limit: reading the same shard files and decoding every chunk with the
codecs alone (crc32c check + the array's codec chain, + int8 dequantisation where used). Prints
one JSON object. Random normal features: fine for read rates, not for choosing codecs (codec_bench).

    python -m merv.benchmarks.store_bench --samples 32 --out /tmp/merv-store-bench
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from merv.store import EncoderGroupSpec, FeatureReader, FeatureStore, SampleRecord, store_info
from merv.store.encodings import dequantize_int8
from merv.store.shard_reader import decode_shard

CASES = [("pooled-8x8", (16, 8, 8), 1024), ("pooled-8x8", (16, 8, 8), 768),
         ("native", (16, 16, 16), 1024), ("native", (16, 14, 14), 768)]


def _features(rng: np.random.Generator, n: int, grid: tuple[int, int, int], dim: int) -> np.ndarray:
    # ViT activations: roughly normal per channel with a few large-magnitude channels.
    x = rng.standard_normal((n, *grid, dim), dtype=np.float32)
    x[..., :4] *= 20.0
    return x


def build(path: Path, grid: tuple[int, int, int], dim: int, encoding: str, samples: int) -> FeatureStore:
    if path.exists():
        shutil.rmtree(path)
    st = FeatureStore.create(str(path), grid=None if grid[1] in (14, 16) else grid[1:],
                             bytes_per_sample={"video": int(np.prod(grid)) * dim * 2, "image": int(np.prod(grid)) * dim * 2})
    st.add_samples([SampleRecord(f"v{i:05d}", f"synthetic://{i}") for i in range(samples)])
    group = st.ensure_group(EncoderGroupSpec("enc", "bench", grid, dim, framewise=True, encoding=encoding))  # type: ignore[arg-type]
    rng = np.random.default_rng(0)
    for shard in range(group.num_shards("video")):
        rows = group.shard_range("video", shard)
        group.write_shard("video", shard, _features(rng, len(rows), grid, dim))
    return st


def codec_only(st: FeatureStore) -> tuple[float, int]:
    """Seconds and decoded bytes to read every shard file and decode its chunks with the codecs
    alone, one thread (`shard_reader.decode_shard`: crc32c + the array's codec chain)."""
    group = st.group(st.encoder_keys()[0])
    arrays = [group.array("video")] + ([group.scales("video")] if group.spec.encoding == "int8" else [])
    t0 = time.perf_counter()
    out_bytes = 0
    for shard in range(group.num_shards("video")):
        n = len(group.shard_range("video", shard))
        decoded = []
        for arr in arrays:
            key = arr.metadata.encode_chunk_key((shard,) + (0,) * (arr.ndim - 1))
            out = np.empty((n, *arr.shape[1:]), dtype=arr.dtype)
            decode_shard(arr, (Path(st.url) / arr.path / key).read_bytes(), out)
            decoded.append(out)
        out_bytes += (dequantize_int8(*decoded) if len(decoded) == 2 else decoded[0]).nbytes
    return time.perf_counter() - t0, out_bytes


def stream(st: FeatureStore) -> tuple[float, int, int]:
    reader = FeatureReader(st)
    t0 = time.perf_counter()
    n = nbytes = 0
    for batch in reader.iter_shards("video"):
        arr = batch.features["enc"]
        n += arr.shape[0]
        nbytes += arr.nbytes
    return time.perf_counter() - t0, n, nbytes


def random_access(st: FeatureStore, count: int) -> float:
    reader = FeatureReader(st)
    ids = reader.ids
    order = np.random.default_rng(1).permutation(len(ids))[:count]
    t0 = time.perf_counter()
    for i in order:
        reader.get(ids[i])
    return time.perf_counter() - t0


def best_of(fn: Any, repeats: int) -> Any:
    results = [fn() for _ in range(repeats)]
    return min(results, key=lambda r: r[0] if isinstance(r, tuple) else r)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="/tmp/merv-store-bench")
    ap.add_argument("--encodings", default="fp16,bitround,int8")
    args = ap.parse_args()
    results = []
    for label, grid, dim in CASES:
        for encoding in args.encodings.split(","):
            path = Path(args.out) / f"{label}-{dim}-{encoding}.zarr"
            st = build(path, grid, dim, encoding, args.samples)
            info = store_info(st)["encoders"][0]
            codec_s, codec_bytes = best_of(lambda: codec_only(st), args.repeats)
            stream_s, n, nbytes = best_of(lambda: stream(st), args.repeats)
            ra_s = best_of(lambda: random_access(st, min(16, args.samples)), args.repeats)
            results.append({
                "grid": label, "shape": [*grid, dim], "encoding": encoding,
                "samples_per_shard": st.meta.samples_per_shard["video"],
                "raw_fp16_bytes_per_sample": int(np.prod(grid)) * dim * 2,
                "bytes_per_sample": info["bytes_per_sample"]["video"],
                "stream_samples_per_s": n / stream_s,
                "stream_MBps": nbytes / stream_s / 1e6,
                "codec_only_MBps": codec_bytes / codec_s / 1e6,
                "stream_vs_codec_only": (nbytes / stream_s) / (codec_bytes / codec_s),
                "random_access_samples_per_s": min(16, args.samples) / ra_s,
            })
            shutil.rmtree(path)
    print(json.dumps({"benchmark": "store", "machine": platform.processor() or platform.machine(),
                      "cores": __import__("os").cpu_count(), "samples": args.samples, "results": results}, indent=1))


if __name__ == "__main__":
    main()
