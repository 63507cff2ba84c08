"""Feature store behaviour: round trips, atomic shard commits, concurrency, corruption, errors."""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from testkit import procs
from typer.testing import CliRunner

from merv.cli import app
from merv.store import (
    EncoderGroupSpec,
    FeatureReader,
    FeatureStore,
    FingerprintMismatchError,
    IncompatibleStoreError,
    NotAStoreError,
    SampleNotFoundError,
    SampleRecord,
    SampleUnavailableError,
    StoreExistsError,
    StoreNotFoundError,
    UnknownEncoderError,
    choose_samples_per_shard,
    parse_grid,
    store_info,
    verify_store,
)
from merv.store.encodings import error_bound
from merv.store.grid import pool_grid

GRID = (4, 3, 3)
DIM = 16


def mem_url() -> str:
    return f"memory://merv-test-{uuid.uuid4().hex}"


def spec(name: str = "dinov2", fp: str = "fp-a", framewise: bool = True, encoding: str = "fp16", grid=GRID, dim=DIM):
    return EncoderGroupSpec(name, fp, grid, dim, framewise=framewise, encoding=encoding)  # type: ignore[arg-type]


def make_store(url: str, videos: int = 7, images: int = 3, per_shard: int = 3) -> FeatureStore:
    store = FeatureStore.create(url, samples_per_shard={"video": per_shard, "image": per_shard})
    recs = [SampleRecord(f"v{i}", f"/data/v{i}.mp4") for i in range(videos)]
    recs += [SampleRecord(f"i{i}", f"/data/i{i}.jpg", kind="image") for i in range(images)]
    store.add_samples(recs)
    return store


def fill(store: FeatureStore, group, rng: np.random.Generator, dtype=np.float16) -> dict[str, np.ndarray]:
    """Write every shard of a group; return the per-id features written (broadcast for images)."""
    truth = {}
    table = store.samples
    for kind in ("video", "image"):
        t = group.spec.stored_shape(kind)[0]
        for shard in range(group.num_shards(kind)):
            rows = group.shard_range(kind, shard)
            x = rng.standard_normal((len(rows), t, *group.spec.grid[1:], group.spec.dim)).astype(dtype)
            group.write_shard(kind, shard, x)
            for j, row in enumerate(rows):
                sid = table.ids[int(table.indices_of_rows(kind, [row])[0])]
                truth[sid] = np.repeat(x[j], group.spec.grid[0] // t, axis=0)
    return truth


@pytest.fixture
def store() -> FeatureStore:
    return make_store(mem_url())


# --------------------------------------------------------------------------- round trips
def test_fp16_round_trip_is_exact_through_every_read_path(store):
    group = store.ensure_group(spec())
    truth = fill(store, group, np.random.default_rng(0))
    reader = FeatureReader(store)
    assert sorted(reader.ids) == sorted(truth)
    for sid, want in truth.items():
        got = reader.get(sid)["dinov2"]
        assert got.dtype == np.float16 and got.shape == (*GRID, DIM)
        assert np.array_equal(got, want)
    ids = ["i1", "v6", "v0", "i0"]
    batch = reader.get_batch(ids)["dinov2"]
    assert np.array_equal(batch, np.stack([truth[i] for i in ids]))
    assert np.array_equal(reader.get_index(store.samples.index["v3"])["dinov2"], truth["v3"])
    streamed = {}
    for shard in reader.iter_shards():
        for sid, arr in zip(shard.ids, shard.features["dinov2"]):
            streamed[sid] = arr
    assert streamed.keys() == truth.keys()
    assert all(np.array_equal(streamed[k], truth[k]) for k in truth)
    as_torch = FeatureReader(store, as_torch=True).get("v2")["dinov2"]
    assert isinstance(as_torch, torch.Tensor) and torch.equal(as_torch, torch.from_numpy(truth["v2"]))


@pytest.mark.parametrize("encoding", ["bitround", "int8"])
def test_lossy_encodings_stay_within_documented_bound_and_compress(encoding):
    url = mem_url()
    st = make_store(url, videos=6, images=0, per_shard=6)
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((6, *GRID, 64)) * rng.uniform(0.1, 20, size=(6, *GRID, 1))).astype(np.float32)
    lossy = st.ensure_group(spec("a", encoding=encoding, dim=64))
    exact = st.ensure_group(spec("b", encoding="fp16", dim=64))
    lossy.write_shard("video", 0, x)
    exact.write_shard("video", 0, x)
    got = FeatureReader(st, ["a"]).get_batch([f"v{i}" for i in range(6)])["a"].astype(np.float32)
    err = np.abs(got - x)
    assert (err <= error_bound(encoding, x)).all()
    assert err.max() > 0  # really lossy: the bound is not vacuous
    info = {g["name"]: g for g in store_info(st)["encoders"]}
    assert info["a"]["bytes_per_sample"]["video"] < info["b"]["bytes_per_sample"]["video"]
    assert info["a"]["encoding"].startswith(encoding)


