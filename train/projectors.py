"""Pre-fusion projectors (paper eq. 1 and the ablations of section 4.2.1 / appendix A.3).

Every projector maps one encoder's cached features `(B, t, h, w, d_e)` to `(B, L, d_llm)`. Token
order is frame-major, then row-major over the pooled grid: token `i*s*s + r*s + c` is frame `i`,
row `r`, column `c`. `tokens_per_frame` must be a square `s*s` (1, 4, 16, 64, 100, 144, 256).

Kinds (`ConnectorConfig.projector`):
  avg2d       adaptive 2D average pool of each frame to s x s, then the head (the MERV default)
  avg3d       adaptive 3D average pool to (t / frame_factor, s, s), then the head
  conv2d      C-Abstractor: RegNet stage, 2D adaptive pool, RegNet stage, then the head
  conv3d      one 3D convolution (kernel 2x3x3, 'same' padding) to d_llm, 3D pool, then the head
  attentive   per-frame attentive resampler with s*s learned queries (JEPA attentive pooler), head
  all_tokens  projector-free baseline: every cached token, head only
  cls         projector-free baseline: the per-frame CLS token (a cache with grid (t, 1, 1))
The head is `linear` (d -> d_llm) or `gelu-mlp` (Linear, GELU, Linear).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .specs import FeatureSpec

PROJECTOR_KINDS = ("avg2d", "avg3d", "conv2d", "conv3d", "attentive", "all_tokens", "cls")
HEAD_KINDS = ("linear", "gelu-mlp")


# --- heads -----------------------------------------------------------------------------------


class LinearHead(nn.Module):
    """d_in -> d_out linear map (paper eq. 1, W_e)."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.fc = nn.Linear(d_in, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


