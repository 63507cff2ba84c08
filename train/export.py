"""Exported models: the Hugging Face-native format, the earlier layout, and the published MERV weights.

Export (what `merv train` writes to RUN/export, `save_merv`): a standard Hugging Face model
directory (`merv.hf`): config.json (`model_type: merv`, the LLM's config as `text_config`, the
connector, the feature specs and the encoders' fingerprints), generation_config.json, safetensors
weights (`connector.*`, `llm.*`; sharded with an index when large), the tokenizer files and a model
card (README.md). An align-stage export may leave the LLM out (`llm_saved: false`).

Earlier layout (still loaded; `merv convert OLD NEW` rewrites it): merv_config.json,
connector.safetensors, llm/ (an HF model directory), tokenizer/.

Reference format (`torch.load(...)["model"]`, see princetonvisualai/merv `MERV.from_pretrained`): state
dicts `projectors` (a ModuleList, `{i}.projector.projector.weight` for `3davg+linear`),
`feature_fusion` (`Q`, `attention.{q,k,v}_proj_weight`, `attention.in_proj_bias`,
`attention.out_proj.*`) and `llm_backbone` (`llm.model.*`, `llm.lm_head.weight`); older files use
`projector` (one encoder) and `adapter` for the fusion. `merv convert-reference` makes it an export.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from merv import MervError

from .connector import Connector, ConnectorConfig
from .model import MervModel
from .specs import FeatureSpec

HF_CONFIG = "config.json"
HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
MODEL_TYPE = "merv"  # = merv.hf.MODEL_TYPE (train/ does not import merv.hf at module level)
LEGACY_CONFIG = "merv_config.json"
LEGACY_CONNECTOR = "connector.safetensors"
LEGACY_FORMAT = "merv-checkpoint"
LEGACY_VERSION = 1
MAX_SHARD_SIZE = "5GB"


class CheckpointError(MervError, ValueError):
    """A checkpoint does not fit the model (missing / unexpected / mis-shaped tensors)."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """A checkpoint that is not where it was asked for (a path, or the HF cache)."""


class NotAnExportError(CheckpointNotFoundError):
    """A path given as a model export is not one (missing, a store, a run directory, empty, broken)."""

    def __init__(self, path: str | os.PathLike[str], why: str) -> None:
        super().__init__(f"{path} is not a MERV export directory: {why}; pass the export directory "
                         "`merv train` writes (RUN/export, a config.json with model_type merv)")


# --- export ----------------------------------------------------------------------------------


def save_merv(
    model: MervModel,
    directory: str | os.PathLike[str],
    *,
    save_llm: bool = True,
    extra: dict[str, Any] | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
    encoders: list[dict[str, Any]] | None = None,
    eval_summary: dict[str, Any] | None = None,
    llm_adapter: str | None = None,
) -> Path:
    """Write a Hugging Face-native export directory (see the module docstring).

    `save_llm=False` (align stage) writes the connector only and records the LLM source.
    `state_dict`: the full model state (keys `connector.*`, `llm.*`) to write instead of the
    module's own, e.g. gathered from an FSDP-sharded model whose parameters are DTensors.
    `extra`: what the model card and `merv generate` read (recipe, stage, steps, encoder size);
    `encoders`: each encoder's provenance (name, fingerprint, store group, model id, frames).
    `llm_adapter`: the subfolder holding a LoRA adapter for the LLM (merv.train.lora.export_lora).
    """
    from merv.hf.modeling import MervForConditionalGeneration

    if not save_llm and not model.llm_source:
        raise ValueError("save_llm=False needs model.llm_source (where to load the LLM from later)")
    hf = MervForConditionalGeneration.from_merv_model(model, encoders=encoders, recipe=extra, llm_saved=save_llm,
                                                      llm_adapter=llm_adapter)
    return hf.save_export(directory, tokenizer=model.tokenizer, state_dict=state_dict, eval_summary=eval_summary,
                          max_shard_size=MAX_SHARD_SIZE)


def read_merv_config(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """What an export says about itself, in one shape for both layouts: connector, feature_specs,
    d_llm, llm {source, saved}, bos_token_id, prompt_format, extra (recipe, stage, ...), encoders,
    layout ("hf" | "legacy"). A path that is no export raises `NotAnExportError` saying what it is."""
    root = Path(directory)
    if (root / HF_CONFIG).is_file():
        cfg = _json_file(root, HF_CONFIG)
        if cfg.get("model_type") == MODEL_TYPE:
            lacking = [k for k in ("connector", "feature_specs", "text_config") if k not in cfg]
            if lacking:
                raise NotAnExportError(root, f"{HF_CONFIG} lacks {lacking}")
            return {
                "layout": "hf",
                "connector": cfg["connector"],
                "feature_specs": cfg["feature_specs"],
                "d_llm": int(cfg["text_config"]["hidden_size"]),
                "llm": {"source": cfg.get("llm_source"), "saved": bool(cfg.get("llm_saved", True))},
                "bos_token_id": cfg.get("bos_token_id") if cfg.get("visual_after_bos", True) else None,
                "prompt_format": cfg.get("prompt_format", "pure"),
                "visual_anchor": cfg.get("visual_anchor"),
                "extra": cfg.get("recipe") or {},
                "encoders": cfg.get("encoders") or [],
            }
        if not (root / LEGACY_CONFIG).is_file():
            raise NotAnExportError(root, f"its {HF_CONFIG} is a {cfg.get('model_type')!r} model, not a merv one")
    if not (root / LEGACY_CONFIG).is_file():
        raise NotAnExportError(root, _what_it_is(root))
    cfg = _json_file(root, LEGACY_CONFIG)
    if cfg.get("format") != LEGACY_FORMAT:
        raise NotAnExportError(root, f"{LEGACY_CONFIG} is not a {LEGACY_FORMAT} config")
    if int(cfg.get("version", 0)) > LEGACY_VERSION:
        raise CheckpointError(f"{root / LEGACY_CONFIG}: format {LEGACY_FORMAT} v{cfg.get('version')} is newer than "
                              f"this merv reads (v{LEGACY_VERSION}); upgrade merv")
    lacking = [k for k in ("connector", "feature_specs", "d_llm", "llm") if k not in cfg]
    if lacking:
        raise NotAnExportError(root, f"{LEGACY_CONFIG} lacks {lacking}")
    return {**cfg, "layout": "legacy", "encoders": cfg.get("encoders") or [], "extra": cfg.get("extra") or {}}


def _json_file(root: Path, name: str) -> dict[str, Any]:
    try:
        cfg = json.loads((root / name).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise NotAnExportError(root, f"{name} is not valid JSON ({exc})") from exc
    if not isinstance(cfg, dict):
        raise NotAnExportError(root, f"{name} is not a JSON object")
    return cfg


def check_export(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """`read_merv_config` plus the files loading needs, so a broken export fails before any other work."""
    root = Path(directory)
    cfg = read_merv_config(root)
    if cfg["layout"] == "hf":
        if not any((root / f).is_file() for f in HF_WEIGHTS):
            raise NotAnExportError(root, f"no weights ({' or '.join(HF_WEIGHTS)}; an interrupted export?)")
        return cfg
    needed = [LEGACY_CONNECTOR] + (["llm/config.json"] if cfg["llm"].get("saved") else [])
    absent = [f for f in needed if not (root / f).is_file()]
    if absent:
        raise NotAnExportError(root, f"{', '.join(absent)} missing (an interrupted export?)")
    return cfg


def _what_it_is(root: Path) -> str:
    """What a path that should be an export is instead, for the error message."""
    if not root.exists():
        return "no such file or directory"
    if not root.is_dir():
        return "it is a file"
    if (root / "export" / HF_CONFIG).is_file() or (root / "export" / LEGACY_CONFIG).is_file():
        return f"it is a training run directory; its export is {root / 'export'}"
    if (root / "zarr.json").is_file():
        return "it is a feature store"
    if not any(root.iterdir()):
        return "the directory is empty"
    return f"no {HF_CONFIG} in it"


def load_merv(
    directory: str | os.PathLike[str],
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    attn_implementation: str | None = None,
    llm_source: str | None = None,
) -> MervModel:
    """A `MervModel` from an export (either layout); the LLM from the directory, or from its
    recorded source (`llm_source` overrides it) when the export left it out."""
    from .llm import choose_attn_implementation

    root = Path(directory)
    cfg = check_export(root)
    attn = attn_implementation or choose_attn_implementation(device)
    if cfg["layout"] == "hf":
        model = _load_hf(root, cfg, dtype, attn, llm_source)
    else:
        model = _load_legacy(root, cfg, dtype, attn, llm_source)
    if device is not None:
        model.to(device)
    model.eval()
    return model


def _load_hf(root: Path, cfg: dict[str, Any], dtype: torch.dtype | None, attn: str, llm_source: str | None) -> MervModel:
    from merv.hf.configuration import MervConfig
    from merv.hf.modeling import MervForConditionalGeneration

    config = MervConfig.from_pretrained(str(root), local_files_only=True)
    if llm_source:
        config.llm_source = llm_source
    try:
        loaded = MervForConditionalGeneration.from_pretrained(
            str(root), config=config, local_files_only=True, dtype=dtype or "auto", attn_implementation=attn,
            output_loading_info=config.llm_saved)
    except (OSError, RuntimeError, ValueError) as exc:
        if isinstance(exc, MervError):
            raise
        raise CheckpointError(f"{root}: the weights do not load ({' '.join(str(exc).split())[:300]}); "
                              "re-export the model") from exc
    hf, info = loaded if isinstance(loaded, tuple) else (loaded, {})
    problems = {k.replace("_", " "): sorted(map(str, v)) for k, v in info.items()
                if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if problems:  # transformers would go on with random weights; a trained model must load whole
        parts = "; ".join(f"{k} {v[:6]}{' ...' if len(v) > 6 else ''}" for k, v in problems.items())
        raise CheckpointError(f"{root}: weights do not fit the model its config.json describes ({parts}); re-export it")
    return hf.as_merv_model()


def _load_legacy(root: Path, cfg: dict[str, Any], dtype: torch.dtype | None, attn: str,
                 llm_source: str | None) -> MervModel:
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .llm import load_llm, load_tokenizer

    specs = [FeatureSpec.from_dict(d) for d in cfg["feature_specs"]]
    connector = Connector(specs, int(cfg["d_llm"]), ConnectorConfig.from_dict(cfg["connector"]))
    load_strict(connector, load_file(str(root / LEGACY_CONNECTOR)), "connector")
    source = llm_source or cfg["llm"].get("source")
    if cfg["llm"].get("saved"):
        llm = AutoModelForCausalLM.from_pretrained(
            str(root / "llm"), local_files_only=True, trust_remote_code=False, dtype=dtype or "auto", attn_implementation=attn
        )
    else:
        if not source:
            raise CheckpointError(f"{root}: the LLM was not saved and no LLM source is recorded; re-export it with its LLM")
        llm, _ = load_llm(source, dtype=dtype or torch.bfloat16, attn_implementation=attn)
    tok_dir = root / "tokenizer"
    tokenizer = (
        AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True, trust_remote_code=False)
        if tok_dir.is_dir()
        else (load_tokenizer(source) if source else None)
    )
    return MervModel(connector, llm, tokenizer=tokenizer, bos_token_id=cfg.get("bos_token_id"),
                     prompt_format=cfg.get("prompt_format", "pure"), llm_source=source, visual_anchor=None)


def load_strict(module: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shape = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shape:
        parts = []
        if missing:
            parts.append(f"missing {missing[:8]}{' ...' if len(missing) > 8 else ''}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
        if shape:
            parts.append(f"shape mismatch {shape[:4]}")
        raise CheckpointError(f"{what} weights do not fit the model: " + "; ".join(parts))
    module.load_state_dict(state, strict=True)


# --- reference (published MERV) format -------------------------------------------------------

# Per projector kind: reference sub-key prefix -> ours (applied to the key after "{i}.").
_HEAD_RULES = {
    "linear": [("projector.projector.", "head.fc.")],
    "gelu-mlp": [("projector.projector.0.", "head.fc1."), ("projector.projector.2.", "head.fc2.")],
}
_PROJECTOR_RULES: dict[str, list[tuple[str, str]]] = {
    "avg2d": [],
    "avg3d": [],
    "conv2d": [("convolution_pooling.0.", "stage1."), ("convolution_pooling.2.", "stage2.")],
    "conv3d": [("convolution_pooling.0.", "conv.")],
    "attentive": [
        ("query_tokens", "queries"),
        ("cross_attn.norm1.", "block.norm1."),
        ("cross_attn.norm2.", "block.norm2."),
        ("cross_attn.xattn.q.", "block.q."),
        ("cross_attn.xattn.kv.", "block.kv."),
        ("cross_attn.xattn.proj.", "block.proj."),
        ("cross_attn.mlp.fc1.", "block.mlp.0."),
        ("cross_attn.mlp.fc2.", "block.mlp.2."),
    ],
}
# Projector-free baselines in the reference are bare LinearProjector / MLPProjector modules.
_BARE_HEAD_RULES = {
    "linear": [("projector.", "head.fc.")],
    "gelu-mlp": [("projector.0.", "head.fc1."), ("projector.2.", "head.fc2.")],
}
_FUSION_RULES: dict[str, list[tuple[str, str]]] = {
    "cross_attention": [("", "")],
    "concat_channel": [("projector.", "proj.")],
    "learnable_scalar": [("scalar", "logits")],
    "concat_sequence": [],
    "fixed_mix": [],
    "cross_attention_plain": [],
}


def _rename(key: str, rules: list[tuple[str, str]]) -> str | None:
    for old, new in rules:
        if key.startswith(old):
            return new + key[len(old) :]
    return None


def reference_to_merv_state(ref: dict[str, Any], connector: Connector) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Map a reference `model` dict onto (connector state dict, LLM state dict) in our key names."""
    ref = dict(ref)
    if "projectors" not in ref and "projector" in ref:  # single-encoder legacy layout
        ref["projectors"] = {f"0.{k}": v for k, v in ref["projector"].items()}
    if "feature_fusion" not in ref and "adapter" in ref:
        ref["feature_fusion"] = ref["adapter"]
    if "projectors" not in ref or "llm_backbone" not in ref:
        raise CheckpointError(f"not a MERV reference checkpoint: expected 'projectors' and 'llm_backbone' in ['model'], got {sorted(ref)}")
    cfg = connector.config
    if cfg.projector in ("all_tokens", "cls"):
        rules = _BARE_HEAD_RULES[cfg.head]
    else:
        rules = _PROJECTOR_RULES[cfg.projector] + _HEAD_RULES[cfg.head]
    conn: dict[str, torch.Tensor] = {}
    for key, value in ref["projectors"].items():
        m = re.match(r"(\d+)\.(.*)", key)
        new = _rename(m.group(2), rules) if m else None
        if new is None:
            raise CheckpointError(f"reference projector key {key!r} has no counterpart in projector {cfg.projector!r}+{cfg.head!r}")
        conn[f"projectors.{m.group(1)}.{new}"] = value  # type: ignore[union-attr]
    for key, value in (ref.get("feature_fusion") or {}).items():
        new = _rename(key, _FUSION_RULES[cfg.fusion])
        if new is None:
            raise CheckpointError(f"reference fusion key {key!r} has no counterpart in fusion {cfg.fusion!r}")
        conn[f"fusion.{new}"] = value
    llm = {}
    for key, value in ref["llm_backbone"].items():
        if not key.startswith("llm."):
            raise CheckpointError(f"reference LLM key {key!r} does not start with 'llm.'")
        llm[key[len("llm.") :]] = value
    return conn, llm