@pytest.mark.parametrize("encoding", ["fp16", "bitround", "int8"])
def test_shard_reader_row_reads_equal_zarr_reads_bit_for_bit(tmp_path, encoding):
    """The loader's fast path (merv.store.shard_reader) must return exactly what zarr returns, for any
    row order, repeats and rows spread over several shards, values and int8 scales alike."""
    from zarr.core.sync import sync

    from merv.store import shard_reader
    from merv.store.group import _read_runs

    st = make_store(str(tmp_path / "s.zarr"), videos=11, images=0, per_shard=4)
    group = st.ensure_group(spec(encoding=encoding, framewise=False))
    fill(st, group, np.random.default_rng(3), dtype=np.float32)
    arrays = [group.array("video")] + ([group.scales("video")] if encoding == "int8" else [])
    rng = np.random.default_rng(4)
    for arr in arrays:
        assert shard_reader.supports(arr)
        for rows in (np.array([10, 0, 5, 5, 9, 1]), rng.integers(0, 11, 20), np.array([3])):
            got, want = sync(shard_reader.read_rows(arr, rows)), sync(_read_runs(arr, rows))
            assert got.dtype == want.dtype and np.array_equal(got.view(np.uint8), want.view(np.uint8))
    partial = st.ensure_group(spec("siglip", encoding=encoding, framewise=False))  # shards 1, 2 never written
    partial.write_shard("video", 0, np.ones((4, *GRID, DIM), dtype=np.float32))
    rows = np.array([9, 0, 5])
    got, want = sync(shard_reader.read_rows(partial.array("video"), rows)), sync(_read_runs(partial.array("video"), rows))
    assert np.array_equal(got.view(np.uint8), want.view(np.uint8))


def test_shard_reader_names_a_corrupt_row_and_unknown_layouts_use_zarr(tmp_path):
    from merv.store import shard_reader

    path = tmp_path / "s.zarr"
    st = make_store(str(path))
    group = st.ensure_group(spec())
    truth = fill(st, group, np.random.default_rng(12))
    shard_file = path / group.key / "video" / "c" / "1" / "0" / "0" / "0" / "0"
    raw = bytearray(shard_file.read_bytes())
    raw[40:48] = bytes(b ^ 0xFF for b in raw[40:48])  # inside the first chunk of shard 1 (row 3, sample v3)
    shard_file.write_bytes(bytes(raw))
    reader = FeatureReader(FeatureStore.open(str(path)))
    with pytest.raises(shard_reader.ChunkChecksumError, match="row 3"):
        reader.get_batch(["v4", "v3"])
    assert np.array_equal(reader.get_batch(["v4", "v0"])["dinov2"][0], truth["v4"])  # other rows still read
    other = zarr.create_array(zarr.storage.MemoryStore(), shape=(4, 3), chunks=(2, 3), dtype="float16")
    assert not shard_reader.supports(other)


