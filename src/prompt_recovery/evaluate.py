"""evaluate: predict and score on rows with gold prompts, every member alone and every combination.

One predict run makes the candidates (``submission.csv.candidates.jsonl`` in the output folder); every
variant is then re-derived from those stored candidates, without generating again: each member alone, each
way of combining them, each with no suffix, with the run's suffix, and with the fallback (mean) prompt
appended. Each is scored per row under each scorer; the folder gets ``scores.csv`` (per row),
``summary.md`` (the table), ``summary.json`` and ``scores.png`` (a bar chart).
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, fields

import numpy as np

from .config import EvaluateArgs, PredictArgs
from .data import InputError, read_table
from .ensemble import COMBINES, FIRST, MBR, resolve_members
from .predict import Finisher, make_combiner, predict, resolve_fallback, resolve_suffix
from .rows import RULE, Rows
from .submission import read_submission

log = logging.getLogger(__name__)

SUBMISSION = "submission.csv"


@dataclass
class Evaluation:
    variants: list[str]
    """Variant names, in table order."""
    scorers: list[str]
    """Scorer labels (stand-in ones say so)."""
    means: dict[str, dict[str, float]]
    """variant -> scorer -> mean score."""
    rows: int
    report: object
    """The predict run's Report."""
    files: dict = field(default_factory=dict)


def read_gold(source, ids: list[str]) -> list[str]:
    """The gold prompt of every id (in that order) from a table with id and rewrite_prompt columns."""
    table, _, warnings, _ = read_table(source, required=("id", "rewrite_prompt"), optional=())
    for w in warnings:
        log.warning(w)
    gold = dict(zip(table["id"], table["rewrite_prompt"]))
    missing = [i for i in ids if not gold.get(i, "").strip()]
    if missing:
        raise InputError(f"{len(missing)} row(s) have no gold rewrite_prompt (first ids: {missing[:5]})")
    return [gold[i] for i in ids]


def predict_args(args: EvaluateArgs) -> PredictArgs:
    names = {f.name for f in fields(PredictArgs)}
    shared = {f.name: getattr(args, f.name) for f in fields(EvaluateArgs) if f.name in names - {"output"}}
    return PredictArgs(test_csv=args.labeled_csv, output=os.path.join(args.output, SUBMISSION),
                       report=os.path.join(args.output, "report.json"), **shared)


def variants_from_candidates(pargs: PredictArgs, rows: Sequence, fallback: str) -> dict[str, list[str]]:
    """Every variant's text per row, re-derived from the stored candidates the way predict derives its own.

    The same ``Rows`` (rules, resumed candidates), the same combiners and the same ``Finisher`` (suffix, and
    trimming with ``--embedder``'s tokenizer) as predict: the variant that matches the run's own settings
    reproduces its submission.
    """
    members, _ = resolve_members(pargs)
    names = [m.name for m in members]
    state = Rows(rows, fallback, pargs.output)
    state.apply_rules()
    state.resume({m.key: m.name for m in members})
    picks: dict[str, tuple[list[str], str]] = {}
    if len(members) > 1 or any(m.args.samples > 1 for m in members):
        for m in members:
            picks[f"{m.name} alone"] = ([m.name], FIRST)
            if m.args.samples > 1:
                picks[f"{m.name}, mbr of its samples"] = ([m.name], MBR)
        for c in COMBINES:
            picks[f"combine {c}"] = (names, c)
    else:
        picks[members[0].name] = (names, FIRST)
    # Only the methods used are built (MBR loads an embedder); each is shared by every pick that uses it.
    combiners = {c: make_combiner(c, fallback, pargs.out) for c in {c for _, c in picks.values()}}
    suffix = resolve_suffix(pargs.out)
    finishers = {"": Finisher(pargs.out, suffix=""), " + suffix": Finisher(pargs.out, suffix=suffix),
                 " + mean prompt": Finisher(pargs.out, suffix=fallback)}
    out: dict[str, list[str]] = {"fallback prompt alone": [s.prompt if s.source == RULE else fallback
                                                           for s in state.states]}
    for name, (which, method) in picks.items():
        for label, finish in finishers.items():
            if label == " + suffix" and not suffix:
                continue
            state.recombine(range(len(rows)), which, combiners[method].many, finish)
            out[name + label] = [s.prompt for s in state.states]
    return out


