"""Recycled shared memory for the batches a DataLoader worker hands to the trainer process.

Why. torch passes a worker's tensor to the trainer through shared memory: a private tensor is
first copied into a new segment, and even a tensor allocated there is fresh memory, paid for with
one page fault per 4 KiB on first touch. On the 2-core dev VM a 58 MB micro-batch (four paper
encoders, 8 samples) spent ~75 ms in that, more than reading and decoding it (~40 ms): the
1-worker loader ran at 0.3-0.7x the in-process one (benchmarks/loader_bench.py). Every segment
also costs a file descriptor passed over a socket (~0.7 ms per tensor per batch, measured).

How. A worker allocates all feature tensors of a batch as views of one buffer taken from a pool
of segments it made before (`SharedBufferPool.tensors`); the batch names the buffer's slot. The
trainer process, on receiving the batch, arms a finalizer on that buffer's storage
(`release_when_freed`) that sets the slot's byte in a shared flag array once the last tensor or
view using it is gone; the worker reuses a slot only after that, never before. A trainer that
keeps batches costs only memory: the pool grows to its capacity, then the worker allocates
unpooled buffers. The small tensors of a batch (token ids, masks) travel by value instead
(`to_values` / `from_values`): a segment and a descriptor each cost more than their bytes.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

ALIGN = 64  # bytes: each view of a batch buffer starts on a cache line
BY_VALUE = "merv_by_value"  # a batch key: the keys whose small tensors travel as numpy arrays


def release_flags(workers: int, capacity: int) -> torch.Tensor:
    """The (workers, capacity) uint8 flags shared by the trainer process and its workers: made in
    the trainer before the workers start, one row per worker."""
    return torch.zeros((workers, capacity), dtype=torch.uint8).share_memory_()


def slots_per_worker(prefetch_factor: int) -> int:
    """Pool capacity in batches: those queued ahead, the one being built and a few the trainer holds."""
    return prefetch_factor + 4


def _layout(shapes: Mapping[str, Sequence[int]], dtype: torch.dtype) -> tuple[dict[str, int], int, int]:
    """({name: element offset}, total bytes, item size) of one buffer holding every tensor."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    offsets, nbytes = {}, 0
    for name, shape in shapes.items():
        nbytes = -(-nbytes // ALIGN) * ALIGN
        offsets[name] = nbytes // itemsize
        nbytes += int(np.prod(shape)) * itemsize
    return offsets, max(nbytes, 1), itemsize


def _views(storage: torch.UntypedStorage, shapes: Mapping[str, Sequence[int]], offsets: Mapping[str, int],
           dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {name: torch.empty(0, dtype=dtype).set_(storage, offsets[name], tuple(shape)) for name, shape in shapes.items()}


def shared_tensors(shapes: Mapping[str, Sequence[int]], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Uninitialised tensors, views of one buffer allocated in shared memory (not moved: no copy)."""
    offsets, nbytes, _ = _layout(shapes, dtype)
    return _views(torch.UntypedStorage._new_shared(nbytes), shapes, offsets, dtype)


class SharedBufferPool:
    """One worker's recycled batch buffers (see the module docstring)."""

    def __init__(self, flags: torch.Tensor) -> None:
        self.flags = flags.numpy()  # this worker's row: 1 = the trainer let go of the slot
        self.storages: list[torch.UntypedStorage] = []
        self.free: dict[int, list[int]] = {}  # nbytes -> free slots
        self.busy: dict[int, int] = {}  # slot -> nbytes, handed out and not yet released
        self.slot_at: dict[int, int] = {}  # storage data pointer -> slot

    def tensors(self, shapes: Mapping[str, Sequence[int]], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Uninitialised tensors of one batch, views of one shared buffer (a released one if any)."""
        offsets, nbytes, _ = _layout(shapes, dtype)
        self._collect()
        stack = self.free.get(nbytes)
        if stack:
            slot = stack.pop()
        elif len(self.storages) < len(self.flags):
            slot = len(self.storages)
            self.storages.append(torch.UntypedStorage._new_shared(nbytes))
            self.slot_at[self.storages[slot].data_ptr()] = slot
        else:  # the trainer holds every pooled buffer: an unpooled one, as torch would make
            return shared_tensors(shapes, dtype)
        self.busy[slot] = nbytes
        return _views(self.storages[slot], shapes, offsets, dtype)

    def slot_of(self, tensors: Mapping[str, torch.Tensor]) -> int | None:
        """The slot of the pooled buffer behind `tensors` (to travel with the batch), if any."""
        ptrs = {t.untyped_storage().data_ptr() for t in tensors.values()}
        slot = self.slot_at.get(ptrs.pop()) if len(ptrs) == 1 else None
        return slot if slot in self.busy else None

    def _collect(self) -> None:
        for slot in [s for s in self.busy if self.flags[s]]:
            self.flags[slot] = 0
            self.free.setdefault(self.busy.pop(slot), []).append(slot)


def release_when_freed(tensors: Mapping[str, torch.Tensor], slot: int, flags: torch.Tensor) -> None:
    """In the trainer process: flag `slot` once the buffer behind `tensors` is gone (views included)."""
    storage = next(iter(tensors.values())).untyped_storage()
    weakref.finalize(storage, _release, flags.numpy(), slot).atexit = False


def _release(row: np.ndarray, slot: int) -> None:
    row[slot] = 1


def to_values(batch: dict[str, Any], keys: Sequence[str]) -> None:
    """In a worker: send the small tensors under `keys` by value (numpy arrays are pickled whole)."""
    batch[BY_VALUE] = [k for k in keys if isinstance(batch.get(k), torch.Tensor)]
    for k in batch[BY_VALUE]:
        batch[k] = batch[k].numpy()


def from_values(batch: dict[str, Any]) -> None:
    """In the trainer process: the tensors `to_values` sent as arrays, back as tensors."""
    for k in batch.pop(BY_VALUE, ()):
        batch[k] = torch.from_numpy(batch[k])
