"""Prompt formats and conversation tokenisation with answer-only labels.

Formats (`get_prompt_builder(fmt, tokenizer)`):
  pure           base LLMs (MERV default, LLaMA-2 base): "In: {human}\\nOut: {gpt}</s>" (prismatic's PurePromptBuilder)
  llama2-chat    "<s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{human} [/INST] {gpt}</s>"
  vicuna-v15     "{system} USER: {human} ASSISTANT: {gpt}</s>"
  chat-template  the tokenizer's own chat template (LLaMA-3 instruct, Qwen2.5 instruct, ...)

`tokenize_conversation` follows the reference: each turn's text is tokenised on its own (the first
with special tokens, so it starts with BOS); human turns get label -100, gpt turns keep their ids
(answer text + end-of-turn token), so the loss counts only the answers.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Iterable

import torch

from merv import MervError

IGNORE_INDEX = -100
PROMPT_FORMATS = ("pure", "llama2-chat", "vicuna-v15", "chat-template")
PLACEHOLDERS = ("<video>", "<image>")

LLAMA2_CHAT_SYSTEM = (
    "You are a helpful language and vision assistant. You are able to understand the visual content that the user "
    "provides, and assist the user with a variety of tasks using natural language."
)
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

_ROLES = {"human": "human", "user": "human", "gpt": "gpt", "assistant": "gpt"}


class ConversationError(MervError, ValueError):
    """A conversation that cannot be tokenised with answer-only labels (turn order, roles, no answer)."""


def conversation_problem(conversations: Iterable[dict[str, Any]]) -> str | None:
    """Why a LLaVA conversation cannot be trained on, or None.

    Data files are checked with this when they are read, so a bad record is named up front
    instead of failing mid-epoch in a loader worker (or silently adding no answer tokens).
    """
    turns = list(conversations)
    for t, turn in enumerate(turns):
        expected = "human" if t % 2 == 0 else "gpt"
        if _ROLES.get(turn.get("from")) != expected:
            aliases = " / ".join(repr(k) for k, v in _ROLES.items() if v == expected)
            return (f"turn {t} comes from {turn.get('from')!r} but must come from {aliases}: "
                    "conversations alternate human / gpt, starting with human")
    if len(turns) < 2:
        return "has no answer (no 'gpt' turn after the question), so it has nothing to learn from"
    return None


def strip_placeholders(text: str) -> str:
    """Remove the `<video>` / `<image>` markers of LLaVA-style data (visual tokens go after BOS instead)."""
    for p in PLACEHOLDERS:
        text = text.replace(p, "")
    return text.strip()


class PromptBuilder(ABC):
    """Builds a multi-turn prompt one turn at a time; turns alternate human, gpt, human, ..."""

    #: classic formats are rstripped per turn before tokenising (SentencePiece adds a space anyway)
    strip_turns: bool = True

    def __init__(self, bos: str = "<s>", eos: str = "</s>", system_prompt: str | None = None) -> None:
        self.bos, self.eos = bos, eos
        self.system_prompt = system_prompt
        self.prompt = ""
        self.turn_count = 0

    def _check_role(self, role: str) -> str:
        r = _ROLES.get(role)
        expected = "human" if self.turn_count % 2 == 0 else "gpt"
        if r != expected:
            raise ConversationError(
                f"turn {self.turn_count} must come from {expected!r}, got {role!r}; conversations alternate human/gpt")
        return r

    def add_turn(self, role: str, message: str) -> str:
        """Append one turn; returns the exact text added to the prompt."""
        r = self._check_role(role)
        text = self._wrap(r, strip_placeholders(message))
        self.prompt += text
        self.turn_count += 1
        return text

    @abstractmethod
    def _wrap(self, role: str, message: str) -> str: ...

    def get_prompt(self) -> str:
        """The prompt so far, without the leading BOS text (the tokenizer adds BOS)."""
        return self.prompt.removeprefix(self.bos).rstrip()


class PurePromptBuilder(PromptBuilder):
    """Base-model format used by MERV with LLaMA-2 base."""

    def _wrap(self, role: str, message: str) -> str:
        if role == "human":
            return f"In: {message}\nOut: "
        return f"{message if message else ' '}{self.eos}"


class LLaMA2ChatPromptBuilder(PromptBuilder):
    """LLaMA-2 chat format; the system prompt sits inside the first [INST] block.

    (The reference writes the opening tag as "<<SYS>\\n", a typo; we use Meta's "<<SYS>>\\n".)
    """

    def __init__(self, bos: str = "<s>", eos: str = "</s>", system_prompt: str | None = None) -> None:
        super().__init__(bos, eos, LLAMA2_CHAT_SYSTEM if system_prompt is None else system_prompt)

    def _wrap(self, role: str, message: str) -> str:
        if role == "gpt":
            return f"{message if message else ' '}{self.eos}"
        if self.turn_count == 0 and self.system_prompt:
            message = f"<<SYS>>\n{self.system_prompt.strip()}\n<</SYS>>\n\n{message}"
        return f"{self.bos}[INST] {message} [/INST] "


class VicunaV15PromptBuilder(PromptBuilder):
    """Vicuna v1.5 format (system sentence, then USER / ASSISTANT turns)."""

    def __init__(self, bos: str = "<s>", eos: str = "</s>", system_prompt: str | None = None) -> None:
        super().__init__(bos, eos, VICUNA_SYSTEM if system_prompt is None else system_prompt)

    def _wrap(self, role: str, message: str) -> str:
        if role == "gpt":
            return f"{message if message else ' '}{self.eos}"
        prefix = f"{self.system_prompt.strip()} " if self.turn_count == 0 and self.system_prompt else ""
        return f"{prefix}USER: {message} ASSISTANT: "


class ChatTemplatePromptBuilder(PromptBuilder):
    """The tokenizer's chat template (instruct models).

    Each turn's text is the difference between the template rendered with and without that turn
    (with the generation prompt after a human turn), so an answer's text includes its end-of-turn
    token. Templates that rewrite earlier turns are rejected.
    """

    strip_turns = False

    def __init__(self, tokenizer: Any, system_prompt: str | None = None) -> None:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("prompt format 'chat-template' needs a tokenizer with a chat_template; use 'pure' for base models")
        super().__init__(tokenizer.bos_token or "", tokenizer.eos_token or "", system_prompt)
        self.tokenizer = tokenizer
        self.messages: list[dict[str, str]] = [{"role": "system", "content": system_prompt}] if system_prompt else []

    def _render(self, generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(self.messages, tokenize=False, add_generation_prompt=generation_prompt)

    def _wrap(self, role: str, message: str) -> str:
        self.messages.append({"role": "user" if role == "human" else "assistant", "content": message})
        rendered = self._render(generation_prompt=role == "human")
        if not rendered.startswith(self.prompt):
            raise ValueError("this chat template re-renders earlier turns, so per-turn labels cannot be derived from it")
        return rendered[len(self.prompt) :]

    def get_prompt(self) -> str:
        """Rendered text; keeps the BOS text if the template writes one (tokenise without special tokens)."""
        return self.prompt


def get_prompt_builder(fmt: str, tokenizer: Any = None, system_prompt: str | None = None) -> PromptBuilder:
    """A fresh builder for `fmt`; BOS/EOS strings come from the tokenizer when given."""
    bos = getattr(tokenizer, "bos_token", None) or "<s>"
    eos = getattr(tokenizer, "eos_token", None) or "</s>"
    if fmt == "pure":
        return PurePromptBuilder(bos, eos, system_prompt)
    if fmt == "llama2-chat":
        return LLaMA2ChatPromptBuilder(bos, eos, system_prompt)
    if fmt == "vicuna-v15":
        return VicunaV15PromptBuilder(bos, eos, system_prompt)
    if fmt == "chat-template":
        if tokenizer is None:
            raise ValueError("prompt format 'chat-template' needs the tokenizer")
        return ChatTemplatePromptBuilder(tokenizer, system_prompt)
    raise ValueError(f"prompt format {fmt!r} is unknown; use one of {PROMPT_FORMATS}")


def _encode(tokenizer: Any, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def one_turn_prompt(fmt: str, tokenizer: Any, message: str, system_prompt: str | None = None) -> str:
    """The prompt text of a single question in `fmt`, ready for the answer to follow."""
    builder = get_prompt_builder(fmt, tokenizer, system_prompt)
    builder.add_turn("human", message)
    return builder.get_prompt()


def prompt_token_ids(tokenizer: Any, prompt: str) -> list[int]:
    """A prompt text's token ids, starting with exactly one BOS when the tokenizer has one."""
    return ensure_bos(tokenizer, list(tokenizer(prompt, add_special_tokens=True)["input_ids"]))


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[list[list[int]], list[list[int]]]:
    """(ids, attention mask) of prompts padded on the left to one length, as generation wants them."""
    width = max(map(len, rows))
    return ([[pad_id] * (width - len(r)) + r for r in rows], [[0] * (width - len(r)) + [1] * len(r) for r in rows])


def ensure_bos(tokenizer: Any, ids: list[int]) -> list[int]:
    """Make sure a sequence starts with exactly one BOS when the tokenizer has one (visual tokens go after it)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return ids
    while len(ids) >= 2 and ids[0] == bos and ids[1] == bos:
        ids = ids[1:]
    return ids if ids and ids[0] == bos else [bos] + ids


_SYSTEM_MARK, _USER_MARK = "MERVSYSTEMMARK", "MERVUSERMARK"


def user_turn_anchor(tokenizer: Any) -> tuple[int, ...] | None:
    """Token ids that end right where the first user message's content begins in the tokenizer's
    chat template; None without a template.

    Where the visual tokens go without a BOS token (Qwen2.5): right after the first occurrence of
    these ids, i.e. at the start of the first user turn's content, as Qwen's own vision models place
    them. Taken from the template: the text between a system turn's content and the user's
    (ChatML: "<|im_end|>\\n<|im_start|>user\\n"); a template without system turns gives the whole text
    before the user's content. Checked in context: the anchor must tokenize the same inside a
    rendered conversation, else this raises (the template / tokenizer pair cannot place them)."""
    if not getattr(tokenizer, "chat_template", None):
        return None

    def render(messages: list[dict[str, str]]) -> str:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    try:
        text = render([{"role": "system", "content": _SYSTEM_MARK}, {"role": "user", "content": _USER_MARK}])
        start = text.index(_SYSTEM_MARK) + len(_SYSTEM_MARK)
    except Exception:  # noqa: BLE001 - a template without system turns raises its own error types
        text = render([{"role": "user", "content": _USER_MARK}])
        start = 0
    user = text.index(_USER_MARK)
    anchor = tuple(_encode(tokenizer, text[start:user], special=False))
    full = _encode(tokenizer, text, special=False)
    after = next((i + len(anchor) for i in range(len(full) - len(anchor) + 1)
                  if tuple(full[i:i + len(anchor)]) == anchor), None)
    if not anchor or after is None or not tokenizer.decode(full[after:]).startswith(_USER_MARK):
        raise ValueError("the tokenizer has no BOS token and its chat template's user turn does not start at a token "
                         "boundary, so the visual tokens cannot be placed at the start of the user's content")
    return anchor


def tokenize_conversation(
    builder: PromptBuilder,
    tokenizer: Any,
    conversations: Iterable[dict[str, str]],
    max_length: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """LLaVA conversation `[{"from": "human"|"gpt", "value": str}, ...]` -> `(input_ids, labels)`.

    `builder` must be fresh. Only gpt-turn tokens carry labels; everything else is -100. The
    sequence starts with BOS when the tokenizer has one; `max_length` truncates from the right.
    """
    if builder.turn_count:
        raise ValueError("tokenize_conversation needs a fresh PromptBuilder (get_prompt_builder(...) per sample)")
    input_ids: list[int] = []
    labels: list[int] = []
    for i, turn in enumerate(conversations):
        text = builder.add_turn(turn["from"], turn["value"])
        if builder.strip_turns:
            text = text.rstrip()
        ids = _encode(tokenizer, text, special=(i == 0 and builder.strip_turns))
        if i == 0:
            ids = ensure_bos(tokenizer, ids)
        input_ids += ids
        labels += ids if i % 2 == 1 else [IGNORE_INDEX] * len(ids)  # odd turns are gpt answers
    if not input_ids:
        raise ConversationError("empty conversation: a record needs at least a human and a gpt turn")
    if max_length is not None:
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    return torch.tensor(input_ids, dtype=torch.long), torch.tensor(labels, dtype=torch.long)


def tokenize_caption(tokenizer: Any, caption: str, max_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage-1 captioning sample: "{caption}{eos}" with BOS; every token but BOS is a label (reference `AlignVideoDataset`)."""
    ids = ensure_bos(tokenizer, _encode(tokenizer, strip_placeholders(caption) + (tokenizer.eos_token or ""), special=True))
    labels = list(ids)
    if getattr(tokenizer, "bos_token_id", None) is not None:
        labels[0] = IGNORE_INDEX
    if max_length is not None:
        ids, labels = ids[:max_length], labels[:max_length]
    return torch.tensor(ids, dtype=torch.long), torch.tensor(labels, dtype=torch.long)


def encode_prompt(fmt: str, tokenizer: Any, message: str, system_prompt: str | None = None) -> list[int]:
    """Token ids of a one-turn generation prompt in format `fmt` (BOS first when the tokenizer has one)."""
    builder = get_prompt_builder(fmt, tokenizer, system_prompt)
    builder.add_turn("human", message)
    text = builder.get_prompt()
    return ensure_bos(tokenizer, _encode(tokenizer, text, special=builder.strip_turns))
