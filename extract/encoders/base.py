"""The frozen-encoder contract shared by every encoder: `EncoderInfo` + `FrozenEncoder`.

An encoder turns uint8 frames (B, T, H, W, 3) into float32 features (B, t, h, w, d), always in
(t, h, w, d) order, so the store and the projectors never need to know which model produced them.
`EncoderInfo.fingerprint()` hashes everything that changes those numbers; the store keys its
encoder groups by it, so a changed recipe can never be mistaken for a cached one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn

from ..preprocess import Preprocessing

T = TypeVar("T")


@dataclass(frozen=True)
class EncoderInfo:
    """What an encoder is and produces. Everything but `notes` (and the preprocessing's
    `reference` text) feeds the fingerprint."""

    name: str  # registry name (dinov2 | siglip | vivit | languagebind | hiera) or canonical spec (timm:... / hf:...)
    size: str  # "paper", "small" or "tiny"
    model_id: str  # published weights this architecture belongs to (hub id incl. tag)
    weights: str  # identity of the numbers: "pretrained:<model_id>", "random-init(seed=N)", "file:<sha256>"
    architecture: str  # implementation, e.g. "timm:vit_large_patch14_reg4_dinov2"
    config: Mapping[str, Any]  # architecture numbers (width, depth, heads, patch, ...)
    frames: int  # frames in per clip (temporal encoders need exactly this many / a multiple)
    image_size: int
    preprocessing: Preprocessing
    layer: str  # "penultimate" or "last"; a generic spec's index as given (e.g. "-2"), see layer_detail
    layer_detail: str  # precisely which tensor, and whether a final norm is applied
    dropped_tokens: tuple[str, ...]  # prefix tokens removed from the output, e.g. ("cls", "reg x4")
    grid: tuple[int, int, int]  # (t, h, w) for `frames` input frames
    dim: int
    framewise: bool  # each frame encoded independently: any T works, an image is encoded once
    has_cls: bool  # the model has a CLS token (always dropped from the output)
    notes: str = field(default="", compare=False)  # deviations from the reference, for people

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["config"] = dict(self.config)
        data["preprocessing"] = self.preprocessing.to_json()
        data["dropped_tokens"] = list(self.dropped_tokens)
        data["grid"] = list(self.grid)
        return data

    def fingerprint(self) -> str:
        """sha256 of the canonical JSON of everything that changes the numbers."""
        data = self.to_json()
        data.pop("notes", None)
        data["preprocessing"].pop("reference", None)
        text = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(text.encode()).hexdigest()


def library_versions() -> dict[str, str]:
    """Versions worth recording next to cached features (not part of the fingerprint)."""
    import transformers

    from merv.timm_lite import timm

    return {"torch": torch.__version__, "timm": timm.__version__, "transformers": transformers.__version__}


def size_variant(name: str, variants: Mapping[str, T], size: str) -> T:
    """The configuration of `size` for encoder `name`, or an error listing the sizes it has
    (each family's builder can be called without the registry's own check)."""
    if size not in variants:
        raise ValueError(f"{name}: no {size!r} variant; sizes: {', '.join(variants)}")
    return variants[size]


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Deterministic random init without disturbing the caller's RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


class FrozenEncoder(nn.Module):
    """A frozen visual encoder. Subclasses implement `forward(pixels) -> (B, t, h, w, d)`.

    Always in eval mode with gradients off: `train()` is a no-op, so wrapping code (FSDP, the
    trainer's `model.train()`) cannot switch on dropout or patch dropout by accident.
    """

    def __init__(self, info: EncoderInfo) -> None:
        super().__init__()
        self.info = info
        self.weights_source: str | None = None  # where the weights were read from (not fingerprinted)

    def finalize(self) -> FrozenEncoder:
        self.requires_grad_(False)
        super().train(False)
        return self

    def train(self, mode: bool = True) -> FrozenEncoder:  # noqa: ARG002 - frozen on purpose
        return super().train(False)

    # ------------------------------------------------------------------ shape rules
    def check_frames(self, t: int) -> None:
        """Raise if this encoder cannot take T input frames."""
        if t < 1:
            raise ValueError(f"{self.info.name}: need at least one frame")

    def output_grid(self, t: int) -> tuple[int, int, int]:
        """(t, h, w) produced from T input frames."""
        self.check_frames(t)
        _, h, w = self.info.grid
        return (t, h, w)

    # ------------------------------------------------------------------ pipeline
    def preprocess(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 (B, T, H, W, 3) -> float32 model input (B, T, 3, S, S)."""
        return self.info.preprocessing(frames)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        for p in self.parameters():
            return p.device
        return torch.device("cpu")

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def encode(self, frames: torch.Tensor | np.ndarray) -> torch.Tensor:
        """uint8 frames (B, T, H, W, 3) -> float32 features (B, t, h, w, d) on the encoder's device.

        Several clips per call share one forward. Runs under `torch.inference_mode()`, bf16
        autocast on CUDA only (CPU runs in fp32). Called outside inference mode, the result is
        copied into a normal tensor so that trainable modules (the online baseline's projectors)
        can use it in autograd, which inference tensors forbid.
        """
        out = self._encode(frames)
        return out if torch.is_inference_mode_enabled() else out.clone()

    @torch.inference_mode()
    def _encode(self, frames: torch.Tensor | np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(frames)) if isinstance(frames, np.ndarray) else frames
        if x.dim() != 5:
            raise ValueError(
                f"{self.info.name}: expected a batch of clips (B, T, H, W, 3), got shape {tuple(x.shape)}; "
                "add a batch axis with frames[None]"
            )
        self.check_frames(int(x.shape[1]))
        device = self.device
        pixels = self.preprocess(x.to(device, non_blocking=True))
        autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
        )
        with autocast:
            out = self.forward(pixels)
        return out.float()
