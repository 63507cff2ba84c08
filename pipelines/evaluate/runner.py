"""Sharded, resumable per-rank runs of one benchmark, and the merge of their rank files.

Rank r of W answers a contiguous share of the questions (`shard_bounds`; same-video questions stay
together) into its own `rank-r-of-W.jsonl`, appending as it goes. rank / world_size default to the
RANK / WORLD_SIZE environment (torchrun) or 0 / 1. A rerun keeps the rows already written with the
same settings and model (run.json records both) and answers only the rest; other settings are
refused. `merge_predictions` joins the rank files into predictions.jsonl in benchmark order.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from merv.store import FeatureStore
from merv.train.loader import split_evenly

from .answer import answer_batch, error_row
from .config import DEFAULT_MAX_NEW_TOKENS, DEFAULT_MODE, MODES, RunOptions, check_choice
from .errors import EvalError
from .features import REEXTRACT, StoreFeatures
from .formats import Benchmark, as_benchmark
from .results import rank_file, rank_files, read_jsonl, run_dir, run_info, write_jsonl


def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Contiguous [start, stop) of rank's questions (sizes differ by at most one)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise EvalError(f"rank {rank} is outside world size {world_size}")
    bounds = split_evenly(n, world_size)
    return int(bounds[rank]), int(bounds[rank + 1])


def env_rank(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """(rank, world size): the arguments, else torchrun's RANK / WORLD_SIZE, else (0, 1)."""
    def env(name: str, default: int) -> int:
        v = os.environ.get(name)
        return int(v) if v not in (None, "") else default

    return (env("RANK", 0) if rank is None else rank), (env("WORLD_SIZE", 1) if world_size is None else world_size)


@torch.no_grad()
def model_fingerprint(model: Any) -> str:
    """Short hash of every parameter's name, shape and float64 sum: tells checkpoints apart in
    run.json, so resuming never mixes rows of two models (one reduction per tensor, no copies)."""
    h = hashlib.sha1()
    for name, p in model.named_parameters():
        h.update(f"{name}:{tuple(p.shape)}:{float(torch.sum(p, dtype=torch.float64)):.9e};".encode())
    return h.hexdigest()[:16]


