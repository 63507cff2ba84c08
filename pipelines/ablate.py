"""`merv ablate`: a grid of training configurations from the same cache, each trained and evaluated.

The sweep never decodes or encodes a video: every configuration reads the store(s) made once by
`merv extract` (encoder subsets are chosen at load time, a native-grid cache is pooled at load
time). A finished configuration leaves `result.json` and is skipped when the sweep is re-run.

Sweep file (JSON or YAML); every configuration is the base with dotted overrides, as `merv train
--set` applies them:
  base:        a `merv train` config (nested keys as `merv train --print-config` shows them), e.g.
               {recipe: tiny, stage: finetune, data: {files: [...], stores: [...]}, schedule: {max_steps: 2}}
  variants:    named override lists: [{name: conv3d, set: ["model.connector.projector=conv3d"]}, ...]
  axes:        {dotted key: [values]}, each value one more variant, e.g. {model.connector.projector: [avg3d],
                model.encoders: [[dinov2, siglip], leave-one-out, singles]}; `recipe` / `stage` change the
                recipe the base starts from
  mode:        "one-at-a-time" (the paper's tables: vary one axis from the base) or "product"
  benchmarks:  eval directories (reference eval_data format); eval_store: their feature store
  eval_mode:   "loglik" or "generate"
Each configuration trains in OUT/<name>/train (the sweep sets checkpoint.out_dir and resume).

Sweep files of the first release (flat `merv train` keys in base: `lr`, `data`, `max_steps`; axes
`projector`, `tokens_per_frame`, `fusion`, `encoders`) still run: each flat key is read as its dotted
key (`merv.train.config.FLAT_KEYS`, the table of the CLI's shorthand flags), and `Sweep.notes`
holds a one-line deprecation note saying so.
"""

from __future__ import annotations

import csv
import itertools
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from merv import MervError
from merv.train.config import FLAT_KEYS, RunConfig
from merv.train.configurable import (
    ConfigError,
    check_keys,
    closest,
    dotted_keys,
    merge,
    parse_override,
    suggest_key,
    unflatten,
)
from merv.train.recipes import RecipeError, resolve_run_config

MODES = ("one-at-a-time", "product")
EVAL_MODES = ("loglik", "generate")
SWEEP_KEYS = ("base", "variants", "axes", "mode", "benchmarks", "eval_store", "eval_mode")
VARIANT_KEYS = ("name", "set")
SWEEP_SETS = ("checkpoint.out_dir", "checkpoint.resume")  # set per configuration by the sweep itself
RUN_KEYS = tuple(dotted_keys(RunConfig))
_KEYS_HELP = "dotted `merv train` config keys (e.g. model.connector.projector, model.encoders, optim.lr, recipe, stage)"


class SweepError(MervError, ValueError):
    """A sweep file that cannot be run as written; names the file and the key."""


@dataclass(frozen=True)
class Variant:
    """One configuration of the sweep: a name and the dotted keys it sets over the base."""

    name: str
    changes: tuple[tuple[str, Any], ...]

    def config(self, base: Mapping[str, Any], out_dir: Path, progress: bool = False) -> RunConfig:
        """The base fragment (over the recipe it names), this variant's changes, then the sweep's
        own settings: the variant's run directory, resumed if a run was interrupted."""
        return resolve_run_config([
            ("sweep base", base), (f"variant {self.name}", unflatten(dict(self.changes))),
            ("sweep", {"checkpoint": {"out_dir": str(out_dir / self.name / "train"), "resume": "auto"},
                       "logging": {"progress": progress}}),
        ])


