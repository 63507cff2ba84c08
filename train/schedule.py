"""Optimiser and learning-rate schedule of the paper's recipes (AdamW, warmup ratio, cosine); their
hyper-parameters and defaults are `OptimConfig` / `ScheduleConfig` (merv.train.config)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from transformers import get_cosine_schedule_with_warmup


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float]) -> torch.optim.Optimizer:
    """AdamW; weight decay only on matrices (not on biases, norms, or learned scalars / queries)."""
    decay, no_decay = [], []
    for _name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 else no_decay).append(p)
    if not decay and not no_decay:
        raise ValueError("nothing to train: every parameter is frozen (check the stage)")
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=betas)


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_ratio: float) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup over ceil(ratio * total) steps, then cosine decay to zero (HF's schedule)."""
    warmup = math.ceil(total_steps * warmup_ratio)
    return get_cosine_schedule_with_warmup(optimizer, warmup, total_steps)
