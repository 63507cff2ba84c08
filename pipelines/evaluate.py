"""Benchmark evaluation from the feature store: MCQ (generation or option log-likelihood) and
open-ended QA (Video-ChatGPT protocol), sharded across processes, merged, summarised.

Benchmarks use the reference's `eval_data/<name>/` layout (princetonvisualai/merv, EVALUATION.md):
  test_q.json   [{video_name, question_id, question, [options, num_option], [end_frame | time | start, end]}]
  test_a.json   [{question_id, answer_id (MCQ), answer}]
  videos/       the videos (only needed to build the extraction manifest)
A set with "options" is MCQ (Perception Test, NExT-QA, VLEP, TVQA, SSv2-MCQ); without, open-ended
(MSVD-QA, MSRVTT-QA, TGIF-QA, ActivityNet-QA). An optional "question_type" (or "type") field in a
question is used as its type; otherwise the type is the question's first word, the paper's
pseudo-skill (Sec. 5.2: what / how / why / where / who / when / is ...), recorded in any case as "skill".

Features are never computed here. The benchmark's videos are extracted once into a store (`merv
extract` on the manifest from `write_eval_manifest`) and every checkpoint is evaluated from it.
Store ids (`sample_ids`): the video_name without its video extension ("video_10336.mp4" ->
"video_10336"), with an optional `id_prefix` to keep benchmarks apart in a shared store. A clip
window (Perception Test's `end_frame`, TVQA's `time` / `start`, `end` in seconds) is part of what
was encoded, so it travels into the manifest (`end_frame` / `start` / `end` columns, which `merv
extract` honours) and is checked against the store's sample table at evaluation time. When one
video is asked about with different windows (TVQA), id mode "auto" names those samples
`<stem>@ef<end_frame>` or `<stem>@<start>-<end>s`; "window" always qualifies windowed samples;
"stem" never does (and refuses conflicting windows).

Output layout (`out_dir/<benchmark>/<mode>/`):
  run.json                       what ran (benchmark path, kind, mode, question count, settings)
  rank-00000-of-00002.jsonl      per-question rows of one rank (appended as it goes; resumable)
  predictions.jsonl              `merge_predictions`: all ranks, in benchmark order
  scored.jsonl                   open-ended only, `score_open_ended`: + normalised match / judge
  summary.json / summary.md      `summarize_run`
and `out_dir/summary.json|md` over every run (`summarize_results`). A row holds question_id,
question, options, answer, pred (generated text), letter, valid, correct, reference_correct (the
reference's first-character rule), option_scores (log-likelihood mode), question_type, skill,
sample_id, the window, and fusion_weights {encoder: weight} (cross-attention / learnable fusions).

Accuracy: MCQ -> extracted letter == answer (malformed outputs count wrong; `reference_accuracy`
is the reference's first-character rule); open-ended -> the judge's yes / (yes + no) when judged
(metric "judge", reference arithmetic), else the normalised match (metric "match"). Breakdowns by
question type and by skill use the same metric; MCQ summaries also give chance (mean 1/num_option).

Modes (MCQ): "generate" greedy-decodes and extracts the letter (`scoring.extract_letter`);
"loglik" scores every option as the answer turn of a one-turn conversation, tokenised exactly as
in training (`tokenize_conversation`: the option text plus the end-of-turn token), and picks the
best length-normalised (`ll_norm="mean"`, default: options differ in token count) or summed
log-likelihood. Open-ended sets are generate-only.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from merv import MervError
from merv.store import FeatureReader, FeatureStore
from merv.store.grid import pool_grid_torch

from .scoring import (
    LETTERS,
    JudgeClient,
    extract_letter,
    format_mcq_prompt,
    judge_summary,
    normalized_match,
    option_letters,
    reference_correct,
)

log = logging.getLogger(__name__)

VIDEO_EXTS = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v", ".mpg", ".mpeg", ".gif", ".flv", ".wmv", ".3gp")
MODES = ("generate", "loglik")
ID_MODES = ("auto", "window", "stem")
DEFAULT_MAX_NEW_TOKENS = {"mcq": 32, "open": 128}
RANK_FILE = re.compile(r"rank-(\d+)-of-(\d+)\.jsonl$")


class EvalError(MervError, ValueError):
    """A benchmark, store or result set that cannot be evaluated as asked; the message says why."""


# ------------------------------------------------------------------------------------ benchmarks


@dataclass(frozen=True)
class Window:
    """The clip window a question refers to (None = not given)."""

    start: float | None = None
    end: float | None = None
    end_frame: int | None = None

    @property
    def empty(self) -> bool:
        return self.start is None and self.end is None and self.end_frame is None

    def tag(self) -> str:
        """Short id suffix, e.g. "ef595" or "12.5-20s"."""
        if self.end_frame is not None:
            return f"ef{self.end_frame}"
        return f"{self.start or 0:g}-{'' if self.end is None else format(self.end, 'g')}s"

    def same_as(self, other: "Window") -> bool:
        def eq(a: float | None, b: float | None) -> bool:
            return (a is None and b is None) or (a is not None and b is not None and math.isclose(a, b, abs_tol=1e-6))

        return self.end_frame == other.end_frame and eq(self.start, other.start) and eq(self.end, other.end)

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
    def message(self) -> str:
        """The human turn (no `<video>` placeholder: visual tokens go after BOS)."""
        if self.options is None:
            return self.question
        return format_mcq_prompt(self.question, self.options, self.num_option)


@dataclass
class Benchmark:
    name: str
    kind: str  # "mcq" | "open"
    questions: list[Question]
    root: Path | None = None
    video_dir: Path | None = None

    def __len__(self) -> int:
        return len(self.questions)


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
        elif item.answer is None:
            raise EvalError(f"{apath}: open-ended answer {qid!r} has no 'answer'")
        questions.append(item)
    if missing:
        raise EvalError(f"{apath}: no answer for {len(missing)} question(s), e.g. {missing[:5]}")
    vdir = Path(video_dir) if video_dir is not None else (root / "videos" if (root / "videos").is_dir() else None)
    return Benchmark(name or root.name, kind, questions, root, vdir)


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


def _as_benchmark(b: Benchmark | str | os.PathLike[str]) -> Benchmark:
    return b if isinstance(b, Benchmark) else load_benchmark(b)


# ------------------------------------------------------------------------------ ids and manifest


def sample_ids(questions: Sequence[Question], mode: str = "auto", prefix: str = "") -> list[str]:
    """Store id of each question's clip (see the module docstring for the modes)."""
    if mode not in ID_MODES:
        raise EvalError(f"id mode {mode!r} is unknown; use one of {ID_MODES}")
    windows: dict[str, list[Window]] = defaultdict(list)
    for q in questions:
        ws = windows[video_stem(q.video_name)]
        if not any(w.same_as(q.window) for w in ws):
            ws.append(q.window)
    out = []
    for q in questions:
        stem = video_stem(q.video_name)
        conflict = len(windows[stem]) > 1
        if mode == "stem" and conflict:
            raise EvalError(
                f"video {q.video_name!r} is asked about with {len(windows[stem])} different windows; "
                "id mode 'stem' gives them one store id: use 'auto' or 'window'"
            )
        qualify = not q.window.empty and (mode == "window" or (mode == "auto" and conflict))
        out.append(f"{prefix}{stem}@{q.window.tag()}" if qualify else f"{prefix}{stem}")
    return out


