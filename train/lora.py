"""LoRA on the LLM (PEFT): the config, wrapping, which parameters train, and the two export forms.

What trains with `model.llm.lora.r > 0`: the LoRA A / B matrices PEFT adds to the LLM's chosen linear
layers (`target_modules`; default every linear layer of the decoder, PEFT's "all-linear", which never
includes the LM head) and the whole connector. The base LLM stays frozen, embeddings and LM head
included: the rows `ensure_pad_token` adds for `<PAD>` (and the padding to a multiple of 64) are only
ever looked up at padded positions, which attention masks out and the loss ignores, so they need no
training. Per stage: `align` trains the connector only (adapters frozen too), `finetune` and
`full-align` train connector + adapters (instead of connector + LLM).

PEFT wraps the LLM (`PeftModelForCausalLM`); `MervModel.llm` is that wrapper, FSDP2 shards the
decoder layers of the base model inside it (`merv.train.llm.decoder_layers` unwraps it) and each
unit holds frozen base weights and trainable adapters together (FSDP2 allows mixed `requires_grad`
in one unit; gradients exist only for the adapters). The optimizer holds state for trainable
parameters only, and checkpoints hold only the trainable tensors (see `merv.train.resume`): the
frozen rest is rebuilt from the same configuration on resume.

Exports (`model.llm.lora.export`): `merged` folds B @ A * alpha / r into the base weights (PEFT's
`merge_and_unload`), a normal export that needs no PEFT to load; `adapter` writes the connector
and PEFT's adapter files (`llm_adapter/`) and points to the base LLM (`llm_source`); an LLM built
in-process (tiny-llama, ...) has no files anywhere, and one from an earlier export (`init_from`) is
not what its source loads, so their base weights go to `base_llm/` beside the adapter.

QLoRA (`qlora: true`, a 4-bit NF4 base) needs bitsandbytes on CUDA; elsewhere it is refused.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn as nn

from merv import MervError

ADAPTER_DIR = "llm_adapter"  # in an adapter export: PEFT's adapter_config.json + adapter_model.safetensors
BASE_DIR = "base_llm"  # in an adapter export of an in-process LLM: the base weights the adapter applies to
ALL_LINEAR = "all-linear"  # PEFT: every linear layer except the output head


class LoraError(MervError, ValueError):
    """A LoRA setting that cannot work here; the message names the setting and the fix."""


@dataclass(frozen=True)
class LoraConfig:
    """LoRA adapters on the LLM (`model.llm.lora.*`); `r: 0` trains the whole LLM instead."""

    r: int = 0  # adapter rank; 0: no LoRA (full finetune of the LLM)
    alpha: float = 16.0  # the update is scaled by alpha / r
    dropout: float = 0.05  # on the adapter's input (the QLoRA paper's value for 7B-13B models)
    target_modules: tuple[str, ...] = (ALL_LINEAR,)  # module names (q_proj, v_proj, ...) or "all-linear"
    export: Literal["merged", "adapter"] = "merged"  # the form of RUN/export (see the module docstring)
    qlora: bool = False  # 4-bit NF4 base weights (bitsandbytes, CUDA only)

    def __post_init__(self) -> None:
        if self.r < 0:
            raise ValueError(f"r must be >= 0 (0: no LoRA), not {self.r}")
        if self.alpha <= 0:
            raise ValueError(f"alpha must be positive, not {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), not {self.dropout}")
        if not self.target_modules:
            raise ValueError(f"target_modules must name at least one module, or be [{ALL_LINEAR}]")
        if self.qlora and not self.r:
            raise ValueError("qlora needs LoRA adapters: set r > 0 too")

    @property
    def enabled(self) -> bool:
        return self.r > 0

    def peft_config(self) -> Any:
        """The same settings as PEFT's `LoraConfig` (a causal-LM task, so exports load with
        `AutoPeftModelForCausalLM`)."""
        from peft import LoraConfig as PeftLoraConfig
        from peft import TaskType

        targets: Any = ALL_LINEAR if ALL_LINEAR in self.target_modules else list(self.target_modules)
        return PeftLoraConfig(task_type=TaskType.CAUSAL_LM, r=self.r, lora_alpha=self.alpha,
                              lora_dropout=self.dropout, target_modules=targets, bias="none")


def parse_lora_spec(text: str) -> LoraConfig:
    """`"r=16"`, `"r=8,alpha=16,target_modules=q_proj+v_proj"` -> LoraConfig (`merv model info --lora`)."""
    from .configurable import ConfigError, build_config, parse_override

    values: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, value = parse_override(part)
        if key == "target_modules" and isinstance(value, str):
            value = value.split("+")
        values[key] = value
    try:
        return build_config(LoraConfig, values, f"--lora {text!r}")
    except ConfigError:
        raise
    except ValueError as exc:
        raise ConfigError(f"--lora {text!r}: {exc}") from None


def check_qlora(config: LoraConfig, device: torch.device | str | None = None) -> None:
    """Refuse QLoRA where it cannot run, in one line saying why and what to do."""
    if not config.qlora:
        return
    on_cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
    if not on_cuda:
        raise LoraError("model.llm.lora.qlora: QLoRA quantizes the base LLM to 4 bits with bitsandbytes, which runs "
                        "on CUDA GPUs only, and this run is on CPU; use plain LoRA here (qlora: false)")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise LoraError("model.llm.lora.qlora: QLoRA needs bitsandbytes, which is not installed; "
                        "`pip install bitsandbytes` (CUDA), or use plain LoRA (qlora: false)")
    raise LoraError("model.llm.lora.qlora: a 4-bit base under FSDP2 is not supported by this merv version; "
                    "use plain LoRA (qlora: false)")


def apply_lora(llm: nn.Module, config: LoraConfig) -> nn.Module:
    """The LLM wrapped with fresh LoRA adapters (B = 0: the wrapped model computes what `llm` did).

    The adapters' random A matrices come from the torch RNG: callers seed it (ModelConfig.build)."""
    from peft import get_peft_model

    with warnings.catch_warnings():
        # PEFT asks transformers' deprecated `is_gradient_checkpointing` while wrapping
        warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        return get_peft_model(llm, config.peft_config())


