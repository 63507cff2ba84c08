"""merv.extract.encoders: the frozen MERV encoders (the paper's four, Hiera, generic specs) behind one interface.

    enc = build_encoder("dinov2")                 # paper weights from the HF cache, offline
    enc = build_encoder("vivit", size="tiny")     # tiny random-init variant (tests, demo)
    enc = build_encoder("hiera")                  # the reference's Hiera-B video expert
    enc = build_encoder("timm:vit_base_patch16_clip_224.openai?layer=-2&frames=16")  # any ViT-style timm model
    enc = build_encoder("hf:facebook/dinov2-base")   # a transformers vision model (repo id or local dir)
    feats = enc.encode(frames)                    # uint8 (B, T, H, W, 3) -> float32 (B, t, h, w, d)
    enc.info.grid, enc.info.dim, enc.info.fingerprint()
"""

from .base import EncoderInfo, FrozenEncoder, library_versions
from ..preprocess import Preprocessing, preprocess_frames
from .registry import ENCODERS, PAPER_ENCODERS, EncoderEntry, build_encoder
from .weights import WeightsError, WeightsNotFoundError, resolve_weights

__all__ = [
    "ENCODERS",
    "PAPER_ENCODERS",
    "EncoderEntry",
    "EncoderInfo",
    "FrozenEncoder",
    "Preprocessing",
    "WeightsError",
    "WeightsNotFoundError",
    "build_encoder",
    "library_versions",
    "preprocess_frames",
    "resolve_weights",
]
