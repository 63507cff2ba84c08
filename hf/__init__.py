"""MERV as a Hugging Face model: `MervConfig`, `MervForConditionalGeneration`, registered with the
Auto classes (`model_type: merv`) when `merv` is imported; never through `trust_remote_code`."""

from __future__ import annotations

from .configuration import MODEL_TYPE, MervConfig
from .modeling import MervCausalLMOutput, MervForConditionalGeneration, MervPreTrainedModel
from .processing import MervProcessor

_REGISTERED = {"done": False}


def register() -> None:
    """Register the MERV classes with transformers' Auto classes (idempotent)."""
    if _REGISTERED["done"]:
        return
    from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor

    AutoConfig.register(MODEL_TYPE, MervConfig, exist_ok=True)
    AutoProcessor.register(MervConfig, MervProcessor, exist_ok=True)
    AutoModel.register(MervConfig, MervForConditionalGeneration, exist_ok=True)
    AutoModelForImageTextToText.register(MervConfig, MervForConditionalGeneration, exist_ok=True)
    _REGISTERED["done"] = True


register()  # importing merv.hf is what `import merv` arranges once transformers is imported

__all__ = ["MODEL_TYPE", "MervCausalLMOutput", "MervConfig", "MervForConditionalGeneration", "MervPreTrainedModel",
           "MervProcessor", "register"]
