"""`MervConfig`: a MERV model as a Hugging Face configuration (`model_type = "merv"`).

It holds what rebuilds the model without any other file: the connector's hyper-parameters, the
cached feature specs (encoder order = fusion order = weight layout), the LLM's own config as the
`text_config` sub-config, the prompt format, and the provenance of the visual inputs (each
encoder's name, model id, frames and the fingerprint of the store group it was trained on), so a
loader can refuse features from a different encoder configuration.

Written in the `__init__` style (not transformers 5's dataclass fields) so one class serves every
transformers version the project supports.
"""

from __future__ import annotations

from typing import Any

from transformers import AutoConfig, PretrainedConfig

MODEL_TYPE = "merv"


class MervConfig(PretrainedConfig):
    model_type = MODEL_TYPE
    sub_configs = {"text_config": AutoConfig}

    def __init__(
        self,
        text_config: PretrainedConfig | dict[str, Any] | None = None,
        connector: dict[str, Any] | None = None,
        feature_specs: list[dict[str, Any]] | None = None,
        encoders: list[dict[str, Any]] | None = None,
        prompt_format: str = "pure",
        llm_source: str | None = None,
        llm_saved: bool = True,
        visual_after_bos: bool = True,
        recipe: dict[str, Any] | None = None,
        llm_adapter: str | None = None,
        visual_anchor: list[int] | None = None,
        **kwargs: Any,
    ) -> None:
        if isinstance(text_config, dict):
            fields = dict(text_config)
            text_config = AutoConfig.for_model(fields.pop("model_type"), **fields)
        self.text_config = text_config
        self.connector = dict(connector or {})
        self.feature_specs = [dict(s) for s in feature_specs or []]
        self.encoders = [dict(e) for e in encoders or []]  # provenance: name, model_id, frames, fingerprint, ...
        self.prompt_format = prompt_format
        self.llm_source = llm_source  # registry id / path the LLM came from (needed when llm_saved is False)
        self.llm_saved = bool(llm_saved)  # False: align-stage export, the LLM weights come from llm_source
        self.visual_after_bos = bool(visual_after_bos)  # visual tokens follow BOS (False: Qwen-style, no BOS)
        # a LoRA adapter export: PEFT adapter files in this subfolder, applied to the LLM of llm_source
        self.llm_adapter = llm_adapter
        # without BOS: the visual tokens follow the first occurrence of these ids (the chat template's
        # user-turn opening, merv.train.prompts.user_turn_anchor); None: they go first
        self.visual_anchor = [int(i) for i in visual_anchor] if visual_anchor else None
        self.recipe = dict(recipe or {})  # recipe, stage, steps, encoder size: what the model card reports
        attn = getattr(text_config, "_attn_implementation", None)
        super().__init__(**kwargs)
        if attn is not None and kwargs.get("attn_implementation") is None:
            # the base class resets the sub-configs' attention kernel: a live LLM's config keeps its own
            self._attn_implementation = attn

    def get_text_config(self, *args: Any, **kwargs: Any) -> PretrainedConfig:
        """The LLM's config: generation (caches, vocabulary) reads it from here."""
        return self.text_config if self.text_config is not None else super().get_text_config(*args, **kwargs)

    def encoder_fingerprints(self) -> dict[str, str | None]:
        """{encoder name: store-group fingerprint it was trained on} (None where not recorded)."""
        return {e["name"]: e.get("fingerprint") for e in self.encoders}
