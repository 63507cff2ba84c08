"""Resumable training checkpoints: sharded, pickle-free, checksummed, verified before use.

Layout of `<run>/checkpoints/step-00000012/`:
  dcp/shard-<i>-model-00001-of-00001.safetensors
                        model + optimizer tensors (LoRA runs: the trainable parameters only, since
                        the frozen base is rebuilt from the config); each rank writes the shards it owns
                        (torch.distributed.checkpoint through torch's HuggingFaceStorageWriter:
                        safetensors files whose JSON header holds the DCP offsets)
  rng/rank-<r>.safetensors
                        each rank's torch RNG states
  trainer_state.json    step, scheduler, loader position, the optimizer's non-tensor state
                        (param groups, step counters), the resolved run config (config.yaml's
                        keys plus what they came to, `derived.*`), the global shape of every
                        tensor, the history of accepted config changes
  manifest.json         written last, by rank 0, once every rank finished: every other file with
                        its size and sha256
`<run>/checkpoints/latest` names the newest complete checkpoint; it is replaced atomically after the
manifest, so a run killed mid-save resumes from the previous one.

Why no pickle: a run directory may come from elsewhere (a shared disk, a download, a colleague),
and unpickling a file runs any code it names. torch's default DCP storage keeps its `.metadata` as a
pickle and reads it with `pickle.load`; here every file is JSON or safetensors, read by parsers that
cannot execute code. The DCP load is pinned to tensors only (`_TensorOnlyPlanner`), so DCP's
`torch.load(weights_only=False)` path for non-tensor entries can never run, and `_SafetensorsReader`
never falls back to a rank-local `.metadata` pickle. Resume verifies the manifest first: a file that
is missing, truncated, modified, not listed (a planted `.metadata`), or a symbolic link is refused
with its name. Checkpoints of older merv versions (pickled `.metadata`) are refused, not unpickled.
"""

from __future__ import annotations

import fnmatch
import hashlib
import io
import json
import os
import re
import shutil
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.tensor import DTensor

from merv import MervError

from .distributed import DistEnv

STATE_FILE = "trainer_state.json"
MANIFEST = "manifest.json"
LATEST = "latest"
DCP_DIR = "dcp"
RNG_DIR = "rng"
FORMAT = "merv-checkpoint"
VERSION = 1
STEP_DIR = re.compile(r"step-(\d{8})")
_HASH_CHUNK = 8 << 20
_MAX_SMALL_FILE = 1 << 20  # `latest` and manifest.json are tiny; refuse to slurp something else


class CheckpointError(MervError):
    """A checkpoint cannot be used; the message names the directory or file and the fix."""


class CheckpointIntegrityError(CheckpointError):
    """A checkpoint file is missing, damaged, unexpected, unreadable, or of an unsafe old format."""


class ResumeError(CheckpointError):
    """`--resume` cannot continue the run (nothing usable, or another configuration)."""


# ----------------------------------------------------------------------------- small file helpers


def _fsync_write(path: Path, data: bytes) -> None:
    """Write, flush and fsync: the manifest vouches for these bytes, so they must reach the disk."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _atomic_write(path: Path, data: bytes) -> None:
    """Readers see the old or the new content, never a torn file."""
    tmp = path.with_name(f".{path.name}.tmp")
    _fsync_write(tmp, data)
    os.replace(tmp, path)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _file_entry(path: Path) -> dict[str, Any]:
    return {"bytes": path.stat().st_size, "sha256": _sha256(path)}


def _read_small(path: Path) -> str:
    """A small text file (pointer, manifest); a binary / huge / non-UTF-8 one raises ValueError."""
    if path.stat().st_size > _MAX_SMALL_FILE:
        raise ValueError(f"larger than {_MAX_SMALL_FILE} bytes")
    return path.read_bytes().decode("utf-8")


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


# ----------------------------------------------------------------------------- collectives, no pickle


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _multi(env: DistEnv) -> bool:
    return env.world_size > 1 and dist.is_initialized()


def _broadcast_text(text: str, env: DistEnv) -> str:
    """Rank 0's text on every rank, sent as UTF-8 bytes in tensors (not a pickled object)."""
    if not _multi(env):
        return text
    data = text.encode("utf-8") if env.is_main else b""
    n = torch.tensor([len(data)], dtype=torch.int64, device=env.device)
    dist.broadcast(n, 0)
    buf = (torch.tensor(list(data), dtype=torch.uint8, device=env.device) if env.is_main
           else torch.empty(int(n.item()), dtype=torch.uint8, device=env.device))
    dist.broadcast(buf, 0)
    return bytes(buf.cpu().tolist()).decode("utf-8")


