"""Test-suite setup. pytest runs with --import-mode=importlib, which does not put the tests folder
on sys.path; the shared helper modules (helpers_media, helpers_llm, helpers_train) live here, so
add it once instead of loading them by path in every file."""

from __future__ import annotations

import sys
from pathlib import Path

_HERE = str(Path(__file__).parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