def evaluate(args: EvaluateArgs, *, loader=None) -> Evaluation:
    """Predict on the labelled rows, then score the submission and every variant; write the folder."""
    from .data import read_test
    from .score import CachedEmbed, Embedder, score_pairs

    os.makedirs(args.output, exist_ok=True)
    rows = read_test(args.labeled_csv).rows
    gold = read_gold(args.gold or args.labeled_csv, [r.id for r in rows])  # checked before the long part
    scorers = [Embedder(path) for path in (args.scorer or [None])]  # so are the scorers
    pargs = predict_args(args)
    report = predict(pargs, loader=loader)
    fallback = resolve_fallback(pargs.out)
    submitted = [prompt for _, prompt in read_submission(pargs.output)]
    variants = {"submission": submitted, **variants_from_candidates(pargs, rows, fallback)}
    per_row: dict[tuple[str, str], np.ndarray] = {}
    means: dict[str, dict[str, float]] = {v: {} for v in variants}
    for scorer in scorers:
        cached = CachedEmbed(scorer.embed)  # the gold and the texts variants share are embedded once
        for name, texts in variants.items():
            scores = score_pairs(cached, texts, gold)
            per_row[(name, scorer.label)] = scores
            means[name][scorer.label] = float(scores.mean()) if len(scores) else 0.0
    labels = [s.label for s in scorers]
    result = Evaluation(list(variants), labels, means, len(rows), report)
    result.files = _write(args.output, rows, gold, variants, per_row, result)
    return result


def _write(folder: str, rows, gold, variants, per_row, result: Evaluation) -> dict:
    files = {"scores": os.path.join(folder, "scores.csv"), "table": os.path.join(folder, "summary.md"),
             "json": os.path.join(folder, "summary.json"), "chart": os.path.join(folder, "scores.png")}
    with open(files["scores"], "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", "gold", "variant", "text", *result.scorers])
        for name, texts in variants.items():
            for k, (row, g, t) in enumerate(zip(rows, gold, texts)):
                w.writerow([row.id, g, name, t, *(f"{per_row[(name, s)][k]:.6f}" for s in result.scorers)])
    with open(files["table"], "w", encoding="utf-8") as f:
        f.write(markdown(result) + "\n")
    with open(files["json"], "w", encoding="utf-8") as f:
        json.dump({"rows": result.rows, "scorers": result.scorers, "means": result.means}, f, indent=2)
    _chart(result, files["chart"])
    return files


def markdown(result: Evaluation) -> str:
    head = f"| variant ({result.rows} rows) | " + " | ".join(result.scorers) + " |"
    lines = [head, "|---|" + "---|" * len(result.scorers)]
    for v in result.variants:
        lines.append(f"| {v} | " + " | ".join(f"{result.means[v][s]:.4f}" for s in result.scorers) + " |")
    return "\n".join(lines)


def _chart(result: Evaluation, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on Kaggle or CI
    import matplotlib.pyplot as plt

    n, k = len(result.variants), len(result.scorers)
    fig, ax = plt.subplots(figsize=(8, 0.35 * n * k + 1.5))
    height = 0.8 / k
    for j, s in enumerate(result.scorers):
        ys = [i + j * height for i in range(n)]
        ax.barh(ys, [result.means[v][s] for v in result.variants], height=height, label=s)
    ax.set_yticks([i + 0.4 - height / 2 for i in range(n)])
    ax.set_yticklabels(result.variants, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("mean sharpened cosine")
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
