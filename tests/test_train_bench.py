"""The train-step benchmark: online, cached and floor runs are the same training, fed differently."""

from __future__ import annotations

import pytest
import torch

from merv.benchmarks import train_bench
from merv.train.recipes import RecipeError, get_recipe


@pytest.mark.integration
def test_three_modes_train_identically_and_report_ratios(tmp_path, capsys):
    """Same batches, same model: online decode + encode, the store and features held in memory
    must give the same loss at every step, so the timings compare feeding paths only."""
    report = train_bench.main(["--recipe", "tiny", "--videos", "4", "--frames", "36", "--hw", "48x64", "--batch", "2",
                               "--micro-batch", "1", "--steps", "1", "--warmup", "1", "--repeats", "1", "--out", str(tmp_path)])
    assert report["losses_identical_across_modes"] is True
    results = report["results"]
    assert set(results) == {"floor", "cached", "online"}
    for mode in results.values():
        assert mode["steps_timed"] == 1 and len(mode["losses"]) == 2 and mode["step_s_mean"] > 0
        assert 0.0 <= mode["data_wait_frac"] <= 1.0
    assert results["online"]["data_wait_frac"] > results["floor"]["data_wait_frac"]  # decoding is data wait
    assert set(report["ratios"]) == {"online_over_cached", "cached_over_floor"}
    cfg = report["configuration"]
    assert cfg["visual_tokens_per_sample"] == 16 * 4  # tiny: 16 frames x 2x2 tokens (the fusion mixes encoders)
    assert 0 < cfg["flops_per_sample"]["encoder_share"] < 1
    assert report["extraction"]["videos"] == 4
    assert cfg["stage"] == "finetune"  # the recipe's last stage by default (--stage picks another)
    assert '"benchmark": "train_step"' in capsys.readouterr().out  # JSON on stdout


def test_rejects_too_few_videos_for_the_timed_steps(tmp_path):
    with pytest.raises(SystemExit):
        train_bench.main(["--videos", "4", "--steps", "5", "--batch", "4", "--out", str(tmp_path)])


def test_small_recipe_keeps_the_paper_proportions():
    """What the benchmark claims of its default configuration: 4 encoders at the paper's grids,
    64 tokens per frame x 16 frames, and an LLM several times the encoders' parameters."""
    from merv.extract.encoders import build_encoder
    from merv.train.specs import FeatureSpec

    recipe = get_recipe("small").model
    encoders = {n: build_encoder(n, size=recipe.encoder_size) for n in recipe.encoders}
    specs = [FeatureSpec(n, e.info.grid, e.info.dim) for n, e in encoders.items()]
    model = recipe.build(specs, dtype=torch.float32)
    assert model.connector.num_tokens == 16 * 64
    decoder = sum(p.numel() for n, p in model.llm.named_parameters() if ".layers." in n)
    encoder = sum(e.num_parameters() for e in encoders.values())
    assert decoder >= 4 * encoder
    assert [s.grid for s in specs] == [(16, 16, 16), (16, 16, 16), (16, 14, 14), (16, 14, 14)]


def test_paper_shape_recipe_is_the_papers_model_without_weights():
    """`paper-shape` (GPU benchmarks without downloads): built on the meta device, its LLM and
    connector have exactly the parameters of the analytic paper report, LLaMA-2 7B's shapes."""
    from merv.train.llm import llama2_7b_config

    recipe = get_recipe("paper-shape").model
    assert recipe.encoder_size == "paper" and recipe.encoder_weights == "random"
    assert get_recipe("paper-shape", "align").stage == "align"  # align: one GPU, frozen LLM
    assert get_recipe("paper-shape").stage == "finetune"
    with pytest.raises(RecipeError, match="align, finetune"):
        get_recipe("paper-shape", "full-align")
    with torch.device("meta"):
        model = recipe.build()
    report = get_recipe("merv-frozen").model.report()
    assert sum(p.numel() for p in model.llm.parameters()) == report.params["llm"] > 6.7e9
    connector = sum(v for k, v in report.params.items() if k.startswith(("projector/", "fusion")))
    assert sum(p.numel() for p in model.connector.parameters()) == connector
    reference = llama2_7b_config()
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "max_position_embeddings"):
        assert getattr(model.llm.config, key) == getattr(reference, key), key


def test_paper_size_random_encoders_need_no_weights(monkeypatch):
    """What the GPU runs of `paper-shape` rely on: online encoders at paper size with random
    weights build without any checkpoint (offline), and the choice survives pickling to workers."""
    import pickle

    from merv.train.accounting import PAPER_ENCODERS
    from merv.train.online import OnlineEncoders, OnlineFeatureFn

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    enc = OnlineEncoders([PAPER_ENCODERS["siglip"].spec], size="paper", weights="random").encoder("siglip")
    assert enc.info.weights.startswith("random-init") and enc.info.grid == (16, 14, 14)
    assert pickle.loads(pickle.dumps(OnlineFeatureFn(size="paper", weights="random"))).weights == "random"


def test_bench_extracts_with_the_recipes_encoder_weights(monkeypatch, tmp_path):
    from merv.extract.job import ExtractSummary

    seen = {}

    def fake_run(manifest, store, opts, show_progress):  # noqa: ANN001, ANN202
        seen["opts"] = opts
        return ExtractSummary(extracted=3)

    monkeypatch.setattr("merv.extract.job.run_extraction", fake_run)
    assert train_bench.extract(tmp_path / "m.jsonl", tmp_path / "s.zarr", get_recipe("paper-shape").model,
                               "cuda")["videos"] == 3
    opts = seen["opts"]
    assert (opts.size, opts.weights, opts.grid, opts.device) == ("paper", "random", "8x8", "cuda")


def test_online_and_a_custom_feature_fn_are_refused_before_any_setup(tmp_path):
    from merv.train.trainer import TrainConfigError, train

    out = tmp_path / "run"
    config = get_recipe("tiny").override({"data.files": ["missing.json"], "data.online": True,
                                          "checkpoint.out_dir": str(out)})
    with pytest.raises(TrainConfigError, match="choose one"):
        train(config, feature_fn=train_bench.InMemoryFeatures())
    assert not out.exists()  # nothing was written
