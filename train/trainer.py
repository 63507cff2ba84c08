"""The training loop: cached features -> connector + LLM, FSDP2, exact resume.

One optimizer step consumes one global batch. Each rank takes its slice of it as `accum`
micro-batches (see merv.train.loader). The loss of a step is the sum of token losses over the
whole global batch divided by its number of answer tokens (all-reduced before the backward), so
a step is the same computation for any world size and any split into micro-batches.

Resume (`--resume`, `--resume-auto`) continues from the newest verified checkpoint (see
merv.train.checkpoint) only when the resolved configuration matches the checkpoint's, as classified
by `CONFIG_KEY_CLASSES`. SIGTERM / SIGINT stop the run at the next step boundary, agreed by every
rank, after a checkpoint when `checkpoint_every` is set.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from merv import MervError

from .checkpoint import (
    HARMLESS,
    ResumeError,
    config_changes,
    full_model_state,
    load_checkpoint,
    read_trainer_state,
    save_checkpoint,
    select_checkpoint,
)
from .distributed import DistEnv, all_reduce_sum, init_distributed
from .fsdp import shard_model
from .metrics import MetricsLogger
from .schedule import build_optimizer, build_scheduler


class TrainConfigError(MervError, ValueError):
    """A training configuration that cannot work; the message names the option and the fix."""


class TrainingStopped(MervError):
    """SIGTERM / SIGINT stopped the run at a step boundary; `exit_code` is 128 + the signal number."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


RESUME_MODES = {False: "no", True: "must", "no": "no", "must": "must", "auto": "auto"}

# How `--resume` treats a difference between the checkpoint's resolved config and the new one, by
# dotted key (fnmatch patterns). Every class but "harmless" is refused without --allow-config-change,
# and so is a key no pattern matches. Re-point this table when the config's keys change.
CONFIG_KEY_CLASSES: dict[str, tuple[str, ...]] = {
    "model": ("recipe", "stage", "encoders", "projector", "tokens_per_frame", "fusion", "llm", "init_from",
              "pool_at_load", "connector.*"),
    "data order": ("data", "stores", "join_key", "allow_missing", "online", "seed", "global_batch_size", "max_length",
                   "buffer_shards", "num_examples"),
    "optimisation": ("lr", "warmup_ratio", "weight_decay", "max_grad_norm", "lr_schedule", "epochs", "max_steps",
                     "total_steps"),
    HARMLESS: ("out_dir", "resume", "allow_config_change", "checkpoint_every", "export", "num_workers",
               "prefetch_factor", "device", "activation_checkpointing", "micro_batch_size", "world_size", "tensorboard",
               "progress"),
}
CONFIG_CHANGES = "config_changes.json"  # in the run directory: the accepted config changes, by step


@dataclass
class TrainConfig:
    """Everything a run needs; saved as `config.json` in the run directory."""

    data: list[str] = field(default_factory=list)  # instruction JSON / JSONL files
    stores: list[str] = field(default_factory=list)  # one per data file, or one for all
    recipe: str = "tiny"
    stage: str | None = None  # which stage of the recipe (default: its last)
    out_dir: str = "runs/train"
    encoders: list[str] | None = None  # encoder subset (default: the recipe's)
    projector: str | None = None
    tokens_per_frame: int | None = None
    fusion: str | None = None
    llm: str | None = None
    init_from: str | None = None  # a `merv train` export to start from (stage chaining)
    global_batch_size: int | None = None
    micro_batch_size: int | None = None
    lr: float | None = None
    warmup_ratio: float | None = None
    weight_decay: float | None = None
    max_grad_norm: float | None = None
    epochs: int | None = None
    max_steps: int | None = None
    max_length: int | None = None
    seed: int = 0
    checkpoint_every: int = 0  # steps; 0 = only at the end
    resume: bool | str = False  # True: must resume (refuse if nothing usable); "auto": or start fresh if no checkpoint
    allow_config_change: bool = False  # resume even if model / data order / optimisation settings changed (recorded)
    export: bool = True
    online: bool = False
    num_workers: int = 0
    prefetch_factor: int = 2
    buffer_shards: int = 4
    activation_checkpointing: bool | None = None  # default: on for GPUs
    device: str = "auto"
    allow_missing: bool = False
    join_key: str = "id"
    pool_at_load: bool | None = None  # default: when the projector starts with 2D average pooling
    tensorboard: bool = True
    progress: bool = True

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrainConfig:
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


