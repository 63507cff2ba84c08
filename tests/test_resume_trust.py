"""Trustworthy checkpoints and resume: no pickle, integrity, no silent restart, no silent config mix,
one metrics row per step, graceful SIGTERM with one or two ranks.

Real code paths: real DCP saves / loads through `train()`; `merv train` through typer's runner where
its exit status and one-line message matter, and `python -m merv.cli train` in a process of its own
where a signal is sent to it.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
import yaml
from testkit import tasks
from testkit.threads import one_thread  # noqa: F401  (module fixture: torch on one thread)
from typer.testing import CliRunner, Result

from merv.cli import app
from merv.train.config import FLAT_KEYS, RunConfig
from merv.train.configurable import dotted_keys
from merv.train.metrics import drop_rows_after, read_metrics
from merv.train.resume import CheckpointError, ResumeError, classify_key, flatten_config
from merv.train.trainer import CONFIG_KEY_CLASSES, train

pytestmark = pytest.mark.integration  # Ray / several processes / servers: not in `make test-fast`

MERV = [sys.executable, "-m", "merv.cli", "train"]
BASE = {"max_steps": 4, "global_batch_size": 4, "micro_batch_size": 2, "checkpoint_every": 2, "export": False}
STEP2, STEP4 = "step-00000002", "step-00000004"
SHARD = "dcp/shard-00001-model-00001-of-00001.safetensors"
RNG = "rng/rank-00000.safetensors"
STATE = "trainer_state.json"


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> tuple[str, str]:
    return tasks.make_task(tmp_path_factory.mktemp("task"))


@pytest.fixture(scope="module")
def base_run(task, tmp_path_factory) -> Path:
    """A finished 4-step run with checkpoints at steps 2 and 4 (`latest` -> step 4)."""
    out = tmp_path_factory.mktemp("base") / "run"
    train(_config(task, out))
    return out


def _config(task: tuple[str, str], out: Path, **flags) -> RunConfig:
    """The tiny run of `task` in `out`, with changes named by the CLI's shorthand flags (FLAT_KEYS)."""
    return tasks.run_config(task, out, {FLAT_KEYS[k]: v for k, v in {**BASE, **flags}.items()})


def _copy(base_run: Path, dest: Path, drop: tuple[str, ...] = ()) -> Path:
    """A copy of the base run without the checkpoints in `drop` (`latest` fixed up to the newest left)."""
    shutil.copytree(base_run, dest)
    for name in drop:
        shutil.rmtree(dest / "checkpoints" / name)
    left = sorted(p.name for p in (dest / "checkpoints").glob("step-*"))
    (dest / "checkpoints" / "latest").write_text(left[-1])
    return dest


def _steps(run: Path) -> dict[int, dict]:
    """Metrics rows by step, asserting that no step has two rows."""
    rows = read_metrics(run / "metrics.jsonl")
    steps = [r["step"] for r in rows]
    assert len(steps) == len(set(steps)), f"duplicated metrics rows: {steps}"
    return {r["step"]: r for r in rows}


def _same_training(got: dict[int, dict], want: dict[int, dict], steps: range) -> None:
    assert sorted(got) == sorted(want) == list(steps)
    for step in steps:
        assert got[step]["ids_rank0"] == want[step]["ids_rank0"], step
        assert got[step]["loss"] == want[step]["loss"], step
        assert got[step]["lr"] == want[step]["lr"], step