def _all_gather_text(text: str, env: DistEnv) -> list[str]:
    """Every rank's text, in rank order (UTF-8 bytes in tensors, padded to the longest)."""
    if not _multi(env):
        return [text]
    data = text.encode("utf-8")
    n = torch.tensor([len(data)], dtype=torch.int64, device=env.device)
    sizes = [torch.zeros_like(n) for _ in range(env.world_size)]
    dist.all_gather(sizes, n)
    longest = max(int(s.item()) for s in sizes)
    buf = torch.zeros(longest, dtype=torch.uint8, device=env.device)
    buf[: len(data)] = torch.tensor(list(data), dtype=torch.uint8)
    out = [torch.zeros_like(buf) for _ in range(env.world_size)]
    dist.all_gather(out, buf)
    return [bytes(o[: int(s.item())].cpu().tolist()).decode("utf-8") for o, s in zip(out, sizes)]


def _all_reduce_max(values: list[int], env: DistEnv) -> list[int]:
    if not _multi(env) or not values:
        return values
    t = torch.tensor(values, dtype=torch.int64, device=env.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [int(v) for v in t.cpu().tolist()]


# ----------------------------------------------------------------------------- state <-> tensors + JSON


def _flatten_state(tree: Any, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, Any]]:
    """Leaves of a state dict keyed "model/<fqn>", "optim/state/<fqn>/exp_avg", ...

    Dicts are entered; a list is entered when it holds dicts or tensors (param_groups); other lists
    and tuples (`params`, `betas`) are leaves. FQNs never contain "/", so keys are unambiguous."""
    if isinstance(tree, Mapping):
        for k, v in tree.items():
            yield from _flatten_state(v, (*prefix, str(k)))
    elif isinstance(tree, list) and any(isinstance(v, (Mapping, torch.Tensor)) for v in tree):
        for i, v in enumerate(tree):
            yield from _flatten_state(v, (*prefix, str(i)))
    else:
        yield "/".join(prefix), tree


