"""Scoring: the reference MCQ prompt, letter extraction (incl. malformed outputs), normalised
open-ended match, judge reply parsing, and the judge client against a local stub server."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from merv.pipelines.evaluate import (
    JUDGE_SYSTEM_PROMPT,
    JudgeClient,
    extract_letter,
    format_mcq_prompt,
    judge_messages,
    judge_summary,
    normalize_answer,
    normalized_match,
    parse_judge_response,
    reference_correct,
    score_open_ended,
    summarize_run,
)

# ------------------------------------------------------------------------------------------- MCQ


def test_mcq_prompt_matches_the_reference_text() -> None:
    prompt = format_mcq_prompt("Is the camera moving or static?", ["static or shaking", "I don't know", "moving"], 3)
    assert prompt == (
        "Is the camera moving or static? Select the correct answer from the following options. "
        "Write your answer as only one of A, B, C and nothing else.\n\n"
        "    A. static or shaking\nB. I don't know\nC. moving"
    )
    # letters follow num_option, the listed choices follow the options
    assert "only one of A, B and nothing else" in format_mcq_prompt("q", ["x", "y", "z"], 2)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("B", "B"),
        ("b", "B"),
        ("(B)", "B"),
        ("B.", "B"),
        ("[C]", "C"),
        ("**D**", "D"),
        ("Answer: b", "B"),
        ("answer:c", "C"),
        ("The answer is C", "C"),
        ("The answer is (C).", "C"),
        ("The correct option is D", "D"),
        ("Option B", "B"),
        ("B. moving", "B"),
        ("(A) static", "A"),
        ("d) something", "D"),
        ("I think it's B", "B"),
        ("C moving", "C"),
        # malformed: nothing to recover, or ambiguous, or out of range
        ("", None),
        ("   ", None),
        ("E", None),
        ("The answer is E", None),
        ("A person is walking", None),
        ("B and C", None),
        ("moving", None),
        ("\ufffd\x01 eeman", None),
    ],
)
def test_extract_letter_without_options(text: str, expected: str | None) -> None:
    assert extract_letter(text, 4) == expected


def test_extract_letter_uses_option_text_when_given() -> None:
    options = ["static or shaking", "I don't know", "moving", "flying"]
    assert extract_letter("moving", 4, options) == "C"
    assert extract_letter("It is moving.", 4, options) == "C"
    assert extract_letter("I don't know", 4, options) == "B"
    assert extract_letter("C moving", 4, options) == "C"
    assert extract_letter("A moving", 4, options) == "C"  # "A" + option C's text: read as the article
    assert extract_letter("moving or flying", 4, options) is None  # two options named: ambiguous
    assert extract_letter("(D)", 4, options) == "D"


def test_reference_rule_is_the_first_character() -> None:
    assert reference_correct("B", "B") and reference_correct("b. moving", "B")
    assert not reference_correct("(B)", "B")  # the reference counts this wrong; extract_letter does not
    assert not reference_correct("", "A")


# ------------------------------------------------------------------------------------ open-ended


def test_normalize_answer() -> None:
    assert normalize_answer("The Dog's toys!") == "dog toy"
    assert normalize_answer("  Two   cats, a-b ") == "2 cat b"
    assert normalize_answer("None") == "0"
    assert normalize_answer("glass") == "glass"  # "ss" is not a plural


@pytest.mark.parametrize(
    "pred, answer, ok",
    [
        ("cooking", "cooking", True),
        ("Cooking.", "cooking", True),
        ("a man is cooking", "cooking", True),
        ("The dogs", "dog", True),
        ("two", "2", True),
        ("an old man", "old man", True),
        ("man", "old man", False),  # partial answer
        ("cooked", "cooking", False),
        ("yes, it is", "yes", True),
        ("no", "yes", False),
        ("no, yes", "yes", False),  # both: not an answer
        ("", "cooking", False),
        ("anything", "", False),
        ("the", "the", False),  # nothing left after normalisation
    ],
)
def test_normalized_match(pred: str, answer: str, ok: bool) -> None:
    assert normalized_match(pred, answer) is ok


# ------------------------------------------------------------------------------------------ judge


@pytest.mark.parametrize(
    "reply, expected",
    [
        ("{'pred': 'yes', 'score': 4}", ("yes", 4.0)),
        ('{"pred": "no", "score": 1}', ("no", 1.0)),
        ("Sure! Here it is: {'pred': 'Yes', 'score': 4.8} Hope it helps.", ("yes", 4.8)),
        ("```python\n{'pred': 'no', 'score': '2'}\n```", ("no", 2.0)),
        ("pred: yes, score: 9", ("yes", 5.0)),  # clamped
        ("{'pred': 'maybe', 'score': 3}", (None, None)),
        ("{'pred': 'yes'}", (None, None)),
        ("I cannot evaluate this.", (None, None)),
        ("", (None, None)),
    ],
)
def test_parse_judge_response(reply: str, expected: tuple[str | None, float | None]) -> None:
    assert parse_judge_response(reply) == expected


class _Judge(BaseHTTPRequestHandler):
    """Stub OpenAI-compatible endpoint: answers by the predicted answer in the prompt."""

    def log_message(self, *args: object) -> None:  # keep pytest output clean
        pass

    def do_POST(self) -> None:
        srv = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        srv.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})  # type: ignore[attr-defined]
        user = body["messages"][1]["content"]
        pred = user.split("Predicted Answer: ")[1].split("\n")[0]
        if pred == "flaky" and srv.flaky_left > 0:  # type: ignore[attr-defined]
            srv.flaky_left -= 1  # type: ignore[attr-defined]
            self.send_response(503)
            self.end_headers()
            return
        content = {
            "cooking": "{'pred': 'yes', 'score': 5}",
            "a chef is cooking": 'Sure: {"pred": "yes", "score": 4.8}',
            "sleeping": "{'pred': 'no', 'score': 0}",
            "flaky": "{'pred': 'no', 'score': 2}",
        }.get(pred, "I refuse to answer in the requested format.")
        data = json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@contextmanager
def stub_judge() -> Iterator[ThreadingHTTPServer]:
    """The stub judge on 127.0.0.1 (a free port); `.requests` records what it was asked."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Judge)
    server.requests = []  # type: ignore[attr-defined]
    server.flaky_left = 1  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    watchdog = threading.Timer(60.0, server.shutdown)  # stops by itself even if a test hangs
    watchdog.daemon = True
    watchdog.start()
    try:
        yield server
    finally:
        watchdog.cancel()
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def judge_server() -> Iterator[ThreadingHTTPServer]:
    with stub_judge() as server:
        yield server


