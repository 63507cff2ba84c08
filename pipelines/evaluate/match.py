"""Judge-free open-ended correctness (`normalized_match`), documented rules:

  1. normalise both sides: lowercase, drop apostrophes ("don't" -> "dont"), every other punctuation
     mark becomes a space, drop the articles a / an / the, number words zero..ten and "none" become
     digits, and a plural "s" is dropped from words longer than three letters (not after "ss");
  2. an empty prediction or answer never matches;
  3. yes / no answers: the prediction must contain the answer word and not the opposite one;
  4. otherwise the answer's words must appear as one contiguous run inside the prediction's
     words ("a man is cooking" matches "cooking"); a prediction that is only part of the answer
     ("man" for "old man") does not match.
This is a cheap proxy; the paper's open-ended numbers use the LLM judge (`judge.py`).
"""

from __future__ import annotations

import re

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


def contains_run(hay: list[str], needle: list[str]) -> bool:
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
    return p == a or contains_run(p, a)
