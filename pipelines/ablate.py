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
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from merv import MervError
from merv.train.trainer import TrainConfig

AXES = ("projector", "tokens_per_frame", "fusion", "encoders", "recipe", "stage")
MODES = ("one-at-a-time", "product")
EVAL_MODES = ("loglik", "generate")
SWEEP_KEYS = ("base", "axes", "mode", "benchmarks", "eval_store", "eval_mode")


class SweepError(MervError, ValueError):
    """A sweep file that cannot be run as written; names the file and the key."""


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
        """Read and check a sweep file: strict about its keys, so a typo fails here, not after a training run."""
        raw = _read_mapping(Path(path))
        _no_unknown(path, "", raw, list(SWEEP_KEYS))
        base, axes = raw.get("base") or {}, raw.get("axes") or {}
        for key, value in (("base", base), ("axes", axes)):
            if not isinstance(value, dict):
                raise SweepError(f"{path}: {key!r} must be a mapping, got a {type(value).__name__}")
        _no_unknown(path, "base.", base, [f for f in TrainConfig.__dataclass_fields__ if f != "out_dir"])
        _no_unknown(path, "axes.", axes, list(AXES))
        for axis, values in axes.items():
            if not isinstance(values, list) or not values:
                raise SweepError(f"{path}: axis {axis!r} must be a non-empty list of values")
        mode, eval_mode = raw.get("mode", MODES[0]), raw.get("eval_mode", EVAL_MODES[0])
        if mode not in MODES or eval_mode not in EVAL_MODES:
            raise SweepError(f"{path}: mode must be one of {MODES} and eval_mode one of {EVAL_MODES}, "
                             f"got {mode!r} / {eval_mode!r}")
        benchmarks = raw.get("benchmarks") or []
        if not isinstance(benchmarks, list) or not all(isinstance(b, str) for b in benchmarks):
            raise SweepError(f"{path}: 'benchmarks' must be a list of eval_data directories")
        return cls(TrainConfig.from_json(base), axes, mode, benchmarks, raw.get("eval_store"), eval_mode)


def _read_mapping(path: Path) -> dict[str, Any]:
    """The top-level mapping of a JSON / YAML sweep file; every way it can be unreadable names the file."""
    import yaml

    if not path.is_file():
        raise SweepError(f"sweep file {path}: {'is a directory' if path.is_dir() else 'no such file'}; "
                         "pass a JSON / YAML file with base, axes and benchmarks")
    try:
        text = path.read_text(encoding="utf-8")
        raw = yaml.safe_load(text) if path.suffix in (".yaml", ".yml") else json.loads(text)
    except UnicodeDecodeError as exc:
        raise SweepError(f"sweep file {path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except json.JSONDecodeError as exc:
        raise SweepError(f"sweep file {path}: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from exc
    except yaml.YAMLError as exc:
        raise SweepError(f"sweep file {path}: not valid YAML ({' '.join(str(exc).split())})") from exc
    if not isinstance(raw, dict):
        raise SweepError(f"sweep file {path}: expected a mapping with base, axes and benchmarks, got a {type(raw).__name__}")
    return raw


def _no_unknown(path: str | Path, prefix: str, values: dict[str, Any], known: Sequence[str]) -> None:
    """Refuse keys a sweep does not know, with the nearest known one (a typo is the usual cause)."""
    import difflib

    unknown = sorted(set(values) - set(known))
    if not unknown:
        return
    named = []
    for key in unknown:
        near = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
        named.append(prefix + key + (f" (did you mean {prefix}{near[0]}?)" if near else ""))
    what = "axes" if prefix == "axes." else "keys"
    hint = ("base takes the options of `merv train` with underscores for dashes (data, stores, recipe, lr, max_steps, ...)"
            if prefix == "base." else f"known: {', '.join(sorted(known))}")
    raise SweepError(f"{path}: unknown {what} {', '.join(named)}; {hint}")


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
        raise SweepError(f"sweep mode {sweep.mode!r}: use 'one-at-a-time' or 'product'")
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
    from merv.pipelines.evaluate import evaluate, load_benchmark
    from merv.store import FeatureStore
    from merv.train.trainer import train

    for bench in sweep.benchmarks:  # checked before the first configuration trains
        load_benchmark(bench)
    if sweep.benchmarks and sweep.eval_store:
        FeatureStore.open(sweep.eval_store)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for variant in expand(sweep):
        result_file = out / variant.name / "result.json"
        if result_file.exists():
            rows.append(json.loads(result_file.read_text()))
            continue
        # a variant interrupted earlier continues from its last checkpoint (or starts fresh)
        config = variant.config(dataclasses.replace(sweep.base, progress=progress, resume="auto"), out)
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