def _client(server: ThreadingHTTPServer, **kw: object) -> JudgeClient:
    host, port = server.server_address[:2]
    return JudgeClient(f"http://{host}:{port}", model="stub-judge", api_key="k-test", timeout=5, retry_backoff=0.01, **kw)  # type: ignore[arg-type]


def test_judge_client_protocol(judge_server: ThreadingHTTPServer) -> None:
    client = _client(judge_server)
    res = client.judge("what is the man doing?", "cooking", "cooking")
    assert (res.pred, res.score, res.error) == ("yes", 5.0, None)
    req = judge_server.requests[-1]  # type: ignore[attr-defined]
    assert req["path"] == "/v1/chat/completions"
    assert req["auth"] == "Bearer k-test"
    assert req["body"]["model"] == "stub-judge"
    assert req["body"]["messages"] == judge_messages("what is the man doing?", "cooking", "cooking")
    assert req["body"]["messages"][0]["content"] == JUDGE_SYSTEM_PROMPT
    assert "Correct Answer: cooking\nPredicted Answer: cooking\n\n" in req["body"]["messages"][1]["content"]
    # a base URL that already ends in /v1 is not doubled
    assert JudgeClient("http://h:1/v1/").url == "http://h:1/v1/chat/completions"

    retried = client.judge("q", "a", "flaky")  # first 503, then an answer
    assert (retried.pred, retried.score) == ("no", 2.0)
    bad = client.judge("q", "a", "gibberish")
    assert bad.pred is None and bad.error == "unparseable judge reply" and "refuse" in bad.raw


def test_judge_client_unreachable_is_reported_not_raised() -> None:
    client = JudgeClient("http://127.0.0.1:9", timeout=0.5, max_retries=1, retry_backoff=0.01)
    res = client.judge("q", "a", "p")
    assert res.pred is None and res.error and "unreachable" in res.error


def test_score_open_ended_with_judge(tmp_path: Path, judge_server: ThreadingHTTPServer) -> None:
    """Offline scoring of saved predictions: normalised match always, judge when configured, resumable."""
    run = tmp_path / "msvd" / "generate"
    run.mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"benchmark": "msvd", "kind": "open", "mode": "generate", "questions": 4}))
    preds = [
        ("1", "what is the man doing?", "cooking", "cooking"),
        ("2", "what is the man doing?", "cooking", "a chef is cooking"),
        ("3", "who is sleeping?", "cat", "sleeping"),
        ("4", "how many dogs?", "2", "gibberish"),
    ]
    with (run / "predictions.jsonl").open("w") as fh:
        for i, (qid, q, a, p) in enumerate(preds):
            row = {"benchmark": "msvd", "kind": "open", "mode": "generate", "index": i, "question_id": qid,
                   "question": q, "answer": a, "pred": p, "question_type": q.split()[0], "skill": q.split()[0]}
            fh.write(json.dumps(row) + "\n")

    score_open_ended(run)  # no judge: match only
    plain = summarize_run(run)
    assert plain["metric"] == "match" and plain["accuracy"] == pytest.approx(0.5)

    client = _client(judge_server)
    rows = [json.loads(x) for x in (score_open_ended(run, client, workers=2)).read_text().splitlines()]
    assert [r["judge_pred"] for r in rows] == ["yes", "yes", "no", None]
    assert [r["match"] for r in rows] == [True, True, False, False]
    assert rows[3]["judge_error"] == "unparseable judge reply"
    s = summarize_run(run)
    assert s["metric"] == "judge" and s["accuracy"] == pytest.approx(2 / 3)  # yes / (yes + no), failures apart
    assert s["judge"] == {"judged": 3, "failed": 1, "accuracy": pytest.approx(2 / 3), "score": pytest.approx((5 + 4 + 0) / 3)}
    assert s["match_accuracy"] == pytest.approx(0.5)
    assert s["by_type"]["what"]["accuracy"] == 1.0 and s["by_type"]["who"]["accuracy"] == 0.0
    assert s["by_type"]["how"]["accuracy"] is None and s["by_type"]["how"]["judge"]["failed"] == 1

    # re-scoring resumes: only the unjudged row goes to the judge again
    before = len(judge_server.requests)  # type: ignore[attr-defined]
    score_open_ended(run, client)
    assert len(judge_server.requests) - before == 1  # type: ignore[attr-defined]


def test_judge_summary_uses_reference_arithmetic() -> None:
    rows = [{"judge_pred": "yes", "judge_score": 4.8}, {"judge_pred": "no", "judge_score": 1}, {"judge_pred": None}]
    assert judge_summary(rows) == {"judged": 2, "failed": 1, "accuracy": 0.5, "score": 2.5}  # int(4.8) == 4
