"""`merv extract` without Ray, for tests that need a real store but test something else.

The driver's planning (`prepare_store`) and the workers' decode and shard encoder (`decode_split`,
`ShardEncoder`) run in this process, shard by shard: the same code that writes a store under Ray,
without a Ray start and encoder actors that import timm / transformers again (seconds each on two
cores). The Ray path has its own tests (test_extract*).
"""

from __future__ import annotations

from pathlib import Path

from merv.extract.job import ExtractOptions, prepare_store
from merv.extract.worker import ShardEncoder, WorkerConfig, decode_split
from merv.store import KINDS


def extract_in_process(manifest: Path | str, store_url: Path | str, opts: ExtractOptions) -> int:
    """Extract every sample of `manifest` into `store_url` as `opts` asks; returns how many were
    encoded (every shard must succeed: a failed sample fails the test here)."""
    store, keys, plan = prepare_store(str(manifest), str(store_url), opts)
    config = WorkerConfig(list(opts.encoders), {store.group(k).name: k for k in keys}, size=opts.size,
                          weights=opts.weights, device=opts.device)
    worker = ShardEncoder(config, store.url)
    table, layout = store.samples, store.group(keys[0])
    encoded = 0
    for kind in KINDS:
        for shard in range(layout.num_shards(kind)):
            rows = layout.shard_range(kind, shard)
            idx = table.indices_of_rows(kind, rows)
            decoded = []
            for i, row in zip(idx, rows):
                rec = table.record(int(i))
                d, payload = decode_split(rec.source, (rec.start, rec.end, rec.end_frame), row, plan)
                d.frames = payload
                decoded.append(d)
            result = worker.process(kind, shard, keys, [table.ids[int(i)] for i in idx], decoded)
            assert not result.failed, result.failed
            encoded += len(decoded)
    return encoded