@dataclass
class Resolved:
    """The config with the recipe's values filled in, plus the objects built from it."""

    recipe: Any
    stage: Any
    connector: Any
    global_batch: int
    micro_batch: int
    accum: int
    lr: float
    warmup_ratio: float
    weight_decay: float
    max_grad_norm: float
    epochs: int
    max_length: int


def resolve(config: TrainConfig, world_size: int) -> Resolved:
    from merv.pipelines.recipes import get_recipe

    try:
        recipe = get_recipe(config.recipe)
    except KeyError as exc:
        raise TrainConfigError(str(exc.args[0])) from exc
    stages = {s.stage: s for s in recipe.stages}
    if config.stage is None:
        stage = recipe.stages[-1]
    elif config.stage in stages:
        stage = stages[config.stage]
    else:
        raise TrainConfigError(f"--stage {config.stage!r}: recipe {recipe.name!r} has stages {list(stages)}")
    changes = {k: v for k, v in (("projector", config.projector), ("tokens_per_frame", config.tokens_per_frame),
                                 ("fusion", config.fusion)) if v is not None}
    if config.tokens_per_frame is not None:
        side = math.isqrt(config.tokens_per_frame)
        if side * side != config.tokens_per_frame:
            raise TrainConfigError(f"--tokens-per-frame {config.tokens_per_frame} is not a square (1, 4, 16, 64, 100, 144, 256)")
    try:
        connector = recipe.connector.with_(**changes)
    except ValueError as exc:
        raise TrainConfigError(str(exc)) from exc
    global_batch = config.global_batch_size or stage.global_batch_size
    micro = config.micro_batch_size or stage.per_device_batch_size
    per_rank = math.ceil(global_batch / world_size)
    micro = min(micro, per_rank)
    if per_rank % micro:
        raise TrainConfigError(
            f"global batch {global_batch} over {world_size} rank(s) is {per_rank} per rank, which micro-batches of "
            f"{micro} do not divide; choose --micro-batch-size dividing {per_rank}"
        )
    return Resolved(
        recipe=recipe, stage=stage, connector=connector, global_batch=global_batch, micro_batch=micro,
        accum=per_rank // micro, lr=config.lr if config.lr is not None else stage.learning_rate,
        warmup_ratio=config.warmup_ratio if config.warmup_ratio is not None else stage.warmup_ratio,
        weight_decay=config.weight_decay if config.weight_decay is not None else stage.weight_decay,
        max_grad_norm=config.max_grad_norm if config.max_grad_norm is not None else stage.max_grad_norm,
        epochs=config.epochs or stage.epochs, max_length=config.max_length or recipe.llm_max_length,
    )


def _pool_at_load(config: TrainConfig, res: Resolved) -> bool:
    """Pool features to the projector's grid while loading (default: avg2d from the store)."""
    if config.pool_at_load is not None:
        return config.pool_at_load
    return res.connector.projector == "avg2d" and not config.online


def _abs(path: str | None) -> str | None:
    """A local path made absolute (a moved working directory is no config change); URLs unchanged."""
    return path if path is None or "://" in path else str(Path(path).resolve())


