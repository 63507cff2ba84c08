"""`merv demo`: the whole product on a laptop in a few minutes.

1. generate a synthetic video QA set (coloured shapes moving in four directions),
2. extract it once with the four tiny encoders on embedded Ray into a zarr store,
3. train the tiny MERV (connector + tiny LLaMA) from the cached features only,
4. evaluate on the held-out split, accuracy per question type next to chance, and write the
   fusion-weight / skill plots. The headline set asks the training questions open-ended (one-word
   answers from a closed set, scored by normalised match, so chance is 1/4, 1/3, 1/4); the same
   questions in the reference's MCQ format can be added (`mcq=True`), though a model trained only
   on plain questions has never seen that prompt.

The encoders are random-initialised tiny versions of the real architectures, so what is learned
is what survives random features: colour and shape clearly, motion direction less so.

A demo starts from scratch: it replaces its output directory, but only one that a previous demo
made (it holds `MARKER`); any other existing directory is refused unless `force`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from merv import MervError

MARKER = ".merv-demo"  # written into the output directory the demo creates; only such a directory is replaced


class DemoError(MervError, ValueError):
    """A demo that cannot start as asked: bad settings, or an output directory it must not replace."""


@dataclass
class DemoConfig:
    out: str = "runs/demo"
    videos: int = 200
    frames: int = 16
    size: int = 64
    steps: int = 300
    tokens_per_frame: int = 16  # the tiny encoders' whole 4x4 grid: pooling to 2x2 loses the shapes
    global_batch_size: int = 16
    lr: float = 2e-3
    warmup_ratio: float = 0.05
    seed: int = 0
    mcq: bool = False  # also score the MCQ version of the test split
    eval_mode: str = "loglik"  # MCQ answering: "loglik" (option likelihood) or "generate"
    samples_per_shard: int = 16
    plots: bool = True
    force: bool = False  # replace `out` even if a demo did not make it

    def check(self) -> None:
        """Refuse settings the pipeline cannot run, before anything is written or deleted."""
        if self.videos < 2:
            raise DemoError(f"--videos {self.videos}: the demo needs at least 2 (one to train on, one to test)")
        if self.steps < 1:
            raise DemoError(f"--steps {self.steps}: the demo needs at least one training step")


@dataclass
class DemoResult:
    accuracy: dict[str, float]
    chance: dict[str, float]
    overall: float
    seconds: dict[str, float] = field(default_factory=dict)
    paths: dict[str, str] = field(default_factory=dict)


def run_demo(cfg: DemoConfig, console: Console | None = None) -> DemoResult:
    from merv.extract.job import ExtractOptions, run_extraction
    from merv.pipelines.analysis import plot_all
    from merv.pipelines.evaluate import evaluate
    from merv.pipelines.synthetic import generate_synthetic
    from merv.store.paper import PAPER_ENCODER_NAMES
    from merv.train.recipes import get_recipe
    from merv.train.trainer import train

    console = console or Console()
    cfg.check()
    out = Path(cfg.out)
    times: dict[str, float] = {}
    prepare_out_dir(out, force=cfg.force)
    t0 = time.perf_counter()
    dataset = generate_synthetic(out / "data", n_videos=cfg.videos, seed=cfg.seed, size=cfg.size, frames=cfg.frames,
                                 overwrite=True)
    root = Path(dataset.root)
    times["generate"] = time.perf_counter() - t0
    console.print(f"[bold]1/4[/] generated {cfg.videos} synthetic videos in {times['generate']:.1f}s -> {root}")

    t0 = time.perf_counter()
    store = str(out / "features.zarr")
    summary = run_extraction(str(dataset.manifest), store, ExtractOptions(
        encoders=list(PAPER_ENCODER_NAMES), size="tiny", grid="native",
        samples_per_shard=cfg.samples_per_shard), console=console)
    times["extract"] = time.perf_counter() - t0
    console.print(f"[bold]2/4[/] {summary.line()}")

    t0 = time.perf_counter()
    run = out / "train"
    result = train(get_recipe("tiny", stage="finetune").override({
        "data.files": [str(dataset.train_json)], "data.stores": [store], "checkpoint.out_dir": str(run),
        "schedule.max_steps": cfg.steps, "loader.global_batch_size": cfg.global_batch_size, "optim.lr": cfg.lr,
        "schedule.warmup_ratio": cfg.warmup_ratio, "seed": cfg.seed, "logging.tensorboard": False,
        "model.connector.tokens_per_frame": cfg.tokens_per_frame}, source="demo"))
    times["train"] = time.perf_counter() - t0
    losses = result["losses"]
    console.print(f"[bold]3/4[/] trained {result['steps']} steps from cached features in {times['train']:.1f}s; "
                  f"loss {sum(losses[:10]) / 10:.3f} -> {sum(losses[-10:]) / 10:.3f}")

    t0 = time.perf_counter()
    eval_dir = out / "eval"
    sets = [str(dataset.open_dir)] + ([str(dataset.mcq_dir)] if cfg.mcq else [])
    summaries = evaluate(result["export"], sets, store, str(eval_dir), mode=cfg.eval_mode, resume=False)
    times["evaluate"] = time.perf_counter() - t0
    bench = _summary(summaries, Path(dataset.open_dir).name)
    accuracy = {k: v["accuracy"] for k, v in bench["by_type"].items()}
    chance = dict(dataset.chance)
    table = Table("question type", "accuracy", "chance", title="held-out synthetic QA (open-ended, exact word)")
    for qtype in sorted(accuracy):
        table.add_row(qtype, f"{100 * accuracy[qtype]:.1f}%", f"{100 * chance.get(qtype, float('nan')):.1f}%")
    table.add_row("overall", f"{100 * bench['accuracy']:.1f}%", f"{100 * sum(chance.values()) / len(chance):.1f}%")
    console.print(f"[bold]4/4[/] evaluated in {times['evaluate']:.1f}s")
    console.print(table)
    paths = {"store": store, "train": str(run), "export": result["export"], "eval": str(eval_dir)}
    if cfg.plots:
        pngs = plot_all(eval_dir / Path(dataset.open_dir).name / "generate", out / "plots", sources=str(dataset.manifest))
        paths["plots"] = str(out / "plots")
        console.print(f"plots: {', '.join(str(p) for p in (pngs.values() if isinstance(pngs, dict) else pngs))}")
    console.print(f"demo done in {sum(times.values()):.0f}s: " + ", ".join(f"{k} {v:.0f}s" for k, v in times.items()))
    res = DemoResult(accuracy, chance, bench["accuracy"], times, paths)
    (out / "demo_result.json").write_text(json.dumps(res.__dict__, indent=1))
    return res


def prepare_out_dir(out: Path, force: bool = False) -> None:
    """Give the demo an empty `out` marked as its own (a demo starts from scratch; extraction alone
    would resume). An existing directory is deleted only when a demo made it (it holds MARKER) or
    with `force`; an empty one is reused; anything else is refused, so `--out ~/videos` loses nothing."""
    import shutil

    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise DemoError(f"--out {out} exists and is not a directory; pass a new directory")
    if out.is_dir() and any(out.iterdir()):
        if not (force or (out / MARKER).is_file()):
            raise DemoError(f"--out {out} already exists and was not made by `merv demo`; pass a new directory, "
                            "or --force to delete it and everything in it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("made by `merv demo`; a later `merv demo --out` here replaces this directory\n")


def _summary(summaries: dict[str, Any], benchmark: str) -> dict[str, Any]:
    """The summary of one benchmark in evaluate()'s {"benchmarks": {name: {mode: summary}}}."""
    (summary,) = summaries["benchmarks"][benchmark].values()
    return summary