def _rebuild(tree: Any, values: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> Any:
    """`tree` with each leaf replaced by `values[key]` (the inverse of `_flatten_state`)."""
    if isinstance(tree, Mapping):
        return {k: _rebuild(v, values, (*prefix, str(k))) for k, v in tree.items()}
    if isinstance(tree, list) and any(isinstance(v, (Mapping, torch.Tensor)) for v in tree):
        return [_rebuild(v, values, (*prefix, str(i))) for i, v in enumerate(tree)]
    return values["/".join(prefix)]


def _is_dcp_tensor(value: Any) -> bool:
    """Sharded or non-scalar tensors go through DCP; scalar counters (AdamW `step`) into JSON."""
    return isinstance(value, DTensor) or (isinstance(value, torch.Tensor) and value.dim() > 0)


def _json_leaf(value: Any) -> Any:
    if isinstance(value, torch.Tensor):  # a scalar (not a DTensor: those go through DCP)
        return {"tensor": value.item(), "dtype": str(value.dtype).removeprefix("torch.")}
    if isinstance(value, tuple):
        return list(value)
    return value


def _leaf_from_json(saved: Any, like: Any, key: str, state_file: Path) -> Any:
    """A JSON value converted to the type of the live leaf `like` (tensor, tuple, plain)."""
    if isinstance(like, torch.Tensor):
        dtype = getattr(torch, str(saved.get("dtype", "")) if isinstance(saved, dict) else "", None)
        if not isinstance(dtype, torch.dtype) or "tensor" not in saved:
            raise CheckpointIntegrityError(f"{state_file}: optimizer entry {key!r} is not a tensor value; the file "
                                           "is damaged or was not written by merv")
        try:
            return torch.tensor(saved["tensor"], dtype=dtype, device=like.device)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise CheckpointIntegrityError(
                f"{state_file}: optimizer entry {key!r} is not a number ({_one_line(exc)})") from exc
    if isinstance(like, tuple) and isinstance(saved, list):
        return tuple(saved)
    return saved


def split_state(tree: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors for DCP, JSON-ready non-tensor leaves) of a nested state dict."""
    tensors: dict[str, torch.Tensor] = {}
    plain: dict[str, Any] = {}
    for key, value in _flatten_state(tree):
        if _is_dcp_tensor(value):
            tensors[key] = value
        else:
            plain[key] = _json_leaf(value)
    return tensors, plain


def tied_aliases(model: torch.nn.Module) -> dict[str, str]:
    """{alias: first name} of parameters registered under several names (tied embeddings: Qwen2.5
    0.5B / 1.5B's `lm_head.weight` is `embed_tokens.weight`). A checkpoint stores each tensor once
    (safetensors refuses tensors that share memory); a resume hands the alias the loaded tensor."""
    first: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        aliases.update({name: first[id(param)]} if id(param) in first else {})
        first.setdefault(id(param), name)
    return aliases


def _without(state: Mapping[str, Any], aliases: Mapping[str, str]) -> dict[str, Any]:
    return {k: v for k, v in state.items() if k not in aliases}


def _tensor_table(tensors: Mapping[str, torch.Tensor]) -> dict[str, list[Any]]:
    """Global shape and dtype of every tensor (a DTensor reports its global shape)."""
    return {k: [list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in tensors.items()}


class _RecordingWriter(HuggingFaceStorageWriter):
    """Every rank writes its own safetensors shard; remembers which files, for the manifest."""

    def __init__(self, path: str) -> None:
        super().__init__(path, save_distributed=True)
        self.written: list[str] = []

    def write_data(self, plan: Any, planner: Any) -> Any:
        fut = super().write_data(plan, planner)
        self.written = sorted({wr.storage_data.relative_path for wr in fut.wait()})
        return fut


class _SafetensorsReader(HuggingFaceStorageReader):
    """torch's safetensors reader; `read_metadata` takes no `rank` argument on purpose.

    DCP retries a failed `read_metadata` with `rank=` (reading `__<rank>.metadata` with
    `pickle.load`) only when the method accepts keyword arguments; this signature rules that out."""

    def read_metadata(self) -> Any:
        return super().read_metadata()


class _TensorOnlyPlanner(DefaultLoadPlanner):
    """DCP's planner without its `torch.load(weights_only=False)` path for non-tensor entries."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        raise CheckpointIntegrityError(f"checkpoint entry {read_item.dest_index.fqn!r} is a byte blob, not a tensor; "
                                       "merv checkpoints hold tensors only, so it is refused (it would be unpickled)")


# ----------------------------------------------------------------------------- RNG


def _rng_state() -> dict[str, torch.Tensor]:
    out = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        out.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return out


def _set_rng_state(state: dict[str, torch.Tensor], path: Path) -> None:
    if "cpu" not in state or state["cpu"].dtype != torch.uint8:
        raise CheckpointIntegrityError(f"{path}: no uint8 'cpu' RNG state; the file is damaged or not merv's")
    try:
        torch.set_rng_state(state["cpu"])
        cuda = [state[k] for k in sorted(k for k in state if k.startswith("cuda"))]
        if cuda and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda)
    except RuntimeError as exc:
        raise CheckpointIntegrityError(f"{path}: not a valid RNG state ({_one_line(exc)})") from exc


def _rng_file(path: Path, rank: int) -> Path:
    return path / RNG_DIR / f"rank-{rank:05d}.safetensors"


# ----------------------------------------------------------------------------- save


def checkpoint_dir(root: str | os.PathLike[str], step: int) -> Path:
    return Path(root) / f"step-{step:08d}"


def _trainable_state(model: torch.nn.Module, model_sd: dict[str, Any]) -> dict[str, Any]:
    """The entries of the parameters that train (what a `trainable_only` checkpoint holds)."""
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in model_sd.items() if k in names}


