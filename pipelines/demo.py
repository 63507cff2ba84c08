"""`merv demo`: the whole product on a laptop in a few minutes, and why the cache and the fusion matter.

1. generate a synthetic video QA set (coloured shapes moving in four directions),
2. extract it ONCE with the four tiny encoders on embedded Ray into a zarr store,
3. train, from that one store, MERV (cross-attention fusion of the four encoders), one other fusion
   and the four single-encoder baselines: one `merv ablate` sweep, no video decoded or encoded,
4. evaluate each on the held-out split: accuracy per skill (colour, shape, direction) next to
   chance, the fusion weights per encoder, and the plots (weights, top videos, skills; accuracy
   per model and skill),
5. price the cache: extraction once plus training every model from the store (measured), against
   re-running the encoders in every training step as the reference does (a few steps measured
   with the encoders in the loop, extrapolated to every model's training, labelled so).

The headline set asks the training questions open-ended (one-word answers from a closed set, scored
by normalised match, so chance is 1/4, 1/3, 1/4); the same questions in the reference's MCQ format
can be added (`mcq=True`), though a model trained only on plain questions has never seen that prompt.
The encoders are random-initialised tiny versions of the real architectures: what a model learns is
what survives random features, and the table says where MERV does and does not beat one encoder.

A demo starts from scratch: it replaces its output directory, but only one that a previous demo
made (it holds `MARKER`); any other existing directory is refused unless `force`.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from merv import MervError
from merv.store.paper import PAPER_ENCODER_NAMES

MARKER = ".merv-demo"  # written into the output directory the demo creates; only such a directory is replaced
MERV = "base"  # the sweep's name of the MERV configuration (its base)
ENCODER_LABELS = {"dinov2": "DINOv2", "vivit": "ViViT", "siglip": "SigLIP", "languagebind": "LanguageBind"}
FUSION_LABELS = {"learnable_scalar": "scalar weights", "fixed_mix": "fixed 25% mix", "concat_channel": "concat channels",
                 "concat_sequence": "concat tokens", "cross_attention_plain": "plain cross-attn"}


class DemoError(MervError, ValueError):
    """A demo that cannot start as asked: bad settings, or an output directory it must not replace."""


@dataclass
class DemoConfig:
    out: str = "runs/demo"
    videos: int = 480
    frames: int = 16
    size: int = 64
    # the task, tuned so that every skill is learnable from random tiny encoders in a few hundred steps:
    # shapes spanning about two of their 4x4 patches, moving about half the frame, with a motion trail
    radius: tuple[float, float] = (0.17, 0.21)  # the shapes' half-extent, fraction of the frame side
    travel: tuple[float, float] = (0.45, 0.5)  # how far they move, fraction of the frame side
    trail: float = 0.25  # motion trail length, fraction of the frame side (0: none; see render_clip)
    steps: int = 400  # per model
    tokens_per_frame: int = 16  # the tiny encoders' whole 4x4 grid: pooling to 2x2 loses the shapes
    # 3D average pooling (one of the paper's projectors) to 2 time steps: 32 visual tokens instead of 256,
    # what lets six models train on 2 CPU cores in minutes; the direction is still in the two halves
    projector: str = "avg3d"
    frame_factor: int = 8  # avg3d / conv3d: frames pooled by this factor
    global_batch_size: int = 8  # 400 steps of 8 generalise better than 200 of 16 on 384 training videos
    micro_batch_size: int = 8
    lr: float = 2e-3
    warmup_ratio: float = 0.05
    seed: int = 0
    singles: tuple[str, ...] = PAPER_ENCODER_NAMES  # single-encoder baselines trained next to MERV
    fusion: str | None = "learnable_scalar"  # one other fusion of the four encoders trained next to MERV
    online_steps: int = 3  # steps timed with the encoders in the loop for the cost line (0: none)
    mcq: bool = False  # also score the MCQ version of the test split
    eval_mode: str = "loglik"  # MCQ answering: "loglik" (option likelihood) or "generate"
    samples_per_shard: int = 16
    plots: bool = True
    force: bool = False  # replace `out` even if a demo did not make it

    def check(self) -> None:
        """Refuse settings the pipeline cannot run, before anything is written or deleted."""
        from merv.pipelines.synthetic import plan_clips
        from merv.train.fusion import FUSION_KINDS

        if self.videos < 2:
            raise DemoError(f"--videos {self.videos}: the demo needs at least 2 (one to train on, one to test)")
        if self.steps < 1:
            raise DemoError(f"--steps {self.steps}: the demo needs at least one training step")
        if not 0 <= self.trail < 1:
            raise DemoError(f"trail {self.trail}: a fraction of the frame side in [0, 1)")
        if self.online_steps < 0:
            raise DemoError(f"online_steps {self.online_steps}: a count of steps (0: no online measurement)")
        if unknown := [e for e in self.singles if e not in PAPER_ENCODER_NAMES]:
            raise DemoError(f"singles {unknown}: not encoders of the demo; choose from {', '.join(PAPER_ENCODER_NAMES)}")
        if self.fusion is not None and (self.fusion not in FUSION_KINDS or self.fusion == "cross_attention"):
            raise DemoError(f"fusion {self.fusion!r}: MERV is the cross-attention; choose another of "
                            f"{', '.join(k for k in FUSION_KINDS if k != 'cross_attention')}")
        try:
            plan_clips(2, self.seed, self.size, 0.5, radius=tuple(self.radius), travel=tuple(self.travel))
        except ValueError as exc:
            raise DemoError(f"synthetic videos: {exc}") from None


@dataclass
class DemoResult:
    accuracy: dict[str, float]  # MERV's, per question type
    chance: dict[str, float]
    overall: float  # MERV's
    seconds: dict[str, float] = field(default_factory=dict)
    paths: dict[str, str] = field(default_factory=dict)
    models: dict[str, dict[str, Any]] = field(default_factory=dict)  # sweep name -> label, accuracy, overall, train_s
    weights: dict[str, dict[str, float]] = field(default_factory=dict)  # sweep name -> mean fusion weight per encoder
    cost: dict[str, Any] = field(default_factory=dict)  # CostReport.to_dict(); {} without an online measurement


def model_label(name: str) -> str:
    """What a sweep configuration of the demo is called in its tables and plots."""
    if name == MERV:
        return "MERV (cross-attn)"
    if name.startswith("only-"):
        return f"{ENCODER_LABELS.get(name[5:], name[5:])} only"
    kind = name.removeprefix("fusion-")
    return f"MERV, {FUSION_LABELS.get(kind, kind)}"


def demo_sweep(cfg: DemoConfig, train_json: str, store: str, benchmarks: list[str]) -> Any:
    """MERV as the sweep's base, then the other fusion and the single-encoder baselines as variants:
    every model from the one store (`merv ablate`'s machinery, the same trainer and evaluation)."""
    from merv.pipelines.ablate import Sweep, Variant

    base = {"recipe": "tiny", "stage": "finetune", "seed": cfg.seed,
            "data": {"files": [train_json], "stores": [store]},
            "schedule": {"max_steps": cfg.steps, "warmup_ratio": cfg.warmup_ratio},
            "loader": {"global_batch_size": cfg.global_batch_size, "micro_batch_size": cfg.micro_batch_size},
            "optim": {"lr": cfg.lr}, "logging": {"tensorboard": False},
            "model": {"connector": {"tokens_per_frame": cfg.tokens_per_frame, "projector": cfg.projector,
                                    "frame_factor": cfg.frame_factor}}}
    variants = [Variant(f"fusion-{cfg.fusion}", (("model.connector.fusion", cfg.fusion),))] if cfg.fusion else []
    # a single encoder's cross-attention weight is identically 1: the fixed mix is the same model
    # without dead parameters (the `<encoder>-single` recipes)
    variants += [Variant(f"only-{e}", (("model.encoders", [e]), ("model.connector.fusion", "fixed_mix")))
                 for e in cfg.singles]
    return Sweep(base, variants=variants, benchmarks=benchmarks, eval_store=store, eval_mode=cfg.eval_mode,
                 source="demo")


def run_demo(cfg: DemoConfig, console: Console | None = None) -> DemoResult:
    from merv.extract.job import ExtractOptions, run_extraction
    from merv.pipelines.ablate import run_sweep
    from merv.pipelines.synthetic import generate_synthetic

    console = console or Console()
    cfg.check()
    out = Path(cfg.out)
    times: dict[str, float] = {}
    prepare_out_dir(out, force=cfg.force)
    t0 = time.perf_counter()
    dataset = generate_synthetic(out / "data", n_videos=cfg.videos, seed=cfg.seed, size=cfg.size, frames=cfg.frames,
                                 radius=tuple(cfg.radius), travel=tuple(cfg.travel), trail=cfg.trail, overwrite=True)
    times["generate"] = time.perf_counter() - t0
    console.print(f"[bold]1/5[/] generated {cfg.videos} synthetic videos in {times['generate']:.1f}s -> {dataset.root}")

    t0 = time.perf_counter()
    store = str(out / "features.zarr")
    summary = run_extraction(str(dataset.manifest), store, ExtractOptions(
        encoders=list(PAPER_ENCODER_NAMES), size="tiny", grid="native",
        samples_per_shard=cfg.samples_per_shard), console=console)
    times["extract"] = time.perf_counter() - t0
    console.print(f"[bold]2/5[/] {summary.line()}")

    t0 = time.perf_counter()
    bench = Path(dataset.open_dir).name
    sweep = demo_sweep(cfg, str(dataset.train_json), store,
                       [str(dataset.open_dir)] + ([str(dataset.mcq_dir)] if cfg.mcq else []))
    models_dir = out / "models"

    def done(row: dict[str, Any]) -> None:
        console.print(f"[bold]3/5[/] {model_label(row['name'])}: {row['steps']} steps from the cache in "
                      f"{row['train_s']:.1f}s, loss {row['final_loss']:.3f}; held-out accuracy "
                      f"{100 * row[f'acc/{bench}']:.1f}%")

    rows = run_sweep(sweep, models_dir, on_row=done)
    times["models"] = time.perf_counter() - t0

    models = {r["name"]: _model_summary(r, models_dir / r["name"] / "eval" / bench / "generate") for r in rows}
    weights = {name: m.pop("weights") for name, m in models.items() if m.get("weights")}
    chance = dict(dataset.chance)
    console.print("[bold]4/5[/] held-out accuracy per skill")
    console.print(accuracy_table(models, chance))
    console.print(weights_table(weights))
    for line in verdict(models, chance):
        console.print(line)

    cost: dict[str, Any] = {}
    if cfg.online_steps:
        t0 = time.perf_counter()
        report = _cost(cfg, sweep, rows, models_dir, times["extract"], out / "online")
        times["online"] = time.perf_counter() - t0
        cost = report.to_dict()
        console.print(f"[bold]5/5[/] {report.line()}")

    paths = {"store": store, "models": str(models_dir), "export": str(models_dir / MERV / "train" / "export"),
             "eval": str(models_dir / MERV / "eval")}
    if cfg.plots:
        t0 = time.perf_counter()
        pngs = _plots(models, models_dir, bench, out / "plots", dataset, chance)
        times["plots"] = time.perf_counter() - t0
        paths["plots"] = str(out / "plots")
        console.print(f"plots: {', '.join(str(p) for p in pngs)}")
    console.print(f"demo done in {sum(times.values()):.0f}s: " + ", ".join(f"{k} {v:.0f}s" for k, v in times.items()))
    merv = models[MERV]
    res = DemoResult(merv["accuracy"], chance, merv["overall"], times, paths, models, weights, cost)
    (out / "demo_result.json").write_text(json.dumps(asdict(res), indent=1))
    return res


def _model_summary(row: dict[str, Any], run: Path) -> dict[str, Any]:
    """One trained model: label, accuracy per question type and overall (from its prediction rows),
    what its training cost, its mean fusion weight per encoder (None for one encoder)."""
    from merv.pipelines.analysis import skill_accuracy, video_weights
    from merv.pipelines.evaluate import run_rows

    eval_rows = run_rows(run)
    by_type = skill_accuracy(eval_rows, key="question_type", with_benchmark=False)
    n = sum(k for k, _ in by_type.values())
    weights = None
    if not row["name"].startswith("only-"):
        _ids, encoders, w = video_weights(eval_rows)
        weights = {e: float(w[:, j].mean()) for j, e in enumerate(encoders)} | {
            f"{e}_sd": float(w[:, j].std()) for j, e in enumerate(encoders)}
    return {"label": model_label(row["name"]), "accuracy": {t: a for t, (_, a) in by_type.items()},
            "overall": sum(k * a for k, a in by_type.values()) / n, "train_s": row["train_s"], "steps": row["steps"],
            "weights": weights, "run": str(run)}


def accuracy_table(models: dict[str, dict[str, Any]], chance: dict[str, float]) -> Table:
    """Models x skills, best per skill in bold, chance as the last row."""
    skills = sorted(chance)
    table = Table("model", *skills, "overall", "train",
                  title="held-out synthetic QA (open-ended, exact word): accuracy per skill")
    best = {s: max(m["accuracy"].get(s, 0.0) for m in models.values()) for s in skills}
    best["overall"] = max(m["overall"] for m in models.values())
    for m in models.values():
        cells = [_pct(m["accuracy"].get(s, float("nan")), m["accuracy"].get(s) == best[s]) for s in skills]
        table.add_row(m["label"], *cells, _pct(m["overall"], m["overall"] == best["overall"]), f"{m['train_s']:.0f}s")
    table.add_row("chance", *(_pct(chance[s]) for s in skills), _pct(sum(chance.values()) / len(chance)), "",
                  style="dim")
    return table


def weights_table(weights: dict[str, dict[str, float]]) -> Table:
    """Mean fusion weight per encoder (+- sd over the test videos) of each fused model."""
    encoders = [e for e in PAPER_ENCODER_NAMES if any(e in w for w in weights.values())]
    table = Table("model", *(ENCODER_LABELS[e] for e in encoders),
                  title="fusion weight per encoder (mean +- sd over test videos; uniform = "
                        f"{1 / max(len(encoders), 1):.2f})")
    for name, w in weights.items():
        table.add_row(model_label(name), *(f"{w[e]:.2f} +- {w[e + '_sd']:.2f}" for e in encoders))
    return table


def verdict(models: dict[str, dict[str, Any]], chance: dict[str, float]) -> list[str]:
    """Per skill, in words: MERV against the best single encoder (which the skill leans on), honestly."""
    singles = {n: m for n, m in models.items() if n.startswith("only-")}
    if MERV not in models or not singles:
        return []
    lines = [("MERV's weights depend on the video only (one learned query, paper eq. 2): every question of a video "
              "gets the same mix. Which encoder each skill leans on, from the single-encoder rows:")]
    for skill in sorted(chance):
        alone = max(m["accuracy"].get(skill, 0.0) for m in singles.values())
        leaders = [ENCODER_LABELS.get(n[5:], n[5:]) for n, m in singles.items() if m["accuracy"].get(skill, 0.0) == alone]
        merv = models[MERV]["accuracy"].get(skill, 0.0)
        gap = 100 * (merv - alone)
        word = "beats" if gap > 0 else "ties" if gap == 0 else "trails"
        lines.append(f"  {skill}: {' = '.join(leaders)} {100 * alone:.1f}%; MERV {100 * merv:.1f}% "
                     f"{word} the best single encoder ({gap:+.1f} points; chance {100 * chance[skill]:.1f}%)")
    return lines


def _pct(value: float, bold: bool = False) -> str:
    text = f"{100 * value:.1f}%"
    return f"[bold]{text}[/]" if bold else text


def _cost(cfg: DemoConfig, sweep: Any, rows: list[dict[str, Any]], models_dir: Path, extract_s: float,
          online_dir: Path) -> Any:
    """Measure MERV's training with the encoders in the loop for a few steps; extrapolate to every model."""
    from merv.pipelines.demo_cost import CostReport, measure_online
    from merv.pipelines.evaluate import read_jsonl

    base = sweep.base_config()
    rate = measure_online(base, cfg.online_steps, online_dir)
    cached = [float(r["step_s"]) for r in read_jsonl(models_dir / MERV / "train" / "metrics.jsonl")]
    models = {row["name"]: {"train_s": row["train_s"], "samples": row["steps"] * cfg.global_batch_size,
                            "encoders": list(row.get("model.encoders") or base.model.encoders)}  # the variant's column
              for row in rows}
    return CostReport.build(extract_s, models, rate, statistics.median(cached[1:] or cached))


def _plots(models: dict[str, dict[str, Any]], models_dir: Path, bench: str, out: Path, dataset: Any,
           chance: dict[str, float]) -> list[Path]:
    """Today's figures of MERV (weights, top videos, skills) and accuracy per model and skill."""
    from merv.pipelines.analysis import plot_all, plot_skill_accuracy

    pngs = plot_all(models[MERV]["run"], out, sources=str(dataset.manifest))
    written = list(pngs.values())
    written.append(plot_skill_accuracy({m["label"]: m["run"] for m in models.values()}, out / "models.png",
                                       key="question_type", chance={f"{bench}-{k}": v for k, v in chance.items()},
                                       title="Held-out accuracy per model and skill (dashes: chance)"))
    return written


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
