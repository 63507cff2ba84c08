"""What the feature cache saves: extraction paid once, against the encoders re-run on every training step.

The online side is measured, not modelled: a few steps of the demo's MERV run with the encoders in
the loop (`OnlineFeatureFn`, the path of `merv train --online`, as the reference trains), timing the
decode and each encoder per sample. Each model's online cost is then its own training from the
cache plus decoding and encoding, with its own encoders, every sample it trains on: an
extrapolation from the measured steps, and labelled so wherever it is shown.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class OnlineRate:
    """What a few online training steps cost: wall seconds per step, and where the time went."""

    steps: int
    samples: int  # decoded and encoded during those steps
    step_s: list[float]  # the trainer's step times (step 1 also builds the encoders)
    seconds: dict[str, float]  # "decode" and one entry per encoder, over all `samples`

    def per_sample(self, encoders: Sequence[str]) -> float:
        """Seconds to decode one sample and run `encoders` on it."""
        return (self.seconds.get("decode", 0.0) + sum(self.seconds[e] for e in encoders)) / max(self.samples, 1)

    @property
    def typical_step_s(self) -> float:
        """Median step time without the first step (which builds the encoders), when there are others."""
        return statistics.median(self.step_s[1:] or self.step_s)


def measure_online(config: Any, steps: int, out_dir: str | Path) -> OnlineRate:
    """Train `config` (a RunConfig) for `steps` steps decoding and encoding every sample in the loop."""
    from merv.train.online import OnlineFeatureFn
    from merv.train.trainer import train

    fn = OnlineFeatureFn(size=config.model.encoder_size, weights=config.model.encoder_weights)
    run = config.override({"schedule.max_steps": steps, "checkpoint.out_dir": str(out_dir), "checkpoint.export": False,
                           "checkpoint.resume": False, "loader.num_workers": 0, "logging.progress": False},
                          source="online cost")
    train(run, feature_fn=fn)  # one process, no loader workers: `fn` sees every sample
    rows = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return OnlineRate(steps, fn.samples, [float(r["step_s"]) for r in rows], dict(fn.seconds))


@dataclass
class CostReport:
    """Cache (extract once, train every model from the store) against online (re-encode in every step)."""

    extract_s: float  # measured: the one extraction of every video by every encoder
    train_s: dict[str, float]  # measured: each model trained from the cache (wall s)
    online_s: dict[str, float]  # extrapolated: the same training with decode + encode of every sample
    rate: OnlineRate
    cached_step_s: float  # the measured model's median step time from the cache, next to its online one

    @classmethod
    def build(cls, extract_s: float, models: Mapping[str, Mapping[str, Any]], rate: OnlineRate,
              cached_step_s: float) -> CostReport:
        """models: {name: {"train_s", "samples" (trained on), "encoders"}}."""
        online = {name: m["train_s"] + m["samples"] * rate.per_sample(m["encoders"]) for name, m in models.items()}
        return cls(extract_s, {n: float(m["train_s"]) for n, m in models.items()}, online, rate, cached_step_s)

    @property
    def cache_total_s(self) -> float:
        return self.extract_s + sum(self.train_s.values())

    @property
    def online_total_s(self) -> float:
        return sum(self.online_s.values())

    def line(self) -> str:
        n = len(self.train_s)
        return (f"cost of {n} models: cache = extraction once {self.extract_s:.0f}s + training from the store "
                f"{sum(self.train_s.values()):.0f}s = {self.cache_total_s:.0f}s (measured); online = encoders re-run "
                f"on every step ({self.rate.typical_step_s:.2f}s/step measured over {self.rate.steps} steps, against "
                f"{self.cached_step_s:.2f}s/step from the cache) = {self.online_total_s:.0f}s (extrapolated), "
                f"{self.online_total_s / max(self.cache_total_s, 1e-9):.1f}x the cache")

    def to_dict(self) -> dict[str, Any]:
        return {"extract_s": self.extract_s, "train_s": self.train_s, "online_s_extrapolated": self.online_s,
                "cache_total_s": self.cache_total_s, "online_total_s_extrapolated": self.online_total_s,
                "online_measured": {"steps": self.rate.steps, "samples": self.rate.samples, "step_s": self.rate.step_s,
                                    "seconds": self.rate.seconds},
                "cached_step_s": self.cached_step_s}


__all__ = ["CostReport", "OnlineRate", "measure_online"]
