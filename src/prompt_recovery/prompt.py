"""The recovery prompt: one template, rendered with the tokenizer's chat template or as plain text.

Both texts are truncated by tokens so the whole prompt fits ``max_input_tokens``. The ids of a prompt are
those of the whole rendered prompt tokenized in one call, never of its pieces tokenized one by one: a
sentencepiece-style (Metaspace) tokenizer gives every separately tokenized piece its own leading "▁", and
a merge across a piece's edge would be lost, so the model would read a prompt unlike any text it was
trained on. Truncation cuts each text at a token boundary of that whole tokenization and tokenizes the
result again. The template an adapter was trained with is saved in its folder (``TEMPLATE_FILE``) and
predict uses it; training builds its inputs with the same ``PromptBuilder``.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from typing import Literal

from .data import InputError

TEMPLATE_FILE = "recovery_template.json"
_ORIG, _REWR = "\x00ORIGINAL\x00", "\x00REWRITTEN\x00"
# Characters kept per allowed token before tokenizing: tokenizing a megabyte of text to keep 500 tokens
# of it costs seconds and memory; ordinary text averages 3 to 5 characters a token, and only runs of
# white space or punctuation pack more than 16 into one.
_CHARS_PER_TOKEN = 16
# Texts get at least this many tokens between them, or the template is refused as too long.
_MIN_TEXT_TOKENS = 16


class PromptTooLongError(InputError, ValueError):
    """The template alone leaves no room for the texts: a bad option (exit 2), not an internal error."""


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
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            if not isinstance(data, dict):
                raise ValueError("expected a JSON object")
            known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
            return cls(**known)
        except (OSError, ValueError, TypeError) as exc:  # the user's file: one line that names it
            raise InputError(f"cannot read template {path}: {exc}") from None


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
    """Token ids of recovery prompts for one tokenizer and template.

    ``build`` returns exactly the ids of tokenizing ``render(a, b)`` in one call, where ``a`` and ``b`` are
    the texts cut (``fit``) so that the prompt holds at most ``max_input_tokens`` tokens.
    """

    def __init__(self, tokenizer, template: Template, max_input_tokens: int) -> None:
        self.tokenizer = tokenizer
        self.template = template
        self.max_input_tokens = max_input_tokens
        skeleton = render_text(template, tokenizer, _ORIG, _REWR)
        self.head, rest = skeleton.split(_ORIG)
        self.mid, self.tail = rest.split(_REWR)
        self.fixed = len(self._encode(self.head + self.mid + self.tail))
        # The answer follows a space unless the prompt already ends in white space (chat turns, "\n").
        self.answer_sep = "" if not self.tail or self.tail[-1].isspace() else " "
        if self.fixed + _MIN_TEXT_TOKENS > max_input_tokens:
            raise PromptTooLongError(
                f"max_input_tokens={max_input_tokens} leaves no room for the texts (the template alone takes "
                f"{self.fixed} tokens; give --max-input-tokens {self.fixed + _MIN_TEXT_TOKENS} or more)"
            )

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def render(self, original: str, rewritten: str) -> str:
        """The prompt text for these (already cut) texts, up to and including the answer prefix.

        The texts go in verbatim between the skeleton's pieces (a chat template that trimmed them would
        make the cut points unknowable); for plain templates this is ``render_text`` exactly.
        """
        return self.head + original + self.mid + rewritten + self.tail

    def fit(self, original: str, rewritten: str) -> tuple[str, str, list[int]]:
        """(original cut, rewritten cut, ids of the whole prompt) with at most ``max_input_tokens`` ids.

        Each text keeps half the room for the texts; what one leaves unused goes to the other. A text is
        cut where one of its tokens starts in the whole prompt's tokenization, and the cut prompt is
        tokenized again (a cut can change the merges next to it), until it fits: every round shortens a
        text, and with both texts empty the template fits, so it ends.
        """
        cap = self.max_input_tokens * _CHARS_PER_TOKEN
        a, b = original[:cap], rewritten[:cap]
        while True:
            ids, starts = self._tokenize(self.render(a, b), len(self.head), len(a), len(self.mid), len(b))
            over = len(ids) - self.max_input_tokens
            if over <= 0:
                return a, b, ids
            in_a, in_b = starts
            room = max(len(in_a) + len(in_b) - over, 0)
            keep_a = min(len(in_a), max(room // 2, room - len(in_b)))
            keep_b = min(len(in_b), room - keep_a)
            cut_a = in_a[keep_a] if keep_a < len(in_a) else len(a)
            cut_b = in_b[keep_b] if keep_b < len(in_b) else len(b)
            if (cut_a, cut_b) == (len(a), len(b)):
                # No text token to drop (a template token swallowed a text's start): halve the longer text.
                cut_a, cut_b = (len(a) // 2, len(b)) if len(a) >= len(b) else (len(a), len(b) // 2)
            a, b = a[:cut_a], b[:cut_b]

    def _tokenize(self, text: str, a_start: int, a_len: int, mid_len: int, b_len: int):
        """(ids, (starts of the tokens that begin in the original, ... in the rewritten)), relative to each."""
        b_start = a_start + a_len + mid_len
        if not getattr(self.tokenizer, "is_fast", False):
            # Python-backend tokenizers give no offsets: token starts are spread evenly over each text, which
            # only makes the cut less exact (the loop in ``fit`` still ends within the limit).
            ids = self._encode(text)
            n_a, n_b = (len(self._encode(t)) for t in (text[a_start:a_start + a_len], text[b_start:b_start + b_len]))
            return ids, ([k * a_len // n_a for k in range(n_a)], [k * b_len // n_b for k in range(n_b)])
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        starts = [start for start, _end in enc["offset_mapping"]]
        in_a = [s - a_start for s in starts if a_start <= s < a_start + a_len]
        in_b = [s - b_start for s in starts if b_start <= s < b_start + b_len]
        return list(enc["input_ids"]), (in_a, in_b)

    def build(self, original: str, rewritten: str) -> list[int]:
        return self.fit(original, rewritten)[2]

    def target(self, prompt: str) -> list[int]:
        """Token ids of a gold prompt as the answer to ``build`` (training labels), without EOS.

        Tokenized after the template's tail, as it follows the prompt in one text: alone, a Metaspace
        tokenizer would give it a leading "▁" of its own. If the tail's last tokens merge with the answer
        (no tokenizer seen so far does), the answer is tokenized alone: labels cannot split a token.
        """
        answer = self.answer_sep + prompt.strip()
        base = self._encode(self.tail)
        both = self._encode(self.tail + answer)
        if both[: len(base)] == base:
            return both[len(base):]
        return self._encode(answer)


def eos_token_ids(tokenizer, model) -> set[int]:
    """Ids that end an answer: the tokenizer's EOS and every EOS the model's generation config lists (an
    instruct model's end-of-turn token is often only there)."""
    eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    return eos | set(gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else [])


def newline_token_ids(tokenizer) -> set[int]:
    """Ids of every token whose text holds a line break: the answer is one line, generation stops there.

    Decided by decoding each id, not by the spelling of its vocabulary entry: byte-level vocabularies
    spell "\\n" as "Ċ", which sentencepiece vocabularies (Gemma's) also hold as the Maltese letter Ċ, and
    byte-fallback vocabularies spell it "<0x0A>". All ids are decoded in one batch (Rust, ~0.6 s for
    Gemma's 262k on 2 cores); a tokenizer without a batch decoder is decoded id by id.
    """
    n = len(tokenizer)
    singles = [[i] for i in range(n)]
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        texts = backend.decode_batch(singles, skip_special_tokens=False)
    else:
        texts = [tokenizer.decode(s, skip_special_tokens=False) for s in singles]
    # "\r" too: postprocess.clean ends the answer at either.
    return {i for i, text in enumerate(texts) if "\n" in text or "\r" in text}
