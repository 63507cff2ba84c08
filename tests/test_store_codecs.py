"""Codec chains of stored arrays: the measured defaults, old zstd stores, native decoding of every chain."""

from __future__ import annotations

import numpy as np
import pytest
from zarr.codecs import BytesCodec, Crc32cCodec, ZstdCodec
from zarr.core.sync import sync

from merv.store import (
    EncoderGroupSpec,
    FeatureReader,
    FeatureStore,
    SampleRecord,
    shard_reader,
    store_info,
    verify_store,
)
from merv.store.codecs import DEFAULT_CHAINS, LEGACY_CHAIN, chain_of, compressors, describe
from merv.store.group import _read_runs

GRID = (4, 3, 3)
DIM = 16
ENCODINGS = ["fp16", "bitround", "int8"]


def make_store(path: str, videos: int = 7, images: int = 2, per_shard: int = 3) -> FeatureStore:
    store = FeatureStore.create(path, samples_per_shard={"video": per_shard, "image": per_shard})
    recs = [SampleRecord(f"v{i}", f"/data/v{i}.mp4") for i in range(videos)]
    store.add_samples(recs + [SampleRecord(f"i{i}", f"/data/i{i}.jpg", kind="image") for i in range(images)])
    return store


def spec(name: str, encoding: str) -> EncoderGroupSpec:
    return EncoderGroupSpec(name, f"fp-{name}", GRID, DIM, framewise=True, encoding=encoding)  # type: ignore[arg-type]


def fill(groups: list, seed: int) -> None:
    """The same float32 features (a few large channels, as ViT activations have) into each group."""
    rng = np.random.default_rng(seed)
    for kind in ("video", "image"):
        t = groups[0].spec.stored_shape(kind)[0]
        for shard in range(groups[0].num_shards(kind)):
            n = len(groups[0].shard_range(kind, shard))
            x = rng.standard_normal((n, t, *GRID[1:], DIM)).astype(np.float32)
            x[..., :2] *= 30
            for group in groups:
                group.write_shard(kind, shard, x)


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_a_store_written_with_the_old_zstd_chain_reads_identically(tmp_path, encoding):
    """Stores written before the measured defaults (zstd-3 on every array) keep reading, through
    the fast shard reader, to exactly the numbers a default-chain store holds; verify passes."""
    st = make_store(str(tmp_path / "s.zarr"))
    old = st.ensure_group(spec("old", encoding), chain=LEGACY_CHAIN)
    new = st.ensure_group(spec("new", encoding))
    fill([old, new], seed=1)
    values = old.array("video").metadata.codecs[0].codecs  # what the old code wrote, codec for codec
    assert [type(c) for c in values[-3:]] == [BytesCodec, ZstdCodec, Crc32cCodec] and values[-2].level == 3
    assert chain_of(old.array("video")) == LEGACY_CHAIN and chain_of(new.array("video")) == DEFAULT_CHAINS[encoding]
    arrays = [g.array(k) for g in (old, new) for k in ("video", "image")]
    arrays += [g.scales(k) for g in (old, new) for k in ("video", "image")] if encoding == "int8" else []
    assert all(shard_reader.supports(a) for a in arrays)

    reader = FeatureReader(FeatureStore.open(str(tmp_path / "s.zarr")))
    ids = ["i1", "v6", "v0", "v3", "i0", "v0"]
    got = reader.get_batch(ids)
    assert got["old"].dtype == np.float16
    assert np.array_equal(got["old"].view(np.uint16), got["new"].view(np.uint16))
    for shard in reader.iter_shards():  # zarr's own path (slices) agrees as well
        assert np.array_equal(shard.features["old"].view(np.uint16), shard.features["new"].view(np.uint16))
    assert verify_store(reader.store).ok
    info = {g["name"]: g["codecs"] for g in store_info(reader.store)["encoders"]}  # `merv store info` shows it
    assert info["old"]["values"] == describe(old.array("video")) and "zstd-3" in info["old"]["values"]


@pytest.mark.parametrize(("encoding", "chain"), [("fp16", "zstd-1"), ("fp16", "blosc-lz4-5-shuffle"), ("int8", "none"),
                                                ("bitround", "blosc-zstd-1-bitshuffle")])
