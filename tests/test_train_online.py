"""`merv train --online` (decode + encode in the loop, as the reference trains) and cached training
see the same features: the same first-step loss on a store extracted with the tiny encoders."""

from __future__ import annotations

import pytest

from merv.extract.job import ExtractOptions, run_extraction
from merv.pipelines.synthetic import generate_synthetic
from merv.train.trainer import TrainConfig, train


@pytest.fixture(scope="module")
def extracted(tmp_path_factory):
    root = tmp_path_factory.mktemp("online")
    data = generate_synthetic(root / "data", n_videos=8, seed=3, size=64, frames=16)
    store = str(root / "features.zarr")
    summary = run_extraction(str(data.manifest), store, ExtractOptions(
        encoders=["dinov2", "siglip", "vivit", "languagebind"], size="tiny", grid="native", samples_per_shard=4),
        show_progress=False)
    assert summary.extracted == 8 and not summary.failed
    return root, str(data.train_json), store


def test_online_and_cached_training_give_the_same_first_step_loss(extracted):
    root, data, store = extracted
    common = dict(data=[data], stores=[store], recipe="tiny", stage="finetune", max_steps=1, global_batch_size=4,
                  tokens_per_frame=16, export=False, progress=False, tensorboard=False)
    cached = train(TrainConfig(**common, out_dir=str(root / "cached")))
    online = train(TrainConfig(**common, out_dir=str(root / "online"), online=True))
    print("first-step loss cached / online:", cached["losses"][0], online["losses"][0])
    assert cached["losses"][0] == pytest.approx(online["losses"][0], abs=1e-6)
    assert cached["losses"][0] > 1.0  # an untrained model: the comparison is not between two zeros
