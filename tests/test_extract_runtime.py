"""`merv extract` at the edges of its runtime: bytes in flight, stop signals, a dying Ray node,
concurrent runs on one store, and `--json` output that stays one JSON document.

The SIGTERM, Ray-death and concurrency tests run the real CLI in subprocesses (each with its own
embedded Ray), wait until the job is mid-run, then act on it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import psutil
import pytest
from testkit import media as H

from merv.extract.job import ExtractOptions, parse_bytes, run_extraction
from merv.extract.plan import PAPER_DECODE_FRAMES
from merv.extract.worker import CRASH_ONCE_ENV
from merv.store import FeatureStore, verify_store

pytestmark = pytest.mark.integration  # Ray / several processes / servers: not in `make test-fast`

BIN = Path(sys.executable).parent
ENCODERS = ["dinov2", "vivit"]
POLL_S = 0.2  # each poll opens the store (~10 ms of CPU), which the job under test needs on 2 cores


def _manifest(d: Path, rows: list[dict]) -> Path:
    path = d / "manifest.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _busy_manifest(d: Path, n: int = 36) -> Path:
    """Enough real work (noisy 240x320 clips) that a job is still running seconds after its
    first commit on 2 cores."""
    d.mkdir(parents=True, exist_ok=True)
    clip = H.write_video(d / "clip.mp4", n_frames=40, size=(144, 176), noise=12)
    return _manifest(d, [{"id": f"s{i:03d}", "path": clip.name} for i in range(n)])


def _cmd(manifest: Path, url: str, *extra: str) -> list[str]:
    return [str(BIN / "merv"), "extract", str(manifest), "--store", url, "--size", "tiny", "--grid", "2x2",
            "--encoders", ",".join(ENCODERS), "--samples-per-shard", "2", "--batch-size", "2", "--workers", "1",
            "--quiet", *extra]


def _env() -> dict[str, str]:
    """A user's shell: nothing our own Ray session set."""
    return {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}


def _committed_shards(url: str) -> int:
    """Shards committed in every encoder group (0 while the store is being created)."""
    try:
        store = FeatureStore.open(url)
        keys = store.encoder_keys()
        if len(keys) < len(ENCODERS):
            return 0
        return min(len(store.group(k).commits("video")) for k in keys)
    except Exception:  # noqa: BLE001 - the store may be half-created while we poll
        return 0


