"""`MervLMM`: the lmms-eval model for MERV (`--model merv`).

    lmms-eval --model merv --model_args pretrained=runs/x/export,store=features.zarr \\
        --tasks videomme --batch_size 8 --output_path results/

`model_args`:
  pretrained   a Hugging Face-native MERV directory (`merv train` / `merv convert` exports) or a
               published id (`merv generate` accepts the same)
  store        optional feature store: a visual whose path the store holds (a whole-video sample
               extracted from that file, by the encoders the model was trained on: fingerprints are
               checked) is read from it instead of decoded and encoded again; anything else is decoded
  device, size, weights, allow_download, max_new_tokens: as for `merv generate`

Answers go through `GenerationSession`, the object `merv generate` and `merv serve` use, so the same
question about the same video gets the same answer here. Frames follow MERV's rules (each encoder's
own count, uniformly subsampled from the clip as extraction decodes it; `MervProcessor`), not
lmms-eval's per-model frame sampling.

Likelihoods (`multiple_choice` and `loglikelihood` tasks): the continuation is scored as the
answer turn of a one-turn conversation, as `merv eval --mode loglik` and training see it
(`MervModel.option_loglikelihoods`; lmms-eval's delimiter space is dropped). The value returned is
lmms-eval's convention for its built-in models, the mean negative log-likelihood per answer token
(the harness picks the option with the lowest), with the greedy flag.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import replace
from typing import Any

import torch
from lmms_eval.api.instance import GenerationResult, Instance
from lmms_eval.api.model import lmms
from loguru import logger
from tqdm import tqdm

from merv.pipelines.generate import GenerateOptions, GenerationSession

from .visuals import VisualFeatures

_TRUE = ("1", "true", "yes", "on")


class MervLMM(lmms):
    """A MERV model answering lmms-eval's `generate_until` and `loglikelihood` requests."""

    is_simple = True  # simple requests: (context, gen_kwargs | continuation, doc_to_visual, doc_id, task, split)

    def __init__(self, pretrained: str | None = None, store: str | None = None, device: str | None = None,
                 batch_size: int | str = 1, max_new_tokens: int | str | None = None, size: str | None = None,
                 weights: str | None = None, allow_download: bool | str = False, max_batch_size: Any = None,
                 **unknown: Any) -> None:
        super().__init__()
        if unknown:
            raise ValueError(f"--model_args {', '.join(sorted(unknown))}: not an option of the merv model; it takes "
                             "pretrained, store, device, size, weights, allow_download, max_new_tokens")
        if not pretrained:
            raise ValueError("--model_args needs pretrained=<a merv export directory or published id>")
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1:  # torchrun / accelerate launch: one process per device, lmms-eval shards the docs
            from accelerate import Accelerator

            accelerator = Accelerator()
            self.accelerator = accelerator
            device = device or str(accelerator.device)
            self._rank, self._world_size = accelerator.process_index, accelerator.num_processes
        base = GenerateOptions(size=size, weights=weights, device=device,
                               allow_download=str(allow_download).lower() in _TRUE)
        if max_new_tokens is not None:
            base = replace(base, max_new_tokens=int(max_new_tokens))
        self.options = base
        self.session = GenerationSession(str(pretrained), base)
        self.batch_size_per_gpu = max(1, int(batch_size))
        self.visuals = VisualFeatures(self.session, store)

    @property
    def device(self) -> torch.device:
        """Where the model runs (lmms-eval gathers results across processes on it)."""
        return self.session.model.device

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    # --- requests ---------------------------------------------------------------------------------

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Greedy (or sampled, when a task asks) answers, batched by generation settings and shapes."""
        items = []
        for i, request in enumerate(requests):
            context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
            items.append((i, context, self.options_for(gen_kwargs, task), self._visual(doc_to_visual, doc_id, task, split)))
        out: list[str] = [""] * len(requests)
        bar = tqdm(total=len(requests), desc="merv generate", disable=self.rank != 0)
        groups: dict[Any, list[tuple[int, str, dict[str, torch.Tensor]]]] = defaultdict(list)
        for i, context, opts, visual in items:
            features = self.visuals.features(visual)
            groups[(opts, _shapes(features))].append((i, context, features))
        for (opts, _), group in groups.items():
            for chunk in _chunks(group, self.batch_size):
                prompts = [self.session.prompt_ids(context) for _, context, _ in chunk]
                answers = self.session.generate(prompts, [f for _, _, f in chunk], opts)
                for (i, _, _), answer in zip(chunk, answers):
                    out[i] = cut_at_stops(answer.text, opts.stop)
                bar.update(len(chunk))
        bar.close()
        self.visuals.report(logger)
        return out

    def loglikelihood(self, requests: list[Instance]) -> list[GenerationResult]:
        """(mean negative log-likelihood per answer token, greedy) per request; the options of one
        question are scored in one forward, several questions per forward with `batch_size`."""
        questions: dict[tuple[Any, ...], list[tuple[int, str]]] = defaultdict(list)
        visual_of: dict[tuple[Any, ...], Any] = {}
        for i, request in enumerate(requests):
            context, continuation, doc_to_visual, doc_id, task, split = request.args
            if callable(continuation):  # `output_type: loglikelihood` passes the task's doc_to_target
                continuation = continuation(self.task_dict[task][split][doc_id])
            key = (task, split, doc_id, context)
            questions[key].append((i, str(continuation).lstrip()))
            if key not in visual_of:
                visual_of[key] = self._visual(doc_to_visual, doc_id, task, split)
        out: list[GenerationResult] = [GenerationResult(text="")] * len(requests)
        bar = tqdm(total=len(requests), desc="merv loglikelihood", disable=self.rank != 0)
        groups: dict[Any, list[tuple[tuple[Any, ...], dict[str, torch.Tensor]]]] = defaultdict(list)
        for key in questions:
            features = self.visuals.features(visual_of[key])
            groups[_shapes(features)].append((key, features))
        model = self.session.model
        for group in groups.values():
            for chunk in _chunks(group, self.batch_size):
                features = {name: torch.cat([f[name] for _, f in chunk]).to(model.device) for name in chunk[0][1]}
                with torch.inference_mode():
                    scores = model.option_loglikelihoods(features, [key[3] for key, _ in chunk],
                                                         [[c for _, c in questions[key]] for key, _ in chunk])
                for j, (key, _) in enumerate(chunk):
                    for k, (i, _) in enumerate(questions[key]):
                        nll = -scores.sums[j][k] / max(scores.counts[j][k], 1)
                        # wrapped: lmms-eval 0.7.3 turns a bare (float, bool) response into its str()
                        out[i] = GenerationResult(text=(nll, scores.greedy[j][k]))  # type: ignore[arg-type]
                    bar.update(len(questions[key]))
        bar.close()
        self.visuals.report(logger)
        return out

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("merv answers one-turn questions; multi-round tasks are not supported")

    # --- helpers ----------------------------------------------------------------------------------

    def options_for(self, gen_kwargs: dict[str, Any] | None, task: str) -> GenerateOptions:
        """A task's `generation_kwargs` as `merv generate` settings (greedy unless it samples)."""
        kw = dict(gen_kwargs or {})
        if int(kw.get("num_beams", 1) or 1) > 1:
            raise ValueError(f"task {task!r} asks for beam search (num_beams={kw['num_beams']}); merv decodes greedily "
                             "or samples: set num_beams: 1 in the task's generation_kwargs")
        until = kw.get("until") or ()
        until = (until,) if isinstance(until, str) else tuple(until)
        temperature = float(kw.get("temperature", 0.0) or 0.0)
        sample = bool(kw.get("do_sample", False)) and temperature > 0
        return replace(self.options, max_new_tokens=int(kw.get("max_new_tokens") or self.options.max_new_tokens),
                       temperature=temperature if sample else 0.0, top_p=float(kw.get("top_p") or 1.0) if sample else 1.0,
                       stop=until)

    def _visual(self, doc_to_visual: Any, doc_id: int, task: str, split: str) -> Any:
        """The one video or image a MERV question is about."""
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual is not None else None
        visuals = [v for v in (visuals or []) if v is not None]
        if len(visuals) != 1:
            raise ValueError(f"task {task!r} doc {doc_id}: merv answers about exactly one video or image per question, "
                             f"the task gives {len(visuals)}")
        return visuals[0]


def cut_at_stops(text: str, stops: Sequence[str]) -> str:
    """The answer up to the first stop string (transformers stops after generating it)."""
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=len(text))
    return text[:cut].strip()


def _shapes(features: dict[str, torch.Tensor]) -> tuple[Any, ...]:
    return tuple((name, tuple(x.shape[1:])) for name, x in sorted(features.items()))


def _chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