def resolve_video(video_dir: str | os.PathLike[str], video_name: str) -> Path | None:
    """`video_dir/video_name` if it exists, else the first `video_name.*` with a video extension."""
    d = Path(video_dir)
    exact = d / video_name
    if exact.exists():
        return exact
    hits = sorted(p for p in d.glob(f"{_glob_escape(video_name)}.*") if p.suffix.lower() in VIDEO_EXTS)
    return hits[0] if hits else None


def _glob_escape(s: str) -> str:
    return re.sub(r"([*?\[\]])", r"[\1]", s)


def eval_manifest(
    benchmark: Benchmark | str | os.PathLike[str],
    *,
    video_dir: str | os.PathLike[str] | None = None,
    id_mode: str = "auto",
    id_prefix: str = "",
    missing: str = "error",
) -> list[dict[str, Any]]:
    """One manifest row per distinct clip: {id, path, kind, [end_frame | start, end]} (`merv extract` input).

    missing: "error" (default) names the absent videos; "skip" leaves them out (their questions
    then fail at evaluation unless `skip_missing`).
    """
    bench = _as_benchmark(benchmark)
    vdir = Path(video_dir) if video_dir is not None else bench.video_dir
    if vdir is None and bench.root is not None and (bench.root / "videos").is_dir():
        vdir = bench.root / "videos"
    if vdir is None:
        raise EvalError(f"benchmark {bench.name!r}: no videos/ directory next to {bench.root}; pass --video-dir DIR")
    rows: dict[str, dict[str, Any]] = {}
    absent: list[str] = []
    for q, sid in zip(bench.questions, sample_ids(bench.questions, id_mode, id_prefix)):
        if sid in rows:
            continue
        path = resolve_video(vdir, q.video_name)
        if path is None:
            absent.append(q.video_name)
            continue
        rows[sid] = {"id": sid, "path": str(path.resolve()), "kind": "video", **q.window.to_dict()}
    if absent and missing == "error":
        raise EvalError(f"benchmark {bench.name!r}: {len(absent)} video(s) not found under {vdir}, e.g. "
                        f"{sorted(set(absent))[:5]}; pass the folder holding them with --video-dir DIR")
    return list(rows.values())


