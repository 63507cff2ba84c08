"""Instruction data: LLaVA / Video-LLaVA conversation JSON joined to feature stores by id.

A record is `{"id", "video" | "image" (optional path), "conversations": [{"from", "value"}, ...]}`
(`.json` = a list of records, `.jsonl` = one record per line). Records without a visual key are
text-only. Several `DataSource`s (JSON files + the store holding their features) are mixed in
one run, images and videos together, as in the paper's Stage 2 mix.

Join: a visual record is looked up in its store's sample table (`store.samples.index`) under its
join key: by default the record's `"id"`; `key="stem"` uses the file stem of the record's
video/image path (Video-LLaVA ids are not always the file names, while `merv extract` names
samples after the file by default); `key=callable(record) -> str` for anything else. Several
records may share one store sample (several Q&A about one video): each record is one example.
A record without "id" is named "<file stem>:<record number>" (fine for text-only records).

Availability is decided once, up front: an example whose sample is not in the store, or is
pending / failed for a selected encoder, raises `MissingFeaturesError` (count + first ids) unless
`allow_missing=True` (`merv train --allow-missing`), which drops those examples and logs the count
(`InstructionData.missing`).

Tokenisation is NOT done here: the loader tokenises lazily per example in its workers, so start-up
is one JSON parse whatever the data size, and the tokenizer / prompt format can change per run
without a cache to invalidate. Records are kept packed in numpy byte buffers (not millions of
Python objects) so forked DataLoader workers share them instead of copying them page by page.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch

from merv import MervError
from merv.jsonl import JsonlLineError, jsonl_rows
from merv.store import KINDS, FeatureReader, FeatureStore

from .prompts import conversation_problem

log = logging.getLogger(__name__)

JoinKey = str | Callable[[dict[str, Any]], str]
JOIN_KEYS = ("id", "stem")
VISUAL_KEYS = ("video", "image")
MAX_LISTED = 10  # ids named in a missing-features report


class InstructionDataError(MervError, ValueError):
    """A malformed instruction-data file or record (names the file and record)."""


@dataclass
class DataSource:
    """JSON/JSONL conversation files plus the feature store that holds their visual features.

    `store_url` may be None for purely text-only data. `key` is the join key ("id", "stem" or a
    callable, see the module docstring). `name` labels the source in reports (default: first file).
    """

    json_paths: Sequence[str | os.PathLike[str]] | str | os.PathLike[str]
    store_url: str | os.PathLike[str] | None = None
    key: JoinKey = "id"
    storage_options: dict[str, Any] | None = None
    name: str | None = None

    def __post_init__(self) -> None:
        paths = [self.json_paths] if isinstance(self.json_paths, (str, os.PathLike)) else list(self.json_paths)
        if not paths:
            raise InstructionDataError("no instruction data: pass --data FILE.json (LLaVA / Video-LLaVA conversations)")
        self.json_paths = [os.fspath(p) for p in paths]
        if self.store_url is not None:
            self.store_url = os.fspath(self.store_url)
        if isinstance(self.key, str) and self.key not in JOIN_KEYS:
            raise InstructionDataError(f"join key {self.key!r} is unknown: pass --join-key id (the record's \"id\") "
                                       "or --join-key stem (the file name of its video / image)")
        if self.name is None:
            self.name = Path(self.json_paths[0]).name


@dataclass
class MissingReport:
    """Examples without features: counts per cause and the first few ids with the reason."""

    examples: int = 0
    ids: int = 0  # distinct join keys among them
    by_cause: dict[str, int] = field(default_factory=dict)
    first: list[tuple[str, str]] = field(default_factory=list)  # (join key, why)

    def add(self, key: str, cause: str, why: str) -> None:
        self.examples += 1
        self.by_cause[cause] = self.by_cause.get(cause, 0) + 1
        if len(self.first) < MAX_LISTED:
            self.first.append((key, why))

    def __bool__(self) -> bool:
        return self.examples > 0

    def __str__(self) -> str:
        causes = ", ".join(f"{n} {c}" for c, n in sorted(self.by_cause.items()))
        listed = "; ".join(f"{k} ({why})" for k, why in self.first)
        return (
            f"{self.examples} examples ({self.ids} distinct ids) have no usable features: {causes}. "
            f"First {len(self.first)}: {listed}"
        )


class MissingFeaturesError(MervError, RuntimeError):
    """Raised when examples have no features and `allow_missing` is off."""

    def __init__(self, report: MissingReport) -> None:
        super().__init__(
            f"{report}. Finish or fix the extraction (`merv extract` resumes; --retry-failed redoes failures), "
            "check the join key (--join-key stem joins by video file name, --join-key id by the record's \"id\"), "
            "or pass --allow-missing to drop these examples."
        )
        self.report = report


@dataclass
class Example:
    """One decoded example (built on demand from the packed arrays)."""

    index: int
    id: str
    conversations: list[dict[str, str]]
    source: int
    store: int  # -1: text-only
    sample: int  # sample-table index in that store; -1: text-only

    @property
    def has_visual(self) -> bool:
        return self.store >= 0


class PackedStrings:
    """Strings in one numpy byte buffer + offsets.

    Why: a list of a million str / dict objects is copied into every forked DataLoader worker
    (reference counting touches every page); one numpy buffer stays shared.
    """

    def __init__(self, items: Iterable[str]) -> None:
        encoded = [s.encode("utf-8") for s in items]
        self.offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(e) for e in encoded], out=self.offsets[1:])
        self.buf = np.frombuffer(b"".join(encoded), dtype=np.uint8) if encoded else np.zeros(0, np.uint8)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> str:
        return self.buf[self.offsets[i] : self.offsets[i + 1]].tobytes().decode("utf-8")


# --------------------------------------------------------------------------- reading files
def load_records(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Records of one `.json` (a list) or `.jsonl` (one object per line) file, validated.

    Every problem is an `InstructionDataError` naming the file (and line / record), raised here
    where the file is read, so a run fails before any model is built.
    """
    path = os.fspath(path)
    text = _read_text(path)
    if not text.strip():
        raise InstructionDataError(f"instruction data file {path}: the file is empty; pass a JSON list of LLaVA records or JSONL")
    if path.endswith(".jsonl"):
        try:
            records = [record for _, record in jsonl_rows(text)]
        except JsonlLineError as exc:
            raise InstructionDataError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg}); a .jsonl file holds one record per line") from None
    else:
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InstructionDataError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from exc
    if not isinstance(records, list):
        raise InstructionDataError(f"{path}: expected a list of records (LLaVA format), got a JSON {type(records).__name__}")
    for n, rec in enumerate(records):
        _check_record(rec, path, n)
    return records


