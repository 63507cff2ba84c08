"""Finding and reading pretrained weights offline.

Weights come from (in this order) an explicit file or directory, or the Hugging Face cache. The
network is never touched unless the caller passes `allow_download=True` *and* `HF_HUB_OFFLINE` is
not set. Checkpoints are read with safetensors or `torch.load(weights_only=True)`; nothing is
unpickled and no remote code runs.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import torch

from merv import MervError

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


class WeightsError(MervError, RuntimeError):
    """Weights were found but do not fit the model (names or shapes)."""


class WeightsNotFoundError(MervError, FileNotFoundError):
    """No local weights for a model: says where we looked and what to download."""

    def __init__(
        self, model_id: str, looked: Sequence[str], filenames: Sequence[str], note: str = "",
        extra_files: Sequence[str] = (),
    ) -> None:
        self.model_id = model_id
        self.looked = list(looked)
        needed = " or ".join(filenames) + "".join(f" plus {f}" for f in extra_files)
        local = f"WEIGHTS/{model_id.split('/')[-1]}"
        msg = (
            f"weights for {model_id!r} not found (looked in: {'; '.join(self.looked) or 'nowhere'}). "
            f"Download them where the Hub is reachable: `hf download {model_id} --local-dir {local}` "
            f"(needed: {needed}) and pass --weights WEIGHTS (one directory can hold every encoder's folder), "
            f"or `hf download {model_id}` into the HF cache (HF_HUB_CACHE) and copy that here, "
            f"or pass --allow-download where the network is reachable."
        )
        super().__init__(msg + (f" {note}" if note else ""))


def hub_cache_dir() -> Path:
    """The HF hub cache, read from the environment at call time (HF_HUB_CACHE, then HF_HOME)."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    return Path.home() / ".cache" / "huggingface" / "hub"


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def wants_random_init(weights: str | os.PathLike[str] | None, size: str) -> bool:
    """Random initialisation: asked for explicitly, or a tiny / small variant given no weights."""
    return weights == "random" or (size != "paper" and weights is None)


def weights_to_load(
    model_id: str,
    weights: str | os.PathLike[str] | None,
    size: str,
    *,
    meta: bool,
    allow_download: bool,
    aliases: Sequence[str] = (),
    extra_files: Sequence[str] = (),
) -> tuple[bool, Path | None]:
    """(random init?, the weights file to load or None): every builder's first step. A meta build
    or a random init needs no file; anything else resolves one (or raises, naming the model id)."""
    random_init = wants_random_init(weights, size)
    if meta or random_init:
        return random_init, None
    return random_init, resolve_weights(model_id, weights, allow_download=allow_download, aliases=aliases,
                                        extra_files=extra_files)


def weights_identity(model_id: str, size: str, path: Path | None, random_init: bool, seed: int) -> str:
    """The weights part of an encoder's fingerprint: the seed of a random init, the hash of a
    tiny / small variant's own file, or the published model id."""
    if random_init:
        return f"random-init(seed={seed})"
    if size != "paper" and path is not None:
        return "file:" + hashlib.sha256(path.read_bytes()).hexdigest()
    return f"pretrained:{model_id}"


def resolve_weights(
    model_id: str,
    weights: str | os.PathLike[str] | None = None,
    filenames: Sequence[str] = WEIGHT_FILES,
    allow_download: bool = False,
    aliases: Sequence[str] = (),
    extra_files: Sequence[str] = (),
) -> Path:
    """Path of a weights file for `model_id`.

    weights: a file (used as is); a directory, searched for `filenames` in itself, in a
    sub-directory named after the model (`<model_id>`, `<org>--<name>`, `<name>` or an alias such
    as `dinov2`), or in an HF-cache layout below it -- so one directory can hold every encoder's
    weights; or None, meaning the HF cache (HF_HUB_CACHE / HF_HOME), offline.
    extra_files: other files of the repo worth having next to the weights (config.json); fetched
    alongside when downloading, named in the error otherwise.
    """
    missing = partial(WeightsNotFoundError, model_id, filenames=filenames, extra_files=extra_files)
    looked: list[str] = []
    if weights is not None:
        p = Path(weights).expanduser()
        if p.is_file():
            return p
        if not p.is_dir():
            raise missing([str(p)])
        subdirs = [p, p / model_id, p / model_id.replace("/", "--"), p / model_id.split("/")[-1]]
        subdirs += [p / a for a in aliases]
        for d in subdirs:
            for name in filenames:
                if (d / name).is_file():
                    return d / name
        looked.append(f"{p}[/{{{','.join([model_id, model_id.split('/')[-1], *aliases])}}}]/{{{','.join(filenames)}}}")
        found = _from_hub_cache(model_id, filenames, p)
        if found is not None:
            return found
        looked.append(f"HF cache layout under {p}")
        raise missing(looked)

    cache = hub_cache_dir()
    found = _from_hub_cache(model_id, filenames, cache)
    if found is not None:
        return found
    looked.append(f"HF cache {cache} (repo {model_id})")
    if allow_download and not hub_offline():
        from huggingface_hub import hf_hub_download

        last: Exception | None = None
        for name in filenames:
            try:
                path = Path(hf_hub_download(model_id, name, cache_dir=str(cache)))
            except Exception as exc:  # try the next file name; report the last failure
                last = exc
                continue
            for extra in extra_files:
                with contextlib.suppress(Exception):  # optional companions
                    hf_hub_download(model_id, extra, cache_dir=str(cache))
            return path
        raise missing(looked, note=f"Download failed: {last}")
    note = "HF_HUB_OFFLINE is set, so no download was tried." if allow_download else ""
    raise missing(looked, note=note)


def _from_hub_cache(model_id: str, filenames: Sequence[str], cache: Path) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    for name in filenames:
        found = try_to_load_from_cache(model_id, name, cache_dir=str(cache))
        if isinstance(found, str) and Path(found).is_file():
            return Path(found)
    return None


def load_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file or a PyTorch checkpoint (weights_only: no unpickling)."""
    p = Path(path)
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(p), device="cpu")
    try:  # mmap avoids a second in-memory copy of multi-GB checkpoints (zip format only)
        state = torch.load(str(p), map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:
        state = torch.load(str(p), map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise WeightsError(f"{p}: expected a state dict, found {type(state).__name__}")
    return state


def assign_state_dict(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Strictly load `state` into `module` (possibly built on the meta device) in float32.

    Every parameter and buffer must be covered: a meta tensor left behind would mean the checkpoint
    lacks something the architecture needs.
    """
    missing, unexpected = _diff(module, state)
    if missing or unexpected:
        raise WeightsError(
            f"{source}: checkpoint does not match the architecture; missing {missing[:8]}"
            f"{'...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}"
        )
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    try:
        module.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise WeightsError(f"{source}: {exc}") from exc
    left = [n for n, t in list(module.named_parameters()) + list(module.named_buffers()) if t.is_meta]
    if left:
        raise WeightsError(f"{source}: tensors not covered by the checkpoint: {left[:8]}")


def _diff(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    expected = set(module.state_dict().keys())
    given = set(state.keys())
    return sorted(expected - given), sorted(given - expected)
