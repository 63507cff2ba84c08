"""Answering one batch of questions from their features: the result rows of a run.

Modes (MCQ): "generate" greedy-decodes and extracts the letter (`mcq.extract_letter`); "loglik"
scores every option with `MervModel.option_loglikelihoods` (each option as the answer turn of a
one-turn conversation, tokenised and padded exactly as in training) and picks the best
length-normalised (`ll_norm="mean"`: options differ in token count) or summed log-likelihood.
Open-ended sets are generate-only (normalised match here; the judge comes later, `scoring.py`).

A row holds question_id, question, options, answer, pred (generated text), letter, valid, correct,
reference_correct (the reference's first-character rule), option_scores (loglik), question_type,
skill, sample_id (+ store_id when a legacy store id was read), the window, and fusion_weights
{encoder: weight} (cross-attention / learnable fusions).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .config import DEFAULT_MAX_NEW_TOKENS, RunOptions
from .features import Located
from .formats import Benchmark, Question
from .match import normalized_match
from .mcq import LETTERS, extract_letter, option_letters, reference_correct


def base_row(bench: Benchmark, q: Question, loc: Located, mode: str) -> dict[str, Any]:
    """Everything a row says about the question, before it is answered."""
    row: dict[str, Any] = {
        "benchmark": bench.name,
        "kind": bench.kind,
        "mode": mode,
        "index": q.index,
        "question_id": q.question_id,
        "video_name": q.video_name,
        "sample_id": loc.sample_id,
        "question": q.question,
        "question_type": q.question_type,
        "skill": q.skill,
        **q.window.to_dict(),
    }
    if loc.store_id != loc.sample_id:
        row["store_id"] = loc.store_id
    if bench.kind == "mcq":
        row.update(options=q.options, num_option=q.num_option, answer_id=q.answer_id, answer=q.answer_letter, answer_text=q.answer)
    else:
        row["answer"] = q.answer
    return row


def score_mcq_row(row: dict[str, Any], q: Question, pred: str, letter: str | None) -> None:
    row.update(
        pred=pred,
        letter=letter,
        valid=letter is not None,
        correct=letter is not None and letter == q.answer_letter,
        reference_correct=reference_correct(pred, q.answer_letter or ""),
    )


def error_row(bench: Benchmark, q: Question, loc: Located, mode: str) -> dict[str, Any]:
    """A question whose clip could not be read: recorded as wrong, with the reason."""
    row = base_row(bench, q, loc, mode)
    row["error"] = loc.problem
    if bench.kind == "mcq":
        score_mcq_row(row, q, "", None)
    else:
        row.update(pred="", match=False)
    return row


def _weights(names: Sequence[str], w: torch.Tensor | None, i: int) -> dict[str, float] | None:
    if w is None:
        return None
    return {n: round(float(v), 6) for n, v in zip(names, w[i].float().cpu().tolist())}


@torch.inference_mode()
def answer_batch(
    model: Any,
    bench: Benchmark,
    batch: Sequence[tuple[Question, Located]],
    feats: dict[str, torch.Tensor],
    mode: str,
    opts: RunOptions,
) -> list[dict[str, Any]]:
    """Rows of one batch of readable questions (features in batch order)."""
    from merv.train.prompts import encode_prompt

    qs = [q for q, _ in batch]
    rows = [base_row(bench, q, loc, mode) for q, loc in batch]
    names = list(feats)
    if mode == "generate":
        prompts = [encode_prompt(model.prompt_format, model.tokenizer, q.message) for q in qs]
        weights = model.connector(feats).weights
        limit = opts.max_new_tokens or DEFAULT_MAX_NEW_TOKENS[bench.kind]
        texts = model.generate(feats, prompts, max_new_tokens=limit, do_sample=False).texts
        for row, q, text in zip(rows, qs, texts):
            if bench.kind == "mcq":
                score_mcq_row(row, q, text, extract_letter(text, q.num_option or 0, q.options))
            else:
                row.update(pred=text, match=normalized_match(text, q.answer or ""))
    else:
        answers = [q.choices if opts.ll_target == "option" else option_letters(q.num_option or 0) for q in qs]
        res = model.option_loglikelihoods(feats, [q.message for q in qs], answers)
        weights = res.fusion_weights
        for row, q, vals in zip(rows, qs, res.normalized(opts.ll_norm)):
            letter = LETTERS[max(range(len(vals)), key=lambda k: vals[k])]
            score_mcq_row(row, q, letter, letter)
            row["option_scores"] = [round(v, 6) for v in vals]
    for i, row in enumerate(rows):
        row["fusion_weights"] = _weights(names, weights, i)
    return rows
