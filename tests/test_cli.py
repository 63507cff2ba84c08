"""Command-line front door: model sizing and the round-trip job."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from merv.cli import app


def test_model_info_reports_paper_sizes_without_weights():
    out = CliRunner().invoke(app, ["model", "info", "merv-frozen", "--json"])
    assert out.exit_code == 0, out.output
    report = json.loads(out.output)
    params = report["params"]
    assert {k for k in params if k.startswith("encoder/")} == {
        "encoder/languagebind", "encoder/dinov2", "encoder/vivit", "encoder/siglip"}
    assert 6.7e9 < params["llm"] < 6.8e9  # LLaMA-2 7B
    assert report["visual_tokens"] == 1024  # 16 frames x 64 tokens, cross-attention keeps one sequence
    encoders = sum(v for k, v in report["flops"].items() if k.startswith("encoder/"))
    assert 0 < encoders < report["flops"]["llm"]
    bad = CliRunner().invoke(app, ["model", "info", "no-such-recipe"])
    assert bad.exit_code == 2 and "no-such-recipe" in bad.output


def test_roundtrip_job_runs_and_verifies(tmp_path):
    out = CliRunner().invoke(app, ["roundtrip", "--out", str(tmp_path)])
    assert out.exit_code == 0, out.output
    assert "verify: clean" in out.output


def _commands(group=None, prefix=()):
    """(path, click command) of every command of `merv`, nested groups included."""
    import typer.main

    group = group or typer.main.get_command(app)
    for name, cmd in group.commands.items():
        if hasattr(cmd, "commands"):
            yield from _commands(cmd, (*prefix, name))
        else:
            yield (*prefix, name), cmd


def test_every_option_and_argument_is_explained_and_shared_options_are_spelled_one_way():
    import click

    from merv import cli

    commands = dict(_commands())
    assert {("train",), ("extract",), ("eval",), ("store", "verify"), ("model", "info")} <= set(commands)
    for path, cmd in commands.items():
        for param in cmd.params:
            assert (param.help or "").strip(), f"merv {' '.join(path)}: {param.name} has no help text"
            if isinstance(param, click.Option):
                assert all(o.startswith("--") for o in param.opts), (path, param.opts)
                if "--device" in param.opts:
                    assert cli.DEVICE_HELP in param.help, path
                if "--quiet" in param.opts or "--json" in param.opts:
                    assert param.is_flag, (path, param.opts)
                if "--quiet" in param.opts:
                    assert param.help == cli.QUIET_HELP, path
                if param.multiple:
                    free_text = param.opts in (["--set"], ["--stop"])  # values may hold commas
                    assert cli.LIST_HELP in param.help or (free_text and "repeatable" in param.help), (path, param.opts)
    # the paths a user types most agree on their spelling
    assert all(any("--out" in p.opts for p in commands[c].params) for c in [("train",), ("eval",), ("ablate",), ("demo",)])
    assert all(any("--json" in p.opts for p in commands[c].params)
               for c in [("train",), ("extract",), ("eval",), ("store", "info"), ("model", "info")])


def test_flags_read_as_flags_and_the_version_is_printed():
    from merv import __version__

    runner = CliRunner()
    out = runner.invoke(app, ["train", "--help"])
    assert out.exit_code == 0
    assert "--resume " in out.output and "BOOLEAN" not in out.output and "<bool>" not in out.output
    version = runner.invoke(app, ["--version"])
    assert version.exit_code == 0 and version.output.strip() == f"merv {__version__}"


def test_list_options_take_repeated_flags_and_comma_separated_values_alike():
    import yaml

    runner = CliRunner()
    train = runner.invoke(app, ["train", "--recipe", "merv-frozen", "--encoders", "dinov2,siglip", "--encoders", "vivit",
                                "--data", "a.json,b.json", "--data", "c.json", "--print-config"])
    assert train.exit_code == 0, train.output
    run = yaml.safe_load(train.output)
    assert [e["name"] if isinstance(e, dict) else e for e in run["model"]["encoders"]] == ["dinov2", "siglip", "vivit"]
    assert run["data"]["files"] == ["a.json", "b.json", "c.json"]
    extract = runner.invoke(app, ["extract", "--store", "s.zarr", "--encoders", "dinov2", "--encoders", "siglip,vivit",
                                  "--print-config"])
    assert extract.exit_code == 0, extract.output
    assert yaml.safe_load(extract.output)["encoders"] == ["dinov2", "siglip", "vivit"]
