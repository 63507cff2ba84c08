"""Streaming loader: exactly-once epochs for any world size / workers, order, resume, batches, prefetch."""

from __future__ import annotations

import json
import statistics
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from merv.store import EncoderGroupSpec, FeatureReader, FeatureStore, SampleRecord
from merv.train.data import DataSource, InstructionData
from merv.train.loader import BatchLayout, StreamingLoader, collate, epoch_sequence
from merv.train.shared_buffers import SharedBufferPool, release_flags, release_when_freed

IGNORE = -100


def tokenize(conversations: list[dict]) -> tuple[list[int], list[int]]:
    """Whitespace tokenizer: BOS 1, word ids from a hash; answers (odd turns) are the labels."""
    ids, labels = [1], [IGNORE]
    for t, turn in enumerate(conversations):
        words = [zlib.crc32(w.encode()) % 900 + 10 for w in turn["value"].split()]
        ids += words
        labels += words if t % 2 else [IGNORE] * len(words)
    return ids, labels


class SlowTokenize:
    """`tokenize` plus a fixed delay: stands in for slow reads / tokenisation in the producer."""

    def __init__(self, delay: float) -> None:
        self.delay = delay

    def __call__(self, conversations: list[dict]) -> tuple[list[int], list[int]]:
        time.sleep(self.delay)
        return tokenize(conversations)


def make_store(path: Path, videos: int, images: int, prefix: str, per_shard: tuple[int, int], seed: int) -> None:
    st = FeatureStore.create(str(path), samples_per_shard={"video": per_shard[0], "image": per_shard[1]})
    st.add_samples([SampleRecord(f"{prefix}v{i}", f"/d/{prefix}v{i}.mp4") for i in range(videos)]
                   + [SampleRecord(f"{prefix}i{i}", f"/d/{prefix}i{i}.jpg", kind="image") for i in range(images)])
    rng = np.random.default_rng(seed)
    for name, grid, dim, framewise in (("dino", (2, 4, 4), 8, True), ("vivit", (2, 4, 4), 6, False)):
        g = st.ensure_group(EncoderGroupSpec(name, f"fp-{name}", grid, dim, framewise=framewise))
        for kind in ("video", "image"):
            for shard in range(g.num_shards(kind)):
                rows = g.shard_range(kind, shard)
                g.write_shard(kind, shard, rng.standard_normal((len(rows), *grid, dim)))


def record(rid: str, visual: str | None, words: int) -> dict:
    q = f"<{visual}>\nwhat about {rid}" if visual else f"tell me about {rid}"
    rec: dict = {"id": rid, "conversations": [{"from": "human", "value": q},
                                              {"from": "gpt", "value": " ".join(["word"] * words)}]}
    if visual:
        rec[visual] = f"{rid}.x"
    return rec


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> InstructionData:
    """30 examples: store a (10 videos, 5 images), store b (6 images), 9 text-only; three sources."""
    d = tmp_path_factory.mktemp("loader")
    make_store(d / "a.zarr", 10, 5, "a", (4, 3), seed=0)
    make_store(d / "b.zarr", 0, 6, "b", (4, 2), seed=1)
    (d / "a.json").write_text(json.dumps([record(f"av{i}", "video", 1 + i % 4) for i in range(10)]))
    (d / "a.jsonl").write_text("".join(json.dumps(record(f"ai{i}", "image", 2)) + "\n" for i in range(5)))
    (d / "b.json").write_text(json.dumps([record(f"bi{i}", "image", 3) for i in range(6)]))
    (d / "t.json").write_text(json.dumps([record(f"t{i}", None, 1 + i) for i in range(9)]))
    return InstructionData.build(
        [DataSource([d / "a.json", d / "a.jsonl"], d / "a.zarr"), DataSource(d / "b.json", d / "b.zarr"),
         DataSource(d / "t.json")],
        text_block_size=4,
    )


def run_epoch(data, world: int, rank: int, workers: int, **kw) -> list[list[str]]:
    loader = StreamingLoader(data, tokenize, rank=rank, world_size=world, num_workers=workers, **kw)
    out = [batch["ids"] for batch in loader]
    assert out == loader.micro_batch_ids(0)  # the plan the tests can query is what is yielded
    return out


