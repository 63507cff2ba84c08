"""Loader benchmark: the trainer's StreamingLoader against the codec-only limit.

A store with the paper's four encoders pooled to 8x8 (16 frames; dims 1024, 1024, 768, 768) is
written per encoding. Then, for the same samples:
  loader      StreamingLoader (the training path: deterministic order, per-rank row reads,
              tokenisation, collation into tensors), one epoch, num_workers 0 and 1; the rate is
              taken after the first micro-batch (worker start-up is reported apart)
  codec_only  read every shard file and decode its chunks with the codecs alone, one thread
              (crc32c + the store's default chain, + int8 scales)
  limit       the memory-bandwidth limit: read the same shard files from the page cache and
              crc32c every byte, on all cores (no decompression, no copies into tensors)
Prints JSON with samples/s, MB/s of decoded features, loader / codec_only and loader / limit.
The features are random normal arrays (a few channels scaled up): fine for the loader's rate, and
exact for fp16 (stored uncompressed); compressed sizes of bitround / int8 differ from real
features' (codec_bench measures those).

    python -m merv.benchmarks.loader_bench --samples 128
    python -m merv.benchmarks.loader_bench --samples 128 --encodings fp16 --chain zstd-3   # the old chain
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from pathlib import Path

import numpy as np

from merv.benchmarks.store_bench import codec_only
from merv.store import EncoderGroupSpec, FeatureStore, SampleRecord
from merv.store.codecs import DEFAULT_CHAINS

PAPER = [("languagebind", 1024), ("dinov2", 1024), ("vivit", 768), ("siglip", 768)]
GRID = (16, 8, 8)


def build(root: Path, encoding: str, samples: int, chain: str | None = None) -> tuple[str, str]:
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    per_sample = int(np.prod(GRID)) * 1024 * 2
    st = FeatureStore.create(str(root / "s.zarr"), grid=GRID[1:], bytes_per_sample={"video": per_sample, "image": per_sample})
    st.add_samples([SampleRecord(f"v{i:05d}", f"synthetic://{i}") for i in range(samples)])
    rng = np.random.default_rng(0)
    for name, dim in PAPER:
        spec = EncoderGroupSpec(name, "bench", GRID, dim, framewise=False, encoding=encoding)  # type: ignore[arg-type]
        g = st.ensure_group(spec, chain=chain)
        for shard in range(g.num_shards("video")):
            rows = g.shard_range("video", shard)
            x = rng.standard_normal((len(rows), *GRID, dim), dtype=np.float32)
            x[..., :4] *= 20.0
            g.write_shard("video", shard, x)
    records = [{"id": f"v{i:05d}", "video": f"v{i:05d}.mp4", "conversations": [
        {"from": "human", "value": "<video>\nDescribe the video."}, {"from": "gpt", "value": "a video"}]} for i in range(samples)]
    (root / "data.json").write_text(json.dumps(records))
    return str(root / "data.json"), str(root / "s.zarr")


def _tokenize(conversations: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    words = " ".join(t["value"] for t in conversations).split()
    ids = [1] + [hash(w) % 1000 + 3 for w in words]
    return ids, [-100] * (len(ids) - 2) + ids[-2:]


def run_loader(data_json: str, store: str, batch: int, workers: int) -> tuple[float, int, int, float]:
    """(seconds after the first micro-batch, samples and feature bytes after it, seconds to the first).

    Start-up (forking workers, opening the store in them, the first read) is a per-epoch cost that
    training hides behind its first steps; it is reported apart from the streaming rate."""
    import torch

    from merv.train.data import DataSource, InstructionData
    from merv.train.loader import StreamingLoader

    data = InstructionData.build([DataSource([data_json], store)])
    loader = StreamingLoader(data, _tokenize, global_batch_size=batch, num_workers=workers, world_size=1, rank=0,
                             feature_dtype=torch.float16, prefetch_factor=4)
    n = nbytes = 0
    first_s = None
    t0 = time.perf_counter()
    for mb in loader:
        if first_s is None:
            first_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            continue
        n += len(mb["ids"])
        nbytes += sum(v.numel() * v.element_size() for v in mb["features"].values())
    return time.perf_counter() - t0, n, nbytes, float(first_s or 0.0)


def page_cache_limit(store: str) -> tuple[float, int]:
    """Seconds and bytes to read every shard file of the store (warm page cache) and crc32c it,
    one file per task on a pool of `os.cpu_count()` threads (both release the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    from crc32c import crc32c

    files = [p for p in Path(store).rglob("*") if p.is_file() and "/c/" in p.as_posix()]  # chunk / shard objects
    for path in files:  # warm: the limit is memory, not disk
        path.read_bytes()
    t0 = time.perf_counter()
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        sizes = list(pool.map(lambda path: (crc32c(blob := path.read_bytes()), len(blob))[1], files))
    return time.perf_counter() - t0, int(sum(sizes))


def codec_only_all(store: str) -> tuple[float, int]:
    st = FeatureStore.open(store)
    total_s = total_b = 0.0
    for key in st.encoder_keys():
        single = _OneGroup(st, key)
        s, b = codec_only(single)  # type: ignore[arg-type]
        total_s += s
        total_b += b
    return total_s, int(total_b)


class _OneGroup:
    """Present one group of a store to `store_bench.codec_only` (which reads the first group)."""

    def __init__(self, store: FeatureStore, key: str) -> None:
        self._store, self._key = store, key
        self.url = store.url

    def encoder_keys(self) -> list[str]:
        return [self._key]

    def group(self, key: str):  # noqa: ANN201
        return self._store.group(key)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default="/tmp/merv-loader-bench")
    ap.add_argument("--encodings", default="fp16,bitround,int8")
    ap.add_argument("--chain", default=None, help="codec chain of every store (merv.store.codecs); default: each "
                                                  "encoding's DEFAULT_CHAINS entry")
    args = ap.parse_args()
    load_before = os.getloadavg()
    results = []
    for encoding in args.encodings.split(","):
        data_json, store = build(Path(args.out) / encoding, encoding, args.samples, args.chain)
        codec_s, codec_b = min((codec_only_all(store) for _ in range(args.repeats)), key=lambda r: r[0])
        row = {"encoding": encoding, "chain": args.chain or DEFAULT_CHAINS[encoding], "samples": args.samples,
               "grid": list(GRID), "encoders": [n for n, _ in PAPER],
               "codec_only_samples_per_s": args.samples / codec_s, "codec_only_MBps": codec_b / codec_s / 1e6}
        limit_s, limit_b = min((page_cache_limit(store) for _ in range(args.repeats)), key=lambda r: r[0])
        row["limit_samples_per_s"] = args.samples / limit_s
        row["limit_stored_MBps"] = limit_b / limit_s / 1e6
        for workers in (0, 1):
            secs, n, nbytes, first = min((run_loader(data_json, store, args.batch, workers) for _ in range(args.repeats)),
                                         key=lambda r: r[0])
            row[f"loader_w{workers}_first_batch_s"] = first
            row[f"loader_w{workers}_samples_per_s"] = n / secs
            row[f"loader_w{workers}_MBps"] = nbytes / secs / 1e6
            row[f"loader_w{workers}_vs_codec_only"] = (n / secs) / (args.samples / codec_s)
            row[f"loader_w{workers}_vs_limit"] = (n / secs) / row["limit_samples_per_s"]
        results.append(row)
        shutil.rmtree(Path(args.out) / encoding)
    print(json.dumps({"benchmark": "loader", "machine": platform.machine(), "cores": os.cpu_count(),
                      "load_avg_before": [round(v, 2) for v in load_before],  # a busy machine skews every rate
                      "load_avg_after": [round(v, 2) for v in os.getloadavg()], "results": results}, indent=1))


if __name__ == "__main__":
    main()
