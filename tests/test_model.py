"""MervModel: label masking (loss by hand), mixed batches, BOS / no-BOS insertion, stage freezing,
generation (greedy, sampling, KV cache vs none, batching), online encoding, LLM loading, sizing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from testkit import llm as H

from merv.train.model import MervModel
from merv.train.prompts import IGNORE_INDEX, get_prompt_builder, tokenize_conversation

TEXT_ONLY = [
    {"from": "human", "value": "Describe the video."},
    {"from": "gpt", "value": "a chef is cooking in a kitchen on a stage."},
]


@pytest.fixture(scope="module")
def tiny():
    model, tok = H.build_tiny_merv(flavor="llama", seed=0)
    return model.eval(), tok


@pytest.fixture(scope="module")
def tiny_qwen():
    model, tok = H.build_tiny_merv(flavor="qwen2", seed=0)
    return model.eval(), tok


def _conv(model: MervModel, tok, conv=H.CONVERSATION):
    return tokenize_conversation(get_prompt_builder(model.prompt_format, tok), tok, conv)


def _by_hand_logits(model: MervModel, feats, ids: torch.Tensor, offset: int) -> torch.Tensor:
    """Independent path: embeddings + connector output spliced by hand, plain LLM call."""
    vis = model.connector(feats).embeds
    emb = model.llm.get_input_embeddings()(ids[None])
    return model.llm(inputs_embeds=torch.cat([emb[:, :offset], vis, emb[:, offset:]], 1)).logits[0]


@pytest.mark.parametrize("flavor", ["llama", "qwen2"])
def test_loss_counts_only_answer_tokens(flavor: str, tiny, tiny_qwen) -> None:
    model, tok = tiny if flavor == "llama" else tiny_qwen
    ids, labels = _conv(model, tok)
    feats = H.random_features(model.connector.specs, 1)
    with torch.no_grad():
        out = model(feats, ids[None], labels=labels[None])
        # LLaMA: right after BOS; Qwen (no BOS): at the start of the user turn's content
        offset = 1
        if flavor == "qwen2":
            opening = tok.apply_chat_template([{"role": "user", "content": "@@"}], tokenize=False).split("@@")[0]
            offset = len(tok(opening, add_special_tokens=False)["input_ids"])
            assert tok.decode(ids[:offset]).endswith("<|im_start|>user\n")
        assert model.visual_offsets(ids[None]).tolist() == [offset]
        logits = _by_hand_logits(model, feats, ids, offset)
    n_vis = model.num_visual_tokens
    # merged labels: visual positions ignored, text labels shifted past them
    assert (out.labels[0, offset : offset + n_vis] == IGNORE_INDEX).all()
    assert torch.equal(out.labels[0, offset + n_vis :], labels[offset:])
    assert out.attention_mask.shape == (1, len(ids) + n_vis) and bool(out.attention_mask.all())
    assert torch.allclose(out.logits[0], logits, atol=1e-5)
    # loss by hand: only answer tokens j (label != -100), each predicted from the position before it
    answer = [j for j in range(len(ids)) if labels[j] != IGNORE_INDEX]
    assert 0 < len(answer) < len(ids) // 2  # human turns and BOS carry no label
    pos = [(j + n_vis if j >= offset else j) for j in answer]
    logp = F.log_softmax(logits.float(), -1)
    expected = -torch.stack([logp[p - 1, ids[j]] for p, j in zip(pos, answer)]).mean()
    assert out.num_label_tokens == len(answer)
    assert torch.allclose(out.loss, expected, atol=1e-5)
    # sum reduction = mean * count
    with torch.no_grad():
        total = model(feats, ids[None], labels=labels[None], loss_reduction="sum").loss
    assert torch.allclose(total, expected * len(answer), atol=1e-4)


def test_mixed_batch_with_text_only_sample(tiny) -> None:
    model, tok = tiny
    ids0, lab0 = _conv(model, tok)
    ids1, lab1 = _conv(model, tok, TEXT_ONLY)
    ids, mask = H.pad_right([ids0, ids1], tok.pad_token_id)
    labels, _ = H.pad_right([lab0, lab1], IGNORE_INDEX)
    feats = H.random_features(model.connector.specs, 2, seed=1)
    has_visual = torch.tensor([True, False])
    with torch.no_grad():
        out = model(feats, ids, mask, labels, has_visual)
        alone0 = model({k: v[:1] for k, v in feats.items()}, ids0[None], labels=lab0[None])
        alone1 = model(None, ids1[None], labels=lab1[None])
        plain1 = model.llm(input_ids=ids1[None]).logits[0]
    n_vis = model.num_visual_tokens
    n0, n1 = len(ids0) + n_vis, len(ids1)
    assert out.logits.shape[:2] == (2, ids.shape[1] + n_vis)
    assert torch.allclose(out.logits[0, :n0], alone0.logits[0], atol=1e-4)
    # the text-only sample sees no visual tokens: same logits as the bare LLM, padding masked at the end
    assert torch.allclose(out.logits[1, :n1], plain1, atol=1e-4)
    assert torch.allclose(alone1.logits[0], plain1, atol=1e-5) and alone1.fusion_weights is None
    assert out.attention_mask[1, :n1].all() and not out.attention_mask[1, n1:].any()
    assert (out.labels[1, n1:] == IGNORE_INDEX).all()
    # the batch loss averages over every answer token of both samples
    total = alone0.loss * alone0.num_label_tokens + alone1.loss * alone1.num_label_tokens
    assert out.num_label_tokens == alone0.num_label_tokens + alone1.num_label_tokens
    assert torch.allclose(out.loss, total / out.num_label_tokens, atol=1e-4)


def test_mixed_batch_backward_reaches_connector(tiny) -> None:
    model, tok = tiny
    model.set_stage("align")
    try:
        ids1, lab1 = _conv(model, tok, TEXT_ONLY)
        feats = H.random_features(model.connector.specs, 1)
        # even an all-text batch keeps the connector in the graph (FSDP needs the same params every step)
        out = model(feats, ids1[None], labels=lab1[None], has_visual=torch.tensor([False]))
        out.loss.backward()
        grads = [p.grad for _, p in model.connector.named_parameters() if p.requires_grad]
        assert all(g is not None for g in grads) and all(float(g.abs().sum()) == 0.0 for g in grads)
        model.zero_grad(set_to_none=True)
        ids0, lab0 = _conv(model, tok)
        model(feats, ids0[None], labels=lab0[None]).loss.backward()
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        assert trainable and all(n.startswith("connector.") for n in trainable)
        assert all(float(model.get_parameter(n).grad.abs().sum()) > 0 for n in trainable)
        assert all(p.grad is None for p in model.llm.parameters())
    finally:
        model.zero_grad(set_to_none=True)
        model.requires_grad_(False)


def test_stages_freeze_the_right_parts(tiny) -> None:
    model, _ = tiny
    inert = set(model.connector.inert_parameter_names())
    assert inert  # the cross-attention fusion's unused value/out projections
    for stage, llm_trains in [("align", False), ("finetune", True), ("full-align", True)]:
        model.set_stage(stage)
        assert all(p.requires_grad == llm_trains for p in model.llm.parameters())
        for n, p in model.connector.named_parameters():
            assert p.requires_grad == (n not in inert), n
    with pytest.raises(ValueError, match="stage 'full-finetune' is unknown"):
        model.set_stage("full-finetune")
    model.requires_grad_(False)


def test_visual_sample_without_bos_is_rejected(tiny) -> None:
    model, tok = tiny
    ids, _ = _conv(model, tok)
    feats = H.random_features(model.connector.specs, 1)
    with pytest.raises(ValueError, match="do not start with BOS"):
        model(feats, ids[None, 1:])
    with pytest.raises(ValueError, match="no features were given"):
        model(None, ids[None], has_visual=torch.tensor([True]))


# --- generation ------------------------------------------------------------------------------


@pytest.mark.parametrize("flavor", ["llama", "qwen2"])
def test_generate_greedy_is_deterministic_and_cache_matches_recompute(flavor: str, tiny, tiny_qwen) -> None:
    model, tok = tiny if flavor == "llama" else tiny_qwen
    feats = H.random_features(model.connector.specs, 1, seed=3)
    prompt = model.build_prompt("What is happening in this video?")
    a = model.generate(feats, prompt, max_new_tokens=12, eos_token_id=[])
    b = model.generate(feats, prompt, max_new_tokens=12, eos_token_id=[])
    c = model.generate(feats, prompt, max_new_tokens=12, eos_token_id=[], use_cache=False)
    assert len(a.token_ids[0]) == 12
    assert a.token_ids == b.token_ids == c.token_ids
    assert a.text == tok.decode(a.token_ids[0], skip_special_tokens=True).strip()
    # the first generated token is the argmax of the full forward pass's last position
    ids = torch.tensor(model._prompt_ids(prompt)[0])
    with torch.no_grad():
        last = model(feats, ids[None]).logits[0, -1]
    assert a.token_ids[0][0] == int(last.argmax())


def test_kv_cache_step_logits_equal_full_forward(tiny) -> None:
    from merv.train.model import _cache_kwarg, _cache_of

    model, _ = tiny
    feats = H.random_features(model.connector.specs, 1, seed=4)
    rows = model._prompt_ids(model.build_prompt("Describe the video."))
    with torch.no_grad():
        embeds, mask, pos = model._prefill(feats, rows)
        nxt = torch.tensor([[7]])
        cached = model.llm(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, use_cache=True)
        step = model.llm(
            inputs_embeds=model.llm.get_input_embeddings()(nxt), attention_mask=torch.cat([mask, mask[:, :1]], 1),
            position_ids=pos[:, -1:] + 1, use_cache=True, **{_cache_kwarg(model.llm): _cache_of(cached)},
        ).logits[0, -1]
        full = model(feats, torch.cat([torch.tensor(rows), nxt], 1)).logits[0, -1]
    assert torch.allclose(step, full, atol=1e-5)


def test_generate_sampling_is_seeded_and_batches_left_padded(tiny) -> None:
    model, _ = tiny
    feats = H.random_features(model.connector.specs, 2, seed=5)
    one = {k: v[:1] for k, v in feats.items()}
    two = {k: v[1:] for k, v in feats.items()}
    p1, p2 = model.build_prompt("Describe the video."), model.build_prompt("How many people are there in this video?")
    kw = dict(max_new_tokens=10, do_sample=True, temperature=0.8, top_k=50, top_p=0.9, eos_token_id=[])
    s1 = model.generate(one, p1, seed=11, **kw)
    assert s1.token_ids == model.generate(one, p1, seed=11, **kw).token_ids
    assert s1.token_ids == model.generate(one, p1, seed=11, use_cache=False, **kw).token_ids
    assert s1.token_ids != model.generate(one, p1, seed=12, **kw).token_ids
    batch = model.generate(feats, [p1, p2], max_new_tokens=8)
    assert batch.token_ids[0] == model.generate(one, p1, max_new_tokens=8).token_ids[0]
    assert batch.token_ids[1] == model.generate(two, p2, max_new_tokens=8).token_ids[0]


def test_generate_stops_at_eos_and_text_only(tiny) -> None:
    model, tok = tiny
    prompt = model.build_prompt("Describe the video.")
    first = model.generate(None, prompt, max_new_tokens=1, eos_token_id=[]).token_ids[0][0]
    out = model.generate(None, prompt, max_new_tokens=5, eos_token_id=first)
    assert out.token_ids == [[]] and out.texts == [""]


class _FakeEncoder:
    """Deterministic stand-in for merv.extract encoders: features are a function of the frames."""

    def __init__(self, frames: int, grid: tuple[int, int, int], dim: int) -> None:
        self.info = {"frames": frames, "grid": grid, "dim": dim}
        g = torch.Generator().manual_seed(dim)
        self.proj = torch.randn(3, dim, generator=g)

    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        b, t, hh, ww, _ = frames.shape
        tt, h, w = self.info["grid"]
        x = frames.float().reshape(b, tt, t // tt, h, hh // h, w, ww // w, 3).mean(dim=(2, 4, 6)) / 255
        return x @ self.proj


def test_generate_from_video_with_online_encoders(tiny) -> None:
    from merv.train.online import OnlineEncoders, match_grid

    model, _ = tiny
    specs = model.connector.specs  # enc_a (4, 6, 6, 32), enc_b (4, 4, 4, 24)
    encoders = {"enc_a": _FakeEncoder(8, (4, 6, 6), 32), "enc_b": _FakeEncoder(4, (4, 8, 8), 24)}
    video = np.random.default_rng(0).integers(0, 255, (16, 48, 48, 3), dtype=np.uint8)
    calls = []

    def loader(path: str, n: int) -> np.ndarray:
        calls.append((path, n))
        return video[:: 16 // n]

    def subsampler(frames: np.ndarray, n: int) -> np.ndarray:  # an image (one frame) is repeated
        return frames[:: len(frames) // n] if len(frames) >= n else np.repeat(frames, n, axis=0)

    online = OnlineEncoders(specs, encoders=encoders, loader=loader, subsampler=subsampler, decode_frames=16)
    feats = online.encode_path("clip.mp4")
    assert calls == [("clip.mp4", 16)]  # decoded once; each encoder subsamples its 8 / 4 frames
    assert {k: tuple(v.shape) for k, v in feats.items()} == {"enc_a": (1, 4, 6, 6, 32), "enc_b": (1, 4, 4, 4, 24)}
    native_b = encoders["enc_b"].encode(torch.as_tensor(video[::16 // 8][::2])[None])
    # pooled to the model's grid and rounded to float16, as the cache would hold them
    assert torch.equal(feats["enc_b"], match_grid(native_b, specs[1]).to(torch.float16).float())
    out = model.generate_from_video("clip.mp4", encoders=online, question="What happens?", max_new_tokens=6)
    assert out.token_ids == model.generate(feats, model.build_prompt("What happens?"), max_new_tokens=6).token_ids
    assert online.encode_image(video[0])["enc_a"].shape == (1, 4, 6, 6, 32)
    with pytest.raises(ValueError, match="online encoder configuration"):
        match_grid(torch.zeros(1, 2, 6, 6, 32), specs[0])


# --- LLM loading and sizing ------------------------------------------------------------------


def test_missing_llm_gives_a_clear_error() -> None:
    from merv.train.llm import LLMNotFoundError, choose_attn_implementation, load_llm

    with pytest.raises(LLMNotFoundError, match=r"hf download merv-tests/no-such-model"):
        load_llm("merv-tests/no-such-model")
    assert choose_attn_implementation("cpu") == "sdpa"


def test_load_llm_from_local_dir_adds_reference_pad_token(tmp_path) -> None:
    from merv.train.llm import load_llm

    tok = H.build_tiny_tokenizer("llama")
    llm = H.build_tiny_llm(tok, seed=3)
    llm.save_pretrained(tmp_path)
    tok.pad_token = None  # like LLaMA-2: no pad token
    tok.save_pretrained(tmp_path)
    loaded, ltok = load_llm(str(tmp_path), dtype=torch.float32)
    assert ltok.pad_token == "<PAD>" and ltok.pad_token_id == len(ltok) - 1
    rows = loaded.get_input_embeddings().weight.shape[0]
    assert rows % 64 == 0 and rows >= len(ltok) and loaded.config.pad_token_id == ltok.pad_token_id
    ids = torch.tensor([[1, 5, 9, 40]])
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=ids).logits[..., : len(tok)], llm(input_ids=ids).logits, atol=1e-5)


def test_paper_size_report() -> None:
    from merv.train.accounting import llm_forward_flops, model_report, paper_feature_specs
    from merv.train.llm import llama2_7b_config

    report = model_report(paper_feature_specs(), seq_len=2048)
    assert report.visual_tokens == 1024
    assert report.params["llm"] == 6_738_415_616 + 2 * 64 * 4096  # LLaMA-2 7B + the reference's padded vocab
    assert report.params["fusion"] == 44_055_552
    assert report.params["projector/languagebind"] == 1024 * 4096 + 4096
    assert report.params["projector/vivit"] == 768 * 4096 + 4096
    assert report.params["encoder/dinov2"] > 300e6 and report.params["encoder/siglip"] > 85e6
    assert 7.6e9 < report.total_params < 7.75e9  # paper: 7686.0M
    assert report.flops["llm"] == 3 * llm_forward_flops(llama2_7b_config(), 2048)
    assert report.total_flops == sum(report.flops.values())
    with pytest.raises(ValueError, match="cannot hold"):
        model_report(paper_feature_specs(), seq_len=1000)


def test_analytic_llm_flops_match_a_flop_counter(tiny) -> None:
    from torch.utils.flop_counter import FlopCounterMode

    from merv.train.accounting import llm_forward_flops

    model, _ = tiny
    ids = torch.randint(0, 300, (1, 50))
    # eager attention: the counter has no formula for every fused SDPA kernel (torch 2.14 on CPU
    # counts none of its FLOPs), while the two attention matmuls of the eager path are counted
    implementation = model.llm.config._attn_implementation
    model.llm.set_attn_implementation("eager")
    try:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model.llm(input_ids=ids)
    finally:
        model.llm.set_attn_implementation(implementation)
    assert counter.get_total_flops() == llm_forward_flops(model.llm.config, 50)


@pytest.mark.parametrize("name", ["languagebind", "dinov2", "vivit", "siglip"])
def test_analytic_encoder_flops_match_a_flop_counter_on_the_real_architectures(name) -> None:
    """The encoders' FLOP share the README quotes comes from `model_report`; the paper-size
    architectures the extraction runs (random weights, on the meta device: no compute) must count
    the same FLOPs through the full `encode` path (resize, ViT, token pooling)."""
    from torch.utils.flop_counter import FlopCounterMode

    from merv.extract.encoders import build_encoder
    from merv.train.accounting import model_report, paper_feature_specs

    analytic = model_report(paper_feature_specs(), seq_len=2048).flops[f"encoder/{name}"]
    enc = build_encoder(name, size="paper", weights="random", meta=True)
    clip = torch.zeros((1, enc.info.frames, 240, 320, 3), dtype=torch.uint8, device="meta")
    with FlopCounterMode(display=False) as counter:
        enc.encode(clip)
    assert counter.get_total_flops() == pytest.approx(analytic, rel=1e-4)


def test_recipes() -> None:
    from merv.train.accounting import PAPER_ENCODERS
    from merv.train.configurable import ConfigError
    from merv.train.recipes import RecipeError, get_recipe

    frozen, full = get_recipe("merv-frozen"), get_recipe("merv-full", stage="full-align")
    assert frozen.model.encoders == ("languagebind", "dinov2", "vivit", "siglip")
    assert [PAPER_ENCODERS[e].frames for e in frozen.model.encoders] == [16, 16, 32, 16]
    connector = frozen.model.connector
    assert (connector.projector, connector.tokens_per_frame, connector.fusion) == ("avg2d", 64, "cross_attention")
    assert (frozen.stage, frozen.optim.lr, frozen.loader.global_batch_size, frozen.optim.weight_decay,
            frozen.schedule.warmup_ratio, frozen.optim.max_grad_norm) == ("finetune", 2e-5, 128, 0.1, 0.03, 1.0)
    assert (full.stage, full.optim.lr) == ("full-align", 1e-4) and get_recipe("merv-full").optim.lr == 2e-5
    align = get_recipe("merv-videollava-recipe", stage="align")
    assert (align.stage, align.optim.lr) == ("align", 1e-3)
    assert get_recipe("vivit-single").model.feature_specs()[0].grid == (16, 14, 14)
    ablation = frozen.override({"model.connector.projector": "avg3d", "model.connector.frame_factor": 2})
    assert ablation.model.report().visual_tokens == 512
    with pytest.raises(ConfigError, match="pass the feature specs from the store"):
        get_recipe("tiny").model.feature_specs()
    tiny_specs = [H.FeatureSpec(n, (16, 4, 4), 32) for n in frozen.model.encoders]
    model = get_recipe("tiny").model.build(tiny_specs)
    assert model.num_visual_tokens == 64 and model.prompt_format == "pure"
    with pytest.raises(RecipeError, match="unknown"):
        get_recipe("nope")
