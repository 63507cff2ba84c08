"""One model thread that batches the server's generations.

Requests are decoded (PyAV, in the request's own thread) before they reach the engine; the engine
thread encodes their frames and runs `GenerationSession.generate`. Requests that arrive within
`window_s` of each other with the same sampling options go through one batched `generate` (up to
`max_batch`); a streaming request runs alone, its text handed out piece by piece. Keeping every
model call on one thread means no lock around the model and no two forwards competing for memory.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from merv.pipelines.generate import Answer, GenerateOptions, GenerationSession


class StreamClosed(RuntimeError):
    """The client of a streaming request went away: its generation stops at the next token."""


@dataclass
class Job:
    prompt: list[int]
    selected: dict[str, Any]  # each encoder's frames (MervProcessor.visual)
    opts: GenerateOptions
    on_text: Callable[[str], None] | None = None  # streaming
    future: Future = field(default_factory=Future)

    def batch_key(self) -> Any:
        return None if self.on_text is not None else self.opts


class Engine:
    def __init__(self, session: GenerationSession, *, max_batch: int = 8, window_s: float = 0.01) -> None:
        self.session = session
        self.max_batch = max_batch
        self.window_s = window_s
        self.batches: list[int] = []  # sizes of the batches run (the tests read it)
        self.closed_early = 0  # streams whose client left before the end (their generation stopped)
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="merv-engine", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> Future:
        self._queue.put(job)
        return job.future

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            jobs, later = [first], []
            if first.batch_key() is not None:
                while len(jobs) < self.max_batch:
                    try:
                        job = self._queue.get(timeout=self.window_s)
                    except queue.Empty:
                        break
                    if job is None:
                        later.append(job)
                        break
                    (jobs if job.batch_key() == first.batch_key() else later).append(job)
            self._execute(jobs)
            for job in later:
                self._queue.put(job)

    def _execute(self, jobs: list[Job]) -> None:
        try:
            features = [self.session.encoders.encode_inputs(job.selected) for job in jobs]
            answers: list[Answer] = self.session.generate([j.prompt for j in jobs], features, jobs[0].opts,
                                                          jobs[0].on_text)
        except Exception as exc:  # noqa: BLE001 - reported to each request; the engine keeps serving
            if isinstance(exc, StreamClosed):
                self.closed_early += 1
            for job in jobs:
                job.future.set_exception(exc)
            return
        self.batches.append(len(jobs))
        for job, answer in zip(jobs, answers, strict=True):
            job.future.set_result(answer)
