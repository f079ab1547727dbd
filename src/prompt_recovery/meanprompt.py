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
    scoring a candidate on held-out prompts costs no second embedding.
    """

    def __init__(self, embedder, gold: Sequence[str], cache: dict | None = None) -> None:
        from .score import CachedEmbed

        self.embedder = embedder
        self.gold = embedder.embed(list(gold))
        self._embed = CachedEmbed(embedder.embed, cache)

    def __call__(self, candidates: Sequence[str]) -> np.ndarray:
        from .score import sharpened_cosine_matrix

        candidates = list(candidates)
        ok = np.array(_fits(self.embedder, candidates))
        scores = sharpened_cosine_matrix(self._embed(candidates), self.gold).mean(axis=1)
        return np.where(ok, scores, -np.inf)


class SuffixObjective:
    """Mean sharpened cosine of each prediction plus one candidate suffix against its own gold prompt."""

    def __init__(self, embedder, predictions: Sequence[str], gold: Sequence[str]) -> None:
        self.embedder = embedder
        self.predictions = list(predictions)
        self.gold = embedder.embed(list(gold))

    def __call__(self, suffixes: Sequence[str]) -> np.ndarray:
        from .score import sharpened_cosine

        suffixes = list(suffixes)
        texts = [join_suffix(p, s, self.embedder) for s in suffixes for p in self.predictions]
        emb = self.embedder.embed(texts)
        per_row = sharpened_cosine(emb, np.tile(self.gold, (len(suffixes), 1))).reshape(len(suffixes), -1)
        ok = np.array(_fits(self.embedder, suffixes))
        return np.where(ok, per_row.mean(axis=1), -np.inf)


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


def _mutate(words: list[str], vocab: Sequence[str], rng: random.Random, max_words: int) -> tuple[list[str], str]:
    move = rng.random()
    out = list(words)
    if (move < 0.4 or not out) and len(out) < max_words:
        pos, word = rng.randint(0, len(out)), rng.choice(vocab)
        out.insert(pos, word)
        return out, f"insert {word!r} at {pos}"
    if move < 0.65 and len(out) > 1:
        pos = rng.randrange(len(out))
        return out[:pos] + out[pos + 1:], f"delete {out[pos]!r} at {pos}"
    if out:
        pos, word = rng.randrange(len(out)), rng.choice(vocab)
        old, out[pos] = out[pos], word
        return out, f"replace {old!r} with {word!r} at {pos}"
    return out, "none"


def search(
    objective: Callable[[Sequence[str]], np.ndarray],
    starts: Sequence[str],
    vocab: Sequence[str],
    *,
    holdout: Callable[[Sequence[str]], np.ndarray] | None = None,
    accept: Callable[[Sequence[str]], list[bool]] | None = None,
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
    on_move: Callable[[Move], None] | None = None,
) -> SearchResult:
    """Beam search over word edits; deterministic for a seed (given deterministic objectives).

    ``objective`` scores candidates on the training prompts; the beams follow it. With ``holdout`` (scores on
    held-out prompts), every round's beams are also scored there, patience counts rounds without a held-out
    gain, and the result is the best string on the held-out prompts among the starts and the beams: never worse
    there than the best start. Without it, training score plays both parts. ``accept`` (a fluency guard) must
    pass a candidate before it enters the beams; the starts are exempt, being the bar to beat.
    """
    t0 = clock()
    rng = random.Random(seed)
    train: dict[str, float] = {}
    held: dict[str, float] = {}
    passed: dict[str, bool] = {}
    origin: dict[str, str] = {}

    def evaluate(cands: list[str]) -> None:
        new = [c for c in dict.fromkeys(cands) if c not in train]
        if new:
            train.update(zip(new, map(float, objective(new))))

    def evaluate_held(cands: list[str]) -> None:
        new = [c for c in dict.fromkeys(cands) if c not in held]
        if new and holdout is not None:
            held.update(zip(new, map(float, holdout(new))))

    def check(cands: list[str]) -> None:
        new = [c for c in cands if c not in passed]
        if new:
            passed.update(zip(new, accept(new) if accept is not None else [True] * len(new)))

    def pick_beams(pool: list[str]) -> list[str]:
        ranked = sorted(pool, key=lambda c: (-train[c], c))
        ranked = [c for c in ranked if math.isfinite(train[c])] or ranked[:1]
        beams: list[str] = []
        i = 0
        while len(beams) < beam_width and i < len(ranked):
            chunk = ranked[i:i + 2 * beam_width]  # guard the likeliest first: an LM guard is the costly part
            check(chunk)
            beams += [c for c in chunk if passed[c]][: beam_width - len(beams)]
            i += len(chunk)
        return beams or ranked[:1]

    starts = list(dict.fromkeys(normalise(s) for s in starts if allow_empty or normalise(s)))
    if not starts:
        raise ValueError("no start candidates")
    evaluate(starts)
    passed.update(dict.fromkeys(starts, True))
    origin.update(dict.fromkeys(starts, "start"))
    if holdout is not None:
        evaluate_held(starts)
        start = max(starts, key=lambda c: (held[c], train[c], c))
    else:
        start = max(starts, key=lambda c: (train[c], c))

    def measure(c: str) -> float:
        return held[c] if holdout is not None else train[c]

    beams = pick_beams(starts)
    best = start
    history = [train[beams[0]]]
    heldout_history = [held[start]] if holdout is not None else []
    moves = [Move(0, "start", beams[0], train[beams[0]], held.get(beams[0]))]
    stale, done_rounds, stopped = 0, 0, "rounds"
    bar = tqdm(total=rounds, disable=not progress, desc="optimize", unit="round")
    try:
        for r in range(1, rounds + 1):
            if clock() - t0 >= time_limit:
                stopped = "time limit"
                break
            cands = []
            for _ in range(per_round):
                parent = beams[rng.randrange(len(beams))]
                words, how = _mutate(parent.split(), vocab, rng, max_words)
                if words or allow_empty:
                    cand = " ".join(words)
                    origin.setdefault(cand, f"{how} of {parent!r}")
                    cands.append(cand)
            evaluate(cands)
            leader = beams[0]
            beams = pick_beams(list(dict.fromkeys(beams + cands)))
            if leader in beams and train[beams[0]] <= train[leader] + 1e-12:
                # A tie is no move: the incumbent stays first (name order would swap in a longer equal string).
                beams.remove(leader)
                beams.insert(0, leader)
            done_rounds = r
            evaluate_held(beams)
            if beams[0] != leader:
                move = Move(r, origin[beams[0]], beams[0], train[beams[0]], held.get(beams[0]))
                moves.append(move)
                if on_move is not None:
                    on_move(move)
            challenger = max(beams, key=lambda c: (measure(c), train[c], c))
            improved = measure(challenger) > measure(best) + 1e-9
            if improved:
                best = challenger
            history.append(train[beams[0]])
            if holdout is not None:
                heldout_history.append(held[best])
            stale = 0 if improved else stale + 1
            bar.update(1)
            bar.set_postfix(train=f"{history[-1]:.4f}", refresh=False)
            if stale >= patience:
                stopped = "held-out patience" if holdout is not None else "patience"
                break
    finally:
        bar.close()
    return SearchResult(
        best=best, score=train[best], start=start, start_score=train[start], rounds=done_rounds,
        evaluated=len(train), seconds=clock() - t0, history=history, heldout=held.get(best),
        start_heldout=held.get(start), heldout_history=heldout_history, moves=moves, stopped=stopped,
        rejected=sum(not v for v in passed.values()),
    )


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


def optimize(args, embedders=None, on_move: Callable[[Move], None] | None = None) -> dict:
    """The optimize-prompt entry: search, write ``args.output``, return a report."""
    from .score import PACKAGED, Embedder, read_prompts

    if embedders is None:
        embedders = [Embedder(p) for p in (args.embedder or [PACKAGED])]
    ids, gold = _read_gold([args.prompts_csv, *args.extra_prompts], args.column)
    starts_given = [*args.start, *_read_lines(args.start_file)]
    if not gold:
        raise InputError(f"{args.prompts_csv} has no non-empty '{args.column}' values to optimise against")
    report: dict = {"embedders": [e.label for e in embedders], "objective": args.objective,
                    "relative_to": None}
    if args.predictions is None:
        if args.val:
            _, held_gold = _read_gold([args.val], args.column)
            train_gold = gold
        elif args.holdout > 0:
            tr, he = split_holdout(gold, args.holdout, args.seed)
            train_gold, held_gold = [gold[i] for i in tr], [gold[i] for i in he]
        else:
            train_gold, held_gold = gold, []
        caches = [{} for _ in embedders]
        ref = BASELINE if args.relative else None
        objective = Combined([MeanObjective(e, train_gold, c) for e, c in zip(embedders, caches)], args.objective,
                             ref)
        holdout = (Combined([MeanObjective(e, held_gold, c) for e, c in zip(embedders, caches)], args.objective,
                            ref) if held_gold else None)
        # Each distinct training prompt is a start too: the best single training prompt is a bar to beat.
        starts = [BASELINE, PUBLIC_MEAN_PROMPT, shipped_mean_prompt(), *GENERIC_STARTS, *starts_given,
                  *dict.fromkeys(train_gold)]
        allow_empty = False
        report.update(mode="mean_prompt", train_prompts=len(train_gold), heldout_prompts=len(held_gold))
        reference = [BASELINE, PUBLIC_MEAN_PROMPT]
        report["relative_to"] = BASELINE if args.relative else None
    else:
        pred_ids, preds = read_prompts(args.predictions)
        by_id = dict(zip(pred_ids, preds))
        rows = [(i, by_id[i], g) for i, g in zip(ids, gold) if i in by_id and by_id[i].strip()]
        if not rows:
            raise InputError(f"no ids of {args.predictions} match {args.prompts_csv}")
        if args.val:
            val_ids, val_gold = _read_gold([args.val], args.column)
            held_rows = [(i, by_id[i], g) for i, g in zip(val_ids, val_gold) if i in by_id and by_id[i].strip()]
            if not held_rows:
                raise InputError(f"no ids of {args.val} have a prediction in {args.predictions}")
            held_ids = set(val_ids)
            train_rows = [r for r in rows if r[0] not in held_ids]
        elif args.holdout > 0:
            tr, he = split_holdout([g for _, _, g in rows], args.holdout, args.seed)
            train_rows, held_rows = [rows[i] for i in tr], [rows[i] for i in he]
        else:
            train_rows, held_rows = rows, []
        if not train_rows:
            raise InputError(f"every row of {args.prompts_csv} with a prediction is held out")
        train_gold = [g for _, _, g in train_rows]

        def suffix_objective(part):
            return Combined([SuffixObjective(e, [p for _, p, _ in part], [g for _, _, g in part])
                             for e in embedders], args.objective, "" if args.relative else None)

        objective = suffix_objective(train_rows)
        holdout = suffix_objective(held_rows) if held_rows else None
        starts = ["", BASELINE, PUBLIC_MEAN_PROMPT, shipped_mean_prompt(), *GENERIC_STARTS, *starts_given]
        allow_empty = True
        report.update(mode="suffix", train_rows=len(train_rows), heldout_rows=len(held_rows))
        reference = [""]
        report["relative_to"] = "no suffix" if args.relative else None
    guard = _fluency_guard(args, train_gold, report)
    result = search(objective, starts, build_vocabulary(train_gold), holdout=holdout, accept=guard,
                    seed=args.seed, rounds=args.rounds, beam_width=args.beam_width,
                    per_round=args.candidates_per_round, max_words=args.max_words, time_limit=args.time_limit,
                    patience=args.patience, allow_empty=allow_empty, progress=args.progress, on_move=on_move)
    table = {}
    for name, text in [*(("no suffix" if t == "" else t, t) for t in reference), ("best start", result.start),
                       ("result", result.best)]:
        table[name] = {"text": text, "train": _scores(objective, text), "heldout": _scores(holdout, text)}
    report.update({
        "start": result.start, "start_score": result.start_score, "start_heldout": result.start_heldout,
        "best": result.best, "score": result.score, "heldout": result.heldout, "scores": table,
        "moves": [asdict(m) for m in result.moves], "stopped": result.stopped, "rounds": result.rounds,
        "evaluated": result.evaluated, "rejected_by_fluency_guard": result.rejected, "seconds": result.seconds,
        "candidates_per_s": result.candidates_per_s, "history": result.history,
        "heldout_history": result.heldout_history,
    })
    with open(args.output, "w", encoding="utf-8") as f:
        f.write(result.best + "\n")
    if args.report:
        with open(args.report, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
    return report
