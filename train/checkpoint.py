"""Resumable training checkpoints with torch.distributed.checkpoint (sharded; no pickles).

Layout of `<run>/checkpoints/step-00000012/`:
  *.distcp, .metadata         model + optimizer state, each rank writes its own shards (DCP)
  trainer_state.json          step, scheduler, loader position, config (rank 0)
  rng-rank<r>.safetensors     each rank's torch RNG states
`<run>/checkpoints/latest` names the newest complete checkpoint; it is replaced only after every
rank finished writing, so a run killed mid-save resumes from the previous one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from .distributed import DistEnv

STATE_FILE = "trainer_state.json"
LATEST = "latest"


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rng_state() -> dict[str, torch.Tensor]:
    out = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        out.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return out


def _set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["cpu"])
    cuda = [state[k] for k in sorted(k for k in state if k.startswith("cuda"))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def save_checkpoint(root: str | os.PathLike[str], step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    trainer_state: dict[str, Any], env: DistEnv) -> Path:
    """Collective: every rank must call it. Returns the checkpoint directory."""
    root = Path(root)
    path = root / f"step-{step:08d}"
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path))
    save_file(_rng_state(), str(path / f"rng-rank{env.rank}.safetensors"))
    if env.is_main:
        (path / STATE_FILE).write_text(json.dumps({"step": step, **trainer_state}, indent=1))
    _barrier()
    if env.is_main:
        tmp = root / f".{LATEST}.tmp"
        tmp.write_text(path.name)
        os.replace(tmp, root / LATEST)
    _barrier()
    return path


def latest_checkpoint(root: str | os.PathLike[str]) -> Path | None:
    pointer = Path(root) / LATEST
    if not pointer.exists():
        return None
    path = Path(root) / pointer.read_text().strip()
    return path if (path / STATE_FILE).exists() else None


def load_checkpoint(path: str | os.PathLike[str], model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    env: DistEnv) -> dict[str, Any]:
    """Collective: restore model, optimizer and this rank's RNG; return the trainer state."""
    path = Path(path)
    if not (path / STATE_FILE).exists():
        raise FileNotFoundError(f"{path} is not a complete merv checkpoint (no {STATE_FILE}); pick another step")
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    rng = path / f"rng-rank{env.rank}.safetensors"
    if rng.exists():
        _set_rng_state(load_file(str(rng)))
    return json.loads((path / STATE_FILE).read_text())


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Collective: the whole (unsharded) model state dict on CPU, on rank 0 (empty elsewhere)."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
