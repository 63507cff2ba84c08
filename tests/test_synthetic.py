"""Synthetic demo data: videos decode with the right frame count, the stated colour / shape /
direction is in the pixels, splits are disjoint, files are in the formats the pipeline reads, and
the same seed writes the same bytes."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from merv.extract.sources import read_manifest
from merv.extract.video import load_clip
from merv.pipelines.evaluate import load_benchmark
from merv.pipelines.synthetic import (
    COLORS,
    DIRECTIONS,
    QUESTIONS,
    SHAPES,
    generate_synthetic,
    load_synthetic,
    plan_clips,
    render_clip,
    shape_mask,
)
from merv.train.data import load_records

FRAMES = 16


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return generate_synthetic(tmp_path_factory.mktemp("syn") / "data", 48, seed=7, frames=FRAMES)


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def _foreground(frame: np.ndarray, background: int) -> np.ndarray:
    return np.abs(frame.astype(np.int16) - background).sum(-1) > 100


def _fill_ratio(mask: np.ndarray) -> float:
    """Shape area / bounding-box area: square ~1, circle ~pi/4, triangle ~1/2."""
    ys, xs = np.nonzero(mask)
    return float(mask.sum() / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1)))


IDEAL_FILL = {"square": 1.0, "circle": np.pi / 4, "triangle": 0.5}


def test_videos_decode_and_show_what_the_labels_say(dataset: Any) -> None:
    assert {c.color for c in dataset.clips} == set(COLORS)
    assert {c.direction for c in dataset.clips} == set(DIRECTIONS)
    assert {c.shape for c in dataset.clips} == set(SHAPES)
    palette = {k: np.array(v, dtype=np.float64) for k, v in COLORS.items()}
    for c in dataset.clips:
        clip = load_clip(dataset.root / c.path, FRAMES)
        assert clip.frames.shape == (FRAMES, 64, 64, 3) and clip.total_frames == FRAMES
        fg = [_foreground(f, c.background) for f in clip.frames]
        assert all(m.sum() > 30 for m in fg), c.id
        # colour: the mean colour of the shape region is nearest to the stated colour
        mean = np.mean([clip.frames[i][fg[i]].mean(0) for i in range(FRAMES)], axis=0)
        assert min(palette, key=lambda k: np.linalg.norm(palette[k] - mean)) == c.color, (c.id, mean)
        # direction: the centroid moves the stated way, by a lot, and hardly across
        cents = np.array([np.argwhere(m).mean(0)[::-1] for m in fg])  # (x, y)
        delta = cents[-1] - cents[0]
        dx, dy = DIRECTIONS[c.direction]
        along, across = (delta[0] * dx, abs(delta[1])) if dx else (delta[1] * dy, abs(delta[0]))
        assert along > 0.3 * 64 and across < 2.0, (c.id, c.direction, delta)
        # shape: the decoded region fills its bounding box as the stated shape does
        fill = np.mean([_fill_ratio(m) for m in fg])
        assert min(IDEAL_FILL, key=lambda k: abs(IDEAL_FILL[k] - fill)) == c.shape, (c.id, fill)
        # and sits where it was drawn in the first frame
        drawn = shape_mask(c.shape, c.start[0], c.start[1], c.radius, 64)
        assert (fg[0] & drawn).sum() / (fg[0] | drawn).sum() > 0.6


def test_shapes_are_told_apart_by_their_masks() -> None:
    # same centre and radius: circle, square and triangle cover clearly different pixels
    masks = {s: shape_mask(s, 32, 32, 10, 64) for s in SHAPES}
    for a in SHAPES:
        for b in SHAPES:
            if a < b:
                assert (masks[a] ^ masks[b]).sum() > 40
    tri = masks["triangle"]
    rows = tri.sum(1)[tri.any(1)]
    assert rows[0] < rows[-1]  # apex up: narrow top, wide base


def test_splits_and_files(dataset: Any) -> None:
    train, test = dataset.train, dataset.test
    assert len(train) + len(test) == 48 and len(test) == round(48 * 0.2)
    assert not {c.id for c in train} & {c.id for c in test}
    # manifest: what `merv extract` reads, ids = video stems, every video once
    recs = read_manifest(dataset.manifest)
    assert [r.id for r in recs] == [c.id for c in dataset.clips]
    assert all(Path(r.source).is_file() and r.kind == "video" for r in recs)
    # training conversations: train split only, <video> in the first human turn, one-word answers
    conv = load_records(dataset.train_json)  # the trainer's reader validates the LLaVA format
    assert {r["id"] for r in conv} == {c.id for c in train}
    by_id = {c.id: c for c in dataset.clips}
    for r in conv:
        turns = r["conversations"]
        assert [t["from"] for t in turns] == ["human", "gpt"] * 3
        assert turns[0]["value"].startswith("<video>\n") and all("<video>" not in t["value"] for t in turns[1:])
        truth = by_id[r["id"]]
        for q, a in zip(turns[0::2], turns[1::2]):
            qtype = next(k for k, v in QUESTIONS.items() if q["value"].endswith(v))
            assert a["value"] == truth.answer(qtype) and " " not in a["value"]
        assert (dataset.root / r["video"]).is_file()
    caps = json.loads(dataset.captions_json.read_text())
    assert caps[0]["conversations"][1]["value"] == by_id[caps[0]["id"]].caption()
    # held-out MCQ in the reference format, read by the evaluator
    bench = load_benchmark(dataset.mcq_dir)
    assert bench.kind == "mcq" and len(bench) == 3 * len(test)
    assert {q.video_name for q in bench.questions} == {c.id for c in test}
    for q in bench.questions:
        truth = by_id[q.video_name]
        assert q.options[q.answer_id] == truth.answer(q.question_type) and q.num_option == len(q.options)
        assert sorted(q.options) == sorted({"color": COLORS, "shape": SHAPES, "direction": DIRECTIONS}[q.question_type])
    open_bench = load_benchmark(dataset.open_dir)
    assert open_bench.kind == "open" and [q.answer for q in open_bench.questions] == [q.answer for q in bench.questions]
    assert dataset.chance == {"color": 0.25, "shape": pytest.approx(1 / 3), "direction": 0.25}
    again = load_synthetic(dataset.root)
    assert again.clips == dataset.clips and again.mcq_dir == dataset.mcq_dir


def test_deterministic_and_fast(tmp_path: Path) -> None:
    t0 = time.perf_counter()
    a = generate_synthetic(tmp_path / "a", 200, seed=11)
    elapsed = time.perf_counter() - t0
    assert elapsed < 20, f"200 videos took {elapsed:.1f}s"
    b = generate_synthetic(tmp_path / "b", 200, seed=11)
    assert _digest(a.root) == _digest(b.root)  # videos included, byte for byte
    other = plan_clips(200, 12, 64, 0.2)
    assert [(c.color, c.shape, c.direction, c.split) for c in other] != [(c.color, c.shape, c.direction, c.split) for c in a.clips]
    with pytest.raises(FileExistsError):
        generate_synthetic(tmp_path / "a", 4, seed=11)
    # rendering alone is a pure function of the clip
    clip = a.clips[0]
    assert np.array_equal(render_clip(clip, 8, 64), render_clip(clip, 8, 64))


def test_a_trail_fades_out_behind_the_shape_only_and_geometry_is_checked() -> None:
    """The demo's motion trail: fainter copies of the shape's colour behind it (against the motion),
    nothing ahead of it; geometry that cannot fit the frame is refused."""
    for clip in plan_clips(8, 3, 64, 0.25, radius=(0.17, 0.21), travel=(0.45, 0.5)):
        plain, trailed = render_clip(clip, 4, 64), render_clip(clip, 4, 64, trail=0.25)
        dx, dy = DIRECTIONS[clip.direction]
        reach = clip.radius + 0.25 * 64 / 2  # half the trail's length past the shape's edge
        (x0, y0), (cx, cy) = clip.start, clip.end
        behind = (round(cy - dy * reach), round(cx - dx * reach))  # in the last frame: the path is behind it
        ahead = (round(y0 + dy * reach), round(x0 + dx * reach))  # in the first frame: the path is ahead
        colour = np.array(COLORS[clip.color], dtype=np.int16)
        bg = plain[-1][behind].astype(np.int16)
        assert np.array_equal(bg, [clip.background] * 3), clip  # the plain clip has nothing there
        tint = trailed[-1][behind].astype(np.int16)
        assert 0 < np.abs(tint - bg).sum() < np.abs(colour - bg).sum(), (clip, tint)  # between background and colour
        assert np.array_equal(trailed[0][ahead], plain[0][ahead])  # nothing ahead of the shape
        shape = shape_mask(clip.shape, cx, cy, clip.radius, 64)
        assert (trailed[-1][shape] == COLORS[clip.color]).all()  # the shape itself stays solid
    with pytest.raises(ValueError, match="do not fit the frame"):
        plan_clips(8, 3, 64, 0.25, radius=(0.2, 0.25), travel=(0.5, 0.6))
