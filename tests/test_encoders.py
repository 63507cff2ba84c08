"""Frozen encoders: tiny variants (shapes, token order, layer taken, dropped tokens, determinism,
weights round trips with the original checkpoint names), paper sizes on the meta device, weights
resolution offline, preprocessing parity with the reference pipelines."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from merv.extract.encoders import (
    PAPER_ENCODERS,
    WeightsError,
    WeightsNotFoundError,
    build_encoder,
    resolve_weights,
)
from merv.extract.encoders.languagebind import LanguageBindVisionConfig

NAMES = list(PAPER_ENCODERS)  # the paper's four; hiera and generic specs: tests/test_generic_encoders.py
PAPER_TABLE = {  # DESIGN.md "The paper's numbers"
    "dinov2": ((16, 16, 16), 1024),
    "siglip": ((16, 14, 14), 768),
    "vivit": ((16, 14, 14), 768),
    "languagebind": ((16, 16, 16), 1024),
}


@pytest.fixture(scope="module")
def tiny() -> dict:
    return {name: build_encoder(name, size="tiny") for name in NAMES}


def _clip(batch: int, frames: int, seed: int = 0, hw: tuple[int, int] = (40, 52)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, frames, *hw, 3), dtype=torch.uint8, generator=g)


def _pixels(enc, batch: int = 1, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    s = enc.info.image_size
    return torch.randn(batch, enc.info.frames, 3, s, s, generator=g)


# ------------------------------------------------------------------------------- shapes, info
@pytest.mark.parametrize("name", NAMES)
def test_tiny_output_shape_and_info(tiny, name):
    enc = tiny[name]
    out = enc.encode(_clip(2, enc.info.frames))
    t, h, w = enc.info.grid
    assert out.shape == (2, t, h, w, enc.info.dim) and out.dtype == torch.float32
    assert torch.isfinite(out).all() and out.std() > 0
    assert enc.info.size == "tiny" and enc.info.weights == "random-init(seed=0)"
    assert enc.info.grid == (16, 4, 4) and enc.info.dim == 32  # what the tiny variant really produces
    assert not enc.training and not any(p.requires_grad for p in enc.parameters())
    enc.train()
    assert not enc.training and not any(m.training for m in enc.modules())
    json.dumps(enc.info.to_json())  # plain JSON for the store
    assert not out.is_inference()  # usable by trainable modules downstream (online baseline)
    proj = torch.nn.Linear(enc.info.dim, 3)
    proj(out).sum().backward()
    assert proj.weight.grad is not None


@pytest.mark.parametrize("name", NAMES)
def test_batched_equals_one_by_one(tiny, name):
    enc = tiny[name]
    x = _clip(2, enc.info.frames, seed=3)
    both = enc.encode(x)
    one = torch.cat([enc.encode(x[:1]), enc.encode(x[1:])])
    torch.testing.assert_close(both, one, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_determinism_two_builds_and_seed(tiny, name):
    x = _clip(1, tiny[name].info.frames, seed=1)
    again = build_encoder(name, size="tiny")
    assert torch.equal(tiny[name].encode(x), again.encode(x))
    assert again.info.fingerprint() == tiny[name].info.fingerprint()
    other = build_encoder(name, size="tiny", seed=1)
    assert not torch.equal(tiny[name].encode(x), other.encode(x))
    assert other.info.fingerprint() != tiny[name].info.fingerprint()


def _digests() -> dict[str, list[str]]:
    out = {}
    for name in NAMES:
        enc = build_encoder(name, size="tiny")
        y = enc.encode(_clip(1, enc.info.frames, seed=7))
        out[name] = [hashlib.sha256(y.numpy().tobytes()).hexdigest(), enc.info.fingerprint()]
    return out


@pytest.mark.integration
def test_tiny_is_deterministic_across_processes():
    code = (
        "import json, importlib.util, sys;"
        f"spec = importlib.util.spec_from_file_location('t', {str(Path(__file__))!r});"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m);"
        "print(json.dumps(m._digests()))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == _digests()


# --------------------------------------------------------------------------- frame-count rules
@pytest.mark.parametrize("name", ["dinov2", "siglip"])
def test_framewise_any_t_and_image_encoded_once(tiny, name):
    enc = tiny[name]
    clip = _clip(1, 5, seed=2)
    five = enc.encode(clip)
    assert five.shape[1] == 5
    single = enc.encode(clip[:, 2:3])  # an image: T = 1 -> t = 1
    assert single.shape[1] == 1
    torch.testing.assert_close(single[:, 0], five[:, 2], atol=1e-5, rtol=1e-5)  # frames are independent


def test_temporal_encoders_check_frame_counts(tiny):
    with pytest.raises(ValueError, match="exactly 32"):
        tiny["vivit"].encode(_clip(1, 16))
    with pytest.raises(ValueError, match="multiple of 8"):
        tiny["languagebind"].encode(_clip(1, 12))
    assert tiny["languagebind"].encode(_clip(1, 8)).shape[1] == 8
    with pytest.raises(ValueError, match="batch"):
        tiny["dinov2"].encode(_clip(1, 4)[0])


# ------------------------------------------------------------------------------- token order
def _zero_residual_branches(enc) -> None:
    """Zero every attention / MLP output projection: each token then keeps only its own embedding,
    so a change in one input patch must show up at exactly one output position."""
    suffixes = ("attn.proj", "mlp.fc2", "o_proj", "out_proj")
    with torch.no_grad():
        for qual, module in enc.named_modules():
            if isinstance(module, torch.nn.Linear) and qual.endswith(suffixes):
                module.weight.zero_()
                module.bias.zero_()


@pytest.mark.parametrize("name", NAMES)
def test_token_order_is_t_h_w(name):
    enc = build_encoder(name, size="tiny")
    _zero_residual_branches(enc)
    patch = 16 if name in ("siglip", "vivit") else 14
    x = _pixels(enc)
    k, i, j = 5, 1, 2
    y = x.clone()
    y[:, k, :, i * patch : (i + 1) * patch, j * patch : (j + 1) * patch] += 1.0
    with torch.inference_mode():
        changed = (enc.forward(y) - enc.forward(x)).abs().amax(dim=(0, -1)) > 1e-6
    expected = torch.zeros_like(changed)
    expected[k // 2 if name == "vivit" else k, i, j] = True  # vivit: tubelets of 2 frames
    assert torch.equal(changed, expected), changed.nonzero().tolist()


# ----------------------------------------------------------------------- layer taken, tokens
@pytest.mark.parametrize("name, prefix", [("dinov2", 5), ("siglip", 0)])
def test_timm_penultimate_block_without_norm_and_prefix_tokens(tiny, name, prefix):
    enc = tiny[name]
    model = enc.model
    assert model.num_prefix_tokens == prefix  # dinov2: CLS + 4 registers; siglip: none
    assert enc.info.dropped_tokens == (("cls", "reg x4") if prefix else ())
    seen = {}
    hooks = [
        model.blocks[-2].register_forward_hook(lambda m, a, o: seen.__setitem__("penultimate", o)),
        model.blocks[-1].register_forward_hook(lambda m, a, o: seen.__setitem__("last", o)),
    ]
    x = _pixels(enc)
    with torch.inference_mode():
        out = enc.forward(x)
        model.forward_features(x.flatten(0, 1))  # the model's own full forward, hooks record blocks
    for h in hooks:
        h.remove()
    grid = lambda tokens: tokens[:, prefix:].reshape(out.shape)  # noqa: E731
    torch.testing.assert_close(out, grid(seen["penultimate"]), atol=1e-6, rtol=1e-6)
    assert not torch.allclose(out, grid(seen["last"]), atol=1e-3)
    with torch.inference_mode():
        assert not torch.allclose(out, grid(model.norm(seen["penultimate"])), atol=1e-3)  # no final norm
        if prefix:  # the dropped tokens really are the prefix: keeping them would shift every position
            assert not torch.allclose(out, seen["penultimate"][:, : -prefix].reshape(out.shape), atol=1e-3)


def test_vivit_last_hidden_state_with_final_norm_without_cls(tiny):
    enc = tiny["vivit"]
    x = _pixels(enc)
    with torch.inference_mode():
        out = enc.forward(x)
        full = enc.model(pixel_values=x, output_hidden_states=True)
        last = full.last_hidden_state
    assert last.shape[1] == 1 + 16 * 4 * 4  # CLS + tubelets
    torch.testing.assert_close(out, last[:, 1:].reshape(out.shape))
    torch.testing.assert_close(last, enc.model.layernorm(full.hidden_states[-1]))
    assert not torch.allclose(out, last[:, :-1].reshape(out.shape), atol=1e-3)  # CLS really dropped


def test_languagebind_penultimate_hidden_state_without_cls(tiny):
    enc = tiny["languagebind"]
    vm = enc.tower.vision_model
    x = _pixels(enc)
    with torch.inference_mode():
        out = enc.forward(x)
        states = vm.hidden_states(x.flatten(0, 1))  # all layers, the reference's hidden_states tuple
    assert len(states) == vm.config.num_hidden_layers + 1
    torch.testing.assert_close(out, states[-2][:, 1:].reshape(out.shape))
    assert not torch.allclose(out, states[-1][:, 1:].reshape(out.shape), atol=1e-3)
    assert not torch.allclose(out, states[-2][:, :-1].reshape(out.shape), atol=1e-3)


# ---------------------------------------------------------------------------- languagebind
def test_languagebind_16_frames_are_two_8_frame_clips(tiny):
    enc = tiny["languagebind"]
    x = _clip(1, 16, seed=4)
    both = enc.encode(x)
    separate = torch.cat([enc.encode(x[:, :8]), enc.encode(x[:, 8:])], dim=1)
    torch.testing.assert_close(both, separate, atol=1e-5, rtol=1e-5)
    swapped = enc.encode(torch.cat([x[:, 8:], x[:, :8]], dim=1))  # clips are independent windows
    torch.testing.assert_close(swapped, torch.cat([both[:, 8:], both[:, :8]], dim=1), atol=1e-5, rtol=1e-5)
    reversed_clip = enc.encode(x[:, :8].flip(1))  # within a clip, time is seen (temporal embedding)
    assert not torch.allclose(reversed_clip.flip(1), both[:, :8], atol=1e-4)


def _reference_languagebind_hidden(vm, pixels: torch.Tensor, t: int) -> list[torch.Tensor]:
    """The reference's forward written out with transformers' CLIP modules and its rearranges
    ('(b t) n d -> (b n) t d'), loading our parameters: an independent check of the semantics."""
    from transformers import CLIPVisionConfig
    from transformers.models.clip.modeling_clip import CLIPMLP, CLIPAttention, CLIPVisionEmbeddings

    c = vm.config
    hf = CLIPVisionConfig(
        hidden_size=c.hidden_size, intermediate_size=c.intermediate_size, num_attention_heads=c.num_attention_heads,
        num_hidden_layers=c.num_hidden_layers, image_size=c.image_size, patch_size=c.patch_size,
        hidden_act=c.hidden_act, layer_norm_eps=c.layer_norm_eps,
    )
    hf._attn_implementation = "eager"
    emb = CLIPVisionEmbeddings(hf)
    emb.load_state_dict(vm.embeddings.state_dict(), strict=False)
    h = vm.pre_layrnorm(emb(pixels))
    states = [h]
    for layer in vm.encoder.layers:
        attn_t, attn_s, mlp = CLIPAttention(hf), CLIPAttention(hf), CLIPMLP(hf)
        attn_t.load_state_dict(layer.temporal_attn.state_dict())
        attn_s.load_state_dict(layer.self_attn.state_dict())
        mlp.load_state_dict(layer.mlp.state_dict())
        bt, n, d = h.shape
        b = bt // t
        # time embed: (b t) n d -> (b n) t d, add, back
        h = h.reshape(b, t, n, d).permute(0, 2, 1, 3).reshape(b * n, t, d) + layer.temporal_embedding[:, :t]
        h = h.reshape(b, n, t, d).permute(0, 2, 1, 3).reshape(bt, n, d)
        residual = h
        z = h.reshape(b, t, n, d).permute(0, 2, 1, 3).reshape(b * n, t, d)
        z = attn_t(layer.temporal_layer_norm1(z))[0]
        h = residual + z.reshape(b, n, t, d).permute(0, 2, 1, 3).reshape(bt, n, d)
        h = h + attn_s(layer.layer_norm1(h))[0]
        h = h + mlp(layer.layer_norm2(h))
        states.append(h)
    return states


def test_languagebind_matches_reference_formulation(tiny):
    enc = tiny["languagebind"]
    vm = enc.tower.vision_model
    x = _pixels(enc)
    with torch.inference_mode():
        ours = enc.forward(x)
        ref = _reference_languagebind_hidden(vm, x.flatten(0, 1), vm.config.num_frames)
    torch.testing.assert_close(ours, ref[-2][:, 1:].reshape(ours.shape), atol=1e-5, rtol=1e-4)


ORIGINAL_KEYS = [  # names in LanguageBind_Video_merge's state dict (modeling_video.py)
    "vision_model.embeddings.class_embedding",
    "vision_model.embeddings.patch_embedding.weight",
    "vision_model.embeddings.position_embedding.weight",
    "vision_model.pre_layrnorm.weight",
    "vision_model.encoder.layers.0.temporal_embedding",
    "vision_model.encoder.layers.0.temporal_layer_norm1.bias",
    "vision_model.encoder.layers.0.temporal_attn.q_proj.weight",
    "vision_model.encoder.layers.0.temporal_attn.out_proj.bias",
    "vision_model.encoder.layers.2.self_attn.k_proj.weight",
    "vision_model.encoder.layers.2.layer_norm1.weight",
    "vision_model.encoder.layers.2.mlp.fc1.weight",
    "vision_model.encoder.layers.2.layer_norm2.bias",
    "vision_model.post_layernorm.weight",
]


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_languagebind_loads_checkpoint_with_original_names(tiny, tmp_path, fmt):
    src = tiny["languagebind"]
    state = {k: v.clone() for k, v in src.tower.state_dict().items()}
    assert set(ORIGINAL_KEYS) <= set(state)
    # what a full LanguageBindVideo checkpoint also holds: text tower, projections, an old buffer
    state["text_model.embeddings.token_embedding.weight"] = torch.randn(10, 32)
    state["visual_projection.weight"] = torch.randn(16, 32)
    state["logit_scale"] = torch.tensor(2.6592)
    state["vision_model.embeddings.position_ids"] = torch.arange(17)[None]
    if fmt == "bin":
        path = tmp_path / "pytorch_model.bin"
        torch.save(state, path)
    else:
        from safetensors.torch import save_file

        path = tmp_path / "model.safetensors"
        save_file(state, str(path))
    loaded = build_encoder("languagebind", size="tiny", weights=tmp_path)
    assert loaded.weights_source == str(path) and loaded.info.weights.startswith("file:")
    x = _clip(1, 16, seed=5)
    torch.testing.assert_close(loaded.encode(x), src.encode(x), atol=0, rtol=0)
    broken = {k: v for k, v in state.items() if "layers.1.temporal_attn.v_proj" not in k}
    torch.save(broken, tmp_path / "broken.bin")
    with pytest.raises(WeightsError, match="temporal_attn.v_proj"):
        build_encoder("languagebind", size="tiny", weights=tmp_path / "broken.bin")


# ------------------------------------------------------------------------- timm / hf weights
def test_timm_weights_round_trip_and_pos_embed_resampling(tiny, tmp_path):
    import timm
    from safetensors.torch import save_file

    src = tiny["dinov2"]
    (tmp_path / "dinov2").mkdir()
    state = {k: v.contiguous() for k, v in src.model.state_dict().items()}
    save_file(state, str(tmp_path / "dinov2" / "model.safetensors"))
    loaded = build_encoder("dinov2", size="tiny", weights=tmp_path)  # shared dir, found by alias
    x = _clip(1, 4, seed=6)
    torch.testing.assert_close(loaded.encode(x), src.encode(x), atol=0, rtol=0)
    # a checkpoint trained at another resolution (like DINOv2's 518 px) gets its pos_embed resampled
    other = timm.create_model("vit_large_patch14_reg4_dinov2", pretrained=False, num_classes=0,
                              embed_dim=32, depth=3, num_heads=2, img_size=84, init_values=1.0)
    assert other.pos_embed.shape[1] == 36
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(tmp_path / "other.safetensors"))
    resampled = build_encoder("dinov2", size="tiny", weights=tmp_path / "other.safetensors")
    assert resampled.model.pos_embed.shape[1] == 16 and torch.isfinite(resampled.encode(x)).all()


def test_vivit_loads_hub_style_classification_checkpoint(tiny, tmp_path):
    from transformers import VivitConfig, VivitForVideoClassification

    from merv.extract.encoders.vivit import TINY

    src = tiny["vivit"]
    clf = VivitForVideoClassification(VivitConfig(**TINY, num_labels=3))
    clf.vivit.load_state_dict(src.model.state_dict(), strict=False)  # classifier model has no pooler either
    clf.save_pretrained(tmp_path)  # `vivit.` prefix + classifier, pre-v5 names, like the hub checkpoint
    loaded = build_encoder("vivit", size="tiny", weights=tmp_path)
    x = _clip(1, 32, seed=8)
    torch.testing.assert_close(loaded.encode(x), src.encode(x), atol=1e-6, rtol=1e-6)


# ------------------------------------------------------------------------------ paper on meta
@pytest.mark.parametrize("name", NAMES)
def test_paper_size_on_meta(name):
    enc = build_encoder(name, size="paper", meta=True)
    grid, dim = PAPER_TABLE[name]
    assert enc.info.grid == grid and enc.info.dim == dim and enc.info.image_size == 224
    assert enc.info.frames == (32 if name == "vivit" else 16)
    assert all(p.is_meta for p in enc.parameters())
    s = enc.info.image_size
    out = enc.forward(torch.empty(1, enc.info.frames, 3, s, s, device="meta"))
    assert tuple(out.shape) == (1, *grid, dim)
    assert enc.info.weights == f"pretrained:{enc.info.model_id}"
    assert enc.num_parameters() > 80_000_000
    assert enc.info.fingerprint() == build_encoder(name, size="paper", meta=True).info.fingerprint()
    assert enc.info.fingerprint() != build_encoder(name, size="tiny", meta=True).info.fingerprint()


@pytest.mark.parametrize("name", NAMES)
def test_small_keeps_paper_inputs_and_grids_at_a_fraction_of_the_size(name):
    """The benchmark size: the paper's frames, image size and token grid, random weights, far
    fewer parameters, its own fingerprint; it encodes real clips to the paper's grid."""
    paper = build_encoder(name, size="paper", meta=True)
    small = build_encoder(name, size="small")
    assert (small.info.grid, small.info.frames, small.info.image_size) == (paper.info.grid, paper.info.frames, 224)
    assert small.info.dim < paper.info.dim
    assert small.num_parameters() * 20 < paper.num_parameters()
    assert small.info.weights == "random-init(seed=0)"
    fingerprints = {build_encoder(name, size=s, meta=s == "paper").info.fingerprint() for s in ("paper", "small", "tiny")}
    assert len(fingerprints) == 3
    out = small.encode(_clip(1, small.info.frames, hw=(60, 80)))
    assert tuple(out.shape) == (1, *paper.info.grid, small.info.dim) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="size must be one of"):
        build_encoder(name, size="huge")