def test_every_kind_of_chain_is_read_natively_bit_for_bit_with_zarr(tmp_path, encoding, chain):
    st = make_store(str(tmp_path / "s.zarr"), videos=8, images=0, per_shard=4)
    group = st.ensure_group(spec("enc", encoding), chain=chain)
    fill([group], seed=2)
    arr = group.array("video")
    assert shard_reader.supports(arr) and chain_of(arr) == chain
    rows = np.array([7, 0, 5, 5, 1, 2, 3])  # two shards, repeats, neighbours (one byte range)
    got, want = sync(shard_reader.read_rows(arr, rows)), sync(_read_runs(arr, rows))
    assert np.array_equal(got.view(np.uint8), want.view(np.uint8))


@pytest.mark.parametrize("chain", ["none", "blosc-lz4-5-bitshuffle"])
def test_a_flipped_byte_is_found_in_every_chain(tmp_path, chain):
    path = tmp_path / "s.zarr"
    st = make_store(str(path), images=0)
    group = st.ensure_group(spec("enc", "bitround"), chain=chain)
    fill([group], seed=3)
    shard_file = path / group.key / "video" / "c" / "1" / "0" / "0" / "0" / "0"
    raw = bytearray(shard_file.read_bytes())
    raw[20] ^= 0xFF  # inside the first chunk of shard 1: row 3
    shard_file.write_bytes(bytes(raw))
    reader = FeatureReader(FeatureStore.open(str(path)))
    with pytest.raises(shard_reader.ChunkChecksumError, match="row 3"):
        reader.get_batch(["v3"])
    report = verify_store(reader.store)
    assert not report.ok and report.problems[0].shard == 1


def test_a_bad_chain_name_fails_before_anything_is_created(tmp_path):
    st = make_store(str(tmp_path / "s.zarr"))
    for bad in ("lz4", "zstd-x", "blosc-lz4-5-sideways"):
        with pytest.raises(ValueError, match="codec chain"):
            st.ensure_group(spec("enc", "fp16"), chain=bad)
    assert st.encoder_keys() == []
    assert [type(c) for c in compressors("none")] == [Crc32cCodec]


@pytest.mark.parametrize("chain", ["none", "zstd-3", "blosc-lz4-5-bitshuffle"])
def test_a_chunk_of_the_wrong_size_is_refused_not_misread(tmp_path, chain):
    """A chunk that passes its checksum but decodes to another size (a foreign writer) is an error,
    never a half-filled row."""
    from numcodecs import blosc, zstd

    st = make_store(str(tmp_path / "s.zarr"), images=0)
    decode = shard_reader.chunk_decoder(st.ensure_group(spec("enc", "fp16"), chain=chain).array("video"))
    x = np.ones(10, np.float16)
    body = {"none": x.tobytes(), "zstd-3": zstd.compress(x, 3), "blosc-lz4-5-bitshuffle": blosc.compress(x, b"lz4", 5, 2)}
    decode(memoryview(body[chain]), out := np.empty(10, np.float16))  # type: ignore[misc]
    assert np.array_equal(out, x)
    with pytest.raises(ValueError):
        decode(memoryview(body[chain]), np.empty(12, np.float16))  # type: ignore[misc]


def test_the_benchmarks_measure_every_kind_of_chain(tmp_path):
    """codec_bench's measures and store_bench's codec-only loop run on any chain (they decode with
    the reader's own decoder, not a hard-coded codec)."""
    import argparse

    from merv.benchmarks import codec_bench, store_bench

    feats = {"a": np.random.default_rng(4).standard_normal((3, *GRID, DIM)).astype(np.float32)}
    args = argparse.Namespace(samples_per_shard=2, repeats=1, min_time=0.0, out=str(tmp_path))
    rows = [codec_bench.measure(feats, enc, chain, args)
            for enc, chain in [("fp16", "none"), ("fp16", "zstd-3"), ("bitround", "blosc-lz4-5-bitshuffle")]]
    codec_bench.mark_pareto(rows)
    assert [r["default"] for r in rows] == [True, False, True]
    assert rows[2]["pareto"] and any(r["pareto"] for r in rows[:2])  # the front of each encoding is never empty
    assert rows[0]["ratio"] > 1 > rows[2]["ratio"]  # none: values plus index and checksums; bitround shrinks
    assert all(r["decode_1t_GBps"] > 0 and r["read_GBps"] > 0 for r in rows)
    st = store_bench.build(tmp_path / "s.zarr", GRID, DIM, "int8", 3)
    assert store_bench.codec_only(st)[1] == 3 * int(np.prod(GRID)) * DIM * 2
