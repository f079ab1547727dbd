"""Score of each prediction variant on a labelled CSV, side by side, in one run.

    python benchmarks/eval_variants.py            # data_samples/test.csv + test_gold.csv, stand-in embedder

Variants: the fallback mean prompt alone; the base model without adapter (its default answer prefix), with
and without the shipped suffix; the shipped soft prompt without suffix, with the shipped suffix, and with the
mean prompt appended as the suffix. Every figure is made
with the embedder named in the table's title (the packaged MiniLM stand-in unless --embedder is given).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--test", default=str(ROOT / "data_samples" / "test.csv"))
    p.add_argument("--gold", default=str(ROOT / "data_samples" / "test_gold.csv"))
    p.add_argument("--embedder", default=None)
    opts = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from prompt_recovery.config import BudgetArgs, ModelArgs, OutputArgs, PredictArgs
    from prompt_recovery.data import read_test
    from prompt_recovery.predict import predict, resolve_fallback
    from prompt_recovery.score import Embedder, score_files
    from prompt_recovery.submission import write_submission

    embedder = Embedder(opts.embedder)
    ids = [r.id for r in read_test(opts.test).rows]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        fallback = os.path.join(tmp, "fallback.csv")
        write_submission(fallback, ids, [resolve_fallback(OutputArgs())] * len(ids))
        rows.append(("fallback mean prompt alone", score_files(fallback, opts.gold, embedder).mean, "-"))
        mean_suffix = os.path.join(tmp, "mean_as_suffix.txt")
        Path(mean_suffix).write_text(resolve_fallback(OutputArgs()))
        variants = [
            ("base model, no adapter, no suffix", "none", "none"),
            ("base model, no adapter + shipped suffix", "none", "auto"),
            ("shipped soft prompt, no suffix", "auto", "none"),
            ("shipped soft prompt + shipped suffix", "auto", "auto"),
            ("shipped soft prompt + mean prompt as suffix", "auto", mean_suffix),
        ]
        for name, adapter, suffix in variants:
            out = os.path.join(tmp, f"{len(rows)}.csv")
            t = time.perf_counter()
            report = predict(PredictArgs(test_csv=opts.test, output=out, progress=False,
                                         model=ModelArgs(adapter=adapter), budget=BudgetArgs(),
                                         out=OutputArgs(suffix_file=suffix)))
            seconds = time.perf_counter() - t
            rows.append((f"{name} ({report.model.get('adapter_type') or 'no adapter'})",
                         score_files(out, opts.gold, embedder).mean, f"{seconds:.0f}s"))
    print(f"\n{len(ids)} rows of {Path(opts.test).name}; {embedder.label}\n")
    print("| variant | score | predict time |")
    print("|---|---|---|")
    for name, score, seconds in rows:
        print(f"| {name} | {score:.4f} | {seconds} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
