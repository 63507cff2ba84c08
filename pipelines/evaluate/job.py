"""The whole evaluation job: answer every benchmark (sharded), then merge, score and summarise.

Sharding and the judge: under torchrun (RANK / WORLD_SIZE with MASTER_ADDR / MASTER_PORT) the
ranks join a gloo group; each answers its share, they meet at a barrier, and rank 0 merges, runs
the judge on open-ended sets and writes the summaries (the other ranks return None). Ranks started
as independent processes (RANK / WORLD_SIZE only, e.g. a job array) cannot meet: each writes its
rank files and returns None, and `merv eval-finalize OUT` does the last step, with the judge of
OUT/eval_config.yaml or the one given to it. eval-finalize also adds a judge to a run evaluated
without one (earlier verdicts are kept, only unjudged rows are sent).
"""

from __future__ import annotations

import datetime as _dt
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from merv.devices import resolve_device
from merv.store import FeatureStore
from merv.train.configurable import ConfigError, dump_config, load_config, read_config_file

from .config import DEFAULT_MODE, DEFAULT_SYNC_TIMEOUT_S, MODES, EvalConfig, RunOptions, check_choice
from .errors import EvalError
from .formats import Benchmark, as_benchmark
from .judge import DEFAULT_WORKERS, JudgeClient, JudgeConfig
from .reports import summarize_results
from .results import CONFIG_FILE, run_dir, run_dirs, run_info
from .runner import env_rank, merge_predictions, run_benchmark, run_options
from .scoring import score_open_ended


def finalize_results(
    out_dir: str | os.PathLike[str],
    *,
    judge: JudgeClient | None = None,
    judge_workers: int = DEFAULT_WORKERS,
    world_size: int | None = None,
    runs: Sequence[str | os.PathLike[str]] | None = None,
) -> dict[str, Any]:
    """After all ranks finished: merge, score open-ended runs (judge optional), summarise.

    `runs` limits the merge / scoring to those run directories (default: every run under
    out_dir); the summary files always cover every merged run under out_dir.
    """
    root = Path(out_dir)
    if runs is None and not root.is_dir():
        raise EvalError(f"{root}: no such directory; pass the --out directory of `merv eval`")
    dirs = [Path(r) for r in runs] if runs is not None else run_dirs(root)
    if not dirs:
        raise EvalError(f"{root}: no benchmark runs in it (`merv eval --out DIR` writes DIR/<benchmark>/<mode>/run.json)")
    for d in dirs:
        merge_predictions(d, world_size)
        if run_info(d).get("kind") == "open":
            score_open_ended(d, judge, workers=judge_workers)
    return summarize_results(root)


@contextmanager
def rank_sync(rank: int, world_size: int, timeout_s: float) -> Iterator[Callable[[], None] | None]:
    """A barrier across the ranks of a torchrun job (a gloo group: no GPU collectives needed), or
    None when there is nothing to wait for (one process) or no way to (independent processes)."""
    import torch.distributed as dist

    if world_size <= 1 or not dist.is_available():
        yield None
        return
    timeout = _dt.timedelta(seconds=timeout_s)
    if dist.is_initialized():  # e.g. called from a distributed training job
        if dist.get_world_size() != world_size:
            raise EvalError(f"world size {world_size} differs from the process group's {dist.get_world_size()}")
        group = dist.new_group(backend="gloo", timeout=timeout)
        yield lambda: dist.barrier(group=group)
        return
    if not (os.environ.get("MASTER_ADDR") and os.environ.get("MASTER_PORT")):
        yield None
        return
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timeout)
    try:
        yield lambda: dist.barrier()
    finally:
        dist.destroy_process_group()


def _device(device: str | torch.device | None) -> torch.device | None:
    """"auto" / "cuda" -> this rank's GPU (LOCAL_RANK) when there is one; None stays None."""
    return None if device is None else resolve_device(device)


