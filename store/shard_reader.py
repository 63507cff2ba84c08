"""Random-row reads of the store's own shard layout without zarr's per-chunk machinery.

The trainer's loader reads a few scattered rows of many shards per micro-batch. zarr (3.1) serves
each contiguous run of rows on its own: it re-reads the shard index, fetches the chunks one after
another and decodes them one by one, which made the loader 2-3x slower than decoding the same
chunks in a plain loop (benchmarks/loader_bench.py). Here one micro-batch costs one index read
per touched shard, the chunk byte ranges fetched concurrently through the zarr store API (adjacent
chunks as one range), and one decode task per shard in a thread that checks crc32c and
decompresses each chunk straight into the output array (no intermediate copies).

Only the layout `merv.store` writes is handled: a `sharding_indexed` array of one-sample inner
chunks, inner codecs [numcodecs.bitround] + bytes (little endian) + [zstd | blosc] + crc32c (every
chain of `merv.store.codecs`, old zstd stores included), index at the end with bytes + crc32c.
`supports()` says whether an array has it; anything else (and slices, and `merv store verify`)
goes through zarr. Tests check both paths return the same bytes.

Absent data. zarr answers an absent shard object or inner chunk with the fill value. Every row of
a committed shard is stored (failed rows as zeros), so for rows a caller says must exist
(`must_exist`) an absence is damage: `MissingShardDataError`, never zeros. `stored_rows()` and
`require_stored()` give the same check to zarr's slice reads and to `merv store verify`.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import zarr
from crc32c import crc32c
from numcodecs import blosc, zstd
from zarr.abc.store import RangeByteRequest, SuffixByteRequest
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, ShardingCodec, ZstdCodec
from zarr.codecs.sharding import ShardingCodecIndexLocation
from zarr.core.buffer import default_buffer_prototype

from .errors import ChunkChecksumError, MissingShardDataError

__all__ = ["ChunkChecksumError", "MissingShardDataError", "chunk_decoder", "decode_chunk", "decode_shard", "read_rows",
           "require_stored", "shard_object_name", "stored_rows", "supports"]

_MISSING = np.uint64(2**64 - 1)  # the sharding spec's marker of an absent chunk
Decoder = Callable[[memoryview, np.ndarray], None]  # chunk body (crc stripped) -> fills a contiguous array


def _index_readable(arr: zarr.Array) -> bool:
    """A sharded array of one-row inner chunks whose index (at the end: bytes + crc32c) we can parse."""
    codecs = arr.metadata.codecs
    if len(codecs) != 1 or not isinstance(codecs[0], ShardingCodec):
        return False
    sharding = codecs[0]
    if tuple(sharding.chunk_shape) != (1, *arr.shape[1:]) or sharding.index_location != ShardingCodecIndexLocation.end:
        return False
    index = sharding.index_codecs
    return len(index) == 2 and isinstance(index[0], BytesCodec) and isinstance(index[1], Crc32cCodec)


def _copy(body: memoryview, dest: np.ndarray) -> None:
    flat = dest.reshape(-1).view(np.uint8)
    if len(body) != flat.nbytes:
        raise ValueError(f"{len(body)} bytes stored for a chunk of {flat.nbytes}")
    flat[:] = np.frombuffer(body, dtype=np.uint8)


def _zstd_content_size(body: memoryview) -> int | None:
    """The decompressed size a zstd frame header declares (RFC 8878, 3.1.1.1), or None if absent."""
    if len(body) < 6 or bytes(body[:4]) != b"\x28\xb5\x2f\xfd":
        raise ValueError("not a zstd frame")
    fhd = body[4]
    single, fcs_flag, dict_flag = (fhd >> 5) & 1, fhd >> 6, fhd & 3
    pos = 5 + (0 if single else 1) + (0, 1, 2, 4)[dict_flag]
    size = (1 if single else 0, 2, 4, 8)[fcs_flag]
    if size == 0:
        return None
    value = int.from_bytes(body[pos : pos + size], "little")
    return value + 256 if size == 2 else value


def _zstd(body: memoryview, dest: np.ndarray) -> None:
    size = _zstd_content_size(body)
    if size is None:  # zarr's frames declare their size; a foreign one is decoded, then measured
        _copy(memoryview(zstd.decompress(body)), dest)
    elif size != dest.nbytes:
        raise ValueError(f"a zstd frame of {size} bytes for a chunk of {dest.nbytes}")
    else:
        zstd.decompress(body, dest)


def _blosc(body: memoryview, dest: np.ndarray) -> None:
    size = int.from_bytes(body[4:8], "little") if len(body) >= 16 else -1  # blosc header: nbytes at 4..8
    if size != dest.nbytes:
        raise ValueError(f"a blosc frame of {size} bytes for a chunk of {dest.nbytes}")
    blosc.decompress(body, dest)  # single-threaded off the main thread (numcodecs' default)


def chunk_decoder(arr: zarr.Array) -> Decoder | None:
    """The native decoder of `arr`'s inner chunks, or None when this module does not read its layout."""
    if sys.byteorder != "little" or not _index_readable(arr):
        return None
    inner = list(arr.metadata.codecs[0].codecs)
    if len(inner) < 2 or not isinstance(inner.pop(), Crc32cCodec):
        return None
    compressor = inner.pop() if isinstance(inner[-1], (ZstdCodec, BloscCodec)) else None
    to_bytes = inner.pop() if inner else None
    endian = getattr(getattr(to_bytes, "endian", None), "value", None)
    if not isinstance(to_bytes, BytesCodec) or not (endian == "little" or arr.dtype.itemsize == 1):
        return None
    if not all(type(c).__name__ == "BitRound" for c in inner):  # BitRound: nothing to undo on read
        return None
    return _blosc if isinstance(compressor, BloscCodec) else _zstd if isinstance(compressor, ZstdCodec) else _copy