@pytest.mark.parametrize("workers", [0, 1, 2])
def test_every_sample_once_and_global_batches_identical_across_world_sizes(data, workers):
    all_ids = sorted(data.ids[i] for i in range(len(data)))
    assert len(all_ids) == 30 == len(set(all_ids))
    accum, gbs = 2, 8  # 4 global batches: 8, 8, 8, 6
    reference = StreamingLoader(data, tokenize, global_batch_size=gbs, accum=accum).global_batch_ids(0)
    assert [len(b) for b in reference] == [8, 8, 8, 6]
    for world in (1, 2, 3):
        per_rank = [run_epoch(data, world, r, workers, global_batch_size=gbs, accum=accum) for r in range(world)]
        assert {len(mbs) for mbs in per_rank} == {4 * accum}  # same step count on every rank
        seen = [sid for mbs in per_rank for mb in mbs for sid in mb]
        assert sorted(seen) == all_ids  # every sample exactly once
        for k, want in enumerate(reference):
            got = [sid for r in range(world) for mb in per_rank[r][k * accum : (k + 1) * accum] for sid in mb]
            assert got == want  # global batch k: same samples, same order, any world size
            sizes = [sum(len(mb) for mb in per_rank[r][k * accum : (k + 1) * accum]) for r in range(world)]
            assert max(sizes) - min(sizes) <= 1 and min(len(mb) for r in range(world) for mb in per_rank[r]) >= 1


def test_epoch_order_depends_on_seed_and_epoch_only_and_mixes_sources(data):
    a = StreamingLoader(data, tokenize, global_batch_size=5, seed=3)
    first = [b["ids"] for b in a]
    second = [b["ids"] for b in a]  # the loader moves on to epoch 1 by itself
    assert a.epoch == 2 and first != second and sorted(sum(first, [])) == sorted(sum(second, []))
    again = StreamingLoader(data, tokenize, global_batch_size=5, seed=3)
    assert again.global_batch_ids(0) == first and again.global_batch_ids(1) == second
    assert StreamingLoader(data, tokenize, global_batch_size=5, seed=4).global_batch_ids(0) != first
    # sources interleave: the first half of the epoch is not one source only
    prefixes = {sid[0] for sid in sum(first[:3], [])}
    assert len(prefixes) >= 2


