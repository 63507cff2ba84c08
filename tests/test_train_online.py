"""Online encoding sees what the cache holds: `merv train --online` (decode + encode in the loop,
as the reference trains) gives cached training's first-step loss, and the generation encoders
(`merv generate`) give the stored features bit for bit, for videos and images."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from testkit.extraction import extract_in_process

from merv.extract.job import ExtractOptions
from merv.extract.sources import local_file
from merv.pipelines.synthetic import generate_synthetic
from merv.store import FeatureReader
from merv.train.online import OnlineEncoders
from merv.train.recipes import get_recipe
from merv.train.specs import FeatureSpec
from merv.train.trainer import train

pytestmark = pytest.mark.integration  # Ray / several processes / servers: not in `make test-fast`


@pytest.fixture(scope="module")
def extracted(tmp_path_factory):
    root = tmp_path_factory.mktemp("online")
    data = generate_synthetic(root / "data", n_videos=8, seed=3, size=64, frames=16)
    image = root / "data" / "still.png"
    Image.fromarray(np.random.default_rng(5).integers(0, 255, (50, 70, 3), dtype=np.uint8)).save(image)
    with data.manifest.open("a") as fh:
        fh.write(json.dumps({"id": "still", "path": str(image), "kind": "image"}) + "\n")
    store = str(root / "features.zarr")
    assert extract_in_process(data.manifest, store, ExtractOptions(  # the Ray path has its own tests
        encoders=["dinov2", "siglip", "vivit", "languagebind"], size="tiny", grid="native", samples_per_shard=4)) == 9
    return root, str(data.train_json), store


def test_online_and_cached_training_give_the_same_first_step_loss(extracted):
    root, data, store = extracted
    common = get_recipe("tiny", stage="finetune").override({
        "data.files": [data], "data.stores": [store], "schedule.max_steps": 1, "loader.global_batch_size": 4,
        "model.connector.tokens_per_frame": 16, "checkpoint.export": False, "logging.progress": False,
        "logging.tensorboard": False})
    cached = train(common.override({"checkpoint.out_dir": str(root / "cached")}))
    online = train(common.override({"checkpoint.out_dir": str(root / "online"), "data.online": True}))
    print("first-step loss cached / online:", cached["losses"][0], online["losses"][0])
    assert cached["losses"][0] == pytest.approx(online["losses"][0], abs=1e-6)
    assert cached["losses"][0] > 1.0  # an untrained model: the comparison is not between two zeros


def test_generation_encoders_give_the_cached_features_bit_for_bit(extracted):
    """`merv generate` decodes and encodes a raw file itself; an image must take extraction's
    path too (frame-wise encoders see its one frame) and every value the store's float16."""
    _, _, store = extracted
    reader = FeatureReader(store)
    specs = [FeatureSpec.from_group_spec(g.spec) for g in reader.groups.values()]
    online = OnlineEncoders(specs, size="tiny")
    video_id = next(i for i in reader.table.ids if i != "still")
    for sample_id in (video_id, "still"):
        record = reader.table.record(reader.table.index[sample_id])
        with local_file(record.source) as path:
            got = online.encode_path(path)
        want = reader.get(sample_id)
        for name, x in got.items():
            assert torch.equal(x[0], torch.from_numpy(want[name]).float()), (sample_id, name)
    assert reader.table.kind_of(reader.table.index["still"]) == "image"


def test_a_trained_export_is_a_hugging_face_model_that_answers_a_real_video(extracted, tmp_path):
    """`merv train` -> RUN/export -> from_pretrained (directly and through the Auto classes) ->
    transformers' generate on a decoded video equals `merv generate` and the training model's own
    greedy loop; the export records the store groups' fingerprints and `merv generate` refuses
    encoders of another configuration."""
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    from merv.hf import MervForConditionalGeneration
    from merv.pipelines.generate import GenerateOptions, answer_video
    from merv.train.export import load_merv
    from merv.train.online import EncoderMismatchError

    root, data, store = extracted
    run = train(get_recipe("tiny", stage="finetune").override({
        "data.files": [data], "data.stores": [store], "schedule.max_steps": 2, "loader.global_batch_size": 4,
        "model.connector.tokens_per_frame": 16, "checkpoint.out_dir": str(tmp_path / "run"), "logging.progress": False,
        "logging.tensorboard": False}))
    export = run["export"]
    hf = MervForConditionalGeneration.from_pretrained(export)
    auto = AutoModelForImageTextToText.from_pretrained(export)
    assert type(auto) is MervForConditionalGeneration
    groups = FeatureReader(store).groups
    assert hf.config.encoder_fingerprints() == {n: groups[n].spec.fingerprint for n in hf.config.encoder_fingerprints()}
    assert all(fp in (tmp_path / "run" / "export" / "README.md").read_text() for fp in hf.config.encoder_fingerprints().values())

    video = json.loads(open(data).read())[0]["video"]
    video = str(root / "data" / video) if not video.startswith("/") else video
    question = "What color is the shape?"
    answer = answer_video(export, video, question, GenerateOptions(max_new_tokens=8))
    specs = [FeatureSpec.from_dict(d) for d in hf.config.feature_specs]
    features = OnlineEncoders(specs, size="tiny").encode_path(video)
    model = load_merv(export)
    prompt = model.build_prompt(question)
    tok = AutoTokenizer.from_pretrained(export)
    ids = torch.tensor(model._prompt_ids(prompt))
    for m in (hf, auto):
        out = m.generate(input_ids=ids, features=features, max_new_tokens=8, do_sample=False)
        assert tok.decode(out[0], skip_special_tokens=True).strip() == answer
    assert model.generate(features, prompt, max_new_tokens=8).text == answer
    with pytest.raises(EncoderMismatchError, match="fingerprint"):
        answer_video(export, video, question, GenerateOptions(size="small", weights="random"))

    # the processor (AutoProcessor after `import merv`) is the one online path: its frames, encoded,
    # are the store's features bit for bit, for a video and for an image
    from transformers import AutoProcessor

    from merv.extract.sources import local_file

    processor = AutoProcessor.from_pretrained(export)
    reader = FeatureReader(store)
    online = OnlineEncoders(specs, size="tiny")
    video_id = next(i for i in reader.table.ids if i != "still")
    for sample_id in (video_id, "still"):
        record = reader.table.record(reader.table.index[sample_id])
        with local_file(record.source) as path:
            batch = processor("What is it?", videos=[path])
        assert bool(batch["is_image"][0]) == (sample_id == "still")
        got = online.encode_inputs({name: frames[0] for name, frames in batch["pixel_values"].items()})
        want = reader.get(sample_id)
        for name, x in got.items():
            assert torch.equal(x[0], torch.from_numpy(want[name]).float()), (sample_id, name)
