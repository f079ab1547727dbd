"""Score of each prediction variant on a labelled set, side by side, in one run: a call of ``evaluate``.

    python benchmarks/eval_variants.py                                   # test.csv + test_gold.csv
    python benchmarks/eval_variants.py --csv data_samples/val.csv --gold "" --scorer packaged --scorer EMB

Members: the bare base (its default answer prefix), the shipped soft prompt and the shipped LoRA over the
embedded Gemma 3 270M. ``evaluate`` scores, from one generation per member and row: the fallback prompt alone,
each member alone, each combination (first, concat, mbr), each with the fallback (mean) prompt appended as a
suffix. The table is its ``summary.md``; every figure is labelled with the embedder that made it (the packaged
MiniLM stand-in unless --scorer is given).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from importlib.resources import files
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def shipped(name: str) -> str:
    return str(files("prompt_recovery").joinpath("assets", "adapters", name))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--csv", default=str(ROOT / "data_samples" / "test.csv"))
    p.add_argument("--gold", default=str(ROOT / "data_samples" / "test_gold.csv"),
                   help="gold prompts beside --csv; empty when --csv has a rewrite_prompt column")
    p.add_argument("--scorer", action="append", default=None, help="embedder folder or 'packaged' (repeatable)")
    p.add_argument("--output", default="eval_variants", help="evaluate's output folder")
    opts = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from prompt_recovery.config import EvaluateArgs, ModelArgs
    from prompt_recovery.evaluate import evaluate, markdown

    adapters = ["none", shipped("gemma-3-270m-prompt-tuning"), shipped("gemma-3-270m-lora")]
    start = time.perf_counter()
    result = evaluate(EvaluateArgs(labeled_csv=opts.csv, gold=opts.gold or None, output=opts.output,
                                   scorer=opts.scorer or [], progress=False, model=ModelArgs(adapter=adapters)))
    print(markdown(result))
    print(f"\n{time.perf_counter() - start:.0f} s in all (load, generate every member, score); "
          f"per-row scores and chart in {opts.output}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
