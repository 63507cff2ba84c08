"""A small learnable task in a feature store: the answer word is written into the features."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from merv.store import EncoderGroupSpec, FeatureStore, SampleRecord

WORDS = ["red", "green", "blue", "yellow"]
ENCODERS = ["dinov2", "siglip", "vivit", "languagebind"]


def make_task(root: Path, n: int = 32, per_shard: int = 4, grid=(16, 4, 4), dim: int = 32, seed: int = 0) -> tuple[str, str]:
    """Store + LLaVA-style JSON where answer = WORDS[label] and label shifts a channel block."""
    store = FeatureStore.create(str(root / "task.zarr"), samples_per_shard=per_shard)
    store.add_samples([SampleRecord(f"v{i:03d}", f"/videos/v{i:03d}.mp4") for i in range(n)])
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(WORDS), n)
    block = dim // len(WORDS)
    for name in ENCODERS:
        group = store.ensure_group(EncoderGroupSpec(name, f"test-{name}", grid, dim, framewise=name in ("dinov2", "siglip")))
        for shard in range(group.num_shards("video")):
            rows = group.shard_range("video", shard)
            x = rng.standard_normal((len(rows), *grid, dim)).astype(np.float32) * 0.1
            for j, row in enumerate(rows):
                x[j, ..., labels[row] * block:(labels[row] + 1) * block] += 1.0
            group.write_shard("video", shard, x)
    records = [{"id": f"v{i:03d}", "video": f"v{i:03d}.mp4",
                "conversations": [{"from": "human", "value": "<video>\nWhat color is it?"},
                                  {"from": "gpt", "value": WORDS[labels[i]]}]} for i in range(n)]
    data = root / "task.json"
    data.write_text(json.dumps(records))
    return str(data), str(root / "task.zarr")


def run_config(task: tuple[str, str], out: Path | str, changes: dict | None = None, *, recipe: str = "tiny",
               stage: str | None = None):
    """`recipe` (default tiny) training on `task` (data, store) in `out`, without progress bar or
    TensorBoard, with dotted `changes` (`{"schedule.max_steps": 2}`)."""
    from merv.train.recipes import get_recipe

    data, store = task
    return get_recipe(recipe, stage).override({
        "data.files": [data], "data.stores": [store], "checkpoint.out_dir": str(out), "logging.progress": False,
        "logging.tensorboard": False, **(changes or {})})
