"""Search for the "mean prompt": one string with the highest expected score against likely gold prompts.

Used as predict's fallback, and as a suffix appended to model predictions. The search is a beam search
of word-level moves (insert, delete, replace from a vocabulary built from the training prompts plus a
shipped list); every round's candidates are embedded in one batch per embedder. Several embedders can
score at once, the objective being the mean (or the lowest) of their scores, so that no single
embedder's quirk wins. Gold prompts held out of the search (``--holdout`` or ``--val``) decide when to
stop and which string is written: the best on them, never worse there than the best start. Candidates
longer than an embedder reads (its ``max_seq_length``, measured with its own tokenizer) are never kept:
their tail would be cut off silently by the scorer. An optional fluency guard keeps word salad out of
the beams.
"""

from __future__ import annotations

import json
import math
import random
import re
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
from tqdm.auto import tqdm

from .data import InputError
from .postprocess import SAFE_TOTAL_WORDS, fit_with_suffix, normalise, shipped_text
from .tokensearch import MixedMoves, TokenMoves, WordMoves

BASELINE = "Improve the text to this."
PUBLIC_MEAN_PROMPT = (
    "Please improve this text using the writing style with maintaining the original meaning but altering the tone."
)
# Plain instructions that say what every rewrite prompt has in common; starts beside the gold prompts, so a
# readable generic sentence is always on offer to the search.
GENERIC_STARTS = (
    "Rewrite this text.",
    "Rewrite this text in a different style.",
    "Rewrite this text in a different tone and style.",
    "Rewrite this text as a different kind of text, in a new tone and style.",
)
_WORD = re.compile(r"[A-Za-z][A-Za-z'\-]*[.,]?")


def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


# Words that carry grammar rather than content (lower case, punctuation stripped).
FUNCTION_WORDS = _words(
    "a an the this that these those it its they them their he she his her we our you your i me my "
    "and or but nor so yet as if than while with without to of for by from in into onto on at about over "
    "under like be is are was were been being do does did have has had will would can could should may "
    "might must not no more most very too also just then there here what which who whom whose"
)
# Joining words: two of them in a row ("as and", "of to") is the word salad a search leaves behind.
_GLUE = _words("and or but nor as with while to of for by from in into onto on at than")


def _bare(word: str) -> str:
    return word.lower().strip(".,;:!?\"'()")


class MeanObjective:
    """Mean sharpened cosine of one candidate string against every gold prompt, under one embedder.

    ``cache`` (text -> embedding) may be shared with another MeanObjective of the same embedder, so that
    scoring a candidate on held-out prompts (or on another fold) costs no second embedding. ``trim`` leaves out,
    for each candidate, the rows of the ``trim`` distinct gold prompts it scores best on: a candidate that copies
    one or two gold prompts (a training prompt as a start scores 1.0 on every row of itself, and a skewed set
    repeats one prompt over many rows) must then win on the others to win at all.
    """

    def __init__(self, embedder, gold: Sequence[str], cache: dict | None = None, trim: int = 0) -> None:
        from .score import CachedEmbed

        self.embedder = embedder
        self._embed = CachedEmbed(embedder.embed, cache)
        self.gold = embedder.embed(list(gold))
        index = {g: k for k, g in enumerate(dict.fromkeys(gold))}
        self.trim = trim if len(index) > trim else 0
        self.groups = np.zeros((len(gold), len(index)))  # row -> its distinct prompt, for the trim
        self.groups[np.arange(len(gold)), [index[g] for g in gold]] = 1.0

    def per_prompt(self, candidates: Sequence[str]) -> np.ndarray:
        """Sharpened cosines with shape (candidates, gold rows)."""
        from .score import sharpened_cosine_matrix

        return sharpened_cosine_matrix(self._embed(list(candidates)), self.gold)

    def __call__(self, candidates: Sequence[str]) -> np.ndarray:
        candidates = list(candidates)
        ok = np.array(_fits(self.embedder, candidates))
        per = self.per_prompt(candidates)
        if not self.trim:
            return np.where(ok, per.mean(axis=1), -np.inf)
        totals = per @ self.groups  # (candidates, distinct prompts): each prompt's summed score over its rows
        counts = np.broadcast_to(self.groups.sum(axis=0), totals.shape)
        keep = np.argsort(-totals, axis=1, kind="stable")[:, self.trim:]
        kept = np.take_along_axis(totals, keep, 1).sum(1) / np.take_along_axis(counts, keep, 1).sum(1)
        return np.where(ok, kept, -np.inf)


