"""ViViT-B/16x2 from transformers (`VivitModel`: joint space-time attention over tubelet tokens).

32 frames in, tubelets of 2x16x16 -> 16 x 14 x 14 tokens. As in the reference
(`vivit-google-b-all-no-cls-16frames`) the feature is `last_hidden_state` (after the final
LayerNorm) without the CLS token.

Preprocessing follows the reference: torchvision `Resize((224, 224))` (resize-naive, bilinear, the
interpolation of the processor's Resize), `ToTensor` (x / 255), `Normalize(image_mean=0.5,
image_std=0.5)`, i.e. pixels in [-1, 1] -- the range ViViT was trained with. Note that
`VivitImageProcessor` itself would rescale with offset (x / 127.5 - 1) *and then* normalise with
mean / std 0.5, giving [-3, 1]; the reference (and this module) do not do that.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch
from transformers import VivitConfig, VivitModel
from transformers.utils import logging as hf_logging

from .base import EncoderInfo, FrozenEncoder, seeded, size_variant
from ..preprocess import Preprocessing
from .weights import WEIGHT_FILES, WeightsError, weights_identity, weights_to_load

NAME = "vivit"
MODEL_ID = "google/vivit-b-16x2-kinetics400"
PAPER = dict(
    hidden_size=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    intermediate_size=3072,
    image_size=224,
    num_frames=32,
    tubelet_size=[2, 16, 16],
    hidden_act="gelu_fast",
    layer_norm_eps=1e-6,
    qkv_bias=True,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)
TINY = dict(PAPER, hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64, image_size=64)
# benchmark scale: the paper's input and 16 x 14 x 14 tubelets, depth x width 12 x 768 -> 3 x 96
SMALL = dict(PAPER, hidden_size=96, num_hidden_layers=3, num_attention_heads=2, intermediate_size=384)
CONFIGS = {"paper": PAPER, "tiny": TINY, "small": SMALL}


class VivitEncoder(FrozenEncoder):
    """Exactly `frames` (32) frames in; (16, h, w, d) out."""

    def __init__(self, info: EncoderInfo, model: VivitModel) -> None:
        super().__init__(info)
        self.model = model

    def check_frames(self, t: int) -> None:
        if t != self.info.frames:
            raise ValueError(
                f"vivit takes exactly {self.info.frames} frames per clip (tubelet 2 -> {self.info.grid[0]} "
                f"temporal tokens), got {t}; decode {self.info.frames} frames (images: repeat the frame)"
            )

    def output_grid(self, t: int) -> tuple[int, int, int]:
        self.check_frames(t)
        return self.info.grid

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        b = pixels.shape[0]
        t, h, w = self.info.grid
        tokens = self.model(pixel_values=pixels).last_hidden_state[:, 1:]  # drop CLS
        # Conv3d patches flatten as (t, h, w): token index = (ti * h + hi) * w + wi.
        return tokens.reshape(b, t, h, w, tokens.shape[-1])


def _preprocessing(image_size: int) -> Preprocessing:
    return Preprocessing(
        resize="exact",
        size=(image_size, image_size),
        interpolation="bilinear",
        antialias=True,
        crop=(image_size, image_size),
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        order="resize_then_normalize",
        quantize=True,
        reference=(
            "merv reference vivit.py with resize-naive: PIL Resize((S, S), bilinear), ToTensor, "
            "Normalize(VivitImageProcessor.image_mean / image_std = 0.5)"
        ),
    )


def build_vivit(
    size: str = "paper",
    weights: str | Path | None = None,
    device: str | torch.device = "cpu",
    allow_download: bool = False,
    meta: bool = False,
    seed: int = 0,
) -> VivitEncoder:
    config = VivitConfig(**size_variant(NAME, CONFIGS, size))
    random_init, path = weights_to_load(MODEL_ID, weights, size, meta=meta, allow_download=allow_download,
                                        aliases=(NAME,), extra_files=("config.json",))
    if path is not None:
        model = _from_pretrained(path, config)
    elif meta:
        with torch.device("meta"):
            model = VivitModel(config, add_pooling_layer=False)
    else:
        with seeded(seed):
            model = VivitModel(config, add_pooling_layer=False)
    identity = weights_identity(MODEL_ID, size, path, random_init, seed)
    info = _info(size, config, identity)
    encoder = VivitEncoder(info, model)
    encoder.weights_source = str(path) if path is not None else None
    if not meta:
        encoder.to(device)
    return encoder.finalize()  # type: ignore[return-value]


def _from_pretrained(path: Path, config: VivitConfig) -> VivitModel:
    """Load through transformers so its checkpoint-name conversions apply (the hub checkpoint is a
    `VivitForVideoClassification` with a `vivit.` prefix and pre-v5 module names).

    `from_pretrained` needs a directory; a lone weights file under another name is staged in a
    temporary directory under the standard name.
    """
    directory, staged = path.parent, None
    if path.name not in WEIGHT_FILES:
        staged = Path(tempfile.mkdtemp(prefix="merv-vivit-"))
        target = "model.safetensors" if path.suffix == ".safetensors" else "pytorch_model.bin"
        (staged / target).symlink_to(path.resolve())
        directory = staged
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the classifier head it skips is expected; we check the rest
    try:
        model, report = VivitModel.from_pretrained(
            str(directory),
            config=config,
            add_pooling_layer=False,
            local_files_only=True,
            output_loading_info=True,
            dtype=torch.float32,
        )
    except Exception as exc:
        raise WeightsError(f"{path}: cannot load ViViT weights: {exc}") from exc
    finally:
        hf_logging.set_verbosity(verbosity)
        if staged is not None:
            shutil.rmtree(staged, ignore_errors=True)
    missing = [k for k in report.get("missing_keys", []) if not k.startswith("pooler.")]
    if missing or report.get("mismatched_keys"):
        raise WeightsError(f"{path}: ViViT checkpoint lacks {missing[:8]} / mismatched {report.get('mismatched_keys')}")
    return model


def _info(size: str, config: VivitConfig, identity: str) -> EncoderInfo:
    tt, th, tw = config.tubelet_size
    grid = (config.num_frames // tt, config.image_size // th, config.image_size // tw)
    arch = {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in size_variant(NAME, CONFIGS, size).items()}
    return EncoderInfo(
        name="vivit",
        size=size,
        model_id=MODEL_ID,
        weights=identity,
        architecture="transformers:VivitModel",
        config=arch,
        frames=config.num_frames,
        image_size=config.image_size,
        preprocessing=_preprocessing(config.image_size),
        layer="last",
        layer_detail="last_hidden_state of VivitModel (after the final LayerNorm), no pooler",
        dropped_tokens=("cls",),
        grid=grid,
        dim=config.hidden_size,
        framewise=False,
        has_cls=True,
        notes="VivitImageProcessor's offset rescale + 0.5 normalisation ([-3, 1]) is not used; see module doc.",
    )
