"""Every `merv` command turns a bad input into one line on stderr: `error: ...` naming the input and
the fix (a CLI flag where there is one), exit status 2, no traceback; `merv --debug` shows it.

Each case fails before any heavy work (no Ray, no training step): the inputs are checked where
they are read. A few cases run the real console entry in a subprocess, the rest use CliRunner.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from testkit.tasks import make_task
from typer.testing import CliRunner

from merv import cli
from merv.train.export import save_merv
from merv.train.specs import FeatureSpec
from merv.train.tiny import build_tiny_merv

ENCODERS = ["dinov2", "siglip", "vivit", "languagebind"]


@pytest.fixture(scope="module")
def fx(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiniest store, export and benchmark, plus one file per kind of bad input."""
    root = tmp_path_factory.mktemp("cli_errors")
    data, store = make_task(root, n=4, per_shard=2)
    model, _ = build_tiny_merv(specs=[FeatureSpec(n, (16, 4, 4), 32) for n in ENCODERS], seed=0)
    save_merv(model, root / "export", extra={"recipe": "tiny"})
    files: dict[str, Any] = {
        "text.mp4": "hello, I am not a video\n",
        "latin1.json": b'[{"id": "caf\xe9"}]',
        "empty.json": "",
        "obj.json": '{"id": "x"}',
        "badjson.json": '[{"id": ',
        "noconv.json": [{"id": "v000", "video": "v000.mp4"}],
        "order.json": [{"id": "v000", "video": "v000.mp4",
                        "conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "q"}]}],
        "ghost.json": [{"id": "ghost-0", "video": "ghost-0.mp4",
                        "conversations": [{"from": "human", "value": "<video>\nq"}, {"from": "gpt", "value": "a"}]}],
        "axes.yaml": "base: {recipe: tiny}\naxes: {colour: [red]}\n",
        "base.yaml": "base: {recipe: tiny, learning_rate: 0.1}\naxes: {projector: [avg3d]}\n",
        "broken.yaml": "base: [\n",
        "bench_noq/test_a.json": "[]",
        "bench_latin/test_q.json": b'[{"question": "caf\xe9"}]',
        "bench_latin/test_a.json": "[]",
        "bench_ok/test_q.json": [{"video_name": "v000", "question_id": 1, "question": "what color?"}],
        "bench_ok/test_a.json": [{"question_id": 1, "answer": "red"}],
        "user_dir/precious.txt": "the user's own file\n",
        "rt/roundtrip.zarr/keep.txt": "not a store\n",
    }
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content if isinstance(content, str) else json.dumps(content))
    (root / "emptydir").mkdir()
    (root / "bench.yaml").write_text(f"base: {{recipe: tiny}}\nbenchmarks: [{root / 'bench_noq'}]\n")
    return {"root": root, "data": Path(data), "store": Path(store), "export": root / "export"}


@pytest.fixture(autouse=True)
def no_debug(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(cli._DEBUG, "on", False)  # MERV_DEBUG=1 in the caller's shell must not change these tests


def one_error_line(output: str) -> str:
    """The single `error:` line the CLI printed (fails on extra output: a traceback, warnings, progress)."""
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), output
    assert "Traceback" not in output
    return lines[0]


# (case, argv with {root} / {store} / {export} / {data}, substrings the line must hold: the input, then the fix)
CASES = [
    ("store info: missing", ["store", "info", "{root}/nope.zarr"], ["nope.zarr", "--store"]),
    ("store verify: empty dir", ["store", "verify", "{root}/emptydir"], ["emptydir", "not a MERV feature store"]),
    ("model info: unknown recipe", ["model", "info", "nope"], ["'nope'", "merv-frozen"]),
    ("model info: tiny recipe", ["model", "info", "tiny"], ["'tiny'", "merv-frozen"]),
    ("model info: negative seq len", ["model", "info", "merv-frozen", "--seq-len", "-5"], ["-5", "--seq-len"]),
    ("extract: non-UTF-8 manifest", ["extract", "{root}/latin1.json", "--store", "{root}/x.zarr", "--size", "tiny"],
     ["latin1.json", "UTF-8"]),
    ("extract: unknown decoder", ["extract", "{root}/empty.json", "--store", "{root}/x.zarr", "--decoder", "ffmpeg"],
     ["'ffmpeg'", "auto, decord, pyav, torchcodec"]),
    ("extract: empty manifest", ["extract", "{root}/empty.json", "--store", "{root}/x.zarr", "--size", "tiny"],
     ["empty.json", "no samples"]),
    ("extract: URL manifest", ["extract", "s3://bucket/m.jsonl", "--store", "{root}/x.zarr", "--size", "tiny"],
     ["s3://bucket/m.jsonl", "--storage-options"]),
    ("train: missing data", ["train", "--data", "{root}/nope.json", "--store", "{store}", "--out", "{root}/t"],
     ["nope.json", "--data"]),
    ("train: data is a directory", ["train", "--data", "{root}/emptydir", "--store", "{store}", "--out", "{root}/t"],
     ["emptydir", "--data"]),
    ("train: non-UTF-8 data", ["train", "--data", "{root}/latin1.json", "--store", "{store}", "--out", "{root}/t"],
     ["latin1.json", "UTF-8"]),
    ("train: empty data", ["train", "--data", "{root}/empty.json", "--store", "{store}", "--out", "{root}/t"],
     ["empty.json", "empty"]),
    ("train: object, not a list", ["train", "--data", "{root}/obj.json", "--store", "{store}", "--out", "{root}/t"],
     ["obj.json", "list of records"]),
    ("train: invalid JSON", ["train", "--data", "{root}/badjson.json", "--store", "{store}", "--out", "{root}/t"],
     ["badjson.json", "line 1 column 9"]),
    ("train: no conversations", ["train", "--data", "{root}/noconv.json", "--store", "{store}", "--out", "{root}/t"],
     ["noconv.json", "record 0", "'conversations'"]),
    ("train: turns out of order", ["train", "--data", "{root}/order.json", "--store", "{store}", "--out", "{root}/t"],
     ["order.json", "record 0", "starting with human"]),
    ("train: ids not in the store", ["train", "--data", "{root}/ghost.json", "--store", "{store}", "--out", "{root}/t"],
     ["ghost-0", "--join-key stem", "--allow-missing"]),
    ("train: unknown join key", ["train", "--data", "{data}", "--store", "{store}", "--out", "{root}/t", "--join-key", "xyz"],
     ["'xyz'", "--join-key stem"]),
    ("train: encoder the store lacks", ["train", "--data", "{data}", "--store", "{store}", "--out", "{root}/t",
                                         "--encoders", "dinov2,hiera"], ["'hiera'", "--encoders"]),
    ("train: init from a store", ["train", "--data", "{data}", "--store", "{store}", "--out", "{root}/t",
                                  "--init-from", "{store}"], ["task.zarr", "feature store", "RUN/export"]),
    ("train: LLM not downloaded", ["train", "--data", "{data}", "--store", "{store}", "--out", "{root}/t",
                                   "--llm", "vicuna-v15-7b"], ["lmsys/vicuna-7b-v1.5", "hf download lmsys/vicuna-7b-v1.5", "--llm DIR"]),
    ("eval: checkpoint is a store", ["eval", "{store}", "--benchmark", "{root}/bench_ok", "--store", "{store}",
                                     "--out", "{root}/e"], ["task.zarr", "feature store", "RUN/export"]),
    ("eval: checkpoint is empty", ["eval", "{root}/emptydir", "--benchmark", "{root}/bench_ok", "--store", "{store}",
                                   "--out", "{root}/e"], ["emptydir", "is empty", "RUN/export"]),
    ("eval: no test_q.json", ["eval", "{export}", "--benchmark", "{root}/bench_noq", "--store", "{store}",
                              "--out", "{root}/e"], ["bench_noq", "test_q.json", "--benchmark"]),
    ("eval: non-UTF-8 questions", ["eval", "{export}", "--benchmark", "{root}/bench_latin", "--store", "{store}",
                                   "--out", "{root}/e"], ["bench_latin/test_q.json", "UTF-8"]),
    ("eval: unknown mode", ["eval", "{export}", "--benchmark", "{root}/bench_ok", "--store", "{store}",
                            "--out", "{root}/e", "--mode", "xyz"], ["'xyz'", "--mode"]),
    ("eval: missing store", ["eval", "{export}", "--benchmark", "{root}/bench_ok", "--store", "{root}/nope.zarr",
                             "--out", "{root}/e"], ["nope.zarr", "--store"]),
    ("eval-finalize: missing dir", ["eval-finalize", "{root}/nope"], ["nope", "--out"]),
    ("eval-manifest: a file, not a dir", ["eval-manifest", "{data}", "{root}/m.jsonl"], ["task.json", "--benchmark"]),
    ("eval-manifest: no videos", ["eval-manifest", "{root}/bench_ok", "{root}/m.jsonl"], ["bench_ok", "--video-dir"]),
    ("analyze: missing file", ["analyze", "{root}/nope.jsonl", "--out", "{root}/p"], ["nope.jsonl", "merv eval"]),
    ("analyze: non-UTF-8 file", ["analyze", "{root}/latin1.json", "--out", "{root}/p"], ["latin1.json", "UTF-8"]),
    ("analyze: not prediction rows", ["analyze", "{root}/obj.json", "--out", "{root}/p"], ["obj.json", "question_id"]),
    ("analyze: compare without label", ["analyze", "{root}/obj.json", "--out", "{root}/p", "--compare", "nolabel"],
     ["nolabel", "--compare"]),
    ("generate: checkpoint is empty", ["generate", "{root}/text.mp4", "what?", "--checkpoint", "{root}/emptydir"],
     ["emptydir", "RUN/export"]),
    ("generate: checkpoint is missing", ["generate", "{root}/text.mp4", "what?", "--checkpoint", "{root}/nope"],
     ["nope", "no such file"]),
    ("generate: unknown size", ["generate", "{root}/text.mp4", "what?", "--checkpoint", "{export}", "--size", "huge"],
     ["'huge'", "--size"]),
    ("generate: missing video", ["generate", "{root}/nope.mp4", "what?", "--checkpoint", "{export}"],
     ["nope.mp4", "no such file"]),
    ("generate: video is a directory", ["generate", "{root}/emptydir", "what?", "--checkpoint", "{export}"],
     ["emptydir", "directory"]),
    ("generate: fsspec backend missing", ["generate", "gs://bucket/v.mp4", "what?", "--checkpoint", "{export}"],
     ["gs://bucket/v.mp4", "gcsfs"]),
    ("generate: negative temperature", ["generate", "{root}/text.mp4", "what?", "--checkpoint", "{export}",
                                        "--temperature", "-1"], ["--temperature -1.0", ">= 0"]),
    ("serve: not an export", ["serve", "{root}/emptydir"], ["emptydir", "RUN/export"]),
    ("generate: published model not cached", ["generate", "{root}/text.mp4", "what?", "--checkpoint", "merv-full"],
     ["merv-full", "hf download tyleryzhu/merv"]),
    ("convert: not an old export", ["convert", "{root}/emptydir", "{root}/out"], ["emptydir", "RUN/export"]),
    ("convert-reference: not cached", ["convert-reference", "merv-frozen", "{root}/out"],
     ["merv-frozen", "hf download tyleryzhu/merv"]),
    ("convert-reference: bad dtype", ["convert-reference", "merv-frozen", "{root}/out", "--dtype", "int4"],
     ["int4", "bfloat16"]),
    ("ablate: missing sweep", ["ablate", "{root}/nope.yaml", "--out", "{root}/a"], ["nope.yaml", "no such file"]),
    ("ablate: sweep is a list", ["ablate", "{root}/noconv.json", "--out", "{root}/a"], ["noconv.json", "mapping"]),
    ("ablate: broken YAML", ["ablate", "{root}/broken.yaml", "--out", "{root}/a"], ["broken.yaml", "YAML"]),
    ("ablate: unknown axis", ["ablate", "{root}/axes.yaml", "--out", "{root}/a"], ["axes.colour", "projector"]),
    ("ablate: unknown base key", ["ablate", "{root}/base.yaml", "--out", "{root}/a"], ["base.learning_rate", "merv train"]),
    ("ablate: benchmark checked before training", ["ablate", "{root}/bench.yaml", "--out", "{root}/a"],
     ["bench_noq", "test_q.json", "test_a.json"]),
    ("roundtrip: out is a file", ["roundtrip", "--out", "{data}"], ["task.json", "--out"]),
    ("roundtrip: output path is not a store", ["roundtrip", "--out", "{root}/rt"], ["rt/roundtrip.zarr", "--out"]),
    ("demo: too few videos", ["demo", "--out", "{root}/d", "--videos", "1"], ["--videos 1", "at least 2"]),
]


@pytest.mark.parametrize("argv, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_naming_input_and_fix(fx: dict[str, Path], argv: list[str], expected: list[str]) -> None:
    args = [a.format(**{k: str(v) for k, v in fx.items()}) for a in argv]
    result = CliRunner().invoke(cli.app, args)
    assert result.exit_code == 2, (result.output, result.exception)
    line = one_error_line(result.output)
    for text in expected:
        assert text in line, (text, line)


def test_missing_encoder_weights_name_the_download_command_and_flags(fx: dict[str, Path]) -> None:
    env = {"HF_HUB_CACHE": str(fx["root"] / "empty-cache"), "HF_HUB_OFFLINE": "1"}
    manifest = fx["root"] / "m1.jsonl"
    manifest.write_text(json.dumps({"id": "a", "path": "a.mp4"}) + "\n")
    for args in (["extract", str(manifest), "--store", str(fx["root"] / "w.zarr"), "--encoders", "dinov2"],
                 ["generate", str(fx["root"] / "text.mp4"), "what?", "--checkpoint", str(fx["export"]), "--size", "paper"]):
        result = CliRunner(env=env).invoke(cli.app, args)
        assert result.exit_code == 2, (result.output, result.exception)
        line = one_error_line(result.output)
        assert "hf download timm/vit_large_patch14_reg4_dinov2.lvd142m --local-dir" in line
        assert "--weights" in line and "--allow-download" in line
        assert "weights=" not in line and "allow_download" not in line  # CLI flags, not Python arguments


def test_demo_never_deletes_a_directory_it_did_not_make(fx: dict[str, Path]) -> None:
    user_dir = fx["root"] / "user_dir"
    result = CliRunner().invoke(cli.app, ["demo", "--out", str(user_dir), "--videos", "4", "--steps", "1"])
    assert result.exit_code == 2
    line = one_error_line(result.output)
    assert str(user_dir) in line and "--force" in line
    assert (user_dir / "precious.txt").read_text() == "the user's own file\n"


def _merv(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The real console entry (`python -m merv.cli`), as a user runs it."""
    return subprocess.run([sys.executable, "-m", "merv.cli", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "MERV_DEBUG": "0", **(env or {})})


@pytest.mark.integration
def test_real_cli_prints_one_line_for_an_undecodable_video(fx: dict[str, Path]) -> None:
    done = _merv("generate", str(fx["root"] / "text.mp4"), "what?", "--checkpoint", str(fx["export"]))
    assert done.returncode == 2 and done.stdout == ""
    line = one_error_line(done.stderr)  # no decoder log lines, no model-loading progress before it
    assert "text.mp4" in line and "video file" in line


def test_debug_shows_the_traceback(fx: dict[str, Path]) -> None:
    quiet = _merv("store", "info", str(fx["root"] / "nope.zarr"))
    assert quiet.returncode == 2 and "Traceback" not in quiet.stderr
    assert one_error_line(quiet.stderr).startswith("error: no feature store at")
    loud = _merv("--debug", "store", "info", str(fx["root"] / "nope.zarr"))
    assert loud.returncode != 0 and "Traceback" in loud.stderr and "StoreNotFoundError" in loud.stderr


@pytest.mark.integration
def test_object_store_urls_that_cannot_be_reached_are_one_line(fx: dict[str, Path]) -> None:
    """A closed endpoint, and a protocol whose fsspec backend is not installed: the URL and the fix."""
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_MAX_ATTEMPTS": "1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    closed = _merv("store", "info", "s3://bucket/features.zarr", env=env)
    assert closed.returncode == 2 and "Traceback" not in closed.stderr
    line = one_error_line(closed.stderr)
    assert "s3://bucket/features.zarr" in line and "AWS_ENDPOINT_URL" in line and "EndpointConnectionError" in line
    if importlib.util.find_spec("gcsfs") is None:
        missing = _merv("store", "info", "gs://bucket/features.zarr")
        assert missing.returncode == 2 and "merv[gcs]" in one_error_line(missing.stderr)
