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
from .ensemble import COMBINES, Combiner, resolve_members
from .postprocess import UNCHANGED_PROMPT, fit_with_suffix, unchanged
from .predict import Finisher, predict, resolve_fallback
from .submission import CandidateLog, input_fingerprint

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


def variants_from_candidates(pargs: PredictArgs, rows, fallback: str, embed) -> dict[str, list[str]]:
    """Every variant's text per row, from the stored candidates (members alone, combinations, suffixes)."""
    members, _ = resolve_members(pargs)
    ids = [r.id for r in rows]
    cands: list[dict[str, dict[int, str | None]]] = [{} for _ in rows]
    keys = {m.key: m.name for m in members}
    log_ = CandidateLog(CandidateLog.path_for(pargs.output),
                        input_fingerprint(ids, [(r.original_text, r.rewritten_text) for r in rows]))
    for rec in log_.load(ids):
        name = keys.get(rec["member"])
        if name is not None:
            cands[rec["row"]].setdefault(name, {})[rec["sample"]] = rec.get("text")
    names = [m.name for m in members]

    def usable(i: int, which: Sequence[str]) -> list[str]:
        return [t for m in which for _, t in sorted(cands[i].get(m, {}).items()) if t]

    def rule(i: int) -> str | None:
        r = rows[i]
        if not r.usable:
            return fallback
        return UNCHANGED_PROMPT if unchanged(r.original_text, r.rewritten_text) else None

    combiners = {c: Combiner(c, fallback, embed) for c in COMBINES}
    raw: dict[str, list[str | None]] = {}
    if len(members) > 1 or any(m.args.samples > 1 for m in members):
        for m in members:
            raw[f"{m.name} alone"] = [(usable(i, [m.name]) or [None])[0] for i in range(len(rows))]
            if m.args.samples > 1:
                raw[f"{m.name}, mbr of its samples"] = combiners["mbr"].many([usable(i, [m.name])
                                                                               for i in range(len(rows))])
        for c, combiner in combiners.items():
            raw[f"combine {c}"] = combiner.many([usable(i, names) for i in range(len(rows))])
    else:
        raw[f"{members[0].name}"] = [(usable(i, names) or [None])[0] for i in range(len(rows))]
    out: dict[str, list[str]] = {"fallback prompt alone": [rule(i) or fallback for i in range(len(rows))]}
    suffixes = {"": "", " + suffix": Finisher(pargs.out).suffix, " + mean prompt": fallback}
    for name, texts in raw.items():
        for label, suffix in suffixes.items():
            if label and not suffix:
                continue
            out[name + label] = [rule(i) or (fit_with_suffix(t, suffix) if t else fallback)
                                 for i, t in enumerate(texts)]
    return out


def evaluate(args: EvaluateArgs, *, loader=None) -> Evaluation:
    """Predict on the labelled rows, then score the submission and every variant; write the folder."""
    from .data import read_test
    from .score import Embedder, score_pairs

    os.makedirs(args.output, exist_ok=True)
    rows = read_test(args.labeled_csv).rows
    gold = read_gold(args.gold or args.labeled_csv, [r.id for r in rows])  # checked before the long part
    pargs = predict_args(args)
    report = predict(pargs, loader=loader)
    fallback = resolve_fallback(pargs.out)
    with open(pargs.output, newline="", encoding="utf-8") as f:
        submitted = [r["rewrite_prompt"] for r in csv.DictReader(f)]
    scorers = [Embedder(path) for path in (args.scorer or [None])]
    mbr_embed = Embedder(pargs.out.embedder).embed if pargs.out.embedder else scorers[0].embed
    variants = {"submission": submitted, **variants_from_candidates(pargs, rows, fallback, mbr_embed)}
    per_row: dict[tuple[str, str], np.ndarray] = {}
    means: dict[str, dict[str, float]] = {v: {} for v in variants}
    for scorer in scorers:
        for name, texts in variants.items():
            scores = score_pairs(scorer, texts, gold)
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