def supports(arr: zarr.Array) -> bool:
    """True when `arr` has a shard layout this module reads."""
    return chunk_decoder(arr) is not None


def _per_shard(arr: zarr.Array) -> int:
    return int(arr.metadata.chunk_grid.chunk_shape[0])


def _shard_path(arr: zarr.Array, shard: int) -> Any:
    key = arr.metadata.encode_chunk_key((shard,) + (0,) * (arr.ndim - 1))
    return arr._async_array.store_path / key


def shard_object_name(arr: zarr.Array, shard: int) -> str:
    """`<array path>/c/<shard>/0/...`: the object a shard lives in, as messages name it."""
    return f"{arr.path}/{arr.metadata.encode_chunk_key((shard,) + (0,) * (arr.ndim - 1))}"


async def _shard_index(arr: zarr.Array, shard: int) -> np.ndarray | None:
    """The (per_shard, 2) offset/length index of a shard after its checksum, or None if the object is absent."""
    per_shard = _per_shard(arr)
    raw = await _shard_path(arr, shard).get(default_buffer_prototype(), byte_range=SuffixByteRequest(16 * per_shard + 4))
    if raw is None:
        return None
    index_bytes = raw.to_bytes()
    if len(index_bytes) != 16 * per_shard + 4 or crc32c(index_bytes[:-4]) != int.from_bytes(index_bytes[-4:], "little"):
        raise ChunkChecksumError.at(f"the index of shard object {shard_object_name(arr, shard)!r} fails its checksum",
                                    shard=shard, rows=list(range(shard * per_shard, (shard + 1) * per_shard)))
    return np.frombuffer(index_bytes[:-4], dtype="<u8").reshape(per_shard, 2)