class SuffixObjective:
    """Mean sharpened cosine of each prediction plus one candidate suffix against its own gold prompt."""

    def __init__(self, embedder, predictions: Sequence[str], gold: Sequence[str]) -> None:
        self.embedder = embedder
        self.predictions = list(predictions)
        self.gold = embedder.embed(list(gold))

    def per_prompt(self, suffixes: Sequence[str]) -> np.ndarray:
        """Sharpened cosines with shape (suffixes, rows)."""
        from .score import sharpened_cosine

        suffixes = list(suffixes)
        texts = [join_suffix(p, s, self.embedder) for s in suffixes for p in self.predictions]
        emb = self.embedder.embed(texts)
        return sharpened_cosine(emb, np.tile(self.gold, (len(suffixes), 1))).reshape(len(suffixes), -1)

    def __call__(self, suffixes: Sequence[str]) -> np.ndarray:
        suffixes = list(suffixes)
        ok = np.array(_fits(self.embedder, suffixes))
        return np.where(ok, self.per_prompt(suffixes).mean(axis=1), -np.inf)


class Combined:
    """One score from several embedders' objectives: their mean, or (``how="worst"``) the lowest.

    With ``reference`` (a text), each embedder's score is divided by that embedder's score of the reference
    before they are combined: embedders score on different scales (averaged word vectors near 0.4 where MiniLM
    gives 0.08), and the raw mean would follow the largest scale. A ratio above 1 under every embedder is
    what "beats the reference under each scorer" means.
    """

    def __init__(self, parts: Sequence[Callable[[Sequence[str]], np.ndarray]], how: str = "mean",
                 reference: str | None = None) -> None:
        if how not in ("mean", "worst"):
            raise ValueError(f"objective must be mean or worst; got {how!r}")
        self.parts = list(parts)
        self.how = how
        self.scale = np.ones(len(self.parts))
        if reference is not None:
            ref = self.per_embedder([reference])[:, 0]
            # A reference scoring zero or below gives no scale to divide by: that embedder counts raw.
            self.scale = np.where(np.isfinite(ref) & (ref > 1e-6), ref, 1.0)

    def per_embedder(self, candidates: Sequence[str]) -> np.ndarray:
        """Raw scores with shape (embedders, candidates)."""
        return np.stack([part(candidates) for part in self.parts])

    def __call__(self, candidates: Sequence[str]) -> np.ndarray:
        scores = self.per_embedder(candidates) / self.scale[:, None]
        return scores.min(axis=0) if self.how == "worst" else scores.mean(axis=0)


def _fits(embedder, texts: Sequence[str]) -> list[bool]:
    fits = getattr(embedder, "fits", None)
    return fits(texts) if fits is not None else [True] * len(texts)


def join_suffix(prediction: str, suffix: str, embedder=None, max_words: int = SAFE_TOTAL_WORDS) -> str:
    """prediction + suffix, the prediction trimmed (never the suffix) so the embedder reads it all."""
    count = getattr(embedder, "token_count", None)
    limit = getattr(embedder, "max_seq_length", None)
    return fit_with_suffix(prediction, suffix, count, limit, max_words)


def shipped_mean_prompt() -> str:
    """The mean prompt the package ships (predict's fallback): a start of every search, so a new search is never
    worse on its held-out prompts than what is shipped."""
    return shipped_text("mean_prompt.txt")


def shipped_vocabulary() -> list[str]:
    return shipped_text("vocab.txt").split()


def build_vocabulary(prompts: Sequence[str], limit: int = 600) -> list[str]:
    """Most frequent words of the prompts, then the shipped list; deterministic order."""
    counts = Counter(w for p in prompts for w in _WORD.findall(p))
    words = [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))][:limit]
    seen = set(words)
    words += [w for w in shipped_vocabulary() if w not in seen]
    return words


# --- fluency guards: each maps candidates to "readable enough" flags --------------------------------------------

def function_word_guard(max_rate: float = 0.5) -> Callable[[Sequence[str]], list[bool]]:
    """A cheap readability check (a heuristic, not a grammar): at most ``max_rate`` of the words are function
    words, no word twice in a row, no two joining words in a row ("as and"), no ending on one, and a sentence
    that ends inside the text is followed by a capital letter."""

    def ok(text: str) -> bool:
        raw = text.split()
        if any(a[-1] in ".!?" and not b[0].isupper() for a, b in zip(raw, raw[1:])):
            return False
        words = [w for w in (_bare(w) for w in raw) if w]
        if not words:
            return True
        if sum(w in FUNCTION_WORDS for w in words) / len(words) > max_rate:
            return False
        if words[-1] in _GLUE or words[-1] in ("a", "an", "the"):
            return False
        return not any(a == b or (a in _GLUE and b in _GLUE) for a, b in zip(words, words[1:]))

    return lambda texts: [ok(t) for t in texts]


