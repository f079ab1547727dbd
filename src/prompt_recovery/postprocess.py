"""Turn generated text into one clean instruction, or say it is unusable so the row falls back.

Generation is greedy and short, but small models still echo template labels, open with chatter
("Sure, here is..."), wrap the answer in quotes, or run on after it. What survives is one line of
plain text, whitespace collapsed, capped in words (the scorer reads only its first 128 tokens).
"""

from __future__ import annotations

import re
from importlib.resources import files


def shipped_text(name: str) -> str:
    """A text file shipped in the package's assets, stripped; empty if the package ships none."""
    path = files("prompt_recovery").joinpath("assets", name)
    return path.read_text(encoding="utf-8").strip() if path.is_file() else ""


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




# Words of prediction + suffix kept when the embedder's tokenizer is not at hand: sentence-t5-base reads
# 128 tokens and English runs about 1.3 of its tokens a word, so 80 words stay inside with room to spare.
SAFE_TOTAL_WORDS = 80


def fit_with_suffix(prediction: str, suffix: str, count=None, limit: int | None = None,
                    max_words: int = SAFE_TOTAL_WORDS) -> str:
    """prediction + " " + suffix, the prediction's tail trimmed (never the suffix) to fit the scorer.

    ``count`` maps texts to the embedder's token counts and ``limit`` is its max_seq_length; without them
    the total is capped at ``max_words`` words.
    """
    suffix = normalise(suffix)
    words = prediction.split()

    def joined(k: int) -> str:
        return " ".join(words[:k] + ([suffix] if suffix else []))

    if count is None or limit is None:
        keep = max(1, max_words - len(suffix.split()))
        return joined(min(len(words), keep))
    if count([joined(len(words))])[0] <= limit:
        return joined(len(words))
    lo, hi = 0, len(words)  # the largest k whose text fits: k=lo always fits or is 0
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if count([joined(mid)])[0] <= limit:
            lo = mid
        else:
            hi = mid - 1
    # Keep one word even when the suffix alone fills the window: the model's guess leads the text.
    return joined(max(lo, 1))
