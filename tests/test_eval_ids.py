"""Sample ids name a video *and* its window, the same way in `merv eval-manifest`, in the store
lookup and in the predictions: two benchmarks asking about one video with different windows (the
reference's own eval_data/dummy_mcq, with end_frame, and dummy_openended, without) share one store.
Stores whose manifests named windowed clips by their bare video stem still work when the window
they recorded is the question's; otherwise the error names the fix."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from test_evaluate import fill_store, read_rows
from testkit.threads import one_thread  # noqa: F401 - autouse: one torch thread in this module
from typer.testing import CliRunner

from merv import cli
from merv.extract.sources import read_manifest
from merv.pipelines import evaluate as E
from merv.store import FeatureStore, SampleRecord
from merv.train.tiny import build_tiny_merv

VIDEO = "video_10336"


@pytest.fixture(scope="module")
def model() -> Any:
    return build_tiny_merv(seed=0)[0].eval()


def write_reference_pair(root: Path) -> tuple[Path, Path]:
    """Trimmed copies of the reference's dummy_mcq (end_frame 595) and dummy_openended (no window),
    both about video_10336, plus the video file both manifests point to."""
    mcq, oe = root / "eval_data" / "dummy_mcq", root / "eval_data" / "dummy_openended"
    for d in (mcq, oe):
        d.mkdir(parents=True)
    (mcq / "test_q.json").write_text(json.dumps([
        {"video_name": VIDEO, "num_option": 3, "question_id": "mcvqa_10336_0", "options": ["static or shaking", "I don't know", "moving"],
         "question": "Is the camera moving or static?", "end_frame": 595},
        {"video_name": VIDEO, "num_option": 3, "question_id": "mcvqa_10336_4",
         "options": ["Indoors in the living room or bedroom", "Indoors in the kitchen", "Indoors in the bathroom"],
         "question": "Where is the person?", "end_frame": 595},
    ]))
    (mcq / "test_a.json").write_text(json.dumps([
        {"video_name": VIDEO, "question_id": "mcvqa_10336_0", "answer_id": 2, "answer": "moving"},
        {"video_name": VIDEO, "question_id": "mcvqa_10336_4", "answer_id": 1, "answer": "Indoors in the kitchen"},
    ]))
    (oe / "test_q.json").write_text(json.dumps([
        {"video_name": VIDEO, "question_id": "0", "question": "what is the video doing?"},
        {"video_name": VIDEO, "question_id": "2", "question": "what is a person doing?"},
    ]))
    (oe / "test_a.json").write_text(json.dumps([{"question_id": "0", "answer": "regard"}, {"question_id": "2", "answer": "explain"}]))
    videos = root / "videos"
    videos.mkdir()
    (videos / f"{VIDEO}.mp4").write_bytes(b"not decoded: features are written directly")
    return mcq, oe


def test_two_benchmarks_sharing_a_video_share_one_store(model: Any, tmp_path: Path) -> None:
    mcq, oe = write_reference_pair(tmp_path)
    manifests = []
    for bench in (mcq, oe):  # through the CLI, as a user would
        m = tmp_path / f"{bench.name}.jsonl"
        res = CliRunner().invoke(cli.app, ["eval-manifest", str(bench), str(m), "--video-dir", str(tmp_path / "videos")])
        assert res.exit_code == 0, res.output
        manifests.append(m)
    rows = [json.loads(line) for m in manifests for line in m.read_text().splitlines()]
    assert [(r["id"], r.get("end_frame")) for r in rows] == [(f"{VIDEO}@ef595", 595), (VIDEO, None)]
    # both manifests into ONE store: two samples of the same file, one per window
    store = fill_store(tmp_path / "eval.zarr", [rec for m in manifests for rec in read_manifest(m)], model)
    table = FeatureStore.open(store.url).samples
    assert table.record(table.index[f"{VIDEO}@ef595"]).end_frame == 595
    assert table.record(table.index[VIDEO]).end_frame is None
    for m in manifests:  # a second extraction of either manifest into the store adds nothing and conflicts with nothing
        assert store.add_samples(read_manifest(m)) == []

    summary = E.evaluate(model, [mcq, oe], store.url, tmp_path / "out", batch_size=2, max_new_tokens=3)
    assert summary is not None and set(summary["benchmarks"]) == {"dummy_mcq", "dummy_openended"}
    mc = read_rows(tmp_path / "out" / "dummy_mcq" / "generate" / "predictions.jsonl")
    op = read_rows(tmp_path / "out" / "dummy_openended" / "generate" / "predictions.jsonl")
    assert {r["sample_id"] for r in mc} == {f"{VIDEO}@ef595"} and all(r["end_frame"] == 595 for r in mc)
    assert {r["sample_id"] for r in op} == {VIDEO} and all("end_frame" not in r for r in op)
    # each benchmark read its own clip: the features differ, so the fusion weights do
    assert mc[0]["fusion_weights"] != op[0]["fusion_weights"]


def test_store_with_stem_ids_from_older_manifests(model: Any, tmp_path: Path) -> None:
    """Earlier manifests named a clip by its bare stem when the benchmark had one window per video."""
    mcq, _ = write_reference_pair(tmp_path)
    source = str(tmp_path / "videos" / f"{VIDEO}.mp4")
    old = fill_store(tmp_path / "old.zarr", [SampleRecord(VIDEO, source, end_frame=595)], model)
    E.evaluate(model, [mcq], old.url, tmp_path / "out", mode="loglik")
    rows = read_rows(tmp_path / "out" / "dummy_mcq" / "loglik" / "predictions.jsonl")
    assert [(r["sample_id"], r["store_id"]) for r in rows] == [(f"{VIDEO}@ef595", VIDEO)] * 2

    # a stem id whose recorded window is not the question's is not used: the error names the fix
    other = fill_store(tmp_path / "other.zarr", [SampleRecord(VIDEO, source, end_frame=100)], model)
    with pytest.raises(E.EvalError, match=r"video_10336@ef595 \(not in the store; 'video_10336' there holds window "
                                          r"\{'end_frame': 100\}.*re-run `merv eval-manifest"):
        E.evaluate(model, [mcq], other.url, tmp_path / "out2", mode="loglik")
