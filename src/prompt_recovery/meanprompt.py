"""Search for the "mean prompt": one string with the highest expected score against likely gold prompts.

Used as predict's fallback, and as a suffix appended to model predictions. The search is a beam search
of word-level moves (insert, delete, replace from a vocabulary built from the prompts plus a shipped
list); every round's candidates are embedded in one batch. Candidates longer than the embedder reads
(its ``max_seq_length``, measured with its own tokenizer) are never kept: their tail would be cut off
silently by the scorer. The best start is always among the beams, so the result never scores below it.
"""

from __future__ import annotations

import json
import random
import re
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib.resources import files

import numpy as np
from tqdm.auto import tqdm

from .data import InputError
from .postprocess import SAFE_TOTAL_WORDS, fit_with_suffix, normalise

BASELINE = "Improve the text to this."
PUBLIC_MEAN_PROMPT = (
    "Please improve this text using the writing style with maintaining the original meaning but altering the tone."
)
_WORD = re.compile(r"[A-Za-z][A-Za-z'\-]*[.,]?")


class MeanObjective:
    """Mean sharpened cosine of one candidate string against every gold prompt."""

    def __init__(self, embedder, gold: Sequence[str]) -> None:
        self.embedder = embedder
        self.gold = embedder.embed(list(gold))

    def __call__(self, candidates: Sequence[str]) -> np.ndarray:
        ok = np.array(_fits(self.embedder, candidates))
        emb = self.embedder.embed(list(candidates))
        scores = np.mean(np.clip(emb @ self.gold.T, -1, 1) ** 3, axis=1)
        return np.where(ok, scores, -np.inf)


class SuffixObjective:
    """Mean sharpened cosine of each prediction plus one candidate suffix against its own gold prompt."""

    def __init__(self, embedder, predictions: Sequence[str], gold: Sequence[str]) -> None:
        self.embedder = embedder
        self.predictions = list(predictions)
        self.gold = embedder.embed(list(gold))

    def __call__(self, suffixes: Sequence[str]) -> np.ndarray:
        texts = [join_suffix(p, s, self.embedder) for s in suffixes for p in self.predictions]
        emb = self.embedder.embed(texts).reshape(len(suffixes), len(self.predictions), -1)
        cos = np.clip(np.einsum("snd,nd->sn", emb, self.gold), -1, 1)
        ok = np.array(_fits(self.embedder, list(suffixes)))
        return np.where(ok, np.mean(cos**3, axis=1), -np.inf)


def _fits(embedder, texts: Sequence[str]) -> list[bool]:
    fits = getattr(embedder, "fits", None)
    return fits(texts) if fits is not None else [True] * len(texts)


def join_suffix(prediction: str, suffix: str, embedder=None, max_words: int = SAFE_TOTAL_WORDS) -> str:
    """prediction + suffix, the prediction trimmed (never the suffix) so the embedder reads it all."""
    count = getattr(embedder, "token_count", None)
    limit = getattr(embedder, "max_seq_length", None)
    return fit_with_suffix(prediction, suffix, count, limit, max_words)


def shipped_vocabulary() -> list[str]:
    text = files("prompt_recovery").joinpath("assets", "vocab.txt").read_text(encoding="utf-8")
    return [w for w in text.split() if w]


def build_vocabulary(prompts: Sequence[str], limit: int = 600) -> list[str]:
    """Most frequent words of the prompts, then the shipped list; deterministic order."""
    counts = Counter(w for p in prompts for w in _WORD.findall(p))
    words = [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))][:limit]
    seen = set(words)
    words += [w for w in shipped_vocabulary() if w not in seen]
    return words


@dataclass
class SearchResult:
    best: str
    score: float
    start: str
    start_score: float
    rounds: int
    evaluated: int
    seconds: float
    history: list[float] = field(default_factory=list)

    @property
    def candidates_per_s(self) -> float:
        return self.evaluated / self.seconds if self.seconds > 0 else 0.0


def _mutate(words: list[str], vocab: Sequence[str], rng: random.Random, max_words: int) -> list[str]:
    move = rng.random()
    out = list(words)
    if (move < 0.4 or not out) and len(out) < max_words:
        out.insert(rng.randint(0, len(out)), rng.choice(vocab))
    elif move < 0.65 and len(out) > 1:
        del out[rng.randrange(len(out))]
    elif out:
        out[rng.randrange(len(out))] = rng.choice(vocab)
    return out


