"""`MervModel`: connector + causal LLM; visual tokens go right after BOS.

Sequence layout per sample (B samples, text length T, L visual tokens, N = T + L):
  visual sample:    [BOS] [v_1 .. v_L] [text ...]      visual labels -100, visual attention 1
  text-only sample: [BOS] [text ...] [pad_1 .. pad_L]  pads: zero embeddings, attention 0, label -100
Without a BOS token (Qwen2.5) the visual tokens open the first user turn's content, after the
chat template's system turn and user header (`<|im_start|>user\n` [v_1 .. v_L] question...), as
Qwen's own vision models place them; a sample without a user turn (a Stage-1 caption), or a model
without a chat template, has them first. LLaMA-3 has a BOS, so they follow it (before the system /
user headers), as for LLaMA-2. Text-only samples keep their length
so a mixed batch stays rectangular; the connector still runs on every sample (features of text-only
samples are ignored), which keeps every parameter in the graph on every rank under FSDP.

The input embeddings are looked up inside `forward` (FSDP2: the root unit must own that call).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .connector import Connector
from .prompts import IGNORE_INDEX, get_prompt_builder, one_turn_prompt, prompt_token_ids, user_turn_anchor

STAGES = ("align", "finetune", "full-align")
DEFAULT_MAX_NEW_TOKENS = 64  # answer length limit of `generate` / `merv generate` when none is given


@dataclass
class MervOutput:
    loss: torch.Tensor | None  # mean (or sum) cross-entropy over answer tokens
    logits: torch.Tensor  # (B, N, vocab)
    labels: torch.Tensor | None  # (B, N), aligned with logits (before the causal shift)
    attention_mask: torch.Tensor  # (B, N)
    fusion_weights: torch.Tensor | None  # (B, E); rows of text-only samples are meaningless
    num_label_tokens: torch.Tensor | None  # tokens the loss counted (for gradient-accumulation weighting)
    past_key_values: Any = None


@dataclass
class GenerationOutput:
    texts: list[str]
    token_ids: list[list[int]] = field(default_factory=list)

    @property
    def text(self) -> str:
        return self.texts[0]


@dataclass
class OptionScores:
    """Per prompt, per option: summed log-probability of the option's answer tokens and their count."""

    sums: list[list[float]]
    counts: list[list[int]]
    fusion_weights: torch.Tensor | None  # (B, E), one row per prompt
    greedy: list[list[bool]] = field(default_factory=list)  # every answer token is the argmax (lmms-eval's is_greedy)

    def normalized(self, norm: str = "mean") -> list[list[float]]:
        """Scores to compare options by: "mean" per answer token (options differ in length) or "sum"."""
        if norm not in ("mean", "sum"):
            raise ValueError(f"norm {norm!r} is unknown; use 'mean' or 'sum'")
        return [[s / max(c, 1) if norm == "mean" else s for s, c in zip(ss, cs)] for ss, cs in zip(self.sums, self.counts)]


