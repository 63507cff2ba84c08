"""Process-group setup: torchrun (or any launcher that sets RANK / WORLD_SIZE) or one plain process.

A single process with no launcher still gets a (gloo / nccl) group of size 1, so training always
takes the same FSDP code path; tests and CPU runs need no launcher.
"""

from __future__ import annotations

import datetime as _dt
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from merv.devices import local_rank, resolve_device


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def init_distributed(device: str = "auto", timeout_s: int = 1800) -> DistEnv:
    """Join the launcher's process group (nccl on GPU, gloo on CPU) or start a group of one."""
    rank = local_rank()
    dev = resolve_device(device, rank)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        timeout = _dt.timedelta(seconds=timeout_s)
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            dist.init_process_group(backend, timeout=timeout)
        else:
            dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1,
                                    timeout=timeout)
    return DistEnv(dist.get_rank(), dist.get_world_size(), rank, dev, backend)


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(value: float | int | torch.Tensor, device: torch.device) -> torch.Tensor:
    """Sum of a scalar over ranks (float64 for exact token counts and loss sums)."""
    t = torch.as_tensor(value, dtype=torch.float64, device=device).clone()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t
