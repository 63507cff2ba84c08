"""The FSDP trainer: 1 vs 2 processes, kill + resume, learning, encoder subsets, bad configs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from testkit import tasks
from testkit.threads import one_thread  # noqa: F401  (module fixture: torch on one thread)
from typer.testing import CliRunner

from merv.cli import app
from merv.store import UnknownEncoderError
from merv.train.configurable import ConfigError
from merv.train.data import MissingFeaturesError
from merv.train.export import load_merv
from merv.train.metrics import read_metrics
from merv.train.recipes import get_recipe
from merv.train.trainer import TrainConfigError, train

pytestmark = pytest.mark.integration  # Ray / several processes / servers: not in `make test-fast`

MERV = [sys.executable, "-m", "merv.cli"]


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> tuple[str, str]:
    return tasks.make_task(tmp_path_factory.mktemp("task"))


def _cli(args: list[str]) -> None:
    """`merv train ... --quiet` through typer's runner, which must succeed: the command's own parsing
    and run without the seconds of imports each `python -m merv.cli` costs (the run that is killed
    gets a process of its own; `--nproc 2` still starts torchrun and its two processes)."""
    result = CliRunner().invoke(app, ["train", *args, "--quiet"])
    assert result.exit_code == 0, (result.output, result.exception)


def _one_per_step(path: Path) -> dict[int, dict]:
    """Metrics by step; a resumed run drops the rows of the steps it redoes, so each step has one."""
    rows = read_metrics(path)
    steps = [m["step"] for m in rows]
    assert len(steps) == len(set(steps)), f"duplicated metrics rows: {steps}"
    return {m["step"]: m for m in rows}


def test_two_gloo_processes_match_one_process(task, tmp_path):
    data, store = task
    common = ["--data", data, "--store", store, "--max-steps", "4", "--global-batch-size", "8", "--no-export"]
    _cli([*common, "--out", str(tmp_path / "one"), "--micro-batch-size", "2"])
    _cli([*common, "--out", str(tmp_path / "two"), "--micro-batch-size", "4", "--nproc", "2"])
    a = [m["loss"] for m in read_metrics(tmp_path / "one" / "metrics.jsonl")]
    b = [m["loss"] for m in read_metrics(tmp_path / "two" / "metrics.jsonl")]
    assert len(a) == len(b) == 4
    assert a[-1] < a[0]  # it trains
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-5


def test_killed_run_resumes_exactly(task, tmp_path):
    data, store = task
    common = ["--data", data, "--store", store, "--max-steps", "8", "--global-batch-size", "4",
              "--micro-batch-size", "2", "--checkpoint-every", "2", "--no-export"]
    _cli([*common, "--out", str(tmp_path / "full")])
    run = tmp_path / "killed"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}  # as this process (one_thread)
    proc = subprocess.Popen([*MERV, "train", *common, "--out", str(run), "--quiet"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = run / "checkpoints" / "latest"
    deadline = time.time() + 240
    while time.time() < deadline and not (latest.exists() and latest.read_text().strip() >= "step-00000004"):
        if proc.poll() is not None:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed_from = latest.read_text().strip()
    assert resumed_from < "step-00000008", "the run finished before it could be killed"
    _cli([*common, "--out", str(run), "--resume"])
    want = _one_per_step(tmp_path / "full" / "metrics.jsonl")
    got = _one_per_step(run / "metrics.jsonl")
    assert sorted(got) == sorted(want) == list(range(1, 9))
    for step in range(1, 9):
        assert got[step]["ids_rank0"] == want[step]["ids_rank0"], step
        assert got[step]["loss"] == want[step]["loss"], step
        assert got[step]["lr"] == want[step]["lr"], step


def test_loss_falls_clearly_on_a_learnable_task(task, tmp_path):
    summary = train(tasks.run_config(task, tmp_path / "learn", {
        "schedule.max_steps": 200, "loader.global_batch_size": 8, "loader.micro_batch_size": 8, "optim.lr": 3e-3,
        "schedule.warmup_ratio": 0.05, "checkpoint.every": 0}))
    losses = summary["losses"]
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.5 and last < first / 8, (first, last)
    import torch.distributed as dist

    assert not dist.is_initialized()  # the group of one it started is gone: the next in-process job starts clean
    # the export loads as a plain MervModel and answers from features
    model = load_merv(summary["export"])
    assert model.connector.names == list(get_recipe("tiny").model.encoders)  # the reference's fusion order


def test_three_encoder_subset_of_a_four_encoder_store(task, tmp_path):
    summary = train(tasks.run_config(task, tmp_path / "sub", {
        "schedule.max_steps": 2, "loader.global_batch_size": 4, "model.encoders": ["dinov2", "siglip", "vivit"]}))
    model = load_merv(summary["export"])
    assert model.connector.names == ["dinov2", "siglip", "vivit"]
    metrics = read_metrics(tmp_path / "sub" / "metrics.jsonl")
    assert {"loss", "lr", "grad_norm", "samples_per_s", "tokens_per_s", "data_wait_frac"} <= set(metrics[0])


def test_bad_configurations_fail_clearly(task, tmp_path):
    data, _store = task

    def config(**changes):
        return tasks.run_config(task, tmp_path / "bad", {
            "schedule.max_steps": 1, "loader.global_batch_size": 4, "checkpoint.export": False, **changes})

    with pytest.raises(ConfigError, match="not a square"):  # refused when the config is built
        config(**{"model.connector.tokens_per_frame": 60})
    with pytest.raises(UnknownEncoderError, match="hiera"):
        train(config(**{"model.encoders": ["dinov2", "hiera"]}))
    with pytest.raises(ConfigError, match="micro-batches of 3"):
        train(config(**{"loader.micro_batch_size": 3}))
    with pytest.raises(ValueError, match="tokens|grid|frames"):  # 4x4 grid < 8x8
        train(config(**{"model.connector.projector": "avg2d", "model.connector.tokens_per_frame": 64,
                        "data.pool_at_load": False}))
    with pytest.raises(TrainConfigError, match=r"no answer tokens: --max-length 6 truncated .*task.json.*raise --max-length"):
        train(config(**{"model.llm.max_length": 6}))
    records = json.loads(Path(data).read_text()) + [
        {"id": "ghost-1", "video": "ghost-1.mp4", "conversations": [{"from": "human", "value": "<video>\nhi"},
                                                                   {"from": "gpt", "value": "red"}]}]
    extra = tmp_path / "with_missing.json"
    extra.write_text(json.dumps(records))
    with pytest.raises(MissingFeaturesError, match="ghost-1"):
        train(config(**{"data.files": [str(extra)]}))
    ok = train(config(**{"data.files": [str(extra)], "data.allow_missing": True}))
    assert ok["steps"] == 1
