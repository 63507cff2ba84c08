"""Modern instruct LLMs (Qwen2.5, LLaMA-3 / 3.1): published shapes kept in code, recipes, the tiny
stand-ins' tokenizers, prompts, visual-token placement and pad policy, training + exact resume +
export on tiny configs, and wandb as an optional logger."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from testkit import llm as H
from testkit import tasks
from testkit.threads import one_thread  # noqa: F401  (module fixture: torch on one thread)

from merv.train.build import build_merv
from merv.train.connector import ConnectorConfig
from merv.train.llm_configs import published_config, trained_config
from merv.train.metrics import read_metrics
from merv.train.prompts import IGNORE_INDEX, encode_prompt, get_prompt_builder, tokenize_caption, tokenize_conversation
from merv.train.recipes import LLM_RECIPES, get_recipe, recipe_report
from merv.train.tiny import tiny_feature_specs
from merv.train.trainer import train

CONV = [{"from": "human", "value": "<video>\nWhat color is it?"}, {"from": "gpt", "value": "red"}]


def _llm_params(config) -> int:
    """Parameters of the transformers model a config describes, built on the meta device (no memory)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())


# ------------------------------------------------------------------ published shapes, recipes
@pytest.mark.parametrize("name,billions", [("qwen2.5-7b-instruct", 7.62), ("qwen2.5-1.5b-instruct", 1.54),
                                           ("qwen2.5-0.5b-instruct", 0.49), ("llama3-8b-instruct", 8.03),
                                           ("llama3.1-8b-instruct", 8.03)])
def test_configs_in_code_have_the_published_parameter_counts(name: str, billions: float) -> None:
    assert round(_llm_params(published_config(name)) / 1e9, 2) == billions


def test_configs_in_code_carry_what_differs_between_the_families() -> None:
    q7, q15, q05 = (published_config(f"qwen2.5-{s}-instruct") for s in ("7b", "1.5b", "0.5b"))
    l3, l31 = published_config("llama3-8b-instruct"), published_config("llama3.1-8b-instruct")
    assert (q7.tie_word_embeddings, q15.tie_word_embeddings, q05.tie_word_embeddings) == (False, True, True)
    assert (q7.vocab_size, q15.vocab_size, l3.vocab_size) == (152064, 151936, 128256)
    assert (q7.num_key_value_heads, q15.num_key_value_heads, l3.num_key_value_heads) == (4, 2, 8)
    rope = getattr(l31, "rope_parameters", None) or l31.rope_scaling
    assert rope["rope_type"] == "llama3" and rope["factor"] == 8.0 and rope["original_max_position_embeddings"] == 8192
    assert l31.max_position_embeddings == 131072 and l3.max_position_embeddings == 8192
    assert (getattr(l3, "rope_parameters", None) or {}).get("rope_type", "default") == "default"
    # MERV trains LLaMA-3 with the reference's <PAD> row, padded to a multiple of 64; Qwen has a pad token
    assert trained_config("llama3-8b-instruct").vocab_size == 128320
    assert trained_config("llama3.1-8b-instruct").vocab_size == 128256  # pads with <|finetune_right_pad_id|>
    assert trained_config("qwen2.5-7b-instruct").vocab_size == 152064


def test_model_info_sizes_the_llm_recipes_without_downloads() -> None:
    qwen = recipe_report("qwen2.5-7b-instruct")
    assert qwen.params["llm"] == _llm_params(published_config("qwen2.5-7b-instruct"))
    llama = recipe_report("llama3-8b-instruct")
    assert llama.params["llm"] == _llm_params(published_config("llama3-8b-instruct")) + 2 * 64 * 4096  # embed + head rows
    # the connector projects to the LLM's width
    assert qwen.params["projector/dinov2"] == 1024 * 3584 + 3584
    assert llama.flops["llm"] > qwen.flops["llm"] > recipe_report("qwen2.5-0.5b-instruct").flops["llm"]


