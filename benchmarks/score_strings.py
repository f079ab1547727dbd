"""Mean metric of fixed strings (mean prompts) against a CSV of gold prompts, under one or more embedders.

    python benchmarks/score_strings.py GOLD_CSV --embedder packaged --embedder EXTRA/embedders/X \\
        --string "Improve the text to this." --file mean_prompt.txt ...

Prints, per string and embedder, the mean sharpened cosine against every gold prompt and its ratio to
"Improve the text to this." under the same embedder, as a Markdown table; --json writes the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("gold")
    p.add_argument("--embedder", action="append", default=None)
    p.add_argument("--string", action="append", default=[])
    p.add_argument("--file", action="append", default=[], help="a file holding one string (optimize-prompt -o)")
    p.add_argument("--json")
    opts = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from prompt_recovery.meanprompt import BASELINE, _read_gold
    from prompt_recovery.score import Embedder, score_pairs

    _, gold = _read_gold([opts.gold], "rewrite_prompt")
    strings = [BASELINE, *opts.string]
    for path in opts.file:
        with open(path, encoding="utf-8") as f:
            strings.append(f.read().strip())
    embedders = [Embedder(e) for e in (opts.embedder or ["packaged"])]
    table = {e.name: {s: float(score_pairs(e, [s] * len(gold), gold).mean()) for s in dict.fromkeys(strings)}
             for e in embedders}
    print(f"\n{len(gold)} gold prompts of {opts.gold}\n")
    print("| string | " + " | ".join(table) + " |")
    print("|---" * (len(table) + 1) + "|")
    for s in dict.fromkeys(strings):
        print(f"| {s} | " + " | ".join(f"{t[s]:.4f} ({t[s] / t[BASELINE]:.2f}x)" for t in table.values()) + " |")
    if opts.json:
        with open(opts.json, "w", encoding="utf-8") as f:
            json.dump({"gold": opts.gold, "scores": table}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
