"""Lossy encodings that a store may apply; the reader undoes them.

- `fp16`: exact float16 (the default).
- `bitround`: numcodecs BitRound on the float16 mantissa (a zarr filter): relative error per
  value at most 2**-(keepbits+1); zstd then compresses the zeroed low bits.
- `int8`: per-token absmax quantization, q = round(x / s) with s = max|x| / 127 over the
  token's d channels, scales kept as float32. Absolute error per value at most s / 2 before the
  reader's float16 output rounding (relative 2**-11 on top).
"""

from __future__ import annotations

from typing import Any

import numpy as np

FP16_MAX = float(np.finfo(np.float16).max)  # 65504: the largest magnitude an fp16 / bitround group holds


def quantize_int8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(…, d) float -> int8 values and float32 per-token scales of shape (…)."""
    x = np.asarray(x, dtype=np.float32)
    absmax = np.abs(x).max(axis=-1)
    scale = (absmax / 127.0).astype(np.float32)
    safe = np.where(scale > 0, scale, 1.0).astype(np.float32)
    q = np.clip(np.rint(x / safe[..., None]), -127, 127).astype(np.int8)
    return q, scale


# Values per dequantisation block: torch's parallel grain size (at::internal::GRAIN_SIZE), so each
# op runs on the calling thread. Larger blocks made every op a parallel region whose barrier waited
# for a descheduled intra-op thread whenever the reader's decode threads or another process held a
# core: 0.55-0.8 s instead of 15 ms for a 58 MB batch on the 2-core VM under load.
DEQUANT_BLOCK_VALUES = 32768


def dequantize_int8(q: np.ndarray, scale: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """float16(float32(q) * scale), the exact inverse the reader promises, into `out` if given
    (a C-contiguous float16 array of q's shape, e.g. in shared memory).

    Done block by block through one small float32 buffer with torch's vectorised kernels, on this
    thread (see DEQUANT_BLOCK_VALUES): the whole-array numpy version made three full-size
    temporaries and was the loader's bottleneck for int8 stores (5x slower on a 58 MB batch);
    the numbers are bit-identical.
    """
    import warnings

    import torch

    q = np.ascontiguousarray(q)
    d = q.shape[-1] if q.ndim else 1
    if out is None:
        out = np.empty(q.shape, dtype=np.float16)
    elif out.shape != q.shape or out.dtype != np.float16 or not out.flags.c_contiguous:
        raise ValueError(f"out must be a C-contiguous float16 array of shape {q.shape}, got {out.dtype} {out.shape}")
    if q.size == 0:
        return out
    with warnings.catch_warnings():  # zarr hands out read-only arrays; they are only read here
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        values = torch.from_numpy(q).reshape(-1, d)
    scales = torch.from_numpy(np.ascontiguousarray(scale, dtype=np.float32)).reshape(-1, 1)
    result = torch.from_numpy(out).view(-1, d)
    block = max(1, DEQUANT_BLOCK_VALUES // d)
    scratch = torch.empty((min(block, len(values)), d), dtype=torch.float32)
    for start in range(0, len(values), block):
        stop = min(len(values), start + block)
        buf = scratch[: stop - start]
        torch.mul(values[start:stop], scales[start:stop], out=buf)
        result[start:stop] = buf
    return out


def error_bound(encoding: str, x: np.ndarray, keepbits: int = 7) -> np.ndarray:
    """Documented worst-case absolute error per value for features `x` (float32)."""
    x = np.asarray(x, dtype=np.float32)
    fp16_rounding = np.abs(x) * 2.0**-11 + 2.0**-24  # float16 rounding incl. subnormals
    if encoding == "fp16":
        return fp16_rounding
    if encoding == "bitround":
        return np.abs(x) * 2.0 ** -(keepbits + 1) * 1.001 + fp16_rounding * 2
    if encoding == "int8":
        scale = np.abs(x).max(axis=-1, keepdims=True) / 127.0
        return scale / 2 * 1.0001 + np.abs(x) * 2.0**-10 + 2.0**-24
    raise ValueError(f"unknown encoding {encoding!r}")


def as_stored(x: Any, encoding: str, keepbits: int = 7) -> np.ndarray:
    """The float16 numbers a reader returns for features `x` (float32, (..., d)) written with
    `encoding`: the online path (inference on a raw video, `merv train --online`) applies this so the
    model sees exactly what the cache would serve."""
    x = np.asarray(x, dtype=np.float32)
    if encoding == "fp16":
        return x.astype(np.float16)
    if encoding == "bitround":
        from numcodecs import BitRound

        codec = BitRound(keepbits=keepbits)
        return np.asarray(codec.decode(codec.encode(np.ascontiguousarray(x.astype(np.float16))))).reshape(x.shape)
    if encoding == "int8":
        return dequantize_int8(*quantize_int8(x))
    raise ValueError(f"unknown encoding {encoding!r}")