async def stored_rows(arr: zarr.Array, shard: int) -> np.ndarray | None:
    """Which local rows of a shard hold a stored chunk (bool per row); None when the shard object is absent.

    Arrays whose shard index this module cannot parse answer all-True when the object exists."""
    if not _index_readable(arr):
        exists = await _shard_path(arr, shard).exists()
        return np.ones(_per_shard(arr), dtype=bool) if exists else None
    index = await _shard_index(arr, shard)
    return None if index is None else index[:, 0] != _MISSING


def _missing(arr: zarr.Array, shard: int, absent_rows: list[int], whole: bool) -> MissingShardDataError:
    name = shard_object_name(arr, shard)
    problem = (f"committed data is missing: the shard object {name!r} does not exist" if whole else
               f"committed data is missing: {len(absent_rows)} chunk(s) are absent from shard object {name!r}")
    return MissingShardDataError.at(problem, shard=shard, rows=absent_rows)  # type: ignore[return-value]


async def require_stored(arr: zarr.Array, rows: np.ndarray) -> None:
    """Raise MissingShardDataError unless every one of `rows` has a stored chunk."""
    rows = np.asarray(rows, dtype=np.int64)
    if len(rows) == 0:
        return
    per_shard = _per_shard(arr)
    shards = rows // per_shard

    async def check(shard: int) -> None:
        mine = np.unique(rows[shards == shard])
        stored = await stored_rows(arr, shard)
        if stored is None:
            raise _missing(arr, shard, mine.tolist(), whole=True)
        absent = mine[~stored[mine - shard * per_shard]]
        if len(absent):
            raise _missing(arr, shard, absent.tolist(), whole=False)

    await asyncio.gather(*(check(int(s)) for s in np.unique(shards)))


async def read_rows(arr: zarr.Array, rows: np.ndarray, must_exist: np.ndarray | None = None,
                    out: np.ndarray | None = None) -> np.ndarray:
    """arr[rows] for any row order (rows may repeat), one index read per touched shard.

    Absent rows read as the fill value (as zarr), except rows in `must_exist`: MissingShardDataError.
    `out`: a C-contiguous (len(rows), ...) array of arr's dtype to fill (say, in shared memory);
    by default a new one."""
    decode = chunk_decoder(arr)
    if decode is None:
        raise ValueError(f"array {arr.path!r} has a layout shard_reader does not read (check supports())")
    shape = (len(rows), *arr.shape[1:])
    if out is None:
        out = np.empty(shape, dtype=arr.dtype)
    elif out.shape != shape or out.dtype != arr.dtype or not out.flags.c_contiguous:
        raise ValueError(f"out must be a C-contiguous {shape} {arr.dtype} array, got {out.shape} {out.dtype}")
    if len(rows) == 0:
        return out
    per_shard = _per_shard(arr)
    shards = rows // per_shard
    required = np.zeros(0, dtype=np.int64) if must_exist is None else np.asarray(must_exist, dtype=np.int64)
    await asyncio.gather(*(
        _read_shard(arr, decode, int(shard), per_shard, np.nonzero(shards == shard)[0], rows, out, required)
        for shard in np.unique(shards)))
    return out


async def _read_shard(arr: zarr.Array, decode: Decoder, shard: int, per_shard: int, positions: np.ndarray,
                      rows: np.ndarray, out: np.ndarray, required: np.ndarray) -> None:
    prototype = default_buffer_prototype()
    path = _shard_path(arr, shard)
    index = await _shard_index(arr, shard)
    local = rows[positions] - shard * per_shard
    if index is None:  # never written: zarr's answer is the fill value, unless the rows must exist
        needed = np.intersect1d(rows[positions], required)
        if len(needed):
            raise _missing(arr, shard, needed.tolist(), whole=True)
        out[positions] = _fill(arr)
        return
    absent = index[local, 0] == _MISSING  # chunks left out of the shard (as zarr: the fill value)
    if absent.any():
        needed = np.intersect1d(rows[positions[absent]], required)
        if len(needed):
            raise _missing(arr, shard, needed.tolist(), whole=False)
        out[positions[absent]] = _fill(arr)
        positions, local = positions[~absent], local[~absent]
    runs = _byte_runs(index, np.unique(local))
    blobs = await asyncio.gather(*(path.get(prototype, byte_range=RangeByteRequest(a, b)) for a, b, _ in runs))
    if any(b is None for b in blobs):  # the object vanished between the index read and the chunk reads
        raise _missing(arr, shard, sorted(set(rows[positions].tolist())), whole=True)
    chunks: dict[int, memoryview] = {}
    for (start, _, members), blob in zip(runs, blobs):
        view = memoryview(blob.as_numpy_array())  # the fetched bytes themselves, no copy
        for r in members:
            offset = int(index[r, 0]) - start
            chunks[r] = view[offset : offset + int(index[r, 1])]
    await asyncio.to_thread(_decode_into, decode, chunks, local, positions, out, shard_object_name(arr, shard), shard,
                            shard * per_shard)


