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

_ZSTD = Zstd()
_MISSING = np.uint64(2**64 - 1)  # the sharding spec's marker of an absent chunk


class ChunkChecksumError(ValueError):
    """A stored chunk or shard index whose crc32c does not match its bytes."""


def supports(arr: zarr.Array) -> bool:
    """True when `arr` has exactly the shard layout this module reads."""
    if sys.byteorder != "little":
        return False
    codecs = arr.metadata.codecs
    if len(codecs) != 1 or not isinstance(codecs[0], ShardingCodec):
        return False
    sharding = codecs[0]
    if tuple(sharding.chunk_shape) != (1, *arr.shape[1:]) or sharding.index_location != ShardingCodecIndexLocation.end:
        return False
    index = sharding.index_codecs
    if len(index) != 2 or not isinstance(index[0], BytesCodec) or not isinstance(index[1], Crc32cCodec):
        return False
    *array_codecs, to_bytes, zstd, crc = sharding.codecs if len(sharding.codecs) >= 3 else (None, None, None)
    endian = getattr(getattr(to_bytes, "endian", None), "value", None)
    return (
        isinstance(to_bytes, BytesCodec) and (endian == "little" or arr.dtype.itemsize == 1)
        and isinstance(zstd, ZstdCodec) and isinstance(crc, Crc32cCodec)
        # BitRound rounds mantissas when writing; reading has nothing to undo
        and all(type(c).__name__ == "BitRound" for c in array_codecs)
    )


async def read_rows(arr: zarr.Array, rows: np.ndarray) -> np.ndarray:
    """arr[rows] for any row order (rows may repeat), one index read per touched shard."""
    out = np.empty((len(rows), *arr.shape[1:]), dtype=arr.dtype)
    if len(rows) == 0:
        return out
    per_shard = int(arr.metadata.chunk_grid.chunk_shape[0])
    shards = rows // per_shard
    await asyncio.gather(*(
        _read_shard(arr, int(shard), per_shard, np.nonzero(shards == shard)[0], rows, out)
        for shard in np.unique(shards)))
    return out


async def _read_shard(arr: zarr.Array, shard: int, per_shard: int, positions: np.ndarray, rows: np.ndarray,
                      out: np.ndarray) -> None:
    prototype = default_buffer_prototype()
    key = arr.metadata.encode_chunk_key((shard,) + (0,) * (arr.ndim - 1))
    path = arr._async_array.store_path / key
    index_nbytes = 16 * per_shard + 4
    raw_index = await path.get(prototype, byte_range=SuffixByteRequest(index_nbytes))
    local = rows[positions] - shard * per_shard
    if raw_index is None:  # never written: zarr's answer is the fill value
        out[positions] = _fill(arr)
        return
    index_bytes = raw_index.to_bytes()
    if crc32c(index_bytes[:-4]) != int.from_bytes(index_bytes[-4:], "little"):
        raise ChunkChecksumError(f"{path}: shard index checksum mismatch (shard {shard})")
    index = np.frombuffer(index_bytes[:-4], dtype="<u8").reshape(per_shard, 2)
    absent = index[local, 0] == _MISSING  # chunks left out of the shard (as zarr: the fill value)
    if absent.any():
        out[positions[absent]] = _fill(arr)
        positions, local = positions[~absent], local[~absent]
    wanted = np.unique(local)
    blobs = await asyncio.gather(*(
        path.get(prototype, byte_range=RangeByteRequest(int(index[r, 0]), int(index[r, 0] + index[r, 1])))
        for r in wanted))
    payloads = {int(r): b.to_bytes() for r, b in zip(wanted, blobs)}
    await asyncio.to_thread(_decode_into, payloads, local, positions, out, path, shard * per_shard)


def _fill(arr: zarr.Array) -> Any:
    fill = arr.metadata.fill_value
    return 0 if fill is None else fill


def _decode_into(payloads: dict[int, bytes], local: np.ndarray, positions: np.ndarray, out: np.ndarray, path: Any,
                 first_row: int) -> None:
    decoded: dict[int, np.ndarray] = {}
    for r, blob in payloads.items():
        body = memoryview(blob)[:-4]
        if crc32c(body) != int.from_bytes(blob[-4:], "little"):
            raise ChunkChecksumError(f"{path}: checksum mismatch in row {first_row + r}")
        decoded[r] = np.frombuffer(_ZSTD.decode(body), dtype=out.dtype).reshape(out.shape[1:])
    for pos, r in zip(positions, local):
        out[pos] = decoded[int(r)]
