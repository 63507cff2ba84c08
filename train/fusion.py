"""Feature fusion strategies (paper eq. 2 and the ablations of section 4.2.2).

Input: one `(B, L_e, d)` tensor per encoder (after its projector). Additive fusions need the same
`L` for every encoder (an encoder with `L_e == 1` is broadcast, as the reference does). Every fusion
returns `(embeds (B, L, d), weights (B, E) or None)`; weights are the per-sample mixing weights of
the encoders and sum to 1.

Kinds (`ConnectorConfig.fusion`):
  cross_attention        MERV default, the reference's layout: one learned query of width
                         `embed_dim` (3072) and `nn.MultiheadAttention(embed_dim, 1 head,
                         kdim=vdim=d)`; the keys are each encoder's tokens averaged over the sequence;
                         only the attention *weights* are used, applied to the projected tokens.
  cross_attention_plain  eq. 2 literally: softmax(Q mean(X)^T / sqrt(d)) X with Q in R^{1 x d}
  concat_sequence        tokens of all encoders one after another (L = sum L_e), no weights
  concat_channel         channels concatenated, then Linear(E*d -> d), no weights
  learnable_scalar       softmax of one learned scalar per encoder (same for every sample)
  fixed_mix              equal weights 1/E
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

FUSION_KINDS = (
    "cross_attention",
    "cross_attention_plain",
    "concat_sequence",
    "concat_channel",
    "learnable_scalar",
    "fixed_mix",
)
ADDITIVE_FUSIONS = ("cross_attention", "cross_attention_plain", "learnable_scalar", "fixed_mix")


def stack_encoders(xs: list[torch.Tensor]) -> torch.Tensor:
    """(B, L_e, d) per encoder -> (B, E, L, d), broadcasting encoders with a single token."""
    length = max(x.shape[1] for x in xs)
    bad = [x.shape[1] for x in xs if x.shape[1] not in (1, length)]
    if bad:
        raise ValueError(f"additive fusion needs the same token count from every encoder (or 1), got {[x.shape[1] for x in xs]}")
    return torch.stack([x.expand(-1, length, -1) for x in xs], dim=1)


class Fusion(nn.Module):
    """Base class. `inert` names parameters kept only for checkpoint layout (never get gradients)."""

    kind: str = ""
    inert: tuple[str, ...] = ()

    def __init__(self, num_encoders: int, d_llm: int) -> None:
        super().__init__()
        self.num_encoders = num_encoders
        self.d_llm = d_llm

    def out_tokens(self, token_counts: list[int]) -> int:
        return max(token_counts)

    def forward(self, xs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:  # pragma: no cover
        raise NotImplementedError


def _mix(weights: torch.Tensor, stacked: torch.Tensor) -> torch.Tensor:
    """sum_e weights[b, e] * stacked[b, e] -> (B, L, d)."""
    return torch.einsum("be,beld->bld", weights.to(stacked.dtype), stacked)


class CrossAttentionFusion(Fusion):
    """Eq. 2 in the reference's parameterisation (published checkpoints load into it unchanged).

    weights = softmax((Q W_q + b_q)(mean(X) W_k + b_k)^T / sqrt(embed_dim)), i.e. the attention
    weights of `self.attention(query=Q, key=mean(X), value=mean(X))`; output = weights . X on the
    projected tokens. The value/output projections of that `MultiheadAttention` are never used: they
    are kept (frozen) so the state dict and parameter count match the reference. (When d == embed_dim
    torch packs q/k/v into `in_proj_weight`; that layout is followed too.)
    """

    kind = "cross_attention"
    inert = ("attention.v_proj_weight", "attention.out_proj.weight", "attention.out_proj.bias")

    def __init__(self, num_encoders: int, d_llm: int, embed_dim: int) -> None:
        super().__init__(num_encoders, d_llm)
        self.embed_dim = embed_dim
        self.Q = nn.Parameter(torch.empty(1, embed_dim))
        self.attention = nn.MultiheadAttention(
            embed_dim=embed_dim, num_heads=1, dropout=0.0, batch_first=True, kdim=d_llm, vdim=d_llm
        )
        nn.init.xavier_uniform_(self.Q)
        if self.attention._qkv_same_embed_dim:  # d_llm == embed_dim: torch packs q, k, v in one weight
            self.inert = ("attention.out_proj.weight", "attention.out_proj.bias")
        for name in self.inert:
            self.get_parameter(name).requires_grad_(False)

    def _qk_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        att, e = self.attention, self.embed_dim
        if att._qkv_same_embed_dim:
            return att.in_proj_weight[:e], att.in_proj_weight[e : 2 * e]
        return att.q_proj_weight, att.k_proj_weight

    def encoder_weights(self, keys: torch.Tensor) -> torch.Tensor:
        """keys (B, E, d) -> softmax weights (B, E), computed in float32."""
        e, bias = self.embed_dim, self.attention.in_proj_bias
        wq, wk = self._qk_weights()
        q = F.linear(self.Q.to(keys.dtype), wq.to(keys.dtype), bias[:e].to(keys.dtype))  # (1, e)
        k = F.linear(keys, wk.to(keys.dtype), bias[e : 2 * e].to(keys.dtype))  # (B, E, e)
        scores = torch.einsum("bne,e->bn", k.float(), q[0].float()) / math.sqrt(e)
        return scores.softmax(dim=-1)

    def forward(self, xs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        stacked = stack_encoders(xs)
        weights = self.encoder_weights(stacked.mean(dim=2))
        return _mix(weights, stacked), weights


class PlainCrossAttentionFusion(Fusion):
    """Eq. 2 as written: a learned query Q in R^{1 x d}, no projections."""

    kind = "cross_attention_plain"

    def __init__(self, num_encoders: int, d_llm: int) -> None:
        super().__init__(num_encoders, d_llm)
        self.Q = nn.Parameter(torch.empty(1, d_llm))
        nn.init.xavier_uniform_(self.Q)

    def forward(self, xs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        stacked = stack_encoders(xs)
        keys = stacked.mean(dim=2).float()
        weights = (torch.einsum("bnd,d->bn", keys, self.Q[0].float()) / math.sqrt(self.d_llm)).softmax(dim=-1)
        return _mix(weights, stacked), weights


class ConcatSequenceFusion(Fusion):
    """All encoders' tokens in sequence (encoder-major); the LLM sees E times more visual tokens."""

    kind = "concat_sequence"

    def out_tokens(self, token_counts: list[int]) -> int:
        return sum(token_counts)

    def forward(self, xs: list[torch.Tensor]) -> tuple[torch.Tensor, None]:
        return torch.cat(xs, dim=1), None


