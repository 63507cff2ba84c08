"""JSON Lines parsing shared by every reader (manifests, instruction data, eval results, metrics).

One routine, so blank lines, line numbers and broken lines mean the same thing everywhere; each
caller turns a `JsonlLineError` into its own typed error with its own fix, or skips broken lines
where a killed writer can leave a torn last line (results, metrics).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any


class JsonlLineError(ValueError):
    """Line `lineno` (1-based) is not valid JSON; `msg` is the parser's reason."""

    def __init__(self, lineno: int, msg: str) -> None:
        super().__init__(f"line {lineno}: {msg}")
        self.lineno = lineno
        self.msg = msg


def jsonl_rows(text: str, on_broken: Callable[[int, str], None] | None = None) -> Iterator[tuple[int, Any]]:
    """(line number, value) of each non-blank line of `text`.

    A line that is not JSON raises `JsonlLineError`, or, given `on_broken`, is reported to it as
    (line number, reason) and skipped.
    """
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as exc:
            if on_broken is None:
                raise JsonlLineError(lineno, exc.msg) from None
            on_broken(lineno, exc.msg)
