"""FSDP2 wrapping of a MervModel: one `fully_shard` unit per LLM decoder layer plus the root.

The root unit is the whole MervModel (connector + LLM remainder). MervModel.forward looks up the
input embeddings itself, inside the root's forward: calling the embedding from outside any FSDP
unit's forward fails with "got mixed torch.Tensor and DTensor".
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from .distributed import DistEnv
from .llm import decoder_layers


def mixed_precision(env: DistEnv, bf16: bool | None = None) -> MixedPrecisionPolicy | None:
    """bf16 compute with fp32 gradient reduction on GPU; plain fp32 on CPU."""
    use = env.device.type == "cuda" if bf16 is None else bf16
    if not use:
        return None
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def shard_model(model: nn.Module, env: DistEnv, *, activation_checkpointing: bool = False,
                bf16: bool | None = None) -> nn.Module:
    """Shard decoder layers, then the root; returns the same (now FSDP) module, on env.device."""
    if activation_checkpointing:
        model.enable_gradient_checkpointing()  # type: ignore[operator]
    model.to(env.device)
    mesh = init_device_mesh(env.device.type, (env.world_size,))
    policy = mixed_precision(env, bf16)
    kwargs = {"mesh": mesh} if policy is None else {"mesh": mesh, "mp_policy": policy}
    for layer in decoder_layers(model.llm):  # type: ignore[arg-type]
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    return model