def resolved_config(config: TrainConfig, res: Resolved, *, num_examples: int, total_steps: int, world_size: int,
                    activation_checkpointing: bool) -> dict[str, Any]:
    """The config with every default filled in: what a checkpoint records and a resume compares."""
    out = config.to_json()
    out.update(
        stage=res.stage.stage, encoders=list(config.encoders or res.recipe.encoders), llm=config.llm or res.recipe.llm,
        projector=res.connector.projector, tokens_per_frame=res.connector.tokens_per_frame,
        fusion=res.connector.fusion, connector=res.connector.to_dict(), pool_at_load=_pool_at_load(config, res),
        data=[_abs(d) for d in config.data], stores=[_abs(s) for s in config.stores], init_from=_abs(config.init_from),
        global_batch_size=res.global_batch, micro_batch_size=res.micro_batch, max_length=res.max_length,
        lr=res.lr, warmup_ratio=res.warmup_ratio, weight_decay=res.weight_decay, max_grad_norm=res.max_grad_norm,
        epochs=res.epochs, lr_schedule=res.stage.lr_schedule, total_steps=total_steps, num_examples=num_examples,
        world_size=world_size, activation_checkpointing=activation_checkpointing,
    )
    return out


def build_data(config: TrainConfig, res: Resolved) -> Any:
    """Instruction data joined to the store(s), with the encoder subset and load-time pooling."""
    from .data import DataSource, InstructionData

    if not config.data:
        raise TrainConfigError("no instruction data: pass --data FILE.json (LLaVA / Video-LLaVA conversation format)")
    if config.stores and len(config.stores) not in (1, len(config.data)):
        raise TrainConfigError(f"{len(config.stores)} --store for {len(config.data)} --data: give one store, or one per data file")
    stores = config.stores * len(config.data) if len(config.stores) == 1 else (config.stores or [None] * len(config.data))
    sources = [DataSource([d], s, key=config.join_key) for d, s in zip(config.data, stores)]
    encoders = config.encoders or list(res.recipe.encoders)
    pool_to = None
    if _pool_at_load(config, res) and res.connector.projector not in ("all_tokens", "cls"):
        side = math.isqrt(res.connector.tokens_per_frame)
        pool_to = (side, side)
    data = InstructionData.build(sources, encoders=encoders, pool_to=pool_to, allow_missing=config.allow_missing)
    return data


def feature_specs(data: Any, order: list[str]) -> list[Any]:
    """Connector specs in the requested encoder order (the fusion / checkpoint order)."""
    from .specs import FeatureSpec

    groups = data.readers()[0].groups
    specs = []
    for name in order:
        group = groups[name]
        spec = FeatureSpec.from_group_spec(group.spec)
        shape = data.feature_shapes[name]
        specs.append(FeatureSpec(spec.name, tuple(shape[:3]), int(shape[3]), spec.has_cls))
    return specs


def build_model(config: TrainConfig, res: Resolved, specs: list[Any], env: DistEnv) -> Any:
    from .checkpoint_io import load_merv

    if config.init_from:
        model = load_merv(config.init_from, dtype=torch.float32)
        have = {s.name: s for s in model.connector.specs}
        if [s.name for s in specs] != [s.name for s in model.connector.specs] or any(
                have[s.name].grid != s.grid or have[s.name].dim != s.dim for s in specs):
            raise TrainConfigError(f"--init-from {config.init_from}: its encoders {list(have)} / grids differ from the data's")
    else:
        recipe = res.recipe if config.llm is None else dataclasses.replace(res.recipe, llm=config.llm)
        dtype = torch.float32  # master weights in fp32; FSDP's mixed precision computes in bf16 on GPU
        try:
            model = dataclasses.replace(recipe, connector=res.connector).build(specs, seed=config.seed, dtype=dtype)
        except ValueError as exc:
            raise TrainConfigError(str(exc)) from exc
    model.set_stage(res.stage.stage)
    model.train()
    return model


def _tokenizer_fn(model: Any, max_length: int) -> Any:
    from functools import partial

    return partial(_tokenize, model.tokenizer, model.prompt_format, max_length)


def _tokenize(tokenizer: Any, fmt: str, max_length: int, conversations: list[dict[str, str]]) -> tuple[Any, Any]:
    from .prompts import get_prompt_builder, tokenize_conversation

    return tokenize_conversation(get_prompt_builder(fmt, tokenizer), tokenizer, conversations, max_length)


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    out = dict(batch)
    for key in ("input_ids", "attention_mask", "labels", "has_visual"):
        out[key] = batch[key].to(device, non_blocking=True)
    feats = {k: v.to(device, non_blocking=True) for k, v in batch["features"].items()}
    out["features"] = feats or None  # text-only data (no store): the model takes None
    return out


