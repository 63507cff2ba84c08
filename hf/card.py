"""The model card (`README.md`) written beside an exported MERV model.

It says what the weights are (recipe, stage, steps, LLM), which visual features they expect (each
encoder with its model id, frames, grid and the fingerprint of the store group it was trained on:
features from another encoder configuration are refused), how to load it, and the evaluation table
when one is given.
"""

from __future__ import annotations

from typing import Any

from .configuration import MervConfig


def model_card(config: MervConfig, eval_summary: dict[str, Any] | None = None) -> str:
    recipe = config.recipe or {}
    llm = config.llm_source or getattr(config.text_config, "_name_or_path", "") or config.text_config.model_type
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: video-text-to-text",
        "tags: [merv, video-llm, multi-encoder]",
        "---",
        "",
        "# MERV model",
        "",
        "Multi-Encoder Representation of Videos (MERV, ICML 2025): per-encoder projectors and a cross-attention "
        "fusion of frozen video encoders' features, feeding a causal LLM. Saved by `merv`; load it with "
        "`import merv` (which registers `model_type: merv` with transformers' Auto classes, no remote code).",
        "",
        "| | |",
        "|---|---|",
        f"| recipe | {recipe.get('recipe', '-')} |",
        f"| stage | {recipe.get('stage', '-')} |",
        f"| training steps | {recipe.get('steps', '-')} |",
        f"| LLM | {llm} ({_llm_weights(config)}) |",
        f"| prompt format | {config.prompt_format} |",
        f"| fusion | {config.connector.get('fusion', '-')}, projector {config.connector.get('projector', '-')}, "
        f"{config.connector.get('tokens_per_frame', '-')} tokens per frame |",
        f"| training data | {', '.join(recipe.get('data', []) or ['-'])} |",
        "",
        "## Visual inputs",
        "",
        "| encoder | model id | frames | feature grid (t, h, w) | dim | encoder fingerprint |",
        "|---|---|---|---|---|---|",
    ]
    specs = {s["name"]: s for s in config.feature_specs}
    for enc in config.encoders:
        spec = specs.get(enc["name"], {})
        lines.append(f"| {enc['name']} | {enc.get('model_id') or '-'} | {enc.get('frames') or '-'} | "
                     f"{tuple(spec.get('grid', ())) or '-'} | {spec.get('dim', '-')} | `{enc.get('fingerprint') or '-'}` |")
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "import merv  # registers the MERV classes with transformers",
        "from transformers import AutoModelForImageTextToText",
        "",
        'model = AutoModelForImageTextToText.from_pretrained("THIS_DIRECTORY")',
        "```",
        "",
        "or from the command line: `merv generate VIDEO \"question\" --checkpoint THIS_DIRECTORY`.",
    ]
    if eval_summary:
        lines += ["", "## Evaluation", "", "| benchmark | accuracy | questions |", "|---|---|---|"]
        for name, row in eval_summary.items():
            acc = row.get("accuracy")
            lines.append(f"| {name} | {'-' if acc is None else f'{100 * acc:.1f}%'} | {row.get('n', row.get('count', '-'))} |")
    return "\n".join(lines) + "\n"


def _llm_weights(config: Any) -> str:
    if config.llm_saved:
        return "weights included"
    adapter = getattr(config, "llm_adapter", None)
    if adapter:
        return f"base weights loaded from the LLM source, LoRA adapter in `{adapter}/` (PEFT)"
    return "weights not included: loaded from the LLM source"
