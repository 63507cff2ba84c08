"""Connector: every projector and fusion variant (shapes, token order, gradients, weights), the
reference layout of the cross-attention fusion, option validation, paper-size parameter counts."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from merv.train.connector import Connector, ConnectorConfig
from merv.train.fusion import FUSION_KINDS, build_fusion
from merv.train.projectors import build_projector
from merv.train.specs import FeatureSpec

D_LLM = 32
SPECS = [FeatureSpec("a", (4, 8, 8), 16), FeatureSpec("b", (4, 6, 6), 24)]


def feats(specs: list[FeatureSpec], b: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {s.name: torch.randn(b, *s.grid, s.dim, generator=g).half() for s in specs}


def assert_all_trainable_get_grads(module: nn.Module, loss: torch.Tensor) -> None:
    loss.backward()
    trainable = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    assert trainable, "module has no trainable parameters"
    no_grad = [n for n, p in trainable if p.grad is None or not torch.isfinite(p.grad).all() or p.grad.abs().sum() == 0]
    assert not no_grad, f"no gradient reached {no_grad}"


# --- projectors ------------------------------------------------------------------------------

PROJECTOR_CASES = [
    # kind, head, tokens_per_frame, expected (t_out, tokens per frame)
    ("avg2d", "linear", 4, 4, 4),
    ("avg2d", "gelu-mlp", 16, 4, 16),
    ("avg3d", "linear", 4, 2, 4),
    ("avg3d", "gelu-mlp", 1, 2, 1),
    ("conv2d", "linear", 4, 4, 4),
    ("conv3d", "linear", 4, 2, 4),
    ("attentive", "linear", 9, 4, 9),
    ("attentive", "gelu-mlp", 4, 4, 4),
    ("all_tokens", "linear", 64, 4, 64),
]


@pytest.mark.parametrize("kind,head,tpf,t_out,per_frame", PROJECTOR_CASES)
def test_projector_shapes_and_gradients(kind: str, head: str, tpf: int, t_out: int, per_frame: int) -> None:
    spec = FeatureSpec("a", (4, 8, 8), 16)
    torch.manual_seed(0)
    proj = build_projector(kind, spec, D_LLM, tokens_per_frame=tpf, head=head, attentive_heads=4)
    x = torch.randn(2, 4, 8, 8, 16)
    y = proj(x)
    assert y.shape == (2, t_out * per_frame, D_LLM)
    assert proj.num_tokens == t_out * per_frame
    assert_all_trainable_get_grads(proj, (y**2).mean())


def test_cls_projector_takes_a_cls_cache_only() -> None:
    cls_spec = FeatureSpec("a_cls", (4, 1, 1), 16, has_cls=True)
    proj = build_projector("cls", cls_spec, D_LLM)
    y = proj(torch.randn(3, 4, 1, 1, 16))
    assert y.shape == (3, 4, D_LLM)
    assert_all_trainable_get_grads(proj, y.sum())
    with pytest.raises(ValueError, match="projector 'cls'.*CLS-token cache"):
        build_projector("cls", FeatureSpec("a", (4, 8, 8), 16), D_LLM)


@pytest.mark.parametrize("tpf", [1, 4, 16, 64, 100, 144, 256])
def test_every_square_token_count(tpf: int) -> None:
    spec = FeatureSpec("lb", (2, 16, 16), 8)
    proj = build_projector("avg2d", spec, 8, tokens_per_frame=tpf)
    assert proj(torch.randn(1, 2, 16, 16, 8)).shape == (1, 2 * tpf, 8)


def test_token_order_is_frame_major_then_row_major() -> None:
    t, h, w = 3, 2, 2
    spec = FeatureSpec("a", (t, h, w), 3)
    proj = build_projector("avg2d", spec, 3, tokens_per_frame=h * w)
    with torch.no_grad():
        proj.head.fc.weight.copy_(torch.eye(3))
        proj.head.fc.bias.zero_()
    x = torch.zeros(1, t, h, w, 3)
    for i in range(t):
        for r in range(h):
            for c in range(w):
                x[0, i, r, c] = torch.tensor([i, r, c], dtype=torch.float)
    y = proj(x)[0]
    expected = [[i, r, c] for i in range(t) for r in range(h) for c in range(w)]
    assert y.tolist() == expected


def test_avg_pooling_values() -> None:
    spec = FeatureSpec("a", (4, 4, 4), 2)
    x = torch.randn(1, 4, 4, 4, 2)
    p2 = build_projector("avg2d", spec, 2, tokens_per_frame=4)
    p3 = build_projector("avg3d", spec, 2, tokens_per_frame=4, frame_factor=2)
    for p in (p2, p3):
        with torch.no_grad():
            p.head.fc.weight.copy_(torch.eye(2))
            p.head.fc.bias.zero_()
    # 2D: token (frame 1, row 0, col 1) = mean of frame 1, rows 0-1, cols 2-3
    assert torch.allclose(p2(x)[0, 1 * 4 + 0 * 2 + 1], x[0, 1, 0:2, 2:4].mean(dim=(0, 1)), atol=1e-6)
    # 3D with frame halving: token (frame 1, row 1, col 0) = mean of frames 2-3, rows 2-3, cols 0-1
    assert torch.allclose(p3(x)[0, 1 * 4 + 1 * 2 + 0], x[0, 2:4, 2:4, 0:2].mean(dim=(0, 1, 2)), atol=1e-6)
    # 3D without frame pooling is the 2D projector
    p31 = build_projector("avg3d", spec, 2, tokens_per_frame=4, frame_factor=1)
    p31.load_state_dict(p2.state_dict())
    assert torch.allclose(p31(x), p2(x), atol=1e-6)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"projector": "avg2d", "tokens_per_frame": 8}, r"tokens_per_frame=8 is not a square"),
        ({"projector": "avg2d", "tokens_per_frame": 100}, r"'avg2d': 10x10 tokens per frame needs a cached grid of at least 10x10"),
        ({"projector": "avg3d", "frame_factor": 3}, r"'avg3d': frame_factor=3 must divide"),
        ({"projector": "conv3d", "frame_factor": 3}, r"'conv3d': frame_factor=3 must divide"),
        ({"projector": "attentive", "attentive_heads": 5}, r"'attentive'.*not divisible by attentive_heads=5"),
        ({"projector": "all_tokens", "fusion": "cross_attention"}, r"fusion 'cross_attention' mixes encoders token by token.*concat_sequence"),
        ({"projector": "nope"}, r"projector 'nope' is unknown"),
        ({"fusion": "nope"}, r"fusion 'nope' is unknown"),
        ({"head": "nope"}, r"head 'nope' is unknown"),
    ],
)
def test_bad_options_raise_clear_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Connector(SPECS, D_LLM, ConnectorConfig(**{"tokens_per_frame": 4, **kwargs}))


def test_wrong_feature_shape_and_missing_encoder() -> None:
    c = Connector(SPECS, D_LLM, ConnectorConfig(tokens_per_frame=4, fusion_embed_dim=16))
    f = feats(SPECS)
    with pytest.raises(KeyError, match="missing encoder"):
        c({"a": f["a"]})
    f["b"] = torch.randn(2, 4, 5, 5, 24)
    with pytest.raises(ValueError, match="encoder 'b': expected features"):
        c(f)


# --- fusions ---------------------------------------------------------------------------------


@pytest.mark.parametrize("fusion", FUSION_KINDS)
@pytest.mark.parametrize("projector", ["avg2d", "avg3d"])
def test_connector_fusions(fusion: str, projector: str) -> None:
    torch.manual_seed(0)
    cfg = ConnectorConfig(projector=projector, tokens_per_frame=4, fusion=fusion, fusion_embed_dim=16)
    c = Connector(SPECS, D_LLM, cfg)
    out = c(feats(SPECS, b=3))
    per_encoder = (4 if projector == "avg2d" else 2) * 4
    expected_len = 2 * per_encoder if fusion == "concat_sequence" else per_encoder
    assert out.embeds.shape == (3, expected_len, D_LLM) and c.num_tokens == expected_len
    if fusion in ("concat_sequence", "concat_channel"):
        assert out.weights is None
    else:
        assert out.weights is not None and out.weights.shape == (3, 2)
        assert torch.allclose(out.weights.sum(-1), torch.ones(3), atol=1e-6)
        assert (out.weights >= 0).all()
    assert_all_trainable_get_grads(c, (out.embeds.float() ** 2).mean())


def test_cross_attention_matches_reference_multihead_attention() -> None:
    """Weights = those of nn.MultiheadAttention(query=Q, key=mean(X), value=mean(X)); output = weights . X."""
    torch.manual_seed(0)
    fusion = build_fusion("cross_attention", 3, D_LLM, embed_dim=24)
    with torch.no_grad():  # non-zero biases so the bias slicing is exercised
        fusion.attention.in_proj_bias.normal_()
    xs = [torch.randn(2, 5, D_LLM) for _ in range(3)]
    out, weights = fusion(xs)
    stacked = torch.stack(xs, 1)
    q = fusion.Q.repeat(2, 1).unsqueeze(1)
    keys = stacked.mean(2)
    _, ref_w = fusion.attention(query=q, key=keys, value=keys)
    ref_out = torch.bmm(ref_w, stacked.reshape(2, 3, -1)).reshape(2, 5, D_LLM)
    assert torch.allclose(weights, ref_w[:, 0], atol=1e-6)
    assert torch.allclose(out, ref_out, atol=1e-5)


def test_cross_attention_reference_layout_and_paper_size() -> None:
    with torch.device("meta"):
        fusion = build_fusion("cross_attention", 4, 4096, embed_dim=3072)
    shapes = {k: tuple(v.shape) for k, v in fusion.state_dict().items()}
    assert shapes == {
        "Q": (1, 3072),
        "attention.q_proj_weight": (3072, 3072),
        "attention.k_proj_weight": (3072, 4096),
        "attention.v_proj_weight": (3072, 4096),
        "attention.in_proj_bias": (9216,),
        "attention.out_proj.weight": (3072, 3072),
        "attention.out_proj.bias": (3072,),
    }
    assert fusion.attention.batch_first and fusion.attention.num_heads == 1
    assert sum(p.numel() for p in fusion.parameters()) == 44_055_552
    # value / output projections never influence the result: they stay frozen
    frozen = {n for n, p in fusion.named_parameters() if not p.requires_grad}
    assert frozen == set(fusion.inert)


def test_plain_cross_attention_is_equation_2() -> None:
    torch.manual_seed(0)
    fusion = build_fusion("cross_attention_plain", 2, D_LLM)
    xs = [torch.randn(3, 4, D_LLM) for _ in range(2)]
    out, weights = fusion(xs)
    xbar = torch.stack([x.mean(1) for x in xs], 1)  # (B, N, d)
    expected_w = torch.softmax(xbar @ fusion.Q[0] / math.sqrt(D_LLM), dim=-1)
    assert torch.allclose(weights, expected_w, atol=1e-6)
    assert torch.allclose(out, expected_w[:, 0, None, None] * xs[0] + expected_w[:, 1, None, None] * xs[1], atol=1e-6)


def test_fixed_mix_and_learnable_scalar_values() -> None:
    xs = [torch.randn(2, 3, D_LLM) for _ in range(4)]
    out, w = build_fusion("fixed_mix", 4, D_LLM)(xs)
    assert torch.allclose(w, torch.full((2, 4), 0.25)) and torch.allclose(out, sum(xs) / 4, atol=1e-6)
    scalar = build_fusion("learnable_scalar", 4, D_LLM)
    with torch.no_grad():
        scalar.logits.copy_(torch.tensor([0.0, 1.0, 2.0, 3.0]))
    out, w = scalar(xs)
    p = torch.softmax(torch.tensor([0.0, 1.0, 2.0, 3.0]), 0)
    assert torch.allclose(w, p.expand(2, 4)) and torch.allclose(out, sum(pi * x for pi, x in zip(p, xs)), atol=1e-5)


def test_concat_channel_and_sequence_layout() -> None:
    xs = [torch.randn(2, 3, D_LLM) for _ in range(2)]
    seq, w = build_fusion("concat_sequence", 2, D_LLM)(xs)
    assert w is None and torch.equal(seq, torch.cat(xs, 1))
    ch = build_fusion("concat_channel", 2, D_LLM)
    out, _ = ch(xs)
    assert torch.allclose(out, ch.proj(torch.cat(xs, -1)), atol=1e-6)


def test_single_token_encoder_is_broadcast() -> None:
    specs = [FeatureSpec("patch", (4, 4, 4), 8), FeatureSpec("cls", (1, 1, 1), 8, has_cls=True)]
    c = Connector(specs, D_LLM, ConnectorConfig(projector="all_tokens", fusion="fixed_mix"))
    f = feats(specs)
    out = c(f)
    assert out.embeds.shape == (2, 64, D_LLM)
    a = c.projectors[0](f["patch"].float())
    b = c.projectors[1](f["cls"].float())
    assert torch.allclose(out.embeds, (a + b) / 2, atol=1e-5)


def test_feature_spec_from_store_group_spec() -> None:
    from merv.store import EncoderGroupSpec

    g = EncoderGroupSpec(name="dinov2", fingerprint="abc", grid=(16, 16, 16), dim=1024, framewise=True, info={"has_cls": True})
    spec = FeatureSpec.from_group_spec(g)
    assert spec == FeatureSpec("dinov2", (16, 16, 16), 1024, has_cls=False)  # the model had a CLS; the cache does not
    cls_group = EncoderGroupSpec(name="dinov2-cls", fingerprint="abd", grid=(16, 1, 1), dim=1024, framewise=True, info={"token": "cls"})
    assert FeatureSpec.from_group_spec(cls_group).has_cls
    assert FeatureSpec.from_dict(spec.to_dict()) == spec


def test_cross_attention_with_packed_projection_layout() -> None:
    """d_llm == embed_dim: nn.MultiheadAttention packs q/k/v; weights still match its own."""
    torch.manual_seed(0)
    fusion = build_fusion("cross_attention", 2, 16, embed_dim=16)
    assert "attention.in_proj_weight" in fusion.state_dict()
    xs = [torch.randn(2, 3, 16) for _ in range(2)]
    out, weights = fusion(xs)
    keys = torch.stack(xs, 1).mean(2)
    _, ref_w = fusion.attention(query=fusion.Q.repeat(2, 1).unsqueeze(1), key=keys, value=keys)
    assert torch.allclose(weights, ref_w[:, 0], atol=1e-6)
    assert_all_trainable_get_grads(fusion, out.pow(2).mean())
