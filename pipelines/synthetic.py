"""Synthetic video QA for the demo: a coloured shape moving on a plain background.

Why synthetic: the demo must run end to end (extract -> train -> evaluate) on 2 CPU cores with no
downloads, and still show that the pipeline learns something measurable. Each video answers three
questions whose answers are visible in the pixels: colour (red / green / blue / yellow), shape
(circle / square / triangle) and direction of motion (left / right / up / down; only readable
across frames, so it exercises the temporal side). Accuracy per question type can be read next
to chance (1/4, 1/3, 1/4).

`generate_synthetic(out_dir, n_videos=200, seed=0)` writes (paths relative to out_dir):
  videos/syn_00000.mp4 ...        h264 (or mpeg4) clips, `frames` frames of size x size, yuv420p
  manifest.jsonl                  {"id", "path", "split"} per video: the input of `merv extract`
  train.json                      LLaVA-style conversations of the train split (the three questions in a
                                  seeded order, "<video>\\n" before the first; one-word gpt answers)
  captions.json                   Stage-1 captioning records ("a red circle moves left.") of the train split
  eval/synthetic_mcq/test_q.json  held-out split in the reference MCQ format (options, num_option,
  eval/synthetic_mcq/test_a.json  answer_id, answer, question_type); video_name = store id
  eval/synthetic_open/...         the same questions open-ended (one-word answers)
  dataset.json                    seed, counts, chance per question type, the files above
Everything is a function of the arguments (seed included): the same call writes the same files.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 80, 230),
    "yellow": (235, 215, 40),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
DIRECTIONS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}  # (dx, dy)
QUESTIONS: dict[str, str] = {
    "color": "What color is the shape?",
    "shape": "What shape is in the video?",
    "direction": "Which direction does the shape move?",
}
ANSWER_SPACE: dict[str, list[str]] = {"color": list(COLORS), "shape": list(SHAPES), "direction": list(DIRECTIONS)}
CAPTION_PROMPT = "Describe the video briefly."
# Geometry, as fractions of the frame side (the tiny encoders see a 4x4 patch grid, 1/4 of the side per
# patch): a shape spans about two patches, and travels one and a half patches or more, so both the shape
# and the displacement reach the encoders' features.
RADIUS: tuple[float, float] = (0.16, 0.22)
TRAVEL: tuple[float, float] = (0.3, 0.4)


@dataclass
class SyntheticClip:
    """One generated video and the ground truth drawn in it."""

    id: str
    path: str  # relative to the dataset root
    split: str  # "train" | "test"
    color: str
    shape: str
    direction: str
    radius: float
    start: tuple[float, float]  # centre (x, y) in the first frame
    end: tuple[float, float]  # centre (x, y) in the last frame
    background: int  # grey level

    def answer(self, qtype: str) -> str:
        return {"color": self.color, "shape": self.shape, "direction": self.direction}[qtype]

    def caption(self) -> str:
        return f"a {self.color} {self.shape} moves {self.direction}."


@dataclass
class SyntheticDataset:
    """Where `generate_synthetic` wrote everything (absolute paths) and what it holds."""

    root: Path
    clips: list[SyntheticClip]
    manifest: Path
    train_json: Path
    captions_json: Path
    mcq_dir: Path
    open_dir: Path
    chance: dict[str, float] = field(default_factory=dict)

    @property
    def train(self) -> list[SyntheticClip]:
        return [c for c in self.clips if c.split == "train"]

    @property
    def test(self) -> list[SyntheticClip]:
        return [c for c in self.clips if c.split == "test"]


# ------------------------------------------------------------------------------------ rendering


def shape_mask(shape: str, cx: float, cy: float, r: float, size: int) -> np.ndarray:
    """Boolean (size, size) mask of a shape centred at (cx, cy) with half-extent r (pixel centres)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    dx, dy = xx - cx, yy - cy
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        h = r * 0.85  # about the circle's area, so size does not give the shape away
        return (np.abs(dx) <= h) & (np.abs(dy) <= h)
    if shape == "triangle":
        # apex up at (cx, cy - r), base at y = cy + r from cx - r to cx + r
        t = (dy + r) / (2 * r)
        return (dy >= -r) & (dy <= r) & (np.abs(dx) <= r * t)
    raise ValueError(f"shape {shape!r} is unknown; use one of {SHAPES}")


