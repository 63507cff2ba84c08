"""Several lmms-eval command lines in ONE process: `python lmms_runs.py SPEC.json`.

Each command line goes through lmms-eval's own entry point, `lmms_eval.cli.dispatch.main` (what
`python -m lmms_eval` and the `lmms-eval` script run), with `sys.argv` set as a user's shell would.
Only the start-up is shared: importing lmms-eval (evaluate, transformers pipelines, torchvision)
costs ~12 s of CPU per process, which the tests would otherwise pay once per command line.

SPEC: {"runs": [{"name", "argv": [...], "hide": [[path, elsewhere], ...]}]}. `hide` moves files away
for that run only (e.g. the videos, to prove a run reads features from a store) and back after it.
Each run's log section starts with the line `=== lmms-eval run NAME` (stdout and stderr must be one
stream) and ends with `=== lmms-eval run NAME exit STATUS`: 0, or the failure's exit status (1 for an
exception, whose traceback is printed), so one failing run does not hide the others' results.
"""

from __future__ import annotations

import json
import shutil
import sys
import traceback
from pathlib import Path

START, END = "=== lmms-eval run {name}", "=== lmms-eval run {name} exit {status}"


def run_one(argv: list[str]) -> int:
    """lmms-eval's entry point on `argv` (without the program name); its exit status."""
    from lmms_eval.cli.dispatch import main

    sys.argv = ["lmms-eval", *argv]
    try:
        main()
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except Exception:  # noqa: BLE001 - reported in the log, the next run still goes ahead
        traceback.print_exc()
        return 1
    return 0


def main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    failed = 0
    for run in spec["runs"]:
        hidden = [(Path(src), Path(dst)) for src, dst in run.get("hide", [])]
        print(START.format(name=run["name"]), flush=True)
        for src, dst in hidden:
            shutil.move(src, dst)
        try:
            status = run_one(run["argv"])
        finally:
            for src, dst in hidden:
                shutil.move(dst, src)
        sys.stderr.flush()
        print(END.format(name=run["name"], status=status), flush=True)
        failed += status != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