def search(
    objective: Callable[[Sequence[str]], np.ndarray],
    starts: Sequence[str],
    vocab: Sequence[str],
    *,
    seed: int = 0,
    rounds: int = 50,
    beam_width: int = 4,
    per_round: int = 128,
    max_words: int = 40,
    time_limit: float = 300.0,
    patience: int = 10,
    allow_empty: bool = False,
    clock: Callable[[], float] = time.monotonic,
    progress: bool = False,
) -> SearchResult:
    """Beam search over word edits; deterministic for a seed (given a deterministic objective)."""
    t0 = clock()
    rng = random.Random(seed)
    cache: dict[str, float] = {}

    def evaluate(cands: list[str]) -> None:
        new = [c for c in dict.fromkeys(cands) if c not in cache]
        if new:
            for c, s in zip(new, objective(new)):
                cache[c] = float(s)

    starts = [normalise(s) for s in starts if allow_empty or normalise(s)]
    if not starts:
        raise ValueError("no start candidates")
    evaluate(starts)
    ranked = sorted(dict.fromkeys(starts), key=lambda c: (-cache[c], c))
    start, start_score = ranked[0], cache[ranked[0]]
    beams = ranked[:beam_width]
    history = [start_score]
    stale = 0
    done_rounds = 0
    bar = tqdm(total=rounds, disable=not progress, desc="optimize", unit="round")
    try:
        for _ in range(rounds):
            if clock() - t0 >= time_limit:
                break
            cands = []
            for _ in range(per_round):
                words = _mutate(beams[rng.randrange(len(beams))].split(), vocab, rng, max_words)
                if words or allow_empty:
                    cands.append(" ".join(words))
            evaluate(cands)
            pool = dict.fromkeys(beams + cands)
            beams = sorted(pool, key=lambda c: (-cache[c], c))[:beam_width]
            done_rounds += 1
            improved = cache[beams[0]] > history[-1] + 1e-9
            history.append(cache[beams[0]])
            stale = 0 if improved else stale + 1
            bar.update(1)
            bar.set_postfix(score=f"{history[-1]:.4f}", refresh=False)
            if stale >= patience:
                break
    finally:
        bar.close()
    return SearchResult(beams[0], cache[beams[0]], start, start_score, done_rounds, len(cache), clock() - t0,
                        history)


def optimize(args, embedder=None) -> dict:
    """The optimize-prompt entry: search, write ``args.output``, return a report."""
    from .score import Embedder, read_prompts, score_pairs

    embedder = embedder or Embedder(args.embedder)
    ids, gold = read_prompts(args.prompts_csv, args.column)
    gold = [g for g in gold if g.strip()]
    if not gold:
        raise InputError(f"{args.prompts_csv} has no non-empty '{args.column}' values to optimise against")
    vocab = build_vocabulary(gold)
    common = dict(seed=args.seed, rounds=args.rounds, beam_width=args.beam_width,
                  per_round=args.candidates_per_round, max_words=args.max_words, time_limit=args.time_limit,
                  patience=args.patience, progress=args.progress)
    report: dict = {"label": embedder.label, "gold_prompts": len(gold)}
    if args.predictions is None:
        objective = MeanObjective(embedder, gold)
        # Each distinct gold prompt is a start too: the best single training prompt is the bar to beat.
        starts = [BASELINE, PUBLIC_MEAN_PROMPT, *dict.fromkeys(gold)]
        result = search(objective, starts, vocab, **common)
        report["baseline"] = {"text": BASELINE, "score": float(objective([BASELINE])[0])}
        report["mode"] = "mean_prompt"
    else:
        pred_ids, preds = read_prompts(args.predictions)
        by_id = dict(zip(pred_ids, preds))
        pairs = [(by_id[i], g) for i, g in zip(ids, gold) if i in by_id and by_id[i].strip()]
        if not pairs:
            raise InputError(f"no ids of {args.predictions} match {args.prompts_csv}")
        objective = SuffixObjective(embedder, [p for p, _ in pairs], [g for _, g in pairs])
        starts = ["", BASELINE, PUBLIC_MEAN_PROMPT]
        result = search(objective, starts, vocab, allow_empty=True, **common)
        report["baseline"] = {"text": "(no suffix)", "score": float(objective([""])[0])}
        report["predictions_alone"] = float(score_pairs(embedder, [p for p, _ in pairs], [g for _, g in pairs]).mean())
        report["mode"] = "suffix"
        report["rows"] = len(pairs)
    report.update({
        "start": result.start, "start_score": result.start_score, "best": result.best, "score": result.score,
        "rounds": result.rounds, "evaluated": result.evaluated, "seconds": result.seconds,
        "candidates_per_s": result.candidates_per_s, "history": result.history,
    })
    with open(args.output, "w", encoding="utf-8") as f:
        f.write(result.best + "\n")
    if args.report:
        with open(args.report, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
    return report
