"""Scoring of benchmark answers: MCQ prompts and letter extraction, normalised open-ended match,
and an optional LLM judge (Video-ChatGPT protocol) behind any OpenAI-compatible endpoint.

MCQ prompt (`format_mcq_prompt`): the reference's "naive" strategy (princetonvisualai/merv
`scripts/eval_mcq.py`), byte for byte, including the four spaces its triple-quoted f-string puts
before the first option::

    {question} Select the correct answer from the following options. Write your answer as only one of A, B, C and nothing else.
    <blank line>
        A. {option 0}
    B. {option 1}
    ...

Letter extraction (`extract_letter`): the reference scores `pred.lower()[:1] == answer_char`, which
counts "(B)" or "The answer is B" wrong. We keep that number (`reference_correct`, the paper's
protocol) and also extract the intended letter robustly; see `extract_letter` for the rules. An
answer with no recoverable letter is *invalid*: it is counted wrong and recorded.

Open-ended normalised match (`normalized_match`), documented rules:
  1. normalise both sides: lowercase, drop apostrophes ("don't" -> "dont"), every other punctuation
     mark becomes a space, drop the articles a / an / the, number words zero..ten and "none" become
     digits, and a plural "s" is dropped from words longer than three letters (not after "ss");
  2. an empty prediction or answer never matches;
  3. yes / no answers: the prediction must contain the answer word and not the opposite one;
  4. otherwise the answer's words must appear as one contiguous run inside the prediction's
     words ("a man is cooking" matches "cooking"); a prediction that is only part of the answer
     ("man" for "old man") does not match.
This is a cheap, judge-free proxy; the paper's open-ended numbers use the LLM judge.

LLM judge (`JudgeClient`): POST {base}/v1/chat/completions with Video-ChatGPT's system + user prompt
(yes/no plus an integer score 0-5), parsed robustly (`parse_judge_response`). Accuracy is
yes / (yes + no) over parsed answers and the score is the mean of `int(score)`, as the reference's
`scripts/eval_gpt.py` computes them.
"""

from __future__ import annotations

import ast
import json
import re
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

# ------------------------------------------------------------------------------------------- MCQ


def option_letters(n: int) -> list[str]:
    """The first n option letters (A, B, C, ...)."""
    if not 1 <= n <= len(LETTERS):
        raise ValueError(f"a question needs 1..{len(LETTERS)} options, got {n}")
    return list(LETTERS[:n])


def format_mcq_prompt(question: str, options: Sequence[str], num_option: int | None = None) -> str:
    """The reference's MCQ message (without the prompt format's wrapping); letters up to num_option."""
    n = len(options) if num_option is None else int(num_option)
    letters = ", ".join(option_letters(n))
    choices = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(options))
    return (
        f"{question} Select the correct answer from the following options. "
        f"Write your answer as only one of {letters} and nothing else.\n\n    {choices}"
    )


def reference_correct(pred: str, answer_letter: str) -> bool:
    """The reference's rule: the first character of the output equals the answer letter."""
    return pred.lower()[:1] == answer_letter.lower()


_OPEN = "\\s\\(\\[\\{\"'*"
_CLOSE = "\\s\\)\\]\\}\"'*.:,;!"
_BARE = re.compile(rf"[{_OPEN}]*([A-Za-z])[{_CLOSE}]*")
_MARKER = re.compile(
    r"\b(?:answer|option|choice)\b(?:\s+(?:is|would\s+be|should\s+be|will\s+be))?\s*[:\-=]?\s*"
    rf"(?:option\s+|choice\s+|letter\s+)?[{_OPEN}]*([A-Za-z])(?![A-Za-z'])",
    re.IGNORECASE,
)
_LEADING = re.compile(rf"[{_OPEN}]*([A-Za-z])[\)\]\.:](?=\s|$)")
_LEADING_SPACE = re.compile(r"\s*([A-Z])\s+(.+)", re.DOTALL)
_STANDALONE = re.compile(r"(?<![A-Za-z'])([A-Z])(?![A-Za-z'])")


