"""MERV as an lmms-eval model: `lmms-eval --model merv --model_args pretrained=DIR[,store=STORE] ...`.

Registered out of tree through lmms-eval's entry-point group `lmms_eval.models` (see
pyproject.toml), which lmms-eval reads whenever it lists or resolves models. This module stays
import-light on purpose: lmms-eval imports every entry point of the group at start-up, so the model
class (`merv.lmms.model.MervLMM`) is named by its path and only imported for `--model merv`.
"""

from __future__ import annotations

from typing import Any

MODEL_ID = "merv"
MODEL_CLASS = "merv.lmms.model.MervLMM"


def manifests() -> list[Any]:
    """The entry point's payload: one simple (not chat) model, since MERV answers generation and
    likelihood tasks alike and lmms-eval's chat models take generation tasks only."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id=MODEL_ID, simple_class_path=MODEL_CLASS)]
