"""Online encoding: decode a raw video and run the frozen encoders in-process, producing the same
features dict the store would serve (inference on new videos, parity tests, the online baseline).

This is the only place `train` touches `merv.extract`, and only lazily, through this interface:
  merv.extract.video.load_clip(path, num_frames) -> Clip with .frames uint8 (T, H, W, 3)
  merv.extract.video.subsample(frames, n) -> n uniformly sampled frames
  merv.extract.encoders.build_encoder(name, size=...) -> module with .info (grid, dim, frames)
      and .encode(frames uint8 (B, T, H, W, 3)) -> (B, t, h, w, d)
The loader, subsampler and encoders can be injected (tests, custom encoders).
"""

from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np
import torch

from merv import MervError

from .specs import FeatureSpec


class OnlineEncodingError(MervError, ValueError):
    """A model's encoders cannot be rebuilt online as asked (unknown encoder, size, or configuration)."""


class EncoderMismatchError(MervError, ValueError):
    """The encoders built for a model are not the configuration it was trained on."""


def _info(obj: Any, key: str, default: Any = None) -> Any:
    info = getattr(obj, "info", None)
    if isinstance(info, dict):
        return info.get(key, default)
    return getattr(info, key, default)


def match_grid(x: torch.Tensor, spec: FeatureSpec) -> torch.Tensor:
    """Pool an encoder's native (B, t, h, w, d) output to the cached grid of `spec` (a store may pool at extraction)."""
    from merv.store.grid import pool_grid_torch

    _, t, h, w, d = x.shape
    if (t, h, w) == spec.grid:
        return x
    if t != spec.grid[0] or d != spec.dim:
        raise OnlineEncodingError(
            f"encoder {spec.name!r} gives (t, d) = ({t}, {d}) but the model expects ({spec.grid[0]}, {spec.dim}); "
            "the online encoder configuration (--size, frames, layer) differs from the one the model was trained on"
        )
    return pool_grid_torch(x, spec.grid[1:])


def select_frames(
    frames_for: Callable[[int], Any],
    names: list[str],
    count: Callable[[str], int],
    framewise: Callable[[str], bool],
    is_image: bool = False,
) -> dict[str, np.ndarray]:
    """Each encoder's frames of one decoded clip, by extraction's rule: its own frame count from
    `frames_for(n)`, and an image's single frame for a frame-wise encoder. uint8 (n, H, W, 3);
    the encoders' own preprocessing (resize, normalise) happens when they encode."""
    from merv.store.grid import frames_to_encode

    return {name: np.ascontiguousarray(np.asarray(frames_for(frames_to_encode(count(name), framewise(name), is_image))))
            for name in names}


def encode_selected(
    selected: dict[str, Any],
    encoders: dict[str, Any],
    specs: list[FeatureSpec],
    *,
    device: str | torch.device | None = None,
    stored_as: dict[str, tuple[str, int]] | None = None,
) -> dict[str, torch.Tensor]:
    """Each encoder's frames (`select_frames`) -> {name: (1, t, h, w, d)} exactly as the cache holds
    them: an image's single frame broadcast to t frames as the reader does, pooled to the spec's
    grid and given the store's encoding (`stored_as`: name -> (encoding, bitround keepbits);
    float16 by default)."""
    from merv.store.encodings import as_stored
    from merv.store.grid import broadcast_frames

    out: dict[str, torch.Tensor] = {}
    for spec in specs:
        clip = torch.as_tensor(np.ascontiguousarray(np.asarray(selected[spec.name])))[None]
        x = torch.as_tensor(encoders[spec.name].encode(clip)).float()
        if x.shape[1] == 1 != spec.grid[0]:  # an image's single frame, broadcast as the reader does
            x = broadcast_frames(x, spec.grid[0], axis=1)
        encoding, keepbits = (stored_as or {}).get(spec.name, ("fp16", 7))
        cached = as_stored(match_grid(x, spec).cpu().numpy(), encoding, keepbits)  # what the reader would return
        out[spec.name] = torch.from_numpy(cached).float().to(device or "cpu")
    return out


