"""What a store returns can be trusted: a committed row is its data or a named error (never fill
values), verify has no false alarms, and corrupt metadata is one line naming the file. Real stores
on disk; `merv train` / `merv eval` / `merv store` run as real commands."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from crc32c import crc32c
from typer.testing import CliRunner

from merv import MervError
from merv.cli import app
from merv.store import (
    EncoderGroupSpec,
    FeatureReader,
    FeatureStore,
    SampleRecord,
    SampleUnavailableError,
    StoreError,
    store_info,
    verify_store,
)
from merv.store.errors import ChunkChecksumError, MissingShardDataError, StoreMetadataError

GRID = (2, 3, 3)
DIM = 8
PER_SHARD = 3
MERV = [sys.executable, "-m", "merv.cli"]


def _spec(name: str = "dinov2", encoding: str = "fp16") -> EncoderGroupSpec:
    return EncoderGroupSpec(name, f"fp-{name}", GRID, DIM, framewise=True, encoding=encoding)  # type: ignore[arg-type]


def _store(path: Path, encoding: str = "fp16", videos: int = 7) -> tuple[FeatureStore, Any, dict[str, np.ndarray]]:
    """A store with every video shard of one group written; returns the features by id."""
    store = FeatureStore.create(str(path), samples_per_shard=PER_SHARD)
    store.add_samples([SampleRecord(f"v{i}", f"/data/v{i}.mp4") for i in range(videos)])
    group = store.ensure_group(_spec(encoding=encoding))
    rng = np.random.default_rng(0)
    truth = {}
    for shard in range(group.num_shards("video")):
        rows = group.shard_range("video", shard)
        x = rng.standard_normal((len(rows), *GRID, DIM)).astype(np.float16)
        group.write_shard("video", shard, x)
        truth.update({f"v{r}": x[j] for j, r in enumerate(rows)})
    return store, group, truth


def _shard_file(path: Path, group: Any, shard: int, array: str = "video") -> Path:
    arr = group.array(array)
    return path / group.key / array / arr.metadata.encode_chunk_key((shard,) + (0,) * (arr.ndim - 1))


def _drop_chunk(shard_file: Path, local_row: int, per_shard: int = PER_SHARD) -> None:
    """Mark one inner chunk absent in a shard's index (a valid shard that lost a chunk)."""
    raw = bytearray(shard_file.read_bytes())
    n = 16 * per_shard
    index = np.frombuffer(bytes(raw[-n - 4 : -4]), dtype="<u8").copy().reshape(per_shard, 2)
    index[local_row] = 2**64 - 1
    body = index.tobytes()
    raw[-n - 4 :] = body + crc32c(body).to_bytes(4, "little")
    shard_file.write_bytes(bytes(raw))


# --------------------------------------------------------------------------- item 5: no fill values
@pytest.mark.parametrize("array", ["video", "video_scales"])
def test_a_deleted_committed_shard_raises_a_named_error_on_every_read_path(tmp_path, array):
    path = tmp_path / "s.zarr"
    _, group, truth = _store(path, encoding="int8" if array == "video_scales" else "fp16")
    _shard_file(path, group, 1, array).unlink()  # shard 1 = rows 3..5 = v3, v4, v5
    reader = FeatureReader(FeatureStore.open(str(path)))
    assert "v4" in reader.ids  # still committed: the damage is only found by reading
    where = rf"store '{path}', encoder group '{group.key}', video shard 1: committed data is missing"
    with pytest.raises(MissingShardDataError, match=where + r".*samples affected: v4\b.*merv store verify"):
        reader.get("v4")
    with pytest.raises(MissingShardDataError, match=r"samples affected: v3, v5\b"):
        reader.get_batch(["v0", "v5", "v3"])  # the direct (random rows) path
    with pytest.raises(MissingShardDataError, match=where + r".*samples affected: v3, v4, v5"):
        list(reader.iter_shards("video"))  # the zarr (whole shard) path
    batch = reader.get_batch(["v0", "v6"])["dinov2"].astype(np.float32)  # the other shards still read
    bound = 0.02 * np.abs(truth["v0"]).max() if array == "video_scales" else 0
    assert np.abs(batch[0] - truth["v0"].astype(np.float32)).max() <= bound
    assert issubclass(MissingShardDataError, StoreError) and issubclass(StoreError, MervError)


