"""The run configuration: one dataclass per component, composed into `RunConfig`.

torchtitan's pattern: a component's config holds its hyper-parameters, each default defined here
and nowhere else, validates them in `__post_init__` (as `ConnectorConfig` does) and `build()`s the
component. The dotted keys of the tree are the keys of config files and of `--set`
(`optim.lr`, `model.connector.fusion`, `loader.global_batch_size`); `FLAT_KEYS` maps the CLI's
shorthand flags onto them. A RunConfig is complete: the recipes (`merv.train.recipes`) fill every
field, and `None` appears only where it is a real value (no export to start from, no step limit,
"decide by device").

The defaults are the paper's MERV (frozen) run: its four encoders in the reference's order, the
paper connector, LLaMA-2 7B, and Stage 2's optimisation (DESIGN.md table); the recipes change
what differs from that.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from merv import MervError

from .accounting import PAPER_ENCODER_ORDER, PAPER_ENCODERS
from .configurable import ConfigError, build_config, closest, config_to_dict, merge, unflatten
from .connector import ConnectorConfig
from .llm import DEFAULT_LLM
from .lora import LoraConfig
from .model import STAGES
from .prompts import PROMPT_FORMATS
from .specs import FeatureSpec


def _positive(owner: object, *names: str, allow_zero: bool = False) -> None:
    for name in names:
        value = getattr(owner, name)
        if value < 0 or (value == 0 and not allow_zero):
            raise ValueError(f"{name} must be {'>= 0' if allow_zero else 'positive'}, not {value}")


def _absolute(path: str | None) -> str | None:
    """A local path made absolute (a moved working directory changes nothing); URLs unchanged."""
    return path if path is None or "://" in path else str(Path(path).resolve())


# ----------------------------------------------------------------------------------- model
@dataclass(frozen=True)
class LLMConfig:
    """The language model: a merv.train.llm registry id, a local HF directory, or an in-process
    LLM built from a seed (tiny-llama, small-llama, llama2-7b-shape; see merv.train.build)."""

    name: str = DEFAULT_LLM  # LLaMA-2 7B
    max_length: int = 2048  # tokens per conversation (longer ones are truncated); the tokenizer's limit
    prompt_format: str | None = None  # None: the LLM's own (merv.train.llm.default_prompt_format)
    lora: LoraConfig = field(default_factory=LoraConfig)  # adapters instead of the whole LLM (r > 0)

    def __post_init__(self) -> None:
        _positive(self, "max_length")
        if self.prompt_format is not None and self.prompt_format not in PROMPT_FORMATS:
            raise ValueError(f"prompt_format {self.prompt_format!r} is unknown; use one of {PROMPT_FORMATS} or null")


@dataclass(frozen=True)
class ModelConfig:
    """Encoders (as feature specs), connector and LLM: everything that shapes the weights."""

    encoders: tuple[str, ...] = PAPER_ENCODER_ORDER  # names in fusion / checkpoint order
    connector: ConnectorConfig = field(default_factory=ConnectorConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    encoder_size: Literal["paper", "small", "tiny"] = "paper"  # the encoders' architecture (online encoding)
    encoder_weights: str | None = None  # None: the size's default (paper: pretrained); "random"; a directory
    init_from: str | None = None  # a `merv train` export to start from (stage chaining)

    def __post_init__(self) -> None:
        from merv.store.encoder_names import canonical_encoder_name

        # generic specs (timm:... / hf:...) in their one spelling: the store's groups are named so
        object.__setattr__(self, "encoders", tuple(canonical_encoder_name(e) for e in self.encoders))
        if not self.encoders or len(set(self.encoders)) != len(self.encoders):
            raise ValueError(f"encoders must be distinct names, at least one, got {list(self.encoders)}")
        tokens = self.connector.tokens_per_frame
        if tokens < 1 or math.isqrt(tokens) ** 2 != tokens:
            raise ValueError(f"connector.tokens_per_frame {tokens} is not a square (1, 4, 16, 64, 100, 144, 256)")

    def feature_specs(self, available: Mapping[str, FeatureSpec] | list[FeatureSpec] | None = None) -> list[FeatureSpec]:
        """Specs in `encoders` order: from `available` (e.g. a store's groups) or the paper's shapes."""
        if available is not None:
            by_name = available if isinstance(available, Mapping) else {s.name: s for s in available}
            missing = [e for e in self.encoders if e not in by_name]
            if missing:
                raise ConfigError(f"model.encoders needs {missing}; available: {sorted(by_name)} "
                                  "(extract them first: merv extract ... --encoders)")
            return [by_name[e] for e in self.encoders]
        if self.encoder_size != "paper":
            raise ConfigError(f"model.encoder_size {self.encoder_size!r}: random encoders have no fixed shapes; "
                              "pass the feature specs from the store")
        unknown = [e for e in self.encoders if e not in PAPER_ENCODERS]
        if unknown:
            raise ConfigError(f"model.encoders {unknown}: no paper shapes for them; their shapes come from a feature store "
                              "(pass --store with the extracted features)")
        return [PAPER_ENCODERS[e].spec for e in self.encoders]

    def build(self, specs: list[FeatureSpec] | None = None, *, seed: int = 0, **kwargs: Any) -> Any:
        """The MervModel: loaded from `init_from` (its specs must match), else built (connector
        seeded by `seed`); kwargs go to merv.train.build.build_merv (dtype, device, ...)."""
        model = self._load(specs, kwargs.get("dtype")) if self.init_from else self._build(specs, seed, **kwargs)
        if self.llm.lora.enabled:
            import torch

            from .lora import apply_lora, check_qlora

            check_qlora(self.llm.lora, kwargs.get("device"))
            with torch.random.fork_rng(devices=[]):  # the adapters' init: a function of the seed alone
                torch.manual_seed(seed + 2)
                model.llm = apply_lora(model.llm, self.llm.lora)
        return model

    def _build(self, specs: list[FeatureSpec] | None, seed: int, **kwargs: Any) -> Any:
        from .build import build_merv

        try:
            return build_merv(specs or self.feature_specs(), self.connector, self.llm.name, seed=seed,
                              prompt_format=self.llm.prompt_format, model_max_length=self.llm.max_length, **kwargs)
        except ValueError as exc:
            if isinstance(exc, MervError):  # already says what to fix
                raise
            raise ConfigError(str(exc)) from exc

    def _load(self, specs: list[FeatureSpec] | None, dtype: Any) -> Any:
        import torch

        from .export import load_merv

        model = load_merv(self.init_from, dtype=dtype or torch.float32)
        have = {s.name: s for s in model.connector.specs}
        if specs is not None and ([s.name for s in specs] != list(have) or any(
                have[s.name].grid != s.grid or have[s.name].dim != s.dim for s in specs)):
            raise ConfigError(f"model.init_from {self.init_from}: its encoders {list(have)} / grids differ from the data's")
        return model

    def report(self, seq_len: int | None = None, measured: Mapping[str, tuple[FeatureSpec, Any]] | None = None) -> Any:
        """Parameters and FLOPs per sample at paper size, from a meta build (no weights); the LLM's
        shape is its config kept in code (merv.train.llm_configs), as trained.

        `measured`: name -> (FeatureSpec, accounting.EncoderCost) for encoders without paper shapes
        (generic specs, hiera), measured by `merv.extract.encoders.cost`; train never builds encoders."""
        from .accounting import PAPER_ENCODERS, model_report
        from .llm_configs import sizing_config

        if seq_len is not None and seq_len < 1:
            raise ConfigError(f"seq_len {seq_len} (--seq-len) must be a positive token count")
        measured = dict(measured or {})
        known = {e: PAPER_ENCODERS[e].spec for e in self.encoders if e in PAPER_ENCODERS}
        known |= {n: spec for n, (spec, _) in measured.items()}
        missing = [e for e in self.encoders if e not in known]
        if missing:
            raise ConfigError(f"model.encoders {missing}: no paper shapes; `merv model info --encoders` measures them")
        try:
            return model_report([known[e] for e in self.encoders], self.connector, sizing_config(self.llm.name),
                                seq_len=seq_len or self.llm.max_length,
                                encoders={n: cost for n, (_, cost) in measured.items()})
        except ValueError as exc:  # the connector cannot take these encoders' grids (says which and why)
            if isinstance(exc, MervError):
                raise
            raise ConfigError(str(exc)) from exc


# ------------------------------------------------------------------------------------ data
@dataclass(frozen=True)
class DataConfig:
    """Instruction data (LLaVA / Video-LLaVA conversations) joined to feature stores."""

    files: tuple[str, ...] = ()  # instruction JSON / JSONL files
    stores: tuple[str, ...] = ()  # one per file, or one for all (none: text-only data)
    join_key: str = "id"  # records join the store by their "id", or by the video file's "stem"
    allow_missing: bool = False  # drop examples whose features are missing / failed (else refuse)
    pool_at_load: bool | None = None  # pool native-grid caches to the projector's grid; None: for avg2d, not online
    online: bool = False  # decode + encode in the loop instead of reading the store (the baseline)

    def pools_at_load(self, model: ModelConfig) -> bool:
        if self.pool_at_load is not None:
            return self.pool_at_load
        return model.connector.projector == "avg2d" and not self.online

    def build(self, model: ModelConfig) -> Any:
        """InstructionData with `model`'s encoders, pooled at load time where asked."""
        from .data import DataSource, InstructionData

        if not self.files:
            raise ConfigError("no instruction data: pass --data FILE.json (data.files; LLaVA / Video-LLaVA "
                              "conversation format)")
        if self.stores and len(self.stores) not in (1, len(self.files)):
            raise ConfigError(f"{len(self.stores)} --store for {len(self.files)} --data: give one store, or one per "
                              "data file")
        stores = list(self.stores) * len(self.files) if len(self.stores) == 1 else (list(self.stores) or [None] * len(self.files))
        sources = [DataSource([d], s, key=self.join_key) for d, s in zip(self.files, stores)]
        pool_to = None
        if self.pools_at_load(model) and model.connector.projector not in ("all_tokens", "cls"):
            side = math.isqrt(model.connector.tokens_per_frame)
            pool_to = (side, side)
        return InstructionData.build(sources, encoders=list(model.encoders), pool_to=pool_to,
                                     allow_missing=self.allow_missing)


@dataclass(frozen=True)
class LoaderConfig:
    """Batches: the global batch of one optimizer step and how it is streamed from the store."""

    global_batch_size: int = 128  # samples per optimizer step, over all ranks
    micro_batch_size: int = 8  # samples per forward per rank; gradient accumulation fills the rest
    num_workers: int = 0  # DataLoader worker processes reading the store
    prefetch_factor: int = 2  # micro-batches each worker reads ahead
    buffer_shards: int = 4  # store shards mixed by the shuffle buffer

    def __post_init__(self) -> None:
        _positive(self, "global_batch_size", "micro_batch_size", "prefetch_factor", "buffer_shards")
        _positive(self, "num_workers", allow_zero=True)

    def split(self, world_size: int) -> tuple[int, int]:
        """(micro-batch, accumulation steps) of each rank; the micro-batch must divide its share."""
        per_rank = math.ceil(self.global_batch_size / world_size)
        micro = min(self.micro_batch_size, per_rank)
        if per_rank % micro:
            raise ConfigError(
                f"global batch {self.global_batch_size} over {world_size} rank(s) is {per_rank} per rank, which "
                f"micro-batches of {micro} do not divide; choose --micro-batch-size (loader.micro_batch_size) "
                f"dividing {per_rank}")
        return micro, per_rank // micro

    def build(self, data: Any, tokenize: Any, *, rank: int, world_size: int, seed: int, max_length: int,
              **kwargs: Any) -> Any:
        """The StreamingLoader of one rank; kwargs: pad_id, pin_memory, feature_dtype."""
        from .loader import StreamingLoader

        _micro, accum = self.split(world_size)
        return StreamingLoader(data, tokenize, global_batch_size=self.global_batch_size, rank=rank,
                               world_size=world_size, accum=accum, seed=seed, buffer_shards=self.buffer_shards,
                               max_length=max_length, num_workers=self.num_workers,
                               prefetch_factor=self.prefetch_factor, **kwargs)


# ---------------------------------------------------------------------------- optimisation
@dataclass(frozen=True)
class OptimConfig:
    """AdamW; weight decay on matrices only."""

    lr: float = 2e-5  # peak learning rate
    weight_decay: float = 0.1
    max_grad_norm: float = 1.0  # gradient clipping
    betas: tuple[float, float] = (0.9, 0.999)

    def __post_init__(self) -> None:
        _positive(self, "lr", "max_grad_norm")
        _positive(self, "weight_decay", allow_zero=True)

    def build(self, model: Any) -> Any:
        from .schedule import build_optimizer

        return build_optimizer(model, self.lr, self.weight_decay, self.betas)


@dataclass(frozen=True)
class ScheduleConfig:
    """Linear warmup then cosine decay to zero over the run's steps."""

    warmup_ratio: float = 0.03  # of the run's steps
    epochs: int = 1
    max_steps: int | None = None  # when set, the run is exactly this many steps (epochs are then ignored)

    def __post_init__(self) -> None:
        if not 0 <= self.warmup_ratio <= 1:
            raise ValueError(f"warmup_ratio must be in [0, 1], not {self.warmup_ratio}")
        _positive(self, "epochs")
        if self.max_steps is not None:
            _positive(self, "max_steps")

    def total_steps(self, steps_per_epoch: int) -> int:
        return self.max_steps if self.max_steps is not None else steps_per_epoch * self.epochs

    def build(self, optimizer: Any, total_steps: int) -> Any:
        from .schedule import build_scheduler

        return build_scheduler(optimizer, total_steps, self.warmup_ratio)


# ------------------------------------------------------------------------------- the run
@dataclass(frozen=True)
class CheckpointConfig:
    """The run directory (config.yaml, metrics, checkpoints/, export/) and what is saved there."""

    out_dir: str = "runs/train"
    every: int = 0  # checkpoint every N steps (0: only at the end)
    resume: bool | Literal["auto"] = False  # true: continue the run in out_dir (refuse if none); "auto": or start fresh
    allow_config_change: bool = False  # resume although model / data order / optimisation settings differ
    export: bool = True  # write the Hugging Face-style export at the end

    def __post_init__(self) -> None:
        _positive(self, "every", allow_zero=True)


@dataclass(frozen=True)
class ParallelConfig:
    device: str = "auto"  # auto (cuda when available) | cpu | cuda
    activation_checkpointing: bool | None = None  # None: on for GPUs
    nproc: int = 1  # processes on this node (`merv train` launches torchrun); under torchrun: its world

    def __post_init__(self) -> None:
        _positive(self, "nproc")


WANDB_MODES = ("disabled", "online", "offline")


@dataclass(frozen=True)
class WandbConfig:
    """Weights & Biases next to TensorBoard (merv.train.tracking): on when `mode` is online / offline."""

    mode: str = "disabled"  # disabled | online | offline (wandb's own modes; offline: `wandb sync` later)
    project: str = "merv"
    entity: str | None = None  # None: the logged-in account's default
    name: str | None = None  # None: the run directory's name
    tags: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.mode not in WANDB_MODES:
            raise ValueError(f"mode {self.mode!r} is unknown; use one of {', '.join(WANDB_MODES)}")

    @property
    def enabled(self) -> bool:
        return self.mode != "disabled"


@dataclass(frozen=True)
class LoggingConfig:
    tensorboard: bool = True  # also write TensorBoard events next to metrics.jsonl
    progress: bool = True  # progress bar on rank 0
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass(frozen=True)
class RunConfig:
    """One training run, complete; written as `config.yaml` in its run directory."""

    recipe: str | None = None  # the named recipe it started from (None: built by hand)
    stage: str = "finetune"  # align (connector only) | finetune | full-align (connector + LLM)
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"stage {self.stage!r} is unknown; use one of {STAGES}")

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "config") -> RunConfig:
        return build_config(cls, data, source)

    def override(self, changes: Mapping[str, Any], source: str = "overrides") -> RunConfig:
        """A copy with `{"optim.lr": 2e-5, ...}` applied (dotted keys, checked as strictly as a file)."""
        return build_config(RunConfig, merge(self.to_dict(), unflatten(changes)), source)

    def with_absolute_paths(self) -> RunConfig:
        """Input paths made absolute: what a run records, so its config.yaml reruns from anywhere."""
        changes: dict[str, Any] = {"data.files": [_absolute(f) for f in self.data.files],
                                   "data.stores": [_absolute(s) for s in self.data.stores],
                                   "model.init_from": _absolute(self.model.init_from)}
        return self.override(changes)