def _flip_byte(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if offset is None else offset
    data[i] ^= 0x01
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _resign(ckpt: Path, name: str) -> None:
    """What an attacker controlling the directory does: make the manifest vouch for the new bytes."""
    manifest = json.loads((ckpt / "manifest.json").read_text())
    data = (ckpt / name).read_bytes()
    manifest["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (ckpt / "manifest.json").write_text(json.dumps(manifest))


class _Payload:
    """Unpickling this creates the marker file (what a real attack would do with os.system)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _cli_in_process(args: list[str]) -> Result:
    """`merv train` through typer's runner: the command's own parsing, run and one-line error
    reporting, without the seconds of imports each `python -m merv.cli` costs. A process of its own
    is started only where a signal is sent to the command (`_stop_with_sigterm`); `--nproc 2`
    still starts torchrun and its two processes."""
    return CliRunner().invoke(app, ["train", *args, "--quiet"])


def _cli_refusal(args: list[str]) -> str:
    """`merv train` that must refuse: exit status 2 and the one error line."""
    result = _cli_in_process(args)
    assert result.exit_code == 2, (result.output, result.exception)
    return _one_error_line(result.stderr)


def _cli_args(task: tuple[str, str], out: Path, **kw: object) -> list[str]:
    data, store = task
    opts = {"max-steps": 4, "global-batch-size": 4, "micro-batch-size": 2, "checkpoint-every": 2, **kw}
    return ["--data", data, "--store", store, "--out", str(out), "--no-export",
            *[x for k, v in opts.items() for x in (f"--{k}", str(v))]]


def _one_error_line(stderr: str) -> str:
    """The CLI's one-line error (and no traceback)."""
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


# ----------------------------------------------------------------------------- 1. no pickle


def test_resume_never_unpickles_any_checkpoint_file(task, base_run, tmp_path):
    marker = tmp_path / "PWNED"
    payload = pickle.dumps(_Payload(marker))
    pickle.loads(payload)  # the payload works: unpickling it creates the marker ...
    assert marker.exists()
    marker.unlink()  # ... so its absence below means nothing unpickled it
    ckpt_files = sorted(p.relative_to(base_run / "checkpoints" / STEP4).as_posix()
                        for p in (base_run / "checkpoints" / STEP4).rglob("*") if p.is_file())
    assert ckpt_files == sorted([SHARD, RNG, STATE, "manifest.json"])
    planted = [".metadata", "dcp/.metadata", "dcp/__0_0.distcp"]  # where torch's default storage looks
    case = 0
    for name in ckpt_files + planted:
        for resign in (False, True):
            if resign and name == "manifest.json":
                continue
            case += 1
            run = _copy(base_run, tmp_path / f"case{case}", drop=(STEP2,))
            ckpt = run / "checkpoints" / STEP4
            (ckpt / name).write_bytes(payload)
            if resign:
                _resign(ckpt, name)
            if resign and name in planted:  # vouched for, but never opened: resume works
                assert train(_config(task, run, resume=True))["steps"] == 4
            else:
                with pytest.raises(CheckpointError) as err:
                    train(_config(task, run, resume=True))
                message = str(err.value)
                assert str(ckpt / name) in message, (name, resign, message)
                assert "\n" not in message
            assert not marker.exists(), f"{name} (re-signed: {resign}) was unpickled"
    # the command line: exit status 2, one line naming the file, no traceback
    run = _copy(base_run, tmp_path / "cli", drop=(STEP2,))
    (run / "checkpoints" / STEP4 / ".metadata").write_bytes(payload)
    assert str(run / "checkpoints" / STEP4 / ".metadata") in _cli_refusal([*_cli_args(task, run), "--resume"])
    assert not marker.exists()


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # the old format is written in one process
def test_an_old_pickled_checkpoint_is_refused_with_the_reason(task, base_run, tmp_path):
    run = tmp_path / "old"
    ckpt = run / "checkpoints" / STEP2
    dcp.save({"model": {"w": torch.zeros(3)}}, checkpoint_id=str(ckpt))  # the old default storage
    (run / "checkpoints" / "latest").write_text(STEP2)
    assert (ckpt / ".metadata").exists()
    marker = tmp_path / "PWNED"
    (ckpt / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(ResumeError, match=r"older merv .*\.metadata file is a pickle.*can run arbitrary code"):
        train(_config(task, run, resume=True))
    assert not marker.exists()
    dcp.FileSystemReader(str(ckpt)).read_metadata()  # what the old resume did: it runs the payload
    assert marker.exists()


# ----------------------------------------------------------------------------- 2. integrity


def test_a_damaged_checkpoint_file_is_named(task, base_run, tmp_path):
    for name in (SHARD, RNG, STATE):
        for damage, expect in ((_truncate, "is truncated"), (_flip_byte, "is damaged: its sha256 differs")):
            run = _copy(base_run, tmp_path / f"{damage.__name__}-{name.replace('/', '_')}", drop=(STEP2,))
            path = run / "checkpoints" / STEP4 / name
            damage(path)
            with pytest.raises(ResumeError) as err:
                train(_config(task, run, resume=True))
            message = str(err.value)
            assert f"{path} {expect}" in message and "\n" not in message, message
    # the manifest is written last: a save killed before it leaves an incomplete checkpoint
    run = _copy(base_run, tmp_path / "unfinished", drop=(STEP2,))
    (run / "checkpoints" / STEP4 / "manifest.json").unlink()
    with pytest.raises(ResumeError, match=r"step-00000004 is incomplete \(no manifest.json"):
        train(_config(task, run, resume=True))
    # the command line: one line, exit status 2
    run = _copy(base_run, tmp_path / "cli", drop=(STEP2,))
    _flip_byte(run / "checkpoints" / STEP4 / RNG, offset=200)
    assert f"{run / 'checkpoints' / STEP4 / RNG} is damaged" in _cli_refusal([*_cli_args(task, run), "--resume"])


# ----------------------------------------------------------------------------- 3. never restart silently


def test_resume_falls_back_to_the_newest_verified_checkpoint_and_says_so(task, base_run, tmp_path, capsys):
    want = _steps(base_run)
    # no `latest`, and the newest checkpoint damaged: step 2 it is, and the run says why
    run = _copy(base_run, tmp_path / "nolatest")
    (run / "checkpoints" / "latest").unlink()
    _flip_byte(run / "checkpoints" / STEP4 / SHARD)
    capsys.readouterr()
    summary = train(_config(task, run, resume=True))
    note = capsys.readouterr().err
    assert f"resuming from {run / 'checkpoints' / STEP2}, the newest complete, verified checkpoint" in note
    assert f"{run / 'checkpoints' / 'latest'} is missing" in note and f"{run / 'checkpoints' / STEP4 / SHARD}" in note
    assert summary["trained_steps"] == 2
    _same_training(_steps(run), want, range(1, 5))  # steps 3-4 redone exactly, their old rows replaced
    assert (run / "checkpoints" / "latest").read_text() == STEP4
    # `latest` names an incomplete checkpoint (killed before its manifest)
    run = _copy(base_run, tmp_path / "incomplete")
    (run / "checkpoints" / STEP4 / "manifest.json").unlink()
    assert train(_config(task, run, resume=True))["trained_steps"] == 2
    assert f"{run / 'checkpoints' / STEP4} is incomplete" in capsys.readouterr().err
    _same_training(_steps(run), want, range(1, 5))


def test_nothing_usable_is_refused_and_resume_auto_starts_fresh_only_when_there_is_nothing(task, base_run, tmp_path,
                                                                                           capsys):
    run = _copy(base_run, tmp_path / "damaged")
    _flip_byte(run / "checkpoints" / STEP4 / STATE)
    _truncate(run / "checkpoints" / STEP2 / RNG)
    metrics_before = (run / "metrics.jsonl").read_bytes()
    for mode in (True, "auto"):  # damaged checkpoints are never silently replaced by a fresh run
        with pytest.raises(ResumeError, match="no complete, verified checkpoint") as err:
            train(_config(task, run, resume=mode))
        assert str(run / "checkpoints" / STEP4 / STATE) in str(err.value)
        assert str(run / "checkpoints" / STEP2 / RNG) in str(err.value)
    assert (run / "metrics.jsonl").read_bytes() == metrics_before
    assert (run / "checkpoints" / "latest").read_text() == STEP4
    # a fresh run does not overwrite an earlier run's checkpoints either
    with pytest.raises(ResumeError, match="already holds checkpoints"):
        train(_config(task, _copy(base_run, tmp_path / "again")))
    # an empty run directory: --resume refuses, --resume-auto starts fresh
    empty = tmp_path / "empty"
    with pytest.raises(ResumeError, match="--resume: no checkpoint in"):
        train(_config(task, empty, resume=True))
    assert not (empty / "config.yaml").exists()
    capsys.readouterr()
    assert train(_config(task, empty, resume="auto"))["trained_steps"] == 4
    assert "starting fresh (--resume-auto)" in capsys.readouterr().err
    _same_training(_steps(empty), _steps(base_run), range(1, 5))
    assert "--resume: no checkpoint in" in _cli_refusal([*_cli_args(task, tmp_path / "empty-cli"), "--resume"])


def test_metrics_rows_after_the_resumed_step_are_dropped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": s / 10}) + "\n" for s in range(1, 7)) + '{"step": 7, "lo')
    assert drop_rows_after(path, 4) == 3  # steps 5, 6 and the torn row of a killed write
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3, 4]
    assert drop_rows_after(path, 4) == 0


# ----------------------------------------------------------------------------- 4. never mix configs silently


def test_every_config_key_is_classified(base_run):
    state = json.loads((base_run / "checkpoints" / STEP4 / STATE).read_text())
    resolved = state["resolved_config"]
    keys = set(flatten_config(resolved)) | set(dotted_keys(RunConfig))
    assert [k for k in sorted(keys) if classify_key(k, CONFIG_KEY_CLASSES) == "unclassified"] == []
    assert resolved["optim"]["lr"] == 1e-3 and resolved["model"]["encoders"]  # recipe values filled in
    assert resolved["derived"] == {"pool_at_load": True, "num_examples": 32, "total_steps": 4, "world_size": 1,
                                   "activation_checkpointing": False}
    # the checkpoint records the run's config.yaml, plus what it came to
    assert {k: v for k, v in resolved.items() if k != "derived"} == yaml.safe_load((base_run / "config.yaml").read_text())
    # a key the table does not name is significant (refused on resume), whole sections included
    for new_key in ("optim.new_knob", "checkpoint.new_knob", "logging.new_knob", "derived.new_value"):
        assert classify_key(new_key, CONFIG_KEY_CLASSES) == "unclassified", new_key


def test_a_changed_configuration_is_refused_unless_allowed_and_then_recorded(task, base_run, tmp_path, capsys):
    run = _copy(base_run, tmp_path / "run", drop=(STEP4,))
    config_yaml = (run / "config.yaml").read_bytes()
    encoders = json.loads((run / "checkpoints" / STEP2 / STATE).read_text())["resolved_config"]["model"]["encoders"]
    subset = ["dinov2", "siglip", "vivit"]
    refused = (({"lr": 2e-3}, "optim.lr 0.001 -> 0.002 (optimisation)"),
               ({"seed": 1}, "seed 0 -> 1 (data order)"),
               ({"encoders": subset}, f"model.encoders {encoders} -> {subset} (model)"))
    for change, listed in refused:
        with pytest.raises(ResumeError) as err:
            train(_config(task, run, resume=True, **change))
        assert listed in str(err.value) and "--allow-config-change" in str(err.value)
    with pytest.raises(ResumeError, match="differs.*optim.lr 0.001 -> 0.002 .*; seed 0 -> 1 "):  # all differences listed
        train(_config(task, run, resume=True, lr=2e-3, seed=1))
    # a model whose weights do not fit cannot resume even when allowed
    with pytest.raises(ResumeError, match="holds another model"):
        train(_config(task, run, resume=True, encoders=subset, allow_config_change=True))
    assert (run / "config.yaml").read_bytes() == config_yaml  # never rewritten by a refused resume
    assert len(_steps(run)) == 4
    # allowed: continues with the new lr at step 3, and the run records what changed when
    capsys.readouterr()
    train(_config(task, run, resume=True, lr=2e-3, allow_config_change=True))
    assert "changed configuration (--allow-config-change)" in capsys.readouterr().err
    record = [{"step": 2, "changes": {"optim.lr": {"kind": "optimisation", "old": 1e-3, "new": 2e-3}}}]
    assert json.loads((run / "config_changes.json").read_text()) == record
    assert json.loads((run / "checkpoints" / STEP4 / STATE).read_text())["config_changes"] == record
    assert yaml.safe_load((run / "config.yaml").read_text())["optim"]["lr"] == 2e-3
    got, old = _steps(run), _steps(base_run)
    assert got[2]["lr"] == old[2]["lr"] and got[3]["lr"] == pytest.approx(2 * old[3]["lr"], rel=1e-12)


def test_a_harmless_change_resumes_without_a_record(task, base_run, tmp_path):
    run = _copy(base_run, tmp_path / "run", drop=(STEP4,))
    train(_config(task, run, resume=True, checkpoint_every=1, micro_batch_size=4))  # saves more often, no accumulation
    assert not (run / "config_changes.json").exists()
    got, want = _steps(run), _steps(base_run)
    assert [got[s]["ids_rank0"] for s in range(1, 5)] == [want[s]["ids_rank0"] for s in range(1, 5)]
    assert max(abs(got[s]["loss"] - want[s]["loss"]) for s in range(1, 5)) < 1e-5


# ----------------------------------------------------------------------------- 8. graceful stop


def _wait_for_rows(run: Path, proc: subprocess.Popen, rows: int, timeout: float = 240) -> None:
    metrics = run / "metrics.jsonl"
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= rows:
            return
        time.sleep(0.05)
    raise AssertionError(f"the run did not log {rows} steps (exit status {proc.poll()})")


def _children(pid: int) -> list[int]:
    return [int(c) for tid in os.listdir(f"/proc/{pid}/task")
            for c in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()]


def _rank_pid(parent: int, rank: int) -> int:
    """The torchrun worker of `rank` under the `merv train --nproc` process `parent`."""
    for torchrun in _children(parent):
        for pid in _children(torchrun):
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            if f"RANK={rank}".encode() in env:
                return pid
    raise AssertionError(f"no worker of rank {rank} under {parent}")


def _stop_with_sigterm(args: list[str], run: Path, pick=lambda proc: proc.pid) -> tuple[int, str]:
    """Start a CLI run, SIGTERM the process `pick` chooses after 2 steps; (stopped step, stderr)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}  # as this process (one_thread)
    proc = subprocess.Popen([*MERV, *args, "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    try:
        _wait_for_rows(run, proc, 2)
        os.kill(pick(proc), signal.SIGTERM)
        _out, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    line = _one_error_line(err)
    found = re.search(r"stopped by SIGTERM after step (\d+) of (\d+): checkpoint (\S+) written; continue with the same "
                      r"command plus --resume$", line)
    assert found, line
    step = int(found.group(1))
    assert 2 <= step < int(found.group(2)) and found.group(3) == str(run / "checkpoints" / f"step-{step:08d}")
    return step, err


SIGTERM_STEPS = 8  # room for the signal to land before the last step


@pytest.fixture(scope="module")
def uninterrupted(task, tmp_path_factory) -> dict[int, dict]:
    """Metrics of the SIGTERM tests' run trained without interruption (one process)."""
    want = tmp_path_factory.mktemp("uninterrupted") / "run"
    train(_config(task, want, max_steps=SIGTERM_STEPS, checkpoint_every=0))
    return _steps(want)


def _resume_in_process(args: list[str]) -> None:
    again = _cli_in_process([*args, "--resume"])
    assert again.exit_code == 0, (again.output, again.exception)


def test_sigterm_checkpoints_at_a_step_boundary_and_the_resume_is_exact(task, uninterrupted, tmp_path):
    # no periodic checkpoint
    args = _cli_args(task, tmp_path / "run", **{"max-steps": SIGTERM_STEPS, "checkpoint-every": 100})
    step, _err = _stop_with_sigterm(args, tmp_path / "run")
    checkpoints = tmp_path / "run" / "checkpoints"
    assert [p.name for p in checkpoints.glob("step-*")] == [f"step-{step:08d}"]  # written because of the signal
    assert (checkpoints / "latest").read_text() == f"step-{step:08d}"
    assert sorted(_steps(tmp_path / "run")) == list(range(1, step + 1))
    _resume_in_process(args)
    _same_training(_steps(tmp_path / "run"), uninterrupted, range(1, SIGTERM_STEPS + 1))


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="finds the workers through /proc")
def test_sigterm_to_one_of_two_ranks_stops_both_at_the_same_step(task, uninterrupted, tmp_path):
    run = tmp_path / "run"
    args = [*_cli_args(task, run, **{"max-steps": SIGTERM_STEPS, "checkpoint-every": 100}), "--nproc", "2"]
    step, _err = _stop_with_sigterm(args, run, pick=lambda proc: _rank_pid(proc.pid, 1))
    ckpt = run / "checkpoints" / f"step-{step:08d}"
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and {RNG, "rng/rank-00001.safetensors"} <= set(manifest["files"])
    _resume_in_process(args)  # two ranks again (torchrun), from the two ranks' checkpoint
    got, ref = _steps(run), uninterrupted  # one process: the same steps up to float summation order
    steps = range(1, SIGTERM_STEPS + 1)
    assert sorted(got) == list(steps)
    assert max(abs(got[s]["loss"] - ref[s]["loss"]) for s in steps) < 1e-5
    assert [got[s]["lr"] for s in steps] == [ref[s]["lr"] for s in steps]