def test_a_chunk_missing_inside_a_committed_shard_is_named(tmp_path):
    path = tmp_path / "s.zarr"
    _, group, truth = _store(path)
    _drop_chunk(_shard_file(path, group, 1), local_row=2)  # v5
    reader = FeatureReader(FeatureStore.open(str(path)))
    with pytest.raises(MissingShardDataError, match=r"video shard 1: committed data is missing: 1 chunk\(s\) are absent.*samples affected: v5"):
        reader.get("v5")
    with pytest.raises(MissingShardDataError, match="samples affected: v5"):
        reader.read_shard("video", 1)
    assert np.array_equal(reader.get("v4")["dinov2"], truth["v4"])  # its neighbours are intact
    report = verify_store(FeatureStore.open(str(path)))
    assert [(p.shard, p.samples) for p in report.problems] == [(1, ["v5"])]
    assert "1 committed chunk(s) are missing from" in report.problems[0].message


def test_pending_shards_and_failed_rows_need_no_data(tmp_path):
    """The fill value is still the right answer where nothing is committed: pending shards are
    unavailable (not damage) and failed rows may lack data in stores written before every chunk was kept."""
    path = tmp_path / "s.zarr"
    store = FeatureStore.create(str(path), samples_per_shard=PER_SHARD)
    store.add_samples([SampleRecord(f"v{i}", f"/data/v{i}.mp4") for i in range(6)])
    group = store.ensure_group(_spec())
    x = np.ones((3, *GRID, DIM), np.float16)
    group.write_shard("video", 0, x, failed={1: "decode error"})
    _drop_chunk(_shard_file(path, group, 0), local_row=1)  # as an old store left a failed row
    reader = FeatureReader(FeatureStore.open(str(path)))
    assert np.array_equal(reader.get_batch(["v0", "v2"])["dinov2"], x[[0, 2]])
    assert next(reader.iter_shards("video")).ids == ["v0", "v2"]
    with pytest.raises(SampleUnavailableError, match="failed"):
        reader.get("v1")
    with pytest.raises(SampleUnavailableError, match="pending"):
        reader.get("v4")  # shard 1: never written, never committed
    assert verify_store(FeatureStore.open(str(path))).ok


def test_a_checksum_error_is_a_store_error_naming_where(tmp_path):
    path = tmp_path / "s.zarr"
    _, group, _ = _store(path)
    shard_file = _shard_file(path, group, 1)
    raw = bytearray(shard_file.read_bytes())
    raw[40:48] = bytes(b ^ 0xFF for b in raw[40:48])  # inside the first chunk of shard 1 (row 3, v3)
    shard_file.write_bytes(bytes(raw))
    reader = FeatureReader(FeatureStore.open(str(path)))
    with pytest.raises(ChunkChecksumError, match=rf"store '{path}', encoder group '{group.key}', video shard 1: checksum mismatch in row 3.*samples affected: v3"):
        reader.get_batch(["v4", "v3"])
    assert issubclass(ChunkChecksumError, StoreError) and issubclass(ChunkChecksumError, ValueError)


@pytest.mark.parametrize("cls", [MissingShardDataError, ChunkChecksumError, StoreMetadataError])
def test_store_errors_rebuild_from_their_message(cls):
    """torch's DataLoader re-raises a worker's exception as type(exc)(message)."""
    exc = cls("store 'x': broken")
    assert isinstance(exc, StoreError) and str(exc) == "store 'x': broken"