# The CLI's shorthand flags (the flat keys of the first release, kept by old sweep files): each is
# one dotted key, so `--lr`, `optim.lr:` in a file and `--set optim.lr=` are the same setting.
FLAT_KEYS: dict[str, str] = {
    "recipe": "recipe", "stage": "stage", "seed": "seed",
    "encoders": "model.encoders", "projector": "model.connector.projector",
    "tokens_per_frame": "model.connector.tokens_per_frame", "fusion": "model.connector.fusion",
    "llm": "model.llm.name", "max_length": "model.llm.max_length", "init_from": "model.init_from",
    "data": "data.files", "stores": "data.stores", "join_key": "data.join_key", "allow_missing": "data.allow_missing",
    "pool_at_load": "data.pool_at_load", "online": "data.online",
    "global_batch_size": "loader.global_batch_size", "micro_batch_size": "loader.micro_batch_size",
    "num_workers": "loader.num_workers", "prefetch_factor": "loader.prefetch_factor",
    "buffer_shards": "loader.buffer_shards",
    "lr": "optim.lr", "weight_decay": "optim.weight_decay", "max_grad_norm": "optim.max_grad_norm",
    "warmup_ratio": "schedule.warmup_ratio", "epochs": "schedule.epochs", "max_steps": "schedule.max_steps",
    "out_dir": "checkpoint.out_dir", "checkpoint_every": "checkpoint.every", "resume": "checkpoint.resume",
    "allow_config_change": "checkpoint.allow_config_change", "export": "checkpoint.export",
    "device": "parallel.device", "activation_checkpointing": "parallel.activation_checkpointing",
    "nproc": "parallel.nproc", "tensorboard": "logging.tensorboard", "progress": "logging.progress",
    "wandb": "logging.wandb.mode",
}


def from_flat(flat: Mapping[str, Any], source: str = "flags") -> dict[str, Any]:
    """`{"lr": 2e-5, "data": [...]}` (shorthand / flat keys) -> the nested layer they set."""
    dotted = {}
    for key, value in flat.items():
        if key not in FLAT_KEYS:
            near = closest(key, list(FLAT_KEYS))
            raise ConfigError(f"{source}: {key!r} is no setting{f'; did you mean {near}?' if near else ''}")
        dotted[FLAT_KEYS[key]] = value
    return unflatten(dotted)
