"""Named recipes: functions returning a complete `RunConfig`, and the way a run is resolved from one.

  merv-frozen             Stage 2 only (instruction tuning), connector + LLM: the RunConfig defaults
  merv-full               Stage 1 captioning with the LLM unfrozen (full-align), then Stage 2
  merv-videollava-recipe  Stage 1 aligns the connector only (align), then Stage 2
  <encoder>-single        single-encoder baselines (frozen recipe, one encoder)
  qwen2.5-7b-instruct, qwen2.5-1.5b-instruct, qwen2.5-0.5b-instruct, llama3-8b-instruct, llama3.1-8b-instruct
                          the frozen recipe with that instruct LLM (its chat template)
  tiny                    the debug model of tests, CI and the demo (tiny encoders, tiny in-process LLaMA)
  tiny-qwen2.5, tiny-llama3  tiny with Qwen2.5's / LLaMA-3's tokenizer behaviour, chat template, pad policy
  small                   CPU benchmark scale with the paper's proportions (benchmarks/train_bench.py)
  paper-shape             the paper's encoders and LLaMA-2 7B shapes with random weights (GPU benchmarks)

Values are the paper's / reference configs' (DESIGN.md table; princetonvisualai/merv
`merv/conf/models.py`). A recipe with several stages takes `stage=` (default: its last).
`load_run_config` starts from a recipe and layers a config file, the CLI's shorthand flags and
`--set` overrides on it: `merv train`, torchrun workers and `merv ablate` all resolve runs there.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from merv import MervError

from .accounting import PAPER_ENCODER_ORDER
from .config import FLAT_KEYS, RunConfig, from_flat
from .configurable import build_config_layers, closest, merge, parse_overrides, read_config_file
from .specs import FeatureSpec

DEFAULT_RECIPE = "tiny"  # what `merv train` starts from when neither a flag nor the config file names one


class RecipeError(MervError, KeyError):
    """An unknown recipe or stage, or a question a recipe cannot answer (paper sizes of tiny encoders).

    A KeyError for callers that look recipes up like a dict; printed without KeyError's quotes."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


# The paper's Stage 1 optimisation (DESIGN.md); Stage 2 (finetune) is the RunConfig defaults.
_STAGE1 = {"optim.weight_decay": 0.0, "loader.global_batch_size": 256, "loader.micro_batch_size": 16}
PAPER_STAGES: dict[str, dict[str, Any]] = {
    "finetune": {},
    "full-align": {**_STAGE1, "optim.lr": 1e-4},  # connector + LLM on captions
    "align": {**_STAGE1, "optim.lr": 1e-3},  # connector only
}


def _recipe(name: str, stage: str, stages: tuple[str, ...], changes: Mapping[str, Any] | None = None) -> RunConfig:
    """The paper's `stage` of a recipe with `stages`, plus the recipe's own `changes`."""
    if stage not in stages:
        raise RecipeError(f"recipe {name!r} has the stage(s) {', '.join(stages)}, not {stage!r} (--stage)")
    return RunConfig().override({**PAPER_STAGES[stage], **(changes or {}), "recipe": name, "stage": stage},
                                source=f"recipe {name}")


def merv_frozen(stage: str = "finetune") -> RunConfig:
    """MERV (frozen encoders): Stage 2 instruction tuning of connector + LLaMA-2 7B."""
    return _recipe("merv-frozen", stage, ("finetune",))


def merv_full(stage: str = "finetune") -> RunConfig:
    """MERV (full): Stage 1 captioning with the LLM unfrozen, then Stage 2."""
    return _recipe("merv-full", stage, ("full-align", "finetune"))


def videollava(stage: str = "finetune") -> RunConfig:
    """The Video-LLaVA recipe: Stage 1 aligns the connector only, then Stage 2."""
    return _recipe("merv-videollava-recipe", stage, ("align", "finetune"))


def single(encoder: str, stage: str = "finetune") -> RunConfig:
    """A single-encoder baseline of the frozen recipe. With one encoder the cross-attention weight
    is identically 1, so the fixed mix is the same model without dead parameters."""
    return _recipe(f"{encoder}-single", stage, ("finetune",),
                   {"model.encoders": [encoder], "model.connector.fusion": "fixed_mix"})


def with_llm(llm: str, stage: str = "finetune") -> RunConfig:
    """MERV (frozen) with another LLM (registry id `llm`, also the recipe's name): Stage 2 instruction
    tuning of connector + LLM, the LLM's chat template as the prompt format."""
    return _recipe(llm, stage, ("finetune",), {"model.llm.name": llm})


# the recipes of modern instruct LLMs (merv.train.llm_configs keeps their configs for `merv model info`)
LLM_RECIPES = ("qwen2.5-7b-instruct", "qwen2.5-1.5b-instruct", "qwen2.5-0.5b-instruct", "llama3-8b-instruct",
               "llama3.1-8b-instruct")
_TINY = {"model.connector.tokens_per_frame": 4, "model.connector.fusion_embed_dim": 64, "model.llm.max_length": 512,
         "model.encoder_size": "tiny", "optim.lr": 1e-3, "loader.global_batch_size": 8, "loader.micro_batch_size": 4}


def tiny(stage: str = "finetune", *, name: str = "tiny", llm: str = "tiny-llama") -> RunConfig:
    """CPU smoke / demo scale: tiny random encoders (the paper's frame counts) and a tiny LLaMA
    (`llm`: another in-process LLM, e.g. tiny-qwen2.5 / tiny-llama3, the test versions of the
    instruct recipes: their tokenizers, chat templates and pad policies, tiny shapes)."""
    return _recipe(name, stage, ("full-align", "finetune"), {**_TINY, "model.llm.name": llm})