def load_reference_state(model: MervModel, ref: dict[str, Any] | str | os.PathLike[str]) -> None:
    """Load a reference checkpoint (path to the .pt, or its `["model"]` dict) into `model`, strictly."""
    if not isinstance(ref, dict):
        try:  # mmap: a 7B checkpoint is not read into memory twice
            ckpt = torch.load(str(ref), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) serialization cannot be memory-mapped
            ckpt = torch.load(str(ref), map_location="cpu", weights_only=True)
        ref = ckpt["model"] if "model" in ckpt else ckpt
    conn, llm = reference_to_merv_state(ref, model.connector)  # type: ignore[arg-type]
    dtype = next(model.llm.parameters()).dtype
    load_strict(model.connector, {k: v.to(dtype) for k, v in conn.items()}, "connector")
    own = model.llm.state_dict()
    tied = {"lm_head.weight"} if getattr(model.llm.config, "tie_word_embeddings", False) else set()
    # a tied lm_head may or may not be stored separately; every other key must match exactly
    llm = {k: v.to(dtype) for k, v in llm.items() if k in own or k not in tied}
    for k in tied & (set(own) - set(llm)):
        llm[k] = llm["model.embed_tokens.weight"]
    load_strict(model.llm, llm, "llm")
    model.connector.freeze_inert()