def write_eval_manifest(
    benchmark: Benchmark | str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    **kwargs: Any,
) -> Path:
    """Write `eval_manifest(...)` as JSONL for `merv extract`; returns the path."""
    rows = eval_manifest(benchmark, **kwargs)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")
    return out


# ------------------------------------------------------------------------------------ features


class _Features:
    """Reads a batch of clips from the store and shapes them for the model's connector."""

    def __init__(self, model: Any, store: FeatureStore | str, fingerprints: dict[str, str] | None, check_windows: bool) -> None:
        self.specs = list(model.connector.specs)
        self.reader = FeatureReader(store, [s.name for s in self.specs], fingerprints=fingerprints, as_torch=True)
        self.table = self.reader.table
        self.check_windows = check_windows
        for s in self.specs:
            g = self.reader.groups[s.name].spec
            if g.grid[0] != s.grid[0] or g.dim != s.dim:
                raise EvalError(
                    f"encoder {s.name!r}: the store holds (t={g.grid[0]}, d={g.dim}) but the model expects "
                    f"(t={s.grid[0]}, d={s.dim}); evaluate from a store extracted for this model"
                )
            if (g.grid[1] < s.grid[1]) or (g.grid[2] < s.grid[2]):
                raise EvalError(f"encoder {s.name!r}: stored grid {g.grid[1:]} is smaller than the model's {s.grid[1:]}")

    def check(self, ids: Sequence[str], windows: Sequence[Window]) -> list[str | None]:
        """Per id: None when readable, else the reason it is not (missing, pending, failed, window)."""
        out: list[str | None] = []
        for sid, w in zip(ids, windows):
            idx = self.table.index.get(sid)
            if idx is None:
                out.append("not in the store")
                continue
            state, enc, reason = self.reader.state(idx)
            if state != "ok":
                out.append(f"{state} for encoder {enc}" + (f": {reason}" if reason else ""))
                continue
            if self.check_windows:
                rec = self.table.record(idx)
                have = Window(rec.start, rec.end, rec.end_frame)
                if not have.same_as(w):
                    out.append(f"extracted with window {have.to_dict() or 'none'} but the question asks {w.to_dict() or 'none'}")
                    continue
            out.append(None)
        return out

    def read(self, ids: Sequence[str], device: torch.device) -> dict[str, torch.Tensor]:
        uniq = list(dict.fromkeys(ids))
        batch = self.reader.get_batch(uniq)
        pos = torch.tensor([uniq.index(i) for i in ids])
        out = {}
        for s in self.specs:
            x = batch[s.name].index_select(0, pos)
            x = pool_grid_torch(x, s.grid[1:])
            out[s.name] = x.to(device)
        return out


# ------------------------------------------------------------------------------------- running


def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Contiguous [start, stop) of rank's questions (sizes differ by at most one; same-video questions stay together)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise EvalError(f"rank {rank} is outside world size {world_size}")
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def _env_int(name: str, default: int) -> int:
    v = os.environ.get(name)
    return int(v) if v not in (None, "") else default


@torch.no_grad()
def model_fingerprint(model: Any) -> str:
    """Short hash of every parameter's name, shape and float64 sum: tells checkpoints apart in
    run.json, so resuming never mixes rows of two models (one reduction per tensor, no copies)."""
    import hashlib

    h = hashlib.sha1()
    for name, p in model.named_parameters():
        h.update(f"{name}:{tuple(p.shape)}:{float(torch.sum(p, dtype=torch.float64)):.9e};".encode())
    return h.hexdigest()[:16]


def run_dir(out_dir: str | os.PathLike[str], benchmark_name: str, mode: str) -> Path:
    return Path(out_dir) / benchmark_name / mode


def rank_file(directory: Path, rank: int, world_size: int) -> Path:
    return directory / f"rank-{rank:05d}-of-{world_size:05d}.jsonl"


def _utf8_lines(fh: Iterable[str], path: str | os.PathLike[str]) -> Iterable[str]:
    """The lines of a text file opened as UTF-8; a decode error names the file."""
    try:
        yield from fh
    except UnicodeDecodeError as exc:
        raise EvalError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); pass a JSONL file written by `merv eval`") from exc


