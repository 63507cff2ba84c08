"""The training loop: cached features -> connector + LLM, FSDP2, exact resume.

One optimizer step consumes one global batch. Each rank takes its slice of it as `accum`
micro-batches (see merv.train.loader). The loss of a step is the sum of token losses over the
whole global batch divided by its number of answer tokens (all-reduced before the backward), so
a step is the same computation for any world size and any split into micro-batches.

A run is one `RunConfig` (merv.train.config), written as `config.yaml` into its run directory:
`merv train --config RUN/config.yaml` reruns it. Resume (`--resume`, `--resume-auto`) continues from
the newest verified checkpoint (see merv.train.resume) only when the resolved configuration
matches the checkpoint's, as classified by `CONFIG_KEY_CLASSES`. SIGTERM / SIGINT stop the run at
the next step boundary, agreed by every rank, after a checkpoint when `checkpoint.every` is set.
"""

from __future__ import annotations

import json
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

from .config import RunConfig
from .configurable import ConfigError, dump_config
from .distributed import DistEnv, all_reduce_sum, init_distributed, shutdown_distributed
from .fsdp import shard_model
from .metrics import MetricsLogger
from .resume import (
    HARMLESS,
    ResumeError,
    config_changes,
    full_model_state,
    load_checkpoint,
    read_trainer_state,
    save_checkpoint,
    select_checkpoint,
)


class TrainConfigError(ConfigError):
    """A training configuration that cannot work; the message names the option and the fix."""


class TrainingStopped(MervError):
    """SIGTERM / SIGINT stopped the run at a step boundary; `exit_code` is 128 + the signal number."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


RESUME_MODES = {False: "no", True: "must", "auto": "auto"}
CONFIG_FILE = "config.yaml"  # in the run directory: the resolved RunConfig (`merv train --config` reruns it)
CONFIG_CHANGES = "config_changes.json"  # in the run directory: the accepted config changes, by step

# How `--resume` treats a difference between the checkpoint's resolved config and the new one, by
# dotted key (fnmatch patterns). Every class but "harmless" is refused without --allow-config-change,
# and so is a key no pattern matches. `derived.*` are values the run derived from the config, the
# data and the machine (see `_derived`). Re-point this table when the config's keys change.
CONFIG_KEY_CLASSES: dict[str, tuple[str, ...]] = {
    "model": ("recipe", "stage", "model.encoders", "model.connector.*", "model.llm.name", "model.llm.prompt_format",
              "model.llm.lora.r", "model.llm.lora.alpha", "model.llm.lora.dropout", "model.llm.lora.target_modules",
              "model.llm.lora.qlora",
              "model.encoder_size", "model.encoder_weights", "model.init_from", "derived.pool_at_load"),
    "data order": ("data.files", "data.stores", "data.join_key", "data.allow_missing", "data.online", "seed",
                   "loader.global_batch_size", "loader.buffer_shards", "model.llm.max_length", "derived.num_examples"),
    "optimisation": ("optim.lr", "optim.weight_decay", "optim.max_grad_norm", "optim.betas", "schedule.warmup_ratio",
                     "schedule.epochs", "schedule.max_steps", "derived.total_steps"),
    HARMLESS: ("checkpoint.out_dir", "checkpoint.every", "checkpoint.resume", "checkpoint.allow_config_change",
               "checkpoint.export", "model.llm.lora.export", "loader.micro_batch_size", "loader.num_workers", "loader.prefetch_factor",
               "data.pool_at_load", "parallel.device", "parallel.activation_checkpointing", "parallel.nproc",
               "logging.tensorboard", "logging.progress", "logging.wandb.*", "derived.world_size",
               "derived.activation_checkpointing"),
}


def _derived(config: RunConfig, *, num_examples: int, total_steps: int, world_size: int,
             activation_checkpointing: bool) -> dict[str, Any]:
    """What the run made of its config on this data and machine: recorded next to the config in
    every checkpoint, so a resume also compares what "auto" settings came to."""
    return {"pool_at_load": config.data.pools_at_load(config.model), "num_examples": num_examples,
            "total_steps": total_steps, "world_size": world_size, "activation_checkpointing": activation_checkpointing}


def encoder_provenance(data: Any, order: list[str] | tuple[str, ...]) -> list[dict[str, Any]]:
    """Per encoder, what the export records so features from another configuration are refused
    later: the encoder's fingerprint, the store group, its model id, size, weights and frames."""
    groups = data.readers()[0].groups
    out = []
    for name in order:
        spec = groups[name].spec
        enc = (spec.info or {}).get("encoder", {})
        out.append({"name": name, "fingerprint": spec.fingerprint, "group": groups[name].key,
                    "model_id": enc.get("model_id"), "size": enc.get("size"), "weights": enc.get("weights"),
                    "frames": enc.get("frames"), "framewise": spec.framewise,
                    "frames_decoded": (spec.info or {}).get("decoding", {}).get("frames_decoded")})
    return out


