"""The LLM judge of open-ended answers (Video-ChatGPT protocol) behind any OpenAI-compatible endpoint.

`JudgeClient` POSTs {base}/v1/chat/completions with Video-ChatGPT's system + user prompt (yes/no
plus an integer score 0-5) and parses the reply robustly (`parse_judge_response`). Accuracy is
yes / (yes + no) over parsed answers and the score is the mean of `int(score)`, as the reference's
`scripts/eval_gpt.py` computes them (`judge_summary`). `JudgeConfig` is the judge's part of an
evaluation config: the API key is read from an environment variable, never from a file.
"""

from __future__ import annotations

import ast
import json
import os
import re
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

DEFAULT_JUDGE_MODEL = "gpt-4o-mini-2024-07-18"
DEFAULT_TIMEOUT_S = 60.0
DEFAULT_MAX_RETRIES = 2
DEFAULT_WORKERS = 4  # concurrent judge requests


JUDGE_SYSTEM_PROMPT = (
    "You are an intelligent chatbot designed for evaluating the correctness of generative outputs for question-answer pairs. "
    "Your task is to compare the predicted answer with the correct answer and determine if they match meaningfully. "
    "Here's how you can accomplish the task:"
    "------"
    "##INSTRUCTIONS: "
    "- Focus on the meaningful match between the predicted answer and the correct answer.\n"
    "- Consider synonyms or paraphrases as valid matches.\n"
    "- Evaluate the correctness of the prediction compared to the answer."
)
JUDGE_USER_TEMPLATE = (
    "Please evaluate the following video-based question-answer pair:\n\n"
    "Question: {question}\n"
    "Correct Answer: {answer}\n"
    "Predicted Answer: {pred}\n\n"
    "Provide your evaluation only as a yes/no and score where the score is an integer value between 0 and 5, "
    "with 5 indicating the highest meaningful match. "
    "Please generate the response in the form of a Python dictionary string with keys 'pred' and 'score', "
    "where value of 'pred' is  a string of 'yes' or 'no' and value of 'score' is in INTEGER, not STRING."
    "DO NOT PROVIDE ANY OTHER OUTPUT TEXT OR EXPLANATION. Only provide the Python dictionary string. "
    "For example, your response should look like this: {{'pred': 'yes', 'score': 4.8}}."
)


def judge_messages(question: str, answer: str, pred: str) -> list[dict[str, str]]:
    """The Video-ChatGPT judge conversation for one QA pair."""
    return [
        {"role": "system", "content": JUDGE_SYSTEM_PROMPT},
        {"role": "user", "content": JUDGE_USER_TEMPLATE.format(question=question, answer=answer, pred=pred)},
    ]


@dataclass
class JudgeResult:
    """One judged answer: pred "yes" / "no" and score in [0, 5], or None with `error` set."""

    pred: str | None
    score: float | None
    raw: str = ""
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.pred is not None and self.score is not None


_DICT = re.compile(r"\{[^{}]*\}", re.DOTALL)
_PRED_RE = re.compile(r"""['"]?pred['"]?\s*[:=]\s*['"]?\s*(yes|no)\b""", re.IGNORECASE)
_SCORE_RE = re.compile(r"""['"]?score['"]?\s*[:=]\s*['"]?\s*(-?\d+(?:\.\d+)?)""", re.IGNORECASE)


def parse_judge_response(text: str) -> tuple[str | None, float | None]:
    """(pred, score) from a judge reply: a Python / JSON dict, possibly fenced or chatty.

    The reference accepts only a clean `ast.literal_eval` dict; we also take JSON, dicts inside
    prose or code fences, and bare `pred: yes, score: 4` pairs. Scores are clamped to [0, 5].
    """
    s = (text or "").strip()
    cands: list[Any] = []
    for chunk in [s, *_DICT.findall(s)]:
        for loader in (ast.literal_eval, json.loads):
            try:
                cands.append(loader(chunk))
                break
            except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
                continue
    for d in cands:
        if isinstance(d, dict):
            low = {str(k).strip().lower(): v for k, v in d.items()}
            pred = str(low.get("pred", "")).strip().lower()
            score = low.get("score")
            try:
                score_f = float(score) if score is not None and not isinstance(score, bool) else None
            except (TypeError, ValueError):
                score_f = None
            if pred in ("yes", "no") and score_f is not None:
                return pred, min(5.0, max(0.0, score_f))
    mp, ms = _PRED_RE.search(s), _SCORE_RE.search(s)
    if mp and ms:
        return mp.group(1).lower(), min(5.0, max(0.0, float(ms.group(1))))
    return None, None


