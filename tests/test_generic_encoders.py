"""Generic encoders (`timm:<arch>.<tag>`, `hf:<repo | dir>`) and the Hiera video expert.

Each generic encoder's features must equal the library's own intermediate output for the chosen
layer (timm's `forward_intermediates` / `forward_features` taps, transformers' `hidden_states`),
with prefix tokens dropped; the spec's options are one canonical name and part of the
fingerprint; bad specs give one clear error; and `merv extract --encoders timm:...,hf:...` runs
through the Ray extraction, a few training steps and `merv generate`.
"""

from __future__ import annotations

import json
import time

import pytest
import torch
from typer.testing import CliRunner

from merv import MervError
from merv.cli import app
from merv.extract.encoders import build_encoder
from merv.store.encoder_names import canonical_encoder_name
from merv.store.schema import EncoderGroupSpec

VIT = "timm:vit_base_patch16_clip_224.openai"
HIERA_IMG = "timm:hiera_tiny_224.mae_in1k_ft_in1k"


def _frames(t: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (2, t, 37, 45, 3), dtype=torch.uint8, generator=g)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny random DINOv2 with 2 register tokens (so 3 prefix tokens) and its image processor."""
    from transformers import BitImageProcessor, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    d = tmp_path_factory.mktemp("hf-dinov2")
    torch.manual_seed(0)
    Dinov2WithRegistersModel(Dinov2WithRegistersConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
                             image_size=32, patch_size=8, num_register_tokens=2)).save_pretrained(d)
    BitImageProcessor(crop_size={"height": 32, "width": 32}, resample=2).save_pretrained(d)
    return d


def test_timm_vit_features_are_timms_own_tokens_of_the_chosen_block():
    enc = build_encoder(f"{VIT}?layer=1&frames=3", size="tiny")
    x = _frames(3)
    got = enc.encode(x)
    pixels = enc.preprocess(x).flatten(0, 1)
    tokens = enc.model.forward_intermediates(pixels, indices=[1], output_fmt="NLC", intermediates_only=True)[0]
    assert enc.model.num_prefix_tokens == 1 and tokens.shape[1] == 16  # timm dropped the CLS token
    assert enc.info.grid == (3, 4, 4) and enc.info.dim == 32 and enc.info.dropped_tokens == ("cls",)
    torch.testing.assert_close(got, tokens.reshape(2, 3, 4, 4, 32), rtol=0, atol=1e-6)
    # the default layer is the penultimate block, and it is another tensor than block 1
    default = build_encoder(VIT, size="tiny")
    assert default.tap == len(default.model.blocks) - 2
    assert not torch.allclose(default.encode(_frames(16))[:, :3], got)


def test_timm_hiera_features_are_the_re_rolled_stage_output():
    enc = build_encoder(f"{HIERA_IMG}?layer=2&frames=2", size="tiny")
    x = _frames(2, seed=1)
    got = enc.encode(x)
    pixels = enc.preprocess(x).flatten(0, 1)
    stage = enc.model.forward_features(pixels, return_intermediates=True)[1][2]  # (N, h, w, d), spatial order
    assert got.shape == (2, 2, *stage.shape[1:]) and enc.info.grid == (2, *stage.shape[1:3])
    assert enc.info.dim == stage.shape[-1] and enc.info.dropped_tokens == ()
    torch.testing.assert_close(got, stage.reshape(got.shape), rtol=0, atol=1e-6)


def test_hf_features_are_the_hidden_state_of_the_layer_without_prefix_tokens(hf_dir):
    from transformers import Dinov2WithRegistersModel

    enc = build_encoder(f"hf:{hf_dir}?frames=2&layer=-3")
    ref = Dinov2WithRegistersModel.from_pretrained(hf_dir).eval()
    x = _frames(2, seed=2)
    got = enc.encode(x)
    with torch.no_grad():
        hidden = ref(pixel_values=enc.preprocess(x).flatten(0, 1), output_hidden_states=True).hidden_states[-3]
    assert hidden.shape[1] == 1 + 2 + 16
    torch.testing.assert_close(got, hidden[:, 3:].reshape(2, 2, 4, 4, 32), rtol=0, atol=1e-6)
    # preprocessing is the image processor's: bilinear (resample=2), CLIP mean / std of BitImageProcessor
    assert enc.info.preprocessing.interpolation == "bilinear" and enc.info.preprocessing.size == (32, 32)
    assert enc.info.preprocessing.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    assert enc.info.weights.startswith("file:")  # a local directory is identified by its weights' hash


def test_spec_options_are_canonical_and_fingerprinted(hf_dir):
    assert canonical_encoder_name(f"{VIT}?frames=16&layer=-2") == VIT  # defaults dropped
    assert canonical_encoder_name(f"{VIT}?layer=3&frames=4") == canonical_encoder_name(f"{VIT}?frames=4&layer=3")
    prints = {
        build_encoder(n, size="tiny").info.fingerprint()
        for n in (VIT, f"{VIT}?layer=1", f"{VIT}?frames=4", "timm:vit_base_patch16_clip_224.laion2b")
    }
    assert len(prints) == 4  # layer, frames and tag each change the fingerprint
    same = build_encoder(f"{VIT}?frames=16&layer=-2", size="tiny")
    assert same.info.name == VIT and same.info.fingerprint() in prints
    hf = {build_encoder(f"hf:{hf_dir}?layer={i}", meta=True).info.fingerprint() for i in (-1, -2)}
    assert len(hf) == 2
    # store keys are path- and URL-safe; the readable name stays in the group's spec
    info = build_encoder(f"{VIT}?layer=1&frames=4", size="tiny").info
    key = EncoderGroupSpec(info.name, info.fingerprint(), info.grid, info.dim, True).key()
    assert key.startswith("timm_vit_base_patch16_clip_224.openai_frames_4_layer_1-") and not set(key) & set("/:?&=")


@pytest.mark.parametrize(("name", "match"), [
    ("timm:vit_bass_patch16_224.augreg_in21k", "no architecture 'vit_bass_patch16_224'.*vit_base_patch16_224"),
    ("timm:vit_base_patch16_224", "needs one of its pretrained tags.*augreg"),
    ("timm:vit_base_patch16_224.augreg_in21k?stride=2", "option 'stride=2' is not one of frames=N, layer=N"),
    ("timm:vit_base_patch16_224.augreg_in21k?layer=x", "layer='x' must be an integer"),
    ("timm:vit_base_patch16_224.augreg_in21k?layer=40", "layer=40 is outside the 3 taps"),
    ("timm:resnet18.a1_in1k", "ResNet is not a ViT-style model"),
    ("hf:/nonexistent/dir", "not a transformers model directory"),
    ("dinov3", "unknown encoder 'dinov3'.*timm:<arch>.<tag>"),
])
def test_bad_specs_give_one_clear_error(name, match):
    with pytest.raises(MervError, match=match):
        build_encoder(name, size="tiny")


def test_bad_spec_on_the_command_line_is_one_line(tmp_path):
    (tmp_path / "m.jsonl").write_text(json.dumps({"id": "a", "path": "a.mp4"}) + "\n")
    result = CliRunner().invoke(app, ["extract", str(tmp_path / "m.jsonl"), "--store", str(tmp_path / "s.zarr"),
                                      "--size", "tiny", "--encoders", "timm:resnet18.a1_in1k"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "--encoders: encoder 'timm:resnet18.a1_in1k': ResNet is not a ViT-style model" in result.output


def test_hiera_is_the_reference_video_model_and_loads_published_names(tmp_path):
    from safetensors.torch import save_file

    paper = build_encoder("hiera", meta=True)
    assert (paper.info.grid, paper.info.dim, paper.info.frames, paper.info.framewise) == ((8, 7, 7), 768, 16, False)
    enc = build_encoder("hiera", size="tiny")
    x = _frames(16, seed=3)[:1]
    got = enc.encode(x)
    video = enc.preprocess(x).permute(0, 2, 1, 3, 4)
    last = enc.model.forward_features(video, return_intermediates=True)[1][-1]
    assert got.shape == (1, *enc.info.grid, enc.info.dim) == last.shape
    torch.testing.assert_close(got, last, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="exactly 16 frames"):
        enc.encode(_frames(8))
    # a checkpoint with facebookresearch/hiera's names (final `norm.`, K400 `head.projection.`) loads strictly
    state = {("norm." + k[len("head.norm."):] if k.startswith("head.norm.") else k): v
             for k, v in enc.model.state_dict().items()}
    state |= {"head.projection.weight": torch.zeros(400, enc.info.dim), "head.projection.bias": torch.zeros(400)}
    save_file(state, str(tmp_path / "model.safetensors"))
    loaded = build_encoder("hiera", size="tiny", weights=tmp_path)
    assert torch.equal(loaded.encode(x), got)


def test_generic_names_survive_the_run_config(tmp_path):
    from merv.train.config import ModelConfig

    config = ModelConfig(encoders=(f"{VIT}?layer=1&frames=4", "dinov2"))
    assert config.encoders == (f"{VIT}?frames=4&layer=1", "dinov2")
    with pytest.raises(MervError, match="their shapes come from a feature store"):
        config.feature_specs()


@pytest.mark.integration
def test_extract_train_generate_with_timm_and_hf_specs(ray_session, hf_dir, tmp_path):
    """`merv extract --encoders timm:...,hf:...` on the Ray path, then training and `merv generate`."""
    from merv.pipelines.generate import GenerateOptions, answer_video
    from merv.pipelines.synthetic import generate_synthetic
    from merv.store import FeatureReader
    from merv.train.online import OnlineEncoders
    from merv.train.recipes import get_recipe
    from merv.train.specs import FeatureSpec
    from merv.train.trainer import train

    t0 = time.perf_counter()
    data = generate_synthetic(tmp_path / "data", n_videos=2, seed=3, size=64, frames=16)
    store = str(tmp_path / "features.zarr")
    specs = f"{VIT}?layer=-3&frames=4,hf:{hf_dir}?frames=4"
    result = CliRunner().invoke(app, ["extract", str(data.manifest), "--store", store, "--size", "tiny",
                                      "--grid", "native", "--encoders", specs])
    assert result.exit_code == 0, result.output
    reader = FeatureReader(store)
    names = [canonical_encoder_name(n) for n in specs.split(",")]
    assert sorted(reader.groups) == sorted(names)
    # the cached features are the encoders' own output on the decoded clip (extraction's frame rules)
    online = OnlineEncoders([FeatureSpec.from_group_spec(g.spec) for g in reader.groups.values()], size="tiny")
    sample = reader.table.ids[0]
    got = online.encode_path(reader.table.record(0).source)
    want = reader.get(sample)
    for name in names:
        assert torch.equal(got[name][0], torch.from_numpy(want[name]).float()), name

    t1 = time.perf_counter()
    run = train(get_recipe("tiny", stage="finetune").override({
        "model.encoders": [f"{VIT}?frames=4&layer=-3", f"hf:{hf_dir}?frames=4"],
        "data.files": [str(data.train_json)], "data.stores": [store], "schedule.max_steps": 2,
        "loader.global_batch_size": 2, "model.connector.tokens_per_frame": 4,
        "checkpoint.out_dir": str(tmp_path / "run"), "logging.progress": False, "logging.tensorboard": False}))
    assert len(run["losses"]) == 2 and all(loss > 0 for loss in run["losses"])
    video = reader.table.record(0).source
    answer = answer_video(run["export"], video, "What color is the shape?", GenerateOptions(max_new_tokens=4))
    assert isinstance(answer, str)
    print(f"extract {t1 - t0:.1f}s, train + generate {time.perf_counter() - t1:.1f}s")


def test_model_info_measures_any_encoder_like_the_paper_closed_form():
    """`merv model info --encoders`: an encoder without paper shapes is measured on the meta device;
    the measurement agrees with the paper's closed-form count where both exist (DINOv2)."""
    from merv.extract.encoders.cost import measure_encoder
    from merv.pipelines.model_info import model_info
    from merv.train.accounting import PAPER_ENCODERS

    dino = measure_encoder("dinov2")
    paper = PAPER_ENCODERS["dinov2"].vit
    assert dino.params == paper.params() and dino.flops == pytest.approx(paper.forward_flops(16), rel=1e-3)
    name = f"{VIT}?layer=-3"
    report = model_info("merv-frozen", 2048, ["dinov2", name]).to_dict()
    vit = measure_encoder(name)
    assert report["params"][f"encoder/{name}"] == vit.params == 85_799_424  # ViT-B/16 without its head
    assert report["flops"][f"encoder/{name}"] == vit.flops
    assert vit.flops < measure_encoder(VIT).flops  # layer -3 stops one block earlier than -2
    assert report["visual_tokens"] == 16 * 64  # cross-attention fusion: one 16 x 8x8 sequence from both


