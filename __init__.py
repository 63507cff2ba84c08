"""MERV as a feature-caching two-phase pipeline.

Phase 1 (`merv.extract`) decodes each video once and runs the frozen encoders once into a zarr
feature store (`merv.store`); phase 2 (`merv.train`) streams those cached features through the
connector and the LLM (`merv.train` also owns the run configuration and the recipes); `merv.hf`
is the model as a Hugging Face `PreTrainedModel`; `merv.pipelines` holds the jobs built on them
(evaluation, ablations, the demo).
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from typing import Any

__version__ = "0.1.0"


class MervError(Exception):
    """An error caused by the user's input or environment, not by a bug in merv.

    Its message names the input at fault and the fix, in one line. The command line prints it
    as such (exit status 2) and shows a traceback only with `merv --debug`; every typed error of
    the packages (stores, sources, decoding, weights, training config, data, checkpoints,
    evaluation) derives from it.
    """


def _register_with_transformers() -> None:
    """Importing `merv.hf` registers its classes; when it is being imported right now (its own
    import of transformers brought us here), it registers itself when that import completes."""
    if "merv.hf" not in sys.modules:
        import merv.hf  # noqa: F401


class _AfterTransformersImport(importlib.abc.MetaPathFinder):
    """Registers the MERV classes with transformers' Auto classes once transformers is imported.

    `import merv` stays light (the CLI and the Ray workers do not pay transformers' import), yet
    `import merv; AutoModel.from_pretrained(export)` works whichever is imported first. Hand-written
    because the standard library has no post-import hook.
    """

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name != "transformers":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run = spec.loader.exec_module

        def exec_module(module: Any) -> None:
            run(module)
            _register_with_transformers()

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


if "transformers" in sys.modules:
    _register_with_transformers()
elif not any(isinstance(f, _AfterTransformersImport) for f in sys.meta_path):
    sys.meta_path.insert(0, _AfterTransformersImport())