TRAIL_GHOSTS = 4  # copies of the shape drawn fading out behind it when a trail is asked for


def render_clip(clip: SyntheticClip, frames: int, size: int, trail: float = 0.0) -> np.ndarray:
    """uint8 (frames, size, size, 3): the shape moving linearly from `start` to `end`.

    `trail` > 0 draws a motion trail (a streak fading out behind the shape, as motion blur leaves on
    camera) `trail` x size pixels long: the direction then shows within a frame, next to each patch,
    not only across frames (random encoders keep local patterns far better than displacements)."""
    out = np.full((frames, size, size, 3), clip.background, dtype=np.uint8)
    colour = np.array(COLORS[clip.color], dtype=np.float32)
    dx, dy = DIRECTIONS[clip.direction]
    for i in range(frames):
        a = i / max(frames - 1, 1)
        cx = clip.start[0] + a * (clip.end[0] - clip.start[0])
        cy = clip.start[1] + a * (clip.end[1] - clip.start[1])
        frame = out[i].astype(np.float32)
        for j in range(TRAIL_GHOSTS, 0, -1) if trail > 0 else ():  # farthest (faintest) first
            back = trail * size * j / TRAIL_GHOSTS
            alpha = 0.7 * (1 - j / (TRAIL_GHOSTS + 1))
            mask = shape_mask(clip.shape, cx - dx * back, cy - dy * back, clip.radius, size)
            frame[mask] = (1 - alpha) * frame[mask] + alpha * colour
        frame[shape_mask(clip.shape, cx, cy, clip.radius, size)] = colour
        out[i] = np.round(frame).astype(np.uint8)
    return out


