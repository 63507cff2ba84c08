"""`MervForConditionalGeneration`: a MERV model as a Hugging Face `PreTrainedModel` + `GenerationMixin`.

It holds the same two modules as the training model (`connector`, `llm`), under the same names, so
a training state dict is its state dict and `as_merv_model()` is a view sharing the weights (the
evaluation and training code keep using `MervModel`). Generation is transformers' own `generate`:
the visual tokens are merged into the prompt embeddings once (after BOS, or without one at the
start of the user turn, exactly as in training), then decoding runs on `inputs_embeds` with every
sampling option, stopping rule and streamer transformers offers.

An align-stage export may leave the LLM out (`config.llm_saved = False`): `from_pretrained` then
reads the LLM from `config.llm_source` and only the connector from the directory. A LoRA adapter
export (`config.llm_adapter`) also leaves it out and merges the PEFT adapter of that subfolder into
it (merv.train.lora); `llm_source` may name a directory inside the export (`base_llm`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
from transformers import AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration import MervConfig

if TYPE_CHECKING:
    from merv.train.connector import Connector
    from merv.train.model import MervModel

# merv.train is imported inside the methods: this module is loaded by the registration hook that
# runs when transformers finishes importing, possibly while a merv.train module is mid-import.

WEIGHTS_NAME = "model.safetensors"


@dataclass
class MervCausalLMOutput(CausalLMOutputWithPast):
    """The LLM's output plus the per-sample encoder weights of the fusion (None for concatenations)."""

    fusion_weights: torch.FloatTensor | None = None


class MervPreTrainedModel(PreTrainedModel):
    config_class = MervConfig
    base_model_prefix = "merv"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flash_attn_2 = True

    def _init_weights(self, module: nn.Module) -> None:
        """Nothing to do: the connector and the LLM initialise themselves when built, and loading
        fills every weight (a directory missing one is refused, see `from_pretrained`)."""


