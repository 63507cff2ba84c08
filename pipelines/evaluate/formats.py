"""Benchmarks in the reference's `eval_data/<name>/` layout, their clip windows and sample ids.

Layout (princetonvisualai/merv, EVALUATION.md):
  test_q.json   [{video_name, question_id, question, [options, num_option], [end_frame | time | start, end]}]
  test_a.json   [{question_id, answer_id (MCQ), answer}]
  videos/       the videos (only needed to build the extraction manifest)
A set with "options" is MCQ (Perception Test, NExT-QA, VLEP, TVQA, SSv2-MCQ); without, open-ended
(MSVD-QA, MSRVTT-QA, TGIF-QA, ActivityNet-QA). An optional "question_type" (or "type") is the
question's type; otherwise the type is its first word, the paper's pseudo-skill (Sec. 5.2), which is
recorded as "skill" in any case.

Sample ids (`sample_id`): what was encoded is a video *and* a window, so the id names both, the
same way for every benchmark, in the manifest, in the store lookup and in the predictions:
  no window                      video_10336             (the video_name without a video extension)
  end_frame 595                  video_10336@ef595
  start / end (or time) seconds  clipA@1.5-4s            (start defaults to 0; an open end is "1.5-s")
Two benchmarks asking about one video with different windows (the reference's own dummy_mcq and
dummy_openended) therefore get different ids and can share one store.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import EvalError
from .mcq import LETTERS, format_mcq_prompt

VIDEO_EXTS = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v", ".mpg", ".mpeg", ".gif", ".flv", ".wmv", ".3gp")
KINDS = ("mcq", "open")


@dataclass(frozen=True)
class Window:
    """The clip window a question refers to (all None = the whole video)."""

    start: float | None = None
    end: float | None = None
    end_frame: int | None = None

    @property
    def empty(self) -> bool:
        return self.start is None and self.end is None and self.end_frame is None

    def tag(self) -> str:
        """The id suffix: "ef595" or "12.5-20s" (a start of None reads as 0)."""
        if self.end_frame is not None:
            return f"ef{self.end_frame}"
        return f"{self.start or 0:g}-{'' if self.end is None else format(self.end, 'g')}s"

    def same_as(self, other: Window) -> bool:
        """Equal windows; a missing start equals 0 (both mean "from the beginning")."""
        def eq(a: float | None, b: float | None) -> bool:
            return (a is None and b is None) or (a is not None and b is not None and math.isclose(a, b, abs_tol=1e-6))

        return self.end_frame == other.end_frame and eq(self.start or 0.0, other.start or 0.0) and eq(self.end, other.end)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in (("start", self.start), ("end", self.end), ("end_frame", self.end_frame)) if v is not None}


def _opt_float(v: Any) -> float | None:
    if v is None or v == "":
        return None
    f = float(v)
    return None if math.isnan(f) else f


def question_window(q: dict[str, Any]) -> Window:
    """`end_frame` (negative = none), else `time: [start, end]`, else `start` / `end` (NaN = none)."""
    ef = q.get("end_frame")
    if ef is not None and ef != "" and int(float(ef)) >= 0:
        return Window(end_frame=int(float(ef)))
    if isinstance(q.get("time"), (list, tuple)) and len(q["time"]) == 2:
        return Window(_opt_float(q["time"][0]), _opt_float(q["time"][1]))
    return Window(_opt_float(q.get("start")), _opt_float(q.get("end")))


_FIRST_WORD = re.compile(r"[a-z]+")


def skill_of(question: str) -> str:
    """The paper's pseudo-skill: the question's first word, lowercased ("What's" -> "what")."""
    words = (question or "").strip().lower().split()
    m = _FIRST_WORD.search(words[0]) if words else None
    return m.group(0) if m else "other"


def video_stem(video_name: str) -> str:
    """video_name without a known video extension (VLEP names carry one, the others do not)."""
    base, ext = os.path.splitext(video_name)
    return base if ext.lower() in VIDEO_EXTS else video_name


def sample_id(video_name: str, window: Window, prefix: str = "") -> str:
    """The store id of a clip: `{prefix}{stem}`, plus `@{window tag}` when a window is given."""
    stem = video_stem(video_name)
    return f"{prefix}{stem}" if window.empty else f"{prefix}{stem}@{window.tag()}"


@dataclass
class Question:
    """One benchmark question joined with its answer."""

    index: int  # position in test_q.json (merge order)
    question_id: Any
    video_name: str
    question: str
    window: Window
    question_type: str
    skill: str
    options: list[str] | None = None
    num_option: int | None = None
    answer_id: int | None = None
    answer: str | None = None

    @property
    def qid(self) -> str:
        return str(self.question_id)

    @property
    def answer_letter(self) -> str | None:
        return None if self.answer_id is None else LETTERS[self.answer_id]

    @property
    def choices(self) -> list[str]:
        """The options a model may pick (the first num_option)."""
        return (self.options or [])[: self.num_option or 0]

    @property
    def message(self) -> str:
        """The human turn (no `<video>` placeholder: visual tokens go after BOS)."""
        if self.options is None:
            return self.question
        return format_mcq_prompt(self.question, self.options, self.num_option)

    def sample_id(self, prefix: str = "") -> str:
        return sample_id(self.video_name, self.window, prefix)


@dataclass
class Benchmark:
    name: str
    kind: str  # one of KINDS
    questions: list[Question]
    root: Path | None = None
    video_dir: Path | None = None

    def __len__(self) -> int:
        return len(self.questions)


def sample_ids(questions: Sequence[Question], prefix: str = "") -> list[str]:
    """`Question.sample_id` of each question."""
    return [q.sample_id(prefix) for q in questions]


def load_benchmark(
    path: str | os.PathLike[str],
    *,
    name: str | None = None,
    questions_file: str = "test_q.json",
    answers_file: str = "test_a.json",
    video_dir: str | os.PathLike[str] | None = None,
) -> Benchmark:
    """Read a reference-format benchmark directory; answers are joined by question_id."""
    root = Path(path)
    qpath, apath = root / questions_file, root / answers_file
    layout = f"pass --benchmark an eval_data directory holding {questions_file} and {answers_file} (the reference layout)"
    if not root.is_dir():
        raise EvalError(f"benchmark {root}: {'not a directory' if root.exists() else 'no such directory'}; {layout}")
    for p in (qpath, apath):
        if not p.is_file():
            raise EvalError(f"benchmark {root}: {p.name} is missing; {layout}")
    raw_q, raw_a = _json_list(qpath, "questions"), _json_list(apath, "answers")
    answers: dict[str, dict[str, Any]] = {}
    for i, a in enumerate(raw_a):
        if "question_id" not in a:
            raise EvalError(f"{apath}: answer {i} has no 'question_id'")
        answers[str(a["question_id"])] = a
    kinds = {"options" in q for q in raw_q}
    if len(kinds) > 1:
        raise EvalError(f"benchmark {str(root)!r} mixes MCQ questions (with options) and open-ended ones")
    kind = "mcq" if kinds == {True} else "open"
    questions: list[Question] = []
    seen: set[str] = set()
    missing: list[str] = []
    for i, q in enumerate(raw_q):
        for key in ("question_id", "video_name", "question"):
            if key not in q:
                raise EvalError(f"{qpath}: question {i} has no {key!r}")
        qid = str(q["question_id"])
        if qid in seen:
            raise EvalError(f"{qpath}: question_id {qid!r} appears twice")
        seen.add(qid)
        a = answers.get(qid)
        if a is None:
            missing.append(qid)
            continue
        item = Question(
            index=i,
            question_id=q["question_id"],
            video_name=str(q["video_name"]),
            question=str(q["question"]),
            window=question_window(q),
            question_type=str(q.get("question_type") or q.get("type") or skill_of(str(q["question"]))),
            skill=skill_of(str(q["question"])),
            answer=None if a.get("answer") is None else str(a["answer"]),
        )
        if kind == "mcq":
            _add_options(item, q, a, qpath, apath)
        elif item.answer is None:
            raise EvalError(f"{apath}: open-ended answer {qid!r} has no 'answer'")
        questions.append(item)
    if missing:
        raise EvalError(f"{apath}: no answer for {len(missing)} question(s), e.g. {missing[:5]}")
    vdir = Path(video_dir) if video_dir is not None else (root / "videos" if (root / "videos").is_dir() else None)
    return Benchmark(name or root.name, kind, questions, root, vdir)


def _add_options(item: Question, q: dict[str, Any], a: dict[str, Any], qpath: Path, apath: Path) -> None:
    """Options, num_option and answer_id of an MCQ question, checked against each other."""
    qid = item.qid
    if not isinstance(q["options"], list):
        raise EvalError(f"{qpath}: question {qid!r} has 'options' that are not a list")
    options = [str(o) for o in q["options"]]
    n = int(q.get("num_option") or len(options))
    if not 1 <= n <= min(len(options), len(LETTERS)):
        raise EvalError(f"{qpath}: question {qid!r} has num_option {n} but {len(options)} options")
    if "answer_id" not in a:
        raise EvalError(f"{apath}: MCQ answer {qid!r} has no answer_id")
    aid = int(a["answer_id"])
    if not 0 <= aid < n:
        raise EvalError(f"{apath}: answer_id {aid} of {qid!r} is outside its {n} options")
    item.options, item.num_option, item.answer_id = options, n, aid
    if item.answer is None:
        item.answer = options[aid]


def _json_list(path: Path, what: str) -> list[dict[str, Any]]:
    """A benchmark file's list of objects, or an `EvalError` naming the file and the entry at fault."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise EvalError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8 JSON") from exc
    except json.JSONDecodeError as exc:
        raise EvalError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from exc
    if not isinstance(data, list):
        raise EvalError(f"{path}: expected a JSON list of {what}, got a JSON {type(data).__name__}")
    for i, item in enumerate(data):
        if not isinstance(item, dict):
            raise EvalError(f"{path}: entry {i} of the {what} is a {type(item).__name__}, not an object")
    return data


def as_benchmark(b: Benchmark | str | os.PathLike[str]) -> Benchmark:
    return b if isinstance(b, Benchmark) else load_benchmark(b)
