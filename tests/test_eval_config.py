"""`merv eval`'s config: defaults, then --config (YAML or JSON), then the shorthand flags, then
--set; strict about keys (the closest valid one is named); the judge's API key only from the
environment; --print-config; the resolved config is written next to the results and reruns them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_evaluate import fill_store, write_mcq_benchmark
from typer.testing import CliRunner

from merv import cli
from merv.extract.sources import read_manifest
from merv.pipelines import evaluate as E
from merv.train.configurable import ConfigError, load_config
from merv.train.export import save_merv
from merv.train.tiny import build_tiny_merv


@pytest.fixture(autouse=True)
def no_debug(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(cli._DEBUG, "on", False)


def test_layers_apply_in_order(tmp_path: Path) -> None:
    (tmp_path / "eval.yaml").write_text("checkpoint: ck\nbenchmarks: [a]\nbatch_size: 2\nmode: loglik\njudge: {url: http://j, workers: 2}\n")
    (tmp_path / "eval.json").write_text(json.dumps({"store": "s.zarr", "judge": {"model": "m-json"}}))
    cfg = E.load_eval_config(tmp_path / "eval.yaml", ["judge.model=m-set", "ll_norm=sum"],
                             {"batch_size": 4, "judge.model": "m-flag", "store": None, "benchmarks": ["b", "c"]})
    assert (cfg.checkpoint, cfg.benchmarks, cfg.batch_size, cfg.mode) == ("ck", ["b", "c"], 4, "loglik")  # flag > file
    assert (cfg.judge.url, cfg.judge.workers, cfg.judge.model, cfg.ll_norm) == ("http://j", 2, "m-set", "sum")  # --set > flag
    assert cfg.store is None and cfg.out == E.EvalConfig().out  # a flag left unset does not override
    assert E.load_eval_config(tmp_path / "eval.json").judge.model == "m-json"
    # the run options are the config's, with RunOptions' defaults where the config says nothing
    assert cfg.run_options() == E.RunOptions(batch_size=4, ll_norm="sum")


@pytest.mark.parametrize("kwargs, message", [
    ({"overrides": ["batchsize=3"]}, "unknown key 'batchsize'; did you mean batch_size?"),
    ({"overrides": ["judge.modle=x"]}, "unknown key 'judge.modle'; did you mean judge.model?"),
    ({"overrides": ["judge.api_key=sk-123"]}, "unknown key 'judge.api_key'; did you mean judge.api_key_env?"),
    ({"overrides": ["batch_size=many"]}, "batch_size: Input should be a valid integer"),
    ({"shorthands": {"mode": "xyz"}}, "--mode / mode 'xyz' is unknown; use one of generate, loglik"),
    ({"overrides": ["ll_target=word"]}, "ll_target 'word' is unknown; use one of option, letter"),
    ({"overrides": ["batch_size=0"]}, "batch_size 0: must be >= 1"),
])
def test_mistakes_are_named(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        E.load_eval_config(**kwargs)
    assert message in str(err.value)


def test_incomplete_config_names_what_is_missing() -> None:
    with pytest.raises(ConfigError, match="checkpoint is not set; pass CHECKPOINT"):
        E.EvalConfig(store="s", benchmarks=["b"]).check()
    with pytest.raises(ConfigError, match="benchmarks is empty; pass --benchmark"):
        E.EvalConfig(checkpoint="c", store="s").check()


def test_judge_key_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert E.JudgeConfig().build() is None  # no url, no judge
    monkeypatch.setenv("MY_JUDGE_KEY", "sk-env")
    client = E.JudgeConfig(url="http://j", api_key_env="MY_JUDGE_KEY", timeout_s=5).build()
    assert client is not None and (client.api_key, client.timeout, client.model) == ("sk-env", 5, E.JudgeConfig().model)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    assert E.JudgeConfig(url="http://j").build().api_key is None  # type: ignore[union-attr]


def test_print_config_round_trips(tmp_path: Path) -> None:
    res = CliRunner().invoke(cli.app, ["eval", "ck", "--benchmark", "a", "--benchmark", "b", "--store", "s", "--judge-url",
                                       "http://j", "--batch-size", "3", "--set", "judge.workers=7", "--print-config"])
    assert res.exit_code == 0, res.output
    data = yaml.safe_load(res.output)
    assert list(data)[:5] == ["checkpoint", "benchmarks", "store", "out", "mode"]
    assert (data["benchmarks"], data["batch_size"], data["judge"]["url"], data["judge"]["workers"]) == (["a", "b"], 3, "http://j", 7)
    assert "api_key" not in data["judge"]
    (tmp_path / "c.yaml").write_text(res.output)
    assert load_config(E.EvalConfig, file=tmp_path / "c.yaml") == E.load_eval_config(tmp_path / "c.yaml")


def test_cli_unknown_key_is_one_error_line() -> None:
    res = CliRunner().invoke(cli.app, ["eval", "ck", "--set", "max_new_token=5"])
    assert res.exit_code == 2
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert lines == ["error: --set: unknown key 'max_new_token'; did you mean max_new_tokens?"]


def test_eval_from_a_config_file_writes_and_reruns_its_config(tmp_path: Path) -> None:
    model, _ = build_tiny_merv(seed=0)
    save_merv(model, tmp_path / "export", extra={"recipe": "tiny"})
    bench = write_mcq_benchmark(tmp_path / "eval_data" / "percep", n_videos=2)
    fill_store(tmp_path / "f.zarr", read_manifest(E.write_eval_manifest(bench, tmp_path / "m.jsonl")), model)
    out = tmp_path / "out"
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump({
        "checkpoint": str(tmp_path / "export"), "benchmarks": [str(bench)], "store": str(tmp_path / "f.zarr"),
        "out": str(out), "mode": "loglik", "device": "cpu"}))
    res = CliRunner().invoke(cli.app, ["eval", "--config", str(tmp_path / "eval.yaml"), "--set", "batch_size=3"])
    assert res.exit_code == 0, res.output
    assert "| percep | loglik | letter | 4 |" in res.output
    saved = yaml.safe_load((out / "eval_config.yaml").read_text())
    assert (saved["mode"], saved["batch_size"], saved["benchmarks"]) == ("loglik", 3, [str(bench)])
    first = (out / "percep" / "loglik" / "predictions.jsonl").read_text()
    # the written config reruns the same evaluation (resumed: nothing is answered again, same rows)
    res = CliRunner().invoke(cli.app, ["eval", "--config", str(out / "eval_config.yaml")])
    assert res.exit_code == 0, res.output
    assert (out / "percep" / "loglik" / "predictions.jsonl").read_text() == first
