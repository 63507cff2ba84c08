"""Random-row reads of the store's own shard layout without zarr's per-chunk machinery.

The trainer's loader reads a few scattered rows of many shards per micro-batch. zarr (3.1) serves
each contiguous run of rows on its own: it re-reads the shard index, fetches the chunks one after
another and decodes them one by one, which made the loader 2-3x slower than decoding the same
chunks in a plain loop (benchmarks/loader_bench.py). Here one micro-batch costs one index read
per touched shard, all chunk byte ranges fetched concurrently through the zarr store API, and one
decode task per shard (crc32c + zstd; BitRound needs no decoding) in a thread.

Only the layout `merv.store` writes is handled: a `sharding_indexed` array of one-sample inner
chunks, inner codecs [numcodecs.bitround] + bytes (little endian) + zstd + crc32c, index at the
end with bytes + crc32c. `supports()` says whether an array has it; anything else (and slices,
and `merv store verify`) goes through zarr. Tests check both paths return the same bytes.

Absent data. zarr answers an absent shard object or inner chunk with the fill value. Every row of
a committed shard is stored (failed rows as zeros), so for rows a caller says must exist
(`must_exist`) an absence is damage: `MissingShardDataError`, never zeros. `stored_rows()` and
`require_stored()` give the same check to zarr's slice reads and to `merv store verify`.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import numpy as np
import zarr
from crc32c import crc32c
from numcodecs import Zstd
from zarr.abc.store import RangeByteRequest, SuffixByteRequest
from zarr.codecs import BytesCodec, Crc32cCodec, ShardingCodec, ZstdCodec
from zarr.codecs.sharding import ShardingCodecIndexLocation
from zarr.core.buffer import default_buffer_prototype

from .errors import ChunkChecksumError, MissingShardDataError

__all__ = ["ChunkChecksumError", "MissingShardDataError", "read_rows", "require_stored", "shard_object_name", "stored_rows",
           "supports"]

_ZSTD = Zstd()
_MISSING = np.uint64(2**64 - 1)  # the sharding spec's marker of an absent chunk


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


def supports(arr: zarr.Array) -> bool:
    """True when `arr` has exactly the shard layout this module reads."""
    if sys.byteorder != "little" or not _index_readable(arr):
        return False
    sharding = arr.metadata.codecs[0]
    *array_codecs, to_bytes, zstd, crc = sharding.codecs if len(sharding.codecs) >= 3 else (None, None, None)
    endian = getattr(getattr(to_bytes, "endian", None), "value", None)
    return (
        isinstance(to_bytes, BytesCodec) and (endian == "little" or arr.dtype.itemsize == 1)
        and isinstance(zstd, ZstdCodec) and isinstance(crc, Crc32cCodec)
        # BitRound rounds mantissas when writing; reading has nothing to undo
        and all(type(c).__name__ == "BitRound" for c in array_codecs)
    )


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


async def read_rows(arr: zarr.Array, rows: np.ndarray, must_exist: np.ndarray | None = None) -> np.ndarray:
    """arr[rows] for any row order (rows may repeat), one index read per touched shard.

    Absent rows read as the fill value (as zarr), except rows in `must_exist`: MissingShardDataError."""
    out = np.empty((len(rows), *arr.shape[1:]), dtype=arr.dtype)
    if len(rows) == 0:
        return out
    per_shard = _per_shard(arr)
    shards = rows // per_shard
    required = np.zeros(0, dtype=np.int64) if must_exist is None else np.asarray(must_exist, dtype=np.int64)
    await asyncio.gather(*(
        _read_shard(arr, int(shard), per_shard, np.nonzero(shards == shard)[0], rows, out, required)
        for shard in np.unique(shards)))
    return out


async def _read_shard(arr: zarr.Array, shard: int, per_shard: int, positions: np.ndarray, rows: np.ndarray,
                      out: np.ndarray, required: np.ndarray) -> None:
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
    wanted = np.unique(local)
    blobs = await asyncio.gather(*(
        path.get(prototype, byte_range=RangeByteRequest(int(index[r, 0]), int(index[r, 0] + index[r, 1])))
        for r in wanted))
    if any(b is None for b in blobs):  # the object vanished between the index read and the chunk reads
        raise _missing(arr, shard, sorted(set(rows[positions].tolist())), whole=True)
    payloads = {int(r): b.to_bytes() for r, b in zip(wanted, blobs)}
    await asyncio.to_thread(_decode_into, payloads, local, positions, out, shard_object_name(arr, shard), shard, shard * per_shard)


def _fill(arr: zarr.Array) -> Any:
    fill = arr.metadata.fill_value
    return 0 if fill is None else fill


def _decode_into(payloads: dict[int, bytes], local: np.ndarray, positions: np.ndarray, out: np.ndarray, name: str,
                 shard: int, first_row: int) -> None:
    decoded: dict[int, np.ndarray] = {}
    for r, blob in payloads.items():
        body = memoryview(blob)[:-4]
        if crc32c(body) != int.from_bytes(blob[-4:], "little"):
            raise ChunkChecksumError.at(f"checksum mismatch in row {first_row + r} of shard object {name!r}",
                                        shard=shard, rows=[first_row + r])
        decoded[r] = np.frombuffer(_ZSTD.decode(body), dtype=out.dtype).reshape(out.shape[1:])
    for pos, r in zip(positions, local):
        out[pos] = decoded[int(r)]