def train(config: TrainConfig, feature_fn: Any = None) -> dict[str, Any]:
    """Run (or resume) one training stage; returns a summary. Every rank calls it.

    `feature_fn` replaces the store reads (`InstructionData.feature_fn`): benchmarks feed features
    held in memory through it; `config.online` installs the decode + encode one."""
    if feature_fn is not None and config.online:  # before any set-up: nothing to undo
        raise TrainConfigError("--online and a custom feature_fn both replace the store reads; choose one")
    mode = _resume_mode(config.resume)
    env = init_distributed(config.device)
    torch.manual_seed(config.seed)
    res = resolve(config, env.world_size)
    out = Path(config.out_dir)
    ckpt_root = out / "checkpoints"
    point = select_checkpoint(ckpt_root, env, mode)  # refuse early, before anything is built or written
    _note(env, *point.notes)
    data = build_data(config, res)
    specs = feature_specs(data, config.encoders or list(res.recipe.encoders))
    model = build_model(config, res, specs, env)
    if config.online:
        from .online import OnlineFeatureFn

        # in the training process the encoders share its device (as in the reference); workers: CPU
        device = str(env.device) if config.num_workers == 0 else "cpu"
        data.feature_fn = OnlineFeatureFn(size=res.recipe.size, device=device, weights=res.recipe.encoder_weights)
    elif feature_fn is not None:
        data.feature_fn = feature_fn
    from .loader import StreamingLoader

    pad_id = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
    loader = StreamingLoader(
        data, _tokenizer_fn(model, res.max_length), global_batch_size=res.global_batch, rank=env.rank,
        world_size=env.world_size, accum=res.accum, seed=config.seed, buffer_shards=config.buffer_shards,
        max_length=res.max_length, pad_id=pad_id, num_workers=config.num_workers,
        prefetch_factor=config.prefetch_factor, pin_memory=env.device.type == "cuda",
        feature_dtype=torch.float32 if env.device.type == "cpu" else torch.bfloat16,
    )
    steps_per_epoch = loader.steps_per_epoch
    total_steps = steps_per_epoch * res.epochs
    if config.max_steps:
        total_steps = min(total_steps, config.max_steps) if config.epochs else config.max_steps
    ac = config.activation_checkpointing if config.activation_checkpointing is not None else env.device.type == "cuda"
    resolved = resolved_config(config, res, num_examples=len(data), total_steps=total_steps,
                               world_size=env.world_size, activation_checkpointing=ac)
    model = shard_model(model, env, activation_checkpointing=ac)
    optimizer = build_optimizer(model, res.lr, res.weight_decay)
    scheduler = build_scheduler(optimizer, total_steps, res.warmup_ratio)
    run = _Run(config, res, env, ckpt_root, resolved)
    step = 0
    if point.path is not None:
        step = _resume(run, point.path, model, optimizer, scheduler, loader)
        run.resumed_from = point.path
    if env.is_main:  # only now: config.json describes what is trained from here on
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(config.to_json(), indent=1))
        if run.history:
            (out / CONFIG_CHANGES).write_text(json.dumps(run.history, indent=1))
    logger = MetricsLogger(out, enabled=env.is_main, tensorboard=config.tensorboard, start_step=step)
    try:
        summary = _loop(run, model, optimizer, scheduler, loader, logger, step, total_steps)
    finally:
        logger.close()
    if config.export:
        export_dir = out / "export"
        full = full_model_state(model)
        if env.is_main:
            from .checkpoint_io import save_merv

            save_merv(model, export_dir, state_dict=full, save_llm=res.stage.stage != "align" or config.init_from is not None,
                      extra={"recipe": res.recipe.name, "stage": res.stage.stage, "steps": summary["steps"]})
        if dist.is_initialized():
            dist.barrier()
        summary["export"] = str(export_dir)
    return summary



