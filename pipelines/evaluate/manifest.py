"""The extraction manifest of a benchmark: one row per distinct clip (video + window), keyed by
the sample id the evaluation will look up (`formats.sample_id`); the input of `merv extract`."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from .errors import EvalError
from .formats import VIDEO_EXTS, Benchmark, as_benchmark

MISSING = ("error", "skip")


def resolve_video(video_dir: str | os.PathLike[str], video_name: str) -> Path | None:
    """`video_dir/video_name` if it exists, else the first `video_name.*` with a video extension."""
    d = Path(video_dir)
    exact = d / video_name
    if exact.exists():
        return exact
    hits = sorted(p for p in d.glob(f"{_glob_escape(video_name)}.*") if p.suffix.lower() in VIDEO_EXTS)
    return hits[0] if hits else None


def _glob_escape(s: str) -> str:
    return re.sub(r"([*?\[\]])", r"[\1]", s)


def eval_manifest(
    benchmark: Benchmark | str | os.PathLike[str],
    *,
    video_dir: str | os.PathLike[str] | None = None,
    id_prefix: str = "",
    missing: str = "error",
) -> list[dict[str, Any]]:
    """One row per distinct clip: {id, path, kind, [end_frame | start, end]}.

    missing: "error" (default) names the absent videos; "skip" leaves them out (their questions
    then fail at evaluation unless `skip_missing`).
    """
    if missing not in MISSING:
        raise EvalError(f"missing={missing!r} is unknown; use one of {MISSING}")
    bench = as_benchmark(benchmark)
    vdir = Path(video_dir) if video_dir is not None else bench.video_dir
    if vdir is None:
        raise EvalError(f"benchmark {bench.name!r}: no videos/ directory next to {bench.root}; pass --video-dir DIR")
    rows: dict[str, dict[str, Any]] = {}
    absent: list[str] = []
    for q in bench.questions:
        sid = q.sample_id(id_prefix)
        if sid in rows:
            continue
        path = resolve_video(vdir, q.video_name)
        if path is None:
            absent.append(q.video_name)
            continue
        rows[sid] = {"id": sid, "path": str(path.resolve()), "kind": "video", **q.window.to_dict()}
    if absent and missing == "error":
        raise EvalError(f"benchmark {bench.name!r}: {len(absent)} video(s) not found under {vdir}, e.g. "
                        f"{sorted(set(absent))[:5]}; pass the folder holding them with --video-dir DIR")
    return list(rows.values())


def write_eval_manifest(
    benchmark: Benchmark | str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    **kwargs: Any,
) -> Path:
    """Write `eval_manifest(...)` as JSONL for `merv extract`; returns the path."""
    rows = eval_manifest(benchmark, **kwargs)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")
    return out
