"""`merv ablate`: a sweep trains and evaluates every configuration from one cache, resumably,
without decoding or encoding a single video."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

import merv.extract.encoders as encoders_pkg
import merv.extract.video as video_mod
from merv.pipelines import ablate
from merv.pipelines.ablate import Sweep, expand, run_sweep
from merv.train.trainer import TrainConfig

import helpers_train  # noqa: E402 - the tests folder is on sys.path (conftest.py)


def _benchmark(root: Path, n: int = 8) -> Path:
    bench = root / "colors_mcq"
    bench.mkdir()
    data = json.loads((root / "task.json").read_text())[:n]
    qs, ans = [], []
    for i, rec in enumerate(data):
        answer = rec["conversations"][1]["value"]
        qs.append({"video_name": rec["id"], "question": "What color is it?", "options": helpers_train.WORDS,
                   "num_option": 4, "question_id": f"q{i}"})
        ans.append({"question_id": f"q{i}", "answer_id": helpers_train.WORDS.index(answer)})
    (bench / "test_q.json").write_text(json.dumps(qs))
    (bench / "test_a.json").write_text(json.dumps(ans))
    return bench


def _forbid(*_a, **_k):
    raise AssertionError("a sweep must not decode or encode videos")


def test_sweep_from_one_cache_is_resumable_and_never_touches_videos(tmp_path, monkeypatch):
    data, store = helpers_train.make_task(tmp_path, n=16)
    bench = _benchmark(tmp_path)
    monkeypatch.setattr(video_mod, "load_clip", _forbid)
    monkeypatch.setattr(encoders_pkg, "build_encoder", _forbid)
    monkeypatch.setattr("merv.extract.encoders.registry.build_encoder", _forbid)
    base = TrainConfig(data=[data], stores=[store], recipe="tiny", stage="finetune", max_steps=2, global_batch_size=4,
                       tensorboard=False, progress=False)
    sweep = Sweep(base, {"tokens_per_frame": [1], "fusion": ["concat_channel"], "encoders": ["leave-one-out"]},
                  benchmarks=[str(bench)], eval_store=store, eval_mode="loglik")
    names = [v.name for v in expand(sweep)]
    assert names[0] == "base" and len(names) == 1 + 1 + 1 + 4
    assert {"no-dinov2", "no-siglip", "no-vivit", "no-languagebind", "tokens_per_frame-1", "fusion-concat_channel"} <= set(names)
    rows = run_sweep(sweep, tmp_path / "sweep")
    assert [r["name"] for r in rows] == names
    table = list(csv.DictReader((tmp_path / "sweep" / "table.csv").open()))
    assert len(table) == len(names)
    for row in table:
        assert 0.0 <= float(row["acc/colors_mcq"]) <= 1.0
        assert int(row["connector_params"]) > 0 and float(row["paper_scale_tflops"]) > 0
    by_name = {r["name"]: r for r in rows}
    assert by_name["no-dinov2"]["connector_params"] < by_name["base"]["connector_params"]
    assert by_name["tokens_per_frame-1"]["paper_scale_tflops"] < by_name["base"]["paper_scale_tflops"]
    assert (tmp_path / "sweep" / "table.md").read_text().count("\n") == len(names) + 2

    # re-running the sweep trains nothing: every configuration has its result
    monkeypatch.setattr("merv.train.trainer.train", _forbid)
    again = run_sweep(sweep, tmp_path / "sweep")
    assert [r["name"] for r in again] == names


def test_sweep_file_rejects_unknown_axes(tmp_path):
    path = tmp_path / "sweep.json"
    path.write_text(json.dumps({"base": {"recipe": "tiny"}, "axes": {"learning_rate": [1e-3]}}))
    with pytest.raises(ValueError, match="unknown axes"):
        Sweep.from_file(path)
    assert ablate.AXES  # the documented axes