def small(stage: str = "finetune") -> RunConfig:
    """CPU benchmark scale with the paper's proportions: 4 small random encoders (the paper's inputs
    and 16x16 / 14x14 grids pooled to 8x8, 4.1M parameters) and a 25M-parameter in-process LLaMA;
    1024 visual tokens per sample, the fusion query 3/4 of the LLM width (paper: 3072 / 4096)."""
    return _recipe("small", stage, ("finetune",), {
        "model.connector.fusion_embed_dim": 384, "model.llm.name": "small-llama", "model.encoder_size": "small",
        "optim.lr": 1e-4, "loader.global_batch_size": 4, "loader.micro_batch_size": 2})


def paper_shape(stage: str = "finetune") -> RunConfig:
    """The paper's compute without weights: the four paper encoders and a LLaMA-2 7B-shaped LLM,
    random init (GPU benchmarks: `train_bench --recipe paper-shape --stage align`)."""
    return _recipe("paper-shape", stage, ("align", "finetune"),
                   {"model.llm.name": "llama2-7b-shape", "model.encoder_weights": "random"})


RECIPES: dict[str, Callable[..., RunConfig]] = {
    "merv-frozen": merv_frozen,
    "merv-full": merv_full,
    "merv-videollava-recipe": videollava,
    **{f"{name}-single": functools.partial(single, name) for name in PAPER_ENCODER_ORDER},
    **{llm: functools.partial(with_llm, llm) for llm in LLM_RECIPES},
    "tiny": tiny,
    "tiny-qwen2.5": functools.partial(tiny, name="tiny-qwen2.5", llm="tiny-qwen2.5"),
    "tiny-llama3": functools.partial(tiny, name="tiny-llama3", llm="tiny-llama3"),
    "small": small,
    "paper-shape": paper_shape,
}


def get_recipe(name: str, stage: str | None = None) -> RunConfig:
    """The recipe's complete RunConfig at `stage` (None: its last stage)."""
    if name not in RECIPES:
        near = closest(name, list(RECIPES))
        raise RecipeError(f"recipe {name!r} is unknown{f' (did you mean {near}?)' if near else ''}; "
                          f"known: {', '.join(sorted(RECIPES))}")
    return RECIPES[name]() if stage is None else RECIPES[name](stage=stage)


def recipe_report(name: str, seq_len: int | None = None, encoders: Sequence[str] | None = None,
                  measured: Mapping[str, tuple[FeatureSpec, Any]] | None = None) -> Any:
    """`merv model info`: the recipe's parameters and FLOPs at paper size (its encoders must be).

    `encoders` replaces the recipe's; those without paper shapes come with `measured` (name ->
    (FeatureSpec, accounting.EncoderCost), see `merv.extract.encoders.cost`)."""
    model = _paper_size(name)
    if encoders:
        model = dataclasses.replace(model, encoders=tuple(encoders))
    return model.report(seq_len, measured)


def _paper_size(name: str) -> Any:
    """The recipe's ModelConfig; refused unless its encoders have the paper's (fixed) shapes."""
    size = get_recipe(name).model.encoder_size
    if size != "paper":
        paper = sorted(n for n in RECIPES if get_recipe(n).model.encoder_size == "paper")
        raise RecipeError(f"recipe {name!r} uses {size} random encoders whose shapes come from a store; "
                          f"`merv model info` sizes the paper-size recipes: {', '.join(paper)}")
    return get_recipe(name).model


def recipe_memory(name: str, lora: Any = None) -> Any:
    """`merv model info --lora`: the recipe's training memory, full finetune vs LoRA (paper sizes)."""
    from .accounting import training_memory

    from .llm_configs import sizing_config

    model = _paper_size(name)
    return training_memory(model.feature_specs(), model.connector, sizing_config(model.llm.name), lora=lora)


def resolve_run_config(layers: Sequence[tuple[str, Mapping[str, Any]]]) -> RunConfig:
    """(source, nested data) layers, lowest precedence first, over the recipe they name.

    The recipe and the stage are the highest layer's `recipe` / `stage` (else DEFAULT_RECIPE and
    the recipe's last stage); that recipe at that stage is the bottom layer."""
    merged = merge({}, *(data for _, data in layers))
    name = str(merged.get("recipe") or DEFAULT_RECIPE)
    stage = merged.get("stage")
    base = get_recipe(name, None if stage is None else str(stage))
    return build_config_layers(RunConfig, [(f"recipe {name}", base.to_dict()), *layers])


def load_run_config(*, file: str | os.PathLike[str] | None = None, flags: Mapping[str, Any] | None = None,
                    overrides: Sequence[str] = ()) -> RunConfig:
    """Recipe < config file < shorthand flags (FLAT_KEYS names) < `--set` overrides."""
    return resolve_run_config([(str(file), read_config_file(file) if file is not None else {}),
                               ("command-line flags", from_flat(flags or {})), ("--set", parse_overrides(overrides))])


__all__ = ["DEFAULT_RECIPE", "FLAT_KEYS", "LLM_RECIPES", "PAPER_STAGES", "RECIPES", "RecipeError", "get_recipe",
           "load_run_config", "merv_frozen", "merv_full", "paper_shape", "recipe_memory", "recipe_report",
           "resolve_run_config", "single", "small", "tiny", "videollava", "with_llm"]
