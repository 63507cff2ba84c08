"""MERV as a Hugging Face model: the export directory, the Auto classes, transformers' generate,
the earlier layout and its conversion, and what push_to_hub would upload."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from testkit import llm as H
from typer.testing import CliRunner

from merv.cli import app
from merv.hf import MervConfig, MervForConditionalGeneration
from merv.train.connector import ConnectorConfig
from merv.train.export import load_merv, read_merv_config, save_merv

ENCODERS = [{"name": "enc_a", "fingerprint": "fp-a-1234", "model_id": "org/enc-a", "frames": 4},
            {"name": "enc_b", "fingerprint": "fp-b-5678", "model_id": "org/enc-b", "frames": 4}]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model, tok = H.build_tiny_merv(connector_config=ConnectorConfig(tokens_per_frame=4, fusion_embed_dim=48), seed=3)
    model.eval()
    out = tmp_path_factory.mktemp("hf") / "export"
    save_merv(model, out, encoders=ENCODERS, extra={"recipe": "tiny", "stage": "finetune", "steps": 5})
    return model, tok, out


def test_the_export_is_a_standard_model_directory_with_its_provenance(exported):
    _, _, out = exported
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "merv" and cfg["architectures"] == ["MervForConditionalGeneration"]
    assert cfg["text_config"]["model_type"] == "llama"
    assert MervConfig.from_pretrained(out).encoder_fingerprints() == {"enc_a": "fp-a-1234", "enc_b": "fp-b-5678"}
    card = (out / "README.md").read_text()
    assert "fp-a-1234" in card and "org/enc-b" in card and "| recipe | tiny |" in card
    assert (out / "generation_config.json").is_file() and (out / "tokenizer_config.json").is_file()


def test_from_pretrained_gives_identical_logits_directly_and_through_the_auto_classes(exported):
    from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText

    model, tok, out = exported
    feats = H.random_features(model.connector.specs, 2, seed=1)
    ids = torch.tensor([model._prompt_ids(model.build_prompt("What happens?"))[0]] * 2)
    with torch.no_grad():
        want = model(feats, ids).logits
        for cls in (MervForConditionalGeneration, AutoModel, AutoModelForImageTextToText):
            hf = cls.from_pretrained(out)
            assert type(hf) is MervForConditionalGeneration
            got = hf(input_ids=ids, features=feats)
            assert torch.equal(got.logits, want)
            assert got.fusion_weights.shape == (2, 2)
    assert isinstance(AutoConfig.from_pretrained(out), MervConfig)


def test_registration_happens_on_import_merv_before_transformers(exported):
    """The Auto classes know `merv` after `import merv` even when transformers is imported later."""
    _, _, out = exported
    code = ("import merv, sys; assert 'transformers' not in sys.modules; "
            "from transformers import AutoModelForImageTextToText as A; "
            f"print(type(A.from_pretrained({str(out)!r})).__name__)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "MervForConditionalGeneration"


def test_transformers_generate_equals_the_training_models_greedy_loop_and_samples_reproducibly(exported, capfd):
    model, _, out = exported
    hf = MervForConditionalGeneration.from_pretrained(out)
    feats = H.random_features(model.connector.specs, 2, seed=4)
    rows = model._prompt_ids([model.build_prompt("Describe it."), model.build_prompt("What colour is the large shape?")])
    width = max(map(len, rows))
    pad = model.tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])  # left-padded batch of two lengths
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    capfd.readouterr()
    greedy = hf.generate(input_ids=ids, attention_mask=mask, features=feats, max_new_tokens=7, do_sample=False)
    ours = model.generate(feats, rows, max_new_tokens=7)
    eos = model.tokenizer.eos_token_id
    for row, want in zip(greedy.tolist(), ours.token_ids):
        assert row[: len(want)] == want and all(t in (eos, pad) for t in row[len(want):])
    sample = dict(input_ids=ids, attention_mask=mask, features=feats, max_new_tokens=7, do_sample=True,
                  temperature=0.8, top_p=0.9)
    torch.manual_seed(0)
    first = hf.generate(**sample)
    torch.manual_seed(0)
    assert torch.equal(first, hf.generate(**sample))
    err = capfd.readouterr().err
    assert "deprecated" not in err.lower() and "warning" not in err.lower(), err


def test_the_earlier_layout_still_loads_and_merv_convert_rewrites_it(exported, tmp_path):
    from safetensors.torch import save_file

    model, tok, _ = exported
    old = tmp_path / "old"  # the layout exports had before the Hugging Face-native one
    old.mkdir()
    save_file({k: v.contiguous() for k, v in model.connector.state_dict().items()}, str(old / "connector.safetensors"))
    model.llm.save_pretrained(old / "llm")
    tok.save_pretrained(old / "tokenizer")
    (old / "merv_config.json").write_text(json.dumps({
        "format": "merv-checkpoint", "version": 1, "connector": model.connector.config.to_dict(),
        "feature_specs": [s.to_dict() for s in model.connector.specs], "d_llm": model.connector.d_llm,
        "llm": {"source": None, "saved": True}, "bos_token_id": model.bos_token_id, "prompt_format": "pure",
        "extra": {"recipe": "tiny"}}))
    feats = H.random_features(model.connector.specs, 1, seed=6)
    ids = torch.tensor(model._prompt_ids(model.build_prompt("Why?")))
    with torch.no_grad():
        want = model(feats, ids).logits
        assert torch.equal(load_merv(old, dtype=torch.float32)(feats, ids).logits, want)
    res = CliRunner().invoke(app, ["convert", str(old), str(tmp_path / "new")])
    assert res.exit_code == 0, res.output
    assert read_merv_config(tmp_path / "new")["layout"] == "hf"
    with torch.no_grad():
        assert torch.equal(MervForConditionalGeneration.from_pretrained(tmp_path / "new")(input_ids=ids, features=feats).logits,
                           want)
    same = CliRunner().invoke(app, ["convert", str(old), str(old)])
    assert same.exit_code == 2 and "new directory" in same.output


def test_push_to_hub_uploads_the_export_directory_with_its_model_card(exported, monkeypatch):
    """No network here: the two Hub calls are replaced and the folder they would upload is checked."""
    import huggingface_hub

    _, _, out = exported
    hf = MervForConditionalGeneration.from_pretrained(out)
    uploaded: dict[str, dict[str, str]] = {}

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        root = Path(folder_path)
        uploaded[repo_id] = {p.name: p.read_text() if p.suffix in (".md", ".json") else "" for p in root.iterdir()}
        return "https://hf.co/" + repo_id

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo",
                        lambda self, repo_id, **kw: huggingface_hub.RepoUrl(f"https://hf.co/{repo_id}"))
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    hf.push_to_hub("someone/merv-tiny", token="not-a-token")
    files = uploaded["someone/merv-tiny"]
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer_config.json",
            "processor_config.json", "README.md"} <= set(files)
    assert "fp-a-1234" in files["README.md"]  # MERV's card, not a generic one
    assert json.loads(files["config.json"])["encoders"] == ENCODERS


def test_the_processor_tokenises_in_the_prompt_format_and_selects_each_encoders_frames(exported, tmp_path):
    import numpy as np
    from transformers import AutoProcessor

    from merv.hf import MervProcessor

    model, tok, out = exported
    processor = AutoProcessor.from_pretrained(out)
    assert isinstance(processor, MervProcessor)
    video = np.random.default_rng(0).integers(0, 255, (16, 24, 32, 3), dtype=np.uint8)
    batch = processor(["Describe it.", "What colour is the large shape?"], videos=[video, video[:8]])
    rows = model._prompt_ids([model.build_prompt("Describe it."), model.build_prompt("What colour is the large shape?")])
    for ids, mask, want in zip(batch["input_ids"].tolist(), batch["attention_mask"].tolist(), rows):
        assert [t for t, m in zip(ids, mask) if m] == want and mask[-1] == 1  # left-padded, BOS first
    assert [tuple(f.shape) for f in batch["pixel_values"]["enc_a"]] == [(4, 24, 32, 3), (4, 24, 32, 3)]
    assert torch.equal(batch["pixel_values"]["enc_a"][0], torch.from_numpy(video[::4]))  # extraction's subsample
    framewise = MervProcessor(tok, [{"name": "enc_a", "frames": 4, "framewise": True},
                                    {"name": "enc_b", "frames": 4, "framewise": False}])
    image = framewise("What is it?", images=[video[0]])
    assert bool(image["is_image"][0])
    assert tuple(image["pixel_values"]["enc_a"][0].shape) == (1, 24, 32, 3)  # a frame-wise encoder sees it once
    assert tuple(image["pixel_values"]["enc_b"][0].shape) == (4, 24, 32, 3)  # a temporal one, repeated
    framewise.save_pretrained(tmp_path / "proc")
    assert MervProcessor.from_pretrained(tmp_path / "proc").encoders == framewise.encoders
    with pytest.raises(ValueError, match="one per text"):
        processor(["a", "b"], videos=[video])
