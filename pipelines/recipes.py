"""Named model recipes: encoders, connector, LLM and per-stage optimisation hyper-parameters.

Values are the paper's / reference configs' (DESIGN.md table; princetonvisualai/merv
`merv/conf/models.py`):
  merv-frozen             Stage 2 only (instruction tuning), connector + LLM: lr 2e-5, batch 128, wd 0.1
  merv-full               Stage 1 captioning with the LLM unfrozen (lr 1e-4, batch 256), then Stage 2
  merv-videollava-recipe  Stage 1 aligns the connector only (lr 1e-3, batch 256), then Stage 2
  <encoder>-single        single-encoder baselines (frozen recipe, one encoder)
  tiny                    CPU smoke / demo scale (tiny encoders, tiny in-process LLM)
  small                   CPU benchmark scale with the paper's proportions (see benchmarks/train_bench.py)
  paper-shape             the paper's encoders and LLaMA-2 7B shapes with random weights (GPU benchmarks)
Ablations derive from a recipe: `RECIPES["merv-frozen"].with_connector(projector="avg3d")`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from merv import MervError
from merv.train.connector import ConnectorConfig
from merv.train.paper import PAPER_ENCODER_ORDER, PAPER_ENCODERS, ModelReport, model_report
from merv.train.specs import FeatureSpec


class RecipeError(MervError, KeyError):
    """An unknown recipe, or a question a recipe cannot answer (e.g. paper sizes of tiny encoders).

    A KeyError for callers that look recipes up like a dict; printed without KeyError's quotes."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class StageRecipe:
    """One training stage; `stage` picks what is frozen (see MervModel.set_stage)."""

    stage: str  # align | finetune | full-align
    data: str  # "captioning" (Stage 1) | "instruct" (Stage 2)
    learning_rate: float
    global_batch_size: int
    per_device_batch_size: int
    epochs: int = 1
    max_steps: int | None = None
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    lr_schedule: str = "linear-warmup+cosine-decay"


FINETUNE = StageRecipe("finetune", "instruct", 2e-5, 128, 8, weight_decay=0.1)
FULL_ALIGN = StageRecipe("full-align", "captioning", 1e-4, 256, 16)
ALIGN = StageRecipe("align", "captioning", 1e-3, 256, 16)


@dataclass(frozen=True)
class ModelRecipe:
    name: str
    encoders: tuple[str, ...]  # encoder names, in fusion / checkpoint order
    frames: dict[str, int]  # input frames per encoder
    connector: ConnectorConfig
    llm: str  # merv.train.llm registry id, local dir, or an in-process LLM (tiny-llama, small-llama, ...)
    stages: tuple[StageRecipe, ...]
    size: str = "paper"  # encoder size for extraction: "paper" | "small" | "tiny"
    encoder_weights: str | None = None  # None: the size's default (paper: pretrained); "random": random init
    llm_max_length: int = 2048
    prompt_format: str | None = None  # None: the LLM's default
    published: str | None = None  # HF id of the released checkpoint (tyleryzhu/merv/<id>)
    description: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def feature_specs(self, available: dict[str, FeatureSpec] | list[FeatureSpec] | None = None) -> list[FeatureSpec]:
        """Specs in recipe order: from `available` (e.g. the store's groups) or the paper shapes."""
        if available is not None:
            by_name = available if isinstance(available, dict) else {s.name: s for s in available}
            missing = [e for e in self.encoders if e not in by_name]
            if missing:
                raise ValueError(f"recipe {self.name!r} needs encoder(s) {missing}; available: {sorted(by_name)} "
                                 "(extract them first: merv extract ... --encoders)")
            return [by_name[e] for e in self.encoders]
        if self.size != "paper":
            raise ValueError(f"recipe {self.name!r} ({self.size} encoders): pass the feature specs from the store (available=...)")
        return [PAPER_ENCODERS[e].spec for e in self.encoders]

    def with_connector(self, **changes: Any) -> ModelRecipe:
        return replace(self, connector=self.connector.with_(**changes))

    def report(self, seq_len: int | None = None, encoders: dict[str, Any] | None = None) -> ModelReport:
        """Parameters and FLOPs per sample at paper size (no weights needed)."""
        if self.size != "paper":
            paper = sorted(n for n, r in RECIPES.items() if r.size == "paper")
            raise RecipeError(f"recipe {self.name!r} uses {self.size} random encoders whose shapes come from a store; "
                              f"`merv model info` sizes the paper-size recipes: {', '.join(paper)}")
        if seq_len is not None and seq_len < 1:
            raise RecipeError(f"--seq-len {seq_len} must be a positive token count")
        return model_report(self.feature_specs(), self.connector, encoders=encoders, seq_len=seq_len or self.llm_max_length)

    def build(self, specs: list[FeatureSpec] | None = None, **kwargs: Any) -> Any:
        """The MervModel (see merv.train.build.build_merv for kwargs: dtype, device, seed...)."""
        from merv.train.build import build_merv

        return build_merv(
            specs or self.feature_specs(), self.connector, self.llm, prompt_format=self.prompt_format,
            model_max_length=self.llm_max_length, **kwargs,
        )