def extract_letter(text: str, num_options: int, options: Sequence[str] | None = None) -> str | None:
    """The option letter an output means, or None when it cannot be told (counted wrong).

    Rules, first hit wins (letters outside A..num_options never count):
      1. the whole output is one letter, possibly bracketed / punctuated: "B", "(b)", "C.", "[D]";
      2. an explicit marker: "Answer: b", "The answer is (C)", "correct option is D";
      3. a leading letter with a delimiter: "B. moving", "(C) moving", "d) ...";
      4. with `options`: a leading capital letter followed by that option's text ("C moving");
      5. with `options`: the output equals one option's text, or contains exactly one option's
         text (after `normalize_answer`);
      6. exactly one distinct standalone capital letter in range ("I think it's B"); "A" / "I"
         followed by a lowercase word are read as the article / pronoun, not as letters.
    """
    valid = set(option_letters(num_options))
    s = (text or "").strip()
    if not s:
        return None

    def ok(letter: str) -> str | None:
        up = letter.upper()
        return up if up in valid else None

    m = _BARE.fullmatch(s)
    if m:
        return ok(m.group(1))
    m = _MARKER.search(s)
    if m and ok(m.group(1)):
        return ok(m.group(1))
    m = _LEADING.match(s)
    if m and ok(m.group(1)):
        return ok(m.group(1))
    if options:
        norm_opts = [normalize_answer(o) for o in options[:num_options]]
        m = _LEADING_SPACE.match(s)
        if m and ok(m.group(1)):
            i = LETTERS.index(m.group(1))
            rest = normalize_answer(m.group(2))
            if i < len(norm_opts) and norm_opts[i] and (rest == norm_opts[i] or rest.startswith(norm_opts[i] + " ")):
                return m.group(1)
        p = normalize_answer(s)
        exact = [i for i, o in enumerate(norm_opts) if o and p == o]
        if len(exact) == 1:
            return LETTERS[exact[0]]
        contained = [i for i, o in enumerate(norm_opts) if o and _contains_run(p.split(), o.split())]
        if len(contained) == 1:
            return LETTERS[contained[0]]
    found = set()
    for m in _STANDALONE.finditer(s):
        letter = m.group(1)
        if letter in ("A", "I") and re.match(r"\s+[a-z]", s[m.end() :]):
            continue
        if letter in valid:
            found.add(letter)
    return found.pop() if len(found) == 1 else None


# ------------------------------------------------------------------------------------ open-ended

_ARTICLES = {"a", "an", "the"}
_NUMBERS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
_PUNCT = re.compile(r"[^\w\s]|_")


def _stem(word: str) -> str:
    if len(word) > 3 and word.endswith("s") and not word.endswith("ss"):
        return word[:-1]
    return word


def normalize_answer(text: str) -> str:
    """Lowercase, strip punctuation and articles, number words -> digits, light plural stemming."""
    s = (text or "").lower().replace("'", "").replace("\u2019", "")
    s = _PUNCT.sub(" ", s)
    words = [_stem(_NUMBERS.get(w, w)) for w in s.split() if w not in _ARTICLES]
    return " ".join(words)


def _contains_run(hay: list[str], needle: list[str]) -> bool:
    n = len(needle)
    return n > 0 and any(hay[i : i + n] == needle for i in range(len(hay) - n + 1))


def normalized_match(pred: str, answer: str) -> bool:
    """Judge-free open-ended correctness (rules in the module docstring)."""
    p, a = normalize_answer(pred).split(), normalize_answer(answer).split()
    if not p or not a:
        return False
    if a in (["yes"], ["no"]):
        other = "no" if a == ["yes"] else "yes"
        return a[0] in p and other not in p
    return p == a or _contains_run(p, a)


# ------------------------------------------------------------------------------------- LLM judge

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
    model: str = "gpt-4o-mini-2024-07-18"
    api_key: str | None = None
    timeout: float = 60.0
    max_retries: int = 2
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
