"""MERV as a feature-caching two-phase pipeline.

Phase 1 (`merv.extract`) decodes each video once and runs the frozen encoders once into a zarr
feature store (`merv.store`); phase 2 (`merv.train`) streams those cached features through the
connector and the LLM. `merv.pipelines` holds named recipes and jobs built from the three.
"""

__version__ = "0.1.0"


class MervError(Exception):
    """An error caused by the user's input or environment, not by a bug in merv.

    Its message names the input at fault and the fix, in one line. The command line prints it
    as such (exit status 2) and shows a traceback only with `merv --debug`; every typed error of
    the packages (stores, sources, decoding, weights, training config, data, checkpoints,
    evaluation) derives from it.
    """