def run_options(options: RunOptions | None, overrides: dict[str, Any]) -> RunOptions:
    """`options` (default: RunOptions()) with keyword overrides; an unknown keyword is named."""
    names = {f.name for f in dataclasses.fields(RunOptions)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise EvalError(f"unknown evaluation option(s) {unknown}; known: {', '.join(sorted(names))}")
    opts = dataclasses.replace(options or RunOptions(), **overrides)
    opts.check()
    return opts


def _run_record(model: Any, bench: Benchmark, mode: str, opts: RunOptions) -> dict[str, Any]:
    """run.json: what ran, and every setting a resumed rank must share."""
    return {
        "benchmark": bench.name,
        "path": str(bench.root) if bench.root else None,
        "kind": bench.kind,
        "mode": mode,
        "questions": len(bench),
        "id_prefix": opts.id_prefix,
        "ll_target": opts.ll_target if mode == "loglik" else None,
        "ll_norm": opts.ll_norm if mode == "loglik" else None,
        "max_new_tokens": (opts.max_new_tokens or DEFAULT_MAX_NEW_TOKENS[bench.kind]) if mode == "generate" else None,
        "model": model_fingerprint(model),
    }


def _start(path: Path, info: dict[str, Any], my_ids: set[str], rank: int, resume: bool) -> dict[str, dict[str, Any]]:
    """Record run.json (rank 0, or the first rank there) and return the rows a resumed rank keeps;
    resuming rows written with other settings or another model is refused."""
    rdir = path.parent
    old = run_info(rdir)
    if resume and path.exists() and old:
        changed = sorted(k for k, v in info.items() if k != "path" and k in old and old[k] != v)
        if changed:
            raise EvalError(f"{path} was written with other settings ({', '.join(changed)}); use another --out directory")
    if rank == 0 or not old:
        (rdir / "run.json").write_text(json.dumps(info, indent=2))
    if not (resume and path.exists()):
        return {}
    return {str(r["question_id"]): r for r in read_jsonl(path)
            if str(r.get("question_id")) in my_ids and r.get("mode") == info["mode"] and not r.get("error")}


def run_benchmark(
    model: Any,
    benchmark: Benchmark | str | os.PathLike[str],
    store: FeatureStore | str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    mode: str = DEFAULT_MODE,
    rank: int | None = None,
    world_size: int | None = None,
    options: RunOptions | None = None,
    progress: Callable[[int, int], None] | None = None,
    **overrides: Any,
) -> Path:
    """Answer this rank's share of a benchmark; returns its rank JSONL file.

    Settings: `options` and/or keyword overrides of its fields (batch_size=4, ...). Questions whose
    clip is unreadable raise `EvalError` up front (naming them) unless `skip_missing`, which records
    them as wrong with an "error". `progress(done, total)` is called after each batch.
    """
    bench = as_benchmark(benchmark)
    opts = run_options(options, overrides)
    check_choice("mode", mode, MODES, "--mode")
    if mode == "loglik" and bench.kind != "mcq":
        raise EvalError(f"benchmark {bench.name!r} is open-ended: log-likelihood scoring needs options (use mode 'generate')")
    if model.tokenizer is None:
        raise EvalError("the model has no tokenizer; evaluation needs one to build prompts")
    rank, world_size = env_rank(rank, world_size)
    start, stop = shard_bounds(len(bench), rank, world_size)
    mine = bench.questions[start:stop]
    rdir = run_dir(out_dir, bench.name, mode)
    rdir.mkdir(parents=True, exist_ok=True)
    path = rank_file(rdir, rank, world_size)
    done = _start(path, _run_record(model, bench, mode, opts), {q.qid for q in mine}, rank, opts.resume)
    todo = [q for q in mine if q.qid not in done]

    feats = StoreFeatures(model, store, fingerprints=opts.fingerprints, check_windows=opts.check_windows)
    located = [(q, feats.locate(q, opts.id_prefix)) for q in todo]
    bad = [(q, loc) for q, loc in located if loc.problem is not None]
    if bad and not opts.skip_missing:
        clips = dict.fromkeys((loc.sample_id, loc.problem) for _, loc in bad)
        listed = "; ".join(f"{sid} ({p})" for sid, p in list(clips)[:5])
        raise EvalError(f"{len(bad)} question(s) of {bench.name!r} on {len(clips)} clip(s) have no usable features in the "
                        f"store: {listed}. Extract the benchmark's clips into that store: {REEXTRACT}")
    good = [(q, loc) for q, loc in located if loc.problem is None]
    model.eval()
    write_jsonl(path, [*done.values(), *(error_row(bench, q, loc, mode) for q, loc in bad)])  # atomic: a merge never sees less
    with path.open("a") as fh:
        for b0 in range(0, len(good), opts.batch_size):
            batch = good[b0 : b0 + opts.batch_size]
            x = feats.read([loc.store_id for _, loc in batch], model.device)
            for row in answer_batch(model, bench, batch, x, mode, opts):
                fh.write(json.dumps(row) + "\n")
            fh.flush()
            if progress is not None:
                progress(min(b0 + opts.batch_size, len(good)), len(good))
    return path


def merge_predictions(directory: str | os.PathLike[str], world_size: int | None = None) -> Path:
    """Combine the rank files of a run into `predictions.jsonl`, in benchmark order.

    Every question of the benchmark (count from run.json) must be answered exactly once across
    the rank files (a question answered by two runs with different world sizes keeps one row).
    `world_size` restricts the merge to that sharding's files.
    """
    d = Path(directory)
    files = rank_files(d, world_size)
    if not files:
        raise EvalError(f"{d}: no rank files to merge")
    sizes: dict[int, set[int]] = defaultdict(set)
    rows: dict[str, dict[str, Any]] = {}
    for p, r, w in files:
        sizes[w].add(r)
        for row in read_jsonl(p):
            rows.setdefault(str(row["question_id"]), row)
    expected = run_info(d).get("questions")
    if expected is not None and len(rows) != expected:
        lacking = {w: sorted(set(range(w)) - have) for w, have in sizes.items()}
        raise EvalError(
            f"{d}: {len(rows)} of {expected} questions answered; missing rank files per world size: "
            f"{ {w: r for w, r in lacking.items() if r} or 'none (ranks still running or resumed partially?)'}"
        )
    if expected is None:
        for w, have in sizes.items():
            if have != set(range(w)):
                raise EvalError(f"{d}: ranks {sorted(set(range(w)) - have)} of world size {w} are missing")
    ordered = sorted(rows.values(), key=lambda r: (r.get("index", 0), str(r["question_id"])))
    return write_jsonl(d / "predictions.jsonl", ordered)
