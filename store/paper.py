"""The paper's four encoders: the one table of facts every layer reads.

Extraction takes model ids and frame counts from here, the store sizes its shards from the feature
shapes, the accounting and the published-checkpoint conversion take grids, widths and reference
ids, and the CLI, the demo and the benchmarks take the encoder order. It lives in `merv.store`, the
bottom of the import graph, so that each of them can read it without importing the others.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PaperEncoder:
    """One of MERV's encoders as the paper uses it (DESIGN.md table, the reference's configs)."""

    name: str  # registry name
    model_id: str  # published weights (Hub repo id; timm ids carry their pretrained tag)
    reference_id: str  # `video_backbone_id` in the reference's configs and checkpoints
    frames: int  # input frames per sample
    grid: tuple[int, int, int]  # (t, h, w) of the cached features: patch tokens only
    dim: int
    framewise: bool  # encodes each frame on its own (an image is then encoded once)


PAPER_ENCODERS: dict[str, PaperEncoder] = {
    "languagebind": PaperEncoder("languagebind", "LanguageBind/LanguageBind_Video_merge", "languagebind-video-noclass",
                                 16, (16, 16, 16), 1024, False),
    "dinov2": PaperEncoder("dinov2", "timm/vit_large_patch14_reg4_dinov2.lvd142m", "dinov2-video-all-tokens",
                           16, (16, 16, 16), 1024, True),
    "vivit": PaperEncoder("vivit", "google/vivit-b-16x2-kinetics400", "vivit-google-b-all-no-cls-16frames",
                          32, (16, 14, 14), 768, False),
    "siglip": PaperEncoder("siglip", "timm/vit_base_patch16_siglip_224.webli", "siglip-vit-b16-224px-all-no-cls",
                           16, (16, 14, 14), 768, True),
}
# The reference's order: fusion order and published checkpoints' layout (projectors.0 = LanguageBind).
PAPER_ENCODER_NAMES: tuple[str, ...] = tuple(PAPER_ENCODERS)


def largest_paper_feature_bytes(grid: tuple[int, int] | None) -> int:
    """float16 bytes of one video's features of the paper's largest encoder, at `grid` (None:
    each encoder's native grid): the per-sample size that sizes a store's shards by default."""
    def nbytes(enc: PaperEncoder) -> int:
        t, h, w = enc.grid
        if grid is not None:
            h, w = grid
        return t * h * w * enc.dim * 2

    return max(nbytes(e) for e in PAPER_ENCODERS.values())