class Perplexity:
    """Per-text perplexity under a causal LM (the loaded base model), each text read as one more item of a
    list of rewrite instructions: without that context a short, plain instruction ("Make this shorter.") is
    as surprising to a small LM as word salad, and the ceiling could not tell them apart."""

    CONTEXT = "Instructions for rewriting a text:\n- Rewrite this as a poem.\n- "

    def __init__(self, model, tokenizer, batch_size: int = 32, context: str = CONTEXT) -> None:
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.context = tokenizer(context, add_special_tokens=True)["input_ids"]

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        import torch

        out: list[float] = []
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        n_ctx = len(self.context)
        for k in range(0, len(texts), self.batch_size):
            ids = [self.context + self.tokenizer(t, add_special_tokens=False)["input_ids"]
                   for t in texts[k:k + self.batch_size]]
            width = max(map(len, ids))
            # Right padding: every text's positions are those it would have alone.
            x = torch.tensor([i + [pad] * (width - len(i)) for i in ids])
            mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i in ids])
            with torch.no_grad():
                logits = self.model(input_ids=x, attention_mask=mask).logits
            logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
            nll = -logp.gather(-1, x[:, 1:].unsqueeze(-1)).squeeze(-1)
            scored = mask[:, 1:].float()
            scored[:, : n_ctx - 1] = 0  # only the text's own tokens count, not the context's
            mean = (nll * scored).sum(1) / scored.sum(1).clamp(min=1)
            out += torch.exp(mean).tolist()
        return np.array(out)


def perplexity_guard(perplexity: Callable[[Sequence[str]], np.ndarray], ceiling: float):
    return lambda texts: [bool(p <= ceiling) for p in perplexity(list(texts))] if len(texts) else []


# --- the search ---------------------------------------------------------------------------------------------------

