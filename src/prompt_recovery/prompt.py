"""The recovery prompt: one template, rendered with the tokenizer's chat template or as plain text.

Both texts are truncated by tokens so the whole prompt fits ``max_input_tokens``. The prompt is built
as token-id segments (fixed text, original, fixed text, rewritten, fixed text) so truncation is exact
and training and prediction tokenize identically. The template an adapter was trained with is saved in
its folder (``TEMPLATE_FILE``) and predict uses it.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from typing import Literal

TEMPLATE_FILE = "recovery_template.json"
_ORIG, _REWR = "\x00ORIGINAL\x00", "\x00REWRITTEN\x00"
# Characters kept per allowed token before tokenizing: tokenizing a megabyte of text to keep 500 tokens
# of it costs seconds and memory; no tokenizer packs more than this many characters into one token.
_CHARS_PER_TOKEN = 16


@dataclass(frozen=True)
class Template:
    instruction: str = (
        "An LLM was given an instruction and the original text below, and it produced the rewritten "
        "text. Recover the instruction."
    )
    """Task sentence shown before the texts."""
    body: str = "{instruction}\n\nOriginal text:\n{original}\n\nRewritten text:\n{rewritten}"
    """Layout of the user turn; must contain {original} and {rewritten}."""
    answer_intro: str = "\n\nInstruction:"
    """Plain mode only: text after the body that introduces the answer."""
    answer_prefix: str = "Rewrite this text"
    """Text that starts the answer and becomes part of the prediction (a fixed verb steers small models)."""
    mode: Literal["auto", "chat", "plain"] = "auto"
    """auto: the tokenizer's chat template when it has one, plain text otherwise."""

    def __post_init__(self) -> None:
        for key in ("{original}", "{rewritten}"):
            if key not in self.body:
                raise ValueError(f"template body must contain {key}")
        if self.mode not in ("auto", "chat", "plain"):
            raise ValueError(f"template mode must be auto, chat or plain; got {self.mode!r}")

    def with_prefix(self, answer_prefix: str | None) -> Template:
        if answer_prefix is None:
            return self
        return Template(**{**asdict(self), "answer_prefix": answer_prefix})

    def save(self, folder: str) -> None:
        with open(os.path.join(folder, TEMPLATE_FILE), "w", encoding="utf-8") as f:
            json.dump(asdict(self), f, indent=2)

    @classmethod
    def load(cls, path: str) -> Template:
        """Load a template from a JSON file or from an adapter folder holding TEMPLATE_FILE."""
        if os.path.isdir(path):
            path = os.path.join(path, TEMPLATE_FILE)
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def render_text(template: Template, tokenizer, original: str, rewritten: str) -> str:
    """The whole prompt as a string, up to and including the answer prefix."""
    body = template.body.format(instruction=template.instruction, original=original, rewritten=rewritten)
    use_chat = template.mode == "chat" or (template.mode == "auto" and getattr(tokenizer, "chat_template", None))
    if use_chat:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": body}], tokenize=False, add_generation_prompt=True
        )
    else:
        bos = tokenizer.bos_token if getattr(tokenizer, "bos_token", None) and _adds_bos(tokenizer) else ""
        text = bos + body + template.answer_intro + (" " if template.answer_prefix else "")
    return text + template.answer_prefix


def _adds_bos(tokenizer) -> bool:
    ids = tokenizer("x", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == tokenizer.bos_token_id


class PromptBuilder:
    """Token ids of recovery prompts for one tokenizer and template."""

    def __init__(self, tokenizer, template: Template, max_input_tokens: int) -> None:
        self.tokenizer = tokenizer
        self.template = template
        self.max_input_tokens = max_input_tokens
        skeleton = render_text(template, tokenizer, _ORIG, _REWR)
        head, rest = skeleton.split(_ORIG)
        mid, tail = rest.split(_REWR)
        self.head, self.mid, self.tail = (self._encode(s) for s in (head, mid, tail))
        self.fixed = len(self.head) + len(self.mid) + len(self.tail)
        # The answer follows a space unless the prompt already ends in white space (chat turns, "\n").
        self.answer_sep = "" if not tail or tail[-1].isspace() else " "
        if self.fixed + 16 > max_input_tokens:
            raise ValueError(
                f"max_input_tokens={max_input_tokens} leaves no room for the texts "
                f"(the template alone takes {self.fixed} tokens)"
            )

    def _encode(self, text: str, limit: int | None = None) -> list[int]:
        if limit is not None:
            text = text[: max(limit, 1) * _CHARS_PER_TOKEN]
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def build(self, original: str, rewritten: str) -> list[int]:
        room = self.max_input_tokens - self.fixed
        a, b = self._encode(original, room), self._encode(rewritten, room)
        # Each text gets half the room; what one leaves unused goes to the other.
        keep_a = min(len(a), max(room // 2, room - len(b)))
        keep_b = min(len(b), room - keep_a)
        return self.head + a[:keep_a] + self.mid + b[:keep_b] + self.tail

    def target(self, prompt: str) -> list[int]:
        """Token ids of a gold prompt as the answer to ``build`` (training labels), without EOS."""
        return self._encode(self.answer_sep + prompt.strip())


def newline_token_ids(tokenizer) -> set[int]:
    """Ids of every vocabulary token that contains a line break (byte-level, sentencepiece or plain)."""
    ids = set()
    for tok, i in tokenizer.get_vocab().items():
        if "\n" in tok or "Ċ" in tok or tok == "<0x0A>":
            ids.add(i)
    return ids
