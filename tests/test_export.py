"""Checkpoints: our export round trip, and reference (published MERV) layout -> our model."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn as nn
from testkit import llm as H

from merv.store.paper import PAPER_ENCODERS
from merv.train.accounting import paper_feature_specs
from merv.train.connector import Connector, ConnectorConfig
from merv.train.export import (
    CheckpointError,
    connector_from_reference_config,
    load_merv,
    load_published_merv,
    load_reference_state,
    read_merv_config,
    reference_to_merv_state,
    save_merv,
)
from merv.train.model import MervModel
from merv.train.prompts import get_prompt_builder, tokenize_conversation


def _batch(model: MervModel, tok, b: int = 2, seed: int = 0):
    ids, labels = tokenize_conversation(get_prompt_builder(model.prompt_format, tok), tok, H.CONVERSATION)
    feats = H.random_features(model.connector.specs, b, seed=seed)
    return feats, ids[None].repeat(b, 1), labels[None].repeat(b, 1)


@pytest.mark.parametrize("flavor,projector", [("llama", "avg2d"), ("qwen2", "conv3d")])
def test_save_load_round_trip_same_logits(tmp_path, flavor: str, projector: str) -> None:
    cfg = ConnectorConfig(projector=projector, tokens_per_frame=4, fusion_embed_dim=48)
    model, tok = H.build_tiny_merv(connector_config=cfg, flavor=flavor, seed=2)
    model.eval()
    feats, ids, labels = _batch(model, tok)
    with torch.no_grad():
        before = model(feats, ids, labels=labels)
    save_merv(model, tmp_path / "ckpt", extra={"step": 7})
    files = {p.name for p in (tmp_path / "ckpt").iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer_config.json", "README.md"} <= files
    cfg_json = read_merv_config(tmp_path / "ckpt")
    assert cfg_json["layout"] == "hf"
    assert cfg_json["connector"]["projector"] == projector and cfg_json["extra"] == {"step": 7}
    loaded = load_merv(tmp_path / "ckpt", dtype=torch.float32)
    assert loaded.prompt_format == model.prompt_format and loaded.bos_token_id == model.bos_token_id
    assert loaded.connector.specs == model.connector.specs
    with torch.no_grad():
        after = loaded(feats, ids, labels=labels)
    assert torch.allclose(before.logits, after.logits, atol=1e-5)
    assert torch.allclose(before.loss, after.loss, atol=1e-6)
    prompt = model.build_prompt("Describe the video.")
    one = {k: v[:1] for k, v in feats.items()}
    assert loaded.generate(one, prompt, max_new_tokens=6).token_ids == model.generate(one, prompt, max_new_tokens=6).token_ids
    # inert parameters stay frozen after loading and after a stage change
    loaded.set_stage("finetune")
    assert all(not loaded.connector.get_parameter(n).requires_grad for n in loaded.connector.inert_parameter_names())


def test_connector_only_checkpoint_takes_llm_from_its_source(tmp_path) -> None:
    model, tok = H.build_tiny_merv(seed=4)
    llm_dir = tmp_path / "base-llm"
    model.llm.save_pretrained(llm_dir)
    tok.save_pretrained(llm_dir)
    model.llm_source = str(llm_dir)
    save_merv(model, tmp_path / "align", save_llm=False)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "align" / "model.safetensors"), "pt") as f:
        assert all(k.startswith("connector.") for k in f.keys())  # the LLM is not copied
    assert json.loads((tmp_path / "align" / "config.json").read_text())["llm_saved"] is False
    loaded = load_merv(tmp_path / "align", dtype=torch.float32)
    feats, ids, _ = _batch(model, tok, b=1)
    with torch.no_grad():
        assert torch.allclose(model(feats, ids).logits, loaded(feats, ids).logits, atol=1e-5)
    model.llm_source = None
    with pytest.raises(ValueError, match="needs model.llm_source"):
        save_merv(model, tmp_path / "x", save_llm=False)


def test_corrupt_or_mismatched_checkpoint_is_named(tmp_path) -> None:
    model, _ = H.build_tiny_merv(seed=1)
    save_merv(model, tmp_path / "ck")
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    cfg["connector"]["fusion"] = "concat_channel"  # the saved weights are a cross-attention fusion's
    (tmp_path / "ck" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"weights do not fit the model .*missing keys \['connector.fusion.proj.bias'"):
        load_merv(tmp_path / "ck")
    (tmp_path / "ck" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no weights"):
        load_merv(tmp_path / "ck")
    with pytest.raises(FileNotFoundError, match="not a MERV export directory"):
        load_merv(tmp_path)


# --- the reference layout, re-created here from the reference's module structure ----------


class RefLinearProjector(nn.Module):  # reference LinearProjector: .projector = Linear, .layernorm = Identity
    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.projector = nn.Linear(d_in, d_out)
        self.layernorm = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.layernorm(x))


class RefAvg3D(nn.Module):  # reference AveragePooling3DProjector (arch "3davg+linear"), input (B, F, H*W, C)
    def __init__(self, d_in: int, d_out: int, frames: int, side: int) -> None:
        super().__init__()
        self.avg_pooling = nn.AdaptiveAvgPool3d((frames, side, side))
        self.projector = RefLinearProjector(d_in, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, f, n, c = x.shape
        h = int(math.sqrt(n))
        v = x.reshape(b, f, h, h, c).permute(0, 4, 1, 2, 3)
        return self.projector(self.avg_pooling(v).permute(0, 2, 3, 4, 1).reshape(b, -1, c))


class RefCrossAttention(nn.Module):  # reference CrossAttentionAdapterLearnableQuery(averagetoken=True)
    def __init__(self, embed_dim: int, llm_dim: int, token_length: int) -> None:
        super().__init__()
        self.llm_dim, self.token_length = llm_dim, token_length
        self.attention = nn.MultiheadAttention(embed_dim, 1, dropout=0.0, batch_first=True, kdim=llm_dim, vdim=llm_dim)
        self.Q = nn.Parameter(torch.empty(1, embed_dim))
        nn.init.xavier_uniform_(self.Q)

    def forward(self, vs: list[torch.Tensor]) -> torch.Tensor:
        b, e = vs[0].shape[0], len(vs)
        v = torch.stack(vs, 1)
        keys = v.mean(2)
        _, weights = self.attention(query=self.Q.repeat(b, 1).unsqueeze(1), key=keys, value=keys)
        return torch.bmm(weights, v.reshape(b, e, -1)).reshape(b, self.token_length, self.llm_dim)


class RefLLMBackbone(nn.Module):  # reference HFCausalLLMBackbone: the HF model under `.llm`
    def __init__(self, llm: nn.Module) -> None:
        super().__init__()
        self.llm = llm


def test_reference_layout_checkpoint_gives_the_same_outputs(tmp_path) -> None:
    tok = H.build_tiny_tokenizer("llama")
    specs = H.tiny_feature_specs()  # (4, 6, 6, 32) and (4, 4, 4, 24)
    side, d = 2, 64
    torch.manual_seed(123)
    ref_projectors = nn.ModuleList([RefAvg3D(s.dim, d, s.grid[0], side) for s in specs])
    ref_fusion = RefCrossAttention(48, d, specs[0].grid[0] * side * side)
    with torch.no_grad():
        ref_fusion.attention.in_proj_bias.normal_()
    ref_llm = RefLLMBackbone(H.build_tiny_llm(tok, seed=9))
    torch.save(
        {"model": {"projectors": ref_projectors.state_dict(), "feature_fusion": ref_fusion.state_dict(),
                   "llm_backbone": ref_llm.state_dict()}},
        tmp_path / "latest-checkpoint.pt",
    )
    # our model with fresh (different) weights, configured like the reference run
    cfg, _ = connector_from_reference_config(
        {"arch_specifier": "no-align+3davg+linear", "feature_fusion": "cross_attention_avg_lq", "projector_token_length": 4,
         "video_backbone_ids": ["languagebind-video-noclass"]}
    )
    assert (cfg.projector, cfg.frame_factor, cfg.head, cfg.fusion) == ("avg3d", 1, "linear", "cross_attention")
    model, _ = H.build_tiny_merv(specs=specs, connector_config=cfg.with_(fusion_embed_dim=48), seed=0)
    feats = H.random_features(specs, 2, seed=8)
    ids, _ = tokenize_conversation(get_prompt_builder("pure", tok), tok, H.CONVERSATION)
    ids = ids[None].repeat(2, 1)
    with torch.no_grad():
        before = model(feats, ids).logits
        load_reference_state(model, tmp_path / "latest-checkpoint.pt")
        ours = model(feats, ids)
        # the reference forward: (B, F, H*W, C) per encoder -> projectors -> fusion -> after BOS -> LLM
        xs = [p(feats[s.name].float().reshape(2, s.grid[0], -1, s.dim)) for p, s in zip(ref_projectors, specs)]
        vis = ref_fusion(xs)
        emb = ref_llm.llm.get_input_embeddings()(ids)
        ref_logits = ref_llm.llm(inputs_embeds=torch.cat([emb[:, :1], vis, emb[:, 1:]], 1)).logits
    assert not torch.allclose(before, ref_logits, atol=1e-3)  # the load changed something
    assert torch.allclose(ours.logits, ref_logits, atol=1e-5)
    assert ours.fusion_weights.shape == (2, 2)


def test_reference_key_mapping_variants() -> None:
    specs = H.tiny_feature_specs()
    mlp = Connector(specs, 16, ConnectorConfig(projector="avg2d", head="gelu-mlp", tokens_per_frame=4, fusion="concat_channel"))
    ref = {
        "projectors": {f"{i}.projector.projector.{j}.{w}": torch.zeros(1) for i in range(2) for j in (0, 2) for w in ("weight", "bias")},
        "feature_fusion": {"projector.weight": torch.zeros(1), "projector.bias": torch.zeros(1)},
        "llm_backbone": {"llm.model.norm.weight": torch.zeros(1)},
    }
    conn, llm = reference_to_merv_state(ref, mlp)
    assert set(conn) == set(mlp.state_dict()) and set(llm) == {"model.norm.weight"}
    scalar = Connector(specs[:1], 16, ConnectorConfig(projector="all_tokens", fusion="learnable_scalar"))
    legacy = {"projector": {"projector.weight": torch.zeros(1), "projector.bias": torch.zeros(1)},
              "adapter": {"scalar": torch.zeros(1)}, "llm_backbone": {}}
    conn, _ = reference_to_merv_state(legacy, scalar)
    assert set(conn) == set(scalar.state_dict())
    with pytest.raises(CheckpointError, match="no counterpart"):
        reference_to_merv_state({"projectors": {"0.weird.weight": torch.zeros(1)}, "llm_backbone": {}}, scalar)
    with pytest.raises(CheckpointError, match="expected 'projectors' and 'llm_backbone'"):
        reference_to_merv_state({"vision": {}}, scalar)


def test_published_merv_config_maps_to_the_paper_connector(tmp_path) -> None:
    merv_base = {  # reference merv/conf/models.py MERV_Base, as stored in the run's config.json
        "model_id": "merv-frozen", "arch_specifier": "no-align+3davg+linear", "feature_fusion": "cross_attention_avg_lq",
        "video_backbone_ids": ["languagebind-video-noclass", "dinov2-video-all-tokens",
                               "vivit-google-b-all-no-cls-16frames", "siglip-vit-b16-224px-all-no-cls"],
        "llm_backbone_id": "llama2-7b-pure", "num_frames": [16, 16, 32, 16], "projector_token_length": 64,
        "visual_feature_length": 1024,
    }
    cfg, specs = connector_from_reference_config(merv_base)
    assert specs == paper_feature_specs()
    with torch.device("meta"):
        connector = Connector(specs, 4096, cfg.with_(fusion_embed_dim=3072))
    assert connector.num_tokens == merv_base["visual_feature_length"]
    with pytest.raises(FileNotFoundError, match="hf download tyleryzhu/merv"):
        load_published_merv("merv-frozen", cache_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="must hold config.json"):
        load_published_merv(str(tmp_path))


def test_load_published_merv_from_a_reference_run_directory(tmp_path) -> None:
    """A reference run dir (config.json + checkpoints/latest-checkpoint.pt) with the paper connector
    and a tiny LLM in place of LLaMA-2 7B loads and reproduces the reference forward pass."""
    tok = H.build_tiny_tokenizer("llama")
    tok_dir = tmp_path / "tokenizer"
    tok.save_pretrained(tok_dir)
    specs = paper_feature_specs()
    llm = H.build_tiny_llm(tok, seed=5)
    d = llm.config.hidden_size
    torch.manual_seed(0)
    ref_projectors = nn.ModuleList([RefAvg3D(s.dim, d, 16, 8) for s in specs])
    ref_fusion = RefCrossAttention(3072, d, 1024)
    run = tmp_path / "merv-frozen"
    (run / "checkpoints").mkdir(parents=True)
    torch.save(
        {"model": {"projectors": ref_projectors.state_dict(), "feature_fusion": ref_fusion.state_dict(),
                   "llm_backbone": RefLLMBackbone(llm).state_dict()}},
        run / "checkpoints" / "latest-checkpoint.pt",
    )
    (run / "config.json").write_text(json.dumps({"model": {
        "model_id": "merv-frozen", "arch_specifier": "no-align+3davg+linear", "feature_fusion": "cross_attention_avg_lq",
        "video_backbone_ids": ["languagebind-video-noclass", "dinov2-video-all-tokens",
                               "vivit-google-b-all-no-cls-16frames", "siglip-vit-b16-224px-all-no-cls"],
        "llm_backbone_id": "llama2-7b-pure", "projector_token_length": 64, "visual_feature_length": 1024, "llm_max_length": 2048,
    }}))
    model = load_published_merv(str(run), tokenizer_source=str(tok_dir), dtype=torch.float32, llm_config=llm.config)
    assert not any(p.requires_grad for p in model.parameters())
    feats = H.random_features(specs, 1, seed=2)
    prompt = model.build_prompt("What is happening in this video?")
    ids = torch.tensor(model._prompt_ids(prompt))
    with torch.no_grad():
        ours = model(feats, ids).logits
        xs = [p(feats[s.name].float().reshape(1, 16, -1, s.dim)) for p, s in zip(ref_projectors, specs)]
        emb = llm.get_input_embeddings()(ids)
        ref = llm(inputs_embeds=torch.cat([emb[:, :1], ref_fusion(xs), emb[:, 1:]], 1)).logits
    assert torch.allclose(ours, ref, atol=1e-4)
    # `merv convert-reference` makes the same run a Hugging Face-native export with the same logits
    llm_dir = tmp_path / "llm-config"
    llm.config.save_pretrained(llm_dir)
    from typer.testing import CliRunner

    from merv.cli import app
    from merv.hf import MervForConditionalGeneration

    res = CliRunner().invoke(app, ["convert-reference", str(run), str(tmp_path / "hf"), "--tokenizer", str(tok_dir),
                                   "--dtype", "float32", "--llm-config", str(llm_dir / "config.json")])
    assert res.exit_code == 0, res.output
    converted = MervForConditionalGeneration.from_pretrained(tmp_path / "hf")
    with torch.no_grad():
        assert torch.equal(converted(input_ids=ids, features=feats).logits, ours)
    assert [e["model_id"] for e in converted.config.encoders][:2] == ["LanguageBind/LanguageBind_Video_merge",
                                                                      PAPER_ENCODERS["dinov2"].model_id]