@pytest.mark.parametrize("shape", [(3, 5, 7), (2, 16, 8, 8, 1024), (1000, 9), (0, 4)])
def test_int8_dequantization_is_the_exact_formula_across_blocks(shape):
    """The blocked dequantizer must give float16(float32(q) * scale) bit for bit, whatever the
    number of tokens against its block size (one partial block, many blocks, none)."""
    from merv.store.encodings import dequantize_int8, quantize_int8

    rng = np.random.default_rng(7)
    x = (rng.standard_normal(shape) * rng.uniform(0.01, 50, size=(*shape[:-1], 1))).astype(np.float32)
    q, s = quantize_int8(x)
    got = dequantize_int8(q, s)
    want = (q.astype(np.float32) * s[..., None].astype(np.float32)).astype(np.float16)
    assert got.shape == want.shape and got.dtype == np.float16
    assert np.array_equal(got.view(np.int16), want.view(np.int16))


def test_images_store_one_frame_for_framewise_encoders_only(store):
    framewise = store.ensure_group(spec("siglip", framewise=True))
    temporal = store.ensure_group(spec("vivit", framewise=False))
    assert framewise.array("image").shape[1] == 1
    assert temporal.array("image").shape[1] == GRID[0]
    truth_fw = fill(store, framewise, np.random.default_rng(2))
    truth_t = fill(store, temporal, np.random.default_rng(3))
    got = FeatureReader(store).get("i2")
    assert got["siglip"].shape == got["vivit"].shape == (*GRID, DIM)
    assert np.array_equal(got["siglip"], truth_fw["i2"])
    assert all(np.array_equal(got["siglip"][k], got["siglip"][0]) for k in range(GRID[0]))
    assert np.array_equal(got["vivit"], truth_t["i2"])


def test_pooling_a_native_cache_at_load_time(store):
    group = store.ensure_group(spec(grid=(2, 6, 6)))
    truth = fill(store, group, np.random.default_rng(4))
    got = FeatureReader(store, pool_to=(3, 3)).get("v1")["dinov2"]
    assert got.shape == (2, 3, 3, DIM)
    want = truth["v1"].astype(np.float32).reshape(2, 3, 2, 3, 2, DIM).mean(axis=(2, 4))
    assert np.allclose(got.astype(np.float32), want, atol=2e-3)
    assert np.array_equal(pool_grid(truth["v1"], (6, 6)), truth["v1"])


# --------------------------------------------------------------------------- commits
def test_written_but_uncommitted_shard_is_invisible_and_rewrite_commits(store):
    group = store.ensure_group(spec())
    rng = np.random.default_rng(5)
    good = rng.standard_normal((3, *GRID, DIM)).astype(np.float16)
    group.write_shard("video", 0, good)
    # crash between writing and committing shard 1: data lands, no commit record
    half = rng.standard_normal((3, *GRID, DIM)).astype(np.float16)
    group.array("video")[3:6] = half
    reader = FeatureReader(store)
    assert reader.committed_shards("video") == [0]
    assert set(reader.ids) == {"v0", "v1", "v2"}
    with pytest.raises(SampleUnavailableError, match="pending"):
        reader.get("v4")
    assert [b.shard for b in reader.iter_shards("video")] == [0]
    assert np.array_equal(reader.get("v1")["dinov2"], good[1])
    # the re-run writes the whole shard again and commits it
    group.write_shard("video", 1, half)
    reader.refresh()
    assert reader.committed_shards("video") == [0, 1]
    assert np.array_equal(reader.get("v4")["dinov2"], half[1])
    assert np.array_equal(reader.get("v1")["dinov2"], good[1])
    assert verify_store(store).ok


