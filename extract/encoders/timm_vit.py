"""Frame-wise image ViTs from timm: DINOv2 (ViT-L/14 + 4 registers) and SigLIP (ViT-B/16).

Like the reference (`get_intermediate_layers(n={len(blocks) - 2})` on a timm model created with
`img_size=224, num_classes=0`) we take the output of the second-to-last block, *without* the final
norm, and keep patch tokens only (timm splits off CLS and register tokens). Each frame is encoded
independently, so any number of frames works and an image is encoded once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from merv.timm_lite import timm

from ..preprocess import Preprocessing
from .base import EncoderInfo, FrozenEncoder, seeded, size_variant
from .weights import assign_state_dict, load_state_dict, weights_identity, weights_to_load

ARCH_KEYS = ("embed_dim", "depth", "num_heads", "img_size")  # the rest of a variant is recorded as `extra`


@dataclass(frozen=True)
class TimmSpec:
    name: str
    arch: str  # timm architecture (no tag)
    tag: str  # pretrained tag: pins the exact weights (timm's default tag can change)
    image_size: int
    # Random-init variants by size: timm kwargs (widths, depth, img_size). They keep the patch
    # size, so a variant's grid is img_size / patch.
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)
    frames: int = 16
    notes: str = ""

    @property
    def model_id(self) -> str:
        return f"timm/{self.arch}.{self.tag}"

    def variant(self, size: str) -> dict[str, Any]:
        """timm kwargs of `size` ({} for the paper architecture)."""
        return size_variant(self.name, {"paper": {}, **self.variants}, size)

    def image_size_of(self, size: str) -> int:
        return int(self.variant(size).get("img_size", self.image_size))

    def extra_of(self, size: str) -> dict[str, Any]:
        return {k: v for k, v in self.variant(size).items() if k not in ARCH_KEYS}


DINOV2 = TimmSpec(
    name="dinov2",
    arch="vit_large_patch14_reg4_dinov2",
    tag="lvd142m",
    image_size=224,
    # DINOv2's LayerScale starts at 1e-5, which would make a random small model an identity map
    # and hide which block is taken; the variants start it at 1.0 (same modules).
    variants={
        "tiny": dict(embed_dim=32, depth=3, num_heads=2, img_size=56, init_values=1.0),
        # benchmark scale: the paper's input and 16x16 grid, depth x width 24 x 1024 -> 6 x 128
        "small": dict(embed_dim=128, depth=6, num_heads=2, img_size=224, init_values=1.0),
    },
    notes="pos_embed of the 518px checkpoint is resampled to 16x16 by timm's checkpoint filter (bicubic, antialias).",
)
SIGLIP = TimmSpec(
    name="siglip",
    arch="vit_base_patch16_siglip_224",
    tag="webli",
    image_size=224,
    variants={
        "tiny": dict(embed_dim=32, depth=3, num_heads=2, img_size=64),
        "small": dict(embed_dim=96, depth=3, num_heads=2, img_size=224),  # 14x14 grid; 12 x 768 -> 3 x 96
    },
    notes=(
        "Pinned to the .webli (SigLIP 1) weights the paper used; timm >= 1.0.15 resolves the untagged "
        "name to .v2_webli (SigLIP 2)."
    ),
)


class TimmViTEncoder(FrozenEncoder):
    """Per-frame timm ViT; output of block `depth - 2`, patch tokens, no final norm."""

    def __init__(self, info: EncoderInfo, model: nn.Module) -> None:
        super().__init__(info)
        self.model = model
        self.take = len(model.blocks) - 2

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        b, t = pixels.shape[:2]
        _, h, w = self.info.grid
        tokens = self.model.forward_intermediates(
            pixels.flatten(0, 1),
            indices=[self.take],
            norm=False,
            stop_early=True,
            output_fmt="NLC",
            intermediates_only=True,
        )[0]
        return tokens.reshape(b, t, h, w, tokens.shape[-1])


def _preprocessing(spec: TimmSpec, image_size: int) -> Preprocessing:
    cfg = timm.models.get_pretrained_cfg(f"{spec.arch}.{spec.tag}")
    return Preprocessing(
        resize="exact",
        size=(image_size, image_size),
        interpolation=cfg.interpolation,
        antialias=True,
        crop=(image_size, image_size),
        mean=tuple(float(v) for v in cfg.mean),
        std=tuple(float(v) for v in cfg.std),
        order="resize_then_normalize",
        quantize=True,
        reference=(
            "timm data config of the pretrained tag with image_resize_strategy='resize-naive' "
            "(merv reference): PIL Resize((S, S)), ToTensor, Normalize"
        ),
    )


def _create(spec: TimmSpec, size: str) -> nn.Module:
    kwargs: dict[str, Any] = dict(pretrained=False, num_classes=0, img_size=spec.image_size)
    kwargs.update(spec.variant(size))
    return timm.create_model(spec.arch, **kwargs)


def build_timm_encoder(
    spec: TimmSpec,
    size: str = "paper",
    weights: str | Path | None = None,
    device: str | torch.device = "cpu",
    allow_download: bool = False,
    meta: bool = False,
    seed: int = 0,
) -> TimmViTEncoder:
    """Build a paper / tiny variant; see `registry.build_encoder` for the argument semantics."""
    random_init, path = weights_to_load(spec.model_id, weights, size, meta=meta, allow_download=allow_download,
                                        aliases=(spec.name,))
    if meta or path is not None:
        with torch.device("meta"):
            model = _create(spec, size)
    else:
        with seeded(seed):
            model = _create(spec, size)
    identity = weights_identity(spec.model_id, size, path, random_init, seed)
    info = _info(spec, size, model, identity)
    encoder = TimmViTEncoder(info, model)
    if path is not None:
        state = load_state_dict(path)
        state = _filter(state, model)
        assign_state_dict(model, state, str(path))
        encoder.weights_source = str(path)
    if not meta:
        encoder.to(device)
    return encoder.finalize()  # type: ignore[return-value]


def _filter(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """timm's own checkpoint filter (pos_embed resampling, format fixes); drop an unused head."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    state = checkpoint_filter_fn(state, model)
    if isinstance(model.head, nn.Identity):
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
    return state


def _info(spec: TimmSpec, size: str, model: nn.Module, identity: str) -> EncoderInfo:
    image_size = spec.image_size_of(size)
    h, w = model.patch_embed.grid_size
    n_reg = int(getattr(model, "num_reg_tokens", 0))
    dropped = (("cls",) if model.has_class_token else ()) + ((f"reg x{n_reg}",) if n_reg else ())
    config = dict(
        timm_model=spec.arch,
        embed_dim=model.embed_dim,
        depth=len(model.blocks),
        num_heads=model.blocks[0].attn.num_heads,
        patch_size=list(model.patch_embed.patch_size),
        img_size=image_size,
        num_prefix_tokens=model.num_prefix_tokens,
        num_reg_tokens=n_reg,
        global_pool=model.global_pool,
        extra=spec.extra_of(size),
    )
    return EncoderInfo(
        name=spec.name,
        size=size,
        model_id=spec.model_id,
        weights=identity,
        architecture=f"timm:{spec.arch}",
        config=config,
        frames=spec.frames,
        image_size=image_size,
        preprocessing=_preprocessing(spec, image_size),
        layer="penultimate",
        layer_detail=f"output of blocks[{len(model.blocks) - 2}] (second to last), final norm NOT applied",
        dropped_tokens=dropped,
        grid=(spec.frames, h, w),
        dim=model.embed_dim,
        framewise=True,
        has_cls=bool(model.has_class_token),
        notes=spec.notes,
    )
