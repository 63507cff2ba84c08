"""Plots of evaluation results (matplotlib, Agg backend, PNG), after the paper's analysis figures.

  plot_weight_distribution  fusion weight per encoder over the evaluated videos (violin + box; Fig. 5's data)
  plot_top_videos           the k videos with the highest weight for each encoder, as frame strips plus
                            the clip's average frame on the right (Fig. 5 / Fig. 11)
  plot_skill_accuracy       accuracy per pseudo-skill (benchmark x question first word) for several
                            models' result files, grouped bars (Fig. 6)

Inputs are the per-question rows `merv.pipelines.evaluate` writes (predictions.jsonl /
scored.jsonl), a path to such a file or a run directory. Fusion weights depend on the video only
(the fusion query is learned, its keys come from the visual tokens), so weights are counted once
per store sample id, not once per question.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .evaluate import EvalError, read_jsonl, row_correct, run_rows

Rows = Sequence[dict[str, Any]]
RowsLike = Rows | str | os.PathLike[str]


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def load_rows(source: RowsLike) -> list[dict[str, Any]]:
    """Rows from a list, a JSONL file, or a run directory (scored.jsonl, else predictions.jsonl).

    A path must hold `merv eval` rows: anything else is named here, before any figure is drawn.
    """
    if not isinstance(source, (str, os.PathLike)):
        return list(source)
    p = Path(source)
    if not p.exists():
        raise EvalError(f"predictions {p}: no such file or directory; {_ROWS_HINT}")
    if p.is_dir():
        runs = sorted(str(d.relative_to(p)) for d in (r.parent for r in p.glob("*/*/run.json")))
        if runs and not (p / "run.json").exists():
            raise EvalError(f"{p} is an evaluation output directory (runs: {', '.join(runs)}); pass one run, e.g. {p / runs[0]}")
        rows = run_rows(p)
    else:
        rows = read_jsonl(p, strict=True)  # a file given by hand: a broken line is an input error, not a killed writer
    _check_rows(rows, p)
    return rows


_ROWS_HINT = "pass predictions.jsonl / scored.jsonl or a run directory OUT/<benchmark>/<mode> written by `merv eval`"


def _check_rows(rows: list[Any], path: Path) -> None:
    """Every row an object with a question_id: what `merv eval` writes (a JSON list or a stray file is not)."""
    if not rows:
        raise EvalError(f"{path}: no prediction rows (no valid JSON line); {_ROWS_HINT}")
    for n, row in enumerate(rows, start=1):
        if not isinstance(row, dict) or "question_id" not in row:
            raise EvalError(f"{path}: row {n} is not a prediction row (no 'question_id'); {_ROWS_HINT}")


def video_weights(rows: RowsLike) -> tuple[list[str], list[str], np.ndarray]:
    """(sample ids, encoder names, weights (V, E)) with one row per distinct sample id."""
    seen: dict[str, dict[str, float]] = {}
    for r in load_rows(rows):
        w = r.get("fusion_weights")
        sid = str(r.get("sample_id") or r.get("video_name"))
        if w and sid not in seen:
            seen[sid] = w
    if not seen:
        raise EvalError("no fusion weights in these rows (concatenation fusions have none; evaluate a cross-attention model)")
    encoders = list(next(iter(seen.values())))
    ids = list(seen)
    return ids, encoders, np.array([[seen[i].get(e, np.nan) for e in encoders] for i in ids], dtype=np.float64)


def plot_weight_distribution(rows: RowsLike, out_png: str | os.PathLike[str], *, title: str | None = None) -> Path:
    """Violin + box plot of each encoder's fusion weight across videos; dashed line at uniform 1/E."""
    ids, encoders, w = video_weights(rows)
    plt = _plt()
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(encoders), 3.6), dpi=120)
    data = [w[:, j][~np.isnan(w[:, j])] for j in range(len(encoders))]
    pos = np.arange(1, len(encoders) + 1)
    if len(ids) > 1:
        parts = ax.violinplot(data, positions=pos, showextrema=False)
        for body, colour in zip(parts["bodies"], plt.cm.tab10.colors):
            body.set_facecolor(colour)
            body.set_alpha(0.45)
    ax.boxplot(data, positions=pos, widths=0.18, showfliers=False)
    ax.scatter(np.repeat(pos, [len(d) for d in data]) + np.random.default_rng(0).uniform(-0.06, 0.06, sum(len(d) for d in data)),
               np.concatenate(data), s=6, alpha=0.5, color="k", zorder=3)
    ax.axhline(1.0 / len(encoders), ls="--", lw=1, color="grey", label=f"uniform (1/{len(encoders)})")
    ax.set_xticks(pos, encoders)
    ax.set_ylabel("fusion weight")
    ax.set_title(title or f"Fusion weight per encoder ({len(ids)} videos)")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    return _save(fig, out_png)


