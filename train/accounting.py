"""Paper-size shapes (4 encoders + LLaMA-2 7B), parameter counts and analytic FLOPs per sample.

Nothing here loads weights: the connector and the LLM are built on the `meta` device to count
parameters; encoder sizes and all FLOPs come from closed-form transformer shapes. FLOPs count a
multiply-add as 2 and attention as full n x n score matrices (no causal discount); LLM training
is forward + backward = 3 x forward.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from merv.store.paper import PAPER_ENCODER_NAMES
from merv.store.paper import PAPER_ENCODERS as PAPER_FACTS

from .connector import Connector, ConnectorConfig
from .specs import FeatureSpec


@dataclass(frozen=True)
class ViTShape:
    """Enough of a ViT to count its parameters and forward FLOPs."""

    layers: int
    width: int
    mlp: int
    patch: int
    image: int = 224
    extra_tokens: int = 1  # CLS (+ registers)
    tubelet: int = 1  # frames per patch (ViViT: 2)
    joint_frames: int = 1  # input frames attended jointly (ViViT: 32 -> one sequence)
    layers_run: int | None = None  # blocks actually run for the feature (penultimate = layers - 1)
    temporal_frames: int = 0  # LanguageBind: each layer first attends over this many frames per token
    extra_params: int = 0  # loaded but unused for the feature (SigLIP's attention-pool head)
    layer_scale: bool = False  # DINOv2: a learned per-channel scale on each residual branch (2 per block)
    prefix_positions: bool = True  # position embeddings cover the prefix tokens (DINOv2-reg: patches only)
    patch_bias: bool = True  # the patch embedding has a bias (CLIP / LanguageBind: none)
    pre_norm: bool = False  # a LayerNorm before the blocks (CLIP / LanguageBind), besides the final one

    @property
    def patches(self) -> int:
        return (self.image // self.patch) ** 2

    @property
    def tokens(self) -> int:
        """Tokens of one forward sequence."""
        return self.patches * (self.joint_frames // self.tubelet) + self.extra_tokens

    def params(self) -> int:
        """Every parameter of the module as built (checked against the meta-device builds)."""
        w, m = self.width, self.mlp
        block = 4 * w * w + 4 * w + 2 * w * m + m + w + 4 * w  # qkv+proj, mlp, two LayerNorms
        if self.layer_scale:
            block += 2 * w
        if self.temporal_frames:  # temporal attention, its LayerNorm and its own temporal embedding, per layer
            block += 4 * w * w + 4 * w + 2 * w + self.temporal_frames * w
        positions = self.tokens if self.prefix_positions else self.tokens - self.extra_tokens
        embed = 3 * self.patch * self.patch * self.tubelet * w + (w if self.patch_bias else 0)
        embed += positions * w + self.extra_tokens * w
        norms = (2 if self.pre_norm else 1) * 2 * w
        return self.layers * block + embed + norms + self.extra_params

    def forward_flops(self, frames: int) -> int:
        """Forward FLOPs for `frames` input frames (sequences of `joint_frames`)."""
        w, m = self.width, self.mlp
        layers = self.layers_run or self.layers
        sequences = max(1, frames // self.joint_frames)
        n = self.tokens
        per_layer = 2 * n * (4 * w * w + 2 * w * m) + 4 * n * n * w
        if self.temporal_frames:  # per frame: its n tokens also pass a temporal attention over t frames
            per_layer += 2 * n * 4 * w * w + 4 * self.temporal_frames * n * w
        embed = 2 * n * 3 * self.patch * self.patch * self.tubelet * w
        return int(sequences * (layers * per_layer + embed))


@dataclass(frozen=True)
class PaperEncoder:
    """A paper encoder for accounting: the shared facts (merv.store.paper) plus its ViT shape."""

    name: str
    reference_id: str  # video_backbone_id in the reference configs
    spec: FeatureSpec  # cached grid / width (patch tokens, no CLS)
    frames: int  # input frames
    vit: ViTShape
    source: str  # weights the extractor loads


_VIT_SHAPES = {  # checked against the meta-device builds (tests/test_paper_facts.py)
    "languagebind": ViTShape(24, 1024, 4096, 14, layers_run=23, temporal_frames=8, patch_bias=False, pre_norm=True),
    "dinov2": ViTShape(24, 1024, 4096, 14, extra_tokens=5, layers_run=23, layer_scale=True, prefix_positions=False),
    "vivit": ViTShape(12, 768, 3072, 16, tubelet=2, joint_frames=32),
    "siglip": ViTShape(12, 768, 3072, 16, extra_tokens=0, layers_run=11, extra_params=7_087_104),
}
PAPER_ENCODERS: dict[str, PaperEncoder] = {
    name: PaperEncoder(name, fact.reference_id, FeatureSpec(name, fact.grid, fact.dim), fact.frames, _VIT_SHAPES[name],
                       fact.model_id)
    for name, fact in PAPER_FACTS.items()
}
PAPER_ENCODER_ORDER = PAPER_ENCODER_NAMES  # the reference's order (published checkpoints: projectors.0 = LanguageBind)


def paper_feature_specs(names: tuple[str, ...] | list[str] = PAPER_ENCODER_ORDER) -> list[FeatureSpec]:
    return [PAPER_ENCODERS[n].spec for n in names]


def reference_backbone_spec(backbone_id: str) -> FeatureSpec:
    """Reference `video_backbone_id` -> our paper FeatureSpec."""
    for enc in PAPER_ENCODERS.values():
        if enc.reference_id == backbone_id:
            return enc.spec
    known = [e.reference_id for e in PAPER_ENCODERS.values()]
    raise ValueError(f"reference backbone {backbone_id!r} is not one of the paper encoders {known}")


# --- analytic LLM FLOPs ----------------------------------------------------------------------


def llm_forward_flops(config: Any, seq_len: int) -> int:
    """Forward FLOPs of a LLaMA-style decoder (GQA aware) over `seq_len` tokens, LM head included."""
    d = config.hidden_size
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    hd = getattr(config, "head_dim", None) or d // heads
    ff = config.intermediate_size
    n = seq_len
    proj = 2 * n * (d * heads * hd + 2 * d * kv * hd + heads * hd * d)
    attn = 4 * n * n * heads * hd
    mlp = 2 * n * 3 * d * ff
    head = 2 * n * d * config.vocab_size
    return config.num_hidden_layers * (proj + attn + mlp) + head


def connector_flops(connector: Connector) -> int:
    """Forward FLOPs of the connector for one sample, measured on the meta device (shape-only)."""
    from torch.utils.flop_counter import FlopCounterMode

    dev = next(connector.parameters(), torch.empty(0)).device
    feats = {s.name: torch.empty(1, *s.grid, s.dim, device=dev) for s in connector.specs}
    with FlopCounterMode(display=False) as counter:  # meta tensors: the graph costs no memory
        connector(feats)
    return int(counter.get_total_flops())


@dataclass(frozen=True)
class EncoderCost:
    """An encoder measured rather than described: parameters and forward FLOPs per sample, from a
    meta-device build (`merv.extract.encoders.cost`; any registry name or generic spec)."""

    params: int
    flops: int


@dataclass
class ModelReport:
    """Per-component parameters and per-sample FLOPs (see module doc for the conventions)."""

    params: dict[str, int] = field(default_factory=dict)
    flops: dict[str, int] = field(default_factory=dict)
    seq_len: int = 0
    visual_tokens: int = 0

    @property
    def total_params(self) -> int:
        return sum(self.params.values())

    @property
    def total_flops(self) -> int:
        return sum(self.flops.values())

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["total_params"] = self.total_params
        d["total_flops"] = self.total_flops
        return d


def model_report(
    specs: list[FeatureSpec],
    connector_config: ConnectorConfig | None = None,
    llm_config: Any = None,
    *,
    encoders: dict[str, PaperEncoder | EncoderCost | tuple[int, int]] | None = None,
    seq_len: int,
    train_llm: bool = True,
) -> ModelReport:
    """Parameters per component and FLOPs per sample, without weights.

    `encoders`: per encoder name a `PaperEncoder` (ViT shapes), an `EncoderCost` (measured), or
    `(params, tokens)`, whose forward FLOPs are taken as 2 * params * tokens; default: the paper
    encoders for the names they know.
    `seq_len` is the LLM sequence (BOS + visual tokens + text); it must hold the visual tokens.
    """
    from .llm import llama2_7b_config

    llm_config = llm_config or llama2_7b_config()
    with torch.device("meta"):
        connector = Connector(specs, llm_config.hidden_size, connector_config or ConnectorConfig())
    report = ModelReport(seq_len=seq_len, visual_tokens=connector.num_tokens)
    if connector.num_tokens + 1 > seq_len:
        raise ValueError(f"seq_len={seq_len} cannot hold BOS + {connector.num_tokens} visual tokens")
    known = {**PAPER_ENCODERS, **(encoders or {})}
    for s in specs:
        enc = known.get(s.name)
        if enc is None:
            continue
        if isinstance(enc, PaperEncoder):
            report.params[f"encoder/{s.name}"] = enc.vit.params()
            report.flops[f"encoder/{s.name}"] = enc.vit.forward_flops(enc.frames)
        elif isinstance(enc, EncoderCost):
            report.params[f"encoder/{s.name}"] = int(enc.params)
            report.flops[f"encoder/{s.name}"] = int(enc.flops)
        else:
            params, tokens = enc
            report.params[f"encoder/{s.name}"] = int(params)
            report.flops[f"encoder/{s.name}"] = 2 * int(params) * int(tokens)
    for s, p in zip(specs, connector.projectors):
        report.params[f"projector/{s.name}"] = sum(x.numel() for x in p.parameters())
    report.params["fusion"] = sum(x.numel() for x in connector.fusion.parameters())
    report.flops["connector"] = 3 * connector_flops(connector)  # always trained: forward + backward
    report.params["llm"] = _llm_params(llm_config)
    report.flops["llm"] = (3 if train_llm else 1) * llm_forward_flops(llm_config, seq_len)
    return report


def _llm_params(config: Any) -> int:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        llm = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in llm.parameters())


# --- training memory: full finetune vs LoRA ----------------------------------------------------

FP32_BYTES = 4  # the trainer keeps fp32 weights (the master copy; bf16 compute copies are transient)
ADAMW_STATE_BYTES = 2 * FP32_BYTES  # AdamW's first and second moments, fp32, per trainable parameter


@dataclass(frozen=True)
class MemoryRow:
    """Parameters and the bytes the trainer holds for them (whole model, before FSDP sharding)."""

    setup: str  # "full finetune" or "LoRA r=..."
    params: int  # every parameter, LoRA adapters included
    trainable: int
    adapters: int = 0  # LoRA parameters (part of `trainable`)

    @property
    def weight_bytes(self) -> int:
        return FP32_BYTES * self.params

    @property
    def grad_bytes(self) -> int:
        return FP32_BYTES * self.trainable

    @property
    def optimizer_bytes(self) -> int:
        return ADAMW_STATE_BYTES * self.trainable

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.grad_bytes + self.optimizer_bytes

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "weight_bytes": self.weight_bytes, "grad_bytes": self.grad_bytes,
                "optimizer_bytes": self.optimizer_bytes, "total_bytes": self.total_bytes}


def training_memory(specs: list[FeatureSpec], connector_config: ConnectorConfig | None = None, llm_config: Any = None,
                    lora: Any = None) -> list[MemoryRow]:
    """Full finetune (connector + LLM train) and, with `lora` (a merv.train.lora.LoraConfig with
    r > 0), LoRA (connector + adapters train): built on the meta device, so no weights and no memory.

    Counts are PEFT's own (the adapters are really added to the meta LLM); activations are not
    included (they depend on batch, sequence and activation checkpointing)."""
    from transformers import AutoModelForCausalLM

    from .llm import llama2_7b_config
    from .lora import apply_lora, is_adapter_param
    from .model import MervModel

    llm_config = llm_config or llama2_7b_config()
    with torch.device("meta"):
        connector = Connector(specs, llm_config.hidden_size, connector_config or ConnectorConfig())
        llm = AutoModelForCausalLM.from_config(llm_config)
    model = MervModel(connector, llm)
    model.set_stage("finetune")
    rows = [MemoryRow("full finetune", _count(model), _count(model, trainable=True))]
    if lora is not None and lora.enabled:
        with torch.device("meta"):
            model.llm = apply_lora(model.llm, lora)
        model.set_stage("finetune")
        adapters = sum(p.numel() for n, p in model.named_parameters() if is_adapter_param(n))
        rows.append(MemoryRow(f"LoRA r={lora.r}", _count(model), _count(model, trainable=True), adapters))
    return rows


def _count(model: torch.nn.Module, trainable: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable)
