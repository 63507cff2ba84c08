"""The connector: one pre-fusion projector per encoder, then the fusion (everything between the
cached features and the LLM's input embeddings).

`Connector(specs, d_llm, ConnectorConfig())` takes the features dict `{encoder name: (B, t, h, w,
d_e)}` and returns `(B, L, d_llm)` visual tokens plus the per-sample encoder weights `(B, E)` (None
for the concatenations). Encoder order is the order of `specs`; it fixes the fusion's encoder axis
and the checkpoint layout (`projectors.{i}`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
import torch.nn as nn

from .fusion import ADDITIVE_FUSIONS, FUSION_KINDS, build_fusion
from .projectors import HEAD_KINDS, PROJECTOR_KINDS, Projector, build_projector
from .specs import FeatureSpec


@dataclass(frozen=True)
class ConnectorConfig:
    """Connector hyper-parameters; defaults are the MERV paper's (avg2d 8x8 + linear, cross-attention)."""

    projector: str = "avg2d"
    head: str = "linear"
    tokens_per_frame: int = 64  # s*s per frame; ignored by the projector-free all_tokens / cls
    frame_factor: int = 2  # avg3d / conv3d only: frames are pooled by this factor
    conv_depth: int = 3  # conv2d: RegNet blocks on each side of the pool
    conv3d_kernel: tuple[int, int, int] = (2, 3, 3)
    attentive_heads: int = 8
    fusion: str = "cross_attention"
    fusion_embed_dim: int = 3072  # cross_attention: width of the learned query (reference: 3072)
    extra: dict[str, Any] = field(default_factory=dict)  # free-form notes carried into checkpoints

    def __post_init__(self) -> None:
        object.__setattr__(self, "conv3d_kernel", tuple(int(k) for k in self.conv3d_kernel))
        if self.projector not in PROJECTOR_KINDS:
            raise ValueError(f"projector {self.projector!r} is unknown; use one of {PROJECTOR_KINDS}")
        if self.head not in HEAD_KINDS:
            raise ValueError(f"head {self.head!r} is unknown; use one of {HEAD_KINDS}")
        if self.fusion not in FUSION_KINDS:
            raise ValueError(f"fusion {self.fusion!r} is unknown; use one of {FUSION_KINDS}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["conv3d_kernel"] = list(self.conv3d_kernel)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ConnectorConfig:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        if "conv3d_kernel" in known:
            known["conv3d_kernel"] = tuple(known["conv3d_kernel"])
        return cls(**known)

    def with_(self, **changes: Any) -> ConnectorConfig:
        return replace(self, **changes)


@dataclass
class ConnectorOutput:
    embeds: torch.Tensor  # (B, L, d_llm)
    weights: torch.Tensor | None  # (B, E), rows sum to 1; None for concatenations


class Connector(nn.Module):
    """Projectors (one per encoder, `specs` order) + fusion."""

    def __init__(self, specs: list[FeatureSpec], d_llm: int, config: ConnectorConfig | None = None) -> None:
        super().__init__()
        if not specs:
            raise ValueError("a connector needs at least one encoder FeatureSpec")
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"encoder names must be unique, got {names}")
        self.config = config or ConnectorConfig()
        self.specs = list(specs)
        self.d_llm = d_llm
        c = self.config
        self.projectors = nn.ModuleList(
            [
                build_projector(
                    c.projector,
                    s,
                    d_llm,
                    tokens_per_frame=c.tokens_per_frame,
                    head=c.head,
                    frame_factor=c.frame_factor,
                    conv_depth=c.conv_depth,
                    conv3d_kernel=c.conv3d_kernel,
                    attentive_heads=c.attentive_heads,
                )
                for s in specs
            ]
        )
        counts = self.token_counts
        if c.fusion in ADDITIVE_FUSIONS + ("concat_channel",):
            length = max(counts)
            if any(n not in (1, length) for n in counts):
                detail = ", ".join(f"{s.name}: {p.out_grid} -> {n}" for s, p, n in zip(specs, self.projectors, counts))
                raise ValueError(
                    f"fusion {c.fusion!r} mixes encoders token by token, so every encoder must give the same token count "
                    f"(or 1), got {detail}; use a pooling projector (same s x s for all) and input frames that give every "
                    "encoder the same t (ViViT takes 2x frames), or use fusion 'concat_sequence'"
                )
        self.fusion = build_fusion(c.fusion, len(specs), d_llm, embed_dim=c.fusion_embed_dim)

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.specs]

    @property
    def token_counts(self) -> list[int]:
        return [p.num_tokens for p in self.projectors]

    @property
    def num_tokens(self) -> int:
        """L: visual tokens handed to the LLM per sample."""
        return self.fusion.out_tokens(self.token_counts)

    def inert_parameter_names(self) -> list[str]:
        """Parameters kept only for checkpoint layout; they must stay frozen."""
        return [f"fusion.{n}" for n in self.fusion.inert]

    def freeze_inert(self) -> None:
        for name in self.inert_parameter_names():
            self.get_parameter(name).requires_grad_(False)

    def forward(self, features: dict[str, torch.Tensor]) -> ConnectorOutput:
        missing = [n for n in self.names if n not in features]
        if missing:
            raise KeyError(f"features are missing encoder(s) {missing}; this connector needs {self.names}, got {sorted(features)}")
        dtype = next((p.dtype for p in self.parameters() if p.is_floating_point()), torch.float32)
        xs = []
        for spec, proj in zip(self.specs, self.projectors):
            x = features[spec.name]
            xs.append(proj(x.to(dtype)))
        embeds, weights = self.fusion(xs)
        return ConnectorOutput(embeds=embeds, weights=weights)

    def describe(self) -> dict[str, Any]:
        """Plain-data summary (checkpoints, `merv model info`)."""
        return {
            "config": self.config.to_dict(),
            "specs": [s.to_dict() for s in self.specs],
            "d_llm": self.d_llm,
            "token_counts": dict(zip(self.names, self.token_counts)),
            "num_tokens": self.num_tokens,
        }


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


__all__ = ["Connector", "ConnectorConfig", "ConnectorOutput", "FeatureSpec", "Projector", "count_parameters"]