def merge_visual(
    embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor | None,
    visual: torch.Tensor,
    has_visual: torch.Tensor,
    offset: int | torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Insert `visual` (B, L, d) at `offset` (one int, or one per sample) for visual samples; pad
    text-only samples at the end. Gathers, so every row may have its own offset."""
    b, length, d = visual.shape
    n = embeds.shape[1]
    hv = has_visual.view(b, 1)
    off = torch.as_tensor(offset, device=embeds.device).long().expand(b)
    off = torch.where(hv.view(b), off, torch.full_like(off, n))[:, None]  # text-only: the slots go last
    pos = torch.arange(n + length, device=embeds.device)[None]
    in_visual = (pos >= off) & (pos < off + length)  # (B, N + L)
    text_at = torch.where(pos < off, pos, pos - length).clamp(0, max(n - 1, 0))
    visual_at = (pos - off).clamp(0, length - 1)
    vis = torch.where(hv.unsqueeze(-1), visual, torch.zeros_like(visual)).gather(1, visual_at[..., None].expand(-1, -1, d))
    merged = torch.where(in_visual[..., None], vis, embeds.gather(1, text_at[..., None].expand(-1, -1, d)))
    mask = torch.where(in_visual, hv.to(attention_mask.dtype), attention_mask.gather(1, text_at))
    if labels is None:
        return merged, mask, None
    return merged, mask, torch.where(in_visual, torch.full_like(text_at, IGNORE_INDEX), labels.gather(1, text_at))


def first_after(input_ids: torch.Tensor, anchor: Sequence[int]) -> torch.Tensor:
    """(B,) index just past the first occurrence of `anchor` in each row; 0 where it is absent."""
    k = len(anchor)
    if input_ids.shape[1] < k:
        return torch.zeros(input_ids.shape[0], dtype=torch.long, device=input_ids.device)
    windows = input_ids.unfold(1, k, 1)  # (B, N - k + 1, k)
    hit = (windows == torch.tensor(list(anchor), device=input_ids.device, dtype=input_ids.dtype)).all(-1)
    return torch.where(hit.any(1), hit.int().argmax(1) + k, 0)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy over positions whose label is not -100; returns (loss, count)."""
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    count = (shift_labels != IGNORE_INDEX).sum()
    total = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    if reduction == "sum":
        return total, count
    if reduction != "mean":
        raise ValueError(f"loss_reduction {reduction!r} is unknown; use 'mean' or 'sum'")
    return total / count.clamp(min=1), count


def _filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs > top_p  # keep the smallest set whose mass reaches top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


class MervModel(nn.Module):
    """Connector + any HF causal LM. `tokenizer` is optional for training, needed to generate text.

    The one constructor every builder (recipes, exports, the published-weight converter, the tiny
    test model) goes through; it casts the connector to the LLM's dtype so no caller has to.
    """

    def __init__(
        self,
        connector: Connector,
        llm: nn.Module,
        *,
        tokenizer: Any = None,
        bos_token_id: int | None | str = "auto",
        prompt_format: str = "pure",
        llm_source: str | None = None,
        visual_anchor: Sequence[int] | None | str = "auto",
    ) -> None:
        super().__init__()
        hidden = llm.config.hidden_size
        if connector.d_llm != hidden:
            raise ValueError(f"connector projects to {connector.d_llm} but the LLM's hidden size is {hidden}; build it with d_llm={hidden}")
        llm_param = next(llm.parameters(), None)
        if llm_param is not None:
            connector.to(dtype=llm_param.dtype)
        self.connector = connector
        self.llm = llm
        self.tokenizer = tokenizer
        if bos_token_id == "auto":
            # the reference inserts after BOS iff the tokenizer has a BOS token (Qwen2.5 has none)
            bos_token_id = tokenizer.bos_token_id if tokenizer is not None else llm.config.bos_token_id
        self.bos_token_id: int | None = bos_token_id  # type: ignore[assignment]
        if visual_anchor == "auto":  # without BOS, a chat template's user turn opens the visual tokens
            use = bos_token_id is None and tokenizer is not None and prompt_format == "chat-template"
            visual_anchor = user_turn_anchor(tokenizer) if use else None
        self.visual_anchor: tuple[int, ...] | None = tuple(visual_anchor) if visual_anchor else None  # type: ignore[arg-type]
        self.prompt_format = prompt_format
        self.llm_source = llm_source
        self.stage: str | None = None
        # per encoder: name, fingerprint, store group, model id, frames (what an export records);
        # readers of features use the fingerprints to refuse features of another encoder configuration
        self.encoders: list[dict[str, Any]] = []
        connector.freeze_inert()

    # --- properties ---------------------------------------------------------------------------

    def visual_offsets(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B,) index of each sample's first visual token (module doc): 1, right after BOS; without
        BOS, just past `visual_anchor` (the start of the first user turn's content), or 0 where
        the sample has no user turn (captions) or the model no anchor."""
        b = input_ids.shape[0]
        if self.bos_token_id is not None:
            return torch.ones(b, dtype=torch.long, device=input_ids.device)
        if self.visual_anchor is None:
            return torch.zeros(b, dtype=torch.long, device=input_ids.device)
        return first_after(input_ids, self.visual_anchor)

    @property
    def num_visual_tokens(self) -> int:
        return self.connector.num_tokens

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # --- training -----------------------------------------------------------------------------

    def set_stage(self, stage: str) -> None:
        """Freeze per stage: `align` trains the connector only; `finetune` and `full-align` train connector + LLM
        (connector + LoRA adapters when the LLM carries them, see merv.train.lora)."""
        if stage not in STAGES:
            raise ValueError(f"stage {stage!r} is unknown; use one of {STAGES}")
        from .lora import set_trainable

        self.connector.requires_grad_(True)
        set_trainable(self.llm, stage != "align")  # with LoRA: its adapters only
        self.connector.freeze_inert()
        self.stage = stage

    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad]

    def enable_gradient_checkpointing(self) -> None:
        from .lora import unwrap

        llm = unwrap(self.llm)
        if hasattr(llm, "activation_checkpointing_enable"):  # transformers >= 5.x deprecates the old name
            llm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def _check_bos(self, input_ids: torch.Tensor, has_visual: torch.Tensor) -> None:
        if self.bos_token_id is None:
            return
        bad = has_visual & (input_ids[:, 0] != self.bos_token_id)
        if bool(bad.any()):
            rows = bad.nonzero().flatten().tolist()
            raise ValueError(
                f"samples {rows} have visual features but do not start with BOS (id {self.bos_token_id}); the visual "
                "tokens go right after BOS: tokenize with special tokens (see merv.train.prompts.tokenize_conversation)"
            )

    def embed_multimodal(
        self,
        features: dict[str, torch.Tensor] | None,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        has_visual: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(inputs_embeds, attention_mask, labels, fusion_weights) for the LLM, visual tokens merged in."""
        b = input_ids.shape[0]
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        embeds = self.llm.get_input_embeddings()(input_ids)
        if features is None:
            if has_visual is not None and bool(has_visual.any()):
                raise ValueError("has_visual marks visual samples but no features were given")
            return embeds, attention_mask, labels, None
        if has_visual is None:
            has_visual = torch.ones(b, dtype=torch.bool, device=input_ids.device)
        has_visual = has_visual.to(device=input_ids.device, dtype=torch.bool)
        self._check_bos(input_ids, has_visual)
        out = self.connector(features)
        if out.embeds.shape[0] != b:
            raise ValueError(f"features have batch size {out.embeds.shape[0]} but input_ids have {b}")
        merged, mask, lab = merge_visual(
            embeds, attention_mask, labels, out.embeds.to(embeds.dtype), has_visual, self.visual_offsets(input_ids)
        )
        return merged, mask, lab, out.weights

    def forward(
        self,
        features: dict[str, torch.Tensor] | None,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        has_visual: torch.Tensor | None = None,
        *,
        loss_reduction: str = "mean",
        use_cache: bool = False,
    ) -> MervOutput:
        """Features dict + right-padded text -> logits and (with labels) the answer-token loss.

        `has_visual` (B,) bool marks samples with features; default: all when features are given.
        """
        embeds, mask, lab, weights = self.embed_multimodal(features, input_ids, attention_mask, labels, has_visual)
        out = self.llm(inputs_embeds=embeds, attention_mask=mask, use_cache=use_cache)
        loss = count = None
        if lab is not None:
            loss, count = causal_lm_loss(out.logits, lab, loss_reduction)
        return MervOutput(
            loss=loss,
            logits=out.logits,
            labels=lab,
            attention_mask=mask,
            fusion_weights=weights,
            num_label_tokens=count,
            past_key_values=_cache_of(out) if use_cache else None,
        )

    # --- inference ----------------------------------------------------------------------------

    def build_prompt(self, message: str, system_prompt: str | None = None) -> str:
        """One-turn prompt text in this model's prompt format."""
        return one_turn_prompt(self.prompt_format, self.tokenizer, message, system_prompt)

    def _prompt_ids(self, prompt: str | Sequence[str] | Sequence[int] | Sequence[Sequence[int]] | torch.Tensor) -> list[list[int]]:
        if isinstance(prompt, torch.Tensor):
            return [list(map(int, row)) for row in (prompt if prompt.dim() == 2 else prompt[None])]
        if isinstance(prompt, str):
            prompt = [prompt]
        if len(prompt) and isinstance(prompt[0], int):
            return [list(prompt)]  # type: ignore[arg-type]
        rows = []
        for p in prompt:
            if isinstance(p, str):
                if self.tokenizer is None:
                    raise ValueError("text prompts need a tokenizer: MervModel(..., tokenizer=tok)")
                rows.append(prompt_token_ids(self.tokenizer, p))
            else:
                rows.append(list(map(int, p)))
        return rows

    def _eos_ids(self, eos_token_id: int | Sequence[int] | None) -> set[int]:
        if eos_token_id is not None:
            return {int(eos_token_id)} if isinstance(eos_token_id, int) else set(map(int, eos_token_id))
        ids: set[int] = set()
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        gen_eos = getattr(getattr(self.llm, "generation_config", None), "eos_token_id", None)
        if gen_eos is not None:
            ids |= {int(gen_eos)} if isinstance(gen_eos, int) else set(map(int, gen_eos))
        return ids

    def _prefill(
        self, features: dict[str, torch.Tensor] | None, rows: list[list[int]]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Left-padded (embeds, mask, position_ids) of [BOS, visual, prompt] per sample."""
        device = self.device
        embed = self.llm.get_input_embeddings()
        visual = self.connector(features).embeds if features is not None else None
        if visual is not None and visual.shape[0] != len(rows):
            raise ValueError(f"{visual.shape[0]} feature samples for {len(rows)} prompts")
        seqs = []
        for i, ids in enumerate(rows):
            e = embed(torch.tensor(ids, device=device))
            if visual is not None:
                if self.bos_token_id is not None and ids[0] != self.bos_token_id:
                    raise ValueError(f"prompt {i} does not start with BOS (id {self.bos_token_id})")
                off = int(self.visual_offsets(torch.tensor([ids]))[0])
                e = torch.cat([e[:off], visual[i].to(e.dtype), e[off:]], dim=0)
            seqs.append(e)
        n = max(s.shape[0] for s in seqs)
        d = seqs[0].shape[-1]
        embeds = seqs[0].new_zeros(len(seqs), n, d)
        mask = torch.zeros(len(seqs), n, dtype=torch.long, device=device)
        for i, s in enumerate(seqs):
            embeds[i, n - s.shape[0] :] = s
            mask[i, n - s.shape[0] :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        return embeds, mask, positions

    @torch.inference_mode()
    def option_loglikelihoods(
        self,
        features: dict[str, torch.Tensor],
        messages: Sequence[str],
        options: Sequence[Sequence[str]],
        *,
        system_prompt: str | None = None,
    ) -> OptionScores:
        """Log-likelihood of each option as the answer to its message, seen exactly as in training.

        Sample j (features row j) asks `messages[j]`; every `options[j][k]` becomes the gpt turn of
        a one-turn conversation tokenised like a training record (`tokenize_conversation`: the
        option plus the end-of-turn token), padded by the loader's `pad_batch`, and scored by this
        model's `embed_multimodal` (visual tokens placed as in training) and LLM. Only the logits
        that predict answer tokens are computed, so memory does not grow with the visual tokens.
        """
        from .loader import pad_batch
        from .prompts import tokenize_conversation

        if self.tokenizer is None:
            raise ValueError("option_loglikelihoods needs a tokenizer: MervModel(..., tokenizer=tok)")
        if len(messages) != len(options):
            raise ValueError(f"{len(messages)} messages but {len(options)} option lists")
        seqs, owner = [], []
        for j, (message, opts) in enumerate(zip(messages, options)):
            if not opts:
                raise ValueError(f"message {j} has no options to score")
            for answer in opts:
                conv = [{"from": "human", "value": message}, {"from": "gpt", "value": answer}]
                seqs.append(tokenize_conversation(get_prompt_builder(self.prompt_format, self.tokenizer, system_prompt), self.tokenizer, conv))
                owner.append(j)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        input_ids, mask, labels = (t.to(self.device) for t in pad_batch(seqs, pad))
        rows = torch.tensor(owner)
        row_feats = {k: v.index_select(0, rows.to(v.device)) for k, v in features.items()}
        embeds, amask, lab, weights = self.embed_multimodal(row_feats, input_ids, mask, labels)
        assert lab is not None
        # keep the positions [first answer token - 1, last answer token): the logits that predict answers
        cols = (lab != IGNORE_INDEX).any(dim=0).nonzero().flatten()
        lo, hi = int(cols.min()) - 1, int(cols.max())
        keep = torch.arange(lo, hi, device=embeds.device)
        try:
            logits = self.llm(inputs_embeds=embeds, attention_mask=amask, use_cache=False, logits_to_keep=keep).logits
        except TypeError:  # an LLM without tensor logits_to_keep: compute everything, then slice
            logits = self.llm(inputs_embeds=embeds, attention_mask=amask, use_cache=False).logits[:, lo:hi]
        target = lab[:, lo + 1 : hi + 1]
        valid = target != IGNORE_INDEX
        token_lp = F.log_softmax(logits.float(), dim=-1).gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1) * valid
        sums, counts = token_lp.sum(-1).cpu().tolist(), valid.sum(-1).cpu().tolist()
        greedy = ((logits.argmax(-1) == target) | ~valid).all(-1).cpu().tolist()
        out = OptionScores([[] for _ in messages], [[] for _ in messages], None, [[] for _ in messages])
        for i, j in enumerate(owner):
            out.sums[j].append(float(sums[i]))
            out.counts[j].append(int(counts[i]))
            out.greedy[j].append(bool(greedy[i]))
        if weights is not None:
            first = torch.tensor([owner.index(j) for j in range(len(messages))], device=weights.device)
            out.fusion_weights = weights.index_select(0, first)
        return out

    @torch.inference_mode()
    def generate(
        self,
        features: dict[str, torch.Tensor] | None,
        prompt: str | Sequence[str] | Sequence[int] | Sequence[Sequence[int]] | torch.Tensor,
        *,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        use_cache: bool = True,
        seed: int | None = None,
        eos_token_id: int | Sequence[int] | None = None,
    ) -> GenerationOutput:
        """Greedy or sampled decoding with a KV cache (or, `use_cache=False`, full recomputation).

        `prompt`: full prompt text (see `build_prompt`), a list of texts, or token ids; one prompt
        per feature sample. Prompts of different lengths are left-padded. Sampling uses a private
        generator seeded by `seed`, so runs repeat.
        """
        rows = self._prompt_ids(prompt)
        embeds, mask, positions = self._prefill(features, rows)
        embed = self.llm.get_input_embeddings()
        eos = self._eos_ids(eos_token_id)
        pad = self.tokenizer.pad_token_id if self.tokenizer is not None and self.tokenizer.pad_token_id is not None else 0
        gen = None
        if do_sample:
            gen = torch.Generator(device=embeds.device)
            gen.manual_seed(0 if seed is None else seed)
        b = embeds.shape[0]
        done = torch.zeros(b, dtype=torch.bool, device=embeds.device)
        steps: list[torch.Tensor] = []
        past = None
        step_embeds, step_pos = embeds, positions
        for _ in range(max_new_tokens):
            if use_cache:
                out = self.llm(
                    inputs_embeds=step_embeds, attention_mask=mask, position_ids=step_pos,
                    use_cache=True, logits_to_keep=1, **{_cache_kwarg(self.llm): past},
                )
                past = _cache_of(out)
            else:
                out = self.llm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=False, logits_to_keep=1)
            logits = out.logits[:, -1].float()
            if do_sample:
                probs = _filter_logits(logits / max(temperature, 1e-5), top_k, top_p).softmax(dim=-1)
                nxt = torch.multinomial(probs, 1, generator=gen).squeeze(-1)
            else:
                nxt = logits.argmax(dim=-1)
            nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
            steps.append(nxt)
            if eos:
                done |= torch.isin(nxt, torch.tensor(sorted(eos), device=nxt.device, dtype=nxt.dtype))
            if bool(done.all()):
                break
            step_embeds = embed(nxt)[:, None]
            step_pos = positions[:, -1:] + 1
            embeds = torch.cat([embeds, step_embeds], dim=1)
            positions = torch.cat([positions, step_pos], dim=1)
            mask = torch.cat([mask, mask.new_ones(b, 1)], dim=1)
        token_ids: list[list[int]] = []
        for i in range(b):
            ids: list[int] = []
            for s in steps:
                t = int(s[i])
                if t in eos:
                    break
                ids.append(t)
            token_ids.append(ids)
        texts = [self.tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in token_ids] if self.tokenizer else [""] * b
        return GenerationOutput(texts=texts, token_ids=token_ids)

    def generate_from_video(self, path: str, prompt: str | None = None, *, encoders: Any, question: str | None = None, **kwargs: Any) -> GenerationOutput:
        """Decode + encode a raw video online (`merv.train.online.OnlineEncoders`), then `generate`.

        Give either the full `prompt` text or a `question` (wrapped with `build_prompt`).
        """
        if (prompt is None) == (question is None):
            raise ValueError("pass exactly one of prompt= (full prompt text) or question= (wrapped in the prompt format)")
        features = encoders.encode_path(path, device=self.device)
        return self.generate(features, prompt if prompt is not None else self.build_prompt(question or ""), **kwargs)


def _cache_kwarg(llm: Any) -> str:
    """The KV-cache keyword of an LLM's forward: transformers 5 renamed `past_key_values` to
    `cache` (the old name warns, and will go); 4.x knows only the old one."""
    import inspect

    from .lora import unwrap

    return "cache" if "cache" in inspect.signature(unwrap(llm).forward).parameters else "past_key_values"


def _cache_of(out: Any) -> Any:
    """The KV cache of an LLM output, under either name (see `_cache_kwarg`)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)
