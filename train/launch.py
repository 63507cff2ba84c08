"""`merv train --nproc N`: start N local processes with torchrun on the same config.

On several nodes run torchrun yourself on a config file (e.g. `merv train ... --print-config >
run.yaml`, or a finished run's config.yaml), e.g.
  torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HEAD:29500 \\
      -m merv.train.trainer run.yaml

Stopping: torchrun runs in its own session, so Ctrl-C in the terminal reaches only this process,
which passes SIGINT / SIGTERM (SIGHUP as SIGTERM) on to the workers once. They agree on a step
boundary, checkpoint (with --checkpoint-every), report the stop through a file and exit 0 (torchrun
prints no failure report); this process then raises `TrainingStopped` with their one-line message.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .config import RunConfig

# torchrun's wait for workers after a signal it received itself (e.g. from Slurm) before SIGKILL:
# long enough for the step in flight plus a checkpoint
GRACEFUL_STOP_TIMEOUT_S = 600
STOP_REPORT = ".stop_report.json"
LAUNCH_CONFIG = "launch_config.yaml"  # the config the workers read (the run's config.yaml is theirs to write)


def _children(pid: int) -> list[int]:
    """Direct children of `pid` (Linux /proc); empty where that is not available."""
    found: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            found += [int(c) for c in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()]
    except OSError:
        return []
    return found


# what this process passes on to the workers for each signal it receives (a closed terminal: stop too)
FORWARDED = {signal.SIGINT: signal.SIGINT, signal.SIGTERM: signal.SIGTERM, signal.SIGHUP: signal.SIGTERM}


@contextmanager
def _forward_stop_signals(proc: subprocess.Popen[bytes]) -> Iterator[None]:
    """SIGINT / SIGTERM / SIGHUP to this process go to the workers (torchrun's children).

    Signalled itself, torchrun would forward the signal and then end with a traceback; where the
    workers cannot be found, it is signalled anyway (the stop stays graceful)."""
    def forward(signum: int, frame: Any) -> None:
        targets = _children(proc.pid) or [proc.pid]
        for pid in targets:
            try:
                os.kill(pid, FORWARDED[signal.Signals(signum)])
            except ProcessLookupError:
                pass

    previous = {s: signal.signal(s, forward) for s in FORWARDED}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def launch_torchrun(config: RunConfig, extra_args: list[str] | None = None) -> int:
    """Run the config on `config.parallel.nproc` local workers; returns torchrun's exit status.

    Raises TrainingStopped when the workers stopped on a signal (the status is then 128 + signal)."""
    from .configurable import dump_config
    from .trainer import STOP_REPORT_ENV, TrainingStopped

    out = Path(config.checkpoint.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg_path = out / LAUNCH_CONFIG
    dump_config(config, cfg_path)
    nproc = config.parallel.nproc
    report = out / STOP_REPORT
    report.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           f"--shutdown-timeout={GRACEFUL_STOP_TIMEOUT_S}", *(extra_args or []), "-m", "merv.train.trainer",
           str(cfg_path)]
    proc = subprocess.Popen(cmd, env={**os.environ, STOP_REPORT_ENV: str(report)}, start_new_session=True)
    with _forward_stop_signals(proc):
        code = proc.wait()
    if report.exists():
        stop = json.loads(report.read_text())
        report.unlink()
        raise TrainingStopped(str(stop["message"]), int(stop["exit_code"]))
    return code
