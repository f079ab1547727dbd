"""Read competition tables: ids and texts as strings, input order kept, bad input made explicit.

Every problem that still leaves rows to answer becomes a warning and a documented fallback; only a file
that cannot be read at all, or one without an ``id`` column, is an ``InputError`` (exit 2).
"""

from __future__ import annotations

import csv
import logging
import os
from dataclasses import dataclass

import pandas as pd

log = logging.getLogger(__name__)

TEXT_COLUMNS = ("original_text", "rewritten_text")
# Read at most this much of one cell: a multi-megabyte text would only be truncated by tokens later,
# and holding it costs memory for nothing.
MAX_CELL_CHARS = 200_000


class InputError(Exception):
    """Input that cannot be turned into a submission at all: the CLI prints it in one line, exit 2."""


@dataclass(frozen=True)
class Row:
    id: str
    original_text: str
    rewritten_text: str

    @property
    def usable(self) -> bool:
        return bool(self.original_text.strip()) and bool(self.rewritten_text.strip())


@dataclass
class Table:
    rows: list[Row]
    warnings: list[str]
    encoding: str


def _read_frame(path: str, encoding: str) -> pd.DataFrame:
    header: list[str] = []

    def keep_row(bad: list[str]) -> list[str]:
        # A line with more fields than the header (an unquoted comma) keeps its first fields: a
        # mangled text still gets a prediction, where dropping the line would lose the row.
        return bad[: len(header)] if header else bad

    with open(path, newline="", encoding=encoding) as f:
        first = next(csv.reader(f), [])
    header = first
    return pd.read_csv(
        path,
        dtype=str,
        keep_default_na=False,
        encoding=encoding,
        engine="python",
        index_col=False,
        on_bad_lines=keep_row,
    )


def read_table(path: str, required: tuple[str, ...] = ("id",), optional: tuple[str, ...] = TEXT_COLUMNS):
    """Read a CSV as strings. Returns (frame, warnings, encoding); raises InputError if unusable."""
    if not os.path.isfile(path):
        raise InputError(f"cannot read {path}: no such file")
    warnings: list[str] = []
    encoding = "utf-8-sig"  # utf-8-sig also strips a BOM, which would otherwise rename the id column
    try:
        try:
            frame = _read_frame(path, encoding)
        except UnicodeDecodeError:
            encoding = "latin-1"
            warnings.append(f"{path} is not UTF-8; read as latin-1, some characters may be wrong")
            frame = _read_frame(path, encoding)
    except pd.errors.EmptyDataError:
        raise InputError(f"cannot read {path}: the file is empty (not even a header)") from None
    except (pd.errors.ParserError, csv.Error, ValueError, OSError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"cannot read {path}: {first_line}") from None
    frame.columns = [str(c).strip() for c in frame.columns]
    for col in required:
        if col not in frame.columns:
            found = ", ".join(frame.columns[:8]) or "none"
            raise InputError(f"{path} has no '{col}' column (columns found: {found})")
    for col in optional:
        if col not in frame.columns:
            warnings.append(f"{path} has no '{col}' column: every row gets the fallback prompt")
            frame[col] = ""
    # Short rows leave NaN even with keep_default_na=False; an empty string is what they mean.
    frame = frame.fillna("")
    return frame, warnings, encoding


def read_test(path: str) -> Table:
    """Read a test table (id, original_text, rewritten_text) in input order."""
    frame, warnings, encoding = read_table(path)
    rows = [
        Row(str(i), str(o)[:MAX_CELL_CHARS], str(r)[:MAX_CELL_CHARS])
        for i, o, r in zip(frame["id"], frame["original_text"], frame["rewritten_text"])
    ]
    empty = [r.id for r in rows if not r.usable]
    column_missing = any("column" in w for w in warnings)  # already said once for every row
    if empty and not column_missing:
        warnings.append(
            f"{len(empty)} row(s) have an empty text and get the fallback prompt (first: {empty[:3]})"
        )
    seen: set[str] = set()
    dups = sorted({r.id for r in rows if r.id in seen or seen.add(r.id)})
    if dups:
        warnings.append(f"duplicate ids kept in place, each answered: {dups[:5]}")
    blank_ids = sum(1 for r in rows if not r.id.strip())
    if blank_ids:
        warnings.append(f"{blank_ids} row(s) have a blank id; kept as they are")
    for w in warnings:
        log.warning(w)
    return Table(rows=rows, warnings=warnings, encoding=encoding)
