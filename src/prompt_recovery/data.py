"""Read competition tables: ids and texts as strings, input order kept, bad input made explicit.

Every problem that still leaves rows to answer becomes a warning and a documented fallback; only a file
that cannot be read at all, or one without an ``id`` column, is an ``InputError`` (exit 2). A table is a
CSV path or a pandas DataFrame (what a notebook holds); both give the same strings and the same warnings.
"""

from __future__ import annotations

import csv
import logging
import os
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Union

from .errors import InputError  # noqa: F401  (re-exported: every stage imports it from here)

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

TEXT_COLUMNS = ("original_text", "rewritten_text")
# Read at most this much of one cell: a multi-megabyte text would only be truncated by tokens later,
# and holding it costs memory for nothing.
MAX_CELL_CHARS = 200_000


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


Source = Union[str, "os.PathLike[str]", "pd.DataFrame"]


def is_blank_line(fields: list[str]) -> bool:
    """A line with nothing but white space: csv yields [] (or one blank field) for it.

    It is no row (pandas skips it too); a line of only commas (",,") has every field and is a row with
    empty cells, kept like any other so that no row of the input is ever lost.
    """
    return not fields or (len(fields) == 1 and not fields[0].strip())


def _read_rows(path: str, encoding: str, warnings: list[str]) -> tuple[list[str], list[list[str]], int]:
    """(header, lines, blank lines skipped); blank lines before the header are skipped too."""
    with open(path, newline="", encoding=encoding) as f:
        physical = list(f)
    records, starts, start = [], [], 1
    reader = csv.reader(physical)
    for record in reader:
        records.append(record)
        starts.append(start)  # the physical line each record begins on
        start = reader.line_num + 1
    if records and _quote_left_open(physical[starts[-1] - 1:]):
        # The last record opened a quote that never closes, so every line after it was read as its text: the
        # lines from there on are read again with quotes as plain text, so none of their rows is lost.
        line = starts[-1]
        records[-1:] = list(csv.reader(physical[line - 1:], quoting=csv.QUOTE_NONE))
        warnings.append(f"{path}: line {line} opens a quote that is never closed; from there on, quotes were "
                        f"read as plain text")
    lines, blank = [], 0
    for line in records:
        if is_blank_line(line):
            blank += 1
        else:
            lines.append(line)
    if not lines:
        raise InputError(f"cannot read {path}: the file is empty (not even a header)")
    return lines[0], lines[1:], blank


def _quote_left_open(lines: list[str]) -> bool:
    """Whether the file's last record, ``lines``, is an open quote that ran to the end of the file.

    Only the last record can be one (a quote left open swallows everything after it). It spans several lines
    then, and strict parsing fails on it: at the end of the data, or at a later line's own quotes.
    """
    if len(lines) < 2:
        return False
    try:
        for _ in csv.reader(lines, strict=True):
            pass
    except csv.Error:
        return True
    return False


def _cell(value) -> str:
    """A DataFrame cell as the string it shows: missing values (NaN, None, NA, NaT) are empty."""
    if isinstance(value, str):
        return value
    import pandas as pd

    if pd.api.types.is_scalar(value) and pd.isna(value):
        return ""
    return str(value)


