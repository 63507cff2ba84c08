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
