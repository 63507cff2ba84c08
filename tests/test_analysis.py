"""Analysis plots from a small predictions file: weight distribution, top videos per encoder with
decoded thumbnails, accuracy per skill across models; the numbers behind them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from merv.pipelines import analysis as A
from merv.pipelines.synthetic import generate_synthetic

ENCODERS = ["dinov2", "vivit", "siglip", "languagebind"]


def make_rows(n_videos: int = 6, seed: int = 0, skill_bias: float = 0.0) -> list[dict[str, Any]]:
    """Two questions per video; video i puts most weight on encoder i % 4."""
    rng = np.random.default_rng(seed)
    rows = []
    for v in range(n_videos):
        w = rng.dirichlet(np.ones(len(ENCODERS)))
        w = 0.3 * w
        w[v % len(ENCODERS)] += 0.7
        for j, word in enumerate(["what", "who"]):
            rows.append({
                "benchmark": "msvd", "kind": "open", "mode": "generate", "question_id": f"{v}_{j}",
                "sample_id": f"syn_{v:05d}", "video_name": f"syn_{v:05d}", "question": f"{word} is it?",
                "question_type": word, "skill": word, "pred": "x", "answer": "x",
                "match": bool((v + j) % 2) or (word == "what" and rng.random() < skill_bias),
                "fusion_weights": {e: float(x) for e, x in zip(ENCODERS, w)},
            })
    return rows


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return generate_synthetic(tmp_path_factory.mktemp("syn"), 6, seed=3, frames=8)


def _png_ok(path: Path, min_bytes: int = 5000) -> tuple[int, int]:
    assert path.is_file() and path.stat().st_size > min_bytes
    with Image.open(path) as im:
        assert im.format == "PNG"
        return im.size


def test_video_weights_count_each_video_once(tmp_path: Path) -> None:
    rows = make_rows()
    path = tmp_path / "predictions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ids, encoders, w = A.video_weights(path)
    assert encoders == ENCODERS and len(ids) == 6 and w.shape == (6, 4)
    assert np.allclose(w.sum(1), 1.0)
    assert [int(np.argmax(r)) for r in w] == [v % 4 for v in range(6)]
    with pytest.raises(ValueError, match="no fusion weights"):
        A.video_weights([{k: v for k, v in r.items() if k != "fusion_weights"} for r in rows])


def test_weight_distribution_plot(tmp_path: Path) -> None:
    w, h = _png_ok(A.plot_weight_distribution(make_rows(), tmp_path / "weights.png"))
    assert w > 300 and h > 200


def test_top_videos_plot_decodes_thumbnails(tmp_path: Path, synthetic: Any) -> None:
    rows = make_rows()
    blank_png = A.plot_top_videos(rows, {}, tmp_path / "blank.png", k=2, frames=3)  # no sources: grey cells
    png = A.plot_top_videos(rows, synthetic.manifest, tmp_path / "top.png", k=2, frames=3)
    _png_ok(png)
    # real thumbnails carry far more colour than the grey placeholders of the same layout
    with Image.open(png) as a, Image.open(blank_png) as b:
        assert a.size == b.size
        assert np.asarray(a.convert("RGB")).std() > np.asarray(b.convert("RGB")).std() + 5
    # the thumbnail itself: 3 frames + the average frame, decoded from the clip
    thumb = A._thumb(A.sources_from_manifest(synthetic.manifest)["syn_00000"], 3)
    assert thumb is not None and thumb.shape[0] == 64 and thumb.shape[1] > 4 * 64
    assert A._thumb({"path": str(tmp_path / "missing.mp4")}, 3) is None


def test_skill_accuracy_plot_for_several_models(tmp_path: Path) -> None:
    a, b = make_rows(seed=0), make_rows(seed=1, skill_bias=1.0)
    pa = tmp_path / "a.jsonl"
    pa.write_text("".join(json.dumps(r) + "\n" for r in a))
    acc = A.skill_accuracy(pa)
    assert set(acc) == {"msvd-what", "msvd-who"}
    assert acc["msvd-what"] == (6, pytest.approx(np.mean([r["match"] for r in a if r["skill"] == "what"])))
    assert A.skill_accuracy(b)["msvd-what"] == (6, 1.0)
    _png_ok(A.plot_skill_accuracy({"merv": pa, "siglip-single": b}, tmp_path / "skills.png"))
    with pytest.raises(ValueError, match="at least 500"):
        A.plot_skill_accuracy({"merv": pa}, tmp_path / "none.png", min_count=500)


def test_plot_all_writes_the_figure_set(tmp_path: Path, synthetic: Any) -> None:
    written = A.plot_all(make_rows(), tmp_path / "figs", sources=synthetic.manifest)
    assert set(written) == {"weights", "top_videos", "skills"}
    for p in written.values():
        _png_ok(p)
