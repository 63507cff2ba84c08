"""Scoring a merged run: correctness per row, and the open-ended match + LLM judge pass.

Accuracy: MCQ -> extracted letter == answer (malformed outputs count wrong; `reference_correct`
keeps the reference's first-character rule); open-ended -> the judge's yes / (yes + no) when judged
(metric "judge", the reference's arithmetic), else the normalised match (metric "match").
The judge runs offline over predictions.jsonl, so it works the same after an unsharded run, after
a sharded one, and when it is added to a run evaluated without it (`merv eval-finalize --judge-url`).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from .errors import EvalError
from .judge import DEFAULT_WORKERS, JudgeClient
from .match import normalized_match
from .results import read_jsonl, write_jsonl

JUDGE_KEYS = ("judge_pred", "judge_score", "judge_raw", "judge_model")


def row_correct(row: dict[str, Any], metric: str = "auto") -> bool:
    """Correctness of one row: MCQ -> the extracted letter; open-ended -> the judge's "yes" when the
    row went to a judge ("auto"; an unparseable verdict counts wrong), else the normalised match."""
    if row.get("kind") == "mcq":
        return bool(row.get("correct"))
    judged = row.get("judge_model") is not None or row.get("judge_pred") is not None
    if metric == "judge" or (metric == "auto" and judged):
        return row.get("judge_pred") == "yes"
    return bool(row.get("match"))


def score_open_ended(
    directory: str | os.PathLike[str],
    judge: JudgeClient | None = None,
    *,
    workers: int = DEFAULT_WORKERS,
) -> Path:
    """Offline scoring of merged open-ended predictions -> `scored.jsonl`.

    Recomputes the normalised match and, with a judge, asks it about every row not judged yet
    (rows of an earlier scored.jsonl with a valid verdict for the same prediction are kept: re-running
    resumes, and scoring again without a judge keeps earlier verdicts).
    """
    d = Path(directory)
    pred_path = d / "predictions.jsonl"
    if not pred_path.exists():
        raise EvalError(f"{d}: no predictions.jsonl; merge the rank files first (`merv eval-finalize OUT`)")
    rows = read_jsonl(pred_path)
    old = {str(r["question_id"]): r for r in read_jsonl(d / "scored.jsonl")} if (d / "scored.jsonl").exists() else {}
    todo = []
    for r in rows:
        r["match"] = normalized_match(r.get("pred", ""), r.get("answer", "") or "")
        prev = old.get(str(r["question_id"]))
        if prev is not None and prev.get("judge_pred") in ("yes", "no") and prev.get("pred") == r.get("pred"):
            r.update({k: prev.get(k) for k in JUDGE_KEYS})
        elif judge is not None:
            todo.append(r)
    if judge is not None and todo:
        def one(r: dict[str, Any]) -> None:
            res = judge.judge(r.get("question", ""), r.get("answer", "") or "", r.get("pred", ""))
            r.update(judge_pred=res.pred, judge_score=res.score, judge_raw=res.raw, judge_model=judge.model)
            if res.error:
                r["judge_error"] = res.error

        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            list(pool.map(one, todo))
    return write_jsonl(d / "scored.jsonl", rows)