_PAPER_FRAMES = {n: PAPER_ENCODERS[n].frames for n in PAPER_ENCODER_ORDER}
MERV_CONNECTOR = ConnectorConfig()  # avg2d to 8x8, linear, cross-attention (3072-wide query)

_MERV_FROZEN = ModelRecipe(
    name="merv-frozen",
    encoders=PAPER_ENCODER_ORDER,
    frames=_PAPER_FRAMES,
    connector=MERV_CONNECTOR,
    llm="llama2-7b-pure",
    stages=(FINETUNE,),
    published="merv-frozen",
    description="MERV (frozen encoders): Stage 2 instruction tuning of connector + LLaMA-2 7B",
)


def _single(name: str) -> ModelRecipe:
    # One encoder: the cross-attention weight is identically 1, so the equal mix is the same model without dead parameters.
    return replace(
        _MERV_FROZEN,
        name=f"{name}-single",
        encoders=(name,),
        frames={name: _PAPER_FRAMES[name]},
        connector=MERV_CONNECTOR.with_(fusion="fixed_mix"),
        published=None,
        description=f"single-encoder baseline ({name}), MERV frozen recipe",
    )


RECIPES: dict[str, ModelRecipe] = {
    "merv-frozen": _MERV_FROZEN,
    "merv-full": replace(
        _MERV_FROZEN,
        name="merv-full",
        stages=(FULL_ALIGN, FINETUNE),
        published="merv-full",
        description="MERV (full): Stage 1 captioning with the LLM unfrozen, then Stage 2",
    ),
    "merv-videollava-recipe": replace(
        _MERV_FROZEN,
        name="merv-videollava-recipe",
        stages=(ALIGN, FINETUNE),
        published=None,
        description="Video-LLaVA recipe: Stage 1 aligns the connector only, then Stage 2",
    ),
    **{f"{n}-single": _single(n) for n in PAPER_ENCODER_ORDER},
    "tiny": ModelRecipe(
        name="tiny",
        encoders=PAPER_ENCODER_ORDER,
        frames=dict(_PAPER_FRAMES),  # tiny encoders take the paper's frame counts (16, 32 for ViViT)
        connector=ConnectorConfig(tokens_per_frame=4, fusion_embed_dim=64),
        llm="tiny-llama",
        stages=(
            StageRecipe("full-align", "captioning", 1e-3, 8, 4),
            StageRecipe("finetune", "instruct", 1e-3, 8, 4, weight_decay=0.1),
        ),
        size="tiny",
        llm_max_length=512,
        description="CPU smoke / demo scale: tiny random encoders and an in-process tiny LLaMA",
    ),
    "small": ModelRecipe(
        name="small",
        encoders=PAPER_ENCODER_ORDER,
        frames=dict(_PAPER_FRAMES),
        # the paper's connector: 64 tokens per frame, fusion query 3/4 of the LLM width (3072 / 4096)
        connector=ConnectorConfig(tokens_per_frame=64, fusion_embed_dim=384),
        llm="small-llama",
        stages=(StageRecipe("finetune", "instruct", 1e-4, 4, 2, weight_decay=0.1),),
        size="small",
        llm_max_length=2048,
        description=(
            "CPU benchmark scale with the paper's proportions: 4 small random encoders (the paper's inputs and "
            "16x16 / 14x14 grids pooled to 8x8, 4.1M parameters) and a 25M-parameter in-process LLaMA; "
            "1024 visual tokens per sample"
        ),
    ),
    "paper-shape": replace(
        _MERV_FROZEN,
        name="paper-shape",
        llm="llama2-7b-shape",
        encoder_weights="random",
        stages=(ALIGN, FINETUNE),
        published=None,
        description=(
            "the paper's compute without weights: the four paper encoders and a LLaMA-2 7B-shaped LLM, random "
            "init (GPU benchmarks: `train_bench --recipe paper-shape --stage align`)"
        ),
    ),
}


def get_recipe(name: str) -> ModelRecipe:
    if name not in RECIPES:
        raise RecipeError(f"recipe {name!r} is unknown; known: {', '.join(sorted(RECIPES))}")
    return RECIPES[name]
