"""`merv ablate`: a sweep trains and evaluates every configuration from one cache, resumably,
without decoding or encoding a single video."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml
from testkit import tasks

import merv.extract.encoders as encoders_pkg
import merv.extract.video as video_mod
from merv.pipelines.ablate import Sweep, SweepError, Variant, expand, run_sweep


def _benchmark(root: Path, n: int = 8) -> Path:
    bench = root / "colors_mcq"
    bench.mkdir()
    data = json.loads((root / "task.json").read_text())[:n]
    qs, ans = [], []
    for i, rec in enumerate(data):
        answer = rec["conversations"][1]["value"]
        qs.append({"video_name": rec["id"], "question": "What color is it?", "options": tasks.WORDS,
                   "num_option": 4, "question_id": f"q{i}"})
        ans.append({"question_id": f"q{i}", "answer_id": tasks.WORDS.index(answer)})
    (bench / "test_q.json").write_text(json.dumps(qs))
    (bench / "test_a.json").write_text(json.dumps(ans))
    return bench


def _forbid(*_a, **_k):
    raise AssertionError("a sweep must not decode or encode videos")


def _base(data: str, store: str) -> dict:
    """A sweep's base: the tiny recipe's finetune stage on the task, two steps per configuration."""
    return {"recipe": "tiny", "stage": "finetune", "data": {"files": [data], "stores": [store]},
            "schedule": {"max_steps": 2}, "loader": {"global_batch_size": 4}, "logging": {"tensorboard": False}}


@pytest.mark.integration
def test_sweep_from_one_cache_is_resumable_and_never_touches_videos(tmp_path, monkeypatch):
    data, store = tasks.make_task(tmp_path, n=16)
    bench = _benchmark(tmp_path)
    monkeypatch.setattr(video_mod, "load_clip", _forbid)
    monkeypatch.setattr(encoders_pkg, "build_encoder", _forbid)
    monkeypatch.setattr("merv.extract.encoders.registry.build_encoder", _forbid)
    sweep = Sweep(_base(data, store), {"model.connector.tokens_per_frame": [1],
                                       "model.connector.fusion": ["concat_channel"], "model.encoders": ["leave-one-out"]},
                  benchmarks=[str(bench)], eval_store=store, eval_mode="loglik")
    names = [v.name for v in expand(sweep)]
    assert names[0] == "base" and len(names) == 1 + 1 + 1 + 4
    assert {"no-dinov2", "no-siglip", "no-vivit", "no-languagebind", "tokens_per_frame-1", "fusion-concat_channel"} <= set(names)
    rows = run_sweep(sweep, tmp_path / "sweep")
    assert [r["name"] for r in rows] == names
    # each configuration trained the base with its own override, and recorded it in its config.yaml
    trained = {n: yaml.safe_load((tmp_path / "sweep" / n / "train" / "config.yaml").read_text()) for n in names}
    assert trained["base"]["model"]["connector"]["tokens_per_frame"] == 4  # the tiny recipe's
    assert trained["tokens_per_frame-1"]["model"]["connector"]["tokens_per_frame"] == 1
    assert trained["fusion-concat_channel"]["model"]["connector"]["fusion"] == "concat_channel"
    assert trained["no-dinov2"]["model"]["encoders"] == ["languagebind", "vivit", "siglip"]
    assert all(t["schedule"]["max_steps"] == 2 and t["stage"] == "finetune" for t in trained.values())
    table = list(csv.DictReader((tmp_path / "sweep" / "table.csv").open()))
    assert len(table) == len(names)
    for row in table:
        assert float(row["acc/colors_mcq"]) * 8 == round(float(row["acc/colors_mcq"]) * 8)  # k of the 8 questions
        assert int(row["steps"]) == 2 and float(row["final_loss"]) > 0
        assert int(row["connector_params"]) > 0 and float(row["paper_scale_tflops"]) > 0
    by_name = {r["name"]: r for r in rows}
    assert by_name["tokens_per_frame-1"]["model.connector.tokens_per_frame"] == 1  # the override is a column
    assert by_name["no-dinov2"]["connector_params"] < by_name["base"]["connector_params"]
    assert by_name["tokens_per_frame-1"]["paper_scale_tflops"] < by_name["base"]["paper_scale_tflops"]
    assert (tmp_path / "sweep" / "table.md").read_text().count("\n") == len(names) + 2

    # re-running the sweep trains nothing: every configuration has its result
    monkeypatch.setattr("merv.train.trainer.train", _forbid)
    again = run_sweep(sweep, tmp_path / "sweep")
    assert [r["name"] for r in again] == names


def test_named_variants_and_axes_are_dotted_overrides_of_the_base(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({
        "base": _base("d.json", "s.zarr"),
        "variants": [{"name": "conv3d", "set": ["model.connector.projector=conv3d", "optim.lr=2e-3"]}],
        "axes": {"recipe": ["small"], "stage": ["full-align"], "model.encoders": ["singles"]},
    }))
    sweep = Sweep.from_file(path)
    assert sweep.notes == []
    variants = {v.name: v for v in expand(sweep)}
    assert list(variants)[:2] == ["base", "conv3d"]
    conv3d = variants["conv3d"].config(sweep.base, tmp_path / "out")
    assert (conv3d.model.connector.projector, conv3d.optim.lr) == ("conv3d", 2e-3)
    assert conv3d.checkpoint.out_dir == str(tmp_path / "out" / "conv3d" / "train") and conv3d.checkpoint.resume == "auto"
    # recipe / stage axes change the starting point; the base's own settings stay on top
    small = variants["recipe-small"].config(sweep.base, tmp_path)
    assert (small.recipe, small.model.llm.name, small.loader.global_batch_size) == ("small", "small-llama", 4)
    stage1 = variants["stage-full-align"].config(sweep.base, tmp_path)
    assert (stage1.stage, stage1.optim.weight_decay) == ("full-align", 0.0)
    assert variants["only-vivit"].config(sweep.base, tmp_path).model.encoders == ("vivit",)
    product = Sweep(sweep.base, {"model.connector.fusion": ["concat_channel", "fixed_mix"], "seed": [1, 2]},
                    mode="product")
    assert [v.name for v in expand(product)] == ["base", "fusion-concat_channel_seed-1", "fusion-concat_channel_seed-2",
                                                 "fusion-fixed_mix_seed-1", "fusion-fixed_mix_seed-2"]


def test_an_old_style_sweep_file_is_converted_with_one_note(tmp_path):
    """First-release sweep files (flat `merv train` keys) keep working: each flat key is read as
    the dotted key of the CLI's shorthand table, and one note says so."""
    path = tmp_path / "old.json"
    path.write_text(json.dumps({"base": {"data": ["d.json"], "stores": ["s.zarr"], "recipe": "tiny", "lr": 3e-3,
                                         "max_steps": 2, "global_batch_size": 4},
                                "axes": {"projector": ["avg3d"], "encoders": ["singles"]}}))
    sweep = Sweep.from_file(path)
    assert len(sweep.notes) == 1 and "\n" not in sweep.notes[0]
    for old, new in (("base.lr", "base.optim.lr"), ("base.data", "base.data.files"),
                     ("axes.projector", "axes.model.connector.projector"), ("axes.encoders", "axes.model.encoders")):
        assert f"{old} as {new}" in sweep.notes[0]
    variants = {v.name: v for v in expand(sweep)}
    assert set(variants) == {"base", "projector-avg3d", *(f"only-{e}" for e in tasks.ENCODERS)}
    config = variants["projector-avg3d"].config(sweep.base, tmp_path)
    assert (config.optim.lr, config.schedule.max_steps, config.loader.global_batch_size) == (3e-3, 2, 4)
    assert config.data.files == ("d.json",) and config.model.connector.projector == "avg3d"