def test_the_fix_the_message_gives_makes_extract_redo_the_shard(tmp_path):
    from merv.extract.plan import plan_shards

    path = tmp_path / "s.zarr"
    store, group, _ = _store(path)
    _shard_file(path, group, 1).unlink()
    assert [j.shard for j in plan_shards(store, [group.key]).jobs if j.kind == "video"] == []  # looks done
    with pytest.raises(MissingShardDataError) as info:
        FeatureReader(FeatureStore.open(str(path))).get("v3")
    record = str(info.value).split("delete each one's commit record (here ")[1].split(")")[0]
    Path(record).unlink()
    store.refresh()
    assert [j.shard for j in plan_shards(store, [group.key]).jobs if j.kind == "video"] == [1]


def _damaged_task(root: Path) -> tuple[str, str, str]:
    """testkit's task store with one committed shard object of one group deleted."""
    from testkit import tasks

    data, store = tasks.make_task(root, n=8, per_shard=4)
    key = next(k for k in FeatureStore.open(store).encoder_keys() if k.startswith("dinov2-"))
    (Path(store) / key / "video" / "c" / "1" / "0" / "0" / "0" / "0").unlink()  # samples v004..v007
    return data, store, key


def _cli(*args: str) -> subprocess.CompletedProcess:
    """The `merv` command in this process (the CLI's own error handling; no interpreter start-up)."""
    from typer.testing import CliRunner

    from merv.cli import app

    res = CliRunner().invoke(app, list(args))
    return subprocess.CompletedProcess(["merv", *args], res.exit_code, res.stdout, res.stderr)