def test_paper_identities_and_layers():
    info = {n: build_encoder(n, meta=True).info for n in NAMES}
    assert info["dinov2"].model_id == "timm/vit_large_patch14_reg4_dinov2.lvd142m"
    assert info["siglip"].model_id == "timm/vit_base_patch16_siglip_224.webli"  # SigLIP 1, not timm's v2 default
    assert info["vivit"].model_id == "google/vivit-b-16x2-kinetics400"
    assert info["languagebind"].model_id == "LanguageBind/LanguageBind_Video_merge"
    assert {n: info[n].layer for n in NAMES} == {"dinov2": "penultimate", "siglip": "penultimate", "vivit": "last",
                                                 "languagebind": "penultimate"}
    assert {n: info[n].framewise for n in NAMES} == {"dinov2": True, "siglip": True, "vivit": False,
                                                     "languagebind": False}
    assert info["dinov2"].dropped_tokens == ("cls", "reg x4") and info["siglip"].dropped_tokens == ()
    assert info["languagebind"].config["num_frames"] == 8 and info["languagebind"].config["num_hidden_layers"] == 24
    assert len({i.fingerprint() for i in info.values()}) == 4


def test_fingerprint_covers_numbers_not_notes(tiny):
    info = tiny["siglip"].info
    same = dataclasses.replace(info, notes="other words")
    assert same.fingerprint() == info.fingerprint()
    for change in (
        dict(frames=8),
        dict(layer="last"),
        dict(weights="pretrained:x"),
        dict(preprocessing=dataclasses.replace(info.preprocessing, interpolation="bilinear")),
        dict(config={**info.config, "depth": 4}),
    ):
        assert dataclasses.replace(info, **change).fingerprint() != info.fingerprint(), change