@dataclass
class _Run:
    """What the loop, the saves and the resume share."""

    config: TrainConfig
    res: Resolved
    env: DistEnv
    ckpt_root: Path
    resolved: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)  # accepted config changes, by step
    resumed_from: Path | None = None


def _resume_mode(resume: bool | str) -> str:
    try:
        return RESUME_MODES[resume]
    except (KeyError, TypeError):
        raise TrainConfigError(f"resume={resume!r}: use False, True (must resume) or 'auto'") from None


def _note(env: DistEnv, *lines: str) -> None:
    """Tell the user something they must not miss (a fallback, a fresh start), on rank 0."""
    if env.is_main:
        for line in lines:
            print(f"note: {line}", file=sys.stderr, flush=True)


def _resume(run: _Run, path: Path, model: Any, optimizer: Any, scheduler: Any, loader: Any) -> int:
    """Restore everything from a verified checkpoint; returns its step. Refuses a changed config."""
    state = read_trainer_state(path)
    changes = config_changes(state.get("resolved_config", {}), run.resolved, CONFIG_KEY_CLASSES)
    listed = "; ".join(c.describe() for c in changes)
    if changes and not run.config.allow_config_change:
        raise ResumeError(f"cannot resume from {path}: the configuration differs from the checkpoint's: {listed}. "
                          "Resume with the checkpoint's settings, or pass --allow-config-change to continue with the new "
                          "ones (the change is recorded in the run)")
    fresh_groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    load_checkpoint(path, model, optimizer, run.env, state)
    step = int(state["step"])
    _load_scheduler(scheduler, state["scheduler"], path)
    loader_state = _remap_loader_state(state["loader"], loader) if changes else state["loader"]
    try:
        loader.load_state_dict(loader_state)
    except (ValueError, KeyError, TypeError) as exc:
        raise ResumeError(f"cannot resume from {path}: {exc}") from exc
    run.history = list(state.get("config_changes", []))
    if changes:
        _apply_new_hyperparameters(optimizer, scheduler, fresh_groups)
        changed = {c.key: {"kind": c.kind, "old": c.old, "new": c.new} for c in changes}
        run.history.append({"step": step, "changes": changed})
        _note(run.env, f"resuming {path} with a changed configuration (--allow-config-change), recorded in "
                       f"{Path(run.config.out_dir) / CONFIG_CHANGES}: {listed}")
    _note(run.env, f"resumed from {path} (step {step})")
    return step


def _load_scheduler(scheduler: Any, saved: Any, path: Path) -> None:
    """Only the scheduler's own keys: LambdaLR.load_state_dict sets whatever attributes it is given."""
    mine = scheduler.state_dict()
    if not isinstance(saved, dict) or set(saved) != set(mine):
        keys = sorted(saved) if isinstance(saved, dict) else type(saved).__name__
        raise ResumeError(f"{path}: the saved learning-rate scheduler state has keys {keys}, this run's scheduler "
                          f"{sorted(mine)}; the checkpoint is damaged or from another schedule")
    scheduler.load_state_dict(saved)


def _apply_new_hyperparameters(optimizer: Any, scheduler: Any, fresh_groups: list[dict[str, Any]]) -> None:
    """After an accepted config change: this run's lr / weight decay / ..., the schedule at the saved step."""
    for group, fresh in zip(optimizer.param_groups, fresh_groups):
        group.update({k: v for k, v in fresh.items() if k != "lr"})
    scheduler.base_lrs = [g["initial_lr"] for g in optimizer.param_groups]
    for group, base, fn in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * fn(scheduler.last_epoch)
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]  # what get_last_lr() (the logged lr) reports