def connector_from_reference_config(model_cfg: dict[str, Any]) -> tuple[ConnectorConfig, list[FeatureSpec]]:
    """Reference run `config.json["model"]` -> our connector config and feature specs (paper grids)."""
    from .accounting import reference_backbone_spec

    arch = model_cfg["arch_specifier"].split("+")
    head = "gelu-mlp" if model_cfg["arch_specifier"].endswith("gelu-mlp") else "linear"
    frame = re.search(r"frame(\d+)", model_cfg["arch_specifier"])
    factor = int(frame.group(1)) if frame else 1
    kind, extra = "all_tokens", {}
    if "avg" in arch:
        kind = "avg2d"
    elif "3davg" in arch:
        kind, extra = "avg3d", {"frame_factor": factor}
    elif "conv" in arch:
        kind = "conv2d"
    elif "3dconv" in arch:
        kind, extra = "conv3d", {"frame_factor": factor, "conv3d_kernel": (3, 3, 3)}
    elif "attntv" in arch:
        kind = "attentive"
    fusion_map = {
        "cross_attention_avg_lq": "cross_attention",
        "concat": "concat_sequence",
        "concat_channel": "concat_channel",
        "scalar": "learnable_scalar",
    }
    ref_fusion = model_cfg.get("feature_fusion")
    if ref_fusion not in fusion_map:
        raise CheckpointError(f"reference feature_fusion {ref_fusion!r} is not supported; supported: {sorted(fusion_map)}")
    cfg = ConnectorConfig(
        projector=kind,
        head=head,
        tokens_per_frame=int(model_cfg.get("projector_token_length", 64)),
        fusion=fusion_map[ref_fusion],
        **extra,
    )
    specs = [reference_backbone_spec(b) for b in model_cfg["video_backbone_ids"]]
    return cfg, specs