def is_lora(llm: nn.Module) -> bool:
    return hasattr(llm, "peft_config") and hasattr(llm, "get_base_model")


def unwrap(llm: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT wrapper (the LLM itself otherwise)."""
    return llm.get_base_model() if is_lora(llm) else llm  # type: ignore[operator]


def is_adapter_param(name: str) -> bool:
    return ".lora_" in name


def set_trainable(llm: nn.Module, train: bool) -> None:
    """Freeze the LLM; with LoRA, `train` unfreezes the adapters only, else the whole LLM."""
    llm.requires_grad_(train and not is_lora(llm))
    if train and is_lora(llm):
        for name, p in llm.named_parameters():
            if is_adapter_param(name):
                p.requires_grad_(True)


def adapted_linears(llm: nn.Module) -> dict[str, tuple[int, int]]:
    """{module name: (in_features, out_features)} of every layer carrying a LoRA adapter."""
    from peft.tuners.lora import LoraLayer

    return {name: (m.in_features, m.out_features) for name, m in llm.named_modules() if isinstance(m, LoraLayer)}


# ----------------------------------------------------------------------------- export


def export_lora(model: Any, state: dict[str, torch.Tensor], directory: str | os.PathLike[str], config: LoraConfig,
                *, base_from_source: bool = True, **save_kwargs: Any) -> Path:
    """Write RUN/export from a LoRA-trained model's full state (rank 0; `state` as gathered by
    `merv.train.resume.full_model_state`): `merged` or `adapter` (module docstring).

    `base_from_source=False`: the base LLM is not what `model.llm_source` loads (it came from an
    earlier export, `model.init_from`), so an adapter export carries it in `base_llm/`.

    The live model may be FSDP-sharded, so the export is built on a CPU copy of its structure:
    allocated without initialisation (`empty_llm`) and given the gathered tensors themselves."""
    from peft import PeftModel

    from .connector import Connector
    from .export import save_merv
    from .llm import empty_llm
    from .model import MervModel

    base = unwrap(model.llm)
    dtype = next(iter(state.values())).dtype
    attn = getattr(base.config, "_attn_implementation", None) or "sdpa"
    copy_llm = apply_lora(empty_llm(base.config, dtype=dtype, attn_implementation=attn), config)
    connector = Connector(model.connector.specs, model.connector.d_llm, model.connector.config)
    copy = MervModel(connector, copy_llm, tokenizer=model.tokenizer, bos_token_id=model.bos_token_id,
                     prompt_format=model.prompt_format, llm_source=model.llm_source)
    copy.encoders = list(model.encoders)
    copy.load_state_dict(state, strict=True, assign=True)
    if getattr(base, "generation_config", None) is not None:
        unwrap(copy.llm).generation_config = base.generation_config
    out = Path(directory)
    assert isinstance(copy.llm, PeftModel)
    if config.export == "merged":
        copy.llm = copy.llm.merge_and_unload()
        return save_merv(copy, out, **save_kwargs)
    resized = base_from_source and _resized(copy.llm, model.llm_source)
    copy.llm.save_pretrained(str(out / ADAPTER_DIR), save_embedding_layers=resized)
    copy.llm = copy.llm.unload()  # the base LLM, without the adapters
    if not base_from_source or model.llm_source is None or _in_process(model.llm_source):
        copy.llm.save_pretrained(str(out / BASE_DIR))
        if model.tokenizer is not None:
            model.tokenizer.save_pretrained(str(out / BASE_DIR))
        copy.llm_source = BASE_DIR  # relative: the loader looks inside the export first
    _point_adapter(out / ADAPTER_DIR, copy.llm_source)
    return save_merv(copy, out, save_llm=False, llm_adapter=ADAPTER_DIR, **save_kwargs)


def _in_process(source: str) -> bool:
    from .build import IN_PROCESS_LLMS

    return source in IN_PROCESS_LLMS


def _resized(llm: nn.Module, source: str | None) -> bool:
    """Whether the embeddings differ in shape from the base on disk (merv added `<PAD>` rows):
    then the adapter carries the embedding and LM-head weights, or the reloaded rows would be new
    random ones."""
    if source is None or _in_process(source):
        return False  # the base is written whole beside the adapter
    from transformers import AutoConfig

    from .llm import resolve_llm_source

    try:
        on_disk = AutoConfig.from_pretrained(resolve_llm_source(source), local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError):
        return True
    return int(unwrap(llm).get_input_embeddings().weight.shape[0]) != int(on_disk.vocab_size)


def _point_adapter(adapter_dir: Path, source: str | None) -> None:
    """adapter_config.json names the base LLM the adapter applies to (PEFT's pointer)."""
    import json

    from .llm import resolve_llm_source

    path = adapter_dir / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg["base_model_name_or_path"] = resolve_llm_source(source) if source and source != BASE_DIR else f"../{BASE_DIR}"
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True))


def load_adapter(llm: nn.Module, adapter_dir: Path) -> nn.Module:
    """`llm` with the adapter of an export merged into it (inference: no PEFT layers left)."""
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        wrapped = PeftModel.from_pretrained(llm, str(adapter_dir), is_trainable=False)
    return wrapped.merge_and_unload()