@pytest.mark.parametrize("name", LLM_RECIPES)
def test_llm_recipes_are_the_frozen_recipe_with_the_llm_swapped(name: str) -> None:
    base, got = get_recipe("merv-frozen").to_dict(), get_recipe(name).to_dict()
    assert got["model"]["llm"]["name"] == name and got["recipe"] == name
    got["model"]["llm"]["name"], got["recipe"] = base["model"]["llm"]["name"], base["recipe"]
    assert got == base


# ------------------------------------------------------------------ tiny stand-ins: tokens and placement
@pytest.fixture(scope="module")
def models() -> dict:
    cfg = ConnectorConfig(tokens_per_frame=4, fusion_embed_dim=48)
    return {name: build_merv(tiny_feature_specs(), cfg, name, model_max_length=512)
            for name in ("tiny-qwen2.5", "tiny-llama3")}


def _tokens(model, conv=CONV):
    return tokenize_conversation(get_prompt_builder(model.prompt_format, model.tokenizer), model.tokenizer, conv)


def test_qwen_tokens_follow_qwen25s_chat_template_without_bos(models) -> None:
    model = models["tiny-qwen2.5"]
    tok = model.tokenizer
    assert model.prompt_format == "chat-template" and tok.bos_token is None and model.bos_token_id is None
    assert (tok.pad_token, tok.eos_token) == ("<|endoftext|>", "<|im_end|>")
    ids, labels = _tokens(model)
    assert tok.decode(ids) == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nWhat color is it?<|im_end|>\n<|im_start|>assistant\nred<|im_end|>\n")
    assert tok.decode(labels[labels != IGNORE_INDEX]) == "red<|im_end|>\n"
    # tied embedding and LM head, as Qwen2.5 0.5B / 1.5B
    assert model.llm.lm_head.weight is model.llm.get_input_embeddings().weight


def test_llama3_tokens_start_with_one_bos_and_get_the_reference_pad(models) -> None:
    model = models["tiny-llama3"]
    tok = model.tokenizer
    ids, labels = _tokens(model)
    assert ids[0] == tok.bos_token_id == model.bos_token_id and tok.bos_token == "<|begin_of_text|>"
    assert int((ids == tok.bos_token_id).sum()) == 1  # the template writes BOS, the tokenizer adds none twice
    assert tok.decode(ids) == ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nWhat color is it?<|eot_id|>"
                               "<|start_header_id|>assistant<|end_header_id|>\n\nred<|eot_id|>")
    assert tok.decode(labels[labels != IGNORE_INDEX]) == "red<|eot_id|>"
    # no pad token of its own: <PAD> added, rows padded to a multiple of 64 (the reference's policy)
    rows = model.llm.get_input_embeddings().weight.shape[0]
    assert tok.pad_token == "<PAD>" and tok.pad_token_id == len(tok) - 1 and rows % 64 == 0 and rows >= len(tok)
    assert model.llm.config.pad_token_id == tok.pad_token_id