def test_shuffle_buffer_spans_exactly_buffer_shards_blocks(data):
    block_of = np.empty(len(data), dtype=np.int64)
    for b in range(data.num_blocks):
        block_of[data.block_members[data.block_offsets[b] : data.block_offsets[b + 1]]] = b
    for buffer in (1, 2):
        seq = epoch_sequence(data.block_offsets, data.block_members, 0, 0, buffer)
        assert sorted(seq.tolist()) == list(range(len(data)))
        # walk the windows: each holds the examples of `buffer` whole blocks
        pos, windows = 0, 0
        while pos < len(seq):
            blocks, end = set(), pos
            while end < len(seq) and (block_of[seq[end]] in blocks or len(blocks) < buffer):
                blocks.add(block_of[seq[end]])
                end += 1
            assert sum(np.count_nonzero(block_of == b) for b in blocks) == end - pos
            pos, windows = end, windows + 1
        assert windows == -(-data.num_blocks // buffer)
    wide = epoch_sequence(data.block_offsets, data.block_members, 0, 0, data.num_blocks)
    runs = np.count_nonzero(np.diff(block_of[wide]) != 0)
    assert runs > data.num_blocks  # one window over everything interleaves blocks


@pytest.mark.parametrize("workers_after", [0, 2])
def test_resume_mid_epoch_continues_with_exactly_the_next_micro_batch(data, workers_after):
    kw = dict(global_batch_size=6, accum=2, seed=7)
    full = [b["ids"] for b in StreamingLoader(data, tokenize, **kw)]
    first = StreamingLoader(data, tokenize, **kw)
    got = []
    for batch in first:
        got.append(batch["ids"])
        if len(got) == 5:  # mid-step and mid-epoch
            break
    state = first.state_dict()
    assert state["epoch"] == 0 and state["micro_batches"] == 5
    resumed = StreamingLoader(data, tokenize, num_workers=workers_after, **kw)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # the state survives a JSON round trip
    rest = [b["ids"] for b in resumed]
    assert got + rest == full
    assert resumed.state_dict()["epoch"] == 1 and resumed.state_dict()["micro_batches"] == 0
    # leaving the loop and iterating again also continues where it stopped
    assert got[:5] == full[:5] and [b["ids"] for b in first] == full[5:]


def test_resume_on_another_world_size_at_a_step_boundary(data):
    one = StreamingLoader(data, tokenize, global_batch_size=6, accum=2)
    it = iter(one)
    for _ in range(4):  # two optimizer steps
        next(it)
    state = one.state_dict()
    remaining = one.global_batch_ids(0)[2:]
    ranks = []
    for r in range(2):
        loader = StreamingLoader(data, tokenize, global_batch_size=6, rank=r, world_size=2)
        loader.load_state_dict(state)
        ranks.append([b["ids"] for b in loader])
    assert [ranks[0][k] + ranks[1][k] for k in range(len(remaining))] == remaining
    next(it)
    with pytest.raises(ValueError, match="mid-step"):
        StreamingLoader(data, tokenize, global_batch_size=6, rank=0, world_size=2).load_state_dict(one.state_dict())
    with pytest.raises(ValueError, match="seed"):
        StreamingLoader(data, tokenize, global_batch_size=6, seed=1).load_state_dict(state)


def test_layouts_that_would_leave_a_rank_empty_are_refused():
    with pytest.raises(ValueError, match="empty micro-batch"):
        BatchLayout(num_examples=30, global_batch_size=8, world_size=4, accum=2)  # last batch of 6 < 8
    with pytest.raises(ValueError, match="last, partial"):
        BatchLayout(num_examples=25, global_batch_size=8, world_size=2)  # last batch of 1 sample
    ok = BatchLayout(num_examples=25, global_batch_size=8, world_size=2, drop_last=True)
    assert ok.num_global_batches == 3 and ok.micro_batches_per_rank == 3
    layout = BatchLayout(num_examples=30, global_batch_size=8, world_size=3, accum=2)
    parts = [[mb.tolist() for mb in layout.micro_batches(np.arange(30), r)] for r in range(3)]
    assert parts[0][:2] == [[0, 1], [2]] and parts[1][:2] == [[3, 4], [5]] and parts[2][:2] == [[6], [7]]
    assert [p[-2:] for p in parts] == [[[24], [25]], [[26], [27]], [[28], [29]]]


def test_mixed_batch_shapes_masks_and_labels(data):
    loader = StreamingLoader(data, tokenize, global_batch_size=len(data), max_length=7, pad_id=0,
                             feature_dtype=torch.float32)
    batch = next(iter(loader))
    b = len(data)
    hv = batch["has_visual"]
    assert hv.dtype == torch.bool and hv.shape == (b,)
    assert hv.tolist() == [not sid.startswith("t") for sid in batch["ids"]]
    assert batch["features"]["dino"].shape == (b, 2, 4, 4, 8) and batch["features"]["vivit"].shape == (b, 2, 4, 4, 6)
    assert batch["features"]["dino"].dtype == torch.float32
    for name, x in batch["features"].items():
        assert torch.count_nonzero(x[~hv]) == 0 and bool((x[hv].flatten(1).abs().sum(1) > 0).all())
    readers = {"a": FeatureReader(data.store_urls[0]), "b": FeatureReader(data.store_urls[1])}
    for j, sid in enumerate(batch["ids"]):
        if hv[j]:
            want = readers[sid[0]].get(sid)["dino"]
            assert np.array_equal(batch["features"]["dino"][j].numpy(), want.astype(np.float32))
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert ids.shape == mask.shape == labels.shape and ids.shape[1] <= 7
    for j, sid in enumerate(batch["ids"]):
        ex = data.example(int(batch["index"][j]))
        assert ex.id == sid
        want_ids, want_labels = (x[:7] for x in tokenize(ex.conversations))
        n = len(want_ids)
        assert mask[j].tolist() == [1] * n + [0] * (ids.shape[1] - n)
        assert ids[j, :n].tolist() == want_ids and (ids[j, n:] == 0).all()
        assert labels[j, :n].tolist() == want_labels and (labels[j, n:] == IGNORE).all()
    assert batch["num_label_tokens"] == int((labels != IGNORE).sum()) > 0
    # truncation actually happened for the longer conversations
    assert any(len(tokenize(data.example(i).conversations)[0]) > 7 for i in range(len(data)))


def test_encoder_subset_and_pool_to_reach_the_batch(tmp_path):
    make_store(tmp_path / "s.zarr", 4, 2, "", (4, 2), seed=5)
    (tmp_path / "a.json").write_text(json.dumps([record(f"v{i}", "video", 2) for i in range(4)] + [record("x", None, 2)]))
    data = InstructionData.build([DataSource(tmp_path / "a.json", tmp_path / "s.zarr")], encoders=["dino"],
                                 pool_to=(2, 2))
    batch = next(iter(StreamingLoader(data, tokenize, global_batch_size=5)))
    assert list(batch["features"]) == ["dino"] and batch["features"]["dino"].shape == (5, 2, 2, 2, 8)
    assert batch["features"]["dino"].dtype == torch.float16
    ref = FeatureReader(str(tmp_path / "s.zarr"), ["dino"], pool_to=(2, 2))
    for j, sid in enumerate(batch["ids"]):
        if sid != "x":
            assert np.array_equal(batch["features"]["dino"][j].numpy(), ref.get(sid)["dino"])


def test_worker_batches_arrive_in_recycled_shared_memory_equal_to_in_process_ones(data):
    """A worker allocates a batch's features as views of one pooled shared-memory buffer (torch then
    passes it on without a copy) and reuses a buffer only once the trainer has let go of it; what
    arrives equals the in-process batches bit for bit, single-store visual batches (decoded in
    place) and mixed ones alike, small tensors included."""
    flags = release_flags(1, 4)
    pool = SharedBufferPool(flags[0])
    feats = collate(data, np.arange(4), tokenize, alloc=pool.tensors)["features"]
    slot = pool.slot_of(feats)
    assert slot is not None and all(t.is_shared() for t in feats.values())
    assert collate(data, np.arange(4), tokenize, alloc=pool.tensors)["features"]["dino"].untyped_storage().data_ptr() \
        != feats["dino"].untyped_storage().data_ptr()  # still held: another buffer
    flags[0, slot] = 1  # the trainer let go of the first one
    again = collate(data, np.arange(4), tokenize, alloc=pool.tensors)["features"]
    assert again["vivit"].untyped_storage().data_ptr() == feats["vivit"].untyped_storage().data_ptr()  # recycled
    held = torch.zeros(4).share_memory_()
    view = held[1:]
    release_when_freed({"x": held}, 3, flags[0])
    del held
    assert flags[0, 3] == 0  # a view still uses the storage
    del view
    assert flags[0, 3] == 1
    ref = list(StreamingLoader(data, tokenize, global_batch_size=2))
    got = list(StreamingLoader(data, tokenize, global_batch_size=2, num_workers=1))
    assert len(ref) == len(got) == 15  # the trainer holds every batch: the pool must not reuse any
    for want, have in zip(ref, got):
        assert want.keys() == have.keys() and want["ids"] == have["ids"]
        assert all(torch.equal(want[k], have[k]) for k in ("has_visual", "input_ids", "attention_mask", "labels", "index"))
        assert all(torch.equal(want["features"][n].view(torch.int16), have["features"][n].view(torch.int16))
                   for n in want["features"])


def test_prefetch_overlaps_data_work_with_a_slow_consumer(data):
    """Producing a micro-batch takes ~0.08 s, the step 0.15 s: with a worker the wait vanishes."""

    def waits(workers: int) -> tuple[list[float], float]:
        loader = StreamingLoader(data, SlowTokenize(0.04), global_batch_size=2, num_workers=workers, prefetch_factor=2)
        out, fracs = [], []
        for n, _batch in enumerate(loader):
            out.append(loader.meter.last_wait_s)
            time.sleep(0.15)  # the training step
            fracs.append(loader.meter.step()["data_wait_frac"])
            if n == 7:
                break
        return out[2:], statistics.mean(fracs[2:])

    overlapped, frac_overlapped = waits(1)
    serial, frac_serial = waits(0)
    assert statistics.median(overlapped) < 0.02 and frac_overlapped < 0.1
    assert statistics.median(serial) > 0.06 and frac_serial > 0.25