def _read_text(path: str) -> str:
    """The text of an instruction data file, or an error naming it (missing, a directory, not UTF-8)."""
    if not os.path.exists(path):
        raise InstructionDataError(f"instruction data file {path} does not exist; pass --data FILE.json (or .jsonl)")
    if os.path.isdir(path):
        raise InstructionDataError(f"instruction data {path} is a directory; pass --data FILE.json (or .jsonl), one file each")
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as exc:
        raise InstructionDataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8 JSON") from exc


def _check_record(rec: Any, path: str, n: int) -> None:
    where = f"{path}: record {n}" + (f" (id {rec.get('id')!r})" if isinstance(rec, dict) and "id" in rec else "")
    if not isinstance(rec, dict):
        raise InstructionDataError(f"{where}: a record must be an object, got {type(rec).__name__}")
    conv = rec.get("conversations")
    if not isinstance(conv, list) or not conv:
        raise InstructionDataError(f"{where}: needs a non-empty 'conversations' list")
    for t, turn in enumerate(conv):
        if not isinstance(turn, dict) or "from" not in turn or not isinstance(turn.get("value"), str):
            raise InstructionDataError(f"{where}: turn {t} needs 'from' and a string 'value'")
    problem = conversation_problem(conv)
    if problem is not None:
        raise InstructionDataError(f"{where}: the conversation {problem}")


def visual_path(rec: dict[str, Any]) -> str | None:
    """The record's video / image path, or None for a text-only record."""
    for k in VISUAL_KEYS:
        v = rec.get(k)
        if v:
            if isinstance(v, list):  # multi-image records: the first one (MERV takes one visual input)
                v = v[0]
            return str(v)
    return None


def join_key(rec: dict[str, Any], key: JoinKey) -> str:
    """The store sample id a visual record joins to."""
    if callable(key):
        return str(key(rec))
    if key == "stem":
        path = visual_path(rec)
        if path is None:
            raise InstructionDataError(f"record {rec.get('id')!r} has no video/image path to take a stem from (--join-key stem)")
        return PurePosixPath(path.replace("\\", "/")).stem
    if "id" not in rec:
        raise InstructionDataError(f"a visual record has no 'id' ({visual_path(rec)!r}); pass --join-key stem to join by file name")
    return str(rec["id"])