@dataclass
class Sweep:
    base: dict[str, Any]  # a RunConfig fragment; may name `recipe` / `stage`
    axes: dict[str, list[Any]] = field(default_factory=dict)  # dotted key -> values
    mode: str = "one-at-a-time"
    benchmarks: list[str] = field(default_factory=list)
    eval_store: str | None = None
    eval_mode: str = "loglik"
    variants: list[Variant] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # for the user (the old-format deprecation note)
    source: str = "sweep"  # the file, in messages

    def __post_init__(self) -> None:
        """Refuse what cannot run before the first configuration trains: unknown keys anywhere
        (with the closest valid one), bad values (every configuration is built), a bad mode."""
        if self.mode not in MODES or self.eval_mode not in EVAL_MODES:
            raise SweepError(f"{self.source}: mode must be one of {MODES} and eval_mode one of {EVAL_MODES}, "
                             f"got {self.mode!r} / {self.eval_mode!r}")
        _check_base(self.source, self.base)
        for axis, values in self.axes.items():
            _check_key(self.source, "axes", axis)
            if not isinstance(values, list) or not values:
                raise SweepError(f"{self.source}: axis {axis!r} must be a non-empty list of values")
        try:
            variants = expand(self)
            for variant in variants:
                variant.config(self.base, Path("."))
        except (ConfigError, RecipeError) as exc:
            raise SweepError(f"{self.source}: {exc}") from None
        names = [v.name for v in variants]
        if dup := sorted({n for n in names if names.count(n) > 1}):
            raise SweepError(f"{self.source}: two different configurations are named {dup}; rename the variants")

    @classmethod
    def from_file(cls, path: str | Path) -> Sweep:
        """Read and check a sweep file: strict about its keys, so a typo fails here, not after a training run."""
        raw = _read_mapping(Path(path))
        _no_unknown(path, "", raw, SWEEP_KEYS)
        base, axes = raw.get("base") or {}, raw.get("axes") or {}
        for key, value in (("base", base), ("axes", axes)):
            if not isinstance(value, dict):
                raise SweepError(f"{path}: {key!r} must be a mapping, got a {type(value).__name__}")
        converted: list[str] = []
        base = _from_flat(path, base, converted)
        axes = {_override_key(path, "axes", k, converted): v for k, v in axes.items()}
        variants = _variants(path, raw.get("variants") or [], converted)
        benchmarks = raw.get("benchmarks") or []
        if not isinstance(benchmarks, list) or not all(isinstance(b, str) for b in benchmarks):
            raise SweepError(f"{path}: 'benchmarks' must be a list of eval_data directories")
        notes = [f"{path} uses the first release's flat keys; read as {', '.join(converted)}: write the dotted keys "
                 "(`merv train --print-config` shows them) to keep this sweep working"] if converted else []
        return cls(base, axes, raw.get("mode", MODES[0]), benchmarks, raw.get("eval_store"),
                   raw.get("eval_mode", EVAL_MODES[0]), variants, notes, str(path))

    def base_config(self) -> RunConfig:
        return resolve_run_config([("sweep base", self.base)])


def _from_flat(path: str | Path, base: dict[str, Any], converted: list[str]) -> dict[str, Any]:
    """The base with first-release flat keys (`lr`, `data: [...]`) moved to their dotted keys."""
    nested: dict[str, Any] = {}
    flat: dict[str, Any] = {}
    top = {k.split(".")[0] for k in RUN_KEYS}
    for key, value in base.items():
        old_data = key == "data" and not isinstance(value, Mapping)  # data: [files] was the flat key
        if key in top and not old_data:
            nested[key] = value
        elif key in FLAT_KEYS:
            flat[FLAT_KEYS[key]] = value
            converted.append(f"base.{key} as base.{FLAT_KEYS[key]}")
        else:
            near = suggest_key(str(key), RunConfig)
            raise SweepError(f"{path}: unknown key 'base.{key}'{f'; did you mean base.{near}?' if near else ''} "
                             "(base is a `merv train` config: nested keys as `merv train --print-config` shows them)")
    return merge(nested, unflatten(flat))


def _check_base(source: str, base: Mapping[str, Any]) -> None:
    try:
        check_keys(RunConfig, base, source, prefix="base")
    except ConfigError as exc:
        raise SweepError(str(exc)) from None
    flat = _flat_keys(base)
    if set_here := [k for k in SWEEP_SETS if k in flat]:
        raise SweepError(f"{source}: base.{set_here[0]} is set by the sweep (each configuration trains in "
                         "OUT/<name>/train and resumes there); remove it")


