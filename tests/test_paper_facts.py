"""The one table of the paper's encoders (merv.store.paper) agrees with what the code builds."""

from __future__ import annotations

import pytest

from merv.extract.encoders import ENCODERS, build_encoder
from merv.store.paper import PAPER_ENCODER_NAMES, PAPER_ENCODERS, largest_paper_feature_bytes
from merv.store.schema import paper_bytes_per_sample


@pytest.mark.parametrize("name", PAPER_ENCODER_NAMES)
def test_the_table_matches_the_paper_architecture_built_on_meta(name: str) -> None:
    fact = PAPER_ENCODERS[name]
    info = build_encoder(name, size="paper", meta=True).info
    assert info.model_id == fact.model_id
    assert info.frames == fact.frames == ENCODERS[name].frames
    assert tuple(info.grid) == fact.grid and info.dim == fact.dim
    assert bool(info.framewise) == fact.framewise


def test_order_and_shard_sizing_come_from_the_table() -> None:
    assert PAPER_ENCODER_NAMES == ("languagebind", "dinov2", "vivit", "siglip")  # published checkpoints' layout
    assert largest_paper_feature_bytes(None) == 16 * 16 * 16 * 1024 * 2  # DINOv2 / LanguageBind native
    assert largest_paper_feature_bytes((8, 8)) == 16 * 8 * 8 * 1024 * 2
    assert paper_bytes_per_sample((8, 8)) == {"video": 16 * 8 * 8 * 1024 * 2, "image": 16 * 8 * 8 * 1024 * 2}


@pytest.mark.parametrize("encoding", ["fp16", "bitround", "int8"])
def test_as_stored_is_what_the_reader_returns(tmp_path, encoding: str) -> None:
    """The online path's rounding rule equals a real write + read of the same features."""
    import numpy as np

    from merv.store import EncoderGroupSpec, FeatureReader, FeatureStore, SampleRecord
    from merv.store.encodings import as_stored

    store = FeatureStore.create(str(tmp_path / "s.zarr"), samples_per_shard=2)
    store.add_samples([SampleRecord(f"v{i}", f"/v{i}.mp4") for i in range(2)])
    group = store.ensure_group(EncoderGroupSpec("enc", "f" * 16, (2, 3, 3), 16, framewise=False, encoding=encoding,
                                                bitround_keepbits=5))
    x = (np.random.default_rng(0).standard_normal((2, 2, 3, 3, 16)) * 3).astype(np.float32)
    group.write_shard("video", 0, x)
    got = FeatureReader(store).get_batch(["v0", "v1"])["enc"]
    assert np.array_equal(got.view(np.uint16), as_stored(x, encoding, keepbits=5).view(np.uint16))


@pytest.mark.parametrize("name", PAPER_ENCODER_NAMES)
def test_the_accounting_counts_every_parameter_of_the_built_encoder(name: str) -> None:
    """The analytic parameter count (merv model info) equals the module built on the meta device:
    LanguageBind's per-layer temporal embeddings, DINOv2's LayerScale and register positions included."""
    from merv.train.accounting import PAPER_ENCODERS as ACCOUNTED

    built = build_encoder(name, size="paper", meta=True)
    assert ACCOUNTED[name].vit.params() == sum(p.numel() for p in built.parameters())
    assert ACCOUNTED[name].spec.grid == PAPER_ENCODERS[name].grid and ACCOUNTED[name].source == PAPER_ENCODERS[name].model_id