@dataclass
class SearchConfig:
    """How one beam search runs (everything but what it scores)."""

    seed: int = 0
    """Random seed: the same seed and inputs give the same result (given deterministic objectives)."""
    rounds: int = 50
    """Most rounds of moves."""
    beam_width: int = 4
    """Candidates kept after each round."""
    per_round: int = 128
    """Moved candidates proposed and scored in each round's batch."""
    max_words: int = 40
    """Most words in a candidate made by word moves."""
    time_limit: float = 300.0
    """Seconds the search may take; it stops before the round that would start past them."""
    patience: int = 10
    """Stop after this many rounds without a gain (on the held-out prompts where there are some)."""
    allow_empty: bool = False
    """The empty string is a candidate (a suffix may be nothing; a prompt may not)."""
    progress: bool = False
    """Show a progress bar."""

    def __post_init__(self) -> None:
        for name in ("rounds", "beam_width", "per_round", "max_words", "patience"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1; got {getattr(self, name)}")
        if not self.time_limit > 0:
            raise ValueError(f"time_limit must be positive; got {self.time_limit}")


@dataclass
class Problem:
    """What a search scores: the objective it climbs, where it starts, and what may judge and stop it."""

    objective: Callable[[Sequence[str]], np.ndarray]
    """Scores on the training prompts; the beams follow it."""
    starts: Sequence[str]
    """Start candidates (normalised; duplicates and, unless allowed, empty ones dropped)."""
    holdout: Callable[[Sequence[str]], np.ndarray] | None = None
    """Scores on held-out prompts: they pick the result and count patience. None: training score does both."""
    accept: Callable[[Sequence[str]], list[bool]] | None = None
    """A fluency guard a candidate must pass before it enters the beams (the starts are exempt)."""


@dataclass
class Move:
    """A change of the search's leading candidate."""

    round: int
    move: str
    text: str
    train: float
    heldout: float | None = None


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
    heldout: float | None = None
    start_heldout: float | None = None
    heldout_history: list[float] = field(default_factory=list)
    moves: list[Move] = field(default_factory=list)
    stopped: str = "rounds"
    rejected: int = 0

    @property
    def candidates_per_s(self) -> float:
        return self.evaluated / self.seconds if self.seconds > 0 else 0.0


class _Ledger:
    """Every score, guard verdict and origin a search has seen: each candidate is scored and guarded once."""

    def __init__(self, problem: Problem, beam_width: int) -> None:
        self.problem, self.beam_width = problem, beam_width
        self.train: dict[str, float] = {}
        self.held: dict[str, float] = {}
        self.passed: dict[str, bool] = {}
        self.origin: dict[str, str] = {}

    def score(self, cands: Sequence[str]) -> None:
        new = [c for c in dict.fromkeys(cands) if c not in self.train]
        if new:
            self.train.update(zip(new, map(float, self.problem.objective(new))))

    def score_held(self, cands: Sequence[str]) -> None:
        new = [c for c in dict.fromkeys(cands) if c not in self.held]
        if new and self.problem.holdout is not None:
            self.held.update(zip(new, map(float, self.problem.holdout(new))))

    def guard(self, cands: Sequence[str]) -> None:
        new = [c for c in cands if c not in self.passed]
        if new:
            accept = self.problem.accept
            self.passed.update(zip(new, accept(new) if accept is not None else [True] * len(new)))

    def measure(self, c: str) -> tuple:
        """What picks the result: held-out score where there is a held-out set, then training score, then text."""
        return (self.held[c] if self.problem.holdout is not None else self.train[c], self.train[c], c)

    def pick_beams(self, pool: Sequence[str]) -> list[str]:
        ranked = sorted(pool, key=lambda c: (-self.train[c], c))
        ranked = [c for c in ranked if math.isfinite(self.train[c])] or ranked[:1]
        beams: list[str] = []
        i = 0
        while len(beams) < self.beam_width and i < len(ranked):
            chunk = ranked[i:i + 2 * self.beam_width]  # guard the likeliest first: an LM guard is the costly part
            self.guard(chunk)
            beams += [c for c in chunk if self.passed[c]][: self.beam_width - len(beams)]
            i += len(chunk)
        return beams or ranked[:1]


def _score_starts(ledger: _Ledger, allow_empty: bool) -> list[str]:
    starts = list(dict.fromkeys(normalise(s) for s in ledger.problem.starts if allow_empty or normalise(s)))
    if not starts:
        raise ValueError("no start candidates")
    ledger.score(starts)
    ledger.score_held(starts)
    ledger.passed.update(dict.fromkeys(starts, True))
    ledger.origin.update(dict.fromkeys(starts, "start"))
    return starts


@dataclass
class _Trace:
    """The search's state between rounds: beams, the result so far and what the report shows of the way."""

    ledger: _Ledger
    start: str
    beams: list[str]
    best: str
    history: list[float]
    heldout_history: list[float]
    moves: list[Move]
    stale: int = 0
    rounds: int = 0

    @classmethod
    def begin(cls, ledger: _Ledger, starts: list[str]) -> _Trace:
        start = max(starts, key=ledger.measure)
        beams = ledger.pick_beams(starts)
        held = [ledger.held[start]] if ledger.problem.holdout is not None else []
        first = Move(0, "start", beams[0], ledger.train[beams[0]], ledger.held.get(beams[0]))
        return cls(ledger, start, beams, start, [ledger.train[beams[0]]], held, [first])

    def advance(self, r: int, cands: list[str], on_move: Callable[[Move], None] | None) -> None:
        """Score a round's candidates, keep the best as beams, record a new leader, update the result."""
        book = self.ledger
        book.score(cands)
        leader = self.beams[0]
        self.beams = book.pick_beams(list(dict.fromkeys(self.beams + cands)))
        if leader in self.beams and book.train[self.beams[0]] <= book.train[leader] + 1e-12:
            # A tie is no move: the incumbent stays first (name order would swap in a longer equal string).
            self.beams.remove(leader)
            self.beams.insert(0, leader)
        self.rounds = r
        book.score_held(self.beams)
        if self.beams[0] != leader:
            lead = self.beams[0]
            self.moves.append(Move(r, book.origin[lead], lead, book.train[lead], book.held.get(lead)))
            if on_move is not None:
                on_move(self.moves[-1])
        challenger = max(self.beams, key=book.measure)
        improved = book.measure(challenger)[0] > book.measure(self.best)[0] + 1e-9
        self.best = challenger if improved else self.best
        self.history.append(book.train[self.beams[0]])
        if book.problem.holdout is not None:
            self.heldout_history.append(book.held[self.best])
        self.stale = 0 if improved else self.stale + 1

    def result(self, stopped: str, seconds: float) -> SearchResult:
        book = self.ledger
        return SearchResult(
            best=self.best, score=book.train[self.best], start=self.start, start_score=book.train[self.start],
            rounds=self.rounds, evaluated=len(book.train), seconds=seconds, history=self.history,
            heldout=book.held.get(self.best), start_heldout=book.held.get(self.start),
            heldout_history=self.heldout_history, moves=self.moves, stopped=stopped,
            rejected=sum(not v for v in book.passed.values()),
        )


def _propose(trace: _Trace, moves, config: SearchConfig, rng: random.Random) -> list[str]:
    """One round's moved candidates (empty ones only where allowed), each remembered with how it was made."""
    cands = []
    for cand, how in moves.propose(trace.beams, config.per_round, rng):
        if cand or config.allow_empty:
            trace.ledger.origin.setdefault(cand, how)
            cands.append(cand)
    return cands


def search(problem: Problem, moves, config: SearchConfig | None = None, *,
           clock: Callable[[], float] = time.monotonic, on_move: Callable[[Move], None] | None = None) -> SearchResult:
    """Beam search over ``moves`` (a move source, or a word list for word edits); deterministic for a seed.

    The beams follow the training objective. With ``problem.holdout``, every round's beams are also scored on
    the held-out prompts, patience counts rounds without a held-out gain, and the result is the best string
    there among the starts and the beams: never worse there than the best start. Without it, training score
    plays both parts.
    """
    config = config or SearchConfig()
    moves = moves if hasattr(moves, "propose") else WordMoves(moves, config.max_words)
    t0, rng = clock(), random.Random(config.seed)
    ledger = _Ledger(problem, config.beam_width)
    trace = _Trace.begin(ledger, _score_starts(ledger, config.allow_empty))
    stopped = "rounds"
    with tqdm(total=config.rounds, disable=not config.progress, desc="optimize", unit="round") as bar:
        for r in range(1, config.rounds + 1):
            if clock() - t0 >= config.time_limit:
                stopped = "time limit"
                break
            trace.advance(r, _propose(trace, moves, config, rng), on_move)
            bar.update(1)
            bar.set_postfix(train=f"{trace.history[-1]:.4f}", refresh=False)
            if trace.stale >= config.patience:
                stopped = "held-out patience" if problem.holdout is not None else "patience"
                break
    return trace.result(stopped, clock() - t0)


# --- the optimize-prompt entry -----------------------------------------------------------------------------------

def split_holdout(prompts: Sequence[str], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, held-out) row indices; rows with the same prompt text stay on one side, so no held-out prompt
    is also a training prompt."""
    distinct = sorted(set(prompts))
    random.Random(seed).shuffle(distinct)
    n_held = max(1, round(fraction * len(distinct)))
    if n_held >= len(distinct):
        raise InputError(f"--holdout {fraction} leaves no training prompts ({len(distinct)} distinct prompts)")
    held = set(distinct[:n_held])
    return [i for i, p in enumerate(prompts) if p not in held], [i for i, p in enumerate(prompts) if p in held]


def _read_gold(paths: Sequence[str], column: str) -> tuple[list[str], list[str]]:
    from .score import read_prompts

    ids: list[str] = []
    gold: list[str] = []
    for path in paths:
        i, g = read_prompts(path, column)
        keep = [(a, b.strip()) for a, b in zip(i, g) if b.strip()]
        ids += [a for a, _ in keep]
        gold += [b for _, b in keep]
    return ids, gold


def _fluency_guard(args, train_gold: Sequence[str], report: dict):
    """The guards ``--fluency`` names, as one: a candidate must pass all of them."""
    guards = []
    report["fluency"] = {"guards": list(args.fluency)}
    if "function-words" in args.fluency:
        report["fluency"]["max_function_rate"] = args.max_function_rate
        guards.append(function_word_guard(args.max_function_rate))
    if "perplexity" in args.fluency:
        from .config import ModelArgs
        from .model import load

        loaded = load(ModelArgs(adapter="none"))
        ppl = Perplexity(loaded.model, loaded.tokenizer)
        ceiling = args.max_perplexity
        if ceiling is None:
            # As fluent as the most fluent quarter of real training prompts (the rest let short word salad through,
            # measured): a ceiling in the model's own units, not a guess.
            ceiling = float(np.percentile(ppl(list(dict.fromkeys(train_gold))), 25))
        report["fluency"].update(model=loaded.identity.get("name"), max_perplexity=ceiling)
        guards.append(perplexity_guard(ppl, ceiling))
    if not guards:
        return None

    def accept(texts: Sequence[str]) -> list[bool]:
        ok = [True] * len(texts)
        for guard in guards:  # the cheap guard first; the LM only reads what it passed
            todo = [k for k, v in enumerate(ok) if v]
            for k, v in zip(todo, guard([texts[k] for k in todo]) if todo else []):
                ok[k] = v
        return ok

    return accept


def _scores(combined: Combined | None, text: str) -> dict | None:
    if combined is None:
        return None
    per = combined.per_embedder([text])[:, 0]
    return {"combined": float(combined([text])[0]), "per_embedder": [float(x) for x in per]}


def _read_lines(path: str | None) -> list[str]:
    if not path:
        return []
    try:
        with open(path, encoding="utf-8") as f:
            return [line.strip() for line in f if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read start file {path}: {exc}") from None


@dataclass
class Task:
    """What optimize-prompt searches for, as read from its files: a mean prompt, or a suffix of predictions."""

    mode: str
    """mean_prompt or suffix."""
    rows: list[tuple[str, str | None, str]]
    """(id, prediction or None, gold prompt) of every row the search and its cross-validation may use."""
    val_rows: list[tuple[str, str | None, str]]
    """--val rows: the held-out set of every run (empty: --holdout splits the rows instead)."""
    baseline: str
    """What is written when no search result clearly beats it: "Improve the text to this." or no suffix."""
    starts: list[str]
    """Start candidates besides the training prompts (a mean-prompt search also starts from those)."""
    reference: list[str]
    """Strings the report scores beside the result."""


def _mean_task(args, gold: list[str], starts_given: list[str]) -> Task:
    val = [(i, None, g) for i, g in zip(*_read_gold([args.val], args.column))] if args.val else []
    starts = [BASELINE, PUBLIC_MEAN_PROMPT, shipped_mean_prompt(), *GENERIC_STARTS, *starts_given]
    return Task("mean_prompt", [(str(k), None, g) for k, g in enumerate(gold)], val, BASELINE, starts,
                [BASELINE, PUBLIC_MEAN_PROMPT])


def _suffix_task(args, ids: list[str], gold: list[str], starts_given: list[str]) -> Task:
    from .score import read_prompts

    by_id = dict(zip(*read_prompts(args.predictions)))
    rows = [(i, by_id[i], g) for i, g in zip(ids, gold) if i in by_id and by_id[i].strip()]
    if not rows:
        raise InputError(f"no ids of {args.predictions} match {args.prompts_csv}")
    val: list = []
    if args.val:
        val_ids, val_gold = _read_gold([args.val], args.column)
        val = [(i, by_id[i], g) for i, g in zip(val_ids, val_gold) if i in by_id and by_id[i].strip()]
        if not val:
            raise InputError(f"no ids of {args.val} have a prediction in {args.predictions}")
        rows = [r for r in rows if r[0] not in set(val_ids)]
        if not rows:
            raise InputError(f"every row of {args.prompts_csv} with a prediction is held out")
    starts = ["", BASELINE, PUBLIC_MEAN_PROMPT, shipped_mean_prompt(), *GENERIC_STARTS, *starts_given]
    return Task("suffix", rows, val, "", starts, [""])


def read_task(args) -> Task:
    """The rows, starts and baseline of an optimize-prompt run; bad input is an InputError."""
    ids, gold = _read_gold([args.prompts_csv, *args.extra_prompts], args.column)
    if not gold:
        raise InputError(f"{args.prompts_csv} has no non-empty '{args.column}' values to optimise against")
    if args.vocabulary != "words" and args.predictions is not None:
        raise InputError("--vocabulary embedder searches a mean prompt; it cannot search a suffix (--predictions)")
    starts_given = [*args.start, *_read_lines(args.start_file)]
    if args.predictions is None:
        return _mean_task(args, gold, starts_given)
    return _suffix_task(args, ids, gold, starts_given)


@dataclass
class Searcher:
    """One run of the search procedure on any subset of the rows: the final run and every fold's run alike."""

    task: Task
    embedders: list
    args: object
    """The OptimizeArgs."""
    accept: Callable[[Sequence[str]], list[bool]] | None = None
    caches: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.caches = self.caches or [{} for _ in self.embedders]

    def objective(self, rows: Sequence[tuple], trim: int = 0) -> Combined:
        args, ref = self.args, (BASELINE if self.task.mode == "mean_prompt" else "")
        if self.task.mode == "mean_prompt":
            parts = [MeanObjective(e, [g for _, _, g in rows], c, trim) for e, c in zip(self.embedders, self.caches)]
        else:
            parts = [SuffixObjective(e, [p for _, p, _ in rows], [g for _, _, g in rows]) for e in self.embedders]
        return Combined(parts, args.objective, ref if args.relative else None)

    def split(self, rows: Sequence[tuple]) -> tuple[list, list]:
        """(training rows, held-out rows): --val's rows, or --holdout's share of distinct prompts, or none."""
        if self.task.val_rows:
            return list(rows), list(self.task.val_rows)
        if self.args.holdout > 0:
            tr, he = split_holdout([g for _, _, g in rows], self.args.holdout, self.args.seed)
            return [rows[i] for i in tr], [rows[i] for i in he]
        return list(rows), []

    def moves(self, train_gold: Sequence[str]):
        """The move source --vocabulary names; token moves follow the first embedder's gradient."""
        args = self.args
        words = WordMoves(build_vocabulary(train_gold), args.max_words)
        if args.vocabulary == "words":
            return words
        tokens = TokenMoves(self.embedders[0], train_gold, args.top_k, args.max_words)
        return tokens if args.vocabulary == "embedder" else MixedMoves([words, tokens])

    def run(self, rows: Sequence[tuple], config: SearchConfig, on_move=None):
        """(result, training objective, held-out objective or None) of one search on ``rows``."""
        train_rows, held_rows = self.split(rows)
        train_gold = [g for _, _, g in train_rows]
        objective = self.objective(train_rows, self.args.trim)
        holdout = self.objective(held_rows) if held_rows else None
        # Each distinct training prompt is a start too: the best single training prompt is a bar to beat.
        starts = [*self.task.starts, *(dict.fromkeys(train_gold) if self.task.mode == "mean_prompt" else ())]
        problem = Problem(objective, starts, holdout, self.accept)
        return search(problem, self.moves(train_gold), config, on_move=on_move), objective, holdout

    def row_scores(self, rows: Sequence[tuple], text: str) -> np.ndarray:
        """Untrimmed per-row metric of ``text``, shape (embedders, rows)."""
        return np.stack([part.per_prompt([text])[0] for part in self.objective(rows).parts])


# --- choosing the result: cross-validation of the search against the baseline ----------------------------------

@dataclass
class GateConfig:
    """When a search result may replace the baseline: out-of-fold evidence that it clearly wins."""

    folds: int = 5
    """Folds of the distinct prompts; each fold is scored by a search that never saw it. 0: no gate."""
    margin: float = 0.02
    """Least out-of-fold mean gain, as a share of the baseline's score."""
    confidence: float = 0.95
    """The bootstrap lower bound of the gain (resampling prompts) at this confidence must be above 0."""
    drop_top: int = 2
    """The gain must stay above 0 without the prompts that gained most: no win from one or two prompts."""
    seed: int = 0
    """Seed of the fold assignment and of the bootstrap."""
    resamples: int = 2000
    """Bootstrap resamples."""

    def __post_init__(self) -> None:
        if self.folds < 0 or self.folds == 1:
            raise ValueError(f"folds must be 0 (no gate) or at least 2; got {self.folds}")
        if not 0 < self.confidence < 1:
            raise ValueError(f"confidence must be in (0, 1); got {self.confidence}")
        if self.margin < 0 or self.drop_top < 0 or self.resamples < 1:
            raise ValueError("margin and drop_top must be at least 0, resamples at least 1")


@dataclass
class Gate:
    """The verdict of the cross-validation and the figures behind it (gains are shares of the baseline's score)."""

    adopted: bool
    reason: str
    folds: int = 0
    prompts: int = 0
    fold_results: list[str] = field(default_factory=list)
    evidence: list[dict] = field(default_factory=list)
    """Per column (the combined score, or each embedder under --objective worst): gain, lower, without_top."""


def assign_folds(keys: Sequence[str], folds: int, seed: int) -> list[int]:
    """A fold number for each row; rows with the same prompt text share a fold."""
    distinct = sorted(set(keys))
    random.Random(seed).shuffle(distinct)
    fold_of = {p: k % folds for k, p in enumerate(distinct)}
    return [fold_of[k] for k in keys]


def evidence(gains: np.ndarray, keys: Sequence[str], cfg: GateConfig) -> dict:
    """Mean gain per row, its bootstrap lower bound over prompts, and the mean without the ``drop_top`` prompts
    that gained most. Rows of one prompt move together: the prompts, not the rows, are the sample."""
    index = {k: n for n, k in enumerate(dict.fromkeys(keys))}
    group = np.array([index[k] for k in keys])
    total = np.bincount(group, weights=gains, minlength=len(index))
    count = np.bincount(group, minlength=len(index)).astype(float)
    keep = np.argsort(-total, kind="stable")[cfg.drop_top:]
    draws = np.random.default_rng(cfg.seed).integers(0, len(index), size=(cfg.resamples, len(index)))
    means = total[draws].sum(axis=1) / count[draws].sum(axis=1)
    return {"gain": float(total.sum() / count.sum()), "lower": float(np.quantile(means, 1 - cfg.confidence)),
            "without_top": float(total[keep].sum() / max(count[keep].sum(), 1.0))}


def _out_of_fold_gains(searcher: Searcher, config: SearchConfig, folds: list[int], k: int) -> tuple[np.ndarray, list]:
    """(gain over the baseline of each row's fold result, shape (embedders, rows); the fold results)."""
    rows, base = searcher.task.rows, searcher.task.baseline
    gains = np.zeros((len(searcher.embedders), len(rows)))
    results = []
    for f in range(k):
        inside = [r for r, g in zip(rows, folds) if g != f]
        out = [n for n, g in enumerate(folds) if g == f]
        best = searcher.run(inside, config)[0].best
        results.append(best)
        held = [rows[n] for n in out]
        gains[:, out] = searcher.row_scores(held, best) - searcher.row_scores(held, base)
    return gains, results


def cross_validate(searcher: Searcher, config: SearchConfig, cfg: GateConfig) -> Gate:
    """Whether the search procedure clearly beats the baseline on prompts it never saw: each fold is scored by
    the result of a search on the other folds, and the gain must pass all three of evidence()'s bars."""
    keys = [g for _, _, g in searcher.task.rows]
    n = len(set(keys))
    if n < cfg.drop_top + 3:
        return Gate(False, f"{n} distinct prompts are too few to cross-validate (need {cfg.drop_top + 3})",
                    prompts=n)
    k = min(cfg.folds, n)
    folds = assign_folds(keys, k, cfg.seed)
    try:
        gains, results = _out_of_fold_gains(searcher, config, folds, k)
    except InputError as exc:  # a fold too small for --holdout's split: no evidence, so no adoption
        return Gate(False, f"a fold's search cannot run: {exc}", k, n)
    base = searcher.row_scores(searcher.task.rows, searcher.task.baseline).mean(axis=1)
    rel = gains / np.where(base > 1e-6, base, 1.0)[:, None]  # shares of the baseline's score, per embedder
    columns = [rel.mean(axis=0)] if searcher.args.objective == "mean" else list(rel)
    found = [evidence(c, keys, cfg) for c in columns]
    failed = [f"{name} {e[name]:+.4f}" for e in found for name, bar in
              (("gain", cfg.margin), ("lower", 0.0), ("without_top", 0.0)) if not e[name] > bar]
    adopted = not failed
    reason = (f"out-of-fold gain over {searcher.task.baseline!r} passes every bar" if adopted else
              "out-of-fold evidence too weak: " + ", ".join(failed))
    return Gate(adopted, reason, k, n, results, found)


# --- optimize-prompt: one search, its cross-validation, the report ----------------------------------------------

def _search_config(args, share: int) -> SearchConfig:
    """The search settings of args, with 1/share of the time limit (the final run and each fold's run)."""
    return SearchConfig(seed=args.seed, rounds=args.rounds, beam_width=args.beam_width,
                        per_round=args.candidates_per_round, max_words=args.max_words,
                        time_limit=args.time_limit / share, patience=args.patience,
                        allow_empty=args.predictions is not None, progress=args.progress)


def _gate_config(args) -> GateConfig:
    return GateConfig(folds=args.folds, margin=args.margin, confidence=args.confidence, drop_top=args.drop_top,
                      seed=args.seed)


def _score_table(task: Task, result: SearchResult, chosen: str, objective, holdout) -> dict:
    named = [*(("no suffix" if t == "" else t, t) for t in task.reference), ("best start", result.start),
             ("search result", result.best), ("result", chosen)]
    return {name: {"text": text, "train": _scores(objective, text), "heldout": _scores(holdout, text)}
            for name, text in named}


def _result_report(result: SearchResult, chosen: str, objective, holdout) -> dict:
    return {
        "start": result.start, "start_score": result.start_score, "start_heldout": result.start_heldout,
        "best": chosen, "score": float(objective([chosen])[0]),
        "heldout": float(holdout([chosen])[0]) if holdout is not None else None,
        "search_best": result.best, "search_score": result.score, "search_heldout": result.heldout,
        "moves": [asdict(m) for m in result.moves], "stopped": result.stopped, "rounds": result.rounds,
        "evaluated": result.evaluated, "rejected_by_fluency_guard": result.rejected, "seconds": result.seconds,
        "candidates_per_s": result.candidates_per_s, "history": result.history,
        "heldout_history": result.heldout_history,
    }


def _write(args, chosen: str, report: dict) -> None:
    with open(args.output, "w", encoding="utf-8") as f:
        f.write(chosen + "\n")
    if args.report:
        with open(args.report, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)


def optimize(args, embedders=None, on_move: Callable[[Move], None] | None = None) -> dict:
    """The optimize-prompt entry: search, cross-validate the search against the baseline, write the chosen
    string to ``args.output``, return a report."""
    from .score import PACKAGED, Embedder

    task = read_task(args)
    embedders = embedders or [Embedder(p) for p in (args.embedder or [PACKAGED])]
    report: dict = {"embedders": [e.label for e in embedders], "objective": args.objective, "mode": task.mode,
                    "relative_to": (BASELINE if task.mode == "mean_prompt" else "no suffix") if args.relative else None,
                    "vocabulary": args.vocabulary}
    searcher = Searcher(task, embedders, args, _fluency_guard(args, [g for _, _, g in task.rows], report))
    gate_cfg = _gate_config(args)
    runs = 1 + (min(gate_cfg.folds, len({g for _, _, g in task.rows})) if gate_cfg.folds else 0)
    result, objective, holdout = searcher.run(task.rows, _search_config(args, runs), on_move)
    train_rows, held_rows = searcher.split(task.rows)
    unit = "prompts" if task.mode == "mean_prompt" else "rows"
    report.update({f"train_{unit}": len(train_rows), f"heldout_{unit}": len(held_rows)})
    gate = cross_validate(searcher, _search_config(args, runs), gate_cfg) if gate_cfg.folds else None
    chosen = result.best if gate is None or gate.adopted else task.baseline
    report["selection"] = ({"by": "none (--folds 0)", "adopted": True} if gate is None else
                           {"by": f"{gate_cfg.folds}-fold cross-validation", **asdict(gate)})
    report.update(_result_report(result, chosen, objective, holdout))
    report["scores"] = _score_table(task, result, chosen, objective, holdout)
    _write(args, chosen, report)
    return report
