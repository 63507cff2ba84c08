"""Extraction where the data lives: manifest, tars and videos in an S3 bucket (moto's server on
127.0.0.1), the store in a bucket, `merv store verify` and `merv train` reading it back."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from testkit import media as H
from testkit.features import direct_features

from merv.extract.encoders import build_encoder
from merv.extract.job import ExtractOptions, run_extraction
from merv.extract.sources import discover, scan_tar
from merv.store import FeatureStore, verify_store

pytestmark = pytest.mark.integration  # Ray / several processes / servers: not in `make test-fast`

OPTS = dict(encoders=["dinov2", "vivit"], size="tiny", grid="2x2", samples_per_shard=2, batch_size=2, workers=1)


def _tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_manifest_tars_and_videos_in_a_bucket_to_a_store_in_a_bucket(ray_session, s3_server, tmp_path):
    import s3fs

    opts = s3_server["storage_options"]
    fs = s3fs.S3FileSystem(**opts)
    bucket = s3_server["new_bucket"]()
    clips = [H.write_video(tmp_path / f"c{i}.mp4", n_frames=20 + 4 * i, size=(48, 64), noise=6) for i in range(3)]
    image = H.write_image(tmp_path / "still.png")
    for p in (*clips, image):
        fs.pipe(f"{bucket}/media/{p.name}", p.read_bytes())
    manifest = [{"id": "c0", "path": "media/c0.mp4"}, {"id": "c1", "path": "media/c1.mp4", "start": 0.2},
                {"id": "still", "path": "media/still.png"}]
    fs.pipe(f"{bucket}/manifest.jsonl", "".join(json.dumps(r) + "\n" for r in manifest).encode())
    padding = os.urandom(3 * 2**20)  # a large member the tar scan must skip over, not fetch
    fs.pipe(f"{bucket}/shards/shard-000.tar", _tar_bytes([("w0.mp4", clips[2].read_bytes()),
                                                          ("w0.json", b'{"id": "w0"}'), ("big.bin", padding)]))
    fs.pipe(f"{bucket}/shards/shard-001.tar", _tar_bytes([("w1.mp4", clips[0].read_bytes())]))

    records = discover(f"s3://{bucket}/manifest.jsonl", opts)
    assert [r.source for r in records] == [f"s3://{bucket}/media/c0.mp4", f"s3://{bucket}/media/c1.mp4",
                                           f"s3://{bucket}/media/still.png"]  # relative to the manifest's folder
    assert [r.id for r in scan_tar(f"s3://{bucket}/shards/shard-000.tar", opts)] == ["w0"]

    url = f"s3://{bucket}/features.zarr"
    first = run_extraction(f"s3://{bucket}/manifest.jsonl", url, ExtractOptions(**OPTS, storage_options=opts),
                           show_progress=False)
    assert first.ok and first.extracted == 3 and not first.failed
    second = run_extraction(f"s3://{bucket}/shards/*.tar", url, ExtractOptions(**OPTS, storage_options=opts),
                            show_progress=False)
    assert second.ok and second.extracted == 2 and second.skipped == 3

    store = FeatureStore.open(url, storage_options=opts)
    assert sorted(store.samples.ids) == ["c0", "c1", "still", "w0", "w1"] and verify_store(store).ok
    # the features equal the encoders' own on the local files (so nothing was lost on the way)
    encoders = {n: build_encoder(n, size="tiny") for n in OPTS["encoders"]}
    local = {"c0": (clips[0], None), "c1": (clips[1], 0.2), "still": (image, None), "w0": (clips[2], None),
             "w1": (clips[0], None)}
    for sid, (path, start) in local.items():
        for name, enc in encoders.items():
            want = direct_features(str(path), enc, (2, 2), start=start)
            assert np.array_equal(_read(store, name, sid).view(np.uint16), want.view(np.uint16)), (sid, name)

    env = {**os.environ, "AWS_ENDPOINT_URL": s3_server["endpoint_url"], "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "PYTHONUNBUFFERED": "1"}
    verify = subprocess.run([sys.executable, "-m", "merv.cli", "store", "verify", url], env=env, capture_output=True,
                            text=True, timeout=120)
    assert verify.returncode == 0 and "clean" in verify.stdout, verify.stdout + verify.stderr
    data = tmp_path / "tune.json"
    data.write_text(json.dumps([{"id": sid, "video": f"{sid}.mp4", "conversations": [
        {"from": "human", "value": "<video>\nWhat is it?"}, {"from": "gpt", "value": "a clip"}]}
        for sid in ("c0", "c1", "w0", "w1")]))
    train = subprocess.run([sys.executable, "-m", "merv.cli", "train", "--data", str(data), "--store", url,
                            "--encoders", "dinov2,vivit", "--max-steps", "2", "--global-batch-size", "2",
                            "--out", str(tmp_path / "run"), "--no-export", "--quiet"],
                           env=env, capture_output=True, text=True, timeout=300)
    assert train.returncode == 0, train.stdout[-2000:] + train.stderr[-3000:]
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 2


def _read(store: FeatureStore, name: str, sid: str) -> np.ndarray:
    i = store.samples.index[sid]
    return store.resolve(name).read_rows(store.samples.kind_of(i), np.array([store.samples.rows[i]]))[0]
