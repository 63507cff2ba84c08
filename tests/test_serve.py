"""`merv serve` against the official `openai` client: a live server on 127.0.0.1 (a real
subprocess), answers equal to `merv generate`, streaming, base64 uploads, concurrent requests
batched, and bad requests answered with 4xx while a good one still succeeds."""

from __future__ import annotations

import base64
import concurrent.futures
import os
import time
import urllib.request
from pathlib import Path

import pytest
from testkit import llm as H
from testkit import media as M

from merv.serve.process import serve_process

pytestmark = pytest.mark.integration  # a server process

openai = pytest.importorskip("openai")
ENCODERS = ("dinov2", "vivit")
KEY = "sk-test-merv"


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    """A tiny model over two tiny real encoders (their native grids), exported as `merv train` does."""
    from merv.extract.encoders import build_encoder
    from merv.train.connector import ConnectorConfig
    from merv.train.export import save_merv
    from merv.train.specs import FeatureSpec

    specs = []
    for name in ENCODERS:
        info = build_encoder(name, size="tiny").info
        specs.append(FeatureSpec(name, tuple(info.grid), info.dim))
    model, _ = H.build_tiny_merv(specs=specs, connector_config=ConnectorConfig(tokens_per_frame=4, fusion_embed_dim=48),
                                 seed=7)
    out = tmp_path_factory.mktemp("serve") / "tiny-run" / "export"
    save_merv(model, out, extra={"recipe": "tiny", "encoder_size": "tiny"})
    return out


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("serve-media")
    big = d / "big.mp4"
    big.write_bytes(os.urandom(300_000))
    text = d / "notes.mp4"
    text.write_text("these are my notes, not a video\n")
    return {"video": M.write_video(d / "clip.mp4", n_frames=24, size=(64, 80), noise=6),
            "other": M.write_video(d / "other.mp4", n_frames=16, size=(48, 64), noise=3),
            "text": text, "big": big}


@pytest.fixture(scope="module")
def server(export):
    with serve_process(export, ["--api-key", KEY, "--max-upload-mb", "0.25", "--batch-window-ms", "400"]) as running:
        yield running.base


def _client(base: str, key: str = KEY):
    return openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=120)


def _ask(client, url: str, question: str = "What is in the video?", max_tokens: int = 12, **kw):
    return client.chat.completions.create(model="tiny-run", max_tokens=max_tokens, messages=[{"role": "user", "content": [
        {"type": "text", "text": question}, {"type": "video_url", "video_url": {"url": url}}]}], **kw)


def _data_url(path: Path, media_type: str = "video/mp4") -> str:
    return f"data:{media_type};base64," + base64.b64encode(path.read_bytes()).decode()


def test_answers_equal_merv_generate_plain_streamed_and_uploaded(server, export, media):
    from merv.pipelines.generate import GenerateOptions, answer_video

    want = answer_video(str(export), str(media["video"]), "What is in the video?", GenerateOptions(max_new_tokens=12))
    client = _client(server)
    assert [m.id for m in client.models.list().data] == ["tiny-run"]
    plain = _ask(client, str(media["video"]))
    assert plain.choices[0].message.content == want and plain.choices[0].finish_reason in ("stop", "length")
    assert plain.usage.completion_tokens >= 1 and plain.usage.prompt_tokens > 5
    assert _ask(client, media["video"].as_uri()).choices[0].message.content == want  # file:// URL
    assert _ask(client, _data_url(media["video"])).choices[0].message.content == want  # base64 upload
    pieces = [c.choices[0].delta.content or "" for c in _ask(client, str(media["video"]), stream=True) if c.choices]
    assert len([p for p in pieces if p]) >= 1 and "".join(pieces).strip() == want


def test_bad_requests_are_4xx_while_a_concurrent_good_request_succeeds(server, media):
    client = _client(server)
    bad = {
        "invalid base64": lambda: _ask(client, "data:video/mp4;base64,not*base64!"),
        "text file named .mp4": lambda: _ask(client, str(media["text"])),
        "oversized upload": lambda: _ask(client, _data_url(media["big"])),
        "unknown model": lambda: client.chat.completions.create(model="gpt-4o", messages=[
            {"role": "user", "content": "hi"}]),
        "no visual input": lambda: client.chat.completions.create(model="tiny-run", messages=[
            {"role": "user", "content": "hi"}]),
        "too many tokens": lambda: _ask(client, str(media["video"]), max_tokens=100_000),
        "wrong api key": lambda: _ask(_client(server, "sk-wrong"), str(media["video"])),
    }
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        good = pool.submit(_ask, client, str(media["other"]))
        errors = {name: pool.submit(_status_of, call) for name, call in bad.items()}
        statuses = {name: f.result() for name, f in errors.items()}
        assert good.result().choices[0].message.content is not None
    assert statuses == {"invalid base64": 400, "text file named .mp4": 400, "oversized upload": 413,
                        "unknown model": 404, "no visual input": 400, "too many tokens": 400, "wrong api key": 401}
    with pytest.raises(openai.BadRequestError, match=r"notes\.mp4.*text file"):  # the decoder's reason reaches the client
        _ask(client, str(media["text"]))
    assert _ask(client, str(media["video"])).choices[0].message.content  # still serving


def test_concurrent_requests_share_one_batched_forward(server, media):
    import json

    client = _client(server)
    with urllib.request.urlopen(f"{server}/health") as r:
        before = json.load(r)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: _ask(client, str(media["video"])).choices[0].message.content, range(4)))
    with urllib.request.urlopen(f"{server}/health") as r:
        after = json.load(r)
    assert len(set(answers)) == 1  # greedy, same input: batching changes nothing
    assert after["generations"] - before["generations"] == 4
    assert after["batches"] - before["batches"] < 4  # at least two of them went through one generate


def _health(server: str) -> dict:
    import json

    with urllib.request.urlopen(f"{server}/health") as r:
        return json.load(r)


def test_a_closed_stream_stops_its_generation_and_frees_its_slot(server, media):
    """A client that reads one chunk of a long stream and leaves: the server stops generating for it
    at the next token and the request's slot is free again (no leak), then it serves as before."""
    client = _client(server)
    before = _health(server)
    stream = _ask(client, str(media["video"]), stream=True, max_tokens=400)
    first = next(c for c in stream if c.choices and c.choices[0].delta.content)
    assert first.choices[0].delta.content
    stream.close()
    deadline = time.monotonic() + 60
    while (health := _health(server))["in_flight"] or health["streams_closed_early"] == before["streams_closed_early"]:
        assert time.monotonic() < deadline, health
        time.sleep(0.1)
    assert health["streams_closed_early"] == before["streams_closed_early"] + 1
    assert _ask(client, str(media["video"])).choices[0].message.content


def _status_of(call) -> int:
    try:
        call()
    except openai.APIStatusError as exc:
        return exc.status_code
    return 200