def _remap_loader_state(saved: dict[str, Any], loader: Any) -> dict[str, Any]:
    """The saved position in this loader's terms after an accepted data-order change.

    The epoch is kept and about the same number of its samples counts as done; the order of what is
    left is the new configuration's (not the old run's)."""
    mine = loader.state_dict()
    if all(saved.get(k) == mine[k] for k in ("seed", "buffer_shards", "num_examples", "global_batch_size")):
        return saved
    samples = int(saved["micro_batches"]) // int(saved["accum"]) * int(saved["global_batch_size"])
    batches = min(samples // mine["global_batch_size"], loader.steps_per_epoch)
    return {**mine, "epoch": int(saved["epoch"]), "micro_batches": batches * mine["accum"]}


class _StopRequest:
    """SIGTERM / SIGINT ask the run to stop at the next step boundary instead of dying mid-step.

    Preemption (Slurm, Kubernetes) sends SIGTERM, Ctrl-C SIGINT. A second SIGINT stops at once
    (KeyboardInterrupt); SIGTERM never escalates, since launchers may deliver it more than once."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, env: DistEnv) -> None:
        self.env = env
        self.signum = 0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopRequest:
        if threading.current_thread() is threading.main_thread():  # signal.signal works only there
            self._previous = {s: signal.signal(s, self._on_signal) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _on_signal(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        if not self.signum:
            _note(self.env, f"{signal.Signals(signum).name} received: stopping at the end of this step")
        self.signum = self.signum or signum

    def agreed(self) -> int:
        """The signal any rank received (0: none): every rank stops at the same step, or none does."""
        if self.env.world_size == 1 or not dist.is_initialized():
            return self.signum
        flag = torch.tensor([self.signum], dtype=torch.int64, device=self.env.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())


def _stopped(run: _Run, signum: int, step: int, total_steps: int, saved: Path | None,
             saved_now: bool) -> TrainingStopped:
    """The one-line report of a graceful stop: where it stopped, what was saved, how to go on."""
    name = signal.Signals(signum).name
    if saved_now:
        where = f"checkpoint {saved} written"
    elif saved is not None:
        where = f"no new checkpoint (--checkpoint-every is {run.config.checkpoint_every}); the newest is {saved}"
    else:
        where = "no checkpoint written (--checkpoint-every is 0), so a rerun starts from step 0"
    how = "continue with the same command plus --resume" if saved is not None else "rerun the command"
    return TrainingStopped(f"stopped by {name} after step {step} of {total_steps}: {where}; {how}", 128 + signum)


def _loop(run: _Run, model: Any, optimizer: Any, scheduler: Any, loader: Any, logger: MetricsLogger, step: int,
          total_steps: int) -> dict[str, Any]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    config, res, env = run.config, run.res, run.env
    params = [p for p in model.parameters() if p.requires_grad]
    progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                        TimeRemainingColumn(), disable=not (env.is_main and config.progress))
    losses: list[float] = []
    stream = _steps(loader, res.accum)
    start_step = step
    saved, saved_step = run.resumed_from, (step if run.resumed_from else None)
    t_start = time.perf_counter()
    with progress, _StopRequest(env) as stop:
        task = progress.add_task("train", total=total_steps, completed=step, info="")
        while step < total_steps:
            t0 = time.perf_counter()
            micro = next(stream)
            wait = loader.meter.step()["data_wait_s"]
            tokens_local = sum(mb["num_label_tokens"] for mb in micro)
            n_tokens = all_reduce_sum(tokens_local, env.device).item()
            if n_tokens == 0:
                raise TrainConfigError(
                    f"step {step + 1}: the global batch has no answer tokens: --max-length {res.max_length} truncated "
                    f"every conversation in it before its answer (data: {', '.join(config.data)}); raise --max-length "
                    "or shorten those conversations")
            loss_sum = torch.zeros((), dtype=torch.float64, device=env.device)
            seq_tokens = 0
            for i, mb in enumerate(micro):
                mb = _to_device(mb, env.device)
                if hasattr(model, "set_requires_gradient_sync"):
                    model.set_requires_gradient_sync(i == len(micro) - 1)
                out = model(mb["features"], mb["input_ids"], mb["attention_mask"], mb["labels"], mb["has_visual"],
                            loss_reduction="sum")
                # FSDP averages gradients over ranks: scale so the result is sum(token losses) / tokens.
                (out.loss * (env.world_size / n_tokens)).backward()
                loss_sum += out.loss.detach().double()
                seq_tokens += int(out.attention_mask.sum())
            grad_norm = torch.nn.utils.clip_grad_norm_(params, res.max_grad_norm)
            if hasattr(grad_norm, "full_tensor"):
                grad_norm = grad_norm.full_tensor()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            lr = scheduler.get_last_lr()[0]
            scheduler.step()
            step += 1
            loss = (all_reduce_sum(loss_sum, env.device) / n_tokens).item()
            samples = all_reduce_sum(sum(len(mb["ids"]) for mb in micro), env.device).item()
            tokens = all_reduce_sum(seq_tokens, env.device).item()
            dt = time.perf_counter() - t0
            losses.append(loss)
            ids = [i for mb in micro for i in mb["ids"]]
            logger.log(step, {"loss": loss, "lr": lr, "grad_norm": float(grad_norm), "samples_per_s": samples / dt,
                              "tokens_per_s": tokens / dt, "data_wait_frac": wait / dt, "step_s": dt,
                              "epoch": micro[0]["epoch"], "ids_rank0": ids})
            progress.update(task, advance=1, info=f"loss {loss:.4f} lr {lr:.2e} {samples / dt:.1f} samples/s")
            signum = stop.agreed()
            periodic = config.checkpoint_every and step % config.checkpoint_every == 0
            if step < total_steps and (periodic or (signum and config.checkpoint_every)):
                saved, saved_step = _save(run, step, model, optimizer, scheduler, loader), step
            if signum and step < total_steps:
                raise _stopped(run, signum, step, total_steps, saved, saved_step == step)
        if saved_step != step:  # the end (a run resumed at its end has nothing new to save)
            _save(run, step, model, optimizer, scheduler, loader)
    elapsed = time.perf_counter() - t_start
    if env.is_main:
        print(f"trained {step - start_step} steps (to step {step}/{total_steps}) in {elapsed:.1f}s; "
              f"final loss {losses[-1] if losses else float('nan'):.4f}", flush=True)
    return {"steps": step, "trained_steps": step - start_step, "losses": losses, "seconds": elapsed}


def _save(run: _Run, step: int, model: Any, optimizer: Any, scheduler: Any, loader: Any) -> Path:
    state = {"scheduler": scheduler.state_dict(), "loader": loader.state_dict(), "config": run.config.to_json(),
             "resolved_config": run.resolved, "config_changes": run.history}
    return save_checkpoint(run.ckpt_root, step, model, optimizer, state, run.env)


def _steps(loader: Any, accum: int) -> Any:
    """Endless stream of steps: lists of `accum` micro-batches, epoch after epoch."""
    while True:
        group: list[dict[str, Any]] = []
        for mb in loader:
            group.append(mb)
            if len(group) == accum:
                yield group
                group = []
        if group:  # never with the loader's layouts (every rank gets `accum` micro-batches); kept for safety
            yield group


STOP_REPORT_ENV = "MERV_TRAIN_STOP_REPORT"  # set by `merv train --nproc`: where rank 0 reports a graceful stop


def main_from_json(path: str) -> int:  # pragma: no cover - used by torchrun launches
    """torchrun entry: a MervError becomes one line (no traceback) and an exit status.

    Under `merv train --nproc` a graceful stop is reported through the STOP_REPORT_ENV file and the
    workers exit 0, so torchrun does not print a failure report; the launcher prints the line."""
    rank = int(os.environ.get("RANK", "0"))
    try:
        train(TrainConfig.from_json(json.loads(Path(path).read_text())))
    except TrainingStopped as exc:
        report = os.environ.get(STOP_REPORT_ENV)
        if report and rank == 0:
            Path(report).write_text(json.dumps({"message": str(exc), "exit_code": exc.exit_code}))
        elif not report and rank == 0:
            print(f"error: {exc}", file=sys.stderr, flush=True)
        return 0 if report else exc.exit_code
    except MervError as exc:
        print(f"error: {' '.join(str(exc).split())}" if rank == 0 else f"error (rank {rank}): {exc}", file=sys.stderr,
              flush=True)
        return 2
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":  # pragma: no cover
    code = main_from_json(sys.argv[1])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