PUBLISHED_REPO = "tyleryzhu/merv"  # the reference's published weights, one folder per model
PUBLISHED_MODELS = ("merv-frozen", "merv-full", "languagebind-single", "dinov2-single", "vivit-single",
                    "siglip-single")  # the reference's registry (merv/models/registry.py)


def is_published(source: str | os.PathLike[str]) -> bool:
    """A published model name (and not a local directory of that name)."""
    return str(source) in PUBLISHED_MODELS and not Path(source).exists()


def reference_config(source: str, cache_dir: str | None = None, allow_download: bool = False) -> dict[str, Any]:
    """The `model` section of a reference run's config.json (no weights are read)."""
    cfg_path, _ = _find_reference_files(source, cache_dir, allow_download, weights=False)
    return json.loads(cfg_path.read_text())["model"]


def _find_reference_files(source: str, cache_dir: str | None, allow_download: bool = False,
                          weights: bool = True) -> tuple[Path, Path]:
    root = Path(source)
    if root.is_dir():
        cfg, pt = root / "config.json", root / "checkpoints" / "latest-checkpoint.pt"
        if not cfg.is_file() or not pt.is_file():
            raise CheckpointNotFoundError(f"{root} must hold config.json and checkpoints/latest-checkpoint.pt (a MERV reference run directory)")
        return cfg, pt
    from huggingface_hub import hf_hub_download

    files = [f"{source}/config.json"] + ([f"{source}/checkpoints/latest-checkpoint.pt"] if weights else [])
    try:
        paths = [Path(hf_hub_download(PUBLISHED_REPO, f, cache_dir=cache_dir, local_files_only=not allow_download))
                 for f in files]
    except Exception as err:  # huggingface_hub raises several types when offline / missing
        known = "" if source in PUBLISHED_MODELS else f" (published models: {', '.join(PUBLISHED_MODELS)})"
        raise CheckpointNotFoundError(
            f"published MERV checkpoint {source!r}{known} is not in the HF cache (repo {PUBLISHED_REPO}); download it "
            f"where the Hub is reachable: `hf download {PUBLISHED_REPO} --include '{source}/*'` (or pass "
            f"--allow-download), or pass the run directory ({type(err).__name__})"
        ) from err
    return paths[0], (paths[1] if weights else paths[0])


