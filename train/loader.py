"""Streaming loader over cached features: deterministic order, rank slicing, prefetch, resume.

Epoch order (`epoch_sequence`): a pure function of (data, seed, epoch). The blocks of
`InstructionData` (one per store x kind x shard; text-only records in fixed-size chunks) of every
source are permuted together, so sources interleave deterministically; then the examples of each
window of `buffer_shards` consecutive blocks are shuffled (a deterministic shuffle buffer: more
shards per window = better mixing, each micro-batch touches at most that many shards).
Examples without features were dropped before, so they never enter the order.

Batches (`BatchLayout`): global batch k is positions [k*B, (k+1)*B) of the sequence; rank r of W
takes its contiguous slice (sizes differ by at most one, lower ranks larger) and splits it into
`accum` micro-batches the same way. The samples of global batch k therefore do not depend on the
world size. The last global batch may be partial (nothing skipped or repeated) unless
`drop_last`; a layout where some rank would get an empty micro-batch is refused up front.

Reading: each rank reads only its own micro-batches, with `FeatureReader.get_batch_indices`
(concurrent reads of contiguous row runs); reading whole shards per rank would multiply I/O by
the world size. With `num_workers` > 0 a torch DataLoader runs the reads and tokenisation in
workers (`prefetch_factor` micro-batches ahead per worker), overlapping them with compute.
Worker w of N produces micro-batches w, w+N, ... and the DataLoader's round-robin returns them in
order (checked on every batch). A worker decodes features straight into shared-memory buffers it
recycles once the trainer has dropped them (`merv.train.shared_buffers`), and keeps the heap it
frees: fresh memory per batch (a copy into a new segment, page faults) made 1 worker 0.3-0.7x
as fast as none.

Batch dict: `features` {encoder: (b, t, h, w, d)} (zero rows for text-only samples, so the
model always gets full-batch tensors), `has_visual` (b,) bool, `input_ids` / `attention_mask` /
`labels` (b, L) right-padded with `pad_id` / 0 / -100, `ids` (record ids), `index` (example
indices), `num_label_tokens` (labels != -100; the first token of a conversation is a prompt
token with label -100, so this equals the tokens the shifted loss counts), `epoch`, `micro_batch`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from merv import MervError

from .config import LoaderConfig
from .data import InstructionData
from .prompts import IGNORE_INDEX
from .shared_buffers import (
    SharedBufferPool,
    from_values,
    release_flags,
    release_when_freed,
    slots_per_worker,
    to_values,
)

WORKER_ERROR = "merv_worker_error"  # a batch key: a user error raised in a DataLoader worker
SHM_SLOT = "merv_shm_slot"  # a batch key: (worker, pool slot or None) of its feature tensors' buffer
SMALL_TENSORS = ("has_visual", "input_ids", "attention_mask", "labels", "index")  # sent by value from workers

TokenIds = Sequence[int] | torch.Tensor
Tokenize = Callable[[list[dict[str, str]]], tuple[TokenIds, TokenIds]]


# --------------------------------------------------------------------------- order and layout
def split_evenly(n: int, parts: int) -> np.ndarray:
    """Boundaries (parts + 1) of `parts` contiguous pieces of n; sizes differ by at most one."""
    sizes = np.full(parts, n // parts, dtype=np.int64)
    sizes[: n % parts] += 1
    return np.concatenate([[0], np.cumsum(sizes)])


def epoch_sequence(
    block_offsets: np.ndarray, block_members: np.ndarray, seed: int, epoch: int, buffer_shards: int
) -> np.ndarray:
    """The epoch's global example order: permute blocks, shuffle within windows of blocks."""
    if buffer_shards < 1:
        raise ValueError("buffer_shards must be >= 1")
    rng = np.random.default_rng([int(seed), int(epoch)])
    num_blocks = len(block_offsets) - 1
    perm = rng.permutation(num_blocks)
    out = []
    for w in range(0, num_blocks, buffer_shards):
        window = np.concatenate(
            [block_members[block_offsets[b] : block_offsets[b + 1]] for b in perm[w : w + buffer_shards]]
        )
        rng.shuffle(window)
        out.append(window)
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