def _flat_keys(tree: Mapping[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key, value in tree.items():
        out += _flat_keys(value, f"{prefix}{key}.") if isinstance(value, Mapping) else [f"{prefix}{key}"]
    return out


def _check_key(source: str | Path, where: str, key: str) -> None:
    """A dotted key a configuration may set (not the sweep's own), else a SweepError with the closest."""
    if key in SWEEP_SETS:
        raise SweepError(f"{source}: {where}.{key} is set by the sweep (each configuration trains in OUT/<name>/train)")
    if key not in RUN_KEYS:
        near = suggest_key(key, RunConfig) if "." not in key else _closest_dotted(key)
        what = "axis" if where == "axes" else "key"
        raise SweepError(f"{source}: unknown {what} '{where}.{key}'{f'; did you mean {where}.{near}?' if near else ''}; "
                         f"{where} take {_KEYS_HELP}")


def _closest_dotted(key: str) -> str | None:
    return closest(key, list(RUN_KEYS)) or suggest_key(key.rsplit(".", 1)[-1], RunConfig)


def _override_key(path: str | Path, where: str, key: str, converted: list[str]) -> str:
    """A checked dotted key; a first-release flat name (`projector`) becomes its dotted key."""
    if key not in RUN_KEYS and key in FLAT_KEYS:
        converted.append(f"{where}.{key} as {where}.{FLAT_KEYS[key]}")
        return FLAT_KEYS[key]
    _check_key(path, where, key)
    return key


def _variants(path: str | Path, items: Any, converted: list[str]) -> list[Variant]:
    """`[{name: N, set: ["a.b=v", ...]}, ...]` -> Variants (keys checked, values read as --set reads them)."""
    if not isinstance(items, list):
        raise SweepError(f"{path}: 'variants' must be a list of {{name: ..., set: [KEY=VALUE, ...]}}")
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, Mapping) or not isinstance(item.get("name"), str) or not item["name"]:
            raise SweepError(f"{path}: variants[{i}] must be a mapping with a name and a set list, e.g. "
                             "{name: conv3d, set: [model.connector.projector=conv3d]}")
        name = item["name"]
        _no_unknown(path, f"variants[{i}].", dict(item), VARIANT_KEYS)
        if name == "base" or "/" in name or name.startswith("."):
            raise SweepError(f"{path}: variant name {name!r} is reserved or not a directory name; choose another")
        sets = item.get("set") or []
        if not isinstance(sets, list) or not all(isinstance(x, str) for x in sets):
            raise SweepError(f"{path}: variants[{i}] ({name}): 'set' must be a list of KEY=VALUE strings")
        changes = []
        for text in sets:
            try:
                key, value = parse_override(text)
            except ConfigError as exc:
                raise SweepError(f"{path}: variants[{i}] ({name}): {exc}") from None
            changes.append((_override_key(path, f"variants[{i}].set", key, converted), value))
        out.append(Variant(name, tuple(changes)))
    return out


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


def _no_unknown(path: str | Path, prefix: str, values: dict[str, Any], known: tuple[str, ...]) -> None:
    """Refuse keys a sweep does not know, with the nearest known one (a typo is the usual cause)."""
    import difflib

    unknown = sorted(set(values) - set(known))
    if not unknown:
        return
    named = []
    for key in unknown:
        near = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
        named.append(prefix + key + (f" (did you mean {prefix}{near[0]}?)" if near else ""))
    raise SweepError(f"{path}: unknown keys {', '.join(named)}; known: {', '.join(sorted(known))}")


def _encoder_sets(value: Any, all_encoders: list[str]) -> list[list[str]]:
    if value == "leave-one-out":
        return [[e for e in all_encoders if e != drop] for drop in all_encoders]
    if value == "singles":
        return [[e] for e in all_encoders]
    if isinstance(value, str):
        return [[v.strip() for v in value.split(",") if v.strip()]]
    return [list(value)]


def _label(key: str, value: Any, all_encoders: list[str]) -> str:
    if key == "model.encoders":
        missing = [e for e in all_encoders if e not in value]
        if len(value) == 1:
            return f"only-{value[0]}"
        if len(missing) == 1:
            return f"no-{missing[0]}"
        return "enc-" + "+".join(value)
    return f"{key.rsplit('.', 1)[-1]}-{value}"


def expand(sweep: Sweep) -> list[Variant]:
    """The configurations of a sweep: the base first (named `base`), the named variants, then the
    axes' variants; without duplicates."""
    all_encoders = list(sweep.base_config().model.encoders)
    options: dict[str, list[Any]] = {}
    for key, values in sweep.axes.items():
        expanded: list[Any] = []
        for v in values:
            expanded += _encoder_sets(v, all_encoders) if key == "model.encoders" else [v]
        options[key] = expanded
    variants = [Variant("base", ()), *sweep.variants]
    if sweep.mode == "product":
        keys = list(options)
        for combo in itertools.product(*(options[k] for k in keys)):
            changes = tuple(zip(keys, combo))
            variants.append(Variant("_".join(_label(k, v, all_encoders) for k, v in changes), changes))
    else:
        for key, values in options.items():
            for v in values:
                variants.append(Variant(_label(key, v, all_encoders), ((key, v),)))
    seen: set[tuple[tuple[str, Any], ...]] = set()
    unique = []
    for v in variants:
        key = tuple((k, json.dumps(val, sort_keys=True)) for k, val in v.changes)
        if key not in seen:
            seen.add(key)
            unique.append(v)
    return unique


def _params(export: str) -> dict[str, int]:
    from merv.train.export import load_merv

    model = load_merv(export)
    connector = sum(p.numel() for p in model.connector.parameters())
    return {"connector_params": connector, "total_params": connector + sum(p.numel() for p in model.llm.parameters())}


def _paper_tflops(config: RunConfig) -> float | None:
    """Inference TFLOPs per sample of this configuration at paper scale (paper encoders, LLaMA-2 7B,
    BOS + visual tokens + 64 text tokens): the FLOPs column of the paper's Table 2."""
    import torch

    from merv.train.accounting import PAPER_ENCODERS, model_report
    from merv.train.connector import Connector

    names = config.model.encoders
    if any(n not in PAPER_ENCODERS for n in names):
        return None
    specs = [PAPER_ENCODERS[n].spec for n in names]
    with torch.device("meta"):
        tokens = Connector(specs, 4096, config.model.connector).num_tokens
    report = model_report(specs, config.model.connector, seq_len=tokens + 65, train_llm=False)
    flops = report.total_flops - report.flops["connector"] * 2 // 3  # connector forward only at inference
    return flops / 1e12


def run_sweep(sweep: Sweep, out_dir: str | Path, progress: bool = False,
              on_row: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """Train + evaluate every variant not finished yet; write table.csv and table.md. Each row
    records what its configuration cost (train_s, eval_s: wall seconds); `on_row` sees every row
    as it is done or found done (progress reports)."""
    import time

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
            if on_row is not None:
                on_row(rows[-1])
            continue
        config = variant.config(sweep.base, out, progress)  # resumes a variant interrupted earlier
        t0 = time.perf_counter()
        summary = train(config)
        row: dict[str, Any] = {"name": variant.name, **{k: v for k, v in variant.changes},
                               "steps": summary["steps"], "final_loss": summary["losses"][-1] if summary["losses"] else None,
                               "train_s": round(time.perf_counter() - t0, 2)}
        row.update(_params(summary["export"]))
        row["paper_scale_tflops"] = _paper_tflops(config)
        if sweep.benchmarks:
            stores = sweep.eval_store or (config.data.stores[0] if config.data.stores else None)
            t0 = time.perf_counter()
            results = evaluate(summary["export"], sweep.benchmarks, stores, str(out / variant.name / "eval"),
                               mode=sweep.eval_mode, resume=False)
            row["eval_s"] = round(time.perf_counter() - t0, 2)
            for bench, summary in _benchmarks(results):
                row[f"acc/{bench}"] = summary["accuracy"]
        result_file.write_text(json.dumps(row, indent=1, default=str))
        rows.append(row)
        if on_row is not None:
            on_row(row)
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
