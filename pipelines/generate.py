"""`merv generate`: answer a question about a raw video with an exported model.

The inputs are taken in order of cost so a bad one fails in seconds with its own error: the
export's config, then the video (decoded once, as extraction decodes it) and the encoders
(weights, checked against the fingerprints the export records), and only then the LLM. Decoding
is transformers' `generate` on the Hugging Face model (`merv.hf`): greedy by default, sampling with
a temperature, top-p, stop strings, and streaming to a callback.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from merv import MervError
from merv.train.model import DEFAULT_MAX_NEW_TOKENS
from merv.train.online import OnlineEncoders


class GenerateOptionsError(MervError, ValueError):
    """A generation setting outside its range."""


@dataclass(frozen=True)
class GenerateOptions:
    """What `merv generate` may change; None means "as the checkpoint's recipe says"."""

    size: str | None = None  # encoder size: paper | small | tiny
    weights: str | None = None  # encoder weights directory (else the recipe's, else the HF cache)
    allow_download: bool = False
    device: str | None = None
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    temperature: float = 0.0  # 0: greedy; > 0: sample at this temperature
    top_p: float = 1.0  # nucleus sampling (with temperature > 0)
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = field(default_factory=tuple)  # stop strings
    seed: int = 0  # sampling seed, so a sampled answer repeats

    def __post_init__(self) -> None:
        problems = [f"--{name.replace('_', '-')} {value} {rule}" for name, value, ok, rule in (
            ("max_new_tokens", self.max_new_tokens, self.max_new_tokens >= 1, "must be at least 1"),
            ("temperature", self.temperature, self.temperature >= 0, "must be >= 0 (0: greedy)"),
            ("top_p", self.top_p, 0 < self.top_p <= 1, "must be in (0, 1]"),
            ("repetition_penalty", self.repetition_penalty, self.repetition_penalty > 0, "must be > 0 (1: none)"),
        ) if not ok]
        if problems:
            raise GenerateOptionsError("; ".join(problems))


# A fast tokenizer must not be used from two threads at once (its Rust object is borrowed mutably
# while encoding): `merv serve` tokenises in request threads and decodes in the engine thread.
TOKENIZER_LOCK = threading.Lock()


@dataclass(frozen=True)
class Answer:
    text: str
    completion_tokens: int
    finish_reason: str  # "stop" (EOS or a stop string) | "length" (max_new_tokens reached)


class GenerationSession:
    """A model, its processor and its frozen encoders, loaded once, answering many questions:
    `merv generate` asks one, `merv serve` many (batched), through the same code.

    Inputs are taken in order of cost: the export's config, then the encoders (checked against the
    fingerprints the export records), then the LLM on first use."""

    def __init__(self, checkpoint: str, opts: GenerateOptions = GenerateOptions()) -> None:
        from merv.hf.processing import MervProcessor
        from merv.train.export import check_export, connector_from_reference_config, is_published, reference_config
        from merv.train.recipes import RECIPES, get_recipe
        from merv.train.specs import FeatureSpec

        self.checkpoint = checkpoint
        self.opts = opts
        self.published = is_published(checkpoint)
        if self.published:  # the reference's weights, from the HF cache (or the Hub with allow_download)
            _, specs = connector_from_reference_config(reference_config(checkpoint, allow_download=opts.allow_download))
            trained, recorded = ("paper", None), {}
        else:
            cfg = check_export(checkpoint)
            extra = cfg.get("extra", {})
            if "encoder_size" in extra:  # what the run trained with (merv train records it)
                trained = (extra["encoder_size"], extra.get("encoder_weights"))
            else:  # older exports: the recipe's
                name = str(extra.get("recipe"))
                recipe = get_recipe(name).model if name in RECIPES else None
                trained = (recipe.encoder_size, recipe.encoder_weights) if recipe else ("paper", None)
            specs = [FeatureSpec.from_dict(d) for d in cfg["feature_specs"]]
            recorded = {e["name"]: e["fingerprint"] for e in cfg.get("encoders", []) if e.get("fingerprint")}
        size = opts.size or trained[0]
        weights = opts.weights or (trained[1] if not opts.size else None)
        self.encoders = OnlineEncoders(specs, size=size, weights=weights, allow_download=opts.allow_download,
                                       device=opts.device)
        self.encoders.check_fingerprints(recorded, what=f"export {checkpoint}")
        self.processor = MervProcessor(None, [{"name": s.name, "frames": self.encoders.frames_for(s.name),
                                               "framewise": self.encoders.framewise(s.name)} for s in specs],
                                       decode_frames=self.encoders.decode_frames)
        self._model: Any = None
        self._hf: Any = None

    # --- the model, on first use -----------------------------------------------------------------

    @property
    def model(self) -> Any:
        if self._model is None:
            from merv.hf.modeling import MervForConditionalGeneration
            from merv.train.export import load_merv, load_published_merv

            if self.published:
                model = load_published_merv(self.checkpoint, device=self.opts.device,
                                            allow_download=self.opts.allow_download)
            else:
                model = load_merv(self.checkpoint, device=self.opts.device)
            self.processor.tokenizer, self.processor.prompt_format = model.tokenizer, model.prompt_format
            self._hf = MervForConditionalGeneration.from_merv_model(model)
            self._model = model
        return self._model

    # --- the steps -------------------------------------------------------------------------------

    def features(self, source: Any) -> dict[str, Any]:
        """{encoder: (1, t, h, w, d)} of one video / image (path, URL or frames), decoded once by
        extraction's rules and encoded as the store would hold it."""
        selected, _ = self.processor.visual(source)
        return self.encoders.encode_inputs(selected)

    def prompt_ids(self, question: str, system_prompt: str | None = None) -> list[int]:
        self.model  # noqa: B018 - the tokenizer comes with the model
        with TOKENIZER_LOCK:
            return self.processor.token_ids(self.processor.build_prompt(question, system_prompt))

    def generate(self, prompts: list[list[int]], features: list[dict[str, Any]], opts: GenerateOptions,
                 on_text: Callable[[str], None] | None = None) -> list[Answer]:
        """Answers to several prompts (one visual each) in one batched `generate` (left-padded)."""
        import torch

        from merv.train.prompts import left_pad

        model, tok = self.model, self.model.tokenizer
        rows, masks = left_pad(prompts, tok.pad_token_id if tok.pad_token_id is not None else 0)
        ids = torch.tensor(rows, device=model.device)
        mask = torch.tensor(masks, device=model.device)
        feats = {name: torch.cat([f[name] for f in features]).to(model.device) for name in features[0]}
        sampling = ({"do_sample": True, "temperature": opts.temperature, "top_p": opts.top_p} if opts.temperature > 0
                    else {"do_sample": False})
        if opts.temperature > 0:
            torch.manual_seed(opts.seed)
        streamer = _CallbackStreamer(tok, on_text) if on_text is not None else None
        out = self._hf.generate(input_ids=ids, attention_mask=mask, features=feats,
                                max_new_tokens=opts.max_new_tokens, repetition_penalty=opts.repetition_penalty,
                                stop_strings=list(opts.stop) or None, tokenizer=tok if opts.stop else None,
                                streamer=streamer, **sampling)
        answers = []
        for row in out.tolist():
            cut = next((i for i, t in enumerate(row) if t == tok.eos_token_id), None)
            completion = row if cut is None else row[: cut + 1]  # what follows the first EOS is padding
            with TOKENIZER_LOCK:
                text = tok.decode(completion, skip_special_tokens=True).strip()
            stopped = cut is not None or any(stop in text for stop in opts.stop)
            finish = "stop" if stopped or len(completion) < opts.max_new_tokens else "length"
            answers.append(Answer(text, len(completion), finish))
        return answers

    def answer(self, source: Any, question: str, opts: GenerateOptions | None = None,
               on_text: Callable[[str], None] | None = None) -> str:
        features = self.features(source)  # before the LLM loads: a bad video fails in seconds
        return self.generate([self.prompt_ids(question)], [features], opts or self.opts, on_text)[0].text