def encode_clip(
    frames_for: Callable[[int], Any],
    encoders: dict[str, Any],
    specs: list[FeatureSpec],
    *,
    is_image: bool = False,
    frames: Callable[[str, Any], int] | None = None,
    device: str | torch.device | None = None,
    stored_as: dict[str, tuple[str, int]] | None = None,
) -> dict[str, torch.Tensor]:
    """One decoded clip -> {name: (1, t, h, w, d)} exactly as extraction caches it.

    The single place that applies extraction's rules online (`select_frames`, then
    `encode_selected`). Generation (`OnlineEncoders`, `MervProcessor`) and `merv train --online`
    (`OnlineFeatureFn`) all go through these two steps, so the model sees the numbers it would
    read from the cache (the rules themselves live in merv.store.grid and merv.store.encodings,
    shared with the extraction worker and the reader).
    """
    selected = select_frames(
        frames_for, [s.name for s in specs],
        lambda name: frames(name, encoders[name]) if frames else int(_info(encoders[name], "frames")),
        lambda name: bool(_info(encoders[name], "framewise", False)), is_image)
    return encode_selected(selected, encoders, specs, device=device, stored_as=stored_as)


def decode_clip(path: str, frames: int, loader: Callable[[str, int], Any] | None = None) -> tuple[np.ndarray, bool]:
    """(uint8 frames (T, H, W, 3), is_image) of a video / image file or URL, decoded once at
    `frames` as extraction decodes it (a URL or tar member is fetched like extraction fetches it)."""
    if loader is not None:
        clip = loader(path, frames)
    else:
        from merv.extract.sources import local_file
        from merv.extract.video import load_clip

        with local_file(path) as local:
            clip = load_clip(local, frames)
    return np.asarray(getattr(clip, "frames", clip)), bool(getattr(clip, "is_image", False))


def frames_decoded(counts: list[int]) -> int:
    """Frames decoded per clip for encoders taking `counts` frames (extraction's rule)."""
    from merv.extract.plan import decode_frames

    return decode_frames(counts)


