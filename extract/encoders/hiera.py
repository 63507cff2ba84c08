"""Hiera-B video (`facebook/hiera_base_16x224.mae_k400_ft_k400`), the reference's `hiera-base-video`.

The MERV reference loads it with `Hiera.from_pretrained` (facebookresearch/hiera) and takes
`forward(x, return_intermediates=True)[1][-1]`: the output of the last stage, re-rolled to
spatial-temporal order, without the final norm. 16 frames in (patch stride 2x4x4, three 2x2
spatial poolings) -> 8 x 7 x 7 tokens of width 768. Preprocessing as the reference's
`resize-naive`: torchvision `Resize((224, 224))` (bilinear, the interpolation of its
`Resize(256)`), `ToTensor`, `Normalize(0.45, 0.225)`.

The architecture is timm's `Hiera` with the video model's arguments (3D patch embedding, separate
spatial / temporal position embeddings, q_stride 1x2x2): timm's port keeps the original module
names, so its checkpoint filter reads the published state dict (`norm.` -> `head.norm.`), loaded
strictly. Temporal: exactly 16 frames per clip (an image is its frame repeated 16 times).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..preprocess import Preprocessing
from .base import EncoderInfo, FrozenEncoder, seeded, size_variant
from .weights import assign_state_dict, load_state_dict, weights_identity, weights_to_load

NAME = "hiera"
MODEL_ID = "facebook/hiera_base_16x224.mae_k400_ft_k400"
FRAMES = 16
_VIDEO = {"q_stride": (1, 2, 2), "mask_unit_size": (1, 8, 8), "patch_kernel": (3, 7, 7), "patch_stride": (2, 4, 4),
              "patch_padding": (1, 3, 3), "sep_pos_embed": True}
PAPER = dict(_VIDEO, embed_dim=96, num_heads=1, stages=(2, 3, 16, 3), img_size=(FRAMES, 224, 224))
# tests: 4x4 final grid (128 px / 4 / 2^3), widths 16..128
TINY = dict(_VIDEO, embed_dim=16, num_heads=1, stages=(1, 1, 1, 1), img_size=(FRAMES, 128, 128))
# benchmark scale: the paper's input and 8x7x7 grid, depth 24 -> 5, widths / 3
SMALL = dict(_VIDEO, embed_dim=32, num_heads=1, stages=(1, 1, 2, 1), img_size=(FRAMES, 224, 224))
CONFIGS = {"paper": PAPER, "tiny": TINY, "small": SMALL}


class HieraVideoEncoder(FrozenEncoder):
    """Exactly 16 frames in; the last stage's (8, h, w, d) out."""

    def __init__(self, info: EncoderInfo, model: nn.Module) -> None:
        super().__init__(info)
        self.model = model
        self.last_stage = len(model.stage_ends) - 1

    def check_frames(self, t: int) -> None:
        if t != self.info.frames:
            raise ValueError(f"hiera takes exactly {self.info.frames} frames per clip (temporal stride 2 -> "
                             f"{self.info.grid[0]} temporal tokens), got {t}; images: repeat the frame")

    def output_grid(self, t: int) -> tuple[int, int, int]:
        self.check_frames(t)
        return self.info.grid

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        video = pixels.permute(0, 2, 1, 3, 4)  # (B, 3, T, S, S): Conv3d layout
        return self.model.forward_intermediates(video, indices=[self.last_stage], norm=False, stop_early=True,
                                                output_fmt="NHWC", intermediates_only=True)[0]


def _create(size: str) -> nn.Module:
    """timm's Hiera class itself: `create_model` checks that img_size is 2D (H, W), a video's is 3D."""
    from timm.models.hiera import Hiera

    return Hiera(num_classes=0, **size_variant(NAME, CONFIGS, size))


def build_hiera(
    size: str = "paper",
    weights: str | Path | None = None,
    device: str | torch.device = "cpu",
    allow_download: bool = False,
    meta: bool = False,
    seed: int = 0,
) -> HieraVideoEncoder:
    """See `registry.build_encoder` for the arguments."""
    random_init, path = weights_to_load(MODEL_ID, weights, size, meta=meta, allow_download=allow_download,
                                        aliases=(NAME,), extra_files=("config.json",))
    if meta or path is not None:
        with torch.device("meta"):
            model = _create(size)
    else:
        with seeded(seed):
            model = _create(size)
    encoder = HieraVideoEncoder(_info(size, model, weights_identity(MODEL_ID, size, path, random_init, seed)), model)
    if path is not None:
        assign_state_dict(model, _filter(load_state_dict(path)), str(path))
        encoder.weights_source = str(path)
    if not meta:
        encoder.to(device)
    return encoder.finalize()  # type: ignore[return-value]


def _filter(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm's Hiera checkpoint filter (original names -> timm's); the K400 classifier is not used."""
    from timm.models.hiera import checkpoint_filter_fn

    return {k: v for k, v in checkpoint_filter_fn(state).items() if not k.startswith("head.fc.")}


def _preprocessing(image_size: int) -> Preprocessing:
    return Preprocessing(
        resize="exact", size=(image_size, image_size), interpolation="bilinear", antialias=True,
        crop=(image_size, image_size), mean=(0.45, 0.45, 0.45), std=(0.225, 0.225, 0.225),
        order="resize_then_normalize", quantize=True,
        reference="merv reference hiera.py with resize-naive: PIL Resize((S, S), bilinear), ToTensor, Normalize(0.45, 0.225)",
    )


def _info(size: str, model: Any, identity: str) -> EncoderInfo:
    arch = size_variant(NAME, CONFIGS, size)
    t, s = arch["img_size"][0], arch["img_size"][-1]
    last = model.feature_info[-1]
    grid = (t // arch["patch_stride"][0], s // int(last["reduction"]), s // int(last["reduction"]))
    return EncoderInfo(
        name=NAME,
        size=size,
        model_id=MODEL_ID,
        weights=identity,
        architecture="timm:Hiera(video)",
        config={k: list(v) if isinstance(v, tuple) else v for k, v in arch.items()},
        frames=FRAMES,
        image_size=s,
        preprocessing=_preprocessing(s),
        layer="last",
        layer_detail=f"output of the last stage (blocks[{model.stage_ends[-1]}]) re-rolled to (t, h, w); final norm NOT applied",
        dropped_tokens=(),
        grid=grid,
        dim=int(last["num_chs"]),
        framewise=False,
        has_cls=False,
        notes="reference: forward(x, return_intermediates=True)[1][-1] of facebookresearch/hiera's Hiera",
    )
