"""`MervProcessor`: video / image / frames + text -> a MERV model's inputs, by extraction's rules.

Hugging Face processor conventions (`__call__` returns a `BatchFeature`; `save_pretrained` /
`from_pretrained` on a model directory): the text becomes the prompt in the model's prompt format
(BOS first, left-padded for generation), and each video is decoded once at extraction's frame count
and subsampled per encoder (one frame for frame-wise encoders when it is an image), so
`pixel_values[encoder][i]` holds sample i's uint8 frames (n, H, W, 3) for that encoder. The
encoders' own preprocessing (resize, normalise) runs when they encode (`OnlineEncoders.encode_inputs`);
features made this way equal the store's. `merv generate` and serving use this one path.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoTokenizer, BatchFeature

PROCESSOR_CONFIG = "processor_config.json"


class MervProcessor:
    def __init__(self, tokenizer: Any, encoders: list[dict[str, Any]], prompt_format: str = "pure",
                 decode_frames: int | None = None) -> None:
        missing = [e.get("name") for e in encoders if not e.get("frames") or "framewise" not in e]
        if missing:
            raise ValueError(f"encoders {missing}: the processor needs each encoder's frames and framewise")
        self.tokenizer = tokenizer
        self.encoders = [{"name": e["name"], "frames": int(e["frames"]), "framewise": bool(e["framewise"])}
                         for e in encoders]
        self.prompt_format = prompt_format
        self.decode_frames = decode_frames  # None: extraction's rule over the encoders' frame counts

    # --- construction --------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike[str], **kwargs: Any) -> MervProcessor:
        """From an export directory: its tokenizer, and its processor_config.json (or config.json)."""
        root = Path(directory)
        tokenizer = AutoTokenizer.from_pretrained(str(root), local_files_only=True, trust_remote_code=False)
        if (root / PROCESSOR_CONFIG).is_file():
            cfg = json.loads((root / PROCESSOR_CONFIG).read_text())
            return cls(tokenizer, cfg["encoders"], cfg.get("prompt_format", "pure"), cfg.get("decode_frames"))
        from .configuration import MervConfig

        return cls.from_config(MervConfig.from_pretrained(str(root)), tokenizer)

    @classmethod
    def from_config(cls, config: Any, tokenizer: Any) -> MervProcessor:
        """From a `MervConfig`: frames and frame-wise-ness per encoder from its recorded encoders,
        else from the paper's table, else from the feature grid (t frames, not frame-wise)."""
        from merv.store.paper import PAPER_ENCODERS

        recorded = {e["name"]: e for e in config.encoders}
        encoders = []
        for spec in config.feature_specs:
            name, rec, paper = spec["name"], recorded.get(spec["name"], {}), PAPER_ENCODERS.get(spec["name"])
            frames = rec.get("frames") or (paper.frames if paper else spec["grid"][0])
            framewise = rec["framewise"] if "framewise" in rec else (paper.framewise if paper else False)
            encoders.append({"name": name, "frames": frames, "framewise": framewise})
        decoded = next((e.get("frames_decoded") for e in config.encoders if e.get("frames_decoded")), None)
        return cls(tokenizer, encoders, config.prompt_format, decoded)

    def save_pretrained(self, directory: str | os.PathLike[str]) -> Path:
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(str(out))
        (out / PROCESSOR_CONFIG).write_text(json.dumps({
            "processor_class": type(self).__name__, "encoders": self.encoders, "prompt_format": self.prompt_format,
            "decode_frames": self.decode_frames}, indent=2))
        return out

    # --- text ----------------------------------------------------------------------------------

    def build_prompt(self, message: str, system_prompt: str | None = None) -> str:
        from merv.train.prompts import one_turn_prompt

        return one_turn_prompt(self.prompt_format, self.tokenizer, message, system_prompt)

    def token_ids(self, prompt: str) -> list[int]:
        from merv.train.prompts import prompt_token_ids

        return prompt_token_ids(self.tokenizer, prompt)

    # --- visual --------------------------------------------------------------------------------

    def frames_decoded(self) -> int:
        from merv.train.online import frames_decoded

        return self.decode_frames or frames_decoded([e["frames"] for e in self.encoders])

    def visual(self, source: Any, is_image: bool | None = None) -> tuple[dict[str, np.ndarray], bool]:
        """One video / image (a path or URL, a PIL image, or uint8 frames (T, H, W, 3) / (H, W, 3))
        -> ({encoder: its uint8 frames}, is_image)."""
        from merv.extract.video import subsample
        from merv.train.online import decode_clip, select_frames

        if isinstance(source, (str, os.PathLike)):
            frames, image = decode_clip(str(source), self.frames_decoded())
        else:
            frames = np.asarray(source)
            if frames.dtype != np.uint8:
                raise ValueError(f"frames must be uint8 RGB, got {frames.dtype}")
            image = frames.ndim == 3
            frames = frames[None] if image else frames
        image = image if is_image is None else is_image
        by_name = {e["name"]: e for e in self.encoders}
        selected = select_frames(lambda n: subsample(frames, n), list(by_name), lambda name: by_name[name]["frames"],
                                 lambda name: by_name[name]["framewise"], image)
        return selected, image

    def __call__(self, text: str | list[str], videos: Any = None, images: Any = None, *, wrap: bool = True,
                 return_tensors: str = "pt") -> BatchFeature:
        """`text`: the question(s) (wrapped in the prompt format unless `wrap=False`); `videos` or
        `images`: one per text. Returns input_ids, attention_mask (left-padded), and with visuals
        pixel_values {encoder: [uint8 tensor (n, H, W, 3) per sample]} and is_image (B,)."""
        texts = [text] if isinstance(text, str) else list(text)
        visuals = videos if videos is not None else images
        if videos is not None and images is not None:
            raise ValueError("pass videos or images, not both (one visual input per text)")
        if visuals is not None and (isinstance(visuals, (str, os.PathLike)) or isinstance(visuals, np.ndarray)):
            visuals = [visuals]
        if visuals is not None and len(visuals) != len(texts):
            raise ValueError(f"{len(texts)} texts but {len(visuals)} visual inputs: give one per text")
        from merv.train.prompts import left_pad

        rows = [self.token_ids(self.build_prompt(t) if wrap else t) for t in texts]
        ids, mask = left_pad(rows, self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0)
        data: dict[str, Any] = {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask)}
        if visuals is not None:
            pixels: dict[str, list[torch.Tensor]] = {e["name"]: [] for e in self.encoders}
            flags = []
            for source in visuals:
                selected, image = self.visual(source, is_image=True if images is not None else None)
                for name, frames in selected.items():
                    pixels[name].append(torch.from_numpy(frames))
                flags.append(image)
            data["pixel_values"] = pixels
            data["is_image"] = torch.tensor(flags)
        return BatchFeature(data)