@dataclass(frozen=True)
class BatchLayout:
    """How one epoch's sequence is cut into global batches, rank slices and micro-batches."""

    num_examples: int
    global_batch_size: int
    world_size: int = 1
    accum: int = 1
    drop_last: bool = False

    def __post_init__(self) -> None:
        if min(self.global_batch_size, self.world_size, self.accum) < 1:
            raise ValueError("global_batch_size, world_size and accum must be >= 1")
        if self.num_global_batches == 0:
            raise ValueError(
                f"{self.num_examples} examples make no full global batch of {self.global_batch_size} (drop_last=True)"
            )
        per_micro = self.world_size * self.accum
        sizes = {self.global_batch_size, self._size(self.num_global_batches - 1)}
        for size in sorted(sizes):
            if size < per_micro:
                last = " (the last, partial one)" if size != self.global_batch_size else ""
                raise ValueError(
                    f"a global batch of {size} samples{last} cannot give each of {self.world_size} ranks x "
                    f"{self.accum} micro-batches at least one sample: some rank would get an empty micro-batch. "
                    f"With {self.num_examples} examples, use a global batch / world size / accum that fits, "
                    "or drop_last=True to drop the partial batch."
                )

    @property
    def num_global_batches(self) -> int:
        if self.drop_last:
            return self.num_examples // self.global_batch_size
        return math.ceil(self.num_examples / self.global_batch_size)

    @property
    def micro_batches_per_rank(self) -> int:
        return self.num_global_batches * self.accum

    def _size(self, k: int) -> int:
        return min(self.global_batch_size, self.num_examples - k * self.global_batch_size)

    def global_batch(self, sequence: np.ndarray, k: int) -> np.ndarray:
        start = k * self.global_batch_size
        return sequence[start : start + self._size(k)]

    def micro_batches(self, sequence: np.ndarray, rank: int) -> list[np.ndarray]:
        """Rank `rank`'s micro-batches of the epoch, in order (global batch, then accumulation step)."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside world size {self.world_size}")
        out = []
        for k in range(self.num_global_batches):
            batch = self.global_batch(sequence, k)
            bounds = split_evenly(len(batch), self.world_size)
            mine = batch[bounds[rank] : bounds[rank + 1]]
            inner = split_evenly(len(mine), self.accum)
            out += [mine[inner[a] : inner[a + 1]] for a in range(self.accum)]
        return out


# --------------------------------------------------------------------------- batches
def pad_batch(
    seqs: Sequence[tuple[torch.Tensor, torch.Tensor]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad (input_ids, labels) pairs to (input_ids, attention_mask, labels), each (B, L).

    Pads are `pad_id` / 0 / -100. One routine for training batches and for anything else that
    must see sequences exactly as training does (e.g. `MervModel.option_loglikelihoods`).
    """
    b, length = len(seqs), max(len(x) for x, _ in seqs)
    input_ids = torch.full((b, length), pad_id, dtype=torch.long)
    labels = torch.full((b, length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((b, length), dtype=torch.long)
    for j, (x, y) in enumerate(seqs):
        input_ids[j, : len(x)] = x
        labels[j, : len(y)] = y
        mask[j, : len(x)] = 1
    return input_ids, mask, labels


def collate(
    data: InstructionData,
    examples: np.ndarray,
    tokenize: Tokenize,
    *,
    max_length: int | None = None,
    pad_id: int = 0,
    feature_dtype: torch.dtype = torch.float16,
    alloc: Callable[[dict[str, tuple[int, ...]], torch.dtype], dict[str, torch.Tensor]] | None = None,
) -> dict[str, Any]:
    """Tokenise (lazily, here) and read features for one micro-batch of example indices.

    `alloc` allocates the feature tensors (see `InstructionData.read_features`)."""
    seqs: list[tuple[torch.Tensor, torch.Tensor]] = []
    ids: list[str] = []
    for i in examples:
        ex = data.example(int(i))
        input_ids, labels = tokenize(ex.conversations)
        input_ids = torch.as_tensor(input_ids, dtype=torch.long).flatten()
        labels = torch.as_tensor(labels, dtype=torch.long).flatten()
        if input_ids.shape != labels.shape or input_ids.numel() == 0:
            raise ValueError(
                f"tokenize gave {input_ids.numel()} input ids and {labels.numel()} labels for example {ex.id!r}; "
                "they must be equal and non-zero"
            )
        if max_length is not None:
            input_ids, labels = input_ids[:max_length], labels[:max_length]
        seqs.append((input_ids, labels))
        ids.append(ex.id)
    input_ids, mask, labels = pad_batch(seqs, pad_id)
    features, has_visual = data.read_features(examples, feature_dtype, alloc=alloc)
    return {
        "features": features,
        "has_visual": has_visual,
        "input_ids": input_ids,
        "attention_mask": mask,
        "labels": labels,
        "ids": ids,
        "index": torch.from_numpy(np.asarray(examples, dtype=np.int64)),
        "num_label_tokens": int((labels != IGNORE_INDEX).sum()),
    }


class MicroBatchStream(IterableDataset):
    """One rank's micro-batches of one epoch from micro-batch `start` on; split across workers.

    In a worker, a batch's feature tensors are views of one buffer of a recycled shared-memory
    pool (`release` holds the trainer's release flags, one row per worker); the batch names the
    buffer's slot under SHM_SLOT and carries its small tensors by value; `StreamingLoader` arms
    the release and restores the tensors."""

    def __init__(self, loader: "StreamingLoader", epoch: int, start: int, release: torch.Tensor | None = None) -> None:
        self.data = loader.data
        self.layout = loader.layout
        self.rank = loader.rank
        self.seed = loader.seed
        self.buffer_shards = loader.buffer_shards
        self.tokenize = loader.tokenize
        self.max_length = loader.max_length
        self.pad_id = loader.pad_id
        self.feature_dtype = loader.feature_dtype
        self.epoch = epoch
        self.start = start
        self.release = release

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        pool = SharedBufferPool(self.release[worker]) if info is not None and self.release is not None else None
        seq = epoch_sequence(self.data.block_offsets, self.data.block_members, self.seed, self.epoch, self.buffer_shards)
        micro = self.layout.micro_batches(seq, self.rank)
        for m in range(self.start + worker, len(micro), workers):
            try:
                batch = collate(self.data, micro[m], self.tokenize, max_length=self.max_length, pad_id=self.pad_id,
                                feature_dtype=self.feature_dtype, alloc=pool.tensors if pool is not None else None)
            except MervError as exc:
                if info is None:
                    raise
                # torch would re-raise it as type(exc)(its traceback text): hand it over whole instead
                yield {WORKER_ERROR: (type(exc), str(exc))}
                return
            batch["epoch"], batch["micro_batch"] = self.epoch, m
            if pool is not None:
                batch[SHM_SLOT] = (worker, pool.slot_of(batch["features"]))
                to_values(batch, SMALL_TENSORS)
            yield batch


def _rebuilt(cls: type[MervError], message: str) -> MervError:
    """A worker's user error, of its own class when that class takes just a message."""
    try:
        return cls(message)
    except TypeError:
        return MervError(f"{cls.__name__}: {message}")


# --------------------------------------------------------------------------- metrics
class DataWaitMeter:
    """Time the training loop spent blocked on the loader, per optimizer step.

    The loader adds the time each `next()` blocked; call `step()` once per optimizer step to get
    {"data_wait_s", "step_s", "data_wait_frac"} for that step (step time = since the last call).
    """

    def __init__(self) -> None:
        self.wait_s = 0.0
        self.last_wait_s = 0.0
        self.total_wait_s = 0.0
        self._step_start = time.perf_counter()

    def add(self, seconds: float) -> None:
        self.wait_s += seconds
        self.total_wait_s += seconds
        self.last_wait_s = seconds

    def step(self) -> dict[str, float]:
        now = time.perf_counter()
        step_s = now - self._step_start
        out = {"data_wait_s": self.wait_s, "step_s": step_s, "data_wait_frac": self.wait_s / step_s if step_s > 0 else 0.0}
        self.wait_s = 0.0
        self._step_start = now
        return out


# --------------------------------------------------------------------------- the loader
class StreamingLoader:
    """Iterate one rank's micro-batches; each `for batch in loader` runs the rest of the current epoch.

    Leaving the loop early keeps the position: the next iteration (or a loader restored with
    `load_state_dict`) continues with exactly the next micro-batch. After a full epoch the loader
    moves to the next epoch. `rank` / `world_size` default to torch.distributed's when initialised.
    A fresh DataLoader (and workers) is made per iteration so the epoch and start reach the workers.
    `tokenize` must be picklable when workers are started with spawn / forkserver.
    """

    def __init__(
        self,
        data: InstructionData,
        tokenize: Tokenize,
        *,
        global_batch_size: int,
        rank: int | None = None,
        world_size: int | None = None,
        accum: int = 1,
        seed: int = 0,
        buffer_shards: int = LoaderConfig.buffer_shards,
        max_length: int | None = None,
        pad_id: int = 0,
        num_workers: int = LoaderConfig.num_workers,
        prefetch_factor: int = LoaderConfig.prefetch_factor,
        pin_memory: bool = False,
        drop_last: bool = False,
        feature_dtype: torch.dtype = torch.float16,
        multiprocessing_context: str | None = None,
    ) -> None:
        if rank is None or world_size is None:
            dist = torch.distributed.is_available() and torch.distributed.is_initialized()
            rank = rank if rank is not None else (torch.distributed.get_rank() if dist else 0)
            world_size = world_size if world_size is not None else (torch.distributed.get_world_size() if dist else 1)
        if max_length is not None and max_length < 1:
            raise ValueError("max_length must be >= 1")
        self.data = data
        self.tokenize = tokenize
        self.layout = BatchLayout(len(data), global_batch_size, world_size, accum, drop_last)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.rank = rank
        self.seed = seed
        self.buffer_shards = buffer_shards
        self.max_length = max_length
        self.pad_id = pad_id
        self.num_workers = num_workers
        self.prefetch_factor = prefetch_factor
        self.pin_memory = pin_memory
        self.feature_dtype = feature_dtype
        self.multiprocessing_context = multiprocessing_context
        self.epoch = 0
        self.consumed = 0  # micro-batches of `epoch` handed to the caller
        self.meter = DataWaitMeter()
        self._seq_cache: tuple[int, np.ndarray] | None = None

    # ---------------------------------------------------------------- plan (no I/O)
    def __len__(self) -> int:
        """Micro-batches per epoch for this rank (the same on every rank)."""
        return self.layout.micro_batches_per_rank

    @property
    def steps_per_epoch(self) -> int:
        return self.layout.num_global_batches

    def sequence(self, epoch: int | None = None) -> np.ndarray:
        epoch = self.epoch if epoch is None else epoch
        if self._seq_cache is None or self._seq_cache[0] != epoch:
            d = self.data
            self._seq_cache = (epoch, epoch_sequence(d.block_offsets, d.block_members, self.seed, epoch, self.buffer_shards))
        return self._seq_cache[1]

    def global_batch_ids(self, epoch: int | None = None) -> list[list[str]]:
        """Record ids of every global batch of an epoch (identical for every world size)."""
        seq = self.sequence(epoch)
        return [[self.data.ids[int(i)] for i in self.layout.global_batch(seq, k)] for k in range(self.layout.num_global_batches)]

    def micro_batch_ids(self, epoch: int | None = None) -> list[list[str]]:
        """Record ids of this rank's micro-batches of an epoch, in the order they are yielded."""
        return [[self.data.ids[int(i)] for i in mb] for mb in self.layout.micro_batches(self.sequence(epoch), self.rank)]

    # ---------------------------------------------------------------- iteration
    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` from its first micro-batch."""
        self.epoch, self.consumed = int(epoch), 0

    def _stream(self, release: torch.Tensor | None) -> Iterator[dict[str, Any]]:
        dataset = MicroBatchStream(self, self.epoch, self.consumed, release)
        if self.num_workers == 0:
            return iter(dataset)
        return iter(
            DataLoader(
                dataset,
                batch_size=None,
                num_workers=self.num_workers,
                prefetch_factor=self.prefetch_factor,
                pin_memory=self.pin_memory,
                multiprocessing_context=self.multiprocessing_context,
                worker_init_fn=_init_worker,
                collate_fn=_as_is,
            )
        )

    def _release_flags(self) -> torch.Tensor | None:
        """The shared flags by which this process lets workers recycle feature buffers (`shared_buffers`)."""
        if self.num_workers == 0:
            return None
        return release_flags(self.num_workers, slots_per_worker(self.prefetch_factor))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        total = len(self)
        if self.consumed >= total:
            self.set_epoch(self.epoch + 1)
        epoch = self.epoch
        release = self._release_flags()
        it = self._stream(release)
        while True:
            t0 = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                break
            self.meter.add(time.perf_counter() - t0)
            if WORKER_ERROR in batch:
                raise _rebuilt(*batch[WORKER_ERROR])
            if SHM_SLOT in batch:
                worker, slot = batch.pop(SHM_SLOT)
                if slot is not None:
                    release_when_freed(batch["features"], slot, release[worker])  # type: ignore[index]
                from_values(batch)
            if batch["micro_batch"] != self.consumed or batch["epoch"] != epoch:
                raise RuntimeError(
                    f"loader out of order: got micro-batch {batch['micro_batch']} of epoch {batch['epoch']}, "
                    f"expected {self.consumed} of epoch {epoch}"
                )
            self.consumed += 1
            yield batch
        if self.consumed >= total:
            self.set_epoch(epoch + 1)

    # ---------------------------------------------------------------- resume
    def state_dict(self) -> dict[str, Any]:
        """Position (epoch, micro-batches consumed) plus what must match for the order to be the same."""
        return {
            "epoch": self.epoch,
            "micro_batches": self.consumed,
            "seed": self.seed,
            "buffer_shards": self.buffer_shards,
            "num_examples": len(self.data),
            "global_batch_size": self.layout.global_batch_size,
            "world_size": self.layout.world_size,
            "accum": self.layout.accum,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved position; also across world size / accum changes at a step boundary."""
        for key, mine in (("seed", self.seed), ("buffer_shards", self.buffer_shards),
                          ("num_examples", len(self.data)), ("global_batch_size", self.layout.global_batch_size)):
            if state[key] != mine:
                raise ValueError(
                    f"loader state has {key}={state[key]} but this loader has {mine}: the epoch order would differ, "
                    "so the run cannot resume exactly"
                )
        consumed = int(state["micro_batches"])
        if (state["world_size"], state["accum"]) != (self.layout.world_size, self.layout.accum):
            if consumed % state["accum"]:
                raise ValueError(
                    f"cannot change world size / accum mid-step (state consumed {consumed} micro-batches, accum "
                    f"{state['accum']}); resume with world_size={state['world_size']}, accum={state['accum']}"
                )
            consumed = consumed // state["accum"] * self.layout.accum  # same number of global batches done
        self.epoch, self.consumed = int(state["epoch"]), consumed


def _as_is(batch: dict[str, Any]) -> dict[str, Any]:
    """The DataLoader's collate step: batches are complete already (and torch's default would
    turn the arrays sent by value back into tensors, i.e. into shared-memory segments)."""
    return batch


def _init_worker(_worker_id: int) -> None:
    _ignore_interrupts()
    _keep_freed_memory()


def _ignore_interrupts() -> None:
    """DataLoader workers leave Ctrl-C to the trainer: a terminal's SIGINT reaches the whole
    process group, and a worker killed by it would turn a graceful stop at the next step
    boundary into a crash. The trainer ends its workers itself when it stops."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters


def _keep_freed_memory() -> None:
    """Let a worker's heap keep the buffers it frees (glibc; elsewhere nothing is done).

    Each read fetches chunk bytes into fresh buffers of a few MB; in a forked worker glibc handed
    them back to the kernel after each batch and the next batch faulted them in again page by page
    (measured ~9,000 page faults per 58 MB batch, ~25 ms on the 2-core VM; none with this). A
    worker's peak heap is a few batches, so keeping it costs little."""
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, TypeError):  # no C library by that name, or no mallopt in it
        return
    mallopt(M_MMAP_THRESHOLD, 64 << 20)
    mallopt(M_TRIM_THRESHOLD, 256 << 20)
