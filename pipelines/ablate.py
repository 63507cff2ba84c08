"""`merv ablate`: a grid of training configurations from the same cache, each trained and evaluated.

The sweep never decodes or encodes a video: every configuration reads the store(s) made once by
`merv extract` (encoder subsets are chosen at load time, a native-grid cache is pooled at load
time). A finished configuration leaves `result.json` and is skipped when the sweep is re-run.

Sweep file (JSON or YAML):
  base:        TrainConfig fields shared by every run (data, stores, recipe, stage, max_steps, ...)
  axes:        {projector: [...], tokens_per_frame: [...], fusion: [...], recipe: [...],
                encoders: [["dinov2", "siglip"], "leave-one-out", "singles", ...]}
  mode:        "one-at-a-time" (the paper's tables: vary one axis from the base) or "product"
  benchmarks:  eval directories (reference eval_data format); eval_store: their feature store
  eval_mode:   "loglik" or "generate"
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from merv.train.trainer import TrainConfig

AXES = ("projector", "tokens_per_frame", "fusion", "encoders", "recipe", "stage")


@dataclass(frozen=True)
class Variant:
    """One configuration of the sweep: a name and the TrainConfig fields it changes."""

    name: str
    changes: tuple[tuple[str, Any], ...]

    def config(self, base: TrainConfig, out_dir: Path) -> TrainConfig:
        return dataclasses.replace(base, **dict(self.changes), out_dir=str(out_dir / self.name / "train"))


@dataclass
class Sweep:
    base: TrainConfig
    axes: dict[str, list[Any]]
    mode: str = "one-at-a-time"
    benchmarks: list[str] = field(default_factory=list)
    eval_store: str | None = None
    eval_mode: str = "loglik"

    @classmethod
    def from_file(cls, path: str | Path) -> "Sweep":
        text = Path(path).read_text()
        if str(path).endswith((".yaml", ".yml")):
            import yaml

            raw = yaml.safe_load(text)
        else:
            raw = json.loads(text)
        unknown = set(raw.get("axes", {})) - set(AXES)
        if unknown:
            raise ValueError(f"{path}: unknown axes {sorted(unknown)}; axes are {', '.join(AXES)}")
        return cls(TrainConfig.from_json(raw.get("base", {})), raw.get("axes", {}), raw.get("mode", "one-at-a-time"),
                   list(raw.get("benchmarks", [])), raw.get("eval_store"), raw.get("eval_mode", "loglik"))


def _encoder_sets(value: Any, all_encoders: list[str]) -> list[list[str]]:
    if value == "leave-one-out":
        return [[e for e in all_encoders if e != drop] for drop in all_encoders]
    if value == "singles":
        return [[e] for e in all_encoders]
    if isinstance(value, str):
        return [[v.strip() for v in value.split(",") if v.strip()]]
    return [list(value)]


def _label(key: str, value: Any, all_encoders: list[str]) -> str:
    if key == "encoders":
        missing = [e for e in all_encoders if e not in value]
        if len(value) == 1:
            return f"only-{value[0]}"
        if len(missing) == 1:
            return f"no-{missing[0]}"
        return "enc-" + "+".join(value)
    return f"{key}-{value}"


def expand(sweep: Sweep) -> list[Variant]:
    """The configurations of a sweep, the base first (named `base`), without duplicates."""
    from merv.pipelines.recipes import get_recipe

    all_encoders = sweep.base.encoders or list(get_recipe(sweep.base.recipe).encoders)
    options: dict[str, list[Any]] = {}
    for key, values in sweep.axes.items():
        expanded: list[Any] = []
        for v in values:
            expanded += _encoder_sets(v, all_encoders) if key == "encoders" else [v]
        options[key] = expanded
    variants = [Variant("base", ())]
    if sweep.mode == "product":
        keys = list(options)
        for combo in itertools.product(*(options[k] for k in keys)):
            changes = tuple(zip(keys, combo))
            variants.append(Variant("_".join(_label(k, v, all_encoders) for k, v in changes), changes))
    elif sweep.mode == "one-at-a-time":
        for key, values in options.items():
            for v in values:
                variants.append(Variant(_label(key, v, all_encoders), ((key, v),)))
    else:
        raise ValueError(f"sweep mode {sweep.mode!r}: use 'one-at-a-time' or 'product'")
    seen: set[tuple[tuple[str, Any], ...]] = set()
    unique = []
    for v in variants:
        key = tuple((k, json.dumps(val, sort_keys=True)) for k, val in v.changes)
        if key not in seen:
            seen.add(key)
            unique.append(v)
    return unique


def _params(export: str) -> dict[str, int]:
    from merv.train.checkpoint_io import load_merv

    model = load_merv(export)
    connector = sum(p.numel() for p in model.connector.parameters())
    return {"connector_params": connector, "total_params": connector + sum(p.numel() for p in model.llm.parameters())}


def _paper_tflops(config: TrainConfig) -> float | None:
    """Inference TFLOPs per sample of this configuration at paper scale (paper encoders, LLaMA-2 7B,
    BOS + visual tokens + 64 text tokens): the FLOPs column of the paper's Table 2."""
    from merv.pipelines.recipes import get_recipe
    from merv.train.paper import PAPER_ENCODERS, model_report

    recipe = get_recipe(config.recipe)
    names = config.encoders or list(recipe.encoders)
    if any(n not in PAPER_ENCODERS for n in names):
        return None
    changes = {k: getattr(config, k) for k in ("projector", "tokens_per_frame", "fusion") if getattr(config, k) is not None}
    cfg = recipe.connector.with_(**changes)
    specs = [PAPER_ENCODERS[n].spec for n in names]
    from merv.train.connector import Connector

    import torch

    with torch.device("meta"):
        tokens = Connector(specs, 4096, cfg).num_tokens
    report = model_report(specs, cfg, seq_len=tokens + 65, train_llm=False)
    flops = report.total_flops - report.flops["connector"] * 2 // 3  # connector forward only at inference
    return flops / 1e12


