"""The training loop: cached features -> connector + LLM, FSDP2, exact resume.

One optimizer step consumes one global batch. Each rank takes its slice of it as `accum`
micro-batches (see merv.train.loader). The loss of a step is the sum of token losses over the
whole global batch divided by its number of answer tokens (all-reduced before the backward), so
a step is the same computation for any world size and any split into micro-batches.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from merv import MervError

from .checkpoint import full_model_state, latest_checkpoint, load_checkpoint, save_checkpoint
from .distributed import DistEnv, all_reduce_sum, init_distributed
from .fsdp import shard_model
from .metrics import MetricsLogger
from .schedule import build_optimizer, build_scheduler


class TrainConfigError(MervError, ValueError):
    """A training configuration that cannot work; the message names the option and the fix."""


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
    resume: bool = False
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
    def from_json(cls, data: dict[str, Any]) -> "TrainConfig":
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
    pool = config.pool_at_load if config.pool_at_load is not None else (
        res.connector.projector == "avg2d" and not config.online)
    if pool and res.connector.projector not in ("all_tokens", "cls"):
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
    env = init_distributed(config.device)
    torch.manual_seed(config.seed)
    res = resolve(config, env.world_size)
    out = Path(config.out_dir)
    ckpt_root = out / "checkpoints"
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(config.to_json(), indent=1))
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
    model = shard_model(model, env, activation_checkpointing=ac)
    optimizer = build_optimizer(model, res.lr, res.weight_decay)
    scheduler = build_scheduler(optimizer, total_steps, res.warmup_ratio)
    step = 0
    if config.resume:
        path = latest_checkpoint(ckpt_root)
        if path is not None:
            state = load_checkpoint(path, model, optimizer, env)
            scheduler.load_state_dict(state["scheduler"])
            loader.load_state_dict(state["loader"])
            step = int(state["step"])
    logger = MetricsLogger(out, enabled=env.is_main, tensorboard=config.tensorboard)
    summary = _loop(config, res, env, model, optimizer, scheduler, loader, logger, step, total_steps, ckpt_root)
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
    logger.close()
    return summary


def _loop(config: TrainConfig, res: Resolved, env: DistEnv, model: Any, optimizer: Any, scheduler: Any, loader: Any,
          logger: MetricsLogger, step: int, total_steps: int, ckpt_root: Path) -> dict[str, Any]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    params = [p for p in model.parameters() if p.requires_grad]
    progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                        TimeRemainingColumn(), disable=not (env.is_main and config.progress))
    losses: list[float] = []
    stream = _steps(loader, res.accum)
    start_step = step
    t_start = time.perf_counter()
    with progress:
        task = progress.add_task("train", total=total_steps, completed=step, info="")
        while step < total_steps:
            t0 = time.perf_counter()
            micro = next(stream)
            wait = loader.meter.step()["data_wait_s"]
            tokens_local = sum(mb["num_label_tokens"] for mb in micro)
            n_tokens = all_reduce_sum(tokens_local, env.device).item()
            if n_tokens == 0:
                raise RuntimeError(f"step {step + 1}: the global batch has no answer tokens (all truncated?); raise --max-length")
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
            if config.checkpoint_every and step % config.checkpoint_every == 0 and step < total_steps:
                _save(ckpt_root, step, model, optimizer, scheduler, loader, config, env)
    _save(ckpt_root, step, model, optimizer, scheduler, loader, config, env)
    elapsed = time.perf_counter() - t_start
    if env.is_main:
        print(f"trained {step - start_step} steps (to step {step}/{total_steps}) in {elapsed:.1f}s; "
              f"final loss {losses[-1] if losses else float('nan'):.4f}", flush=True)
    return {"steps": step, "trained_steps": step - start_step, "losses": losses, "seconds": elapsed}


def _save(root: Path, step: int, model: Any, optimizer: Any, scheduler: Any, loader: Any, config: TrainConfig,
          env: DistEnv) -> None:
    state = {"scheduler": scheduler.state_dict(), "loader": loader.state_dict(), "config": config.to_json()}
    save_checkpoint(root, step, model, optimizer, state, env)


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


def main_from_json(path: str) -> None:  # pragma: no cover - used by torchrun launches
    train(TrainConfig.from_json(json.loads(Path(path).read_text())))
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":  # pragma: no cover
    import sys

    main_from_json(sys.argv[1])
    os._exit(0)
