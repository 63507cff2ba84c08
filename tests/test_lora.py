"""LoRA on the LLM (merv.train.lora): what trains, counts, exports, and the trainer with LoRA.

The trainer tests share one 3-step tiny run (`lora_run`, adapter export, checkpoints at steps 2 and 3):
its frozen base must come out bit-identical, its checkpoints must hold only what trains, and a run
resumed from step 2 must redo step 3 exactly. The two-process FSDP2 run is an integration test.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file
from testkit import tasks
from testkit.llm import random_features
from testkit.threads import one_thread  # noqa: F401  (module fixture: torch on one thread)
from typer.testing import CliRunner

from merv.cli import app
from merv.hf.modeling import MervForConditionalGeneration
from merv.train.accounting import ADAMW_STATE_BYTES, training_memory
from merv.train.llm import decoder_layers, load_llm
from merv.train.lora import ADAPTER_DIR, BASE_DIR, LoraConfig, LoraError, apply_lora, check_qlora, export_lora
from merv.train.metrics import read_metrics
from merv.train.model import MervModel
from merv.train.resume import ResumeError
from merv.train.tiny import build_tiny_merv
from merv.train.trainer import train

LORA = {"model.llm.lora.r": 4, "model.llm.lora.alpha": 8, "model.llm.lora.dropout": 0.0}
RUN = {**LORA, "schedule.max_steps": 3, "loader.global_batch_size": 2, "loader.micro_batch_size": 2,
       "checkpoint.every": 2, "model.llm.lora.export": "adapter"}
SHARD = "dcp/shard-00001-model-00001-of-00001.safetensors"


def _closed_form(llm: nn.Module, r: int, names: tuple[str, ...] | None = None) -> int:
    """r * (d_in + d_out) over the decoder's linear layers (all of them, or those `names` end with)."""
    total = 0
    for layer in decoder_layers(llm):
        for name, m in layer.named_modules():
            if isinstance(m, nn.Linear) and (names is None or name.rsplit(".", 1)[-1] in names):
                total += r * (m.in_features + m.out_features)
    return total


@pytest.mark.parametrize("flavor", ["llama", "qwen2"])
@pytest.mark.parametrize("targets", [("all-linear",), ("q_proj", "v_proj")])
def test_trainable_counts_are_the_closed_form_and_peft_s(flavor, targets):
    model, _ = build_tiny_merv(flavor=flavor)
    want = _closed_form(model.llm, 4, None if targets == ("all-linear",) else targets)
    config = LoraConfig(r=4, target_modules=targets)
    rows = training_memory(model.connector.specs, model.connector.config, model.llm.config, config)
    model.llm = apply_lora(model.llm, config)
    assert model.llm.get_nb_trainable_parameters()[0] == want  # PEFT's own count
    model.set_stage("finetune")
    connector = sum(p.numel() for p in model.connector.parameters() if p.requires_grad)
    full, lora = rows
    assert lora.adapters == want
    assert lora.trainable == connector + want == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert lora.params == full.params + want
    assert full.trainable == connector + sum(p.numel() for p in model.llm.parameters()) - want
    assert lora.optimizer_bytes == ADAMW_STATE_BYTES * lora.trainable < full.optimizer_bytes


def test_stages_train_connector_and_adapters_never_the_base():
    model, _ = build_tiny_merv()
    model.llm = apply_lora(model.llm, LoraConfig(r=4))
    model.set_stage("align")
    assert {n.split(".")[0] for n, _ in model.trainable_parameters()} == {"connector"}
    for stage in ("finetune", "full-align"):
        model.set_stage(stage)
        llm_trained = [n for n, _ in model.trainable_parameters() if n.startswith("llm.")]
        assert llm_trained and all(".lora_A." in n or ".lora_B." in n for n in llm_trained)
        assert not model.llm.get_input_embeddings().weight.requires_grad


def _trained_lora_model(flavor: str, source: str | None):
    """A tiny LoRA MervModel (its LLM from `source` when given) whose adapters are no longer zero."""
    model, tokenizer = build_tiny_merv(flavor=flavor)
    if source is not None:  # as the trainer loads it: a pad-less tokenizer gets <PAD> and new rows
        llm, tokenizer = load_llm(source, dtype=torch.float32)
        model = MervModel(model.connector, llm, tokenizer=tokenizer, prompt_format=model.prompt_format,
                          llm_source=source)
    model.llm = apply_lora(model.llm, LoraConfig(r=4, alpha=8))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model.eval(), tokenizer