def rgb_to_yuv420p(frame: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3) RGB -> the (H * 3 / 2, W) yuv420p layout PyAV takes (BT.601, limited range).

    Converting here rather than in libswscale keeps the bytes independent of the FFmpeg build's
    scaler flags and versions (the set must be reproducible from its seed).
    """
    f = frame.astype(np.float32)
    r, g, b = f[..., 0], f[..., 1], f[..., 2]
    y = 16 + 0.257 * r + 0.504 * g + 0.098 * b
    u = 128 - 0.148 * r - 0.291 * g + 0.439 * b
    v = 128 + 0.439 * r - 0.368 * g - 0.071 * b
    h, w = y.shape
    u = u.reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3))
    v = v.reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3))
    planes = np.concatenate([y.ravel(), u.ravel(), v.ravel()])
    return np.clip(np.round(planes), 0, 255).astype(np.uint8).reshape(h * 3 // 2, w)


def write_mp4(path: str | os.PathLike[str], video: np.ndarray, fps: int = 8, codec: str = "libx264") -> None:
    """Encode uint8 (T, H, W, 3) RGB with PyAV: h264 near-lossless (crf 12) or mpeg4, single-threaded,
    colour conversion in numpy, so the same pixels always give the same bytes."""
    import av

    t, h, w, _ = video.shape
    with av.open(str(path), "w", format="mp4") as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.codec_context.thread_count = 1
        stream.codec_context.thread_type = "NONE"
        # x264 asm=0: a SIMD routine of x264 occasionally made the same frames encode to different bytes
        stream.options = {"crf": "12", "preset": "veryfast", "x264-params": "asm=0"} if codec == "libx264" else {"qscale": "2"}
        for i in range(t):
            frame = av.VideoFrame.from_ndarray(rgb_to_yuv420p(video[i]), format="yuv420p")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


# ------------------------------------------------------------------------------------- planning


def plan_clips(n_videos: int, seed: int, size: int, test_fraction: float, *, radius: tuple[float, float] = RADIUS,
               travel: tuple[float, float] = TRAVEL) -> list[SyntheticClip]:
    """Attributes, geometry and split of every clip (no I/O).

    The 48 (colour, shape, direction) combinations are dealt round-robin in seeded order, so every
    answer is about equally frequent; the test split takes every k-th clip of a seeded permutation.
    `radius` / `travel`: (low, high) fractions of `size` the shape's half-extent and its path are drawn from.
    """
    if n_videos < 2:
        raise ValueError("need at least 2 videos (one train, one test)")
    if not 0 < test_fraction < 1:
        raise ValueError("test_fraction must be in (0, 1)")
    if size < 32 or size % 2:
        raise ValueError("size must be an even number >= 32 (yuv420p needs even sizes)")
    for name, (low, high) in (("radius", radius), ("travel", travel)):
        if not 0 < low <= high < 1:
            raise ValueError(f"{name} {(low, high)}: need 0 < low <= high < 1 (fractions of the frame side)")
    if 2 * radius[1] + travel[1] + 4 / size > 1:
        raise ValueError(f"radius {radius} and travel {travel} do not fit the frame: need 2 * radius + travel "
                         "(the largest) below 1 minus a 2-pixel margin on each side")
    rng = np.random.default_rng(seed)
    combos = list(itertools.product(COLORS, SHAPES, DIRECTIONS))
    order: list[tuple[str, str, str]] = []
    while len(order) < n_videos:
        perm = rng.permutation(len(combos))
        order += [combos[i] for i in perm]
    n_test = max(1, min(n_videos - 1, int(round(n_videos * test_fraction))))
    test_idx = set(rng.permutation(n_videos)[:n_test].tolist())
    clips = []
    for i, (color, shape, direction) in enumerate(order[:n_videos]):
        r = float(rng.uniform(*radius) * size)
        path = float(rng.uniform(*travel) * size)
        lo, hi = r + 2, size - r - 2
        dx, dy = DIRECTIONS[direction]
        # along the motion axis the path [p, p + path] must fit; across it, anywhere inside
        along = float(rng.uniform(lo, hi - path))
        across = float(rng.uniform(lo, hi))
        if dx:
            x0 = along if dx > 0 else along + path
            start, end = (x0, across), (x0 + dx * path, across)
        else:
            y0 = along if dy > 0 else along + path
            start, end = (across, y0), (across, y0 + dy * path)
        vid = f"syn_{i:05d}"
        clips.append(
            SyntheticClip(
                id=vid,
                path=f"videos/{vid}.mp4",
                split="test" if i in test_idx else "train",
                color=color,
                shape=shape,
                direction=direction,
                radius=round(r, 3),
                start=(round(start[0], 3), round(start[1], 3)),
                end=(round(end[0], 3), round(end[1], 3)),
                background=int(rng.integers(16, 64)),
            )
        )
    return clips


def _conversation(clip: SyntheticClip, rng: np.random.Generator) -> list[dict[str, str]]:
    turns = []
    for j, qtype in enumerate(rng.permutation(list(QUESTIONS)).tolist()):
        prefix = "<video>\n" if j == 0 else ""
        turns += [{"from": "human", "value": prefix + QUESTIONS[qtype]}, {"from": "gpt", "value": clip.answer(qtype)}]
    return turns


def _mcq(clips: list[SyntheticClip], rng: np.random.Generator) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    qs, ans = [], []
    for c in clips:
        for qtype, question in QUESTIONS.items():
            options = rng.permutation(ANSWER_SPACE[qtype]).tolist()
            qid = f"{c.id}_{qtype}"
            qs.append(
                {"video_name": c.id, "question_id": qid, "question": question, "options": options,
                 "num_option": len(options), "question_type": qtype}
            )
            ans.append({"video_name": c.id, "question_id": qid, "answer_id": options.index(c.answer(qtype)), "answer": c.answer(qtype)})
    return qs, ans


def _dump(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1))


def generate_synthetic(
    out_dir: str | os.PathLike[str],
    n_videos: int = 200,
    *,
    seed: int = 0,
    size: int = 64,
    frames: int = 16,
    fps: int = 8,
    test_fraction: float = 0.2,
    codec: str = "libx264",
    overwrite: bool = False,
    radius: tuple[float, float] = RADIUS,
    travel: tuple[float, float] = TRAVEL,
    trail: float = 0.0,
) -> SyntheticDataset:
    """Write the synthetic QA set under out_dir (layout in the module docstring); `radius` / `travel`
    as in `plan_clips`, `trail` as in `render_clip`."""
    root = Path(out_dir)
    if frames < 2:
        raise ValueError("frames must be >= 2 (motion needs two frames)")
    if not 0 <= trail < 1:
        raise ValueError(f"trail {trail}: a fraction of the frame side in [0, 1)")
    clips = plan_clips(n_videos, seed, size, test_fraction, radius=radius, travel=travel)  # refuses bad settings first
    if root.exists() and any(root.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{root} is not empty; pass overwrite=True to replace it")
        shutil.rmtree(root)
    (root / "videos").mkdir(parents=True, exist_ok=True)
    for c in clips:
        write_mp4(root / c.path, render_clip(c, frames, size, trail), fps=fps, codec=codec)
    with (root / "manifest.jsonl").open("w") as fh:
        for c in clips:
            fh.write(json.dumps({"id": c.id, "path": c.path, "split": c.split}) + "\n")
    rng = np.random.default_rng([seed, 1])
    train = [c for c in clips if c.split == "train"]
    test = [c for c in clips if c.split == "test"]
    _dump(root / "train.json", [{"id": c.id, "video": c.path, "conversations": _conversation(c, rng)} for c in train])
    _dump(
        root / "captions.json",
        [{"id": c.id, "video": c.path, "conversations": [{"from": "human", "value": "<video>\n" + CAPTION_PROMPT},
                                                         {"from": "gpt", "value": c.caption()}]} for c in train],
    )
    mcq_q, mcq_a = _mcq(test, rng)
    mcq_dir, open_dir = root / "eval" / "synthetic_mcq", root / "eval" / "synthetic_open"
    _dump(mcq_dir / "test_q.json", mcq_q)
    _dump(mcq_dir / "test_a.json", mcq_a)
    _dump(open_dir / "test_q.json", [{k: q[k] for k in ("video_name", "question_id", "question", "question_type")} for q in mcq_q])
    _dump(open_dir / "test_a.json", [{"question_id": a["question_id"], "answer": a["answer"]} for a in mcq_a])
    chance = {k: 1.0 / len(v) for k, v in ANSWER_SPACE.items()}
    _dump(
        root / "dataset.json",
        {
            "seed": seed, "videos": n_videos, "train": len(train), "test": len(test), "size": size, "frames": frames,
            "radius": list(radius), "travel": list(travel), "trail": trail, "fps": fps, "codec": codec, "chance": chance, "manifest": "manifest.jsonl", "train_json": "train.json",
            "captions_json": "captions.json", "mcq": "eval/synthetic_mcq", "open": "eval/synthetic_open",
            "clips": [asdict(c) for c in clips],
        },
    )
    return SyntheticDataset(
        root=root.resolve(), clips=clips, manifest=(root / "manifest.jsonl").resolve(), train_json=(root / "train.json").resolve(),
        captions_json=(root / "captions.json").resolve(), mcq_dir=mcq_dir.resolve(), open_dir=open_dir.resolve(), chance=chance,
    )


def load_synthetic(root: str | os.PathLike[str]) -> SyntheticDataset:
    """Re-open a generated set from its dataset.json (e.g. in a later demo step)."""
    r = Path(root)
    meta = json.loads((r / "dataset.json").read_text())
    clips = [SyntheticClip(**{**c, "start": tuple(c["start"]), "end": tuple(c["end"])}) for c in meta["clips"]]
    return SyntheticDataset(
        root=r.resolve(), clips=clips, manifest=(r / meta["manifest"]).resolve(), train_json=(r / meta["train_json"]).resolve(),
        captions_json=(r / meta["captions_json"]).resolve(), mcq_dir=(r / meta["mcq"]).resolve(), open_dir=(r / meta["open"]).resolve(),
        chance={k: float(v) for k, v in meta["chance"].items()},
    )


__all__ = [
    "ANSWER_SPACE", "COLORS", "DIRECTIONS", "QUESTIONS", "RADIUS", "SHAPES", "TRAVEL", "SyntheticClip", "SyntheticDataset",
    "generate_synthetic", "load_synthetic", "plan_clips", "render_clip", "rgb_to_yuv420p", "shape_mask", "write_mp4",
]
