"""Where an evaluation's results live and how they are read: the files of `out_dir`.

  out_dir/eval_config.yaml            the resolved config of the last `merv eval` into out_dir
  out_dir/<benchmark>/<mode>/
    run.json                          what ran (benchmark path, kind, mode, question count, settings)
    rank-00000-of-00002.jsonl         per-question rows of one rank (appended as it goes; resumable)
    predictions.jsonl                 all ranks merged, in benchmark order
    scored.jsonl                      open-ended only: + normalised match / judge verdicts
    summary.json / summary.md         the run's summary
  out_dir/summary.json|md             every run's summary
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from merv.jsonl import JsonlLineError, jsonl_rows

from .errors import EvalError

log = logging.getLogger(__name__)

CONFIG_FILE = "eval_config.yaml"
RANK_FILE = re.compile(r"rank-(\d+)-of-(\d+)\.jsonl$")


def run_dir(out_dir: str | os.PathLike[str], benchmark_name: str, mode: str) -> Path:
    return Path(out_dir) / benchmark_name / mode


def run_dirs(out_dir: str | os.PathLike[str]) -> list[Path]:
    """Every run directory (one holding run.json) under out_dir."""
    return sorted(p.parent for p in Path(out_dir).glob("*/*/run.json"))


def rank_file(directory: Path, rank: int, world_size: int) -> Path:
    return directory / f"rank-{rank:05d}-of-{world_size:05d}.jsonl"


def rank_files(directory: Path, world_size: int | None = None) -> list[tuple[Path, int, int]]:
    """(path, rank, world size) of the run's rank files, optionally of one world size only."""
    out = []
    for p in sorted(directory.glob("rank-*-of-*.jsonl")):
        m = RANK_FILE.search(p.name)
        if m and (world_size is None or int(m.group(2)) == world_size):
            out.append((p, int(m.group(1)), int(m.group(2))))
    return out



def read_jsonl(path: str | os.PathLike[str], strict: bool = False) -> list[dict[str, Any]]:
    """Rows of a JSONL file; a broken line (e.g. a killed writer's last) is skipped unless strict."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise EvalError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); pass a JSONL file written by `merv eval`") from None

    def skip(lineno: int, _msg: str) -> None:
        log.warning("%s:%d: skipping a broken line", path, lineno)

    try:
        return [row for _, row in jsonl_rows(text, on_broken=None if strict else skip)]
    except JsonlLineError as exc:
        raise EvalError(f"{path}:{exc.lineno}: not valid JSON; pass a JSONL file written by `merv eval`") from None


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> Path:
    """Write rows atomically (a reader never sees half a file)."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")
    os.replace(tmp, path)
    return path


def run_rows(directory: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The final rows of a run: scored.jsonl when present, else predictions.jsonl."""
    d = Path(directory)
    for name in ("scored.jsonl", "predictions.jsonl"):
        if (d / name).exists():
            return read_jsonl(d / name)
    raise EvalError(f"{d}: neither scored.jsonl nor predictions.jsonl; pass a run directory OUT/<benchmark>/<mode> "
                    "of `merv eval` (after a sharded run, merge it first: `merv eval-finalize OUT`)")


def run_info(directory: Path) -> dict[str, Any]:
    """run.json of a run directory ({} when absent)."""
    p = directory / "run.json"
    return json.loads(p.read_text()) if p.exists() else {}