def _byte_runs(index: np.ndarray, wanted: np.ndarray) -> list[tuple[int, int, list[int]]]:
    """(start, stop, local rows) byte ranges covering the wanted chunks; chunks adjacent in the shard
    object share one range (one request instead of one per row when a batch takes neighbours)."""
    runs: list[tuple[int, int, list[int]]] = []
    for r in wanted[np.argsort(index[wanted, 0], kind="stable")]:
        offset, size = int(index[r, 0]), int(index[r, 1])
        if runs and runs[-1][1] == offset:
            runs[-1] = (runs[-1][0], offset + size, [*runs[-1][2], int(r)])
        else:
            runs.append((offset, offset + size, [int(r)]))
    return runs


def _fill(arr: zarr.Array) -> Any:
    fill = arr.metadata.fill_value
    return 0 if fill is None else fill


def decode_chunk(decode: Decoder, blob: memoryview, dest: np.ndarray, name: str, shard: int, row: int) -> None:
    """Check one stored chunk's crc32c and decode it into `dest` (contiguous, the chunk's shape);
    a mismatch or an undecodable chunk is a ChunkChecksumError naming the row."""
    body = blob[:-4]
    if crc32c(body) != int.from_bytes(blob[-4:], "little"):
        raise ChunkChecksumError.at(f"checksum mismatch in row {row} of shard object {name!r}", shard=shard, rows=[row])
    try:
        decode(body, dest)
    except (ValueError, RuntimeError) as exc:
        raise ChunkChecksumError.at(f"row {row} of shard object {name!r} does not decode: {exc}",
                                    shard=shard, rows=[row]) from exc


def _decode_into(decode: Decoder, chunks: dict[int, memoryview], local: np.ndarray, positions: np.ndarray,
                 out: np.ndarray, name: str, shard: int, first_row: int) -> None:
    """Decode each wanted chunk once, straight into its first output row; repeats copy that row."""
    first: dict[int, int] = {}
    for pos, r in zip(positions.tolist(), local.tolist()):
        if r in first:
            out[pos] = out[first[r]]
            continue
        decode_chunk(decode, chunks[r], out[pos], name, shard, first_row + r)
        first[r] = pos


def decode_shard(arr: zarr.Array, blob: bytes, out: np.ndarray) -> None:
    """Decode every stored row of one whole shard object held in memory into `out` (the shard's
    rows), in this thread: what the reader does per shard, for benchmarks and tools."""
    decode = chunk_decoder(arr)
    if decode is None:
        raise ValueError(f"array {arr.path!r} has a layout shard_reader does not read")
    per_shard = _per_shard(arr)
    view = memoryview(blob)
    index = np.frombuffer(view[len(view) - 16 * per_shard - 4 : len(view) - 4], dtype="<u8").reshape(per_shard, 2)
    for r in range(min(per_shard, len(out))):
        offset, size = int(index[r, 0]), int(index[r, 1])
        if index[r, 0] != _MISSING:
            decode_chunk(decode, view[offset : offset + size], out[r], "<in memory>", -1, r)