@pytest.mark.parametrize("raw, needle", [
    ({"base": {"recipe": "tiny"}, "axes": {"learning_rate": [1e-3]}}, "unknown axis 'axes.learning_rate'"),
    ({"base": {"recipe": "tiny"}, "axes": {"model.conector.fusion": ["fixed_mix"]}},
     "'axes.model.conector.fusion'; did you mean axes.model.connector.fusion?"),
    ({"base": {"optim": {"learning_rate": 1e-3}}}, "'base.optim.learning_rate'; did you mean base.optim.lr?"),
    ({"base": {"learning_rate": 1e-3}}, "'base.learning_rate'; did you mean base.optim.lr?"),
    ({"variants": [{"name": "x", "set": ["model.connector.projektor=conv3d"]}]},
     "'variants[0].set.model.connector.projektor'; did you mean variants[0].set.model.connector.projector?"),
    ({"variants": [{"name": "x", "sett": ["optim.lr=1"]}]}, "variants[0].sett (did you mean variants[0].set?)"),
    ({"variantz": []}, "unknown keys variantz (did you mean variants?)"),
    ({"axes": {"model.connector.projector": ["nope"]}}, "projector 'nope' is unknown"),
    ({"variants": [{"name": "base", "set": []}]}, "variant name 'base' is reserved"),
    ({"base": {"checkpoint": {"out_dir": "elsewhere"}}}, "base.checkpoint.out_dir is set by the sweep"),
])
def test_sweep_files_are_strict_naming_the_key_and_the_closest_valid_one(tmp_path, raw, needle):
    path = tmp_path / "sweep.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(SweepError) as err:
        Sweep.from_file(path)
    assert needle in str(err.value) and str(path) in str(err.value) and "\n" not in str(err.value)


def test_variants_of_a_sweep_built_in_code_are_checked_too():
    with pytest.raises(SweepError, match="tokens_per_frame 60 is not a square"):
        Sweep({"recipe": "tiny"}, variants=[Variant("odd", (("model.connector.tokens_per_frame", 60),))])
