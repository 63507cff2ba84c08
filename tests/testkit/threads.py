"""A module-scoped autouse fixture: torch on one thread for the module's tests.

The tiny models' ops are too small to gain from threads; one thread avoids contention on busy
2-core hosts. Import it into a test module (`from testkit.threads import one_thread`) to apply it.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