def test_crash_during_rewrite_hides_the_shard_and_keeps_others(store, monkeypatch):
    group = store.ensure_group(spec())
    rng = np.random.default_rng(6)
    first = rng.standard_normal((3, *GRID, DIM)).astype(np.float16)
    group.write_shard("video", 0, first)
    group.write_shard("video", 1, first)

    def crash(key, value):
        raise KeyboardInterrupt("killed before commit")

    monkeypatch.setattr(group.kv, "set", crash)
    with pytest.raises(KeyboardInterrupt):
        group.write_shard("video", 1, -first)
    monkeypatch.undo()
    reader = FeatureReader(store)
    assert reader.committed_shards("video") == [0]  # never half-visible
    assert np.array_equal(reader.get("v0")["dinov2"], first[0])


def test_torn_commit_record_is_not_a_commit_and_verify_reports_it(store):
    group = store.ensure_group(spec())
    group.write_shard("video", 0, np.ones((3, *GRID, DIM), np.float16))
    group.kv.set("commits/video/00000000.json", b'{"shard": 0, "sta')
    reader = FeatureReader(store)
    assert reader.committed_shards("video") == []
    report = verify_store(store)
    assert not report.ok and "commit record" in str(report.problems[0])


def test_failed_samples_are_recorded_and_never_returned(store):
    group = store.ensure_group(spec())
    x = np.random.default_rng(7).standard_normal((3, *GRID, DIM)).astype(np.float16)
    group.write_shard("video", 0, x, failed={1: "TruncatedVideoError: moov atom not found"})
    reader = FeatureReader(store)
    with pytest.raises(SampleUnavailableError, match="moov atom"):
        reader.get("v1")
    with pytest.raises(SampleUnavailableError):
        reader.get_batch(["v0", "v1"])
    batch = next(reader.iter_shards("video"))
    assert batch.ids == ["v0", "v2"]
    assert np.array_equal(batch.features["dinov2"], x[[0, 2]])
    status = store_info(store)["encoders"][0]["status"]["video"]
    assert status["committed"] == 2 and status["failed"] == 1 and status["pending"] == 4


def test_failures_in_a_later_shard_are_recorded_by_absolute_row(store):
    group = store.ensure_group(spec())
    fill(store, group, np.random.default_rng(15))
    x = np.ones((3, *GRID, DIM), np.float16)
    group.write_shard("video", 1, x, failed={1: "bad frame"})  # rows 3..5: v4 fails
    reader = FeatureReader(store)
    assert reader.state(store.samples.index["v4"])[0] == "failed"
    assert reader.state(store.samples.index["v1"])[0] == "ok"
    with pytest.raises(SampleUnavailableError, match="bad frame"):
        reader.get("v4")
    assert "v4" not in reader.ids and len(reader.ids) == 9
    assert next(b for b in reader.iter_shards("video") if b.shard == 1).ids == ["v3", "v5"]


def test_encoder_subset_sees_only_samples_committed_in_all_selected(store):
    a = store.ensure_group(spec("a"))
    b = store.ensure_group(spec("b", fp="other"))
    fill(store, a, np.random.default_rng(8))
    b.write_shard("video", 0, np.zeros((3, *GRID, DIM)), failed={2: "boom"})
    assert len(FeatureReader(store, ["a"]).ids) == 10
    both = FeatureReader(store, ["a", "b"])
    assert sorted(both.ids) == ["v0", "v1"]
    assert set(both.get("v0")) == {"a", "b"}


def test_growing_the_sample_table_keeps_full_shards_and_reopens_the_partial_one(store):
    group = store.ensure_group(spec())
    fill(store, group, np.random.default_rng(9))
    store.add_samples([SampleRecord("v7", "/data/v7.mp4"), SampleRecord("v8", "/data/v8.mp4")])
    reader = FeatureReader(store)
    assert reader.committed_shards("video") == [0, 1]  # shard 2 now spans v6..v8: pending again
    assert "v6" not in reader.ids and "v0" in reader.ids
    # re-adding identical records is a no-op; a conflicting one is an error naming the id
    assert store.add_samples([SampleRecord("v0", "/data/v0.mp4")]) == []
    with pytest.raises(ValueError, match="'v0'"):
        store.add_samples([SampleRecord("v0", "/elsewhere/v0.mp4")])