def test_hf_repo_id_is_read_offline_from_the_hf_cache(hf_dir, tmp_path, monkeypatch):
    """`hf:org/name` resolves in the HF cache (HF_HUB_CACHE) without the network; absent, the
    error names the repo and the download command."""
    import shutil

    snapshot = tmp_path / "hub" / "models--acme--tiny-dino" / "snapshots" / "0123abc"
    shutil.copytree(hf_dir, snapshot)
    (tmp_path / "hub" / "models--acme--tiny-dino" / "refs").mkdir()
    (tmp_path / "hub" / "models--acme--tiny-dino" / "refs" / "main").write_text("0123abc")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cached = build_encoder("hf:acme/tiny-dino?frames=2")
    local = build_encoder(f"hf:{hf_dir}?frames=2")
    x = _frames(2, seed=4)
    assert torch.equal(cached.encode(x), local.encode(x))
    assert cached.info.weights == "pretrained:acme/tiny-dino" and cached.info.model_id == "acme/tiny-dino"
    with pytest.raises(MervError, match="weights for 'acme/other' not found.*hf download acme/other"):
        build_encoder("hf:acme/other")


def test_hf_image_text_model_gives_its_vision_tower(tmp_path):
    """A full CLIP checkpoint (text + vision) under hf: loads `CLIPVisionModel` from it; the CLS
    token is dropped from the chosen hidden state."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPVisionModel

    small = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=dict(small, vocab_size=100), vision_config=dict(small, image_size=32, patch_size=8))
              ).save_pretrained(tmp_path)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(tmp_path)
    enc = build_encoder(f"hf:{tmp_path}?frames=2&layer=-1")
    assert type(enc.model).__name__ == "CLIPVisionModel" and enc.info.architecture == "transformers:CLIPVisionModel"
    x = _frames(2, seed=5)[:1]
    with torch.no_grad():
        hidden = CLIPVisionModel.from_pretrained(tmp_path).eval()(
            pixel_values=enc.preprocess(x).flatten(0, 1), output_hidden_states=True).hidden_states[-1]
    assert hidden.shape[1] == 1 + 16
    torch.testing.assert_close(enc.encode(x), hidden[:, 1:].reshape(1, 2, 4, 4, 32), rtol=0, atol=1e-6)
