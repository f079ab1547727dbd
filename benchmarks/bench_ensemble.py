"""An ensemble of N members over one base model against N predict runs one after another, same rows, one run.

    python benchmarks/bench_ensemble.py                  # the two shipped adapters of the embedded Gemma 3 270M
    python benchmarks/bench_ensemble.py --csv data_samples/val.csv --adapter A --adapter B --adapter none

Each side is timed as a user runs it, through the CLI in a fresh process (Python start-up and model load
included): one ``predict --adapter A --adapter B ...`` against ``predict --adapter A``, then ``--adapter B``, ...
The answers are compared member by member (they must be the same: the same greedy decoding either way).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from importlib.resources import files
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def shipped(name: str) -> str:
    return str(files("prompt_recovery").joinpath("assets", "adapters", name))


def run(csv: str, out: str, adapters: list[str], extra: list[str]) -> tuple[float, dict]:
    cmd = [sys.executable, "-m", "prompt_recovery", "predict", csv, "-o", out, "--no-progress",
           "--report", out + ".report.json", *[x for a in adapters for x in ("--adapter", a)], *extra]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"predict failed: {proc.stderr[-2000:]}")
    return seconds, json.loads(Path(out + ".report.json").read_text())


def answers(out: str) -> dict:
    lines = Path(out + ".candidates.jsonl").read_text().splitlines()[1:]
    return {(r["name"], r["row"], r["sample"]): r["text"] for r in map(json.loads, lines)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--csv", default=str(ROOT / "data_samples" / "test.csv"))
    p.add_argument("--adapter", action="append", default=None,
                   help="member adapters (default: the shipped soft prompt and LoRA)")
    p.add_argument("--max-new-tokens", default="32")
    opts = p.parse_args(argv)
    adapters = opts.adapter or [shipped("gemma-3-270m-prompt-tuning"), shipped("gemma-3-270m-lora")]
    extra = ["--max-new-tokens", opts.max_new_tokens]
    with tempfile.TemporaryDirectory() as tmp:
        run(opts.csv, f"{tmp}/warm.csv", adapters[:1], extra)  # the GGUF conversion and disk cache, once
        together_s, together = run(opts.csv, f"{tmp}/together.csv", adapters, extra)
        got = answers(f"{tmp}/together.csv")
        apart_s, loads, generate, want = 0.0, 0.0, 0.0, {}
        for k, a in enumerate(adapters):
            s, rep = run(opts.csv, f"{tmp}/apart{k}.csv", [a], extra)
            apart_s, loads, generate = apart_s + s, loads + rep["load_s"], generate + rep["generate_s"]
            want.update(answers(f"{tmp}/apart{k}.csv"))
    names = [m["name"] for m in together["members"]]
    same = sum(got.get(k) == v for k, v in want.items())
    print(f"\n{together['rows']} rows of {Path(opts.csv).name}, {len(adapters)} members ({', '.join(names)}), "
          f"embedded Gemma 3 270M on CPU, max_new_tokens {opts.max_new_tokens}\n")
    print("| run | wall seconds (start-up + load + generate) | model loads | load s | generate s | batches |")
    print("|---|---|---|---|---|---|")
    print(f"| one predict, {len(adapters)} members over one base | {together_s:.1f} | 1 | {together['load_s']:.1f} | "
          f"{together['generate_s']:.1f} | {len(together['batches'])} |")
    print(f"| {len(adapters)} predict runs one after another | {apart_s:.1f} | {len(adapters)} | {loads:.1f} | "
          f"{generate:.1f} | - |")
    print(f"\nsame answers, member by member: {same} of {len(want)}; speed-up {apart_s / together_s:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