@pytest.mark.parametrize("mode,flavor,base", [("merged", "llama", "in-process"), ("adapter", "llama", "in-process"),
                                              ("adapter", "qwen2", "directory"),
                                              ("adapter", "llama", "directory without pad")])
def test_exports_load_with_from_pretrained_and_generate_the_same_tokens(tmp_path, mode, flavor, base):
    source = None
    if base.startswith("directory"):  # a base LLM on disk: the adapter export points to it, no copy
        model, tokenizer = build_tiny_merv(flavor=flavor)
        model.llm.save_pretrained(tmp_path / "base")
        tokenizer.save_pretrained(tmp_path / "base")
        source = str(tmp_path / "base")
        if base.endswith("without pad"):  # like LLaMA-2: merv adds <PAD>, resizing to a multiple of 64 rows
            cfg = json.loads((tmp_path / "base" / "tokenizer_config.json").read_text())
            cfg.pop("pad_token")
            (tmp_path / "base" / "tokenizer_config.json").write_text(json.dumps(cfg))
    model, tokenizer = _trained_lora_model(flavor, source)
    rows = model.llm.get_input_embeddings().weight.shape[0]
    assert (rows % 64 == 0) == base.endswith("without pad")
    feats = random_features(model.connector.specs, 2, dtype=torch.float32)
    prompts = [model.build_prompt("What is happening in this video?"), model.build_prompt("Describe the video.")]
    want = model.generate(feats, prompts, max_new_tokens=8, eos_token_id=[]).token_ids
    out = tmp_path / "export"
    export_lora(model, model.state_dict(), out, LoraConfig(r=4, alpha=8, export=mode))
    with safe_open(str(out / "model.safetensors"), framework="pt") as fh:
        keys = list(fh.keys())
    assert not any("lora_" in k or "base_layer" in k for k in keys)
    if mode == "merged":
        assert any(k.startswith("llm.") for k in keys) and not (out / ADAPTER_DIR).exists()
    else:
        assert all(k.startswith("connector.") for k in keys)
        assert (out / ADAPTER_DIR / "adapter_model.safetensors").is_file()
        assert (out / BASE_DIR).is_dir() == (base == "in-process")
    loaded = MervForConditionalGeneration.from_pretrained(out, dtype=torch.float32)
    assert not any("lora_" in n for n, _ in loaded.named_parameters())  # a plain transformers LLM inside
    got = loaded.as_merv_model().generate(feats, prompts, max_new_tokens=8, eos_token_id=[]).token_ids
    assert got == want
    # every row of the vocabulary came back, the added <PAD> rows too (not freshly initialised ones)
    trained = model.llm.get_base_model()
    for a, b in ((trained.get_input_embeddings(), loaded.llm.get_input_embeddings()),
                 (trained.get_output_embeddings(), loaded.llm.get_output_embeddings())):
        assert a.weight.shape == b.weight.shape and torch.allclose(a.weight, b.weight, atol=1e-6)


def test_qlora_is_refused_clearly_off_cuda():
    with pytest.raises(LoraError, match="CUDA GPUs only.*qlora: false"):
        check_qlora(LoraConfig(r=8, qlora=True), "cpu")
    with pytest.raises(ValueError, match="qlora needs LoRA adapters"):
        LoraConfig(qlora=True)


@pytest.mark.parametrize("spec,words", [("r=0", ["--lora", "r=16"]), ("rank=4", ["rank", "valid keys"]),
                                        ("r=4,dropout=2", ["dropout", "[0, 1)"])])
def test_model_info_lora_spec_errors_are_one_line(spec, words):
    out = CliRunner().invoke(app, ["model", "info", "merv-frozen", "--lora", spec])
    assert out.exit_code == 2
    text = " ".join(out.output.split())
    assert "Traceback" not in text and all(w in text for w in words), text


# --------------------------------------------------------------------------- the trainer with LoRA


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> tuple[str, str]:
    return tasks.make_task(tmp_path_factory.mktemp("task"), n=8)


