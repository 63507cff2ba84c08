"""Benchmark evaluation from the feature store: MCQ (generation or option log-likelihood) and
open-ended QA (Video-ChatGPT protocol), sharded across processes, merged, scored, summarised.

Features are never computed here: a benchmark's clips are extracted once into a store (`merv
eval-manifest` -> `merv extract`) and every checkpoint is evaluated from it.

  formats   reference-format benchmarks (eval_data/<name>/test_q.json + test_a.json), windows, sample ids
  manifest  the extraction manifest of a benchmark (one row per clip = video + window)
  features  the store adapter: question -> store id -> checked features for the model's connector
  answer    one batch of questions -> result rows (generate + letter extraction, or option log-likelihood)
  runner    sharded, resumable per-rank runs of one benchmark; merging rank files
  mcq       the reference's MCQ prompt, letter extraction, its first-character rule
  match     the normalised open-ended match
  judge     the LLM judge (OpenAI-compatible client, reply parsing, reference arithmetic, JudgeConfig)
  scoring   per-row correctness; match + judge pass over a merged run
  reports   summaries per run / type / skill, JSON + markdown
  results   the output directory layout and its JSONL files
  config    EvalConfig / RunOptions: every setting with its one default
  job       evaluate(), finalize_results(), and the CLI's run_eval / finalize_eval
"""

from __future__ import annotations

from .answer import answer_batch
from .config import DEFAULT_MAX_NEW_TOKENS, MODES, EvalConfig, RunOptions, load_eval_config
from .errors import EvalError
from .features import Located, StoreFeatures
from .formats import (
    Benchmark,
    Question,
    Window,
    load_benchmark,
    question_window,
    sample_id,
    sample_ids,
    skill_of,
    video_stem,
)
from .job import evaluate, finalize_eval, finalize_results, rank_sync, run_eval
from .judge import (
    JUDGE_SYSTEM_PROMPT,
    JudgeClient,
    JudgeConfig,
    JudgeResult,
    judge_messages,
    judge_summary,
    parse_judge_response,
)
from .manifest import eval_manifest, resolve_video, write_eval_manifest
from .match import normalize_answer, normalized_match
from .mcq import LETTERS, extract_letter, format_mcq_prompt, option_letters, reference_correct
from .reports import summarize_results, summarize_rows, summarize_run, summary_markdown
from .results import rank_file, read_jsonl, run_dir, run_rows
from .runner import merge_predictions, model_fingerprint, run_benchmark, shard_bounds
from .scoring import row_correct, score_open_ended

__all__ = [
    "DEFAULT_MAX_NEW_TOKENS", "JUDGE_SYSTEM_PROMPT", "LETTERS", "MODES", "Benchmark", "EvalConfig", "EvalError", "JudgeClient", "JudgeConfig",
    "JudgeResult", "Located", "Question", "RunOptions", "StoreFeatures", "Window", "answer_batch", "eval_manifest",
    "evaluate", "extract_letter", "finalize_eval", "finalize_results", "format_mcq_prompt", "judge_messages",
    "judge_summary", "load_benchmark", "load_eval_config", "merge_predictions", "model_fingerprint", "normalize_answer",
    "normalized_match", "option_letters", "parse_judge_response", "question_window", "rank_file", "rank_sync",
    "read_jsonl", "reference_correct", "resolve_video", "row_correct", "run_benchmark", "run_dir", "run_eval",
    "run_rows", "sample_id", "sample_ids", "score_open_ended", "shard_bounds", "skill_of", "summarize_results",
    "summarize_rows", "summarize_run", "summary_markdown", "video_stem", "write_eval_manifest",
]