def _dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def evaluate(
    model: Any,
    benchmarks: Iterable[Benchmark | str | os.PathLike[str]],
    store: FeatureStore | str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    mode: str = DEFAULT_MODE,
    rank: int | None = None,
    world_size: int | None = None,
    judge: JudgeClient | None = None,
    judge_workers: int = DEFAULT_WORKERS,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    sync_timeout_s: float = DEFAULT_SYNC_TIMEOUT_S,
    options: RunOptions | None = None,
    progress: Callable[[int, int], None] | None = None,
    **run_kwargs: Any,
) -> dict[str, Any] | None:
    """Evaluate a model (a `MervModel` or a `save_merv` directory) on several benchmarks.

    Each rank answers its share (`run_benchmark`; settings: `options` and / or keyword overrides
    such as batch_size=4). Returns the summary where the results are complete (one process, or
    rank 0 of a torchrun job after the barrier; see the module docstring), else None. `mode`
    "loglik" applies to MCQ sets; open-ended sets always generate. `device` None keeps a model
    object where it is ("auto" for a directory).
    """
    # every input is checked before the model is loaded: a bad path fails in a second, not after minutes
    from merv.train.export import check_export, load_merv

    check_choice("mode", mode, MODES, "--mode")
    opts = run_options(options, run_kwargs)
    if isinstance(model, (str, os.PathLike)):
        check_export(model)
    benches = [as_benchmark(b) for b in benchmarks]
    if not isinstance(store, FeatureStore):
        store = FeatureStore.open(store)
    rank, world_size = env_rank(rank, world_size)
    with rank_sync(rank, world_size, sync_timeout_s) as barrier:
        if isinstance(model, (str, os.PathLike)):
            model = load_merv(model, device=_device(device or "auto"), dtype=_dtype(dtype))
        elif device is not None:
            model.to(_device(device))
        runs = []
        for bench in benches:
            m = mode if bench.kind == "mcq" else "generate"
            run_benchmark(model, bench, store, out_dir, mode=m, rank=rank, world_size=world_size, options=opts, progress=progress)
            runs.append(run_dir(out_dir, bench.name, m))
        if world_size > 1:
            if barrier is None:
                return None  # independent processes: `merv eval-finalize OUT` merges, judges, summarises
            barrier()
            if rank != 0:
                return None
        return finalize_results(out_dir, judge=judge, judge_workers=judge_workers, world_size=world_size, runs=runs)


def run_eval(cfg: EvalConfig, progress: Callable[[int, int], None] | None = None) -> dict[str, Any] | None:
    """`merv eval`: check the config and its inputs, write OUT/eval_config.yaml (rank 0), evaluate.

    `progress(done, total)` is called after each batch of each benchmark."""
    from merv.train.export import check_export

    cfg.check()
    assert cfg.checkpoint is not None and cfg.store is not None
    check_export(cfg.checkpoint)
    benches = [as_benchmark(b) for b in cfg.benchmarks]
    store = FeatureStore.open(cfg.store)
    if env_rank()[0] == 0:
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
        dump_config(cfg, Path(cfg.out) / CONFIG_FILE)
    return evaluate(cfg.checkpoint, benches, store, cfg.out, mode=cfg.mode, judge=cfg.judge.build(),
                    judge_workers=cfg.judge.workers, device=cfg.device, dtype=cfg.dtype,
                    sync_timeout_s=cfg.sync_timeout_s, options=cfg.run_options(), progress=progress)


def finalize_eval(
    out_dir: str | os.PathLike[str],
    *,
    world_size: int | None = None,
    judge: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """`merv eval-finalize`: merge, judge, summarise. The judge is OUT/eval_config.yaml's, with
    `judge` (JudgeConfig keys; None values = not given) on top."""
    root = Path(out_dir)
    if not root.is_dir():
        raise EvalError(f"{root}: no such directory; pass the --out directory of `merv eval`")
    saved = read_config_file(root / CONFIG_FILE).get("judge") if (root / CONFIG_FILE).is_file() else None
    given = {k: v for k, v in (judge or {}).items() if v is not None}
    jc = load_config(JudgeConfig, base=saved or {}, extra=given)
    if given and not jc.url:
        raise ConfigError(f"judge settings {sorted(given)} without a judge url: pass --judge-url URL")
    return finalize_results(root, judge=jc.build(), judge_workers=jc.workers, world_size=world_size)
