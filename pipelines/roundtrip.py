"""Store round trip on generated data: write features for a few synthetic samples in every
encoding, read them back through both readers, verify every chunk. The README's main job until
the full demo (extract -> train -> eval) lands; also a quick health check of a machine."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass

import numpy as np

from merv import MervError
from merv.store import EncoderGroupSpec, FeatureReader, FeatureStore, SampleRecord, store_info, verify_store
from merv.store.encodings import error_bound


class RoundTripError(MervError, ValueError):
    """The round trip's output path holds something it must not replace."""


@dataclass
class RoundTripResult:
    store: str
    samples: int
    groups: list[str]
    max_abs_error: dict[str, float]
    within_bound: dict[str, bool]
    verified: bool
    bytes_per_sample: dict[str, dict[str, float | None]]


def run_roundtrip(path: str, videos: int = 24, images: int = 8, seed: int = 0) -> RoundTripResult:
    """Write, read back and verify a fresh store at `path`; an existing store there (an earlier
    round trip) is replaced, anything else is refused."""
    _clear(path)
    rng = np.random.default_rng(seed)
    store = FeatureStore.create(path, grid="4x4", samples_per_shard={"video": 8, "image": 8})
    records = [SampleRecord(f"video-{i:04d}", f"synthetic://video/{i}") for i in range(videos)]
    records += [SampleRecord(f"image-{i:04d}", f"synthetic://image/{i}", kind="image") for i in range(images)]
    store.add_samples(records)
    truth: dict[str, dict[str, np.ndarray]] = {}
    for encoding in ("fp16", "bitround", "int8"):
        spec = EncoderGroupSpec(f"synthetic-{encoding}", "roundtrip-v1", (8, 4, 4), 64, framewise=True, encoding=encoding)  # type: ignore[arg-type]
        group = store.ensure_group(spec)
        truth[group.name] = {}
        for kind in ("video", "image"):
            for shard in range(group.num_shards(kind)):
                rows = group.shard_range(kind, shard)
                t = 1 if kind == "image" else 8
                feats = rng.standard_normal((len(rows), t, 4, 4, 64)).astype(np.float32)
                group.write_shard(kind, shard, feats)
                for j, row in enumerate(rows):
                    idx = int(store.samples.indices_of_rows(kind, [row])[0])
                    truth[group.name][store.samples.ids[idx]] = np.repeat(feats[j], 8 // t, axis=0)
    reader = FeatureReader(store)
    errors: dict[str, float] = {}
    ok: dict[str, bool] = {}
    for batch in reader.iter_shards():
        for name, arr in batch.features.items():
            encoding = name.split("-", 1)[1]
            for sid, got in zip(batch.ids, arr):
                want = truth[name][sid]
                err = np.abs(got.astype(np.float32) - want)
                errors[name] = max(errors.get(name, 0.0), float(err.max()))
                ok[name] = ok.get(name, True) and bool((err <= error_bound(encoding, want)).all())
    single = reader.get(records[0].id)
    assert all(np.array_equal(single[n], np.asarray(reader.get_batch([records[0].id])[n][0])) for n in single)
    info = store_info(store)
    report = verify_store(store)
    return RoundTripResult(
        store=path,
        samples=len(records),
        groups=store.encoder_keys(),
        max_abs_error=errors,
        within_bound=ok,
        verified=report.ok,
        bytes_per_sample={g["name"]: g["bytes_per_sample"] for g in info["encoders"]},
    )


def _clear(path: str) -> None:
    """Remove an earlier round trip's store at `path`; refuse to delete anything that is not a store."""
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.exists(parent) and not os.path.isdir(parent):
        raise RoundTripError(f"--out {parent} is a file; pass a directory")
    if not os.path.exists(path):
        return
    if not os.path.isfile(os.path.join(path, "zarr.json")):
        raise RoundTripError(f"{path} exists and is not a feature store; move it away or pass another --out")
    shutil.rmtree(path)
