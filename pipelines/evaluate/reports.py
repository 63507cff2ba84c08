"""Summaries of runs: overall, per question type and per skill (first word); JSON and markdown.

MCQ summaries also give chance (mean 1/num_option), invalid (no letter recovered) and the
reference's first-character accuracy; open-ended ones the match accuracy and, when judged, the
judge's accuracy and mean score (`judge.judge_summary`).
"""

from __future__ import annotations

import json
import logging
import os
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .errors import EvalError
from .judge import judge_summary
from .results import run_dirs, run_rows
from .scoring import row_correct

log = logging.getLogger(__name__)


def _acc(rows: Sequence[dict[str, Any]], fn: Callable[[dict[str, Any]], bool]) -> float | None:
    return sum(bool(fn(r)) for r in rows) / len(rows) if rows else None


def _group_stats(rows: Sequence[dict[str, Any]], mcq: bool, judged: bool) -> dict[str, Any]:
    s: dict[str, Any] = {"n": len(rows), "accuracy": _acc(rows, row_correct)}
    if mcq:
        s["chance"] = sum(1.0 / max(1, int(r.get("num_option") or 1)) for r in rows) / len(rows) if rows else None
        s["invalid"] = sum(not r.get("valid") for r in rows)
    else:
        s["match_accuracy"] = _acc(rows, lambda r: bool(r.get("match")))
        if judged:
            s["judge"] = judge_summary(rows)
            s["accuracy"] = s["judge"]["accuracy"]  # the reference's yes / (yes + no) over parsed verdicts
    return s


def summarize_rows(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Overall, per question type and per skill (first word) statistics of one run's rows."""
    if not rows:
        return {"n": 0}
    mcq = rows[0].get("kind") == "mcq"
    judged = any(r.get("judge_pred") is not None or r.get("judge_model") for r in rows)
    out = _group_stats(rows, mcq, judged)
    out.update(
        benchmark=rows[0].get("benchmark"),
        kind="mcq" if mcq else "open",
        mode=rows[0].get("mode"),
        metric="letter" if mcq else ("judge" if judged else "match"),
        errors=sum(1 for r in rows if r.get("error")),
    )
    if mcq:
        out["reference_accuracy"] = _acc(rows, lambda r: bool(r.get("reference_correct")))
    for key, name in (("question_type", "by_type"), ("skill", "by_skill")):
        groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for r in rows:
            groups[str(r.get(key))].append(r)
        out[name] = {g: _group_stats(v, mcq, judged) for g, v in sorted(groups.items())}
    ws = [r["fusion_weights"] for r in rows if r.get("fusion_weights")]
    if ws:
        out["mean_fusion_weights"] = {k: sum(w[k] for w in ws) / len(ws) for k in ws[0]}
    return out


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f}"


def summary_markdown(summaries: dict[str, dict[str, dict[str, Any]]]) -> str:
    """Markdown tables: one line per benchmark x mode, then per question type and per skill."""
    lines = [
        "| benchmark | mode | metric | n | accuracy (%) | chance (%) | invalid | judge score |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for bench, modes in summaries.items():
        for mode, s in modes.items():
            judge = s.get("judge") or {}
            jscore = "-" if judge.get("score") is None else f"{judge['score']:.2f}"
            lines.append(
                f"| {bench} | {mode} | {s.get('metric', '-')} | {s.get('n', 0)} | {_pct(s.get('accuracy'))} | "
                f"{_pct(s.get('chance'))} | {s.get('invalid', '-')} | {jscore} |"
            )
    for key, title in (("by_type", "question type"), ("by_skill", "skill (first word)")):
        body = []
        for bench, modes in summaries.items():
            for mode, s in modes.items():
                if key == "by_skill" and s.get("by_skill") == s.get("by_type"):
                    continue  # types default to the first word: do not print the same table twice
                for g, gs in (s.get(key) or {}).items():
                    body.append(f"| {bench} | {mode} | {g} | {gs['n']} | {_pct(gs.get('accuracy'))} | {_pct(gs.get('chance'))} |")
        if body:
            lines += ["", f"| benchmark | mode | {title} | n | accuracy (%) | chance (%) |", "|---|---|---|---:|---:|---:|", *body]
    return "\n".join(lines) + "\n"


def summarize_run(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """Summary of one run; also written as summary.json / summary.md in its directory."""
    d = Path(directory)
    s = summarize_rows(run_rows(d))
    (d / "summary.json").write_text(json.dumps(s, indent=2))
    (d / "summary.md").write_text(summary_markdown({str(s.get("benchmark")): {str(s.get("mode")): s}}))
    return s


def summarize_results(out_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Summaries of every merged run under out_dir -> out_dir/summary.json + summary.md."""
    root = Path(out_dir)
    all_s: dict[str, dict[str, Any]] = defaultdict(dict)
    for d in run_dirs(root):
        try:
            s = summarize_run(d)
        except EvalError as exc:
            log.warning("skipping %s: %s", d, exc)
            continue
        all_s[d.parent.name][d.name] = s
    result = {"benchmarks": dict(all_s)}
    (root / "summary.json").write_text(json.dumps(result, indent=2))
    (root / "summary.md").write_text(summary_markdown(result["benchmarks"]))
    return result