class OnlineEncoders:
    """Frozen encoders for the model's feature specs, built on first use (generation on raw videos)."""

    def __init__(
        self,
        specs: list[FeatureSpec],
        *,
        size: str = "paper",
        weights: str | None = None,
        allow_download: bool = False,
        encoders: dict[str, Any] | None = None,
        frames: dict[str, int] | None = None,
        loader: Callable[[str, int], Any] | None = None,
        subsampler: Callable[[Any, int], Any] | None = None,
        device: str | torch.device | None = None,
        decode_frames: int | None = None,
    ) -> None:
        self.specs = list(specs)
        self.decode_frames = decode_frames  # None: extraction's rule (see encode_path)
        self.size = size
        self.weights = weights  # build_encoder's: None (the size's default), "random", a file
        self.allow_download = allow_download
        self._encoders: dict[str, Any] = dict(encoders or {})
        self._frames = dict(frames or {})
        self._loader = loader
        self._subsampler = subsampler
        self.device = device

    def encoder(self, name: str) -> Any:
        if name not in self._encoders:
            from merv.extract.encoders import build_encoder  # lazy: train never imports extract otherwise

            _check_buildable(name, self.size)
            enc = build_encoder(name, size=self.size, weights=self.weights, device=self.device or "cpu",
                                allow_download=self.allow_download)
            if hasattr(enc, "eval"):
                enc.eval()
            self._encoders[name] = enc
        return self._encoders[name]

    def check_fingerprints(self, recorded: dict[str, str], what: str) -> None:
        """Refuse encoders whose fingerprint differs from the one `what` (a model export) was
        trained on: other weights, frames, preprocessing or layer give other numbers."""
        for spec in self.specs:
            want = recorded.get(spec.name)
            if want is None:
                continue
            have = _info(self.encoder(spec.name), "fingerprint")
            have = have() if callable(have) else have  # EncoderInfo.fingerprint() is a method
            if have is not None and have != want:
                raise EncoderMismatchError(
                    f"encoder {spec.name!r} ({self.size}, weights {self.weights or 'default'}) has fingerprint {have}, "
                    f"but {what} was trained on features of fingerprint {want}; pass the encoder size / weights "
                    "it was trained with (--size, --weights)")

    def frames_for(self, name: str) -> int:
        if name in self._frames:
            return self._frames[name]
        n = _info(self.encoder(name), "frames")
        if not n:
            raise ValueError(f"encoder {name!r} does not say how many frames it takes (info.frames); pass frames={{{name!r}: n}}")
        return int(n)

    def _subsample(self, frames: Any, n: int) -> Any:
        if self._subsampler is not None:
            return self._subsampler(frames, n)
        from merv.extract.video import subsample

        return subsample(frames, n)

    def framewise(self, name: str) -> bool:
        return bool(_info(self.encoder(name), "framewise", False))

    @torch.no_grad()  # not inference_mode: the features may feed a training step (online baseline)
    def encode_inputs(self, selected: dict[str, Any], device: str | torch.device | None = None) -> dict[str, torch.Tensor]:
        """One sample's per-encoder frames (`MervProcessor` / `select_frames`) -> {name: (1, t, h, w, d)}."""
        return encode_selected(selected, {s.name: self.encoder(s.name) for s in self.specs}, self.specs, device=device)

    def encode_frames(self, frames: np.ndarray | torch.Tensor, device: str | torch.device | None = None,
                      is_image: bool = False) -> dict[str, torch.Tensor]:
        """uint8 frames (T, H, W, 3) -> {name: (1, t, h, w, d)} on `device` (see `encode_clip`)."""
        selected = select_frames(lambda n: self._subsample(frames, n), [s.name for s in self.specs], self.frames_for,
                                 self.framewise, is_image)
        return self.encode_inputs(selected, device)

    def encode_image(self, image: np.ndarray, device: str | torch.device | None = None) -> dict[str, torch.Tensor]:
        """An image is a video of repeated frames (paper 3.2); frame-wise encoders see it once."""
        return self.encode_frames(np.asarray(image)[None], device, is_image=True)

    def encode_path(self, path: str, device: str | torch.device | None = None) -> dict[str, torch.Tensor]:
        """Decode `path` once, as extraction does, then subsample per encoder: the model sees the
        frames it was trained on from the cache."""
        n = self.decode_frames or frames_decoded([self.frames_for(s.name) for s in self.specs])
        frames, is_image = decode_clip(path, n, self._loader)
        return self.encode_frames(frames, device, is_image=is_image)


