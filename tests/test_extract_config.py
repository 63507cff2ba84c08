"""`merv extract` options as a config: file, flags and --set, strictness, the printed form reloads."""

from __future__ import annotations

import yaml
from typer.testing import CliRunner

from merv.cli import app
from merv.extract.job import ExtractOptions, load_extract_options
from merv.store.paper import PAPER_ENCODER_NAMES


def _printed(*args: str) -> dict:
    result = CliRunner().invoke(app, ["extract", *args, "--print-config"])
    assert result.exit_code == 0, result.output
    return yaml.safe_load(result.stdout)


def test_defaults_are_the_options_dataclass_and_the_paper_encoders() -> None:
    printed = _printed()
    assert printed == {**load_extract_options().__dict__, "encoders": list(PAPER_ENCODER_NAMES)}
    assert printed["batch_size"] == ExtractOptions().batch_size and printed["grid"] == "8x8"


def test_file_then_flags_then_set(tmp_path) -> None:
    cfg = tmp_path / "extract.yaml"
    cfg.write_text("store: s.zarr\nsize: tiny\nbatch_size: 4\nencoders: [dinov2, vivit]\ngrid: 2x2\n")
    printed = _printed("videos.jsonl", "--config", str(cfg), "--batch-size", "6", "--set", "batch_size=7",
                       "--set", "max_inflight_bytes=1GiB", "--encoders", "siglip")
    assert printed["source"] == "videos.jsonl" and printed["store"] == "s.zarr" and printed["size"] == "tiny"
    assert printed["batch_size"] == 7 and printed["encoders"] == ["siglip"] and printed["grid"] == "2x2"
    assert printed["max_inflight_bytes"] == 2**30
    again = tmp_path / "again.yaml"
    again.write_text(yaml.safe_dump(printed))
    assert _printed("--config", str(again)) == printed  # the printed form is a config file


def test_unknown_keys_and_bad_values_are_one_line(tmp_path) -> None:
    for args, needle in ((["--set", "batch_sise=3"], "did you mean batch_size"),
                         (["--set", "max_inflight_bytes=3XB"], "max_inflight_bytes"),
                         (["--set", "batch_size=many"], "batch_size"),
                         (["--device", "tpu"], "device 'tpu'"),
                         (["--codec", "lz5"], "unknown codec chain 'lz5'")):
        result = CliRunner().invoke(app, ["extract", *args, "--print-config"])
        assert result.exit_code == 2 and needle in result.output, (args, result.output)
        assert "Traceback" not in result.output
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("stores: s.zarr\n")
    result = CliRunner().invoke(app, ["extract", "--config", str(cfg), "--print-config"])
    assert result.exit_code == 2 and "did you mean store" in result.output and str(cfg) in result.output
    result = CliRunner().invoke(app, ["extract", "v.jsonl"])
    assert result.exit_code == 2 and "--store" in result.output
