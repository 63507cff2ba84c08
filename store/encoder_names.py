"""Encoder names: the registry's short names and the generic specs `timm:<arch>.<tag>` / `hf:<repo>`.

A generic spec carries its options URL-style, e.g. `timm:vit_base_patch16_clip_224.openai?layer=-2&frames=16`.
Everything keyed by encoder name (store groups, feature specs, configs, the connector, exports) uses
the *canonical* form, so two spellings of one encoder are one encoder: options sorted, defaults
dropped (`?frames=16&layer=-2` == `?layer=-2&frames=16` == no options). The fingerprint, not the name,
guards the numbers; the name only has to be stable and readable.

Store group keys and file names cannot hold `/ : ? & =`, so they use `slug()` of the name (plus the
group fingerprint, which keeps two specs with one slug apart). It lives in `merv.store`, the
bottom of the import graph, so `train` can canonicalise names without importing `merv.extract`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from merv import MervError

GENERIC_KINDS = ("timm", "hf")
# Options of a generic spec and their defaults (the paper's convention for image experts:
# 16 frames per clip, the output of the second-to-last block).
OPTION_DEFAULTS: dict[str, int] = {"frames": 16, "layer": -2}
SPEC_SYNTAX = "timm:<arch>.<tag>[?layer=N&frames=N] or hf:<repo id | /local/dir>[?layer=N&frames=N]"
_SLUG = re.compile(r"[^A-Za-z0-9._-]+")


class EncoderNameError(MervError, ValueError):
    """An encoder name or generic spec that cannot be parsed (says the syntax)."""


@dataclass(frozen=True)
class GenericSpec:
    """A parsed generic encoder spec: `kind:target?options`."""

    kind: str  # "timm" | "hf"
    target: str  # timm "<arch>.<tag>", an HF repo id, or a local directory
    options: dict[str, int] = field(default_factory=dict)  # explicit non-default options only

    @property
    def frames(self) -> int:
        return self.options.get("frames", OPTION_DEFAULTS["frames"])

    @property
    def layer(self) -> int:
        return self.options.get("layer", OPTION_DEFAULTS["layer"])

    @property
    def name(self) -> str:
        """The canonical name: options sorted, defaults dropped."""
        opts = "&".join(f"{k}={v}" for k, v in sorted(self.options.items()))
        return f"{self.kind}:{self.target}" + (f"?{opts}" if opts else "")


def is_generic(name: str) -> bool:
    return any(name.startswith(f"{kind}:") for kind in GENERIC_KINDS)


def parse_generic(name: str) -> GenericSpec:
    """`timm:...` / `hf:...` -> GenericSpec, or one EncoderNameError naming the problem."""
    kind, _, rest = name.strip().partition(":")
    if kind not in GENERIC_KINDS or not rest:
        raise EncoderNameError(f"encoder {name!r}: expected {SPEC_SYNTAX}")
    target, _, query = rest.partition("?")
    target = target.strip()
    if not target:
        raise EncoderNameError(f"encoder {name!r}: nothing after {kind}:; expected {SPEC_SYNTAX}")
    options: dict[str, int] = {}
    for item in filter(None, query.split("&")):
        key, eq, value = item.partition("=")
        key = key.strip()
        if key not in OPTION_DEFAULTS or not eq:
            raise EncoderNameError(f"encoder {name!r}: option {item!r} is not one of "
                                   f"{', '.join(f'{k}=N' for k in OPTION_DEFAULTS)}")
        if key in options:
            raise EncoderNameError(f"encoder {name!r}: option {key!r} given twice")
        try:
            number = int(value.strip())
        except ValueError:
            raise EncoderNameError(f"encoder {name!r}: option {key}={value!r} must be an integer") from None
        if key == "frames" and number < 1:
            raise EncoderNameError(f"encoder {name!r}: frames={number} must be at least 1")
        options[key] = number
    options = {k: v for k, v in options.items() if v != OPTION_DEFAULTS[k]}
    return GenericSpec(kind, target, options)


def canonical_encoder_name(name: str) -> str:
    """The one spelling of an encoder: registry names as given (stripped), generic specs canonical."""
    name = str(name).strip()
    return parse_generic(name).name if is_generic(name) else name


def slug(name: str) -> str:
    """`name` with every character a path or URL treats specially replaced by `_` (store keys, files)."""
    return _SLUG.sub("_", name).strip("_") or "encoder"