# ------------------------------------------------------------------------------------ weights
def test_missing_weights_error_names_model_and_places(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsNotFoundError) as err:
        build_encoder("dinov2")
    text = str(err.value)
    assert "timm/vit_large_patch14_reg4_dinov2.lvd142m" in text and "empty-cache" in text
    assert "hf download timm/vit_large_patch14_reg4_dinov2.lvd142m --local-dir" in text and "--weights" in text
    with pytest.raises(WeightsNotFoundError, match="HF_HUB_OFFLINE"):
        build_encoder("languagebind", allow_download=True)  # offline wins: no network attempt
    with pytest.raises(WeightsNotFoundError, match="nowhere-dir"):
        build_encoder("vivit", weights=tmp_path / "nowhere-dir")


def test_resolve_weights_from_hf_cache_layout(tmp_path, monkeypatch):
    repo = tmp_path / "hub" / "models--LanguageBind--LanguageBind_Video_merge"
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    (snap / "pytorch_model.bin").write_bytes(b"x")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    found = resolve_weights("LanguageBind/LanguageBind_Video_merge")
    assert found == snap / "pytorch_model.bin"
    assert resolve_weights("LanguageBind/LanguageBind_Video_merge", tmp_path / "hub") == found  # cache as a dir


def test_languagebind_checkpoint_config_is_checked(tiny, tmp_path):
    torch.save(tiny["languagebind"].tower.state_dict(), tmp_path / "pytorch_model.bin")
    cfg = dataclasses.asdict(LanguageBindVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                                      num_attention_heads=2, image_size=56))
    (tmp_path / "config.json").write_text(json.dumps({"vision_config": {**cfg, "num_frames": 4}}))
    with pytest.raises(WeightsError, match="num_frames"):
        build_encoder("languagebind", size="tiny", weights=tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"vision_config": {**cfg, "hidden_act": "quick_gelu"}}))
    quick = build_encoder("languagebind", size="tiny", weights=tmp_path)
    assert quick.info.config["hidden_act"] == "quick_gelu"  # the checkpoint's activation wins
    (tmp_path / "bare").mkdir()
    torch.save(tiny["languagebind"].tower.state_dict(), tmp_path / "bare" / "pytorch_model.bin")
    gelu = build_encoder("languagebind", size="tiny", weights=tmp_path / "bare")
    assert gelu.info.config["hidden_act"] == "gelu"
    x = _clip(1, 8, seed=11)
    assert not torch.allclose(quick.encode(x), gelu.encode(x), atol=1e-4)