def sources_from_store(store: Any) -> dict[str, dict[str, Any]]:
    """{sample id: {"path", "start", "end", "end_frame"}} from a store's sample table (where each clip came from)."""
    from merv.store import FeatureStore

    st = store if isinstance(store, FeatureStore) else FeatureStore.open(store)
    table = st.samples
    return {table.ids[i]: {"path": table.sources[i], **table.record(i).window()} for i in range(len(table))}


def sources_from_manifest(path: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """{id: {"path", window}} from an extraction manifest, read as `merv extract` reads it."""
    from merv.extract.sources import read_manifest

    return {r.id: {"path": r.source, **r.window()} for r in read_manifest(path)}


def resolve_sources(sources: Any) -> Mapping[str, Any]:
    """{sample id: source} from a mapping, a manifest file, or a store (path or FeatureStore)."""
    if isinstance(sources, Mapping):
        return sources
    if isinstance(sources, (str, os.PathLike)):
        p = Path(sources)
        if p.is_file():
            return sources_from_manifest(p)
        if "://" not in str(sources) and not p.is_dir():
            raise EvalError(f"--sources {p}: no such file or directory; pass the extraction manifest or the feature store")
        return sources_from_store(str(sources))
    return sources_from_store(sources)


def _thumb(source: Mapping[str, Any] | str | None, frames: int) -> np.ndarray | None:
    """frames sampled frames side by side plus the clip's average frame, or None when it cannot be decoded."""
    if source is None:
        return None
    from merv.extract.video import DecodeError, load_clip

    src = {"path": source} if isinstance(source, str) else dict(source)
    try:
        clip = load_clip(src["path"], frames, start=src.get("start"), end=src.get("end"), end_frame=src.get("end_frame"))
    except (DecodeError, ValueError, OSError):
        return None
    fr = clip.frames if len(clip.frames) == frames else np.repeat(clip.frames[:1], frames, axis=0)
    mean = fr.astype(np.float32).mean(axis=0).round().astype(np.uint8)
    h = fr.shape[1]
    gap = np.full((h, max(2, h // 16), 3), 255, np.uint8)
    parts: list[np.ndarray] = []
    for f in fr:
        parts += [f, gap]
    return np.concatenate(parts + [gap, mean], axis=1)


def plot_top_videos(
    rows: RowsLike,
    sources: Mapping[str, Mapping[str, Any] | str] | str | os.PathLike[str] | Any,
    out_png: str | os.PathLike[str],
    *,
    k: int = 3,
    frames: int = 4,
) -> Path:
    """For each encoder, the k videos it weighs most: `frames` frames + the average frame (right).

    sources: {sample id: path or {"path", "start", "end", "end_frame"}}, a manifest JSONL path, or a
    store (path or FeatureStore; its sample table knows each clip's file). Undecodable clips are
    drawn as a grey cell labelled "(unavailable)" rather than failing the figure.
    """
    ids, encoders, w = video_weights(rows)
    srcs = resolve_sources(sources)
    k = max(1, min(k, len(ids)))
    plt = _plt()
    cell_w = 0.9 * (frames + 1)  # inches per thumbnail strip; strips are about (frames + 1) * 1.1 wide per unit of height
    fig, axes = plt.subplots(
        len(encoders), k, figsize=(k * cell_w, len(encoders) * (cell_w / (1.1 * (frames + 1)) + 0.45) + 0.5), dpi=120, squeeze=False
    )
    cache: dict[str, np.ndarray | None] = {}
    for e, enc in enumerate(encoders):
        order = np.argsort(-np.nan_to_num(w[:, e], nan=-1.0), kind="stable")[:k]
        for c, vi in enumerate(order):
            ax = axes[e][c]
            sid = ids[vi]
            if sid not in cache:
                cache[sid] = _thumb(srcs.get(sid), frames)
            img = cache[sid]
            if img is None:
                ax.imshow(np.full((8, 8 * (frames + 1), 3), 200, np.uint8))
                label = f"{sid} (unavailable)"
            else:
                ax.imshow(img)
                label = sid
            ax.set_title(f"{label}  w={w[vi, e]:.3f}", fontsize=7)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(enc, fontsize=9)
    fig.suptitle(f"Top-{k} videos per encoder by fusion weight (right: average frame)", fontsize=9)
    fig.tight_layout()
    return _save(fig, out_png)


def skill_accuracy(rows: RowsLike, *, key: str = "skill", with_benchmark: bool = True) -> dict[str, tuple[int, float]]:
    """{task: (n, accuracy)}; task = "<benchmark>-<first word>" (or the question_type with key="question_type")."""
    groups: dict[str, list[bool]] = defaultdict(list)
    for r in load_rows(rows):
        g = str(r.get(key))
        task = f"{r.get('benchmark')}-{g}" if with_benchmark else g
        groups[task].append(row_correct(r))
    return {t: (len(v), sum(v) / len(v)) for t, v in sorted(groups.items())}


def plot_skill_accuracy(
    results: Mapping[str, RowsLike],
    out_png: str | os.PathLike[str],
    *,
    min_count: int = 1,
    key: str = "skill",
    title: str | None = None,
    chance: Mapping[str, float] | None = None,
) -> Path:
    """Grouped bars: accuracy per task (benchmark x first word) for each model (label -> rows / file / run dir).

    A task is drawn when every model has at least `min_count` questions in it (the paper draws
    tasks with more than 500). Several result files of one model may be given as a list of rows.
    `chance` ({task: accuracy}) draws a dashed line across a task's bars.
    """
    if not results:
        raise ValueError("no result files to compare")
    per_model = {label: skill_accuracy(src, key=key) for label, src in results.items()}
    tasks = sorted(set.intersection(*[{t for t, (n, _) in acc.items() if n >= min_count} for acc in per_model.values()]))
    if not tasks:
        raise EvalError(f"no task has at least {min_count} questions in every result file; compare results of the same benchmarks")
    plt = _plt()
    width = 0.8 / len(per_model)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(tasks) * max(1, len(per_model)) / 2 + 2), 3.8), dpi=120)
    x = np.arange(len(tasks))
    for m, (label, acc) in enumerate(per_model.items()):
        vals = [100 * acc[t][1] for t in tasks]
        ax.bar(x - 0.4 + width * (m + 0.5), vals, width, label=label)
    for i, task in enumerate(tasks):
        if chance and task in chance:
            ax.hlines(100 * chance[task], i - 0.45, i + 0.45, colors="k", linestyles="--", lw=1,
                      label="chance" if not any(t in chance for t in tasks[:i]) else None)
    ax.set_xticks(x, tasks, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title or "Accuracy per skill (question first word)")
    ax.legend(fontsize=8, ncol=min(len(per_model), 4))
    fig.tight_layout()
    return _save(fig, out_png)


def _save(fig: Any, out_png: str | os.PathLike[str]) -> Path:
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    _plt().close(fig)
    return out


def plot_all(
    rows: RowsLike,
    out_dir: str | os.PathLike[str],
    *,
    sources: Any = None,
    compare: Mapping[str, RowsLike] | None = None,
    k: int = 3,
    frames: int = 4,
) -> dict[str, Path]:
    """The standard figure set for one result file: weights.png, top_videos.png (with sources),
    skills.png (this file alone, or `compare` models side by side)."""
    out = Path(out_dir)
    data = load_rows(rows)
    others = {label: load_rows(src) for label, src in compare.items()} if compare else None  # bad inputs first
    srcs = resolve_sources(sources) if sources is not None else None
    written: dict[str, Path] = {}
    if any(r.get("fusion_weights") for r in data):
        written["weights"] = plot_weight_distribution(data, out / "weights.png")
        if srcs is not None:
            written["top_videos"] = plot_top_videos(data, srcs, out / "top_videos.png", k=k, frames=frames)
    written["skills"] = plot_skill_accuracy(others or {"model": data}, out / "skills.png")
    return written


__all__ = [
    "load_rows", "plot_all", "resolve_sources", "plot_skill_accuracy", "plot_top_videos", "plot_weight_distribution", "skill_accuracy",
    "sources_from_manifest", "sources_from_store", "video_weights",
]
