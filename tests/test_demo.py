"""A reduced `merv demo`: synthetic videos -> one Ray extraction -> MERV, another fusion and a
single-encoder baseline trained from that one store -> accuracy per model and skill, fusion
weights, and the cache-versus-online cost line (online measured on steps, extrapolated)."""

from __future__ import annotations

import io
import json
import re

import pytest
from rich.console import Console

from merv.pipelines.demo import MERV, DemoConfig, DemoError, run_demo


@pytest.mark.integration
def test_reduced_demo_compares_models_per_skill_and_prices_the_cache(tmp_path, ray_session):
    out = io.StringIO()
    result = run_demo(DemoConfig(out=str(tmp_path / "demo"), videos=80, steps=120, singles=("dinov2",),
                                 fusion="learnable_scalar", online_steps=2),
                      console=Console(file=out, width=200, color_system=None))
    text = out.getvalue()
    print(text)
    chance = result.chance
    assert set(result.models) == {MERV, "fusion-learnable_scalar", "only-dinov2"}
    for m in result.models.values():  # every model scored on every skill, from its own prediction rows
        assert set(m["accuracy"]) == set(chance) and m["steps"] == 120 and m["train_s"] > 0
        assert f"│ {m['label']} " in text  # a row of the printed table
    assert result.accuracy == result.models[MERV]["accuracy"]
    assert result.accuracy["color"] >= chance["color"] + 0.35, result.models  # colour is learned in 120 steps

    # the printed accuracies are each model's own prediction rows'
    from merv.pipelines.evaluate import row_correct, run_rows

    rows = run_rows(tmp_path / "demo" / "models" / "only-dinov2" / "eval" / "synthetic_open" / "generate")
    moves = [r for r in rows if r["question_type"] == "direction"]
    assert moves and result.models["only-dinov2"]["accuracy"]["direction"] == pytest.approx(
        sum(map(row_correct, moves)) / len(moves))

    # fusion weights: a distribution over the four encoders; cross-attention's follow the video,
    # the learned scalars are one mix for every video
    merv, scalar = result.weights[MERV], result.weights["fusion-learnable_scalar"]
    encoders = ("dinov2", "vivit", "siglip", "languagebind")
    assert sum(merv[e] for e in encoders) == pytest.approx(1, abs=1e-3)
    assert max(merv[e + "_sd"] for e in encoders) > 0 and max(scalar[e + "_sd"] for e in encoders) < 1e-6
    assert "only-dinov2" not in result.weights

    # the cost line: extraction and training measured, online extrapolated from measured steps,
    # each model by its own encoders (one encoder re-run costs less than four on the same samples)
    cost = result.cost
    assert "(measured)" in text and "(extrapolated)" in text and "cost of 3 models" in text
    assert cost["online_measured"]["steps"] == 2 and cost["online_measured"]["samples"] == 2 * DemoConfig.global_batch_size
    assert set(cost["online_measured"]["seconds"]) == {"decode", *encoders}
    extra = {n: cost["online_s_extrapolated"][n] - cost["train_s"][n] for n in cost["train_s"]}
    assert 0 < extra["only-dinov2"] < extra[MERV] == pytest.approx(extra["fusion-learnable_scalar"])
    assert cost["cache_total_s"] == pytest.approx(cost["extract_s"] + sum(cost["train_s"].values()))

    saved = json.loads((tmp_path / "demo" / "demo_result.json").read_text())
    assert saved["models"][MERV]["accuracy"] == result.accuracy and saved["cost"]["extract_s"] == cost["extract_s"]
    for png in ("weights.png", "top_videos.png", "skills.png", "models.png"):
        assert (tmp_path / "demo" / "plots" / png).stat().st_size > 5000


def test_demo_settings_are_refused_before_anything_is_written(tmp_path):
    for bad, words in (({"singles": ("clip",)}, "singles ['clip']"), ({"fusion": "cross_attention"}, "MERV is the"),
                       ({"radius": (0.3, 0.35), "travel": (0.5, 0.6)}, "do not fit"), ({"trail": 1.5}, "trail 1.5")):
        with pytest.raises(DemoError, match=re.escape(words)):
            run_demo(DemoConfig(out=str(tmp_path / "d"), **bad))
        assert not (tmp_path / "d").exists()


def test_demo_output_directory_is_replaced_only_when_a_demo_made_it(tmp_path):
    from merv.pipelines.demo import MARKER, DemoError, prepare_out_dir

    user = tmp_path / "mine"
    user.mkdir()
    (user / "thesis.tex").write_text("years of work")
    with pytest.raises(DemoError, match="not made by `merv demo`.*--force"):
        prepare_out_dir(user)
    assert (user / "thesis.tex").read_text() == "years of work"
    (tmp_path / "file").write_text("x")
    with pytest.raises(DemoError, match="not a directory"):
        prepare_out_dir(tmp_path / "file", force=True)

    made = tmp_path / "demo"
    prepare_out_dir(made)  # new: created and marked
    (made / "stale.txt").write_text("from the last demo")
    prepare_out_dir(made)  # a demo's own directory is replaced
    assert (made / MARKER).is_file() and not (made / "stale.txt").exists()
    prepare_out_dir(user, force=True)  # --force: the user asked for it
    assert not (user / "thesis.tex").exists() and (user / MARKER).is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    prepare_out_dir(empty)  # nothing to lose: reused
    assert (empty / MARKER).is_file()
