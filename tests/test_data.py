"""Reading test tables: blank lines are no rows (in the package's reader and the notebook's), a line of only
commas is one, and a DataFrame reads as the same strings with the same warnings as its CSV."""

from __future__ import annotations

import ast
import csv
import io
from pathlib import Path

import pytest

from prompt_recovery.data import InputError, read_table, read_test

NOTEBOOK_PY = Path(__file__).resolve().parents[1] / "kaggle_notebook" / "submission.py"

HEADER = "id,original_text,rewritten_text"
# (file text, ids a reader must return, blank lines it must report)
CASES = {
    "between": (f"{HEADER}\n1,a,b\n\n2,c,d\n\n\n3,e,f\n", ["1", "2", "3"], 3),
    "trailing": (f"{HEADER}\n1,a,b\n2,c,d\n\n\n", ["1", "2"], 2),
    "crlf": (f"{HEADER}\r\n1,a,b\r\n\r\n2,c,d\r\n\r\n", ["1", "2"], 2),
    "white space": (f"{HEADER}\n1,a,b\n   \n\t\n2,c,d\n", ["1", "2"], 2),
    "before header": (f"\n\n{HEADER}\n1,a,b\n", ["1"], 2),
    "only commas": (f"{HEADER}\n1,a,b\n,,\n2,c,d\n", ["1", "", "2"], 0),
    "blank line inside quotes": (f'{HEADER}\n1,"para one\n\npara two",b\n2,c,d\n', ["1", "2"], 0),
    "none": (f"{HEADER}\n1,a,b\n", ["1"], 0),
}


def notebook_reader():
    """The notebook's standard-library reader, taken from its .py twin (the cell itself writes files)."""
    tree = ast.parse(NOTEBOOK_PY.read_text(encoding="utf-8"))
    funcs = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in ("is_blank_line", "read_test_ids")]
    assert len(funcs) == 2
    namespace = {"csv": csv}
    exec(compile(ast.Module(body=funcs, type_ignores=[]), str(NOTEBOOK_PY), "exec"), namespace)
    return namespace["read_test_ids"]


@pytest.mark.parametrize("name", list(CASES))
def test_blank_lines_are_no_rows_in_both_readers(name, tmp_path, capsys):
    text, ids, blank = CASES[name]
    path = tmp_path / "test.csv"
    path.write_bytes(text.encode("utf-8"))
    table = read_test(str(path))
    assert [r.id for r in table.rows] == ids
    said = [w for w in table.warnings if "blank line" in w]
    assert said == ([f"{blank} blank line(s) of {path} skipped; they are no rows"] if blank else [])
    capsys.readouterr()
    assert notebook_reader()(str(path)) == ids
    out = capsys.readouterr().out
    assert (f"{blank} blank line(s)" in out) if blank else ("blank line" not in out)


def test_a_line_of_only_commas_is_a_row_with_a_blank_id(tmp_path):
    path = tmp_path / "test.csv"
    path.write_text(f"{HEADER}\n1,a,b\n,,\n")
    table = read_test(str(path))
    assert table.rows[1].id == "" and not table.rows[1].usable
    assert any("blank id" in w for w in table.warnings)


def frame_of(text: str):
    import pandas as pd

    return pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)


@pytest.mark.parametrize("text", [
    f"{HEADER}\n007,NaN,x\n1e5,,y\n 12 ,\"a, b\",\"line\nbreak\"\n",
    "rewritten_text,extra,id\nr1,z,a\nr2,z,b\n",  # reordered, an extra column, no original_text
    f"{HEADER}\n1,same,same\n1,dup,dup\n",
])
def test_a_dataframe_reads_as_its_csv(text, tmp_path):
    path = tmp_path / "t.csv"
    path.write_text(text)
    from_csv, from_frame = read_test(str(path)), read_test(frame_of(text))
    assert from_frame.rows == from_csv.rows
    assert from_frame.warnings == [w.replace(str(path), "the DataFrame") for w in from_csv.warnings]


def test_dataframe_cells_become_their_strings_and_missing_values_empty():
    import numpy as np
    import pandas as pd

    frame = pd.DataFrame({"id": pd.array([7, 8, None], dtype="Int64"), "original_text": ["a", np.nan, "NaN"],
                          "rewritten_text": ["x", None, 3.5]})
    table = read_test(frame)
    assert [(r.id, r.original_text, r.rewritten_text) for r in table.rows] == [
        ("7", "a", "x"), ("8", "", ""), ("", "NaN", "3.5")]
    assert any("empty text" in w for w in table.warnings) and any("blank id" in w for w in table.warnings)


def test_a_dataframe_without_an_id_column_or_not_a_table_is_an_input_error():
    import pandas as pd

    with pytest.raises(InputError, match="the DataFrame has no 'id' column"):
        read_test(pd.DataFrame({"key": [1]}))
    with pytest.raises(InputError, match="CSV path or a pandas DataFrame"):
        read_table([["id"], ["1"]])


def test_a_quote_never_closed_loses_no_row_and_says_where(tmp_path):
    from prompt_recovery.data import read_test

    path = tmp_path / "t.csv"
    path.write_text('id,original_text,rewritten_text\nx0,"A\nquoted, multi-line text",B\n'
                    'x1,"The cat sat.,The feline sat.\nx2,Buy milk.,Milk!\nx3,a "b" c,d\n')
    table = read_test(str(path))
    assert [r.id for r in table.rows] == ["x0", "x1", "x2", "x3"]
    assert table.rows[0].original_text == "A\nquoted, multi-line text"  # a closed quote still spans lines
    assert (table.rows[2].original_text, table.rows[2].rewritten_text) == ("Buy milk.", "Milk!")
    assert any("line 4 opens a quote that is never closed" in w for w in table.warnings)