@pytest.mark.integration
@pytest.mark.parametrize("workers", ["0", "1"])
def test_merv_train_exits_nonzero_naming_a_deleted_shard(tmp_path, workers):
    data, store, key = _damaged_task(tmp_path)
    run = _cli("train", "--data", data, "--store", store, "--max-steps", "2", "--global-batch-size", "8",
               "--no-export", "--quiet", "--num-workers", workers, "--out", str(tmp_path / "run"))
    assert run.returncode == 2, run.stderr[-3000:]
    lines = [ln for ln in run.stderr.splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("error: store ") and "Traceback" not in run.stderr
    assert f"encoder group '{key}', video shard 1: committed data is missing" in run.stderr.replace("\n", "")
    assert "samples affected: v00" in run.stderr.replace("\n", "")


@pytest.mark.integration
def test_merv_eval_exits_nonzero_naming_a_deleted_shard(tmp_path):
    from test_evaluate import fill_store, write_mcq_benchmark

    from merv.extract.sources import read_manifest
    from merv.pipelines import evaluate as E
    from merv.train.export import save_merv
    from merv.train.tiny import build_tiny_merv

    model, _ = build_tiny_merv(seed=0)
    save_merv(model, tmp_path / "ckpt")
    bench = write_mcq_benchmark(tmp_path / "eval_data" / "percep")
    records = read_manifest(E.write_eval_manifest(bench, tmp_path / "manifest.jsonl"))
    store = fill_store(tmp_path / "features.zarr", records, model)  # 3 samples per shard
    group = store.group(store.encoder_keys()[0])
    _shard_file(tmp_path / "features.zarr", group, 1).unlink()
    with pytest.raises(MissingShardDataError, match=f"encoder group '{group.key}', video shard 1"):
        E.evaluate(model.eval(), [bench], str(tmp_path / "features.zarr"), tmp_path / "direct", mode="loglik")
    run = _cli("eval", str(tmp_path / "ckpt"), "--benchmark", str(bench), "--store", str(tmp_path / "features.zarr"),
               "--out", str(tmp_path / "out"), "--mode", "loglik", "--device", "cpu")
    assert run.returncode == 2, run.stderr[-3000:]
    text = run.stderr.replace("\n", "")
    assert f"encoder group '{group.key}', video shard 1: committed data is missing" in text and "Traceback" not in text


# --------------------------------------------------------------------------- item 6: verify without false alarms
@pytest.mark.parametrize("encoding", ["fp16", "bitround", "int8"])
def test_a_shard_whose_samples_all_failed_verifies_clean(tmp_path, encoding):
    path = tmp_path / "s.zarr"
    store = FeatureStore.create(str(path), samples_per_shard=PER_SHARD)
    store.add_samples([SampleRecord(f"v{i}", f"/data/v{i}.mp4") for i in range(6)])
    group = store.ensure_group(_spec(encoding=encoding))
    group.write_shard("video", 0, np.zeros((3, *GRID, DIM)), failed={0: "a", 1: "b", 2: "c"})
    group.write_shard("video", 1, np.zeros((3, *GRID, DIM)))  # real features that happen to be zeros
    assert _shard_file(path, group, 0).exists() and _shard_file(path, group, 1).exists()  # zeros are stored
    report = verify_store(FeatureStore.open(str(path)))
    assert report.ok and report.shards_checked == 2, [str(p) for p in report.problems]
    out = CliRunner().invoke(app, ["store", "verify", str(path)])
    assert out.exit_code == 0 and "CORRUPT" not in out.output, out.output
    assert np.array_equal(FeatureReader(FeatureStore.open(str(path))).get("v4")["dinov2"], np.zeros((*GRID, DIM)))
    _shard_file(path, group, 0).unlink()  # as older stores left an all-failed shard: no object at all
    assert verify_store(FeatureStore.open(str(path))).ok
    _shard_file(path, group, 1).unlink()  # but a shard with real samples needs its data
    report = verify_store(FeatureStore.open(str(path)))
    assert [(p.shard, p.samples) for p in report.problems] == [(1, ["v3", "v4", "v5"])]
    assert f"its data object '{group.key}/video/c/1/0/0/0/0' is missing" in report.problems[0].message


def test_an_all_failed_shard_from_the_real_extraction_path_verifies_clean(tmp_path):
    from testkit import media as H

    from merv.extract.job import ExtractOptions, prepare_store
    from merv.extract.plan import PAPER_DECODE_FRAMES
    from merv.extract.worker import ShardEncoder, WorkerConfig, decode_sample

    media = tmp_path / "media"
    media.mkdir()
    rows = []
    for i in range(2):  # two undecodable files: every sample of the shard fails
        (media / f"bad{i}.mp4").write_bytes(b"\x00\x00\x00\x18ftypisom" + b"\x00" * 100)
        rows.append({"id": f"bad{i}", "path": str(media / f"bad{i}.mp4")})
    rows.append({"id": "good", "path": str(H.write_video(media / "good.mp4", n_frames=20, noise=8))})
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    opts = ExtractOptions(encoders=["dinov2"], size="tiny", grid="native", samples_per_shard=2)
    store, keys, _ = prepare_store(str(manifest), str(tmp_path / "s.zarr"), opts)
    worker = ShardEncoder(WorkerConfig(["dinov2"], {"dinov2": keys[0]}, size="tiny"), store.url)
    table = store.samples
    for shard, rows_ in ((0, range(2)), (1, range(2, 3))):
        idx = table.indices_of_rows("video", rows_)
        recs = [table.record(int(i)) for i in idx]
        decoded = [decode_sample(r.source, (r.start, r.end, r.end_frame), row, PAPER_DECODE_FRAMES) for r, row in zip(recs, rows_)]
        result = worker.process("video", shard, keys, [table.ids[int(i)] for i in idx], decoded)
    group = FeatureStore.open(str(tmp_path / "s.zarr")).group(keys[0])
    assert set(group.commits("video")[0].failed) == {"0", "1"}
    assert group.kv.exists("video/c/0/0/0/0/0")  # the all-failed shard's zeros are stored like any shard
    report = verify_store(FeatureStore.open(str(tmp_path / "s.zarr")))
    assert report.ok and report.shards_checked == 2, [str(p) for p in report.problems]
    assert result.samples == 1


# --------------------------------------------------------------------------- item 6: corrupt metadata
def _docs(path: Path, group: Any) -> dict[str, Path]:
    return {"root": path / "zarr.json", "group": path / group.key / "zarr.json",
            "array": path / group.key / "video" / "zarr.json", "samples": path / "samples" / "id" / "zarr.json"}


def _use(store: FeatureStore) -> None:
    """What every user of a store does first: the sample table, the groups and their sizes."""
    assert len(store.samples) and all(store.group(k).rows("video") for k in store.encoder_keys())


def _wrong_shape(doc: dict[str, Any], which: str) -> dict[str, Any]:
    """Valid JSON, wrong content: what a bad edit or another tool could leave."""
    if which == "root":
        doc["attributes"]["merv_store"]["samples_per_shard"] = "many"
    elif which == "group":
        doc["attributes"]["merv_encoder"]["grid"] = [4]
    elif which == "array":
        doc["shape"] = [*doc["shape"][:-1], doc["shape"][-1] + 1]  # a d the group does not have
    else:
        doc["shape"] = [3, 3]
    return doc


@pytest.mark.parametrize("which", ["root", "group", "array", "samples"])
@pytest.mark.parametrize("damage", ["random-bytes", "truncated", "wrong-shape"])
def test_corrupt_metadata_is_one_line_naming_the_file(tmp_path, which, damage):
    path = tmp_path / "s.zarr"
    _, group, _ = _store(path)
    target = _docs(path, group)[which]
    text = target.read_text()
    if damage == "random-bytes":
        target.write_bytes(np.random.default_rng(3).integers(0, 256, 200, dtype=np.uint8).tobytes())
    elif damage == "truncated":
        target.write_text(text[: len(text) // 2])
    else:
        target.write_text(json.dumps(_wrong_shape(json.loads(text), which)))
    calls = {
        "open": lambda: _use(FeatureStore.open(str(path))),
        "reader": lambda: FeatureReader(str(path)).ids,
        "info": lambda: store_info(FeatureStore.open(str(path))),
        "verify": lambda: verify_store(FeatureStore.open(str(path))),
    }
    for name, call in calls.items():
        with pytest.raises(StoreMetadataError) as info:
            call()
        assert str(target) in str(info.value) and "\n" not in str(info.value), (name, str(info.value))
    for command in ("info", "verify"):
        out = CliRunner().invoke(app, ["store", command, str(path)])
        assert out.exit_code == 2, (command, out.output)
        assert str(target) in out.output.replace("\n", "") and "Traceback" not in out.output


# --------------------------------------------------------------------------- the same on an object store
def test_on_s3_a_deleted_shard_and_a_corrupt_document_are_named(s3_server):
    import s3fs

    opts = s3_server["storage_options"]
    url = f"s3://{s3_server['new_bucket']()}/s.zarr"
    store = FeatureStore.create(url, samples_per_shard=PER_SHARD, storage_options=opts)
    store.add_samples([SampleRecord(f"v{i}", f"/data/v{i}.mp4") for i in range(6)])
    group = store.ensure_group(_spec())
    for shard in range(2):
        group.write_shard("video", shard, np.ones((3, *GRID, DIM), np.float16))
    fs = s3fs.S3FileSystem(**opts, skip_instance_cache=True)  # another client: no shared caches
    fs.rm(f"{url[5:]}/{group.key}/video/c/1/0/0/0/0")
    reader = FeatureReader(url, storage_options=opts)
    with pytest.raises(MissingShardDataError, match=rf"store '{url}', encoder group '{group.key}', video shard 1.*samples affected: v4"):
        reader.get("v4")
    with pytest.raises(MissingShardDataError, match="samples affected: v3, v4, v5"):
        reader.read_shard("video", 1)
    assert reader.get("v1")["dinov2"].sum() == GRID[0] * GRID[1] * GRID[2] * DIM
    assert [p.shard for p in verify_store(FeatureStore.open(url, storage_options=opts)).problems] == [1]
    fs.pipe_file(f"{url[5:]}/{group.key}/video/zarr.json", b'{"zarr_format": 3, "node_ty')
    with pytest.raises(StoreMetadataError, match=rf"{url}/{group.key}/video/zarr.json is corrupt"):
        _ = FeatureReader(url, storage_options=opts).ids