class MervForConditionalGeneration(MervPreTrainedModel, GenerationMixin):
    def __init__(self, config: MervConfig, *, llm: nn.Module | None = None, connector: Connector | None = None) -> None:
        given_attn = getattr(llm.config, "_attn_implementation", None) if llm is not None else None
        given_llm, given_connector = llm is not None, connector is not None
        super().__init__(config)
        if given_attn is not None:  # wrapping a live LLM: keep its attention kernel (the base class resets it)
            config._attn_implementation = given_attn
        from merv.train.connector import Connector, ConnectorConfig
        from merv.train.specs import FeatureSpec

        if llm is None:
            attn = getattr(config, "_attn_implementation", None) or getattr(config.text_config, "_attn_implementation", None)
            llm = AutoModelForCausalLM.from_config(config.text_config, **({"attn_implementation": attn} if attn else {}))
        config.text_config = llm.config  # one object: settings made on the model's config reach the LLM
        if connector is None:
            specs = [FeatureSpec.from_dict(s) for s in config.feature_specs]
            connector = Connector(specs, config.text_config.hidden_size, ConnectorConfig.from_dict(config.connector))
        for live in (m for m, given in ((llm, given_llm), (connector, given_connector)) if given):
            for module in live.modules():  # weights already trained / loaded: the base class must not re-initialise them
                module._is_hf_initialized = True
        self.llm = llm
        self.connector = connector
        tied = getattr(llm, "_tied_weights_keys", None)
        if tied and getattr(config.text_config, "tie_word_embeddings", False):  # the LLM's ties, under our prefix
            self._tied_weights_keys = ({f"llm.{k}": f"llm.{v}" for k, v in tied.items()} if isinstance(tied, dict)
                                       else [f"llm.{k}" for k in tied])
        self.post_init()

    # --- the training model's view and back ------------------------------------------------------

    @classmethod
    def from_merv_model(cls, model: MervModel, *, encoders: list[dict[str, Any]] | None = None,
                        recipe: dict[str, Any] | None = None, llm_saved: bool = True,
                        llm_adapter: str | None = None) -> MervForConditionalGeneration:
        """Wrap a training `MervModel` (its modules are shared, not copied)."""
        config = config_of(model, encoders=encoders or model.encoders or None, recipe=recipe, llm_saved=llm_saved,
                           llm_adapter=llm_adapter)
        hf = cls(config, llm=model.llm, connector=model.connector)
        if getattr(model.llm, "generation_config", None) is not None:
            hf.generation_config = model.llm.generation_config
        return hf

    def as_merv_model(self, tokenizer: Any = None) -> MervModel:
        """The `MervModel` (evaluation, training) over the same modules; `tokenizer` defaults to the
        one saved beside the weights."""
        from merv.train.model import MervModel

        if tokenizer is None and self.name_or_path and Path(self.name_or_path).is_dir():
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(self.name_or_path, local_files_only=True, trust_remote_code=False)
        bos = self.config.text_config.bos_token_id if self.config.visual_after_bos else None
        if tokenizer is not None and self.config.visual_after_bos:
            bos = tokenizer.bos_token_id
        model = MervModel(self.connector, self.llm, tokenizer=tokenizer, bos_token_id=bos,
                          prompt_format=self.config.prompt_format, llm_source=self.config.llm_source,
                          visual_anchor=self._visual_anchor())
        model.encoders = [dict(e) for e in self.config.encoders if e.get("fingerprint")]
        return model

    def _view(self) -> MervModel:
        """A tokenizer-less `MervModel` over the same modules, built once, for merging the visual
        tokens (kept out of the module tree so the weights are not listed twice)."""
        view = self.__dict__.get("_merv_view")
        if view is None:
            from merv.train.model import MervModel

            bos = self.config.bos_token_id if self.config.visual_after_bos else None
            view = MervModel(self.connector, self.llm, bos_token_id=bos, prompt_format=self.config.prompt_format,
                             llm_source=self.config.llm_source, visual_anchor=self._visual_anchor())
            self.__dict__["_merv_view"] = view
        return view

    def _visual_anchor(self) -> list[int] | None:
        """Where the visual tokens go without BOS, as trained (exports before the anchor: first)."""
        return getattr(self.config, "visual_anchor", None)

    # --- transformers plumbing ---------------------------------------------------------------------

    def get_input_embeddings(self) -> nn.Module:
        return self.llm.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.llm.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.llm.get_output_embeddings()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        features: dict[str, torch.Tensor] | None = None,
        has_visual: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        **kwargs: Any,
    ) -> MervCausalLMOutput:
        """With `features` ({encoder: (B, t, h, w, d)}): visual tokens merged where training put them
        (right-padded `input_ids`); without: the LLM on `input_ids` / `inputs_embeds`
        (what each decoding step of `generate` calls). `labels` give the answer-token loss."""
        from merv.train.model import causal_lm_loss

        weights = None
        if features is not None:
            if input_ids is None:
                raise ValueError("features need the prompt's input_ids (the visual tokens go after its BOS)")
            inputs_embeds, attention_mask, labels, weights = self._view().embed_multimodal(
                features, input_ids, attention_mask, labels, has_visual)
            input_ids = None
        out = self.llm(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask, **kwargs)
        loss = causal_lm_loss(out.logits, labels)[0] if labels is not None else None
        fields = {k: v for k, v in out.items() if k != "loss"}
        return MervCausalLMOutput(loss=loss, fusion_weights=weights, **fields)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor | None = None, features: dict[str, torch.Tensor] | None = None,
                 attention_mask: torch.Tensor | None = None, **kwargs: Any) -> Any:
        """transformers' `generate`, with the visual tokens of `features` merged into the prompt.

        `input_ids` are the prompts (left- or right-padded, `attention_mask` marks the tokens); with
        features the result holds only the new tokens (decoding starts from embeddings)."""
        if features is None:
            return super().generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        if input_ids is None:
            raise ValueError("generate(features=...) needs the prompt's input_ids")
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        rows = [ids[m.bool()].tolist() for ids, m in zip(input_ids, mask)]
        embeds, prefill_mask, _positions = self._view()._prefill(features, rows)
        return super().generate(inputs_embeds=embeds, attention_mask=prefill_mask, **kwargs)

    # --- saving and sharing -------------------------------------------------------------------------

    def save_export(self, directory: str | os.PathLike[str], *, tokenizer: Any = None,
                    state_dict: dict[str, torch.Tensor] | None = None, eval_summary: dict[str, Any] | None = None,
                    max_shard_size: str = "5GB") -> Path:
        """The whole model directory: `save_pretrained` (config, generation config, safetensors,
        sharded with an index above `max_shard_size`), the tokenizer with the processor's frame
        rules, and the MERV model card. `tokenizer` defaults to the one this model was loaded with."""
        from .card import model_card
        from .processing import MervProcessor

        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        state = state_dict if state_dict is not None else self.state_dict()
        state = {k: v.detach().contiguous().cpu() for k, v in state.items()
                 if self.config.llm_saved or k.startswith("connector.")}
        self.save_pretrained(str(out), state_dict=state, max_shard_size=max_shard_size)
        if tokenizer is None and self.name_or_path and Path(self.name_or_path).is_dir():
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(self.name_or_path, local_files_only=True, trust_remote_code=False)
        if tokenizer is not None:
            MervProcessor.from_config(self.config, tokenizer).save_pretrained(out)
        (out / "README.md").write_text(model_card(self.config, eval_summary))
        return out

    def push_to_hub(self, repo_id: str, *, tokenizer: Any = None, private: bool | None = None, token: str | None = None,
                    revision: str | None = None, commit_message: str = "Upload MERV model", create_pr: bool = False,
                    max_shard_size: str = "5GB", **_: Any) -> Any:
        """Upload the directory `save_export` writes. (transformers' own `push_to_hub` would replace
        the model card, which says which encoders and features the weights expect, with a generic one.)"""
        import tempfile

        from huggingface_hub import HfApi

        api = HfApi(token=token)
        repo = api.create_repo(repo_id, private=private, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            self.save_export(tmp, tokenizer=tokenizer, max_shard_size=max_shard_size)
            return api.upload_folder(repo_id=repo.repo_id, folder_path=tmp, commit_message=commit_message,
                                     revision=revision, create_pr=create_pr)

    # --- loading -----------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike[str], *args: Any,
                        **kwargs: Any) -> MervForConditionalGeneration:
        """transformers' loader; an export without LLM weights (align stage) reads the LLM from its source."""
        config = kwargs.get("config")
        if not isinstance(config, MervConfig):
            config = MervConfig.from_pretrained(pretrained_model_name_or_path, **_hub_kwargs(kwargs))
        if config.llm_saved:
            return super().from_pretrained(pretrained_model_name_or_path, *args, **{**kwargs, "config": config})
        return _connector_only(cls, Path(pretrained_model_name_or_path), config, kwargs.get("dtype"))


