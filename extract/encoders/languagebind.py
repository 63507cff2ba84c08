"""LanguageBind video tower (`LanguageBind/LanguageBind_Video_merge`), implemented here.

Architecture (PKU-YuanGroup/LanguageBind `languagebind/video/modeling_video.py`, as vendored by
the MERV reference): a CLIP ViT-L/14 vision transformer at 224 px in which every encoder layer
first runs a *temporal* block, then the usual spatial CLIP block:

    x: (b*t, n, d), frames of one clip consecutive (t = num_frames = 8, n = 1 CLS + 256 patches)
    x = x + temporal_embedding[:t]           (per frame, same for every token; skipped when t == 1)
    x = x + temporal_attn(temporal_layer_norm1(x)) attending over t for each token (CLS included)
    x = x + self_attn(layer_norm1(x));  x = x + mlp(layer_norm2(x))

Note the temporal embedding is added *before* the residual is taken, so it stays in the stream.
The feature is `hidden_states[-2]` (the output of the second-to-last layer, no post-layernorm)
with CLS dropped. The temporal window is fixed at `num_frames`: with 16 input frames the
reference's `rearrange('(b t) n d -> (b n) t d', t=8)` runs two consecutive 8-frame clips, and so
does this module. Parameter names match the published checkpoint's `vision_model.*` keys, so its
state dict loads as is.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .base import EncoderInfo, FrozenEncoder, seeded, size_variant
from ..preprocess import Preprocessing
from .weights import (
    WeightsError,
    assign_state_dict,
    load_state_dict,
    weights_identity,
    weights_to_load,
)

NAME = "languagebind"
MODEL_ID = "LanguageBind/LanguageBind_Video_merge"
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
PREFIX = "vision_model."


@dataclass(frozen=True)
class LanguageBindVisionConfig:
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    image_size: int = 224
    patch_size: int = 14
    num_frames: int = 8  # temporal window of the temporal attention / embedding
    hidden_act: str = "gelu"  # the checkpoint's vision_config (CLIP-ViT-L-14-DataComp init uses GELU)
    layer_norm_eps: float = 1e-5

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


PAPER = LanguageBindVisionConfig()
TINY = LanguageBindVisionConfig(
    hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, image_size=56
)
# benchmark scale: the paper's input and 16x16 grid, depth x width 24 x 1024 -> 6 x 128
SMALL = LanguageBindVisionConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=6, num_attention_heads=2)
CONFIGS = {"paper": PAPER, "tiny": TINY, "small": SMALL}


def _activation(name: str):
    if name == "gelu":
        return F.gelu
    if name == "quick_gelu":
        return lambda x: x * torch.sigmoid(1.702 * x)
    raise ValueError(f"unsupported hidden_act {name!r}")


class CLIPAttention(nn.Module):
    """Multi-head attention with CLIP's parameter names (q_proj, k_proj, v_proj, out_proj)."""

    def __init__(self, cfg: LanguageBindVisionConfig) -> None:
        super().__init__()
        d = cfg.hidden_size
        self.num_heads = cfg.num_attention_heads
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, d = x.shape
        heads = lambda y: y.view(n, length, self.num_heads, d // self.num_heads).transpose(1, 2)  # noqa: E731
        out = F.scaled_dot_product_attention(heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x)))
        return self.out_proj(out.transpose(1, 2).reshape(n, length, d))


