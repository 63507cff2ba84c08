"""`merv serve` in a child process on a free port of 127.0.0.1, for tests, benchmarks and scripts.

One place for what every caller needs: a free port, the command line, waiting until `/health`
answers (loading a model takes seconds to minutes), failing with the server's own last output when
it dies first, and stopping it on exit.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from merv import MervError

POLL_S = 0.2


class ServerStartError(MervError, RuntimeError):
    """`merv serve` exited, or did not answer `/health` in time."""


@dataclass(frozen=True)
class RunningServer:
    process: subprocess.Popen[str]
    base: str  # http://127.0.0.1:PORT

    @property
    def api(self) -> str:
        """The OpenAI base URL (what `openai.OpenAI(base_url=...)` takes)."""
        return f"{self.base}/v1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def serve_process(export: str | Path, args: Sequence[str] = (), timeout_s: float = 240.0) -> Iterator[RunningServer]:
    """Run `merv serve EXPORT --port P ARGS...` until the block ends; yields once `/health` is 200.

    The server's output goes to a temporary file (a pipe nobody drains would block a chatty
    server); its tail is the error message when the server dies before answering."""
    port = free_port()
    cmd = [sys.executable, "-m", "merv.cli", "serve", str(export), "--port", str(port), *args]
    log = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True)
    server = RunningServer(proc, f"http://127.0.0.1:{port}")
    try:
        deadline = time.monotonic() + timeout_s
        while not _healthy(server.base):
            if proc.poll() is not None:
                log.seek(0)
                raise ServerStartError(f"merv serve exited with status {proc.returncode}: {log.read()[-3000:]}")
            if time.monotonic() > deadline:
                raise ServerStartError(f"merv serve did not answer /health within {timeout_s:.0f} s")
            time.sleep(POLL_S)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _healthy(base: str) -> bool:
    try:
        with urllib.request.urlopen(f"{base}/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False