def test_a_reserved_pad_token_is_used_before_adding_one() -> None:
    """LLaMA-3.1 reserves <|finetune_right_pad_id|>: no new row; LLaMA-3 has none: <PAD>, 64-padded."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from merv.train.llm import ensure_pad_token
    from merv.train.tiny import build_tiny_tokenizer

    reserved = "<|finetune_right_pad_id|>"
    for has_reserved in (True, False):
        tok = build_tiny_tokenizer("llama3")
        if has_reserved:
            tok.add_tokens([reserved], special_tokens=True)
        rows = len(tok)
        llm = AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=rows, hidden_size=16, intermediate_size=32,
                                                           num_hidden_layers=1, num_attention_heads=2))
        added = ensure_pad_token(llm, tok, reserved=reserved)
        assert added is not has_reserved and llm.config.pad_token_id == tok.pad_token_id
        if has_reserved:
            assert tok.pad_token == reserved and llm.get_input_embeddings().weight.shape[0] == rows
        else:
            assert tok.pad_token == "<PAD>" and llm.get_input_embeddings().weight.shape[0] == -(-(rows + 1) // 64) * 64


@pytest.mark.parametrize("flavor", ["qwen2.5", "llama3"])
def test_a_local_hf_directory_of_the_family_loads_like_the_real_model(tmp_path, flavor: str) -> None:
    """The offline loading path (`--llm DIR`): template, BOS, visual placement and pad policy come
    from the directory's own tokenizer files, as they would from the real model's."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from merv.train.tiny import build_tiny_tokenizer

    tok = build_tiny_tokenizer(flavor)
    kind = "qwen2" if flavor == "qwen2.5" else "llama"
    config = AutoConfig.for_model(kind, vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                  num_attention_heads=2, num_key_value_heads=1, bos_token_id=tok.bos_token_id,
                                  eos_token_id=tok.eos_token_id, tie_word_embeddings=flavor == "qwen2.5")
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    model = build_merv(tiny_feature_specs(), ConnectorConfig(tokens_per_frame=4, fusion_embed_dim=48), str(tmp_path),
                       model_max_length=512, dtype=torch.float32)
    loaded = model.tokenizer
    assert model.prompt_format == "chat-template" and loaded.chat_template == tok.chat_template
    ids, _ = _tokens(model)
    if flavor == "qwen2.5":
        assert model.bos_token_id is None and loaded.pad_token == "<|endoftext|>"
        assert model.visual_offsets(ids[None]).tolist() == [_user_content_start(loaded, ids)]
        assert model.llm.get_input_embeddings().weight.shape[0] == len(tok)  # has a pad: no new rows
    else:
        assert model.bos_token_id == loaded.bos_token_id == ids[0] and model.visual_offsets(ids[None]).tolist() == [1]
        assert loaded.pad_token == "<PAD>" and model.llm.get_input_embeddings().weight.shape[0] % 64 == 0


def _user_content_start(tok, ids: torch.Tensor) -> int:
    """Tokens before the question's text, counted by decoding prefixes (independent of the model)."""
    return next(i for i in range(len(ids)) if tok.decode(ids[i:]).startswith("What color"))


@pytest.mark.parametrize("name", ["tiny-qwen2.5", "tiny-llama3"])
def test_visual_tokens_sit_after_bos_or_at_the_start_of_the_user_turn(models, name: str) -> None:
    model = models[name]
    tok = model.tokenizer
    ids, labels = _tokens(model)
    offset = 1 if name == "tiny-llama3" else _user_content_start(tok, ids)
    assert offset > 1 or name == "tiny-llama3"
    feats = H.random_features(model.connector.specs, 1, dtype=torch.float32)
    n_vis = model.num_visual_tokens
    with torch.no_grad():
        out = model(feats, ids[None], labels=labels[None])
        visual = model.connector(feats).embeds
        embeds = model.llm.get_input_embeddings()(ids[None])
        by_hand = model.llm(inputs_embeds=torch.cat([embeds[:, :offset], visual, embeds[:, offset:]], 1)).logits
    assert torch.allclose(out.logits, by_hand, atol=1e-5)
    assert (out.labels[0, offset:offset + n_vis] == IGNORE_INDEX).all()
    assert torch.equal(out.labels[0, offset + n_vis:], labels[offset:])
    # a generation prompt places them where training did
    prompt = torch.tensor([encode_prompt(model.prompt_format, tok, "What color is it?")])
    assert model.visual_offsets(prompt).tolist() == [offset]
    # a Stage-1 caption has no user turn: after BOS, or first
    caption, _ = tokenize_caption(tok, "a dog runs in a park")
    assert model.visual_offsets(caption[None]).tolist() == [1 if name == "tiny-llama3" else 0]


@pytest.mark.parametrize("name", ["tiny-qwen2.5", "tiny-llama3"])
def test_batched_generation_left_pads_and_matches_one_by_one(models, name: str) -> None:
    model = models[name]
    tok = model.tokenizer
    questions = ["What color is it?", "Describe the video in a few words, please."]
    prompts = [model.build_prompt(q) for q in questions]
    feats = H.random_features(model.connector.specs, 2, seed=3, dtype=torch.float32)
    batched = model.generate(feats, prompts, max_new_tokens=6)
    single = [model.generate({k: v[i:i + 1] for k, v in feats.items()}, prompts[i], max_new_tokens=6).token_ids[0]
              for i in range(2)]
    assert batched.token_ids == single
    assert tok.padding_side == "right"  # training pads right; generation left-pads its own prompts