@dataclass
class JudgeClient:
    """Minimal OpenAI-compatible chat client (stdlib urllib; no SDK needed).

    base_url: "http://host:port" or ".../v1"; requests go to {base}/v1/chat/completions.
    api_key: sent as a Bearer token when given (e.g. read from an environment variable by the CLI).
    Transient failures (connection errors, 429, 5xx) are retried `max_retries` times with backoff.
    """

    base_url: str
    model: str = DEFAULT_JUDGE_MODEL
    api_key: str | None = None
    timeout: float = DEFAULT_TIMEOUT_S
    max_retries: int = DEFAULT_MAX_RETRIES
    max_tokens: int = 500
    temperature: float | None = None
    retry_backoff: float = 1.0
    extra_body: dict[str, Any] = field(default_factory=dict)

    @property
    def url(self) -> str:
        base = self.base_url.rstrip("/")
        if not base.endswith("/v1"):
            base += "/v1"
        return base + "/chat/completions"

    def chat(self, messages: list[dict[str, str]]) -> str:
        """One completion; returns the first choice's message content."""
        body: dict[str, Any] = {"model": self.model, "messages": messages, "max_tokens": self.max_tokens, **self.extra_body}
        if self.temperature is not None:
            body["temperature"] = self.temperature
        data = json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last: Exception | None = None
        for attempt in range(self.max_retries + 1):
            req = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    reply = json.loads(resp.read().decode("utf-8"))
                return str(reply["choices"][0]["message"]["content"])
            except urllib.error.HTTPError as exc:
                last = exc
                if exc.code != 429 and exc.code < 500:
                    detail = exc.read().decode("utf-8", "replace")[:300]
                    raise RuntimeError(f"judge endpoint {self.url} answered HTTP {exc.code}: {detail}") from exc
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as exc:
                last = exc
            except (KeyError, IndexError, TypeError, json.JSONDecodeError) as exc:
                raise RuntimeError(f"judge endpoint {self.url} returned no choices[0].message.content: {exc}") from exc
            if attempt < self.max_retries:
                time.sleep(self.retry_backoff * (2**attempt))
        raise RuntimeError(f"judge endpoint {self.url} unreachable after {self.max_retries + 1} tries: {last}")

    def judge(self, question: str, answer: str, pred: str) -> JudgeResult:
        """Judge one QA pair; never raises (failures come back as `error`)."""
        try:
            raw = self.chat(judge_messages(question, answer, pred))
        except RuntimeError as exc:
            return JudgeResult(None, None, "", str(exc))
        p, s = parse_judge_response(raw)
        return JudgeResult(p, s, raw, None if p is not None else "unparseable judge reply")


def judge_summary(results: Sequence[JudgeResult | dict[str, Any] | None]) -> dict[str, Any]:
    """Reference arithmetic: accuracy = yes / (yes + no), score = mean int(score); failures counted apart."""
    yes = no = failed = 0
    scores: list[int] = []
    for r in results:
        pred = r.pred if isinstance(r, JudgeResult) else (r or {}).get("judge_pred")
        score = r.score if isinstance(r, JudgeResult) else (r or {}).get("judge_score")
        if pred not in ("yes", "no") or score is None:
            failed += 1
            continue
        yes += pred == "yes"
        no += pred == "no"
        scores.append(int(score))
    judged = yes + no
    return {
        "judged": judged,
        "failed": failed,
        "accuracy": yes / judged if judged else None,
        "score": sum(scores) / len(scores) if scores else None,
    }


@dataclass
class JudgeConfig:
    """The judge of an evaluation config (`judge.url`, `judge.model`, ...); no url = no judge.

    The API key never sits in a config file: `api_key_env` names the environment variable holding it.
    """

    url: str | None = None
    model: str = DEFAULT_JUDGE_MODEL
    api_key_env: str = "OPENAI_API_KEY"
    workers: int = DEFAULT_WORKERS
    timeout_s: float = DEFAULT_TIMEOUT_S
    max_retries: int = DEFAULT_MAX_RETRIES

    def build(self) -> JudgeClient | None:
        """The client, with the key read from the environment now; None without a url."""
        if not self.url:
            return None
        return JudgeClient(self.url, model=self.model, api_key=os.environ.get(self.api_key_env) or None,
                           timeout=self.timeout_s, max_retries=self.max_retries)
