"""Model checkpoints: our own export format, and the published MERV (reference) checkpoints.

Our format (a directory; training-state checkpoints with torch.distributed.checkpoint live elsewhere):
  merv_config.json          connector config, feature specs, LLM source + config, BOS id, prompt format
  connector.safetensors     connector weights (`projectors.{i}.*`, `fusion.*`)
  llm/                      the LLM as a plain HF model directory (config.json + model.safetensors)
  tokenizer/                the tokenizer (HF `save_pretrained`)

Reference format (`torch.load(...)["model"]`, see princetonvisualai/merv `MERV.from_pretrained`): state
dicts `projectors` (a ModuleList, `{i}.projector.projector.weight` for `3davg+linear`),
`feature_fusion` (`Q`, `attention.{q,k,v}_proj_weight`, `attention.in_proj_bias`,
`attention.out_proj.*`) and `llm_backbone` (`llm.model.*`, `llm.lm_head.weight`); older files use
`projector` (one encoder) and `adapter` for the fusion.
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

CONFIG_NAME = "merv_config.json"
CONNECTOR_WEIGHTS = "connector.safetensors"
FORMAT = "merv-checkpoint"
VERSION = 1


class CheckpointError(MervError, ValueError):
    """A checkpoint does not fit the model (missing / unexpected / mis-shaped tensors)."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """A checkpoint that is not where it was asked for (a path, or the HF cache)."""


class NotAnExportError(CheckpointNotFoundError):
    """A path given as a model export is not one (missing, a store, a run directory, empty, broken)."""

    def __init__(self, path: str | os.PathLike[str], why: str) -> None:
        super().__init__(f"{path} is not a MERV export directory: {why}; pass the export directory "
                         "`merv train` writes (RUN/export, holding merv_config.json)")


# --- our format ------------------------------------------------------------------------------


def save_merv(
    model: MervModel,
    directory: str | os.PathLike[str],
    *,
    save_llm: bool = True,
    extra: dict[str, Any] | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write the export directory; `save_llm=False` (align stage) records only the LLM source.

    `state_dict`: the full model state (keys `connector.*`, `llm.*`) to write instead of the
    module's own, e.g. gathered from an FSDP-sharded model whose parameters are DTensors.
    """
    from safetensors.torch import save_file

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    if state_dict is None:
        connector_sd = model.connector.state_dict()
        llm_sd = None
    else:
        connector_sd = {k[len("connector."):]: v for k, v in state_dict.items() if k.startswith("connector.")}
        llm_sd = {k[len("llm."):]: v for k, v in state_dict.items() if k.startswith("llm.")}
    state = {k: v.detach().contiguous().cpu() for k, v in connector_sd.items()}
    save_file(state, str(out / CONNECTOR_WEIGHTS), metadata={"format": FORMAT})
    if save_llm:
        model.llm.save_pretrained(str(out / "llm"), safe_serialization=True, state_dict=llm_sd)
    elif not model.llm_source:
        raise ValueError("save_llm=False needs model.llm_source (where to load the LLM from later)")
    if model.tokenizer is not None:
        model.tokenizer.save_pretrained(str(out / "tokenizer"))
    config = {
        "format": FORMAT,
        "version": VERSION,
        "connector": model.connector.config.to_dict(),
        "feature_specs": [s.to_dict() for s in model.connector.specs],
        "d_llm": model.connector.d_llm,
        "num_visual_tokens": model.num_visual_tokens,
        "llm": {"source": model.llm_source, "saved": save_llm, "config": model.llm.config.to_dict()},
        "bos_token_id": model.bos_token_id,
        "prompt_format": model.prompt_format,
        "stage": model.stage,
        "extra": extra or {},
    }
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2, default=str))
    return out


