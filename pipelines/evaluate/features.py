"""The feature store as evaluation sees it: question -> store id -> checked, model-shaped features.

Lookup: a question's sample id (`formats.sample_id`: video + window). Manifests of earlier versions
named a windowed clip by its bare video stem when the benchmark asked about that video with one
window only; in a store extracted from one, that id is still found (the fallback) and, like any id
under `check_windows`, used only when the window the store recorded is the question's. Anything
else that cannot be read is named per question (missing, pending, failed, another window), with the fix.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from merv.store import FeatureReader, FeatureStore
from merv.store.grid import pool_grid_torch

from .errors import EvalError
from .formats import Question, Window, video_stem

REEXTRACT = "re-run `merv eval-manifest BENCHMARK M.jsonl` and `merv extract M.jsonl --store STORE`"


@dataclass(frozen=True)
class Located:
    """Where a question's clip is: its sample id, the store id holding it (legacy ids differ), a problem."""

    sample_id: str
    store_id: str
    problem: str | None = None


class StoreFeatures:
    """Reads clips from the store for one model's connector (its encoders, grids, dims)."""

    def __init__(self, model: Any, store: FeatureStore | str, *, fingerprints: dict[str, str] | None,
                 check_windows: bool) -> None:
        self.specs = list(model.connector.specs)
        # by default the fingerprints the model was trained on (its export records them): a store
        # group of another encoder configuration is refused, never read
        trained = {e["name"]: e["fingerprint"] for e in getattr(model, "encoders", []) if e.get("fingerprint")}
        self.reader = FeatureReader(store, [s.name for s in self.specs], fingerprints=fingerprints or trained or None,
                                    as_torch=True)
        self.table = self.reader.table
        self.check_windows = check_windows
        for s in self.specs:
            g = self.reader.groups[s.name].spec
            if g.grid[0] != s.grid[0] or g.dim != s.dim:
                raise EvalError(
                    f"encoder {s.name!r}: the store holds (t={g.grid[0]}, d={g.dim}) but the model expects "
                    f"(t={s.grid[0]}, d={s.dim}); evaluate from a store extracted for this model"
                )
            if (g.grid[1] < s.grid[1]) or (g.grid[2] < s.grid[2]):
                raise EvalError(f"encoder {s.name!r}: stored grid {g.grid[1:]} is smaller than the model's {s.grid[1:]}")

    def locate(self, q: Question, prefix: str) -> Located:
        """The store id of a question's clip and why it cannot be read (None when it can)."""
        sid = q.sample_id(prefix)
        store_id, idx = sid, self.table.index.get(sid)
        if idx is None and not q.window.empty:  # a store made from an earlier manifest: id without the window
            legacy = prefix + video_stem(q.video_name)
            if legacy in self.table.index:
                store_id, idx = legacy, self.table.index[legacy]
        if idx is None:
            return Located(sid, sid, "not in the store")
        state, enc, reason = self.reader.state(idx)
        if state != "ok":
            return Located(sid, store_id, f"{state} for encoder {enc}" + (f": {reason}" if reason else ""))
        rec = self.table.record(idx)
        have = Window(rec.start, rec.end, rec.end_frame)
        if self.check_windows and not have.same_as(q.window):
            got, asked = have.to_dict() or "none", q.window.to_dict() or "none"
            if store_id != sid:
                return Located(sid, store_id, f"not in the store; {store_id!r} there holds window {got} but the question "
                                              f"asks {asked}: {REEXTRACT}")
            return Located(sid, store_id, f"extracted with window {got} but the question asks {asked}")
        return Located(sid, store_id)

    def read(self, store_ids: Sequence[str], device: torch.device) -> dict[str, torch.Tensor]:
        """{encoder: (B, t, h, w, d)} on `device`, pooled to the model's grid; a clip asked twice is read once."""
        uniq = list(dict.fromkeys(store_ids))
        batch = self.reader.get_batch(uniq)
        pos = torch.tensor([uniq.index(i) for i in store_ids])
        out = {}
        for s in self.specs:
            x = batch[s.name].index_select(0, pos)
            out[s.name] = pool_grid_torch(x, s.grid[1:]).to(device)
        return out
