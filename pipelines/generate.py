"""`merv generate`: answer a question about a raw video with an exported model.

The inputs are taken in order of cost so a bad one fails in seconds with its own error: the
export's config, then the video (decoded once, as extraction decodes it) and the encoders
(weights), and only then the LLM. The encoders run once, before the model is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass

from merv.train.online import OnlineEncoders


@dataclass(frozen=True)
class GenerateOptions:
    """What `merv generate` may change; None means "as the checkpoint's recipe says"."""

    size: str | None = None  # encoder size: paper | small | tiny
    weights: str | None = None  # encoder weights directory (else the recipe's, else the HF cache)
    allow_download: bool = False
    device: str | None = None
    max_new_tokens: int | None = None  # None: MervModel.generate's default


def answer_video(checkpoint: str, video: str, question: str, opts: GenerateOptions = GenerateOptions()) -> str:
    """The model's answer to `question` about `video` (a path, fsspec URL or image)."""
    from merv.train.export import check_export, load_merv
    from merv.train.recipes import RECIPES, get_recipe
    from merv.train.specs import FeatureSpec

    cfg = check_export(checkpoint)
    extra = cfg.get("extra", {})
    if "encoder_size" in extra:  # what the run trained with (merv train records it)
        trained = (extra["encoder_size"], extra.get("encoder_weights"))
    else:  # older exports: the recipe's
        name = str(extra.get("recipe"))
        model = get_recipe(name).model if name in RECIPES else None
        trained = (model.encoder_size, model.encoder_weights) if model else ("paper", None)
    size = opts.size or trained[0]
    weights = opts.weights or (trained[1] if not opts.size else None)
    specs = [FeatureSpec.from_dict(d) for d in cfg["feature_specs"]]
    encoders = OnlineEncoders(specs, size=size, weights=weights, allow_download=opts.allow_download, device=opts.device)
    features = encoders.encode_path(video)
    model = load_merv(checkpoint, device=opts.device)
    features = {name: x.to(model.device) for name, x in features.items()}
    limit = {} if opts.max_new_tokens is None else {"max_new_tokens": opts.max_new_tokens}
    return model.generate(features, model.build_prompt(question), **limit).text
