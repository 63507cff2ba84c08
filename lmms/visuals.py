"""A question's visual -> the model's features: from the feature store when it holds the file,
else decoded and encoded as `merv generate` does.

lmms-eval hands a model file paths (videos) or PIL images, not sample ids, so the store is searched
by the source each sample was extracted from: a whole-video sample (no time window) whose recorded
source is the same file. Features read from a store are the ones the online path computes (same
decoding, same encoders, checked by fingerprint; the store's rounding applied to both), so an answer
does not depend on where its features came from, only the cost does.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from merv.pipelines.generate import GenerationSession


def source_key(source: str) -> str:
    """One spelling per file: local paths (and file:// URLs) resolved, other URLs as given."""
    source = source.removeprefix("file://")
    if "://" in source:
        return source
    return os.path.realpath(os.path.expanduser(source))


class VisualFeatures:
    """Features per visual for one session, read from `store` when it can be, with counts of both."""

    def __init__(self, session: GenerationSession, store: str | None) -> None:
        self.session = session
        self.store_url = store
        self.from_store = 0
        self.decoded = 0
        self._reported = (0, 0)
        self._store: Any = None
        self._by_source: dict[str, str] = {}
        if store:
            from merv.pipelines.evaluate.features import StoreFeatures

            # the model's encoders, grids and trained fingerprints decide which groups may be read
            self._store = StoreFeatures(session.model, store, fingerprints=None, check_windows=False)
            table = self._store.table
            for i, sample_id in enumerate(table.ids):
                rec = table.record(i)
                if rec.start is None and rec.end is None and rec.end_frame is None:
                    self._by_source.setdefault(source_key(rec.source), sample_id)

    def features(self, visual: Any) -> dict[str, torch.Tensor]:
        """{encoder: (1, t, h, w, d)} for a path / URL or an image (PIL or uint8 array)."""
        if self._store is not None and isinstance(visual, (str, os.PathLike)):
            sample_id = self._by_source.get(source_key(str(visual)))
            if sample_id is not None:
                state, _, _ = self._store.reader.state(self._store.table.index[sample_id])
                if state == "ok":
                    self.from_store += 1
                    return self._store.read([sample_id], torch.device("cpu"))
        self.decoded += 1
        return self.session.features(visual)

    def report(self, log: Any) -> None:
        """One line per batch of requests: where the features came from."""
        if (self.from_store, self.decoded) != self._reported:
            where = f" from the store {self.store_url}" if self.store_url else ""
            log.info(f"merv: {self.from_store} visuals read{where}, {self.decoded} decoded and encoded")
            self._reported = (self.from_store, self.decoded)