def feature_specs(data: Any, order: list[str] | tuple[str, ...]) -> list[Any]:
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


def train(config: RunConfig, feature_fn: Any = None) -> dict[str, Any]:
    """Run (or resume) one training stage; returns a summary. Every rank calls it.

    `feature_fn` replaces the store reads (`InstructionData.feature_fn`): benchmarks feed features
    held in memory through it; `config.data.online` installs the decode + encode one."""
    if feature_fn is not None and config.data.online:  # before any set-up: nothing to undo
        raise TrainConfigError("--online and a custom feature_fn both replace the store reads; choose one")
    mode = _resume_mode(config.checkpoint.resume)
    private_group = not dist.is_initialized()
    env = init_distributed(config.parallel.device)
    try:
        return _train(config, feature_fn, env, mode)
    finally:
        # a group of one started here is this call's own: in-process callers (the demo, ablations,
        # notebooks, tests) run several jobs in one process; a launcher's group stays its owner's
        if private_group and env.world_size == 1:
            shutdown_distributed()


def _train(config: RunConfig, feature_fn: Any, env: DistEnv, mode: str) -> dict[str, Any]:
    torch.manual_seed(config.seed)
    config = config.with_absolute_paths()
    _micro, accum = config.loader.split(env.world_size)  # refuse a batch split that cannot work, first
    if config.logging.wandb.enabled and env.is_main:  # and a tracker that is not installed
        from .tracking import require_wandb

        require_wandb()
    out = Path(config.checkpoint.out_dir)
    ckpt_root = out / "checkpoints"
    point = select_checkpoint(ckpt_root, env, mode)  # refuse early, before anything is built or written
    _note(env, *point.notes)
    data = config.data.build(config.model)
    specs = feature_specs(data, config.model.encoders)
    model = config.model.build(specs, seed=config.seed, dtype=torch.float32)  # fp32 master weights (bf16 compute on GPU)
    model.set_stage(config.stage)
    model.train()
    if config.data.online:
        from .online import OnlineFeatureFn

        # in the training process the encoders share its device (as in the reference); workers: CPU
        device = str(env.device) if config.loader.num_workers == 0 else "cpu"
        data.feature_fn = OnlineFeatureFn(size=config.model.encoder_size, device=device,
                                          weights=config.model.encoder_weights)
    elif feature_fn is not None:
        data.feature_fn = feature_fn
    pad_id = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
    max_length = config.model.llm.max_length
    loader = config.loader.build(
        data, _tokenizer_fn(model, max_length), rank=env.rank, world_size=env.world_size, seed=config.seed,
        max_length=max_length, pad_id=pad_id, pin_memory=env.device.type == "cuda",
        feature_dtype=torch.float32 if env.device.type == "cpu" else torch.bfloat16,
    )
    total_steps = config.schedule.total_steps(loader.steps_per_epoch)
    ac = config.parallel.activation_checkpointing
    ac = env.device.type == "cuda" if ac is None else ac
    resolved = {**config.to_dict(), "derived": _derived(config, num_examples=len(data), total_steps=total_steps,
                                                         world_size=env.world_size, activation_checkpointing=ac)}
    model = shard_model(model, env, activation_checkpointing=ac)
    optimizer = config.optim.build(model)
    scheduler = config.schedule.build(optimizer, total_steps)
    run = _Run(config, accum, env, ckpt_root, resolved)
    step = 0
    if point.path is not None:
        step = _resume(run, point.path, model, optimizer, scheduler, loader)
        run.resumed_from = point.path
    if env.is_main:  # only now: config.yaml describes what is trained from here on
        out.mkdir(parents=True, exist_ok=True)
        dump_config(config, out / CONFIG_FILE)
        if run.history:
            (out / CONFIG_CHANGES).write_text(json.dumps(run.history, indent=1))
    logger = MetricsLogger(out, enabled=env.is_main, tensorboard=config.logging.tensorboard, start_step=step,
                           wandb=config.logging.wandb, run_config=resolved)
    try:
        summary = _loop(run, model, optimizer, scheduler, loader, logger, step, total_steps)
    finally:
        logger.close()
    if config.checkpoint.export:
        export_dir = out / "export"
        full = full_model_state(model)
        if env.is_main:
            from .export import save_merv
            from .lora import export_lora

            about = {"encoders": encoder_provenance(data, config.model.encoders),
                     "extra": {"recipe": config.recipe, "stage": config.stage, "steps": summary["steps"],
                               "encoder_size": config.model.encoder_size,
                               "encoder_weights": config.model.encoder_weights,
                               "data": [str(f) for f in config.data.files]}}
            lora = config.model.llm.lora
            if lora.enabled:
                about["extra"]["lora"] = {"r": lora.r, "alpha": lora.alpha, "export": lora.export}
                export_lora(model, full, export_dir, lora, base_from_source=config.model.init_from is None, **about)
            else:
                save_merv(model, export_dir, state_dict=full,
                          save_llm=config.stage != "align" or config.model.init_from is not None, **about)
        if dist.is_initialized():
            dist.barrier()
        summary["export"] = str(export_dir)
    return summary