def run_sweep(sweep: Sweep, out_dir: str | Path, progress: bool = False) -> list[dict[str, Any]]:
    """Train + evaluate every variant not finished yet; write table.csv and table.md."""
    from merv.pipelines.evaluate import evaluate
    from merv.train.trainer import train

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for variant in expand(sweep):
        result_file = out / variant.name / "result.json"
        if result_file.exists():
            rows.append(json.loads(result_file.read_text()))
            continue
        config = variant.config(dataclasses.replace(sweep.base, progress=progress), out)
        summary = train(config)
        row: dict[str, Any] = {"name": variant.name, **{k: v for k, v in variant.changes},
                               "steps": summary["steps"], "final_loss": summary["losses"][-1] if summary["losses"] else None}
        row.update(_params(summary["export"]))
        row["paper_scale_tflops"] = _paper_tflops(config)
        if sweep.benchmarks:
            stores = sweep.eval_store or (config.stores[0] if config.stores else None)
            results = evaluate(summary["export"], sweep.benchmarks, stores, str(out / variant.name / "eval"),
                               mode=sweep.eval_mode, resume=False)
            for bench, summary in _benchmarks(results):
                row[f"acc/{bench}"] = summary["accuracy"]
        result_file.write_text(json.dumps(row, indent=1, default=str))
        rows.append(row)
    write_table(rows, out)
    return rows


def _benchmarks(results: dict[str, Any] | None) -> Iterable[tuple[str, dict[str, Any]]]:
    """(benchmark, summary) pairs from evaluate()'s {"benchmarks": {name: {mode: summary}}}."""
    for bench, by_mode in (results or {}).get("benchmarks", {}).items():
        for summary in by_mode.values():
            yield bench, summary


def write_table(rows: list[dict[str, Any]], out: Path) -> None:
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with (out / "table.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else (",".join(v) if isinstance(v, list) else str(v))

    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(r.get(k)) for k in keys) + " |" for r in rows]
    (out / "table.md").write_text("\n".join(lines) + "\n")
