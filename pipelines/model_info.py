"""`merv model info`: a recipe's parameters and FLOPs, with any encoders (paper, hiera, timm:, hf:).

The paper's four have closed-form shapes (`merv.train.accounting`); every other encoder is
measured from a meta-device build (`merv.extract.encoders.cost`). This joins the two sides, which
`train` (no `extract` imports) cannot do itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def model_info(recipe: str, seq_len: int | None = None, encoders: Sequence[str] | None = None) -> Any:
    """The `ModelReport` of `recipe`, its encoders replaced by `encoders` when given."""
    from merv.train.recipes import recipe_report

    if not encoders:
        return recipe_report(recipe, seq_len)
    from merv.extract.encoders.cost import measure_encoder
    from merv.extract.encoders.registry import check_encoder_name
    from merv.train.accounting import PAPER_ENCODERS, EncoderCost
    from merv.train.specs import FeatureSpec

    names = [check_encoder_name(n) for n in encoders]
    measured = {}
    for name in names:
        if name not in PAPER_ENCODERS:
            m = measure_encoder(name)
            measured[name] = (FeatureSpec(name, m.grid, m.dim), EncoderCost(m.params, m.flops))
    return recipe_report(recipe, seq_len, names, measured)