def config_of(model: MervModel, *, encoders: list[dict[str, Any]] | None = None, recipe: dict[str, Any] | None = None,
              llm_saved: bool = True, llm_adapter: str | None = None) -> MervConfig:
    """The `MervConfig` describing a training `MervModel`."""
    text_config = model.llm.config
    tok = model.tokenizer
    return MervConfig(
        text_config=text_config,
        connector=model.connector.config.to_dict(),
        feature_specs=[s.to_dict() for s in model.connector.specs],
        encoders=encoders or [{"name": s.name} for s in model.connector.specs],
        prompt_format=model.prompt_format,
        llm_source=model.llm_source,
        llm_saved=llm_saved,
        llm_adapter=llm_adapter,
        visual_after_bos=model.bos_token_id is not None,
        visual_anchor=list(model.visual_anchor) if model.visual_anchor else None,
        recipe=recipe,
        bos_token_id=model.bos_token_id,
        eos_token_id=tok.eos_token_id if tok is not None else text_config.eos_token_id,
        pad_token_id=tok.pad_token_id if tok is not None else text_config.pad_token_id,
        tie_word_embeddings=bool(getattr(text_config, "tie_word_embeddings", False)),
    )


def _hub_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    names = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder")
    return {k: kwargs[k] for k in names if k in kwargs}


def _connector_only(cls: type[MervForConditionalGeneration], root: Path, config: MervConfig,
                    dtype: Any) -> MervForConditionalGeneration:
    from safetensors.torch import load_file

    from merv.train.export import CheckpointError, load_strict
    from merv.train.llm import load_llm

    if not config.llm_source:
        raise CheckpointError(f"{root}: the LLM was not saved and no llm_source is recorded; re-export it with its LLM")
    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype)
    inside = root / config.llm_source  # an adapter export of an in-process LLM carries its base
    source = str(inside) if config.llm_adapter and inside.is_dir() else config.llm_source
    llm, _ = load_llm(source, dtype=dtype if isinstance(dtype, torch.dtype) else torch.bfloat16)
    if config.llm_adapter:
        from merv.train.lora import load_adapter

        llm = load_adapter(llm, root / config.llm_adapter)
    model = cls(config, llm=llm)
    state = load_file(str(root / WEIGHTS_NAME))
    load_strict(model.connector, {k[len("connector."):]: v for k, v in state.items() if k.startswith("connector.")},
                "connector")
    model.connector.to(dtype=next(llm.parameters()).dtype)
    model.name_or_path = str(root)
    model.eval()
    return model