# --------------------------------------------------------------------------- processes


@pytest.mark.integration
def test_two_processes_writing_different_shards_verify_clean(tmp_path):
    path = str(tmp_path / "s.zarr")
    st = FeatureStore.create(path, samples_per_shard=2)
    st.add_samples([SampleRecord(f"v{i}", f"/v{i}") for i in range(16)])
    st.ensure_group(spec())
    ctx = mp.get_context("spawn")
    writers = [ctx.Process(target=procs.write_shards, args=(path, list(range(k, 8, 2)), GRID, DIM)) for k in (0, 1)]
    for p in writers:
        p.start()
    for p in writers:
        p.join(120)
        assert p.exitcode == 0
    st = FeatureStore.open(path)
    assert verify_store(st).ok
    reader = FeatureReader(st)
    assert len(reader.ids) == 16
    for i in range(16):
        assert (reader.get(f"v{i}")["dinov2"] == i).all()


def _files(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def test_adding_a_second_encoder_leaves_the_first_byte_identical(tmp_path):
    path = tmp_path / "s.zarr"
    st = make_store(str(path))
    first = st.ensure_group(spec("dinov2"))
    fill(st, first, np.random.default_rng(10))
    before = _files(path / first.key)
    root_meta = json.loads((path / "zarr.json").read_text())
    second = st.ensure_group(spec("siglip", fp="s"))
    fill(st, second, np.random.default_rng(11))
    assert _files(path / first.key) == before
    assert json.loads((path / "zarr.json").read_text()) == root_meta
    assert FeatureStore.open(str(path)).encoder_keys() == sorted([first.key, second.key])


def test_flipped_bytes_are_named_by_verify_and_the_cli_exits_nonzero(tmp_path):
    path = tmp_path / "s.zarr"
    st = make_store(str(path))
    group = st.ensure_group(spec())
    fill(st, group, np.random.default_rng(12))
    runner = CliRunner()
    ok = runner.invoke(app, ["store", "verify", str(path)])
    assert ok.exit_code == 0, ok.output
    shard_file = path / group.key / "video" / "c" / "1" / "0" / "0" / "0" / "0"
    raw = bytearray(shard_file.read_bytes())
    raw[40:48] = bytes(b ^ 0xFF for b in raw[40:48])  # inside the first chunk of shard 1 (sample v3)
    shard_file.write_bytes(bytes(raw))
    report = verify_store(FeatureStore.open(str(path)))
    assert not report.ok
    assert [(p.group, p.kind, p.shard) for p in report.problems] == [(group.key, "video", 1)]
    assert report.problems[0].samples == ["v3"]
    bad = runner.invoke(app, ["store", "verify", str(path)])
    assert bad.exit_code == 1
    assert "shard 1" in bad.output and "v3" in bad.output


def test_store_info_cli_reports_counts_and_bytes(tmp_path):
    path = tmp_path / "s.zarr"
    st = make_store(str(path))
    fill(st, st.ensure_group(spec()), np.random.default_rng(13))
    out = CliRunner().invoke(app, ["store", "info", str(path), "--json"])
    assert out.exit_code == 0, out.output
    info = json.loads(out.output)
    g = info["encoders"][0]
    assert g["status"]["video"]["committed"] == 7 and g["status"]["image"]["committed"] == 3
    assert g["bytes_on_disk"] > 0 and g["bytes_per_sample"]["video"] > g["bytes_per_sample"]["image"]


# --------------------------------------------------------------------------- errors
def test_bad_inputs_give_clear_errors_naming_the_input(tmp_path, store):
    missing = tmp_path / "nope.zarr"
    with pytest.raises(StoreNotFoundError, match="nope.zarr"):
        FeatureStore.open(str(missing))
    plain_dir = tmp_path / "plain"
    plain_dir.mkdir()
    with pytest.raises(NotAStoreError, match="plain"):
        FeatureStore.open(str(plain_dir))
    a_file = tmp_path / "file.txt"
    a_file.write_text("hello")
    with pytest.raises(NotAStoreError, match="file.txt"):
        FeatureStore.open(str(a_file))
    other = tmp_path / "other.zarr"
    zarr.open_group(str(other), mode="w", zarr_format=3)
    with pytest.raises(NotAStoreError, match="without MERV store metadata"):
        FeatureStore.open(str(other))
    with pytest.raises(StoreExistsError):
        FeatureStore.create(store.url)
    store.ensure_group(spec("dinov2", fp="fp-a"))
    with pytest.raises(FingerprintMismatchError, match="fp-b"):
        FeatureReader(store, ["dinov2"], fingerprints={"dinov2": "fp-b"})
    with pytest.raises(UnknownEncoderError, match="vivit"):
        FeatureReader(store, ["vivit"])
    with pytest.raises(SampleNotFoundError, match="no-such-id"):
        FeatureReader(store).get("no-such-id")
    out = CliRunner().invoke(app, ["store", "info", str(missing)])
    assert out.exit_code == 2 and "nope.zarr" in out.output


def test_group_configuration_rules(store, tmp_path):
    a = store.ensure_group(spec("dinov2", fp="one"))
    b = store.ensure_group(spec("dinov2", fp="two"))  # another config of the same encoder coexists
    assert a.key != b.key
    assert store.ensure_group(spec("dinov2", fp="one")).key == a.key
    with pytest.raises(Exception, match="several configurations"):
        store.resolve("dinov2")
    assert store.resolve("dinov2", "two").key == b.key
    pooled = FeatureStore.create(str(tmp_path / "p.zarr"), grid="8x8")
    with pytest.raises(IncompatibleStoreError, match="8x8"):
        pooled.ensure_group(spec(grid=(16, 16, 16)))
    with pytest.raises(IncompatibleStoreError, match="native"):
        FeatureStore.open_or_create(str(tmp_path / "p.zarr"), grid=None)
    with pytest.raises(ValueError, match="shape"):
        a.write_shard("video", 0, np.zeros((2, *GRID, DIM)))
    with pytest.raises(ValueError, match="NaN"):
        a.write_shard("video", 0, np.full((3, *GRID, DIM), np.nan))
    ro = FeatureStore.open(str(tmp_path / "p.zarr"))
    with pytest.raises(PermissionError):
        ro.add_samples([SampleRecord("x", "/x")])


def test_shard_sizing_and_grid_parsing():
    assert choose_samples_per_shard(8 * 2**20, 128 * 2**20) == 16
    assert choose_samples_per_shard(2 * 2**20, 128 * 2**20) == 64
    assert choose_samples_per_shard(10, 2**40) == 4096
    native = FeatureStore.create(mem_url())
    pooled = FeatureStore.create(mem_url(), grid="8x8")
    assert native.meta.samples_per_shard["video"] == 16  # paper DINOv2 native: 8 MiB / sample
    assert pooled.meta.samples_per_shard["video"] == 64  # pooled 8x8: 2 MiB / sample
    assert parse_grid("8x8") == (8, 8) and parse_grid(64) == (8, 8) and parse_grid("native") is None
    with pytest.raises(ValueError, match="square"):
        parse_grid(60)


def test_local_and_url_stores_behave_alike(tmp_path):
    for url in (str(tmp_path / "a.zarr"), f"file://{tmp_path}/b.zarr", mem_url()):
        st = make_store(url, videos=3, images=0)
        truth = fill(st, st.ensure_group(spec()), np.random.default_rng(14))
        again = FeatureStore.open(url)
        assert np.array_equal(FeatureReader(again).get("v2")["dinov2"], truth["v2"])
        assert os.path.exists(tmp_path / "b.zarr") or not url.startswith("file://")