def save_checkpoint(root: str | os.PathLike[str], step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    trainer_state: dict[str, Any], env: DistEnv, *, trainable_only: bool = False) -> Path:
    """Collective: every rank writes its shards + RNG; rank 0 the state, the manifest, then `latest`.

    `trainable_only` (LoRA runs): only the parameters that train are saved; the frozen rest is a
    function of the run's configuration (seed, LLM source), rebuilt by the resuming run."""
    path = checkpoint_dir(root, step)
    if env.is_main and path.exists():  # a redone step: never leave old files next to new ones
        shutil.rmtree(path)
    _barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    if trainable_only:
        model_sd = _trainable_state(model, model_sd)
    tensors, plain = split_state({"model": _without(model_sd, tied_aliases(model)), "optim": optim_sd})
    writer = _RecordingWriter(str(path / DCP_DIR))
    dcp.save(tensors, storage_writer=writer)
    rng = _rng_file(path, env.rank)
    rng.parent.mkdir(parents=True, exist_ok=True)
    save_file(_rng_state(), str(rng))
    mine = {f"{DCP_DIR}/{name}": _file_entry(path / DCP_DIR / name) for name in writer.written}
    mine[rng.relative_to(path).as_posix()] = _file_entry(rng)
    parts = _all_gather_text(json.dumps(mine), env)  # returns once every rank has written its files
    if env.is_main:
        state = {"format": FORMAT, "version": VERSION, "step": step, **trainer_state,
                 "optimizer_plain": plain, "tensors": _tensor_table(tensors)}
        _fsync_write(path / STATE_FILE, json.dumps(state, indent=1).encode())
        files = {k: v for part in parts for k, v in json.loads(part).items()}
        files[STATE_FILE] = _file_entry(path / STATE_FILE)
        manifest = {"format": FORMAT, "version": VERSION, "step": step, "world_size": env.world_size,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "files": dict(sorted(files.items()))}
        _atomic_write(path / MANIFEST, json.dumps(manifest, indent=1).encode())
        _atomic_write(Path(root) / LATEST, path.name.encode())
    _barrier()
    return path


# ----------------------------------------------------------------------------- verify


def _walk_files(path: Path) -> Iterator[tuple[str, Path]]:
    """(relative posix name, path) of everything under `path`, symbolic links included as files."""
    for dirpath, dirnames, filenames in os.walk(path):
        base = Path(dirpath)
        for name in [*filenames, *(d for d in dirnames if (base / d).is_symlink())]:
            yield (base / name).relative_to(path).as_posix(), base / name


def _legacy_problem(path: Path) -> str | None:
    names = {p.name for p in path.iterdir()} if path.is_dir() else set()
    if ".metadata" in names or any(n.endswith(".distcp") for n in names):
        return (f"{path} was written by an older merv with torch's default checkpoint storage, whose .metadata file is "
                "a pickle; it is not loaded because unpickling a file can run arbitrary code. Start a new run (or "
                "--init-from an export); a checkpoint you made yourself can be converted in a trusted environment "
                "with torch.distributed.checkpoint.format_utils")
    return None