def load_published_merv(
    source: str = "merv-frozen",
    *,
    tokenizer_source: str = "llama2-7b-pure",
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device | None = None,
    cache_dir: str | None = None,
    llm_config: Any = None,
    allow_download: bool = False,
) -> MervModel:
    """Load `merv-frozen` / `merv-full` / a single-encoder baseline (HF cache, offline unless
    `allow_download`) or a reference run directory.

    The LLM weights come from the checkpoint, so only the LLM's tokenizer must be local.
    `llm_config` defaults to LLaMA-2 7B with the reference's padded vocabulary (32064).
    """
    from .llm import choose_attn_implementation, empty_llm, ensure_pad_token, llama2_7b_config, load_tokenizer

    cfg_path, pt_path = _find_reference_files(source, cache_dir, allow_download)
    model_cfg = json.loads(cfg_path.read_text())["model"]
    if not str(model_cfg.get("llm_backbone_id", "")).startswith("llama2-7b"):
        raise CheckpointError(f"only LLaMA-2 7B reference checkpoints are supported, got {model_cfg.get('llm_backbone_id')!r}")
    conn_cfg, specs = connector_from_reference_config(model_cfg)
    tokenizer = load_tokenizer(tokenizer_source, model_max_length=model_cfg.get("llm_max_length"))
    llm = empty_llm(llm_config or llama2_7b_config(), dtype=dtype, attn_implementation=choose_attn_implementation(device))
    ensure_pad_token(llm, tokenizer)
    connector = Connector(specs, llm.config.hidden_size, conn_cfg)
    model = MervModel(connector, llm, tokenizer=tokenizer, prompt_format="pure", llm_source=tokenizer_source)
    load_reference_state(model, pt_path)
    if device is not None:
        model.to(device)
    model.requires_grad_(False)
    model.eval()
    return model