# ------------------------------------------------------------------ train, resume exactly, export
@pytest.fixture(scope="module")
def task(tmp_path_factory) -> tuple[str, str]:
    return tasks.make_task(tmp_path_factory.mktemp("task"), n=16)


RUN = {"schedule.max_steps": 4, "loader.global_batch_size": 4, "loader.micro_batch_size": 2, "checkpoint.every": 2}


@pytest.mark.parametrize(("recipe", "lora"), [("tiny-qwen2.5", 0), ("tiny-llama3", 0), ("tiny-qwen2.5", 8)],
                         ids=["qwen2.5", "llama3", "qwen2.5-lora"])
def test_tiny_recipe_trains_resumes_exactly_and_exports(task, tmp_path, recipe: str, lora: int) -> None:
    """Also with LoRA adapters on the LLM (`--set model.llm.lora.r=8`): the merged export loads
    with from_pretrained like a full fine-tune's."""
    from merv.hf import MervForConditionalGeneration

    full = tmp_path / "full"
    run = {**RUN, "model.llm.lora.r": lora}
    summary = train(tasks.run_config(task, full, run, recipe=recipe))
    assert summary["steps"] == 4
    cut = tmp_path / "cut"  # the run as a kill after step 2 leaves it
    shutil.copytree(full, cut)
    shutil.rmtree(cut / "checkpoints" / "step-00000004")
    shutil.rmtree(cut / "export")
    (cut / "checkpoints" / "latest").write_text("step-00000002")
    train(tasks.run_config(task, cut, {**run, "checkpoint.resume": True, "checkpoint.export": False}, recipe=recipe))
    want, got = ({r["step"]: r for r in read_metrics(run / "metrics.jsonl")} for run in (full, cut))
    assert sorted(got) == sorted(want) == [1, 2, 3, 4]
    for step in (3, 4):
        assert (got[step]["loss"], got[step]["lr"], got[step]["ids_rank0"]) == \
            (want[step]["loss"], want[step]["lr"], want[step]["ids_rank0"]), step
    # the export loads with from_pretrained, places the visual tokens as trained and generates
    hf = MervForConditionalGeneration.from_pretrained(summary["export"])
    model = hf.as_merv_model()
    config = json.loads((Path(summary["export"]) / "config.json").read_text())
    if recipe == "tiny-qwen2.5":
        assert config["visual_anchor"] and not config["visual_after_bos"] and config["text_config"]["tie_word_embeddings"]
        assert hf.llm.lm_head.weight is hf.llm.get_input_embeddings().weight
    else:
        assert config["visual_after_bos"] and config["visual_anchor"] is None
    assert model.tokenizer.chat_template and model.prompt_format == "chat-template"
    prompt = model.build_prompt("What color is it?")
    ids = torch.tensor([model.tokenizer(prompt, add_special_tokens=False)["input_ids"]])
    if model.bos_token_id is not None and ids[0, 0] != model.bos_token_id:
        ids = torch.cat([torch.tensor([[model.bos_token_id]]), ids], 1)
    feats = H.random_features(model.connector.specs, 1, dtype=torch.float32)
    expected = model.generate(feats, ids.tolist(), max_new_tokens=3).token_ids[0]  # stops before EOS
    got = hf.generate(input_ids=ids, features=feats, max_new_tokens=3, do_sample=False)[0].tolist()
    assert got[:len(expected)] == expected and (len(expected) == 3 or got[len(expected)] in model._eos_ids(None))


# ------------------------------------------------------------------ wandb
def test_wandb_missing_is_one_clear_error_before_the_run_starts(task, tmp_path, monkeypatch) -> None:
    from merv.train.tracking import WandbMissingError

    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb now raises ImportError
    with pytest.raises(WandbMissingError, match=r"pip install 'merv\[wandb\]'.*logging.wandb.mode=disabled"):
        train(tasks.run_config(task, tmp_path / "run", {**RUN, "logging.wandb.mode": "offline"}))
    assert not (tmp_path / "run").exists()  # refused before anything was written


