"""Split files of gold prompts for the optimize-prompt measurements: search vs held-out, by prompt text.

    python benchmarks/make_prompt_splits.py -o SPLITS [--seed 0]

Writes SPLITS/small_{k}_search.csv and small_{k}_other.csv (k = 0..2: 24 distinct prompts each, drawn from
data_labelled/labelled.csv, the two halves disjoint), and large_search.csv / large_heldout.csv (200 distinct
prompts each, disjoint). A prompt text is never on both sides of a split.
"""

from __future__ import annotations

import argparse
import csv
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _write(path: Path, prompts: list[str]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", "rewrite_prompt"])
        w.writerows([(k, p) for k, p in enumerate(prompts)])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--seed", type=int, default=0)
    opts = p.parse_args(argv)
    out = Path(opts.output)
    out.mkdir(parents=True, exist_ok=True)
    with open(ROOT / "data_labelled" / "labelled.csv", encoding="utf-8") as f:
        pool = sorted({r["rewrite_prompt"].strip() for r in csv.DictReader(f) if r["rewrite_prompt"].strip()})
    rng = random.Random(opts.seed)
    for k in range(3):
        draw = rng.sample(pool, 48)
        _write(out / f"small_{k}_search.csv", draw[:24])
        _write(out / f"small_{k}_other.csv", draw[24:])
    draw = rng.sample(pool, 400)
    _write(out / "large_search.csv", draw[:200])
    _write(out / "large_heldout.csv", draw[200:])
    print(f"{len(pool)} distinct prompts; splits in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
