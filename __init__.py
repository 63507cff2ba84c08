"""MERV as a feature-caching two-phase pipeline.

Phase 1 (`merv.extract`) decodes each video once and runs the frozen encoders once into a zarr
feature store (`merv.store`); phase 2 (`merv.train`) streams those cached features through the
connector and the LLM. `merv.pipelines` holds named recipes and jobs built from the three.
"""

__version__ = "0.1.0"