def _wandb_records(run_dir: Path) -> tuple[list[dict], dict]:
    """(history rows, run config) read back from an offline run's .wandb file with wandb's own reader."""
    from wandb.proto import wandb_internal_pb2 as pb
    from wandb.sdk.internal.datastore import DataStore

    (path,) = run_dir.glob("run-*.wandb")
    store = DataStore()
    store.open_for_scan(str(path))
    rows, config = [], {}
    try:
        while (data := store.scan_data()) is not None:
            record = pb.Record()
            record.ParseFromString(data)
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
            elif record.WhichOneof("record_type") == "run":
                config = {item.key: json.loads(item.value_json) for item in record.run.config.update}
    finally:
        store.close()
    return rows, config


@pytest.mark.integration  # wandb starts its service process; the CLI runs in a subprocess
def test_cli_trains_the_qwen_recipe_with_wandb_offline_and_a_resume_continues_its_run(task, tmp_path, monkeypatch,
                                                                                     recwarn) -> None:
    data, store = task
    out, wandb_dir = tmp_path / "run", tmp_path / "wandb"
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}, "WANDB_MODE": "offline",
           "WANDB_DIR": str(wandb_dir), "PYTHONUNBUFFERED": "1", "PYTHONWARNINGS": "default"}
    done = subprocess.run([sys.executable, "-m", "merv.cli", "train", "--recipe", "tiny-qwen2.5", "--data", data,
                           "--store", store, "--out", str(out), "--max-steps", "3", "--global-batch-size", "4",
                           "--micro-batch-size", "2", "--checkpoint-every", "2", "--no-export", "--quiet", "--wandb", "offline",
                           "--set", "logging.wandb.tags=[test]"],
                          capture_output=True, text=True, env=env, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "warn" not in done.stderr.lower(), done.stderr[-3000:]
    (run_dir,) = (wandb_dir / "wandb").glob("offline-run-*")
    assert run_dir.name.endswith((out / "wandb_run_id").read_text())
    rows, config = _wandb_records(run_dir)
    jsonl = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [m["step"] for m in jsonl] == [1, 2, 3]
    for row, metrics in zip(rows, jsonl):  # the numbers TensorBoard gets, under the same names
        assert {k: row[f"train/{k}"] for k in ("loss", "lr", "grad_norm")} == \
            {k: metrics[k] for k in ("loss", "lr", "grad_norm")}
    assert config["recipe"] == "tiny-qwen2.5" and config["model"]["llm"]["name"] == "tiny-qwen2.5"
    assert config["derived"]["total_steps"] == 3 and config["logging"]["wandb"]["tags"] == ["test"]
    # resumed after step 2 (in this process): the same wandb run id, step 3 logged again, no warning
    shutil.rmtree(out / "checkpoints" / "step-00000003")
    (out / "checkpoints" / "latest").write_text("step-00000002")
    monkeypatch.setenv("WANDB_DIR", str(wandb_dir))
    train(tasks.run_config(task, out, {"schedule.max_steps": 3, "loader.global_batch_size": 4, "loader.micro_batch_size": 2,
                                       "checkpoint.every": 2, "checkpoint.resume": True, "checkpoint.export": False,
                                       "logging.wandb.mode": "offline", "logging.wandb.tags": ["test"]},
                           recipe="tiny-qwen2.5"))
    import wandb

    wandb.teardown()  # the service writes the run file after `finish` returns: wait for it (a CLI run's exit does)
    assert not [str(w.message) for w in recwarn]
    again = [d for d in (wandb_dir / "wandb").glob("offline-run-*") if d != run_dir]
    assert len(again) == 1 and again[0].name.endswith(run_dir.name.rsplit("-", 1)[1])
    resumed, _ = _wandb_records(again[0])
    assert [r["step"] for r in resumed] == [3] and resumed[0]["train/loss"] == jsonl[2]["loss"]
