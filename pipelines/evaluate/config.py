"""`EvalConfig`: everything one `merv eval` needs, as a strict dataclass (file form: `--config
eval.yaml`, dotted `--set key=value`, shorthand flags; see `load_eval_config`).

Defaults live here once: `RunOptions` holds how a benchmark is answered (the `run_benchmark`
settings), `EvalConfig` adds what to evaluate and where, `JudgeConfig` (judge.py) the judge.
Pure Python: the CLI reads and prints configs without loading a model.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from merv.train.configurable import ConfigError, load_config

from .judge import JudgeConfig

MODES = ("generate", "loglik")
DEFAULT_MODE = MODES[0]
LL_TARGETS = ("option", "letter")
LL_NORMS = ("mean", "sum")
DTYPES = ("float32", "bfloat16", "float16")
DEFAULT_MAX_NEW_TOKENS = {"mcq": 32, "open": 128}  # when max_new_tokens is None
DEFAULT_SYNC_TIMEOUT_S = 24 * 3600.0  # how long rank 0 of a torchrun evaluation waits for the others


def check_choice(key: str, value: Any, choices: Sequence[Any], flag: str | None = None) -> None:
    """A value outside its choices -> ConfigError naming the key (and the CLI flag) and the choices."""
    if value not in choices:
        where = f"{flag} / {key}" if flag else key
        raise ConfigError(f"{where} {value!r} is unknown; use one of {', '.join(map(str, choices))}")


@dataclass
class RunOptions:
    """How a benchmark is answered and checked (the settings of `run_benchmark`)."""

    batch_size: int = 8  # questions per forward (loglik: x options)
    max_new_tokens: int | None = None  # None: DEFAULT_MAX_NEW_TOKENS of the benchmark's kind
    ll_target: str = "option"  # loglik scores the option text, or its letter
    ll_norm: str = "mean"  # loglik compares mean (per answer token) or summed log-likelihoods
    id_prefix: str = ""  # prepended to every sample id (as given to `merv eval-manifest --id-prefix`)
    fingerprints: dict[str, str] = field(default_factory=dict)  # encoder -> fingerprint, to pick groups
    check_windows: bool = True  # refuse features extracted with another window than the question's
    skip_missing: bool = False  # questions without features are recorded wrong instead of refused
    resume: bool = True  # keep rows already answered with the same settings

    def check(self) -> None:
        check_choice("ll_target", self.ll_target, LL_TARGETS)
        check_choice("ll_norm", self.ll_norm, LL_NORMS)
        if self.batch_size < 1:
            raise ConfigError(f"batch_size {self.batch_size}: must be >= 1 (--batch-size)")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens {self.max_new_tokens}: must be >= 1 (--max-new-tokens)")


@dataclass
class _Inputs:
    """What is evaluated and where the results go (a base class only so these keys come first in a file)."""

    checkpoint: str | None = None  # export directory of `merv train`
    benchmarks: list[str] = field(default_factory=list)  # eval_data directories
    store: str | None = None  # feature store holding the benchmarks' clips
    out: str = "runs/eval"
    mode: str = DEFAULT_MODE  # MCQ answering; open-ended sets always generate


@dataclass
class EvalConfig(RunOptions, _Inputs):
    """One evaluation: a checkpoint on benchmarks from a feature store, results in `out`."""

    device: str = "auto"  # auto (cuda:LOCAL_RANK when available) | cpu | cuda | cuda:N
    dtype: str | None = None  # None: the checkpoint's
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    sync_timeout_s: float = DEFAULT_SYNC_TIMEOUT_S

    def check(self, complete: bool = True) -> None:
        """Values in range; with `complete`, also every input a run needs."""
        super().check()
        check_choice("mode", self.mode, MODES, "--mode")
        if self.dtype is not None:
            check_choice("dtype", self.dtype, DTYPES)
        if complete:
            for key, flag in (("checkpoint", "CHECKPOINT"), ("store", "--store")):
                if not getattr(self, key):
                    raise ConfigError(f"{key} is not set; pass {flag} or set {key}: in --config")
            if not self.benchmarks:
                raise ConfigError("benchmarks is empty; pass --benchmark DIR (repeatable) or set benchmarks: in --config")

    def run_options(self) -> RunOptions:
        """The RunOptions part of this config."""
        return RunOptions(**{k: getattr(self, k) for k in RunOptions.__dataclass_fields__})


def load_eval_config(
    file: str | os.PathLike[str] | None = None,
    overrides: Sequence[str] = (),
    shorthands: Mapping[str, Any] | None = None,
) -> EvalConfig:
    """Defaults, then `file`, then the CLI's shorthand flags (dotted key -> value; None = not given),
    then `--set` overrides; strict about unknown keys; values checked (not completeness)."""
    extra: dict[str, Any] = {}
    for key, value in (shorthands or {}).items():
        if value is None:
            continue
        node = extra
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    cfg = load_config(EvalConfig, file=file, overrides=overrides, extra=extra)
    cfg.check(complete=False)
    return cfg