def read_merv_config(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """The export's merv_config.json; a path that is no export raises `NotAnExportError` saying what it is."""
    root = Path(directory)
    path = root / CONFIG_NAME
    if not path.is_file():
        raise NotAnExportError(root, _what_it_is(root))
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise NotAnExportError(root, f"{CONFIG_NAME} is not valid JSON ({exc})") from exc
    if not isinstance(cfg, dict) or cfg.get("format") != FORMAT:
        raise NotAnExportError(root, f"{CONFIG_NAME} is not a {FORMAT} config")
    if int(cfg.get("version", 0)) > VERSION:
        raise CheckpointError(f"{path}: format {FORMAT} v{cfg.get('version')} is newer than this merv reads (v{VERSION}); upgrade merv")
    lacking = [k for k in ("connector", "feature_specs", "d_llm", "llm") if k not in cfg]
    if lacking:
        raise NotAnExportError(root, f"{CONFIG_NAME} lacks {lacking}")
    return cfg


def check_export(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """`read_merv_config` plus the files loading needs, so a broken export fails before any other work."""
    root = Path(directory)
    cfg = read_merv_config(root)
    needed = [CONNECTOR_WEIGHTS] + (["llm/config.json"] if cfg["llm"].get("saved") else [])
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
    if (root / "export" / CONFIG_NAME).is_file():
        return f"it is a training run directory; its export is {root / 'export'}"
    if (root / "zarr.json").is_file():
        return "it is a feature store"
    if not any(root.iterdir()):
        return "the directory is empty"
    return f"no {CONFIG_NAME} in it"


def load_merv(
    directory: str | os.PathLike[str],
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    attn_implementation: str | None = None,
    llm_source: str | None = None,
) -> MervModel:
    """Rebuild a `MervModel` from `save_merv` output (LLM from `llm/`, or from its recorded source)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .llm import choose_attn_implementation, load_llm, load_tokenizer

    root = Path(directory)
    cfg = check_export(root)
    specs = [FeatureSpec.from_dict(d) for d in cfg["feature_specs"]]
    connector = Connector(specs, int(cfg["d_llm"]), ConnectorConfig.from_dict(cfg["connector"]))
    _load_strict(connector, load_file(str(root / CONNECTOR_WEIGHTS)), "connector")
    attn = attn_implementation or choose_attn_implementation(device)
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
    model = MervModel(
        connector, llm, tokenizer=tokenizer, bos_token_id=cfg.get("bos_token_id"), prompt_format=cfg.get("prompt_format", "pure"), llm_source=source
    )
    if device is not None:
        model.to(device)
    model.eval()
    return model


def _load_strict(module: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
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
    _load_strict(model.connector, {k: v.to(dtype) for k, v in conn.items()}, "connector")
    own = model.llm.state_dict()
    tied = {"lm_head.weight"} if getattr(model.llm.config, "tie_word_embeddings", False) else set()
    # a tied lm_head may or may not be stored separately; every other key must match exactly
    llm = {k: v.to(dtype) for k, v in llm.items() if k in own or k not in tied}
    for k in tied & (set(own) - set(llm)):
        llm[k] = llm["model.embed_tokens.weight"]
    _load_strict(model.llm, llm, "llm")
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


def _find_reference_files(source: str, cache_dir: str | None) -> tuple[Path, Path]:
    root = Path(source)
    if root.is_dir():
        cfg, pt = root / "config.json", root / "checkpoints" / "latest-checkpoint.pt"
        if not cfg.is_file() or not pt.is_file():
            raise CheckpointNotFoundError(f"{root} must hold config.json and checkpoints/latest-checkpoint.pt (a MERV reference run directory)")
        return cfg, pt
    from huggingface_hub import hf_hub_download

    try:
        cfg = hf_hub_download("tyleryzhu/merv", f"{source}/config.json", cache_dir=cache_dir, local_files_only=True)
        pt = hf_hub_download("tyleryzhu/merv", f"{source}/checkpoints/latest-checkpoint.pt", cache_dir=cache_dir, local_files_only=True)
    except Exception as err:  # huggingface_hub raises several types when offline / missing
        raise CheckpointNotFoundError(
            f"published MERV checkpoint {source!r} is not in the HF cache; download it on a machine with internet: "
            f"`hf download tyleryzhu/merv --include '{source}/*'`, or pass the run directory ({err})"
        ) from err
    return Path(cfg), Path(pt)


def load_published_merv(
    source: str = "merv-frozen",
    *,
    tokenizer_source: str = "llama2-7b-pure",
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device | None = None,
    cache_dir: str | None = None,
    llm_config: Any = None,
) -> MervModel:
    """Load `merv-frozen` / `merv-full` (HF cache, offline) or a reference run directory.

    The LLM weights come from the checkpoint, so only the LLM's tokenizer must be local.
    `llm_config` defaults to LLaMA-2 7B with the reference's padded vocabulary (32064).
    """
    from .llm import choose_attn_implementation, empty_llm, ensure_pad_token, llama2_7b_config, load_tokenizer

    cfg_path, pt_path = _find_reference_files(source, cache_dir)
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