@pytest.fixture(scope="module")
def lora_run(task, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("lora") / "run"
    return out, train(tasks.run_config(task, out, RUN))


def test_lora_run_trains_adapters_and_connector_only(lora_run):
    out, summary = lora_run
    assert summary["steps"] == 3
    config = tasks.run_config(("unused", "unused"), out, RUN).override({"model.llm.lora.r": 0})
    fresh = config.model.build(MervForConditionalGeneration.from_pretrained(out / "export").connector.specs, seed=0)
    base = load_file(str(out / "export" / BASE_DIR / "model.safetensors"))
    own = fresh.llm.state_dict()
    assert set(base) == set(own)
    assert all(torch.equal(base[k], own[k]) for k in own)  # the frozen base came out bit-identical
    adapter = load_file(str(out / "export" / ADAPTER_DIR / "adapter_model.safetensors"))
    assert adapter and all(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)  # B starts at zero
    connector = load_file(str(out / "export" / "model.safetensors"))
    assert any(not torch.equal(connector[f"connector.{k}"], v) for k, v in fresh.connector.state_dict().items())
    # checkpoints hold what trains (adapters, connector) and its optimizer state, not the frozen base
    tensors = json.loads((out / "checkpoints" / "step-00000003" / "trainer_state.json").read_text())["tensors"]
    weights = [k for k in tensors if k.startswith("model/llm.")]
    assert weights and all(".lora_" in k for k in weights)


def test_lora_run_resumes_exactly(lora_run, task, tmp_path):
    out, _ = lora_run
    again = tmp_path / "again"
    shutil.copytree(out, again)
    shutil.rmtree(again / "checkpoints" / "step-00000003")
    (again / "checkpoints" / "latest").write_text("step-00000002")
    train(tasks.run_config(task, again, {**RUN, "checkpoint.resume": True, "checkpoint.export": False}))
    want = {m["step"]: m for m in read_metrics(out / "metrics.jsonl")}
    got = {m["step"]: m for m in read_metrics(again / "metrics.jsonl")}
    assert sorted(got) == [1, 2, 3]
    assert got[3]["loss"] == want[3]["loss"] and got[3]["ids_rank0"] == want[3]["ids_rank0"]
    a = load_file(str(out / "checkpoints" / "step-00000003" / SHARD))
    b = load_file(str(again / "checkpoints" / "step-00000003" / SHARD))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)  # adapters, connector, AdamW state


def test_changing_the_rank_refuses_to_resume(lora_run, task, tmp_path):
    out, _ = lora_run
    again = tmp_path / "again"
    shutil.copytree(out, again)
    with pytest.raises(ResumeError, match=r"model\.llm\.lora\.r 4 -> 8"):
        train(tasks.run_config(task, again, {**RUN, "model.llm.lora.r": 8, "checkpoint.resume": True}))


@pytest.mark.integration  # two processes (torchrun, gloo)
def test_two_gloo_processes_match_one_with_lora(lora_run, task, tmp_path):
    out, _ = lora_run
    data, store = task
    sets = [f"--set={k}={v}" for k, v in LORA.items()]
    # typer's runner: the command's own launcher without the seconds of imports of another
    # `python -m merv.cli`; it starts torchrun and the two gloo processes
    result = CliRunner().invoke(app, [
        "train", "--data", data, "--store", store, "--max-steps", "3", "--global-batch-size", "2",
        "--micro-batch-size", "1", "--nproc", "2", "--out", str(tmp_path / "two"),
        "--set=model.llm.lora.export=merged", *sets, "--quiet"])
    assert result.exit_code == 0, (result.output, result.exception)
    one = [m["loss"] for m in read_metrics(out / "metrics.jsonl")]
    two = [m["loss"] for m in read_metrics(tmp_path / "two" / "metrics.jsonl")]
    assert len(one) == len(two) == 3 and max(abs(x - y) for x, y in zip(one, two)) < 1e-5
    assert MervForConditionalGeneration.from_pretrained(tmp_path / "two" / "export").config.llm_saved  # merged


def test_paper_recipe_memory_is_the_closed_form():
    from merv.train.recipes import recipe_memory

    full, lora = recipe_memory("merv-frozen", LoraConfig(r=16))
    d, ff, layers = 4096, 11008, 32  # LLaMA-2 7B: q, k, v, o are d x d; gate, up d -> ff; down ff -> d
    assert lora.adapters == layers * 16 * (4 * (d + d) + 2 * (d + ff) + (ff + d)) == 39_976_960
    connector = lora.trainable - lora.adapters
    # LLaMA-2 7B's published 6,738,415,616 parameters plus the 64 padded vocabulary rows of embeddings and head
    assert full.trainable - connector == 6_738_415_616 + 2 * 64 * d
    assert lora.params == full.params + lora.adapters
    assert lora.optimizer_bytes == 8 * lora.trainable and full.optimizer_bytes == 8 * full.trainable
    assert lora.weight_bytes == 4 * lora.params  # fp32 master weights, frozen ones included