class CLIPMLP(nn.Module):
    def __init__(self, cfg: LanguageBindVisionConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = _activation(cfg.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CLIPVisionEmbeddings(nn.Module):
    def __init__(self, cfg: LanguageBindVisionConfig) -> None:
        super().__init__()
        d = cfg.hidden_size
        self.class_embedding = nn.Parameter(torch.randn(d) * d**-0.5)
        self.patch_embedding = nn.Conv2d(3, d, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.position_embedding = nn.Embedding(cfg.grid**2 + 1, d)
        nn.init.normal_(self.patch_embedding.weight, std=0.02)
        nn.init.normal_(self.position_embedding.weight, std=0.02)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(patches.dtype).expand(patches.shape[0], 1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight.to(patches.dtype)


class CLIPEncoderLayer(nn.Module):
    """Temporal attention block, then the spatial CLIP block (see module docstring)."""

    def __init__(self, cfg: LanguageBindVisionConfig) -> None:
        super().__init__()
        d = cfg.hidden_size
        self.t = cfg.num_frames
        self.self_attn = CLIPAttention(cfg)
        self.layer_norm1 = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.mlp = CLIPMLP(cfg)
        self.layer_norm2 = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.temporal_embedding = nn.Parameter(torch.randn(1, cfg.num_frames, d) * d**-0.5)
        self.temporal_attn = CLIPAttention(cfg)
        self.temporal_layer_norm1 = nn.LayerNorm(d, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bt, n, d = x.shape
        t = self.t
        clips = x.view(bt // t, t, n, d)
        if t != 1:
            clips = clips + self.temporal_embedding[:, :t].unsqueeze(2)
        over_time = clips.transpose(1, 2).reshape(-1, t, d)  # (clips * n, t, d)
        attended = self.temporal_attn(self.temporal_layer_norm1(over_time))
        clips = clips + attended.view(-1, n, t, d).transpose(1, 2)
        x = clips.reshape(bt, n, d)
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, cfg: LanguageBindVisionConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))


class LanguageBindVisionTransformer(nn.Module):
    """The checkpoint's `vision_model`: embeddings, pre_layrnorm, encoder, post_layernorm."""

    def __init__(self, cfg: LanguageBindVisionConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embeddings = CLIPVisionEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)  # sic: the checkpoint's name
        self.encoder = CLIPEncoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def hidden_states(self, frames: torch.Tensor, upto: int | None = None) -> list[torch.Tensor]:
        """[embeddings, layer 1 out, ..., layer `upto` out] for frames (b*t, 3, S, S) -- the
        reference's `output_hidden_states` tuple. b*t must be a multiple of num_frames."""
        if frames.shape[0] % self.config.num_frames:
            raise ValueError(f"{frames.shape[0]} frames is not a multiple of the {self.config.num_frames}-frame window")
        x = self.pre_layrnorm(self.embeddings(frames))
        states = [x]
        for layer in self.encoder.layers[: upto if upto is not None else len(self.encoder.layers)]:
            x = layer(x)
            states.append(x)
        return states


class LanguageBindVisionTower(nn.Module):
    """Holds `vision_model` so that parameter names equal the checkpoint's (`vision_model.…`)."""

    def __init__(self, cfg: LanguageBindVisionConfig) -> None:
        super().__init__()
        self.vision_model = LanguageBindVisionTransformer(cfg)


class LanguageBindEncoder(FrozenEncoder):
    """T frames in (a multiple of num_frames), (T, 16, 16, 1024) out for the paper size."""

    def __init__(self, info: EncoderInfo, tower: LanguageBindVisionTower) -> None:
        super().__init__(info)
        self.tower = tower

    def check_frames(self, t: int) -> None:
        window = self.tower.vision_model.config.num_frames
        if t < 1 or t % window:
            raise ValueError(
                f"languagebind runs {window}-frame clips: T must be a multiple of {window}, got {t} "
                f"(the paper uses {self.info.frames} = {self.info.frames // window} consecutive clips)"
            )

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        b, t = pixels.shape[:2]
        vm = self.tower.vision_model
        hidden = vm.hidden_states(pixels.flatten(0, 1), upto=len(vm.encoder.layers) - 1)[-1]  # = hidden_states[-2]
        g = vm.config.grid
        return hidden[:, 1:].reshape(b, t, g, g, hidden.shape[-1])


# ------------------------------------------------------------------------------ state dict i/o
def vision_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tower's tensors from a full LanguageBind checkpoint (or a vision-only one).

    Keeps `vision_model.*` (text tower, projections and logit scale are not needed); drops the
    `position_ids` buffer older transformers versions saved. Keys without the prefix are accepted.
    """
    has_prefix = any(k.startswith(PREFIX) for k in state)
    out = {}
    for key, value in state.items():
        if has_prefix:
            if not key.startswith(PREFIX):
                continue
        else:
            key = PREFIX + key
        if key.endswith("embeddings.position_ids"):
            continue
        out[key] = value
    if not out:
        raise WeightsError("no vision_model.* tensors in the LanguageBind checkpoint")
    return out


def checkpoint_config(path: Path, cfg: LanguageBindVisionConfig) -> LanguageBindVisionConfig:
    """Reconcile `cfg` with a `config.json` next to the weights (the hub snapshot has one).

    The activation and LayerNorm epsilon are taken from the checkpoint's `vision_config`; a
    disagreement in any shape-defining number means the weights belong to another model.
    """
    config_file = path.parent / "config.json"
    if not config_file.is_file():
        return cfg
    vision = json.loads(config_file.read_text()).get("vision_config", {})
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
                "patch_size", "num_frames"):
        if key in vision and vision[key] != getattr(cfg, key):
            raise WeightsError(
                f"{config_file}: vision_config.{key}={vision[key]} but this model has {getattr(cfg, key)}"
            )
    if vision.get("add_time_attn") is False:
        raise WeightsError(f"{config_file}: add_time_attn is false; this is not the video tower")
    return replace(
        cfg,
        hidden_act=vision.get("hidden_act", cfg.hidden_act),
        layer_norm_eps=float(vision.get("layer_norm_eps", cfg.layer_norm_eps)),
    )


def _preprocessing(image_size: int) -> Preprocessing:
    return Preprocessing(
        resize="shortest_side",
        size=image_size,
        interpolation="bilinear",
        antialias=False,
        crop=(image_size, image_size),
        mean=OPENAI_MEAN,
        std=OPENAI_STD,
        order="normalize_then_resize",
        quantize=False,
        hflip="none",
        reference=(
            "LanguageBind get_video_transform: x/255, NormalizeVideo(OpenAI CLIP mean/std), ShortSideScale(S, "
            "bilinear), CenterCropVideo(S); its RandomHorizontalFlipVideo(p=0.5) is omitted"
        ),
    )


def build_languagebind(
    size: str = "paper",
    weights: str | Path | None = None,
    device: str | torch.device = "cpu",
    allow_download: bool = False,
    meta: bool = False,
    seed: int = 0,
    frames: int = 16,
) -> LanguageBindEncoder:
    cfg = size_variant(NAME, CONFIGS, size)
    random_init, path = weights_to_load(MODEL_ID, weights, size, meta=meta, allow_download=allow_download,
                                        aliases=(NAME,), extra_files=("config.json",))
    if path is not None:
        cfg = checkpoint_config(path, cfg)
        if size == "paper" and not (path.parent / "config.json").is_file():
            warnings.warn(
                f"{path}: no config.json next to the LanguageBind weights; assuming hidden_act="
                f"{cfg.hidden_act!r}, layer_norm_eps={cfg.layer_norm_eps} (the published vision_config)",
                stacklevel=2,
            )
    if meta or path is not None:
        with torch.device("meta"):
            tower = LanguageBindVisionTower(cfg)
    else:
        with seeded(seed):
            tower = LanguageBindVisionTower(cfg)
    identity = weights_identity(MODEL_ID, size, path, random_init, seed)
    encoder = LanguageBindEncoder(_info(size, cfg, identity, frames), tower)
    if path is not None:
        assign_state_dict(tower, vision_state_dict(load_state_dict(path)), str(path))
        encoder.weights_source = str(path)
    if not meta:
        encoder.to(device)
    return encoder.finalize()  # type: ignore[return-value]


def _info(size: str, cfg: LanguageBindVisionConfig, identity: str, frames: int) -> EncoderInfo:
    if frames % cfg.num_frames:
        raise ValueError(f"frames must be a multiple of {cfg.num_frames}")
    return EncoderInfo(
        name="languagebind",
        size=size,
        model_id=MODEL_ID,
        weights=identity,
        architecture="merv:LanguageBindVisionTransformer",
        config=asdict(cfg),
        frames=frames,
        image_size=cfg.image_size,
        preprocessing=_preprocessing(cfg.image_size),
        layer="penultimate",
        layer_detail=(
            f"hidden_states[-2]: output of encoder.layers[{cfg.num_hidden_layers - 2}], no post_layernorm; "
            f"{frames} frames run as {frames // cfg.num_frames} consecutive {cfg.num_frames}-frame clips"
        ),
        dropped_tokens=("cls",),
        grid=(frames, cfg.grid, cfg.grid),
        dim=cfg.hidden_size,
        framewise=False,
        has_cls=True,
        notes="Reference's RandomHorizontalFlipVideo(p=0.5) at inference is omitted (deterministic features).",
    )