# ------------------------------------------------------------------------------ preprocessing
def test_timm_style_preprocessing_matches_pil_pipeline(tiny):
    from PIL import Image
    from torchvision import transforms as T

    enc = tiny["dinov2"]
    spec = enc.info.preprocessing
    assert spec.mean == (0.485, 0.456, 0.406) and spec.std == (0.229, 0.224, 0.225) and spec.interpolation == "bicubic"
    frame = _clip(1, 1, seed=9, hw=(90, 120))
    ours = enc.preprocess(frame)[0, 0]
    s = enc.info.image_size
    ref = T.Compose([T.Resize((s, s), interpolation=T.InterpolationMode.BICUBIC), T.ToTensor(),
                     T.Normalize(spec.mean, spec.std)])(Image.fromarray(frame[0, 0].numpy()))
    one_level = 1.0 / 255 / min(spec.std)
    assert (ours - ref).abs().max() <= 2.5 * one_level  # PIL vs torch antialiased bicubic: ~1 grey level
    assert (ours - ref).abs().mean() <= 0.3 * one_level


def test_paper_mean_std_per_encoder():
    info = {n: build_encoder(n, meta=True).info.preprocessing for n in NAMES}
    assert info["siglip"].mean == (0.5, 0.5, 0.5) and info["siglip"].interpolation == "bicubic"
    assert info["vivit"].mean == (0.5, 0.5, 0.5) and info["vivit"].std == (0.5, 0.5, 0.5)
    assert info["vivit"].interpolation == "bilinear" and info["vivit"].size == (224, 224)
    assert info["languagebind"].mean == (0.48145466, 0.4578275, 0.40821073)
    assert info["languagebind"].resize == "shortest_side" and info["languagebind"].hflip == "none"


