"""`timm:<arch>.<tag>`: any timm model with a patch embedding and `forward_intermediates`.

Design choices (also in the README):
- The feature is `forward_intermediates(indices=[layer], norm=False, output_fmt="NCHW")`: timm's own
  tap, so "layer" means what timm means by it (a block of a plain ViT / EVA / DeiT3, a stage of a
  hierarchical Hiera); negative indices count from the end (default -2, the paper's penultimate).
  NCHW is timm's spatial layout: prefix tokens (CLS, registers, distillation) are dropped by timm.
- The grid comes from the tap's `feature_info` reduction (the patch size of a plain ViT).
- Preprocessing comes from the tag's `pretrained_cfg` (size, interpolation, mean, std), applied the
  way MERV applies every image expert's: resize-naive to S x S (no crop_pct crop), as the reference.
- Sizes: `paper` = the published weights, read offline through timm's own loader (its checkpoint
  filter) from the HF cache or `--weights`; `tiny` / `small` = random-init reduced widths for the
  families that take such kwargs (ViT-style: embed_dim / depth / num_heads; Hiera: stages);
  `weights="random"` = random init of the full architecture.
- Frame-wise: every frame is encoded on its own (`frames` per clip, default 16).
Convolutional models (no patch embedding) are refused: their "tokens" are not a ViT grid.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from merv.store.encoder_names import EncoderNameError, GenericSpec, slug
from merv.timm_lite import timm

from ..preprocess import Preprocessing
from .base import EncoderInfo, FrozenEncoder, seeded
from .weights import WeightsError, weights_identity, weights_to_load

# Reduced random-init variants per timm family (model class), by size. Plain ViT-like families
# take widths and depth; Hiera takes its stage depths. img_size is set from the patch size.
_VIT_LIKE = {
    "tiny": {"embed_dim": 32, "depth": 3, "num_heads": 2},
    "small": {"embed_dim": 96, "depth": 3, "num_heads": 2},
}
_HIERA = {
    "tiny": {"embed_dim": 16, "num_heads": 1, "stages": (1, 1, 1, 1)},
    "small": {"embed_dim": 32, "num_heads": 1, "stages": (1, 1, 2, 1)},
}
FAMILY_VARIANTS: dict[str, dict[str, dict[str, Any]]] = {
    "VisionTransformer": _VIT_LIKE, "Eva": _VIT_LIKE, "Beit": _VIT_LIKE, "VisionTransformerDistilled": _VIT_LIKE,
    "Hiera": _HIERA,
}
TINY_GRID = 4  # tiny variants: a 4x4 grid at the last block / stage (tests)


class TimmGenericEncoder(FrozenEncoder):
    """Per-frame timm model; the tap `info.config["tap"]` of forward_intermediates, as (t, h, w, d)."""

    def __init__(self, info: EncoderInfo, model: nn.Module, tap: int) -> None:
        super().__init__(info)
        self.model = model
        self.tap = tap

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        b, t = pixels.shape[:2]
        fmap = self.model.forward_intermediates(pixels.flatten(0, 1), indices=[self.tap], norm=False, stop_early=True,
                                                output_fmt="NCHW", intermediates_only=True)[0]
        x = fmap.permute(0, 2, 3, 1)  # (N, h, w, d)
        return x.reshape(b, t, *x.shape[1:])


def _split_target(spec: GenericSpec) -> tuple[str, str]:
    arch, _, tag = spec.target.partition(".")
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else " (see timm.list_models('*vit*'))"
        raise EncoderNameError(f"encoder {spec.name!r}: timm has no architecture {arch!r}{hint}")
    if not tag or f"{arch}.{tag}" not in timm.list_pretrained(f"{arch}.*"):
        tags = [n.partition(".")[2] for n in timm.list_pretrained(f"{arch}.*")]
        raise EncoderNameError(
            f"encoder {spec.name!r}: timm:{arch} needs one of its pretrained tags to pin the weights and preprocessing "
            f"(timm:{arch}.<tag>); tags: {', '.join(tags) or 'none (timm has no weights for it)'}")
    return arch, tag


def _variant(spec: GenericSpec, family: str, patch: int, image_size: int, size: str) -> dict[str, Any]:
    if size == "paper":
        return {}
    variants = FAMILY_VARIANTS.get(family)
    if variants is None:
        raise ValueError(f"{spec.name}: no {size!r} variant for timm family {family} (reduced widths exist for "
                         f"{', '.join(sorted(FAMILY_VARIANTS))}); use size 'paper' (with weights 'random' for a random init)")
    kwargs = dict(variants[size])
    if size == "tiny":
        kwargs["img_size"] = TINY_GRID * patch * (8 if family == "Hiera" else 1)  # Hiera: 3 x 2x pooling of 4x4 patches
    else:
        kwargs["img_size"] = image_size
    return kwargs


def _check_vit_style(spec: GenericSpec, model: nn.Module) -> None:
    if not (hasattr(model, "patch_embed") and hasattr(model, "forward_intermediates") and getattr(model, "feature_info", None)):
        raise EncoderNameError(
            f"encoder {spec.name!r}: {type(model).__name__} is not a ViT-style model (no patch embedding / token "
            "grid with forward_intermediates); use a ViT-style timm family (vit_*, deit3_*, eva*, beit*, hiera_*)")


def _patch(model: nn.Module) -> int:
    patch = getattr(model.patch_embed, "patch_size", None) or getattr(model, "patch_stride", (4,))
    return int(patch[0] if isinstance(patch, (tuple, list)) else patch)


def build_timm_generic(
    spec: GenericSpec,
    size: str = "paper",
    weights: str | Path | None = None,
    device: str | torch.device = "cpu",
    allow_download: bool = False,
    meta: bool = False,
    seed: int = 0,
) -> TimmGenericEncoder:
    """Build `timm:<arch>.<tag>`; see `registry.build_encoder` for the arguments."""
    arch, tag = _split_target(spec)
    cfg = timm.models.get_pretrained_cfg(f"{arch}.{tag}")
    image_size = int(cfg.input_size[-1])
    with torch.device("meta"):
        probe = timm.create_model(arch, pretrained=False, num_classes=0)
    _check_vit_style(spec, probe)
    family = type(probe).__name__
    variant = _variant(spec, family, _patch(probe), image_size, size)
    model_id = f"timm/{arch}.{tag}"
    random_init, path = weights_to_load(model_id, weights, size, meta=meta, allow_download=allow_download,
                                        aliases=(slug(spec.name), arch))
    kwargs: dict[str, Any] = dict(num_classes=0, **variant)
    if path is not None:
        try:  # timm's own loader: its checkpoint filter (pos-embed resampling, key renames), strict
            model = timm.create_model(f"{arch}.{tag}", pretrained=True, pretrained_cfg_overlay={"file": str(path)},
                                      **kwargs)
        except (RuntimeError, KeyError, ValueError) as exc:
            raise WeightsError(f"{path}: cannot load as timm {arch}.{tag}: {str(exc)[:300]}") from exc
    elif meta:
        with torch.device("meta"):
            model = timm.create_model(arch, pretrained=False, **kwargs)
    else:
        with seeded(seed):
            model = timm.create_model(arch, pretrained=False, **kwargs)
    taps = len(model.feature_info)
    tap = spec.layer + taps if spec.layer < 0 else spec.layer
    if not 0 <= tap < taps:
        raise EncoderNameError(f"encoder {spec.name!r}: layer={spec.layer} is outside the {taps} taps of "
                               f"{arch}'s forward_intermediates (use {-taps}..{taps - 1})")
    identity = weights_identity(model_id, size, path, random_init, seed)
    encoder = TimmGenericEncoder(_info(spec, arch, tag, cfg, size, model, variant, tap, identity), model, tap)
    encoder.weights_source = str(path) if path is not None else None
    if not meta:
        encoder.to(device)
    return encoder.finalize()  # type: ignore[return-value]


def _info(spec: GenericSpec, arch: str, tag: str, cfg: Any, size: str, model: nn.Module, variant: dict[str, Any],
          tap: int, identity: str) -> EncoderInfo:
    image_size = int(variant.get("img_size", cfg.input_size[-1]))
    feat = model.feature_info[tap]
    h = w = image_size // int(feat["reduction"])
    prefix = int(getattr(model, "num_prefix_tokens", 0))
    n_reg = int(getattr(model, "num_reg_tokens", 0))
    has_cls = bool(getattr(model, "has_class_token", getattr(model, "cls_token", None) is not None))
    dropped = (("cls",) if has_cls else ()) + ((f"reg x{n_reg}",) if n_reg else ())
    other = prefix - int(has_cls) - n_reg  # e.g. DeiT's distillation token
    dropped += (f"prefix x{other}",) if other > 0 else ()
    preprocessing = Preprocessing(
        resize="exact", size=(image_size, image_size), interpolation=cfg.interpolation, antialias=True,
        crop=(image_size, image_size), mean=tuple(float(v) for v in cfg.mean), std=tuple(float(v) for v in cfg.std),
        order="resize_then_normalize", quantize=True,
        reference=f"timm pretrained_cfg of {arch}.{tag} (interpolation, mean, std) with resize-naive to S x S",
    )
    return EncoderInfo(
        name=spec.name,
        size=size,
        model_id=f"timm/{arch}.{tag}",
        weights=identity,
        architecture=f"timm:{arch}",
        config={"timm_model": arch, "family": type(model).__name__, "taps": len(model.feature_info), "tap": tap,
                    "variant": {k: list(v) if isinstance(v, tuple) else v for k, v in variant.items()},
                    "num_prefix_tokens": prefix, "img_size": image_size},
        frames=spec.frames,
        image_size=image_size,
        preprocessing=preprocessing,
        layer=f"{spec.layer}",
        layer_detail=(f"forward_intermediates(indices=[{tap}]) of {len(model.feature_info)} taps ({feat.get('module')}), "
                      "final norm NOT applied, prefix tokens dropped by timm"),
        dropped_tokens=dropped,
        grid=(spec.frames, h, w),
        dim=int(feat["num_chs"]),
        framewise=True,
        has_cls=has_cls,
        notes="generic timm encoder (merv.extract.encoders.generic_timm)",
    )
