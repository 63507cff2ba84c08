"""Video and image decoding for extraction: uniform frame sampling, decoded once per sample.

Decoding follows the MERV reference (`merv/preprocessing/datasets/datasets.py::load_video`) so the
cached features see the same frames the paper's models saw:

* PyAV (part of the base install; its wheels bundle FFmpeg everywhere) is the default ("auto"):
  it measured fastest on every sample video (`merv.benchmarks.decode_bench`). decord (the
  reference's reader; extra `merv[decord]`, no wheels for Linux aarch64 or macOS arm64) and
  torchcodec (extra `merv[torchcodec]`; it links the system's FFmpeg shared libraries) are used
  when asked for. All return identical frames (tests, decode_bench). `Clip.backend` says which
  one produced the frames.
* Frame indices (see `window_bounds` and `sample_indices`)::

      first = start * fps                       (0 when no start)
      last  = min(total - 1, end * fps - 1)     (total - 1 when no end)
      or, with end_frame >= 0:  first = 0, last = min(total - 1, end_frame)
      indices = floor(np.linspace(first, last, num_frames))

  which is the reference's `np.linspace(..., dtype=int)` (truncation == floor for these
  non-negative values). A clip with fewer frames than asked yields repeated indices: it is
  repeat-padded by uniform sampling, unless `min_frames` asks for an error instead.
* A sample is decoded once at the largest frame count any encoder needs (32 for ViViT);
  `subsample(frames, 16)` then takes `frames[::2]`, exactly as the reference slices
  `video[:: max(num_frames) // num_frame]`.
* Images (jpg, png, webp, bmp) are videos of repeated frames. `load_clip` returns the single frame
  with `is_image=True`; frame-wise encoders encode it once, temporal encoders get
  `subsample(frames, n)` (n copies).

Every failure is a `DecodeError` naming the file, so the extraction driver can record the reason
per sample and move on.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from merv import MervError

Backend = Literal["auto", "decord", "pyav", "torchcodec"]
BACKENDS: tuple[str, ...] = ("auto", "decord", "pyav", "torchcodec")
_MODULES = {"decord": "decord", "pyav": "av", "torchcodec": "torchcodec"}  # backend -> the module it needs
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp"})


# --------------------------------------------------------------------------------------- errors
class DecoderUnavailableError(MervError, ValueError):
    """A decoder that is unknown, or not installed (or, for torchcodec, without FFmpeg's libraries) here."""


def installed(backend: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(_MODULES[backend]) is not None


@functools.cache
def torchcodec_problem() -> str | None:
    """Why torchcodec cannot decode video here, or None when it can.

    torchcodec links the system's FFmpeg shared libraries at run time: a wheel can be installed and
    still unable to decode. torchcodec >= 0.12 then imports fine and reports `ffmpeg_major_version`
    None (its VideoDecoder raises later); older releases raise a RuntimeError at import listing the
    libtorchcodec_coreN it tried. Both are caught here, once per process (the import costs seconds).
    """
    if not installed("torchcodec"):
        return "torchcodec is not installed"
    try:
        import torchcodec
    except Exception as exc:  # noqa: BLE001 - RuntimeError "Could not load libtorchcodec ..." and the like
        return f"torchcodec cannot load: {_short(exc, 160)}"
    if getattr(torchcodec, "ffmpeg_major_version", None) is None:
        return "torchcodec finds no FFmpeg shared libraries (libavcodec ...)"
    return None


def available(backend: str) -> bool:
    """The backend's package is installed and, for torchcodec, can load FFmpeg's libraries."""
    if backend == "torchcodec":
        return torchcodec_problem() is None
    return installed(backend)


def check_backend(backend: str) -> None:
    """Refuse an unknown decoder, or one that cannot run here, before any file is read."""
    if backend not in BACKENDS:
        raise DecoderUnavailableError(f"decoder {backend!r} is unknown; use one of {', '.join(BACKENDS)}")
    if backend == "torchcodec" and (problem := torchcodec_problem()):
        raise DecoderUnavailableError(f"decoder 'torchcodec' cannot run here ({problem}): pip install "
                                      "'merv[torchcodec]' and FFmpeg 4-9 shared libraries (e.g. apt-get install "
                                      "ffmpeg), or use --decoder pyav (part of the base install; identical frames)")
    if backend != "auto" and not installed(backend):
        raise DecoderUnavailableError(f"decoder {backend!r} is not installed here: pip install 'merv[{backend}]', "
                                      "or use --decoder pyav (part of the base install; identical frames)")


class DecodeError(MervError):
    """A sample that cannot be decoded as asked. `path` names the file; `reason` says why."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class MissingFileError(DecodeError, FileNotFoundError):
    """The path does not exist."""


class EmptyFileError(DecodeError):
    """The file has zero bytes."""


class NotAVideoError(DecodeError):
    """Neither a video nor an image that any backend can read (e.g. a text file named .mp4)."""


class NoVideoStreamError(NotAVideoError):
    """A readable container without a video stream (e.g. audio only)."""


class TruncatedVideoError(DecodeError):
    """A recognisable media file that ends early: missing index, or frames stop before the end."""


class NoDecodableFramesError(DecodeError):
    """The container opens but not a single frame decodes."""


class TooFewFramesError(DecodeError):
    """The clip (window) has fewer frames than `min_frames` asked for."""


class WindowError(DecodeError):
    """The requested start / end window holds no frame of the clip."""


# ----------------------------------------------------------------------------------------- clip
@dataclass
class Clip:
    """Decoded frames of one sample.

    frames: uint8 (T, H, W, 3) RGB. For an image T == 1 (see `is_image`).
    backend: "decord", "pyav", "torchcodec" or "pil".
    fps: average frame rate of the file, None for images.
    total_frames: frames in the whole file (as the backend counts them).
    indices: the file's frame index of each returned frame (repeats when the clip is short).
    """

    frames: np.ndarray
    backend: str
    is_image: bool
    fps: float | None
    total_frames: int
    indices: np.ndarray

    @property
    def kind(self) -> str:
        return "image" if self.is_image else "video"

    def frames_for(self, n: int) -> np.ndarray:
        """n frames for an encoder that wants n: uniform subsample, or n copies of an image."""
        return subsample(self.frames, n)


# ------------------------------------------------------------------------------------- sampling
def sample_indices(total: int, n: int, first: float = 0, last: float | None = None) -> np.ndarray:
    """`floor(linspace(first, last, n))` with `last` defaulting to `total - 1`.

    The reference's formula. With fewer than n frames between first and last, indices repeat
    (uniform repeat-padding), so the result always has n entries.
    """
    if n < 1:
        raise ValueError(f"need at least one frame, asked for {n}")
    if total < 1:
        raise ValueError("cannot sample from a clip without frames")
    hi = total - 1 if last is None else min(float(last), total - 1)
    lo = max(float(first), 0.0)
    if hi < lo:
        raise ValueError(f"empty window [{first}, {last}] for {total} frames")
    idx = np.floor(np.linspace(lo, hi, n)).astype(np.int64)
    return np.clip(idx, 0, total - 1)


def subsample(frames: np.ndarray, n: int) -> np.ndarray:
    """n frames out of T, uniformly. T divisible by n: `frames[::T // n]` (the reference's slicing,
    a view); otherwise `floor(linspace(0, T - 1, n))`, which repeats frames when n > T (an image
    becomes n copies of itself)."""
    t = int(frames.shape[0])
    if n < 1 or t < 1:
        raise ValueError(f"cannot take {n} frames from {t}")
    if t % n == 0:
        return frames[:: t // n]
    return frames[sample_indices(t, n)]


def window_bounds(
    total: int,
    fps: float | None,
    start: float | None = None,
    end: float | None = None,
    end_frame: int | None = None,
) -> tuple[float, float]:
    """(first, last) frame positions of the window, as the reference computes them.

    NaN start / end mean "not given" (the reference's handling of TVQA's NaN annotations);
    a negative end_frame means "not given", like the reference.
    """
    if start is not None and math.isnan(start):
        start = None
    if end is not None and math.isnan(end):
        end = None
    if end_frame is not None and end_frame >= 0:
        return 0.0, float(min(total - 1, end_frame))
    if (start is not None or end is not None) and not fps:
        raise ValueError("a window in seconds needs the file's frame rate, which is unknown")
    first = (start or 0.0) * (fps or 0.0)
    last = float(total - 1) if end is None else min(total - 1, end * fps - 1)  # type: ignore[operator]
    return first, last


# ----------------------------------------------------------------------------------- public api
def load_clip(
    path: str | os.PathLike[str],
    num_frames: int,
    *,
    start: float | None = None,
    end: float | None = None,
    end_frame: int | None = None,
    backend: Backend = "auto",
    min_frames: int | None = None,
) -> Clip:
    """Decode `num_frames` uniformly sampled frames of a video (or the one frame of an image).

    start / end: window in seconds; end_frame: last frame index (overrides start / end, as in the
    reference); both are ignored for images. min_frames: raise `TooFewFramesError` when the window
    holds fewer distinct frames; by default a short clip is repeat-padded.
    backend: "auto" (PyAV, the fastest here), "pyav", "decord" or "torchcodec"; every backend returns
    the same frames (tests, decode_bench). With "decord" the error classes are coarser (decord
    reports little about *why* a file fails).
    """
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    p = Path(path)
    _check_file(p)
    if p.suffix.lower() in IMAGE_SUFFIXES:
        return _load_image(p)
    if _is_text(p):  # refused here: decord would print its own C++ error line for it first
        raise NotAVideoError(p, "is a text file, not a video; pass a video file (mp4, mkv, webm, avi, ...) or an image")
    check_backend(backend)
    args = dict(num_frames=num_frames, start=start, end=end, end_frame=end_frame, min_frames=min_frames)
    if backend == "torchcodec":
        return _load_torchcodec(p, **args)
    if backend in ("auto", "pyav"):
        return _load_pyav(p, **args)
    return _load_decord(p, **args)


# ------------------------------------------------------------------------------------ internals
def _check_file(p: Path) -> None:
    if not p.exists():
        raise MissingFileError(p, "no such file")
    if p.is_dir():
        raise NotAVideoError(p, "is a directory, not a video or image file")
    if p.stat().st_size == 0:
        raise EmptyFileError(p, "file is empty (0 bytes)")


def _plan(
    p: Path,
    total: int,
    fps: float | None,
    num_frames: int,
    start: float | None,
    end: float | None,
    end_frame: int | None,
    min_frames: int | None,
) -> np.ndarray:
    """Indices to decode; raises the typed errors for bad windows and short clips."""
    try:
        first, last = window_bounds(total, fps, start, end, end_frame)
        idx = sample_indices(total, num_frames, first, last)
    except ValueError as exc:
        where = f"total {total} frames, fps {fps}, start={start}, end={end}, end_frame={end_frame}"
        raise WindowError(p, f"{exc} ({where})") from None
    if min_frames is not None:
        distinct = int(np.floor(last) - np.floor(max(first, 0.0)) + 1)
        if distinct < min_frames:
            raise TooFewFramesError(p, f"window holds {distinct} frames, min_frames={min_frames}")
    return idx


_SIGNATURES = (b"ftyp", b"\x1a\x45\xdf\xa3", b"RIFF", b"GIF8", b"OggS", b"FLV", b"\x00\x00\x01\xba", b"moov", b"mdat",
               b"YUV4MPEG2")
_TEXT_CONTROLS = frozenset(b"\t\n\r\f")


def _is_text(p: Path, head_bytes: int = 256) -> bool:
    """The file starts as UTF-8 text without control bytes (and no media signature): no container
    is laid out so, so it is a text file named like a video (a manifest or a note given by mistake)."""
    import codecs

    with open(p, "rb") as fh:
        head = fh.read(head_bytes)
    if any(b < 0x20 and b not in _TEXT_CONTROLS for b in head) or _looks_like_media(p):
        return False
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)  # a cut multi-byte tail is fine
    except UnicodeDecodeError:
        return False
    return True


def _looks_like_media(p: Path) -> bool:
    """A known container signature in the first bytes: used to tell 'truncated' from 'not a video'."""
    with open(p, "rb") as fh:
        head = fh.read(64)
    return any(sig in head[:16] for sig in _SIGNATURES) or head[4:8] in (b"ftyp", b"moov", b"mdat", b"free", b"wide")


def _classify_unreadable(p: Path, reason: str) -> DecodeError:
    if "video stream" in reason:
        return NoVideoStreamError(p, reason)
    if _looks_like_media(p):
        return TruncatedVideoError(p, f"media container cannot be read (index missing or damaged): {reason}")
    return NotAVideoError(p, f"not a video or image any backend can read: {reason}")


def _load_decord(
    p: Path, num_frames: int, start: float | None, end: float | None, end_frame: int | None, min_frames: int | None
) -> Clip:
    import decord

    decord.logging.set_level(decord.logging.QUIET)
    try:
        reader = decord.VideoReader(str(p), ctx=decord.cpu(0))
        total = len(reader)
        fps = float(reader.get_avg_fps()) or None
    except Exception as exc:  # decord raises RuntimeError / DECORDError with ffmpeg messages
        raise _classify_unreadable(p, f"decord cannot open: {_short(exc)}") from exc
    if total < 1:
        raise _classify_unreadable(p, "decord counts zero frames")
    idx = _plan(p, total, fps, num_frames, start, end, end_frame, min_frames)
    uniq, inverse = np.unique(idx, return_inverse=True)
    try:
        batch = reader.get_batch(uniq.tolist())
    except Exception as exc:
        raise _classify_unreadable(p, f"decord cannot seek / decode: {_short(exc)}") from exc
    finally:
        del reader
    frames = batch.asnumpy() if hasattr(batch, "asnumpy") else np.asarray(batch)
    return Clip(np.ascontiguousarray(frames[inverse]), "decord", False, fps, total, idx)


def _load_pyav(
    p: Path, num_frames: int, start: float | None, end: float | None, end_frame: int | None, min_frames: int | None
) -> Clip:
    import av

    try:
        container = av.open(str(p))
    except Exception as exc:
        raise _classify_unreadable(p, f"pyav cannot open: {_short(exc)}") from exc
    with container:
        if not container.streams.video:
            raise NoVideoStreamError(p, "the file has no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        rate = stream.average_rate or stream.guessed_rate
        fps = float(rate) if rate else None
        total = int(stream.frames or 0) or _count_packets(p)  # mkv / webm store no frame count
        if total <= 0:
            raise NoDecodableFramesError(p, "the video stream holds no frames")
        idx = _plan(p, total, fps, num_frames, start, end, end_frame, min_frames)
        wanted = set(int(i) for i in idx)
        stop = int(idx.max())
        got: dict[int, np.ndarray] = {}
        decoded, error = 0, None
        try:
            for frame in container.decode(stream):
                if decoded in wanted:
                    got[decoded] = frame.to_ndarray(format="rgb24")
                decoded += 1
                if decoded > stop:
                    break
        except Exception as exc:  # a damaged packet: keep what decoded, judge below
            error = _short(exc)
    if decoded == 0:
        raise NoDecodableFramesError(p, f"no frame decodes (container declares {total}){': ' + error if error else ''}")
    if len(got) < len(wanted):
        raise TruncatedVideoError(
            p, f"decoding stopped after {decoded} of {total} declared frames, needed frame {stop}"
            + (f": {error}" if error else "")
        )
    frames = np.stack([got[int(i)] for i in idx])
    return Clip(frames, "pyav", False, fps, total, idx)


def _load_torchcodec(
    p: Path, num_frames: int, start: float | None, end: float | None, end_frame: int | None, min_frames: int | None
) -> Clip:
    """torchcodec in exact seek mode: opening scans every packet, so it knows how many frames the file
    really holds. Frame count and rate come from the header when it has them (what PyAV reads), so
    the indices match PyAV's; frames the header declares but the data lacks are a truncated file."""
    from torchcodec.decoders import VideoDecoder

    try:
        decoder = VideoDecoder(str(p), seek_mode="exact", dimension_order="NHWC", num_ffmpeg_threads=0)
        meta = decoder.metadata
    except Exception as exc:  # RuntimeError "Could not open input file", ValueError "best video stream is unknown"
        if "video stream" in str(exc):  # its message goes on to ask for a bug report: not useful here
            raise NoVideoStreamError(p, "the file has no video stream") from exc
        raise _classify_unreadable(p, f"torchcodec cannot open: {_short(exc)}") from exc
    present = int(meta.num_frames_from_content or 0)
    total = int(meta.num_frames_from_header or 0) or present  # mkv / webm store no frame count
    rate = meta.average_fps_from_header or meta.average_fps  # PyAV: average_rate, else guessed
    fps = float(rate) if rate else None
    if total <= 0:
        raise NoDecodableFramesError(p, "the video stream holds no frames")
    idx = _plan(p, total, fps, num_frames, start, end, end_frame, min_frames)
    if present == 0:
        raise NoDecodableFramesError(p, f"no frame decodes (container declares {total})")
    stop = int(idx.max())
    if stop >= present:
        raise TruncatedVideoError(p, f"the data holds {present} of {total} declared frames, needed frame {stop}")
    uniq, inverse = np.unique(idx, return_inverse=True)
    try:
        batch = decoder.get_frames_at(uniq.tolist())
    except Exception as exc:  # "Could not push packet to decoder": damaged data inside the file
        raise TruncatedVideoError(p, f"decoding failed before frame {stop}: {_short(exc)}") from exc
    frames = batch.data.numpy()
    return Clip(np.ascontiguousarray(frames[inverse]), "torchcodec", False, fps, total, idx)


def _count_packets(p: Path) -> int:
    """Frames of the first video stream counted from its packets (demux only, no decoding)."""
    import av

    try:
        with av.open(str(p)) as container:
            stream = container.streams.video[0]
            return sum(1 for pkt in container.demux(stream) if pkt.size)
    except Exception:
        return 0


def _load_image(p: Path) -> Clip:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(p) as img:
            img.load()
            rgb = np.asarray(img.convert("RGB"))
    except UnidentifiedImageError as exc:
        raise NotAVideoError(p, f"not a readable image: {_short(exc)}") from exc
    except (OSError, SyntaxError, ValueError) as exc:  # PIL: "image file is truncated", broken data
        raise TruncatedVideoError(p, f"image data is damaged or truncated: {_short(exc)}") from exc
    return Clip(rgb[None].copy(), "pil", True, None, 1, np.zeros(1, dtype=np.int64))


def _short(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:limit]
