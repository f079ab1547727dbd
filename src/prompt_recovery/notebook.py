"""Generate kaggle_notebook/submission.ipynb from its plain .py twin (``# %%`` cells), so the two never drift.

    python -m prompt_recovery.notebook [kaggle_notebook/submission.py]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def py_to_notebook(source: str) -> dict:
    """A Jupyter v4 notebook from percent-format source: ``# %%`` code cells, ``# %% [markdown]`` text."""
    cells: list[dict] = []
    kind, lines = None, []

    def flush() -> None:
        while lines and not lines[-1].strip():
            lines.pop()
        if kind is None:
            return
        if kind == "markdown":
            text = [ln[2:] if ln.startswith("# ") else ln.lstrip("#") for ln in lines]
            cells.append({"cell_type": "markdown", "metadata": {}, "source": _join(text)})
        else:
            cells.append({"cell_type": "code", "metadata": {}, "execution_count": None, "outputs": [],
                          "source": _join(lines)})

    for line in source.splitlines():
        if line.startswith("# %%"):
            flush()
            kind, lines = ("markdown" if "[markdown]" in line else "code"), []
        else:
            lines.append(line)
    flush()
    return {
        "cells": cells,
        "metadata": {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
                     "language_info": {"name": "python"}},
        "nbformat": 4,
        "nbformat_minor": 5,
    }


def _join(lines: list[str]) -> list[str]:
    return [ln + "\n" for ln in lines[:-1]] + lines[-1:]


def render(py_path: Path) -> str:
    nb = py_to_notebook(py_path.read_text(encoding="utf-8"))
    for n, cell in enumerate(nb["cells"]):
        cell["id"] = f"cell-{n}"  # stable ids: regenerating gives the same file
    return json.dumps(nb, indent=1, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    py = Path(argv[0] if argv else "kaggle_notebook/submission.py")
    out = py.with_suffix(".ipynb")
    out.write_text(render(py), encoding="utf-8")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