def _start(cmd: list[str], url: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start the job and return once it has committed a shard (it is mid-run then)."""
    proc = subprocess.Popen(cmd, env=env or _env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.monotonic() + 180
    while _committed_shards(url) < 1:
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"the job ended before its first commit:\n{out[-2000:]}\n{err[-3000:]}")
        assert time.monotonic() < deadline, "no shard committed within 180 s"
        time.sleep(POLL_S)
    return proc


def _finish(proc: subprocess.Popen, timeout: float) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"the job did not exit within {timeout} s:\n{out[-2000:]}\n{err[-3000:]}")
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever Ray left behind
        except ProcessLookupError:
            pass
    return proc.returncode, out, err


# ----------------------------------------------------------------------------------- bytes bound
def test_decoded_bytes_in_flight_stay_under_the_budget(ray_session, tmp_path):
    """Many copies of a 720p clip in ONE shard (the shard size says nothing about frames): with
    full frames shipped (`resize_at=encoder`, the worst case) the driver keeps the decoded frames
    alive under --max-inflight-bytes, Ray's object store peaks under it too, and nothing is
    spilled. Resized at decode (the default), the same job holds less than one full-frame sample
    in the object store, and the features are the same."""
    clip = H.write_video(tmp_path / "hd.mp4", n_frames=1, size=(720, 1280))
    n = 8
    manifest = _manifest(tmp_path, [{"id": f"hd{i:02d}", "path": clip.name} for i in range(n)])
    per_sample = PAPER_DECODE_FRAMES * 720 * 1280 * 3  # one 1-frame clip decodes to 32 frames: 88 MB
    budget = 3 * per_sample
    opts = ExtractOptions(encoders=["dinov2"], size="tiny", grid="2x2", samples_per_shard=64, batch_size=2,
                          workers=1, max_inflight_bytes=budget, resize_at="encoder")
    # resized at decode first, while the object store holds nothing of this test (Ray frees the
    # other run's 88 MB objects asynchronously; its peak is read from the store's usage)
    resized = run_extraction(str(manifest), str(tmp_path / "resized.zarr"), replace(opts, resize_at="decode"),
                             show_progress=False)
    assert resized.ok and resized.extracted == n
    crop = 16 * 3 * 56 * 56  # tiny dinov2: 16 frames of its 56 px crop, uint8
    assert crop <= resized.peak_inflight_bytes <= n * crop
    assert resized.object_store_peak_bytes is not None and resized.object_store_peak_bytes < per_sample

    summary = run_extraction(str(manifest), str(tmp_path / "hd.zarr"), opts, show_progress=False)
    assert summary.ok and summary.extracted == n and summary.shards == 1
    assert summary.inflight_budget_bytes == budget
    assert per_sample <= summary.peak_inflight_bytes <= budget
    assert summary.object_store_peak_bytes is not None and summary.spilled_bytes == 0
    assert per_sample <= summary.object_store_peak_bytes <= budget + 32 * 2**20
    assert verify_store(FeatureStore.open(str(tmp_path / "hd.zarr"))).ok
    got = FeatureStore.open(str(tmp_path / "resized.zarr")).resolve("dinov2").array("video")[:]
    want = FeatureStore.open(str(tmp_path / "hd.zarr")).resolve("dinov2").array("video")[:]
    assert np.array_equal(got.view(np.uint16), want.view(np.uint16))


def test_parse_bytes_units():
    assert parse_bytes("4GiB") == 4 * 2**30 and parse_bytes("500MB") == 500 * 10**6 and parse_bytes("123") == 123
    assert parse_bytes("1.5g") == 1_500_000_000
    for bad in ("", "-1GB", "3XB", "GB"):
        with pytest.raises(Exception, match="--max-inflight-bytes"):
            parse_bytes(bad, "--max-inflight-bytes")


# ----------------------------------------------------------------------------------- signals
N_BUSY = 10


def _rerun_finishes(manifest: Path, url: str, left: int, committed: int) -> None:
    again = run_extraction(str(manifest), url, ExtractOptions(encoders=ENCODERS, size="tiny", grid="2x2",
                                                                  batch_size=2, workers=1), show_progress=False)
    assert again.ok and again.extracted == left and again.skipped == committed
    assert verify_store(FeatureStore.open(url)).ok


def _committed_samples(url: str) -> int:
    store = FeatureStore.open(url)
    return min(sum(r.count for r in store.group(k).commits("video").values()) for k in store.encoder_keys())


def test_sigterm_commits_or_abandons_then_reports_what_is_left(ray_session, tmp_path):
    """The real CLI, SIGTERM to the driver only (as Kubernetes sends it): exit 143, the summary line
    with what is left, a clean store, and the same command finishes the job."""
    manifest = _busy_manifest(tmp_path / "media", n=N_BUSY)
    url = str(tmp_path / "stop.zarr")
    proc = _start(_cmd(manifest, url), url)
    proc.send_signal(signal.SIGTERM)
    code, out, err = _finish(proc, timeout=120)
    assert code == 128 + signal.SIGTERM, (code, out[-2000:], err[-3000:])
    assert "Traceback" not in out + err
    line = out.strip().splitlines()[-1]
    assert "stopped by SIGTERM" in line and "samples left" in line and "re-run" in line, line
    left = int(line.split("stopped by")[1].split(":")[1].split("samples")[0])
    assert verify_store(FeatureStore.open(url)).ok
    committed = _committed_samples(url)
    assert 0 < committed < N_BUSY and left == N_BUSY - committed  # the summary says exactly what is missing
    _rerun_finishes(manifest, url, left, committed)


def test_sigint_in_process_stops_at_the_next_step(ray_session, tmp_path):
    """Ctrl-C while `run_extraction` runs in this process: no KeyboardInterrupt, a summary that
    says SIGINT and what is left; the previous SIGINT handler is back afterwards."""
    manifest = _busy_manifest(tmp_path / "media", n=N_BUSY)
    url = str(tmp_path / "int.zarr")
    handler = signal.getsignal(signal.SIGINT)

    def interrupt_after_a_commit() -> None:
        deadline = time.monotonic() + 180
        while _committed_shards(url) < 1 and time.monotonic() < deadline:
            time.sleep(POLL_S)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=interrupt_after_a_commit, daemon=True).start()
    opts = ExtractOptions(encoders=ENCODERS, size="tiny", grid="2x2", samples_per_shard=2, batch_size=2, workers=1)
    summary = run_extraction(str(manifest), url, opts, show_progress=False)
    assert summary.stopped == "SIGINT" and not summary.ok
    assert signal.getsignal(signal.SIGINT) is handler
    committed = _committed_samples(url)
    assert 0 < committed < N_BUSY and summary.left == N_BUSY - committed
    assert "stopped by SIGINT" in summary.line()
    assert verify_store(FeatureStore.open(url)).ok  # that a re-run finishes the job: the SIGTERM test


# ----------------------------------------------------------------------------------- ray death
def _ray_processes(root_pid: int, name: str) -> list[psutil.Process]:
    return [p for p in psutil.Process(root_pid).children(recursive=True) if p.name() == name]


def test_dead_raylet_ends_the_job_with_a_clear_error(tmp_path):
    manifest = _busy_manifest(tmp_path / "media", n=N_BUSY)
    url = str(tmp_path / "dead.zarr")
    proc = _start(_cmd(manifest, url), url)
    raylets = _ray_processes(proc.pid, "raylet")
    assert raylets, "no raylet under the job's process"
    for p in raylets:
        p.kill()
    code, out, err = _finish(proc, timeout=90)
    assert code == 2, (code, out[-2000:], err[-3000:])
    assert "Traceback" not in err
    message = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(message) == 1 and "raylet" in message[0] and "re-run" in message[0], err[-3000:]
    store = FeatureStore.open(url)
    assert verify_store(store).ok  # what was committed before the death is intact


# ----------------------------------------------------------------------------------- two writers
def test_two_concurrent_runs_on_one_store_commit_every_shard_exactly_once(ray_session, tmp_path):
    """A `merv extract --json` process and a second run (in this process, on its own Ray session)
    on the same manifest and store at the same time: shards are leased, so each is written by one
    run and the other counts it as done by another run; both succeed and the store verifies clean.

    The CLI's first worker is killed mid-shard (Ray's driver then prints the raylet's complaint):
    with --json that goes to stderr and stdout stays one JSON document. The second run starts
    while that worker restarts, so both runs are mid-job together."""
    n = 8
    manifest = _busy_manifest(tmp_path / "media", n=n)
    url = str(tmp_path / "shared.zarr")
    crashed = tmp_path / "crashed"
    proc = subprocess.Popen(_cmd(manifest, url, "--json"), env={**_env(), CRASH_ONCE_ENV: str(crashed)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while not crashed.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the CLI's worker did not reach its first shard within 180 s"
            time.sleep(POLL_S)
        here = run_extraction(str(manifest), url, ExtractOptions(encoders=ENCODERS, size="tiny", grid="2x2",
                                                                   samples_per_shard=2, batch_size=2, workers=1),
                              show_progress=False)
    finally:
        code, out, err = _finish(proc, timeout=300)
    assert code == 0, (code, out[-2000:], err[-3000:])
    cli = json.loads(out)  # the whole of stdout, nothing else
    assert "died" in err or "Worker" in err  # Ray's line went to stderr
    store = FeatureStore.open(url)
    shards = store.group(store.encoder_keys()[0]).num_shards("video")
    assert cli["shards"] + here.shards == shards  # no shard written twice
    assert cli["extracted"] + here.extracted == n and not cli["failed"] and not here.failed and here.ok
    assert cli["extracted"] + cli["by_other_runs"] + cli["skipped"] == n
    assert here.extracted + here.by_other_runs + here.skipped == n
    assert all(len(store.group(k).commits("video")) == shards for k in store.encoder_keys())
    assert len(store.samples) == n and verify_store(store).ok
    # the actors' environment: inherited from the Ray session the CLI started, passed in a runtime_env
    # on a session this process did not start
    assert [w["omp_wait_policy"] for w in cli["workers"] + here.workers] == ["PASSIVE", "PASSIVE"]