class OnlineFeatureFn:
    """`InstructionData.feature_fn` for `merv train --online`: decode and encode every video of a
    micro-batch in the loop (the reference's way of training), instead of reading cached features.

    Sources and clip windows come from the store's sample table, and the encoders must carry the
    same fingerprints as the store's groups, so online and cached training see the same numbers
    (`encode_clip` applies extraction's frame rules, pooling and the store's encoding). Every sample
    is decoded at the store's frame count. Built lazily per process (DataLoader workers included).

    `seconds` adds up where the time goes in this process ("decode", then one entry per encoder):
    what re-encoding in the loop costs each model, by its encoders (the demo's cost report).
    """

    def __init__(self, size: str = "paper", device: str = "cpu", weights: str | None = None) -> None:
        self.size = size
        self.device = device
        self.weights = weights  # build_encoder's: None (the size's default), "random", a file
        self._encoders: dict[str, Any] | None = None
        self.seconds: dict[str, float] = {}
        self.samples = 0  # samples decoded and encoded in this process

    def __getstate__(self) -> dict[str, Any]:
        return {"size": self.size, "device": self.device, "weights": self.weights, "_encoders": None,
                "seconds": {}, "samples": 0}

    def _timed(self, key: str, t0: float) -> None:
        self.seconds[key] = self.seconds.get(key, 0.0) + time.perf_counter() - t0

    def _build(self, data: Any) -> dict[str, Any]:
        if self._encoders is None:
            from merv.extract.encoders import build_encoder

            reader = data.readers()[0]
            self._encoders = {}
            for name, group in reader.groups.items():
                _check_buildable(name, self.size)
                enc = build_encoder(name, size=self.size, weights=self.weights, device=self.device)
                if enc.info.fingerprint() != group.spec.fingerprint:
                    raise OnlineEncodingError(
                        f"--online: encoder {name!r} ({self.size}) has fingerprint {enc.info.fingerprint()} but the "
                        f"store's group {group.key} was extracted with {group.spec.fingerprint}; online training must "
                        "use the encoder configuration the store was made with"
                    )
                self._encoders[name] = enc
        return self._encoders

    def __call__(self, data: Any, examples: Any, dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        from merv.extract.sources import local_file
        from merv.extract.video import load_clip

        encoders = self._build(data)
        ex = np.asarray(examples, dtype=np.int64)
        stores = data.store_of[ex]
        has_visual = torch.from_numpy(stores >= 0)
        feats = {name: torch.zeros((len(ex), *shape), dtype=dtype) for name, shape in data.feature_shapes.items()}
        readers = data.readers()
        decoded = [_frames_decoded(reader, encoders) for reader in readers]  # per store, not per sample
        specs = [FeatureSpec(name, tuple(shape[:3]), int(shape[3])) for name, shape in data.feature_shapes.items()]
        for pos in np.nonzero(stores >= 0)[0]:
            reader = readers[int(stores[pos])]
            record = reader.table.record(int(data.sample_of[ex[pos]]))
            t0 = time.perf_counter()
            with local_file(record.source) as path:
                clip = load_clip(path, decoded[int(stores[pos])], start=record.start, end=record.end,
                                 end_frame=record.end_frame)
            self._timed("decode", t0)
            stored_as = {n: (g.spec.encoding, g.spec.bitround_keepbits) for n, g in reader.groups.items()}
            for spec in specs:  # one encoder at a time, to know what each costs
                t0 = time.perf_counter()
                one = encode_clip(clip.frames_for, encoders, [spec], is_image=clip.is_image, stored_as=stored_as)
                feats[spec.name][int(pos)] = one[spec.name][0].to(dtype)
                self._timed(spec.name, t0)
            self.samples += 1
        return feats, has_visual


def _check_buildable(name: str, size: str) -> None:
    """Refuse an encoder the registry cannot build before any weights are looked for: the
    model or store names it, so the message says which and what the registry has."""
    from merv.extract.encoders.registry import ENCODERS, SIZES
    from merv.store.encoder_names import is_generic

    if name not in ENCODERS and not is_generic(name):
        raise OnlineEncodingError(f"encoder {name!r} of this model has no online builder (known: {', '.join(ENCODERS)}, "
                                  "timm:... / hf:... specs); evaluate it from a feature store instead (`merv eval`)")
    if size not in SIZES:
        raise OnlineEncodingError(f"--size {size!r} is unknown; use one of {', '.join(SIZES)}")


def _frames_decoded(reader: Any, encoders: dict[str, Any]) -> int:
    """Frames decoded per sample at extraction (recorded in each group), so an encoder subset
    sees the same frames online as cached; older stores: the most any encoder takes."""
    for group in reader.groups.values():
        decoded = (group.spec.info or {}).get("decoding", {}).get("frames_decoded")
        if decoded:
            return int(decoded)
    return max(enc.info.frames for enc in encoders.values())