def convert_reference(
    source: str,
    out: str | os.PathLike[str],
    *,
    tokenizer_source: str = "llama2-7b-pure",
    dtype: torch.dtype = torch.bfloat16,
    cache_dir: str | None = None,
    llm_config: Any = None,
) -> Path:
    """A published MERV checkpoint (`merv-frozen`, `merv-full`, ... from the HF cache, or a reference
    run directory) written as a Hugging Face-native export."""
    from merv.store.paper import PAPER_ENCODERS

    model = load_published_merv(source, tokenizer_source=tokenizer_source, dtype=dtype, cache_dir=cache_dir,
                                llm_config=llm_config)
    encoders = [{"name": s.name, "model_id": PAPER_ENCODERS[s.name].model_id, "frames": PAPER_ENCODERS[s.name].frames,
                 "reference_id": PAPER_ENCODERS[s.name].reference_id}
                for s in model.connector.specs if s.name in PAPER_ENCODERS]
    return save_merv(model, out, encoders=encoders or None,
                     extra={"recipe": f"published:{Path(source).name}", "stage": "finetune", "encoder_size": "paper"})


def convert_export(source: str | os.PathLike[str], out: str | os.PathLike[str]) -> Path:
    """An export in the earlier layout (merv_config.json, connector.safetensors, llm/) rewritten as a
    Hugging Face-native one; weights and behaviour unchanged."""
    cfg = check_export(source)
    if Path(out).resolve() == Path(source).resolve():
        raise CheckpointError(f"{out}: write the converted export to a new directory, not over its source")
    model = load_merv(source)
    return save_merv(model, out, extra=cfg.get("extra") or {}, save_llm=bool(cfg["llm"].get("saved", True)))