def test_languagebind_preprocessing_is_the_reference_transform(tiny):
    from torchvision.transforms import CenterCrop

    enc = tiny["languagebind"]
    s = enc.info.image_size
    frames = _clip(1, 8, seed=10, hw=(45, 81))
    ours = enc.preprocess(frames)[0]  # (T, 3, s, s)
    video = frames[0].permute(3, 0, 1, 2).float() / 255.0  # (C, T, H, W), the reference's layout
    mean = torch.tensor(enc.info.preprocessing.mean)[:, None, None, None]
    std = torch.tensor(enc.info.preprocessing.std)[:, None, None, None]
    video = (video - mean) / std
    new_h, new_w = s, int(np.floor(81 / 45 * s))  # ShortSideScale: h is the short side
    video = torch.nn.functional.interpolate(video, size=(new_h, new_w), mode="bilinear", align_corners=False)
    ref = CenterCrop(s)(video).permute(1, 0, 2, 3)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------------------- speed
def test_tiny_encoders_are_fast(tiny):
    clip = _clip(1, 32, hw=(144, 176))
    for enc in tiny.values():  # warm-up
        enc.encode(clip[:, : enc.info.frames])
    t0 = time.perf_counter()
    for enc in tiny.values():
        enc.encode(clip[:, : enc.info.frames])
    assert time.perf_counter() - t0 < 3.0  # typically ~0.35 s on 2 cores