class MLPHead(nn.Module):
    """Two-layer GELU MLP (LLaVA-1.5 style)."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_in, d_out)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(d_out, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def build_head(kind: str, d_in: int, d_out: int) -> nn.Module:
    if kind == "linear":
        return LinearHead(d_in, d_out)
    if kind == "gelu-mlp":
        return MLPHead(d_in, d_out)
    raise ValueError(f"projector head {kind!r} is unknown; use one of {HEAD_KINDS}")


# --- shape helpers ---------------------------------------------------------------------------


def side_of(tokens_per_frame: int) -> int:
    """Side `s` of the square pooled grid; ValueError when `tokens_per_frame` is not a square."""
    s = math.isqrt(int(tokens_per_frame)) if tokens_per_frame > 0 else 0
    if s < 1 or s * s != tokens_per_frame:
        raise ValueError(
            f"tokens_per_frame={tokens_per_frame} is not a square number; projectors pool each frame to an "
            "s x s grid, so use one of 1, 4, 16, 64, 100, 144, 256 (any s*s)"
        )
    return s


def _to_frames_2d(x: torch.Tensor) -> torch.Tensor:
    """(B, t, h, w, d) -> (B*t, d, h, w)."""
    b, t, h, w, d = x.shape
    return x.reshape(b * t, h, w, d).permute(0, 3, 1, 2)


def _from_frames_2d(y: torch.Tensor, b: int) -> torch.Tensor:
    """(B*t, d, s, s) -> (B, t*s*s, d), frame-major then row-major."""
    bt, d, s1, s2 = y.shape
    return y.permute(0, 2, 3, 1).reshape(b, (bt // b) * s1 * s2, d)


def _to_volume(x: torch.Tensor) -> torch.Tensor:
    """(B, t, h, w, d) -> (B, d, t, h, w)."""
    return x.permute(0, 4, 1, 2, 3)


def _from_volume(y: torch.Tensor) -> torch.Tensor:
    """(B, d, t, s, s) -> (B, t*s*s, d)."""
    b, d = y.shape[:2]
    return y.permute(0, 2, 3, 4, 1).reshape(b, -1, d)


# --- projectors ------------------------------------------------------------------------------


class Projector(nn.Module):
    """Base: validates the input against the spec and knows its output grid (t_out, s_h, s_w)."""

    kind: str = ""

    def __init__(self, spec: FeatureSpec, d_llm: int) -> None:
        super().__init__()
        self.spec = spec
        self.d_llm = d_llm
        self.out_grid: tuple[int, int, int] = spec.grid

    @property
    def num_tokens(self) -> int:
        t, h, w = self.out_grid
        return t * h * w

    def check_input(self, x: torch.Tensor) -> None:
        want = (*self.spec.grid, self.spec.dim)
        if x.dim() != 5 or tuple(x.shape[1:]) != want:
            raise ValueError(
                f"encoder {self.spec.name!r}: expected features (B, t, h, w, d) = (B, {', '.join(map(str, want))}), "
                f"got {tuple(x.shape)}; the cache does not match this model's feature spec"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


def _check_pool_fits(spec: FeatureSpec, s: int, option: str) -> None:
    _, h, w = spec.grid
    if s > h or s > w:
        raise ValueError(
            f"{option}: {s}x{s} tokens per frame needs a cached grid of at least {s}x{s}, but encoder "
            f"{spec.name!r} has {h}x{w}; lower tokens_per_frame or cache that encoder at its native grid"
        )


def _check_frames(spec: FeatureSpec, factor: int, option: str) -> int:
    t = spec.grid[0]
    if factor < 1 or t % factor:
        raise ValueError(
            f"{option}: frame_factor={factor} must divide encoder {spec.name!r}'s {t} cached frames; "
            "use frame_factor=1 or a frame count divisible by it"
        )
    return t // factor


class AvgPool2dProjector(Projector):
    """Adaptive average pool per frame, then the head (paper eq. 1)."""

    kind = "avg2d"

    def __init__(self, spec: FeatureSpec, d_llm: int, tokens_per_frame: int, head: str = "linear") -> None:
        super().__init__(spec, d_llm)
        s = side_of(tokens_per_frame)
        _check_pool_fits(spec, s, "projector 'avg2d'")
        self.out_grid = (spec.grid[0], s, s)
        self.head = build_head(head, spec.dim, d_llm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        b, t, h, w, _ = x.shape
        s = self.out_grid[1]
        if (h, w) == (s, s):  # cache already pooled to the training grid
            tokens = x.reshape(b, t * h * w, -1)
        else:
            tokens = _from_frames_2d(F.adaptive_avg_pool2d(_to_frames_2d(x), (s, s)), b)
        return self.head(tokens)


class AvgPool3dProjector(Projector):
    """Adaptive 3D average pool (frames pooled by `frame_factor`), then the head.

    With frame_factor=1 this equals avg2d (the reference's `3davg` default for MERV).
    """

    kind = "avg3d"

    def __init__(self, spec: FeatureSpec, d_llm: int, tokens_per_frame: int, head: str = "linear", frame_factor: int = 2) -> None:
        super().__init__(spec, d_llm)
        s = side_of(tokens_per_frame)
        _check_pool_fits(spec, s, "projector 'avg3d'")
        self.out_grid = (_check_frames(spec, frame_factor, "projector 'avg3d'"), s, s)
        self.head = build_head(head, spec.dim, d_llm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        return self.head(_from_volume(F.adaptive_avg_pool3d(_to_volume(x), self.out_grid)))


class ConvPool2dProjector(Projector):
    """C-Abstractor (Honeybee): RegNet stage d_e->d_llm, adaptive pool, RegNet stage, head.

    RegNet stages are timm's `RegStage` (bottleneck blocks with SE, SiLU, LayerNorm2d), as in the
    reference; `depth` blocks on each side of the pool (3 in the paper).
    """

    kind = "conv2d"

    def __init__(self, spec: FeatureSpec, d_llm: int, tokens_per_frame: int, head: str = "linear", depth: int = 3) -> None:
        super().__init__(spec, d_llm)
        from merv.timm_lite import timm  # lazy: timm is heavy and only this projector needs it

        LayerNorm2d, RegStage = timm.layers.LayerNorm2d, timm.models.regnet.RegStage

        s = side_of(tokens_per_frame)
        _check_pool_fits(spec, s, "projector 'conv2d'")
        self.out_grid = (spec.grid[0], s, s)

        def stage(c_in: int, c_out: int) -> nn.Module:
            return RegStage(depth, c_in, c_out, stride=1, dilation=1, act_layer=nn.SiLU, norm_layer=LayerNorm2d)

        self.stage1 = stage(spec.dim, d_llm)
        self.pool = nn.AdaptiveAvgPool2d((s, s))
        self.stage2 = stage(d_llm, d_llm)
        self.head = build_head(head, d_llm, d_llm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        y = self.stage2(self.pool(self.stage1(_to_frames_2d(x))))
        return self.head(_from_frames_2d(y, x.shape[0]))


class Conv3dProjector(Projector):
    """One 3D convolution d_e -> d_llm ('same' padding), adaptive 3D pool, head.

    The paper's kernel is 2x3x3; the reference code used 3x3x3 (`kernel=(3, 3, 3)` reproduces it).
    """

    kind = "conv3d"

    def __init__(
        self,
        spec: FeatureSpec,
        d_llm: int,
        tokens_per_frame: int,
        head: str = "linear",
        frame_factor: int = 2,
        kernel: tuple[int, int, int] = (2, 3, 3),
    ) -> None:
        super().__init__(spec, d_llm)
        s = side_of(tokens_per_frame)
        _check_pool_fits(spec, s, "projector 'conv3d'")
        self.out_grid = (_check_frames(spec, frame_factor, "projector 'conv3d'"), s, s)
        self.conv = nn.Conv3d(spec.dim, d_llm, kernel_size=tuple(kernel))
        pads: list[int] = []
        for k in reversed(tuple(kernel)):  # 'same' padding; an even kernel gets the extra row at the end
            pads += [(k - 1) // 2, (k - 1) - (k - 1) // 2]
        self.pads = tuple(pads)
        self.head = build_head(head, d_llm, d_llm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        y = F.adaptive_avg_pool3d(self.conv(F.pad(_to_volume(x), self.pads)), self.out_grid)
        return self.head(_from_volume(y))


class _CrossAttentionBlock(nn.Module):
    """Pre-norm cross-attention + MLP block of the JEPA attentive pooler (norm on the keys only)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, q: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        b, n, c = q.shape
        m, hd = x.shape[1], c // self.heads
        kv = self.kv(self.norm1(x)).reshape(b, m, 2, self.heads, hd).permute(2, 0, 3, 1, 4)
        qh = self.q(q).reshape(b, n, self.heads, hd).transpose(1, 2)
        y = F.scaled_dot_product_attention(qh, kv[0], kv[1]).transpose(1, 2).reshape(b, n, c)
        q = q + self.proj(y)
        return q + self.mlp(self.norm2(q))


class AttentiveProjector(Projector):
    """Per-frame attentive resampler: s*s learned queries attend to the frame's tokens, then head."""

    kind = "attentive"

    def __init__(self, spec: FeatureSpec, d_llm: int, tokens_per_frame: int, head: str = "linear", heads: int = 8) -> None:
        super().__init__(spec, d_llm)
        s = side_of(tokens_per_frame)
        if spec.dim % heads:
            raise ValueError(
                f"projector 'attentive': encoder {spec.name!r} width {spec.dim} is not divisible by "
                f"attentive_heads={heads}; pick a head count that divides it"
            )
        self.out_grid = (spec.grid[0], s, s)
        self.queries = nn.Parameter(torch.zeros(1, s * s, spec.dim))
        self.block = _CrossAttentionBlock(spec.dim, heads)
        self.head = build_head(head, spec.dim, d_llm)
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.queries, std=0.02)
        for m in self.block.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        with torch.no_grad():  # JEPA rescales the residual outputs of layer 1 by 1/sqrt(2)
            self.block.proj.weight.div_(math.sqrt(2.0))
            self.block.mlp[2].weight.div_(math.sqrt(2.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        b, t, h, w, d = x.shape
        frames = x.reshape(b * t, h * w, d)
        q = self.block(self.queries.expand(b * t, -1, -1).to(frames.dtype), frames)
        return self.head(q.reshape(b, -1, d))


class AllTokensProjector(Projector):
    """Projector-free baseline: every cached token through the head (Video-LLaVA style, no CLS)."""

    kind = "all_tokens"

    def __init__(self, spec: FeatureSpec, d_llm: int, head: str = "linear") -> None:
        super().__init__(spec, d_llm)
        self.head = build_head(head, spec.dim, d_llm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        return self.head(x.reshape(x.shape[0], -1, x.shape[-1]))


class ClsTokenProjector(AllTokensProjector):
    """Projector-free baseline: one CLS token per frame (needs a CLS cache, grid (t, 1, 1))."""

    kind = "cls"

    def __init__(self, spec: FeatureSpec, d_llm: int, head: str = "linear") -> None:
        if not spec.has_cls or spec.grid[1:] != (1, 1):
            raise ValueError(
                f"projector 'cls': encoder {spec.name!r} is a patch-token cache with grid {spec.grid}; the class-token "
                "baseline needs a CLS-token cache (grid (t, 1, 1), FeatureSpec(has_cls=True)): extract that encoder "
                "configuration, or use projector 'all_tokens' / 'avg2d' with tokens_per_frame=1"
            )
        super().__init__(spec, d_llm, head)


def build_projector(
    kind: str,
    spec: FeatureSpec,
    d_llm: int,
    *,
    tokens_per_frame: int = 64,
    head: str = "linear",
    frame_factor: int = 2,
    conv_depth: int = 3,
    conv3d_kernel: tuple[int, int, int] = (2, 3, 3),
    attentive_heads: int = 8,
) -> Projector:
    """One projector for one encoder; ValueError names the bad option and the fix."""
    if head not in HEAD_KINDS:
        raise ValueError(f"projector head {head!r} is unknown; use one of {HEAD_KINDS}")
    if kind == "avg2d":
        return AvgPool2dProjector(spec, d_llm, tokens_per_frame, head)
    if kind == "avg3d":
        return AvgPool3dProjector(spec, d_llm, tokens_per_frame, head, frame_factor)
    if kind == "conv2d":
        return ConvPool2dProjector(spec, d_llm, tokens_per_frame, head, conv_depth)
    if kind == "conv3d":
        return Conv3dProjector(spec, d_llm, tokens_per_frame, head, frame_factor, conv3d_kernel)
    if kind == "attentive":
        return AttentiveProjector(spec, d_llm, tokens_per_frame, head, attentive_heads)
    if kind == "all_tokens":
        return AllTokensProjector(spec, d_llm, head)
    if kind == "cls":
        return ClsTokenProjector(spec, d_llm, head)
    raise ValueError(f"projector {kind!r} is unknown; use one of {PROJECTOR_KINDS}")
