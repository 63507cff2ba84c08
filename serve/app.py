"""The FastAPI application: OpenAI-compatible chat completions for a MERV model.

Routes: `POST /v1/chat/completions` (messages whose content is text or parts of type `text`,
`image_url`, `video_url`; one image or video per request; `stream: true` answers with server-sent
events), `GET /v1/models`, `GET /health`. Every refusal is a 4xx with OpenAI's error body; an
internal failure of one request is a 500 for that request only. Bound to 127.0.0.1 unless asked.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import queue
import sys
import threading
import time
import uuid
import weakref
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from merv import MervError

from .engine import Engine, Job, StreamClosed
from .media import MediaError, check_video, local_media


@dataclass(frozen=True)
class ServeConfig:
    """Server settings; the limits bound what one request may cost."""

    host: str = "127.0.0.1"  # loopback only unless the operator opens it
    port: int = 8000
    model_name: str | None = None  # the id clients send as `model`; default: the checkpoint's directory name
    api_key: str | None = None  # when set, requests need `Authorization: Bearer <key>`
    max_upload_bytes: int = 200 * 2**20  # a base64 upload or a local file
    max_video_seconds: float = 3600.0
    max_video_frames: int = 200_000
    max_tokens: int = 1024  # the most `max_tokens` a request may ask for
    default_max_tokens: int = 128
    max_pending: int = 64  # requests admitted at once; more get 429
    max_batch: int = 8
    batch_window_ms: float = 10.0
    allow_local_files: bool = True  # video_url / image_url may name a file on the server (loopback use)


class RequestError(MervError, ValueError):
    def __init__(self, message: str, status: int = 400, code: str = "invalid_request") -> None:
        super().__init__(message)
        self.status, self.code = status, code


def _error(status: int, message: str, code: str = "invalid_request") -> Any:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "code": code, "param": None}}, status_code=status)


def _visual_and_text(messages: Any) -> tuple[str, str | None, str | None]:
    """(question, system prompt, visual url) of a chat; one visual input, in a user message."""
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list")
    system, texts, urls = None, [], []
    for message in messages:
        if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant"):
            raise RequestError("each message needs a role: system, user or assistant")
        content = message.get("content")
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(parts, list):
            raise RequestError("message content must be a string or a list of content parts")
        for part in parts:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                if message["role"] == "system":
                    system = str(part.get("text", ""))
                elif message["role"] == "user":
                    texts.append(str(part.get("text", "")))
            elif kind in ("image_url", "video_url"):
                ref = part.get(kind)
                url = ref.get("url") if isinstance(ref, dict) else ref
                if not isinstance(url, str) or not url:
                    raise RequestError(f"a {kind} part needs a url")
                urls.append(url)
            else:
                raise RequestError(f"content part type {kind!r} is not supported (text, image_url, video_url)")
    if len(urls) > 1:
        raise RequestError("one image or video per request: MERV answers about a single visual input")
    question = "\n".join(t for t in texts if t).strip()
    if not question:
        raise RequestError("the user message has no text")
    return question, system, (urls[0] if urls else None)


def create_app(session: Any, config: ServeConfig = ServeConfig()) -> Any:
    """The FastAPI app over a loaded `GenerationSession` (its model loads here, once)."""
    from merv.pipelines.generate import GenerateOptions

    session.model  # noqa: B018 - load the LLM before the first request, not during it
    name = config.model_name or _default_name(session.checkpoint)
    engine = Engine(session, max_batch=config.max_batch, window_s=config.batch_window_ms / 1000)
    admitted = Slots(config.max_pending)
    created = int(time.time())
    @contextlib.asynccontextmanager
    async def lifespan(_app: Any) -> Any:
        yield
        engine.close()

    app = FastAPI(title="merv serve", version="1", lifespan=lifespan)
    app.state.engine = engine
    app.state.model_name = name

    @app.middleware("http")
    async def authenticate(request: Request, call_next: Any) -> Any:
        if config.api_key and request.url.path.startswith("/v1/"):
            if request.headers.get("authorization", "") != f"Bearer {config.api_key}":
                return _error(401, "missing or wrong API key (Authorization: Bearer <key>)", "invalid_api_key")
        return await call_next(request)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": name, "generations": sum(engine.batches), "batches": len(engine.batches),
                "in_flight": admitted.used, "streams_closed_early": engine.closed_early}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": "merv"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return _error(400, "the request body is not JSON")
        if not isinstance(body, dict):
            return _error(400, "the request body must be a JSON object")
        if body.get("model") != name:
            return _error(404, f"model {body.get('model')!r} does not exist here; this server serves {name!r}",
                          "model_not_found")
        if not admitted.acquire():
            return _error(429, "too many requests in flight; retry shortly", "rate_limit_exceeded")
        try:
            question, system, url, opts = _parse(body)
            job = await run_in_threadpool(_prepare, session, question, system, url, opts, config)
        except (RequestError, MediaError) as exc:
            admitted.release()
            return _error(getattr(exc, "status", 400), str(exc))
        except MervError as exc:  # a video or image that cannot be decoded: the reason, as a 400
            admitted.release()
            return _error(400, str(exc), "invalid_media")
        request_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        if body.get("stream"):
            return StreamingResponse(_stream(engine, job, name, request_id, len(job.prompt), admitted),
                                     media_type="text/event-stream")
        try:
            answer = await asyncio.wrap_future(engine.submit(job))
        except Exception as exc:  # noqa: BLE001 - this request fails; the server goes on
            return _error(500, f"generation failed: {exc}", "generation_failed")
        finally:
            admitted.release()
        return {"id": request_id, "object": "chat.completion", "created": int(time.time()), "model": name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": answer.text},
                             "finish_reason": answer.finish_reason}],
                "usage": {"prompt_tokens": len(job.prompt), "completion_tokens": answer.completion_tokens,
                          "total_tokens": len(job.prompt) + answer.completion_tokens}}

    def _parse(body: dict[str, Any]) -> tuple[str, str | None, str | None, GenerateOptions]:
        question, system, url = _visual_and_text(body.get("messages"))
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens")) or config.default_max_tokens
        if not isinstance(max_tokens, int) or not 1 <= max_tokens <= config.max_tokens:
            raise RequestError(f"max_tokens must be an integer in 1..{config.max_tokens}")
        temperature = float(body.get("temperature") if body.get("temperature") is not None else 0.0)
        top_p = float(body.get("top_p") if body.get("top_p") is not None else 1.0)
        if not 0.0 <= temperature <= 2.0 or not 0.0 < top_p <= 1.0:
            raise RequestError("temperature must be in [0, 2] and top_p in (0, 1]")
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
            raise RequestError("stop must be a string or a list of up to 4 non-empty strings")
        seed = body.get("seed")
        opts = GenerateOptions(max_new_tokens=max_tokens, temperature=temperature, top_p=top_p, stop=tuple(stop),
                               seed=int(seed) if isinstance(seed, int) else 0)
        return question, system, url, opts

    return app


def _prepare(session: Any, question: str, system: str | None, url: str | None, opts: Any, config: ServeConfig) -> Job:
    """Check and decode the visual input (the request's thread), tokenise the prompt: the engine job."""
    if url is None:
        raise RequestError("a MERV model answers about an image or a video: add an image_url or video_url part")
    prompt = session.prompt_ids(question, system)
    limit = session.model.tokenizer.model_max_length
    if isinstance(limit, int) and len(prompt) + session.model.num_visual_tokens + opts.max_new_tokens > limit:
        raise RequestError(f"the prompt ({len(prompt)} tokens) with the visual tokens and max_tokens exceeds the "
                           f"model's context of {limit} tokens")
    with local_media(url, max_bytes=config.max_upload_bytes, allow_local_files=config.allow_local_files) as path:
        check_video(path, max_seconds=config.max_video_seconds, max_frames=config.max_video_frames)
        selected, _ = session.processor.visual(str(path))
    return Job(prompt, selected, opts)


def _stream(engine: Engine, job: Job, name: str, request_id: str, prompt_tokens: int,
            admitted: Slots) -> Any:
    """Server-sent events of a streaming completion (OpenAI's chunk format, then [DONE]).

    The request's slot is released exactly once: when the stream ends or is closed, or, for a
    stream never started (the client left before the first byte), when the generator is collected.
    A client that disconnects mid-stream stops its generation at the next token."""
    release = _once(admitted.release)
    events = _events(engine, job, name, request_id, release)
    weakref.finalize(events, release)
    return events


class Slots:
    """Requests admitted at once (`max_pending`; more get 429), counted for /health."""

    def __init__(self, size: int) -> None:
        self.size, self.used = size, 0
        self._lock = threading.Lock()

    def acquire(self) -> bool:
        with self._lock:
            if self.used >= self.size:
                return False
            self.used += 1
            return True

    def release(self) -> None:
        with self._lock:
            self.used -= 1


def _once(fn: Any) -> Any:
    lock, done = threading.Lock(), [False]

    def call() -> None:
        with lock:
            if done[0]:
                return
            done[0] = True
        fn()

    return call


def _events(engine: Engine, job: Job, name: str, request_id: str, release: Any) -> Any:
    pieces: queue.Queue[str | None] = queue.Queue()
    closed = threading.Event()

    def on_text(piece: str) -> None:
        if closed.is_set():
            raise StreamClosed("the client closed the stream")
        pieces.put(piece)

    job.on_text = on_text
    future = engine.submit(job)
    future.add_done_callback(lambda _: pieces.put(None))

    def chunk(delta: dict[str, Any], finish: str | None = None) -> str:
        return "data: " + json.dumps({"id": request_id, "object": "chat.completion.chunk", "created": int(time.time()),
                                      "model": name, "choices": [{"index": 0, "delta": delta,
                                                                  "finish_reason": finish}]}) + "\n\n"

    try:
        yield chunk({"role": "assistant", "content": ""})
        while (piece := pieces.get()) is not None:
            if piece:
                yield chunk({"content": piece})
        error = future.exception()
        if error is not None:
            yield "data: " + json.dumps({"error": {"message": f"generation failed: {error}", "type": "server_error"}}) + "\n\n"
        else:
            yield chunk({}, future.result().finish_reason)
        yield "data: [DONE]\n\n"
    except GeneratorExit:  # the client went away: stop generating for it
        closed.set()
        raise
    finally:
        release()


def _default_name(checkpoint: str) -> str:
    from pathlib import Path

    path = Path(checkpoint)
    return path.parent.name if path.name == "export" and path.parent.name else path.name


def serve(checkpoint: str, config: ServeConfig = ServeConfig(), generate_options: Any = None) -> None:
    """Load the model and serve until interrupted (uvicorn)."""
    import uvicorn

    from merv.pipelines.generate import GenerateOptions, GenerationSession

    session = GenerationSession(checkpoint, generate_options or GenerateOptions())
    app = create_app(session, config)  # a bad checkpoint or encoder fails here, before anything is printed
    print(f"serving {checkpoint} as {app.state.model_name!r} on http://{config.host}:{config.port}/v1 (Ctrl-C stops)",
          file=sys.stderr, flush=True)
    uvicorn.run(app, host=config.host, port=config.port, log_level="warning")
