"""Instruction data: LLaVA JSON / JSONL parsing, join to stores by id or stem, missing features."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from merv.store import EncoderGroupSpec, FeatureReader, FeatureStore, SampleRecord
from merv.store.grid import pool_grid
from merv.train.data import (
    DataSource,
    InstructionData,
    InstructionDataError,
    MissingFeaturesError,
    MissingReport,
    load_records,
)

ENCODERS = (("dino", (2, 4, 4), 8, True), ("vivit", (2, 4, 4), 6, False))


def make_store(path: Path, videos: int, images: int, *, prefix: str = "", per_shard=(4, 3), encoders=ENCODERS,
               pending=(), failed=None, seed: int = 0) -> FeatureStore:
    """A store with random features; `pending` (kind, shard) left uncommitted, `failed` {(kind, row): reason}."""
    st = FeatureStore.create(str(path), samples_per_shard={"video": per_shard[0], "image": per_shard[1]})
    st.add_samples([SampleRecord(f"{prefix}v{i}", f"/d/{prefix}v{i}.mp4") for i in range(videos)]
                   + [SampleRecord(f"{prefix}i{i}", f"/d/{prefix}i{i}.jpg", kind="image") for i in range(images)])
    rng = np.random.default_rng(seed)
    failed = failed or {}
    for name, grid, dim, framewise in encoders:
        g = st.ensure_group(EncoderGroupSpec(name, f"fp-{name}", grid, dim, framewise=framewise))
        for kind in ("video", "image"):
            for shard in range(g.num_shards(kind)):
                if (kind, shard) in pending:
                    continue
                rows = g.shard_range(kind, shard)
                fails = {r - rows.start: why for (k, r), why in failed.items() if k == kind and r in rows}
                g.write_shard(kind, shard, rng.standard_normal((len(rows), *grid, dim)), failed=fails)
    return st


def record(rid: str, visual: str | None = None, path: str | None = None, turns: int = 1) -> dict:
    conv = []
    for t in range(turns):
        q = f"question {t} about {rid}"
        if t == 0 and visual:
            q = f"<{visual}>\n{q}"
        conv += [{"from": "human", "value": q}, {"from": "gpt", "value": f"answer {t} for {rid}"}]
    rec: dict = {"id": rid, "conversations": conv}
    if visual:
        rec[visual] = path or f"{rid}.{'mp4' if visual == 'video' else 'jpg'}"
    return rec


def write(path: Path, records: list[dict]) -> str:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    else:
        path.write_text(json.dumps(records))
    return str(path)


def test_json_and_jsonl_multi_turn_text_only_join_by_id(tmp_path):
    make_store(tmp_path / "s.zarr", 5, 4)
    a = write(tmp_path / "a.json", [record(f"v{i}", "video", turns=2) for i in range(5)])
    b = write(tmp_path / "b.jsonl", [record(f"i{i}", "image") for i in range(4)] + [record("chat0"), record("chat1", turns=3)])
    data = InstructionData.build([DataSource([a, b], tmp_path / "s.zarr")])
    assert len(data) == 11
    table = FeatureStore.open(str(tmp_path / "s.zarr")).samples
    by_id = {data.ids[i]: data.example(i) for i in range(len(data))}
    assert by_id["v3"].sample == table.index["v3"] and by_id["v3"].has_visual
    assert by_id["i2"].sample == table.index["i2"]
    assert not by_id["chat1"].has_visual and by_id["chat1"].sample == -1
    assert [t["from"] for t in by_id["chat1"].conversations] == ["human", "gpt"] * 3
    assert by_id["v1"].conversations == record("v1", "video", turns=2)["conversations"]
    # blocks: every example in exactly one block; a block never mixes stores, kinds or shards
    members = np.sort(data.block_members)
    assert np.array_equal(members, np.arange(len(data)))
    for b_ in range(data.num_blocks):
        block = data.block_members[data.block_offsets[b_] : data.block_offsets[b_ + 1]]
        keys = {(int(data.store_of[e]), table.kind_of(data.sample_of[e]) if data.store_of[e] >= 0 else "text",
                 int(table.rows[data.sample_of[e]]) // (4 if table.kind_of(data.sample_of[e]) == "video" else 3)
                 if data.store_of[e] >= 0 else 0) for e in block}
        assert len(keys) == 1
    assert data.num_blocks == 2 + 2 + 1  # video shards of 4 (5 rows), image shards of 3 (4 rows), one text chunk


def test_join_by_path_stem_when_ids_differ_from_file_names(tmp_path):
    make_store(tmp_path / "s.zarr", 4, 0)
    recs = [record(f"q{i}", "video", path=f"clips/sub/v{i}.mp4") for i in range(4)]
    recs.append(record("q9", "video", path="clips/v2.mp4"))  # a second question about v2
    path = write(tmp_path / "a.json", recs)
    data = InstructionData.build([DataSource(path, tmp_path / "s.zarr", key="stem")])
    assert len(data) == 5
    samples = {data.ids[i]: int(data.sample_of[i]) for i in range(len(data))}
    assert samples["q9"] == samples["q2"]
    feats, has_visual = data.read_features([3, 4, 2])  # shared sample read once, copied to both rows
    assert has_visual.all() and torch.equal(feats["dino"][1], feats["dino"][2])
    with pytest.raises(MissingFeaturesError, match="5 examples .*5 not in the store"):
        InstructionData.build([DataSource(path, tmp_path / "s.zarr", key="id")])
    custom = InstructionData.build([DataSource(path, tmp_path / "s.zarr", key=lambda r: "v" + r["id"][1:] if r["id"] != "q9" else "v0")])
    assert len(custom) == 5


def test_missing_pending_and_failed_ids_fail_clearly_or_are_dropped(tmp_path, caplog):
    # video shard 1 (rows 4..7) pending; video row 1 failed; 13 records not in the store
    make_store(tmp_path / "s.zarr", 10, 3, pending={("video", 1)}, failed={("video", 1): "decode error: moov atom"})
    recs = [record(f"v{i}", "video") for i in range(10)] + [record(f"i{i}", "image") for i in range(3)]
    recs += [record(f"gone{i}", "video") for i in range(12)] + [record("gone0", "video"), record("chat")]
    path = write(tmp_path / "a.json", recs)
    with pytest.raises(MissingFeaturesError) as err:
        InstructionData.build([DataSource(path, tmp_path / "s.zarr")])
    msg = str(err.value)
    # 4 pending + 1 failed (both encoders record row 1 as failed: counted once) + 13 not in the store
    assert "18 examples (17 distinct ids)" in msg
    assert "4 pending" in msg and "1 failed" in msg and "13 not in the store" in msg
    assert "v4 (pending for dino)" in msg and "v1 (failed for dino: decode error: moov atom)" in msg
    assert "First 10:" in msg and "gone4 (not in" in msg and "gone5" not in msg  # only the first 10 are named
    assert "--allow-missing" in msg and "--join-key" in msg
    assert err.value.report.examples == 18
    with caplog.at_level(logging.WARNING, logger="merv.train.data"):
        data = InstructionData.build([DataSource(path, tmp_path / "s.zarr")], allow_missing=True)
    assert "18 examples" in caplog.text
    kept = {data.ids[i] for i in range(len(data))}
    assert kept == {"v0", "v2", "v3", "v8", "v9", "i0", "i1", "i2", "chat"}
    assert data.missing.examples == 18 and data.missing.by_cause["pending"] == 4
    # a source without a store cannot serve visual records
    with pytest.raises(MissingFeaturesError, match="without a store"):
        InstructionData.build([DataSource(path, None)])


def test_encoder_subset_pool_to_and_mixed_rows(tmp_path):
    make_store(tmp_path / "s.zarr", 3, 2)
    path = write(tmp_path / "a.json", [record("v1", "video"), record("chat"), record("i1", "image"), record("v2", "video")])
    data = InstructionData.build([DataSource(path, tmp_path / "s.zarr")], encoders=["vivit"], pool_to=(2, 2))
    assert data.encoder_names == ["vivit"] and data.feature_shapes == {"vivit": (2, 2, 2, 6)}
    feats, has_visual = data.read_features(np.arange(4), dtype=torch.float32)
    assert has_visual.tolist() == [True, False, True, True]
    x = feats["vivit"]
    assert x.shape == (4, 2, 2, 2, 6) and x.dtype == torch.float32
    assert torch.count_nonzero(x[1]) == 0  # text-only row is zeros
    raw = FeatureReader(str(tmp_path / "s.zarr"), ["vivit"])
    for row, sid in ((0, "v1"), (2, "i1"), (3, "v2")):
        want = pool_grid(raw.get(sid)["vivit"], (2, 2)).astype(np.float32)
        assert np.array_equal(x[row].numpy(), want)
    both = InstructionData.build([DataSource(path, tmp_path / "s.zarr")])
    assert set(both.feature_shapes) == {"dino", "vivit"} and both.feature_shapes["dino"] == (2, 4, 4, 8)


def test_several_stores_must_agree_on_feature_shapes(tmp_path):
    make_store(tmp_path / "a.zarr", 2, 0)
    make_store(tmp_path / "b.zarr", 0, 2, prefix="b", encoders=(("dino", (2, 6, 6), 8, True),))
    ja = write(tmp_path / "a.json", [record("v0", "video"), record("v1", "video")])
    jb = write(tmp_path / "b.json", [record("bi0", "image"), record("bi1", "image")])
    sources = [DataSource(ja, tmp_path / "a.zarr"), DataSource(jb, tmp_path / "b.zarr")]
    with pytest.raises(ValueError, match="pool_to"):
        InstructionData.build(sources, encoders=["dino"])
    data = InstructionData.build(sources, encoders=["dino"], pool_to=(2, 2))
    feats, has_visual = data.read_features(np.arange(4))
    assert feats["dino"].shape == (4, 2, 2, 2, 8) and has_visual.all()
    assert data.store_of.tolist() == [0, 0, 1, 1]
    with pytest.raises(Exception, match="vivit"):  # store b has no vivit group
        InstructionData.build(sources)


def test_malformed_files_name_the_file_and_record(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([record("a"), {"id": "b", "conversations": []}]))
    with pytest.raises(InstructionDataError, match=r"bad.json: record 1 \(id 'b'\).*conversations"):
        load_records(bad)
    lines = tmp_path / "bad.jsonl"
    lines.write_text(json.dumps(record("a")) + "\n{oops\n")
    with pytest.raises(InstructionDataError, match=r"bad.jsonl:2"):
        load_records(lines)
    (tmp_path / "obj.json").write_text('{"id": 1}')
    with pytest.raises(InstructionDataError, match="list of records"):
        load_records(tmp_path / "obj.json")
    with pytest.raises(InstructionDataError, match="nope.json does not exist; pass --data"):
        load_records(tmp_path / "nope.json")
    with pytest.raises(InstructionDataError, match="is a directory"):
        load_records(tmp_path)
    (tmp_path / "empty.json").write_text("  \n")
    with pytest.raises(InstructionDataError, match="empty.json: the file is empty"):
        load_records(tmp_path / "empty.json")
    (tmp_path / "latin1.json").write_bytes(b'[{"id": "caf\xe9"}]')
    with pytest.raises(InstructionDataError, match="latin1.json: not UTF-8 text"):
        load_records(tmp_path / "latin1.json")


@pytest.mark.parametrize("turns, why", [
    ([("gpt", "a"), ("human", "q")], "turn 0 comes from 'gpt'"),
    ([("human", "q"), ("human", "q2")], "turn 1 comes from 'human'"),
    ([("human", "q")], "has no answer"),
])
def test_conversations_that_cannot_train_are_refused_when_read(tmp_path, turns, why):
    """Checked up front: otherwise a loader worker fails mid-epoch, or the record adds no answer tokens."""
    conv = [{"from": who, "value": text} for who, text in turns]
    path = write(tmp_path / "conv.json", [record("a"), {"id": "b", "conversations": conv}])
    with pytest.raises(InstructionDataError, match=rf"conv.json: record 1 \(id 'b'\): the conversation {why}"):
        load_records(path)


def test_join_key_advice_names_cli_flags(tmp_path):
    with pytest.raises(InstructionDataError, match="--join-key stem"):
        DataSource(write(tmp_path / "a.json", [record("a")]), key="name")
    report = MissingReport()
    report.add("ghost", "not in the store", "not in s.zarr")
    text = str(MissingFeaturesError(report))
    assert "--allow-missing" in text and "--join-key stem" in text and "allow_missing=" not in text and "key=" not in text