@dataclass
class _Run:
    """What the loop, the saves and the resume share."""

    config: RunConfig
    accum: int  # micro-batches per rank and step
    env: DistEnv
    ckpt_root: Path
    resolved: dict[str, Any]  # the config plus what it came to (`derived`): what checkpoints record
    history: list[dict[str, Any]] = field(default_factory=list)  # accepted config changes, by step
    resumed_from: Path | None = None


def _resume_mode(resume: bool | str) -> str:
    try:
        return RESUME_MODES[resume]
    except (KeyError, TypeError):
        raise TrainConfigError(f"checkpoint.resume={resume!r}: use false, true (must resume) or auto") from None


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
    if changes and not run.config.checkpoint.allow_config_change:
        raise ResumeError(f"cannot resume from {path}: the configuration differs from the checkpoint's: {listed}. "
                          "Resume with the checkpoint's settings, or pass --allow-config-change to continue with the new "
                          "ones (the change is recorded in the run)")
    fresh_groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    load_checkpoint(path, model, optimizer, run.env, state, trainable_only=run.config.model.llm.lora.enabled)
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
                       f"{Path(run.config.checkpoint.out_dir) / CONFIG_CHANGES}: {listed}")
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
        where = f"no new checkpoint (--checkpoint-every is {run.config.checkpoint.every}); the newest is {saved}"
    else:
        where = "no checkpoint written (--checkpoint-every is 0), so a rerun starts from step 0"
    how = "continue with the same command plus --resume" if saved is not None else "rerun the command"
    return TrainingStopped(f"stopped by {name} after step {step} of {total_steps}: {where}; {how}", 128 + signum)


def _loop(run: _Run, model: Any, optimizer: Any, scheduler: Any, loader: Any, logger: MetricsLogger, step: int,
          total_steps: int) -> dict[str, Any]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    config, env = run.config, run.env
    params = [p for p in model.parameters() if p.requires_grad]
    progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                        TimeRemainingColumn(), disable=not (env.is_main and config.logging.progress))
    losses: list[float] = []
    every = config.checkpoint.every
    stream = _steps(loader, run.accum)
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
                    f"step {step + 1}: the global batch has no answer tokens: --max-length {config.model.llm.max_length} "
                    f"truncated every conversation in it before its answer (data: {', '.join(config.data.files)}); "
                    "raise --max-length (model.llm.max_length) "
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
            grad_norm = torch.nn.utils.clip_grad_norm_(params, config.optim.max_grad_norm)
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
            periodic = every and step % every == 0
            if step < total_steps and (periodic or (signum and every)):
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
    state = {"scheduler": scheduler.state_dict(), "loader": loader.state_dict(), "resolved_config": run.resolved,
             "config_changes": run.history}
    return save_checkpoint(run.ckpt_root, step, model, optimizer, state, run.env,
                           trainable_only=run.config.model.llm.lora.enabled)


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


def main(path: str) -> int:  # pragma: no cover - used by torchrun launches
    """torchrun entry on a config file (YAML / JSON; a partial one starts from the recipe it names):
    a MervError becomes one line (no traceback) and an exit status.

    Under `merv train --nproc` a graceful stop is reported through the STOP_REPORT_ENV file and the
    workers exit 0, so torchrun does not print a failure report; the launcher prints the line."""
    from .recipes import load_run_config

    rank = int(os.environ.get("RANK", "0"))
    try:
        train(load_run_config(file=path))
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
    code = main(sys.argv[1])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
