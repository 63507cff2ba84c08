"""MCQ answers: the reference's prompt and the option letter an output means.

Prompt (`format_mcq_prompt`): the reference's "naive" strategy (princetonvisualai/merv
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
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from .match import contains_run, normalize_answer

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


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
        contained = [i for i, o in enumerate(norm_opts) if o and contains_run(p.split(), o.split())]
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