class ConcatChannelFusion(Fusion):
    """Channel concatenation (encoder order) then Linear(E*d -> d)."""

    kind = "concat_channel"

    def __init__(self, num_encoders: int, d_llm: int) -> None:
        super().__init__(num_encoders, d_llm)
        self.proj = nn.Linear(num_encoders * d_llm, d_llm)

    def forward(self, xs: list[torch.Tensor]) -> tuple[torch.Tensor, None]:
        stacked = stack_encoders(xs)  # (B, E, L, d)
        b, e, length, d = stacked.shape
        return self.proj(stacked.permute(0, 2, 1, 3).reshape(b, length, e * d)), None


class LearnableScalarFusion(Fusion):
    """softmax over one learned logit per encoder; starts from the equal mix (logits 0)."""

    kind = "learnable_scalar"

    def __init__(self, num_encoders: int, d_llm: int) -> None:
        super().__init__(num_encoders, d_llm)
        self.logits = nn.Parameter(torch.zeros(num_encoders))

    def forward(self, xs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        stacked = stack_encoders(xs)
        # repeat, not expand: a view in the model's output makes FSDP2 warn (its pre-backward hook on a view)
        weights = self.logits.float().softmax(dim=0).repeat(stacked.shape[0], 1)
        return _mix(weights, stacked), weights


class FixedMixFusion(Fusion):
    """Equal weights 1/E (the paper's "25% mixed" row); no parameters."""

    kind = "fixed_mix"

    def forward(self, xs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        stacked = stack_encoders(xs)
        b, e = stacked.shape[:2]
        weights = torch.full((b, e), 1.0 / e, device=stacked.device, dtype=torch.float32)
        return _mix(weights, stacked), weights


def build_fusion(kind: str, num_encoders: int, d_llm: int, *, embed_dim: int | None = None) -> Fusion:
    """`embed_dim`: the cross-attention query width (ConnectorConfig.fusion_embed_dim, where its
    default lives); the other fusions have none."""
    if kind == "cross_attention":
        if embed_dim is None:
            raise ValueError("cross_attention fusion needs embed_dim (ConnectorConfig.fusion_embed_dim)")
        return CrossAttentionFusion(num_encoders, d_llm, embed_dim)
    if kind == "cross_attention_plain":
        return PlainCrossAttentionFusion(num_encoders, d_llm)
    if kind == "concat_sequence":
        return ConcatSequenceFusion(num_encoders, d_llm)
    if kind == "concat_channel":
        return ConcatChannelFusion(num_encoders, d_llm)
    if kind == "learnable_scalar":
        return LearnableScalarFusion(num_encoders, d_llm)
    if kind == "fixed_mix":
        return FixedMixFusion(num_encoders, d_llm)
    raise ValueError(f"fusion {kind!r} is unknown; use one of {FUSION_KINDS}")
