"""`hf:<repo id | local dir>`: a transformers ViT-style vision model, frame-wise.

Design choices (also in the README):
- Where the model comes from: `hf:/abs/dir` (or `./dir`, `~/dir`) is a directory written by
  `save_pretrained` (config.json, weights, preprocessor_config.json); `hf:org/name` is a Hub repo id
  found offline in `--weights DIR` or the HF cache (downloaded only with `allow_download`). No
  remote code runs. A composite image-text config (CLIP, SigLIP) loads its vision tower
  (`CLIPVisionModel`, `SiglipVisionModel`), which transformers reads from the full checkpoint.
- The feature is `hidden_states[layer]` (`output_hidden_states=True`; index 0 is the embeddings,
  so the default -2 is the output of the second-to-last layer, no final norm) with the prefix
  tokens (CLS, registers) dropped: the last (image_size / patch_size)^2 tokens are the patch grid.
- Preprocessing from the repo's image processor config (`preprocessor_config.json`: resample,
  mean, std), applied resize-naive to the model's `image_size`, as MERV does for every image expert.
- Sizes: an `hf:` model is whatever the repo holds; `size` does not shrink it (tiny tests use a
  tiny saved model). `weights="random"`: random init of the repo's config with `seed`.
- Frame-wise (`frames` per clip, default 16). Video transformers (e.g. ViViT, VideoMAE) are out of
  scope for the generic path: their tubelet grid and frame count need their own rules (as `vivit`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from merv.store.encoder_names import EncoderNameError, GenericSpec, slug

from ..preprocess import Preprocessing
from .base import EncoderInfo, FrozenEncoder, seeded
from .weights import WeightsError, resolve_weights, wants_random_init

CONFIG_FILES = ("config.json", "preprocessor_config.json")
_RESAMPLE = {2: "bilinear", 3: "bicubic", "bilinear": "bilinear", "bicubic": "bicubic"}


class HFGenericEncoder(FrozenEncoder):
    """Per-frame transformers vision model; `hidden_states[tap]`, patch tokens, as (t, h, w, d)."""

    def __init__(self, info: EncoderInfo, model: nn.Module, tap: int) -> None:
        super().__init__(info)
        self.model = model
        self.tap = tap

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        b, t = pixels.shape[:2]
        _, h, w = self.info.grid
        hidden = self.model(pixel_values=pixels.flatten(0, 1), output_hidden_states=True).hidden_states[self.tap]
        if hidden.dim() != 3 or hidden.shape[1] < h * w:
            raise RuntimeError(f"{self.info.name}: hidden state of shape {tuple(hidden.shape)} is not a token sequence "
                               f"holding a {h}x{w} patch grid; not a ViT-style model")
        tokens = hidden[:, hidden.shape[1] - h * w:]  # prefix tokens (CLS, registers) come first
        return tokens.reshape(b, t, h, w, tokens.shape[-1])


def model_dir(spec: GenericSpec, weights: str | Path | None = None, allow_download: bool = False) -> Path:
    """The local directory holding the model (see module doc); raises WeightsNotFoundError naming it."""
    target = spec.target
    local = Path(target).expanduser()
    if target.startswith(("/", ".", "~")) or local.is_dir():
        if not (local / "config.json").is_file():
            raise EncoderNameError(f"encoder {spec.name!r}: {local} is not a transformers model directory (no config.json); "
                                   "write one with model.save_pretrained(dir) and image_processor.save_pretrained(dir)")
        return local.resolve()
    given = None if weights == "random" else weights
    return resolve_weights(target, given, allow_download=allow_download, aliases=(slug(spec.name),),
                           extra_files=CONFIG_FILES).parent


def _model_class(spec: GenericSpec, config: Any) -> Any:
    import transformers

    if getattr(config, "vision_config", None) is not None:  # image-text model: its vision tower
        cls = getattr(transformers, type(config).__name__.replace("Config", "VisionModel"), None)
        if cls is None:
            raise EncoderNameError(f"encoder {spec.name!r}: {type(config).__name__} has no vision-tower class in "
                                   "transformers; save the vision model on its own and point hf: at that directory")
        return cls, config.vision_config
    from transformers import AutoModel

    try:
        cls = AutoModel._model_mapping[type(config)]
    except KeyError:
        raise EncoderNameError(f"encoder {spec.name!r}: transformers has no model for {type(config).__name__}") from None
    return cls, config


def build_hf_generic(
    spec: GenericSpec,
    size: str = "paper",
    weights: str | Path | None = None,
    device: str | torch.device = "cpu",
    allow_download: bool = False,
    meta: bool = False,
    seed: int = 0,
) -> HFGenericEncoder:
    """Build `hf:<repo | dir>`; see `registry.build_encoder` for the arguments (and the module doc for size)."""
    from transformers import AutoConfig
    from transformers.utils import logging as hf_logging

    directory = model_dir(spec, weights, allow_download)
    try:
        config = AutoConfig.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise EncoderNameError(f"encoder {spec.name!r}: cannot read the model config in {directory}: {exc}") from exc
    cls, vision_config = _model_class(spec, config)
    for key in ("image_size", "patch_size"):
        if not isinstance(getattr(vision_config, key, None), int):
            raise EncoderNameError(f"encoder {spec.name!r}: {type(vision_config).__name__} has no integer {key}: "
                                   "not a ViT-style model (supported: ViT, DINOv2, CLIP / SigLIP vision towers, ...)")
    random_init = wants_random_init(weights, "paper")
    weights_file = _weights_file(directory)
    if meta:
        with torch.device("meta"):
            model = cls._from_config(vision_config)
    elif random_init:
        with seeded(seed):
            model = cls._from_config(vision_config)
    else:
        verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
        hf_logging.set_verbosity_error()  # an unused text tower / pooler in the checkpoint is expected
        hf_logging.disable_progress_bar()  # one bar per encoder build is noise in extraction logs
        try:
            model = cls.from_pretrained(str(directory), local_files_only=True, dtype=torch.float32)
        except Exception as exc:
            raise WeightsError(f"{directory}: cannot load {cls.__name__} weights: {str(exc)[:300]}") from exc
        finally:
            hf_logging.set_verbosity(verbosity)
            if bars:
                hf_logging.enable_progress_bar()
    layers = int(getattr(vision_config, "num_hidden_layers", 0))
    tap = spec.layer + layers + 1 if spec.layer < 0 else spec.layer
    if not 0 <= tap <= layers:
        raise EncoderNameError(f"encoder {spec.name!r}: layer={spec.layer} is outside hidden_states 0..{layers} "
                               f"(use {-(layers + 1)}..{layers}; 0 is the embeddings)")
    if random_init:
        identity = f"random-init(seed={seed})"
    elif weights_file is not None and Path(spec.target).expanduser().is_dir():
        identity = "file:" + hashlib.sha256(weights_file.read_bytes()).hexdigest()
    else:
        identity = f"pretrained:{spec.target}"
    info = _info(spec, directory, cls.__name__, vision_config, tap, layers, identity)
    encoder = HFGenericEncoder(info, model, tap)
    encoder.weights_source = None if random_init else str(directory)
    if not meta:
        encoder.to(device)
    return encoder.finalize()  # type: ignore[return-value]


def _weights_file(directory: Path) -> Path | None:
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (directory / name).is_file():
            return directory / name
    return None


def _preprocessing(spec: GenericSpec, directory: Path, image_size: int) -> Preprocessing:
    path = directory / "preprocessor_config.json"
    if not path.is_file():
        raise EncoderNameError(f"encoder {spec.name!r}: {directory} has no preprocessor_config.json; save the model's "
                               "image processor there (image_processor.save_pretrained(dir))")
    cfg = json.loads(path.read_text())
    resample = _RESAMPLE.get(cfg.get("resample", 3))
    if resample is None:
        raise EncoderNameError(f"encoder {spec.name!r}: image processor resample {cfg.get('resample')!r} is not "
                               "bilinear (2) or bicubic (3)")
    if cfg.get("do_rescale", True) and abs(float(cfg.get("rescale_factor", 1 / 255)) - 1 / 255) > 1e-9:
        raise EncoderNameError(f"encoder {spec.name!r}: rescale_factor {cfg.get('rescale_factor')} is not 1/255")
    normalize = cfg.get("do_normalize", True)
    mean = tuple(float(v) for v in cfg.get("image_mean", (0.0,) * 3)) if normalize else (0.0, 0.0, 0.0)
    std = tuple(float(v) for v in cfg.get("image_std", (1.0,) * 3)) if normalize else (1.0, 1.0, 1.0)
    return Preprocessing(
        resize="exact", size=(image_size, image_size), interpolation=resample, antialias=True,  # type: ignore[arg-type]
        crop=(image_size, image_size), mean=mean, std=std,  # type: ignore[arg-type]
        order="resize_then_normalize", quantize=True,
        reference=f"{cfg.get('image_processor_type', 'image processor')} of {spec.target} (resample, mean, std) "
                  "with resize-naive to the model's image_size",
    )


def _info(spec: GenericSpec, directory: Path, cls_name: str, config: Any, tap: int, layers: int,
          identity: str) -> EncoderInfo:
    image_size, patch = int(config.image_size), int(config.patch_size)
    h = w = image_size // patch
    arch = {k: v for k, v in config.to_dict().items()
            if isinstance(v, (int, float, str, bool)) and k not in ("transformers_version", "_name_or_path")}
    return EncoderInfo(
        name=spec.name,
        size="paper",
        model_id=spec.target,
        weights=identity,
        architecture=f"transformers:{cls_name}",
        config=arch,
        frames=spec.frames,
        image_size=image_size,
        preprocessing=_preprocessing(spec, directory, image_size),
        layer=f"{spec.layer}",
        layer_detail=f"hidden_states[{tap}] of {layers + 1} (0 = embeddings), final norm NOT applied, prefix tokens dropped",
        dropped_tokens=("prefix tokens (CLS / registers) before the last h*w",),
        grid=(spec.frames, h, w),
        dim=int(config.hidden_size),
        framewise=True,
        has_cls=cls_name.replace("Vision", "").startswith(("CLIP", "ViT", "Dinov2")),
        notes="generic transformers encoder (merv.extract.encoders.generic_hf)",
    )