# --------------------------------------------------------------------------- the joined data
class InstructionData:
    """All examples of a run (every source), joined to their stores, with the shard blocks.

    Use `InstructionData.build(sources, ...)`. Per example (index 0..len-1): record id, packed
    conversation, source, store and sample-table index (-1 for text-only). `blocks` group
    examples by (store, kind, shard), text-only examples in chunks of `text_block_size` records:
    the loader permutes and shuffles these blocks (the I/O unit) deterministically.
    """

    def __init__(
        self,
        sources: list[DataSource],
        store_urls: list[str],
        reader_args: dict[str, Any],
        storage_options: list[dict[str, Any] | None],
        ids: PackedStrings,
        conversations: PackedStrings,
        source_of: np.ndarray,
        store_of: np.ndarray,
        sample_of: np.ndarray,
        block_offsets: np.ndarray,
        block_members: np.ndarray,
        feature_shapes: dict[str, tuple[int, int, int, int]],
        missing: MissingReport,
        readers: list[FeatureReader] | None = None,
    ) -> None:
        self.sources = sources
        self.store_urls = store_urls
        self.reader_args = reader_args
        self.storage_options = storage_options
        self.ids = ids
        self.conversations = conversations
        self.source_of = source_of
        self.store_of = store_of
        self.sample_of = sample_of
        self.block_offsets = block_offsets
        self.block_members = block_members
        self.feature_shapes = feature_shapes
        self.missing = missing
        self._readers = readers
        self._pid = os.getpid()
        # Optional replacement of the store read: (data, examples, dtype) -> (features, has_visual).
        # The trainer's --online mode decodes and encodes the videos here instead.
        self.feature_fn: Callable[[InstructionData, Any, torch.dtype], tuple[dict[str, torch.Tensor], torch.Tensor]] | None = None

    # ---------------------------------------------------------------- building
    @classmethod
    def build(
        cls,
        sources: Sequence[DataSource],
        *,
        encoders: Sequence[str] | None = None,
        fingerprints: dict[str, str] | None = None,
        pool_to: tuple[int, int] | None = None,
        allow_missing: bool = False,
        text_block_size: int = 256,
    ) -> "InstructionData":
        """Load every source, join to the stores, check availability, group into blocks.

        encoders: encoder names / keys to read (None: every group of the first store; every
        store must hold them all). pool_to: (h, w) to pool native-grid caches to at load time.
        """
        sources = list(sources)
        if not sources:
            raise ValueError("no data sources given")
        if text_block_size < 1:
            raise ValueError("text_block_size must be >= 1")
        store_urls: list[str] = []
        storage_options: list[dict[str, Any] | None] = []
        for src in sources:
            if src.store_url is not None and src.store_url not in store_urls:
                store_urls.append(str(src.store_url))
                storage_options.append(src.storage_options)
        readers, names, shapes = _open_readers(store_urls, storage_options, encoders, fingerprints, pool_to)
        availability = [_available_mask(r) for r in readers]

        ids: list[str] = []
        convs: list[str] = []
        source_of: list[int] = []
        store_of: list[int] = []
        sample_of: list[int] = []
        missing = MissingReport()
        missing_keys: set[tuple[int, str]] = set()
        for s, src in enumerate(sources):
            st = store_urls.index(str(src.store_url)) if src.store_url is not None else -1
            for path in src.json_paths:  # type: ignore[union-attr]
                for n, rec in enumerate(load_records(path)):
                    rid = str(rec["id"]) if "id" in rec else f"{Path(path).stem}:{n}"
                    if visual_path(rec) is None:
                        sample = -1
                        where = -1
                    else:
                        key = join_key(rec, src.key)
                        why = cause = None
                        if st < 0:
                            cause, why = "without a store", f"source {src.name} has no store_url"
                        else:
                            reader = readers[st]
                            idx = reader.table.index.get(key)
                            if idx is None:
                                cause, why = "not in the store", f"not in {store_urls[st]}"
                            elif not availability[st][idx]:
                                state, enc, reason = reader.state(idx)
                                cause = state
                                why = f"{state} for {enc}" + (f": {reason}" if reason else "")
                            else:
                                sample, where = int(idx), st
                        if cause is not None:
                            missing.add(key, cause, why)  # type: ignore[arg-type]
                            missing_keys.add((st, key))
                            continue
                    ids.append(rid)
                    convs.append(json.dumps(rec["conversations"], ensure_ascii=False))
                    source_of.append(s)
                    store_of.append(where)
                    sample_of.append(sample)
        missing.ids = len(missing_keys)
        if missing:
            if not allow_missing:
                raise MissingFeaturesError(missing)
            log.warning("dropping examples without features (--allow-missing): %s", missing)
        if not ids:
            files = ", ".join(p for src in sources for p in src.json_paths)  # type: ignore[union-attr]
            why = (f"--allow-missing dropped all {missing.examples}: none has features in the store" if missing
                   else "the files hold no records")
            raise InstructionDataError(f"no usable examples in {files}: {why}")

        src_arr = np.asarray(source_of, dtype=np.int32)
        store_arr = np.asarray(store_of, dtype=np.int32)
        sample_arr = np.asarray(sample_of, dtype=np.int64)
        offsets, members = _blocks(readers, src_arr, store_arr, sample_arr, text_block_size)
        reader_args = {"encoders": names, "fingerprints": fingerprints, "pool_to": pool_to}
        return cls(sources, store_urls, reader_args, storage_options, PackedStrings(ids), PackedStrings(convs),
                   src_arr, store_arr, sample_arr, offsets, members, shapes, missing, readers)

    # ---------------------------------------------------------------- access
    def __len__(self) -> int:
        return len(self.ids)

    @property
    def encoder_names(self) -> list[str]:
        return list(self.feature_shapes)

    @property
    def num_blocks(self) -> int:
        return len(self.block_offsets) - 1

    def example(self, i: int) -> Example:
        return Example(
            index=int(i),
            id=self.ids[int(i)],
            conversations=json.loads(self.conversations[int(i)]),
            source=int(self.source_of[i]),
            store=int(self.store_of[i]),
            sample=int(self.sample_of[i]),
        )

    def readers(self) -> list[FeatureReader]:
        """One FeatureReader per store, reopened in each process (DataLoader workers).

        Why reopen: fsspec / object-store clients and zarr's event loop do not survive a fork or a
        pickle reliably; opening costs one read of the sample table and the commit records.
        """
        if self._readers is None or self._pid != os.getpid():
            args = self.reader_args
            self._readers = [
                FeatureReader(url, args["encoders"], fingerprints=args["fingerprints"], pool_to=args["pool_to"],
                              storage_options=opts)
                for url, opts in zip(self.store_urls, self.storage_options)
            ]
            self._pid = os.getpid()
        return self._readers

    def read_features(
        self, examples: Sequence[int] | np.ndarray, dtype: torch.dtype = torch.float16,
        alloc: Callable[[dict[str, tuple[int, ...]], torch.dtype], dict[str, torch.Tensor]] | None = None,
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """({encoder: (b, t, h, w, d)}, has_visual (b,)) for a micro-batch of example indices.

        Rows of text-only examples are zeros (the model ignores them but runs the connector on the
        full batch). One `get_batch_indices` per store, each sample read once even if several
        examples share it; float16 features are decoded straight into the output tensors.
        `alloc({encoder: shape}, dtype)` allocates those (default: torch.empty each); a DataLoader
        worker passes its shared-memory pool (`merv.train.shared_buffers`), so the batch needs
        no copy to reach the trainer.
        """
        if self.feature_fn is not None:
            return self.feature_fn(self, examples, dtype)
        ex = np.asarray(examples, dtype=np.int64)
        stores = self.store_of[ex]
        has_visual = torch.from_numpy(stores >= 0)
        readers = self.readers()
        samples = self.sample_of[ex]
        feats = (alloc or _private_tensors)({name: (len(ex), *shape) for name, shape in self.feature_shapes.items()}, dtype)
        if (stores == stores[0]).all() and stores[0] >= 0 and len(np.unique(samples)) == len(samples):
            # the common micro-batch: one store, all visual, no repeats: decoded straight into `feats`
            _read_into(readers[int(stores[0])], samples.tolist(), feats)
            return feats, has_visual
        text_only = torch.from_numpy(np.nonzero(stores < 0)[0])
        for name in feats:
            feats[name][text_only] = 0
        for st in np.unique(stores[stores >= 0]):
            pos = np.nonzero(stores == st)[0]
            uniq, inverse = np.unique(self.sample_of[ex[pos]], return_inverse=True)
            arrays = readers[int(st)].get_batch_indices(uniq.tolist())
            pos_t = torch.from_numpy(pos)
            for name, arr in arrays.items():
                feats[name][pos_t] = torch.from_numpy(np.ascontiguousarray(arr[inverse])).to(dtype)
        return feats, has_visual

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_readers"] = None  # reopened in the receiving process
        return state


def _private_tensors(shapes: dict[str, tuple[int, ...]], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {name: torch.empty(shape, dtype=dtype) for name, shape in shapes.items()}


def _read_into(reader: FeatureReader, samples: list[int], feats: dict[str, torch.Tensor]) -> None:
    """Features of `samples` into `feats`: float16 ones decoded in place, other dtypes converted."""
    direct = {name: t.numpy() for name, t in feats.items() if t.dtype == torch.float16}
    arrays = reader.get_batch_indices(samples, out=direct)
    for name, t in feats.items():
        if name not in direct:
            t.copy_(torch.from_numpy(arrays[name]))


def _open_readers(
    urls: list[str],
    storage_options: list[dict[str, Any] | None],
    encoders: Sequence[str] | None,
    fingerprints: dict[str, str] | None,
    pool_to: tuple[int, int] | None,
) -> tuple[list[FeatureReader], list[str] | None, dict[str, tuple[int, int, int, int]]]:
    """Readers for every store with one encoder selection; checks their feature shapes agree."""
    readers: list[FeatureReader] = []
    names: list[str] | None = list(encoders) if encoders is not None else None
    shapes: dict[str, tuple[int, int, int, int]] = {}
    for url, opts in zip(urls, storage_options):
        store = FeatureStore.open(url, storage_options=opts)
        reader = FeatureReader(store, names, fingerprints=fingerprints, pool_to=pool_to)
        if names is None:
            names = list(reader.groups)  # the first store decides; every other store must hold them
        for name, group in reader.groups.items():
            t, h, w = group.spec.grid
            shape = (t, *(pool_to or (h, w)), group.spec.dim)
            if name in shapes and shapes[name] != shape:
                raise InstructionDataError(
                    f"encoder {name!r} has feature shape {shape} in {url!r} but {shapes[name]} in {urls[0]!r}; "
                    "use stores extracted with one configuration (same --grid), or pool both at load time "
                    "(pool_to=(h, w); `merv train` does so for the avg2d projector)"
                )
            shapes[name] = shape
        readers.append(reader)
    return readers, names, shapes


def _available_mask(reader: FeatureReader) -> np.ndarray:
    mask = np.zeros(len(reader.table), dtype=bool)
    mask[reader.available_indices()] = True
    return mask


def _blocks(
    readers: list[FeatureReader],
    source_of: np.ndarray,
    store_of: np.ndarray,
    sample_of: np.ndarray,
    text_block_size: int,
) -> tuple[np.ndarray, np.ndarray]:
    """CSR (offsets, members) of example indices per (store, kind, shard) / text chunk per source."""
    n = len(store_of)
    group = np.empty(n, dtype=np.int64)  # stores first, then text-only per source
    kind = np.zeros(n, dtype=np.int64)
    unit = np.zeros(n, dtype=np.int64)
    visual = store_of >= 0
    group[visual] = store_of[visual]
    for st, reader in enumerate(readers):
        sel = np.nonzero(store_of == st)[0]
        if len(sel) == 0:
            continue
        table = reader.table
        codes = table.kinds[sample_of[sel]].astype(np.int64)
        rows = table.rows[sample_of[sel]]
        per = np.array([reader.store.meta.samples_per_shard[k] for k in KINDS], dtype=np.int64)
        kind[sel] = codes
        unit[sel] = rows // per[codes]
    text = np.nonzero(~visual)[0]
    group[text] = len(readers) + source_of[text]
    for s in np.unique(source_of[text]):
        members = text[source_of[text] == s]
        unit[members] = np.arange(len(members)) // text_block_size
    order = np.lexsort((np.arange(n), unit, kind, group))
    keys = np.stack([group[order], kind[order], unit[order]], axis=1)
    starts = np.concatenate([[0], np.nonzero((np.diff(keys, axis=0) != 0).any(axis=1))[0] + 1])
    offsets = np.concatenate([starts, [n]]).astype(np.int64)
    return offsets, order.astype(np.int64)