def _frame_rows(frame: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    header = [_cell(c) for c in frame.columns]
    # itertuples, not iterrows: iterrows upcasts a row of mixed dtypes and 7 would come back as "7.0".
    lines = [[_cell(v) for v in row] for row in frame.itertuples(index=False, name=None)]
    return header, lines


def read_table(source: Source, required: tuple[str, ...] = ("id",), optional: tuple[str, ...] = TEXT_COLUMNS):
    """Read a CSV (or a DataFrame) as strings into {column: values}. Returns (table, n_rows, warnings, encoding).

    The csv module, not pandas: every cell stays the exact string it was (ids "007" or "1e5", texts
    "NaN"), quoted newlines and CRLF work, and a malformed line never silently drops its row. Blank lines
    are skipped with a warning. A DataFrame's cells are read as their strings (missing values as ""):
    what it holds was decided when it was built, so read it with ``dtype=str, keep_default_na=False``
    to keep "007" and "NaN".
    """
    if not isinstance(source, (str, os.PathLike)):
        return _read_frame(source, required, optional)
    path = os.fspath(source)
    if not os.path.isfile(path):
        raise InputError(f"cannot read {path}: {'it is a folder' if os.path.isdir(path) else 'no such file'}")
    # The default 128 KiB field limit would reject a long text; truncation by tokens happens later.
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    warnings: list[str] = []
    encoding = "utf-8-sig"  # utf-8-sig also strips a BOM, which would otherwise rename the id column
    with open(path, "rb") as f:
        if f.read(2) in (b"\xff\xfe", b"\xfe\xff"):
            encoding = "utf-16"  # Excel's "Unicode text" export: its BOM says so, and the codec reads it
    try:
        try:
            header, lines, blank = _read_rows(path, encoding, warnings)
        except UnicodeDecodeError:
            encoding = "latin-1"
            warnings.append(f"{path} is not UTF-8; read as latin-1, some characters may be wrong")
            header, lines, blank = _read_rows(path, encoding, warnings)
    except (csv.Error, OSError) as exc:
        raise InputError(f"cannot read {path}: {str(exc).strip() or type(exc).__name__}") from None
    if blank:
        warnings.append(f"{blank} blank line(s) of {path} skipped; they are no rows")
    return _columns(path, header, lines, warnings, required, optional) + (encoding,)


def _read_frame(frame, required, optional):
    import pandas as pd  # only here: a CSV run need not pay for importing pandas

    if not isinstance(frame, pd.DataFrame):
        raise InputError(f"cannot read a {type(frame).__name__}: give a CSV path or a pandas DataFrame")
    header, lines = _frame_rows(frame)
    return _columns("the DataFrame", header, lines, [], required, optional) + ("DataFrame",)


def _columns(path: str, header: list[str], lines: list[list[str]], warnings: list[str],
             required: tuple[str, ...], optional: tuple[str, ...]):
    """(table, n_rows, warnings) from a header and its lines; ``path`` says where they came from."""
    header = [h.strip() for h in header]
    for col in required:
        if col not in header:
            found = ", ".join(repr(h[:20]) for h in header[:6]) or "none"
            raise InputError(f"{path} has no '{col}' column (columns found: {found}){_hint(header)}")
    twice = sorted({h for h in header if h in (*required, *optional) and header.count(h) > 1})
    if twice:  # which of the two is meant cannot be guessed, and a wrong guess would be silent
        raise InputError(f"{path} has the column(s) {', '.join(map(repr, twice))} more than once")
    width = len(header)
    ragged = sum(1 for line in lines if len(line) != width)
    if ragged:
        # Short lines are padded with empty cells, long ones cut: the row is answered either way.
        warnings.append(f"{ragged} line(s) of {path} have a wrong number of fields; kept, padded or cut")
    lines = [(line + [""] * width)[:width] for line in lines]
    table = {col: [line[k] for line in lines] for k, col in enumerate(header) if col}
    for col in optional:
        if col not in table:
            warnings.append(f"{path} has no '{col}' column: every row gets the fallback prompt")
            table[col] = [""] * len(lines)
    return table, len(lines), warnings


def _hint(header: list[str]) -> str:
    """What a header that lacks a required column most likely is, for the one-line error."""
    first = header[0] if header else ""
    if "\x00" in "".join(header):  # UTF-16 without its byte-order mark (with one, it is read as UTF-16)
        return "; the file looks UTF-16: save it as UTF-8"
    for sep, name in (("\t", "tab"), (";", "semicolon"), ("|", "pipe")):
        if len(header) == 1 and sep in first:
            return f"; the file looks {name}-separated: save it comma-separated"
    return ""


def read_test(path: Source) -> Table:
    """Read a test table (id, original_text, rewritten_text), a CSV path or a DataFrame, in input order."""
    table, _, warnings, encoding = read_table(path)
    rows = [
        Row(i, o[:MAX_CELL_CHARS], r[:MAX_CELL_CHARS])
        for i, o, r in zip(table["id"], table["original_text"], table["rewritten_text"])
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