def read_jsonl(path: str | os.PathLike[str], strict: bool = False) -> list[dict[str, Any]]:
    """Rows of a JSONL file; a broken line (e.g. a killed writer's last) is skipped unless strict."""
    rows = []
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(_utf8_lines(fh, path), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                if strict:
                    raise EvalError(f"{path}:{n}: not valid JSON; pass a JSONL file written by `merv eval`") from None
                log.warning("%s:%d: skipping a broken line", path, n)
    return rows


def _weights_dict(names: Sequence[str], w: torch.Tensor | None, i: int) -> dict[str, float] | None:
    if w is None:
        return None
    return {n: round(float(v), 6) for n, v in zip(names, w[i].float().cpu().tolist())}


def _base_row(bench: Benchmark, q: Question, sid: str, mode: str) -> dict[str, Any]:
    row: dict[str, Any] = {
        "benchmark": bench.name,
        "kind": bench.kind,
        "mode": mode,
        "index": q.index,
        "question_id": q.question_id,
        "video_name": q.video_name,
        "sample_id": sid,
        "question": q.question,
        "question_type": q.question_type,
        "skill": q.skill,
        **q.window.to_dict(),
    }
    if bench.kind == "mcq":
        row.update(options=q.options, num_option=q.num_option, answer_id=q.answer_id, answer=q.answer_letter, answer_text=q.answer)
    else:
        row["answer"] = q.answer
    return row


def _score_mcq_row(row: dict[str, Any], q: Question, pred: str, letter: str | None) -> None:
    row.update(
        pred=pred,
        letter=letter,
        valid=letter is not None,
        correct=letter is not None and letter == q.answer_letter,
        reference_correct=reference_correct(pred, q.answer_letter or ""),
    )


@torch.inference_mode()
def _generate_batch(model: Any, feats: dict[str, torch.Tensor], qs: Sequence[Question], max_new_tokens: int) -> tuple[list[str], torch.Tensor | None]:
    from merv.train.prompts import encode_prompt

    prompts = [encode_prompt(model.prompt_format, model.tokenizer, q.message) for q in qs]
    weights = model.connector(feats).weights
    out = model.generate(feats, prompts, max_new_tokens=max_new_tokens, do_sample=False)
    return out.texts, weights


@torch.inference_mode()
def option_loglikelihoods(
    model: Any, feats: dict[str, torch.Tensor], qs: Sequence[Question], target: str = "option"
) -> tuple[list[list[tuple[float, int]]], torch.Tensor | None]:
    """Per question, per option: (sum of answer-token log-probs, answer-token count), plus fusion weights.

    target "option" scores the option text, "letter" scores its letter; either as the gpt turn of a
    one-turn conversation tokenised as in training (answer + end-of-turn token).
    """
    from merv.train.prompts import IGNORE_INDEX, get_prompt_builder, tokenize_conversation

    tok = model.tokenizer
    rows_ids, rows_lab, owner = [], [], []
    for j, q in enumerate(qs):
        assert q.options is not None and q.num_option is not None
        for k in range(q.num_option):
            answer = q.options[k] if target == "option" else LETTERS[k]
            conv = [{"from": "human", "value": q.message}, {"from": "gpt", "value": answer}]
            ids, lab = tokenize_conversation(get_prompt_builder(model.prompt_format, tok), tok, conv)
            rows_ids.append(ids)
            rows_lab.append(lab)
            owner.append(j)
    b, n = len(rows_ids), max(len(r) for r in rows_ids)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    input_ids = torch.full((b, n), pad, dtype=torch.long)
    labels = torch.full((b, n), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((b, n), dtype=torch.long)
    for i, (x, y) in enumerate(zip(rows_ids, rows_lab)):
        input_ids[i, : len(x)], labels[i, : len(y)], mask[i, : len(x)] = x, y, 1
    dev = model.device
    pos = torch.tensor(owner)
    row_feats = {k: v.index_select(0, pos.to(v.device)) for k, v in feats.items()}
    embeds, amask, lab, weights = model.embed_multimodal(row_feats, input_ids.to(dev), mask.to(dev), labels.to(dev))
    # only the logits that predict answer tokens are needed: keep positions [first - 1, last)
    cols = (lab != IGNORE_INDEX).any(dim=0).nonzero().flatten()
    lo, hi = int(cols.min()) - 1, int(cols.max())
    keep = torch.arange(lo, hi, device=dev)
    try:
        logits = model.llm(inputs_embeds=embeds, attention_mask=amask, use_cache=False, logits_to_keep=keep).logits
    except TypeError:  # an LLM without tensor logits_to_keep: compute everything, then slice
        logits = model.llm(inputs_embeds=embeds, attention_mask=amask, use_cache=False).logits[:, lo:hi]
    target_ids = lab[:, lo + 1 : hi + 1]
    logp = F.log_softmax(logits.float(), dim=-1)
    valid = target_ids != IGNORE_INDEX
    tok_lp = logp.gather(-1, target_ids.clamp(min=0).unsqueeze(-1)).squeeze(-1) * valid
    sums, counts = tok_lp.sum(-1).cpu().tolist(), valid.sum(-1).cpu().tolist()
    per_q: list[list[tuple[float, int]]] = [[] for _ in qs]
    for i, j in enumerate(owner):
        per_q[j].append((float(sums[i]), int(counts[i])))
    first_rows = [owner.index(j) for j in range(len(qs))]
    w = weights[torch.tensor(first_rows, device=weights.device)] if weights is not None else None
    return per_q, w


def run_benchmark(
    model: Any,
    benchmark: Benchmark | str | os.PathLike[str],
    store: FeatureStore | str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    mode: str = "generate",
    rank: int | None = None,
    world_size: int | None = None,
    batch_size: int = 8,
    max_new_tokens: int | None = None,
    ll_target: str = "option",
    ll_norm: str = "mean",
    id_mode: str = "auto",
    id_prefix: str = "",
    fingerprints: dict[str, str] | None = None,
    check_windows: bool = True,
    skip_missing: bool = False,
    resume: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Answer this rank's share of a benchmark; returns its rank JSONL file.

    rank / world_size default to the RANK / WORLD_SIZE environment (torchrun) or 0 / 1. Questions
    whose clip is unreadable raise `EvalError` up front (naming them) unless `skip_missing`, which
    records them as wrong with an "error". With `resume`, rows already in the rank file are kept
    (not those recorded with an error) and only the rest is answered; resuming with other settings
    than run.json records is refused. `progress(done, total)` is called after each batch.
    """
    bench = _as_benchmark(benchmark)
    if mode not in MODES:
        raise EvalError(f"mode {mode!r} is unknown; use one of {MODES}")
    if mode == "loglik" and bench.kind != "mcq":
        raise EvalError(f"benchmark {bench.name!r} is open-ended: log-likelihood scoring needs options (use mode 'generate')")
    if ll_target not in ("option", "letter") or ll_norm not in ("mean", "sum"):
        raise EvalError("ll_target must be 'option' or 'letter' and ll_norm 'mean' or 'sum'")
    if model.tokenizer is None:
        raise EvalError("the model has no tokenizer; evaluation needs one to build prompts")
    rank = _env_int("RANK", 0) if rank is None else rank
    world_size = _env_int("WORLD_SIZE", 1) if world_size is None else world_size
    start, stop = shard_bounds(len(bench), rank, world_size)
    ids_all = sample_ids(bench.questions, id_mode, id_prefix)
    mine = list(zip(bench.questions[start:stop], ids_all[start:stop]))
    rdir = run_dir(out_dir, bench.name, mode)
    rdir.mkdir(parents=True, exist_ok=True)
    limit = max_new_tokens or DEFAULT_MAX_NEW_TOKENS[bench.kind]
    info = {
        "benchmark": bench.name,
        "path": str(bench.root) if bench.root else None,
        "kind": bench.kind,
        "mode": mode,
        "questions": len(bench),
        "id_mode": id_mode,
        "id_prefix": id_prefix,
        "ll_target": ll_target if mode == "loglik" else None,
        "ll_norm": ll_norm if mode == "loglik" else None,
        "max_new_tokens": limit if mode == "generate" else None,
        "model": model_fingerprint(model),
    }
    path = rank_file(rdir, rank, world_size)
    if resume and path.exists() and (rdir / "run.json").exists():
        old = json.loads((rdir / "run.json").read_text())
        changed = sorted(k for k, v in info.items() if k != "path" and k in old and old[k] != v)
        if changed:
            raise EvalError(f"{path} was written with other settings ({', '.join(changed)}); use another --out directory")
    if rank == 0 or not (rdir / "run.json").exists():
        (rdir / "run.json").write_text(json.dumps(info, indent=2))
    done: dict[str, dict[str, Any]] = {}
    my_ids = {q.qid for q, _ in mine}
    if resume and path.exists():
        done = {
            str(r["question_id"]): r
            for r in read_jsonl(path)
            if str(r.get("question_id")) in my_ids and r.get("mode") == mode and not r.get("error")
        }
    todo = [(q, sid) for q, sid in mine if q.qid not in done]

    feats = _Features(model, store, fingerprints, check_windows)
    problems = feats.check([sid for _, sid in todo], [q.window for q, _ in todo])
    bad = [(q, sid, p) for (q, sid), p in zip(todo, problems) if p is not None]
    if bad and not skip_missing:
        by_clip = dict.fromkeys((sid, p) for _, sid, p in bad)
        listed = "; ".join(f"{sid} ({p})" for sid, p in list(by_clip)[:5])
        raise EvalError(
            f"{len(bad)} question(s) of {bench.name!r} on {len(by_clip)} clip(s) have no usable features in the store: {listed}. "
            "Extract the benchmark's videos into that store: `merv eval-manifest BENCHMARK M.jsonl`, then "
            "`merv extract M.jsonl --store STORE`"
        )
    names = [s.name for s in feats.specs]
    model.eval()
    with path.open("w") as fh:
        for r in done.values():
            fh.write(json.dumps(r) + "\n")
        for q, sid, p in bad:
            row = _base_row(bench, q, sid, mode)
            row["error"] = p
            if bench.kind == "mcq":
                _score_mcq_row(row, q, "", None)
            else:
                row.update(pred="", match=False)
            fh.write(json.dumps(row) + "\n")
        good = [(q, sid) for (q, sid), p in zip(todo, problems) if p is None]
        for b0 in range(0, len(good), batch_size):
            chunk = good[b0 : b0 + batch_size]
            qs = [q for q, _ in chunk]
            x = feats.read([sid for _, sid in chunk], model.device)
            rows = [_base_row(bench, q, sid, mode) for q, sid in chunk]
            if mode == "generate":
                texts, weights = _generate_batch(model, x, qs, limit)
                for i, (row, q, text) in enumerate(zip(rows, qs, texts)):
                    if bench.kind == "mcq":
                        _score_mcq_row(row, q, text, extract_letter(text, q.num_option or 0, q.options))
                    else:
                        row.update(pred=text, match=normalized_match(text, q.answer or ""))
                    row["fusion_weights"] = _weights_dict(names, weights, i)
            else:
                scores, weights = option_loglikelihoods(model, x, qs, ll_target)
                for i, (row, q, sc) in enumerate(zip(rows, qs, scores)):
                    vals = [s / max(c, 1) if ll_norm == "mean" else s for s, c in sc]
                    best = max(range(len(vals)), key=lambda k: vals[k])
                    letter = LETTERS[best]
                    _score_mcq_row(row, q, letter, letter)
                    row["option_scores"] = [round(v, 6) for v in vals]
                    row["fusion_weights"] = _weights_dict(names, weights, i)
            for row in rows:
                fh.write(json.dumps(row) + "\n")
            fh.flush()
            if progress is not None:
                progress(min(b0 + batch_size, len(good)), len(good))
    return path


# ----------------------------------------------------------------------------- merge and score


def merge_predictions(directory: str | os.PathLike[str], world_size: int | None = None) -> Path:
    """Combine the rank files of a run into `predictions.jsonl`, in benchmark order.

    Every question of the benchmark (count from run.json) must be answered exactly once across
    the rank files (a question answered by two runs with different world sizes keeps one row).
    `world_size` restricts the merge to that sharding's files.
    """
    d = Path(directory)
    info = json.loads((d / "run.json").read_text()) if (d / "run.json").exists() else {}
    files = sorted(p for p in d.glob("rank-*-of-*.jsonl") if RANK_FILE.search(p.name))
    if world_size is not None:
        files = [p for p in files if int(RANK_FILE.search(p.name).group(2)) == world_size]  # type: ignore[union-attr]
    if not files:
        raise EvalError(f"{d}: no rank files to merge")
    sizes: dict[int, set[int]] = defaultdict(set)
    for p in files:
        m = RANK_FILE.search(p.name)
        sizes[int(m.group(2))].add(int(m.group(1)))  # type: ignore[union-attr]
    rows: dict[str, dict[str, Any]] = {}
    for p in files:
        for r in read_jsonl(p):
            rows.setdefault(str(r["question_id"]), r)
    expected = info.get("questions")
    if expected is not None and len(rows) != expected:
        lacking = {w: sorted(set(range(w)) - have) for w, have in sizes.items()}
        raise EvalError(
            f"{d}: {len(rows)} of {expected} questions answered; missing rank files per world size: "
            f"{ {w: r for w, r in lacking.items() if r} or 'none (ranks still running or resumed partially?)'}"
        )
    if expected is None:
        for w, have in sizes.items():
            if have != set(range(w)):
                raise EvalError(f"{d}: ranks {sorted(set(range(w)) - have)} of world size {w} are missing")
    ordered = sorted(rows.values(), key=lambda r: (r.get("index", 0), str(r["question_id"])))
    out = d / "predictions.jsonl"
    with out.open("w") as fh:
        for r in ordered:
            fh.write(json.dumps(r) + "\n")
    return out


def score_open_ended(
    directory: str | os.PathLike[str],
    judge: JudgeClient | None = None,
    *,
    workers: int = 4,
) -> Path:
    """Offline scoring of merged open-ended predictions -> `scored.jsonl`.

    Recomputes the normalised match and, with a judge, asks it about every row not judged yet
    (rows of an earlier scored.jsonl with a valid judgement are kept: re-running resumes).
    """
    d = Path(directory)
    pred_path = d / "predictions.jsonl"
    if not pred_path.exists():
        raise EvalError(f"{d}: no predictions.jsonl; run merge_predictions first")
    rows = read_jsonl(pred_path)
    old = {str(r["question_id"]): r for r in read_jsonl(d / "scored.jsonl")} if (d / "scored.jsonl").exists() else {}
    todo = []
    for r in rows:
        r["match"] = normalized_match(r.get("pred", ""), r.get("answer", "") or "")
        prev = old.get(str(r["question_id"]))
        if prev is not None and prev.get("judge_pred") in ("yes", "no") and prev.get("pred") == r.get("pred"):
            for k in ("judge_pred", "judge_score", "judge_raw", "judge_model"):
                r[k] = prev.get(k)
        elif judge is not None:
            todo.append(r)
    if judge is not None and todo:
        def one(r: dict[str, Any]) -> None:
            res = judge.judge(r.get("question", ""), r.get("answer", "") or "", r.get("pred", ""))
            r.update(judge_pred=res.pred, judge_score=res.score, judge_raw=res.raw, judge_model=judge.model)
            if res.error:
                r["judge_error"] = res.error

        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            list(pool.map(one, todo))
    out = d / "scored.jsonl"
    with out.open("w") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")
    return out


# ----------------------------------------------------------------------------------- summaries


def row_correct(row: dict[str, Any], metric: str = "auto") -> bool:
    """Correctness of one row: MCQ -> the extracted letter; open-ended -> the judge's "yes" when the
    row went to a judge ("auto"; an unparseable verdict counts wrong), else the normalised match."""
    if row.get("kind") == "mcq":
        return bool(row.get("correct"))
    judged = row.get("judge_model") is not None or row.get("judge_pred") is not None
    if metric == "judge" or (metric == "auto" and judged):
        return row.get("judge_pred") == "yes"
    return bool(row.get("match"))


def _acc(rows: Sequence[dict[str, Any]], fn: Callable[[dict[str, Any]], bool]) -> float | None:
    return sum(bool(fn(r)) for r in rows) / len(rows) if rows else None


def _group_stats(rows: Sequence[dict[str, Any]], mcq: bool, judged: bool) -> dict[str, Any]:
    s: dict[str, Any] = {"n": len(rows), "accuracy": _acc(rows, row_correct)}
    if mcq:
        s["chance"] = sum(1.0 / max(1, int(r.get("num_option") or 1)) for r in rows) / len(rows) if rows else None
        s["invalid"] = sum(not r.get("valid") for r in rows)
    else:
        s["match_accuracy"] = _acc(rows, lambda r: bool(r.get("match")))
        if judged:
            s["judge"] = judge_summary(rows)
            s["accuracy"] = s["judge"]["accuracy"]  # the reference's yes / (yes + no) over parsed verdicts
    return s


def summarize_rows(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Overall, per question type and per skill (first word) statistics of one run's rows."""
    if not rows:
        return {"n": 0}
    mcq = rows[0].get("kind") == "mcq"
    judged = any(r.get("judge_pred") is not None or r.get("judge_model") for r in rows)
    out = _group_stats(rows, mcq, judged)
    out.update(
        benchmark=rows[0].get("benchmark"),
        kind="mcq" if mcq else "open",
        mode=rows[0].get("mode"),
        metric="letter" if mcq else ("judge" if judged else "match"),
        errors=sum(1 for r in rows if r.get("error")),
    )
    if mcq:
        out["reference_accuracy"] = _acc(rows, lambda r: bool(r.get("reference_correct")))
    for key, name in (("question_type", "by_type"), ("skill", "by_skill")):
        groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for r in rows:
            groups[str(r.get(key))].append(r)
        out[name] = {g: _group_stats(v, mcq, judged) for g, v in sorted(groups.items())}
    ws = [r["fusion_weights"] for r in rows if r.get("fusion_weights")]
    if ws:
        out["mean_fusion_weights"] = {k: sum(w[k] for w in ws) / len(ws) for k in ws[0]}
    return out


def run_rows(directory: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The final rows of a run: scored.jsonl when present, else predictions.jsonl."""
    d = Path(directory)
    for name in ("scored.jsonl", "predictions.jsonl"):
        if (d / name).exists():
            return read_jsonl(d / name)
    raise EvalError(f"{d}: neither scored.jsonl nor predictions.jsonl; pass a run directory OUT/<benchmark>/<mode> "
                    "of `merv eval` (after a sharded run, merge it first: `merv eval-finalize OUT`)")


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f}"


def summary_markdown(summaries: dict[str, dict[str, dict[str, Any]]]) -> str:
    """Markdown tables: one line per benchmark x mode, then per question type and per skill."""
    lines = [
        "| benchmark | mode | metric | n | accuracy (%) | chance (%) | invalid | judge score |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for bench, modes in summaries.items():
        for mode, s in modes.items():
            judge = s.get("judge") or {}
            jscore = "-" if judge.get("score") is None else f"{judge['score']:.2f}"
            lines.append(
                f"| {bench} | {mode} | {s.get('metric', '-')} | {s.get('n', 0)} | {_pct(s.get('accuracy'))} | "
                f"{_pct(s.get('chance'))} | {s.get('invalid', '-')} | {jscore} |"
            )
    for key, title in (("by_type", "question type"), ("by_skill", "skill (first word)")):
        body = []
        for bench, modes in summaries.items():
            for mode, s in modes.items():
                if key == "by_skill" and s.get("by_skill") == s.get("by_type"):
                    continue  # types default to the first word: do not print the same table twice
                for g, gs in (s.get(key) or {}).items():
                    body.append(f"| {bench} | {mode} | {g} | {gs['n']} | {_pct(gs.get('accuracy'))} | {_pct(gs.get('chance'))} |")
        if body:
            lines += ["", f"| benchmark | mode | {title} | n | accuracy (%) | chance (%) |", "|---|---|---|---:|---:|---:|", *body]
    return "\n".join(lines) + "\n"


def summarize_run(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """Summary of one run; also written as summary.json / summary.md in its directory."""
    d = Path(directory)
    s = summarize_rows(run_rows(d))
    (d / "summary.json").write_text(json.dumps(s, indent=2))
    (d / "summary.md").write_text(summary_markdown({str(s.get("benchmark")): {str(s.get("mode")): s}}))
    return s


def _run_dirs(out_dir: Path) -> list[Path]:
    return sorted(p.parent for p in out_dir.glob("*/*/run.json"))


def summarize_results(out_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Summaries of every merged run under out_dir -> out_dir/summary.json + summary.md."""
    root = Path(out_dir)
    all_s: dict[str, dict[str, Any]] = defaultdict(dict)
    for d in _run_dirs(root):
        try:
            s = summarize_run(d)
        except EvalError as exc:
            log.warning("skipping %s: %s", d, exc)
            continue
        all_s[d.parent.name][d.name] = s
    result = {"benchmarks": dict(all_s)}
    (root / "summary.json").write_text(json.dumps(result, indent=2))
    (root / "summary.md").write_text(summary_markdown(result["benchmarks"]))
    return result


def finalize_results(
    out_dir: str | os.PathLike[str],
    *,
    judge: JudgeClient | None = None,
    judge_workers: int = 4,
    world_size: int | None = None,
    runs: Sequence[str | os.PathLike[str]] | None = None,
) -> dict[str, Any]:
    """After all ranks finished: merge, score open-ended runs (judge optional), summarise.

    `runs` limits the merge / scoring to those run directories (default: every run under
    out_dir); the summary files always cover every merged run under out_dir.
    """
    root = Path(out_dir)
    if runs is None and not root.is_dir():
        raise EvalError(f"{root}: no such directory; pass the --out directory of `merv eval`")
    dirs = [Path(r) for r in runs] if runs is not None else _run_dirs(root)
    if not dirs:
        raise EvalError(f"{root}: no benchmark runs in it (`merv eval --out DIR` writes DIR/<benchmark>/<mode>/run.json)")
    for d in dirs:
        merge_predictions(d, world_size)
        if json.loads((d / "run.json").read_text()).get("kind") == "open":
            score_open_ended(d, judge, workers=judge_workers)
    return summarize_results(root)


# -------------------------------------------------------------------------------- convenience


def evaluate(
    model: Any,
    benchmarks: Iterable[Benchmark | str | os.PathLike[str]],
    store: FeatureStore | str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    mode: str = "generate",
    rank: int | None = None,
    world_size: int | None = None,
    judge: JudgeClient | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    **run_kwargs: Any,
) -> dict[str, Any] | None:
    """Evaluate a model (a `MervModel` or a `save_merv` directory) on several benchmarks.

    Each rank answers its share (`run_benchmark`). With one process the results are merged,
    scored and summarised right away and the summary is returned; with several, each rank
    returns None and one process calls `finalize_results(out_dir)` after all have finished.
    `mode` "loglik" applies to MCQ sets; open-ended sets always generate.
    """
    # every input is checked before the model is loaded: a bad path fails in a second, not after minutes
    from merv.train.checkpoint_io import check_export, load_merv

    if mode not in MODES:
        raise EvalError(f"--mode {mode!r} is unknown; use one of {', '.join(MODES)}")
    if isinstance(model, (str, os.PathLike)):
        check_export(model)
    benches = [_as_benchmark(b) for b in benchmarks]
    if not isinstance(store, FeatureStore):
        store = FeatureStore.open(store)
    if isinstance(model, (str, os.PathLike)):
        model = load_merv(model, device=device, dtype=dtype)
    elif device is not None:
        model.to(device)
    rank = _env_int("RANK", 0) if rank is None else rank
    world_size = _env_int("WORLD_SIZE", 1) if world_size is None else world_size
    runs = []
    for bench in benches:
        m = mode if bench.kind == "mcq" else "generate"
        run_benchmark(model, bench, store, out_dir, mode=m, rank=rank, world_size=world_size, **run_kwargs)
        runs.append(run_dir(out_dir, bench.name, m))
    if world_size > 1:
        return None
    return finalize_results(out_dir, judge=judge, world_size=1, runs=runs)


__all__ = [
    "Benchmark", "EvalError", "Question", "Window", "eval_manifest", "evaluate", "finalize_results", "load_benchmark",
    "merge_predictions", "option_letters", "option_loglikelihoods", "question_window", "read_jsonl", "row_correct",
    "run_benchmark", "run_dir", "run_rows", "sample_ids", "score_open_ended", "shard_bounds", "skill_of",
    "summarize_results", "summarize_rows", "summarize_run", "summary_markdown", "video_stem", "write_eval_manifest",
]
