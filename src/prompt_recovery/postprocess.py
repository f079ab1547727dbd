"""Turn generated text into one clean instruction, or say it is unusable so the row falls back.

Generation is greedy and short, but small models still echo template labels, open with chatter
("Sure, here is..."), wrap the answer in quotes, or run on after it. What survives is one line of
plain text, whitespace collapsed, capped in words (the scorer reads only its first 128 tokens).
"""

from __future__ import annotations

import re

# Shown when the two texts are the same: the rewrite evidently asked for no change.
UNCHANGED_PROMPT = "Rewrite this text exactly as it is, keeping every word the same."

_LABEL = re.compile(
    r"^\s*(?:(?:the\s+)?(?:rewrite\s+)?(?:instruction|prompt|answer|response|output)s?(?:\s+used)?|"
    r"rewrite prompt|original text|rewritten text)\s*[:\-]\s*",
    re.IGNORECASE,
)
_PREAMBLE = re.compile(
    r"^\s*(?:sure|okay|ok|certainly|of course|absolutely|here(?:'s| is| are)|the instruction (?:was|is))"
    r"\b[^:\n]{0,80}?(?::|\.|!|,)\s+",
    re.IGNORECASE,
)
_QUOTES = "\"'`“”‘’«»*"
_TRAILING_CHATTER = re.compile(
    r"\s+(?:I hope|Let me know|Note:|This instruction|Explanation:|Original text:|Rewritten text:).*$", re.IGNORECASE
)
_WS = re.compile(r"\s+")


def normalise(text: str) -> str:
    return _WS.sub(" ", text).strip()


def unchanged(original: str, rewritten: str) -> bool:
    """The rewrite left the text as it was (after normalising whitespace)."""
    return normalise(original) == normalise(rewritten) and bool(normalise(original))


def cap_words(text: str, max_words: int) -> str:
    words = text.split()
    if len(words) <= max_words:
        return text
    cut = " ".join(words[:max_words])
    # End at the last sentence end inside the cap when there is one: a whole clause embeds better.
    stop = max(cut.rfind(". "), cut.rfind("? "), cut.rfind("! "))
    return cut[: stop + 1] if stop > len(cut) // 2 else cut


def clean(generated: str, answer_prefix: str = "", max_words: int = 60) -> str | None:
    """The prediction for one row: answer prefix + cleaned generation, or None if unusable."""
    text = generated.replace("\r", "\n").lstrip()
    text = text.split("\n", 1)[0] if text else ""
    for _ in range(3):  # labels and preambles can stack ("Sure! Instruction: ...")
        before = text
        text = _PREAMBLE.sub("", _LABEL.sub("", text))
        text = text.strip().strip(_QUOTES).strip()
        if text == before:
            break
    text = _TRAILING_CHATTER.sub("", text)
    prefix = normalise(answer_prefix)
    text = normalise(f"{prefix} {text}" if prefix else text)
    text = text.strip(_QUOTES + " ").rstrip(":;,- ")  # a dangling colon announces text that never came
    text = cap_words(text, max_words)
    if not _usable(text, prefix):
        return None
    return text


def _usable(text: str, prefix: str) -> bool:
    letters = sum(ch.isalpha() for ch in text)
    if letters < 4 or len(text.split()) < 2:
        return False
    if prefix and normalise(text) == prefix:
        return False  # the model added nothing to the fixed prefix
    # Mostly symbols or digits: the model produced noise, not an instruction.
    return letters >= 0.5 * len(text.replace(" ", ""))


def with_suffix(prediction: str, suffix: str) -> str:
    suffix = normalise(suffix)
    return f"{prediction} {suffix}" if suffix else prediction