def _manifest_files(path: Path) -> dict[str, dict[str, Any]]:
    """The manifest's file table after structural checks (no hashing); raises CheckpointIntegrityError."""
    manifest = path / MANIFEST
    if not manifest.exists():
        legacy = _legacy_problem(path)
        raise CheckpointIntegrityError(legacy or f"{path} is incomplete (no {MANIFEST}: its save did not finish)")
    if manifest.is_symlink():
        raise CheckpointIntegrityError(f"{manifest} is a symbolic link; a checkpoint holds plain files only")
    try:
        doc = json.loads(_read_small(manifest))
        files = doc["files"]
        ok = doc.get("format") == FORMAT and isinstance(files, dict) and all(
            isinstance(e, dict) and isinstance(e.get("bytes"), int) and isinstance(e.get("sha256"), str)
            for e in files.values())
    except (ValueError, KeyError, TypeError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise CheckpointIntegrityError(f"{manifest} is not a merv checkpoint manifest ({_one_line(exc)}); the "
                                       "checkpoint is damaged or was not written by merv") from exc
    if not ok:
        raise CheckpointIntegrityError(f"{manifest} is not a merv checkpoint manifest (format {doc.get('format')!r})")
    if doc.get("version") != VERSION:
        raise CheckpointIntegrityError(f"{manifest}: checkpoint format version {doc.get('version')!r}; this merv reads "
                                       f"version {VERSION}")
    for name in files:
        if name.startswith("/") or ".." in name.split("/") or name == MANIFEST:
            raise CheckpointIntegrityError(f"{manifest} lists {name!r}, a path outside the checkpoint; refused")
    return files


def _structure_problem(path: Path, files: Mapping[str, Mapping[str, Any]]) -> str | None:
    """Missing, unexpected, symlinked or wrong-sized files (cheap: no hashing)."""
    present = dict(_walk_files(path))
    present.pop(MANIFEST, None)
    for name, p in sorted(present.items()):
        if p.is_symlink():
            return f"{p} is a symbolic link; a checkpoint holds plain files only"
        if name not in files:
            return (f"{p} is not listed in {path / MANIFEST} (planted, or left by another writer); refusing the "
                    "checkpoint; remove the file if you know where it came from")
    for name, entry in sorted(files.items()):
        p = path / name
        if name not in present:
            return f"{p} is missing (listed in {path / MANIFEST})"
        size = p.stat().st_size
        if size != entry["bytes"]:
            what = "truncated" if size < entry["bytes"] else "longer than saved"
            return f"{p} is {what}: {size} bytes, {MANIFEST} says {entry['bytes']}"
    if STATE_FILE not in files:
        return f"{path / MANIFEST} does not list {STATE_FILE}"
    return None


def verify_checkpoint(path: str | os.PathLike[str], env: DistEnv) -> None:
    """Collective: check the manifest, every file's size, and (shared over ranks) every sha256."""
    path = Path(path)
    if env.is_main:
        try:
            files = _manifest_files(path)
            problem = _structure_problem(path, files)
            verdict = {"error": problem} if problem else {"files": files}
        except CheckpointIntegrityError as exc:
            verdict = {"error": str(exc)}
        except OSError as exc:
            verdict = {"error": f"{path}: cannot be read ({_one_line(exc)})"}
    else:
        verdict = {}
    verdict = json.loads(_broadcast_text(json.dumps(verdict), env))
    if "error" in verdict:
        raise CheckpointIntegrityError(verdict["error"])
    names = sorted(verdict["files"])
    bad = [0] * len(names)
    for i in range(env.rank, len(names), env.world_size):
        try:
            bad[i] = int(_sha256(path / names[i]) != verdict["files"][names[i]]["sha256"])
        except OSError:
            bad[i] = 1
    bad = _all_reduce_max(bad, env)
    if any(bad):
        name = names[bad.index(1)]
        raise CheckpointIntegrityError(f"{path / name} is damaged: its sha256 differs from {path / MANIFEST} "
                                       "(corrupted or modified after it was saved)")


# ----------------------------------------------------------------------------- choose what to resume


@dataclass
class ResumePoint:
    """The verified checkpoint to resume from (None: start fresh), and what to tell the user."""

    path: Path | None
    notes: list[str] = field(default_factory=list)


def step_dirs(root: str | os.PathLike[str]) -> list[Path]:
    """Checkpoint directories of a run, newest first (by step number)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if STEP_DIR.fullmatch(p.name) and p.is_dir()]
    return sorted(found, key=lambda p: p.name, reverse=True)


def _pointer(root: Path) -> tuple[str | None, str | None]:
    """(checkpoint named by `latest`, why it cannot be used)."""
    pointer = root / LATEST
    if not pointer.exists():
        return None, f"{pointer} is missing"
    try:
        name = _read_small(pointer).strip()
    except (OSError, ValueError) as exc:
        return None, f"{pointer} is unreadable ({_one_line(exc)})"
    if not STEP_DIR.fullmatch(name):
        return None, f"{pointer} does not name a checkpoint ({name[:40]!r})"
    if not (root / name).is_dir():
        return None, f"{pointer} names {name}, which does not exist"
    return name, None


def select_checkpoint(root: str | os.PathLike[str], env: DistEnv, mode: str) -> ResumePoint:
    """Collective. mode: "no" (fresh run), "must" (--resume), "auto" (--resume-auto).

    Tries the checkpoint `latest` names, then every other one newest first; the first that verifies
    wins, and any fallback is reported. Never starts fresh where checkpoints exist: a fresh run would
    overwrite them, and a run whose checkpoints are all damaged is refused, not restarted."""
    root = Path(root)
    plan: dict[str, Any] = {}
    if env.is_main:
        dirs = [p.name for p in step_dirs(root)]
        name, problem = _pointer(root) if dirs else (None, None)
        plan = {"dirs": dirs, "pointer": name, "problem": problem}
    plan = json.loads(_broadcast_text(json.dumps(plan), env))
    dirs = plan["dirs"]
    if mode == "no":
        if dirs:
            raise ResumeError(f"{root} already holds checkpoints (newest {dirs[0]}) of an earlier run: pass --resume "
                              "to continue it, or choose another --out (or delete that directory) to start over")
        return ResumePoint(None)
    if not dirs:
        if mode == "auto":
            return ResumePoint(None, [f"no checkpoint in {root}: starting fresh (--resume-auto)"])
        raise ResumeError(f"--resume: no checkpoint in {root}; run without --resume, or with --resume-auto, to start "
                          "fresh")
    order = ([plan["pointer"]] if plan["pointer"] else []) + [d for d in dirs if d != plan["pointer"]]
    reasons = [plan["problem"]] if plan["problem"] else []
    for name in order:
        try:
            verify_checkpoint(root / name, env)
        except CheckpointIntegrityError as exc:
            reasons.append(str(exc))
            continue
        notes = [] if not reasons else [
            f"resuming from {root / name}, the newest complete, verified checkpoint, because: {'; '.join(reasons)}"]
        return ResumePoint(root / name, notes)
    raise ResumeError(f"cannot resume: no complete, verified checkpoint in {root}: {'; '.join(reasons)}. Restore the "
                      "files from a copy, or delete the checkpoints directory to start over")


# ----------------------------------------------------------------------------- load


def read_trainer_state(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The JSON trainer state of a verified checkpoint; a damaged file raises CheckpointIntegrityError."""
    file = Path(path) / STATE_FILE
    try:
        state = json.loads(file.read_bytes().decode("utf-8"))
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise ValueError("not a merv trainer state")
        for key in ("step", "scheduler", "loader", "optimizer_plain", "tensors"):
            if key not in state:
                raise ValueError(f"no {key!r}")
    except (OSError, ValueError) as exc:
        raise CheckpointIntegrityError(f"{file} is unreadable ({_one_line(exc)}); the checkpoint is damaged") from exc
    return state


def _tensor_mismatch(saved: Mapping[str, Any], live: Mapping[str, torch.Tensor]) -> str | None:
    """What differs between the checkpoint's tensors and this model's / optimizer's (None: nothing)."""
    mine = _tensor_table(live)
    missing = sorted(set(mine) - set(saved))
    extra = sorted(set(saved) - set(mine))
    shapes = sorted(k for k in set(mine) & set(saved) if list(saved[k]) != mine[k])
    parts = [f"{label} {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}"
             for label, keys in (("not in the checkpoint:", missing), ("only in the checkpoint:", extra),
                                 ("other shape / dtype:", shapes)) if keys]
    return "; ".join(parts) or None


def _check_safetensors(files: Sequence[Path]) -> None:
    """Parse each shard's header first, so a damaged one is named (DCP's own error names none)."""
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as fh:
                fh.keys()
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointIntegrityError(f"{file} is not a valid safetensors file ({_one_line(exc)}); the checkpoint "
                                           "is damaged") from exc


def _drop_unsaved_param_state(optim_sd: dict[str, Any], saved: Mapping[str, Any]) -> dict[str, Any]:
    """Leave out the state of parameters that had none when saved (never got a gradient).

    `get_state_dict` creates optimizer state for every parameter; one that never received a gradient
    had none in the saving run (AdamW skips it, so what it holds after the resume does not matter)."""
    kept = {fqn: entry for fqn, entry in optim_sd["state"].items()
            if not any(_is_dcp_tensor(v) for v in entry.values())
            or any(f"optim/state/{fqn}/{k}" in saved for k, v in entry.items() if _is_dcp_tensor(v))}
    return {**optim_sd, "state": kept}


def load_checkpoint(path: str | os.PathLike[str], model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    env: DistEnv, state: dict[str, Any], *, trainable_only: bool = False) -> None:
    """Collective: restore model, optimizer and this rank's RNG from a verified checkpoint
    (`trainable_only`: as saved by `save_checkpoint`; the frozen parameters keep their built values)."""
    path = Path(path)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    if trainable_only:
        model_sd = _trainable_state(model, model_sd)
    kept = _drop_unsaved_param_state(optim_sd, state["tensors"])
    aliases = tied_aliases(model)
    template = {"model": _without(model_sd, aliases), "optim": kept}
    tensors, _plain = split_state(template)
    mismatch = _tensor_mismatch(state["tensors"], tensors)
    if mismatch:
        raise ResumeError(f"{path} holds another model / optimizer ({mismatch}); a changed model cannot resume, start "
                          "a new run (--init-from an export to keep the weights)")
    _check_safetensors(sorted((path / DCP_DIR).glob("*.safetensors")))
    try:
        dcp.load(tensors, storage_reader=_SafetensorsReader(str(path / DCP_DIR)), planner=_TensorOnlyPlanner())
    except CheckpointIntegrityError:
        raise
    except Exception as exc:  # DCP wraps every reader error: one line names the shard directory
        raise CheckpointIntegrityError(f"{path / DCP_DIR}: the model / optimizer shards cannot be read "
                                       f"({_one_line(exc)}); the checkpoint is damaged") from exc
    values: dict[str, Any] = dict(tensors)
    saved_plain = state["optimizer_plain"]
    for key, like in _flatten_state(template):
        if key in values:
            continue
        if key not in saved_plain:
            raise CheckpointIntegrityError(f"{path / STATE_FILE} lacks optimizer entry {key!r}; the file is damaged")
        values[key] = _leaf_from_json(saved_plain[key], like, key, path / STATE_FILE)
    tree = _rebuild(template, values)
    tree["model"].update({alias: tree["model"][name] for alias, name in aliases.items() if name in tree["model"]})
    # model keys were checked against the table above
    strict = len(kept["state"]) == len(optim_sd["state"]) and not trainable_only
    set_state_dict(model, optimizer, model_state_dict=tree["model"], optim_state_dict=tree["optim"],
                   options=StateDictOptions(strict=strict))
    rng = _rng_file(path, env.rank)
    if rng.exists():  # a rank beyond the saved world size keeps its seeded state
        try:
            rng_state = load_file(str(rng))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointIntegrityError(
                f"{rng} is unreadable ({_one_line(exc)}); the checkpoint is damaged") from exc
        _set_rng_state(rng_state, rng)


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Collective: the whole (unsharded) model state dict on CPU, on rank 0 (empty elsewhere)."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


# ----------------------------------------------------------------------------- config comparison

_ABSENT = "(absent)"
HARMLESS = "harmless"  # the class of config keys a resume may change without --allow-config-change


def flatten_config(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted keys of a nested config; lists and tuples stay whole values (as lists)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten_config(value, f"{name}."))
        else:
            out[name] = list(value) if isinstance(value, tuple) else value
    return out


def classify_key(key: str, classes: Mapping[str, Sequence[str]]) -> str:
    """The class of the first pattern (fnmatch) matching `key`; "unclassified" counts as significant."""
    for kind, patterns in classes.items():
        if any(fnmatch.fnmatchcase(key, p) for p in patterns):
            return kind
    return "unclassified"


@dataclass(frozen=True)
class ConfigChange:
    key: str
    kind: str
    old: Any
    new: Any

    def describe(self) -> str:
        return f"{self.key} {self.old!r} -> {self.new!r} ({self.kind})"


def config_changes(old: Mapping[str, Any], new: Mapping[str, Any], classes: Mapping[str, Sequence[str]],
                   ignore: str = HARMLESS) -> list[ConfigChange]:
    """Differences between two resolved configs, except keys of the `ignore` class."""
    a, b = flatten_config(old), flatten_config(new)
    changes = []
    for key in sorted(set(a) | set(b)):
        kind = classify_key(key, classes)
        if kind != ignore and a.get(key, _ABSENT) != b.get(key, _ABSENT):
            changes.append(ConfigChange(key, kind, a.get(key, _ABSENT), b.get(key, _ABSENT)))
    return changes