def answer_video(checkpoint: str, video: str, question: str, opts: GenerateOptions = GenerateOptions(),
                 on_text: Callable[[str], None] | None = None) -> str:
    """The model's answer to `question` about `video` (a path, fsspec URL or image); `on_text`
    receives the answer piece by piece as it is generated (streaming)."""
    return GenerationSession(checkpoint, opts).answer(video, question, opts, on_text)


class _CallbackStreamer:
    """transformers' streamer protocol (`put` token ids, `end`), decoded text handed to a callback."""

    def __init__(self, tokenizer: object, on_text: Callable[[str], None]) -> None:
        self.tokenizer = tokenizer
        self.on_text = on_text
        self.ids: list[int] = []
        self.sent = ""

    def put(self, value: object) -> None:
        ids = value.reshape(-1).tolist()  # type: ignore[attr-defined]
        self.ids += [int(i) for i in ids]
        with TOKENIZER_LOCK:
            text = self.tokenizer.decode(self.ids, skip_special_tokens=True)  # type: ignore[attr-defined]
        if text.endswith("\ufffd"):  # half of a multi-byte character: wait for the rest
            return
        if len(text) > len(self.sent):
            self.on_text(text[len(self.sent):])
            self.sent = text

    def end(self) -> None:
        with TOKENIZER_LOCK:
            text = self.tokenizer.decode(self.ids, skip_special_tokens=True)  # type: ignore[attr-defined]
        if len(text) > len(self.sent):
            self.on_text(text[len(self.sent):])
        self.sent = text
