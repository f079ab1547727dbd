"""Bad input through the CLI on a tiny model: a one-line error (exit 2, nothing written) or a documented
fallback, never a traceback and never a lost row."""

from __future__ import annotations

import csv
import json

import pytest
from conftest import assert_valid_submission, read_csv_rows, write_test_csv

from prompt_recovery.cli import main
from prompt_recovery.predict import shipped_text


@pytest.fixture
def run(tiny_model_dir, tmp_path, capsys):
    def _run(csv_path, *extra):
        out = tmp_path / "submission.csv"
        code = main(["predict", str(csv_path), "-o", str(out), "--model", tiny_model_dir, "--no-progress",
                     "--report", str(tmp_path / "report.json"), *extra])
        err = capsys.readouterr().err
        return code, out, err

    return _run


def write(path, text, encoding="utf-8"):
    path.write_bytes(text.encode(encoding))
    return path


def report(tmp_path):
    return json.loads((tmp_path / "report.json").read_text())


def test_plain_run_fills_every_row(run, tmp_path):
    ids = write_test_csv(tmp_path / "test.csv", n=7)
    code, out, err = run(tmp_path / "test.csv")
    assert code == 0, err
    assert_valid_submission(out, ids)
    assert "7 rows" in err


def test_no_id_column_is_one_line_exit_2_and_nothing_written(run, tmp_path):
    code, out, err = run(write(tmp_path / "t.csv", "key,original_text,rewritten_text\n1,a,b\n"))
    assert code == 2 and not out.exists()
    assert err.strip().count("\n") == 0 and "no 'id' column" in err and "Traceback" not in err


@pytest.mark.parametrize("content", [b"", b"\x00\x01\x02\xff\xfe" * 50])
def test_unreadable_file_is_exit_2(run, tmp_path, content):
    path = tmp_path / "t.csv"
    path.write_bytes(content)
    code, out, err = run(path)
    assert code == 2 and not out.exists() and "Traceback" not in err
    assert err.strip().count("\n") == 0


def test_missing_file_is_exit_2(run, tmp_path):
    code, out, err = run(tmp_path / "nope.csv")
    assert code == 2 and "no such file" in err and not out.exists()


def test_missing_text_column_gives_fallbacks_with_warning(run, tmp_path):
    code, out, err = run(write(tmp_path / "t.csv", "id,original_text\n7,hello\n8,world\n"))
    assert code == 0
    prompts = assert_valid_submission(out, ["7", "8"])
    assert set(prompts) == {shipped_text("mean_prompt.txt")}
    assert "rewritten_text" in err


def test_empty_and_nan_texts_fall_back_others_generate(run, tmp_path):
    path = write(tmp_path / "t.csv", 'id,original_text,rewritten_text\n1,,x\n2,NaN,nan\n3,"Hello there.","Hi!"\n4\n')
    code, out, err = run(path)
    assert code == 0
    prompts = assert_valid_submission(out, ["1", "2", "3", "4"])
    fb = shipped_text("mean_prompt.txt")
    assert prompts[0] == fb and prompts[3] == fb
    assert "empty text" in err
    # "NaN" is text, not a missing value: it is read as the string it is.
    assert report(tmp_path)["fallback_reasons"].get("empty_text") == 2


def test_ids_kept_as_strings_with_duplicates_in_place(run, tmp_path):
    ids = ["007", "0x1F", "007", "1e5", " 12 ", "-1", ""]
    write_test_csv(tmp_path / "t.csv", ids=ids)
    code, out, err = run(tmp_path / "t.csv")
    assert code == 0
    assert_valid_submission(out, ids)
    assert "duplicate ids" in err


def test_bom_crlf_quoted_newlines_extra_and_reordered_columns(run, tmp_path):
    text = ('\ufeffrewritten_text,extra,id,original_text\r\n"line one\r\nline two",x,001,"orig, with comma"\r\n'
            '"A poem\nin lines",y,002,"plain"\r\n')
    code, out, err = run(write(tmp_path / "t.csv", text))
    assert code == 0, err
    assert_valid_submission(out, ["001", "002"])


def test_blank_lines_are_no_rows_and_a_line_of_commas_is_one(run, tmp_path):
    text = "id,original_text,rewritten_text\r\n\r\n1,a b,c d\r\n\r\n   \r\n,,\r\n2,e f,g h\r\n\r\n\r\n"
    code, out, err = run(write(tmp_path / "t.csv", text))
    assert code == 0, err
    prompts = assert_valid_submission(out, ["1", "", "2"])
    assert prompts[1] == shipped_text("mean_prompt.txt")  # the empty row is answered, with the fallback
    assert "5 blank line(s)" in err and "1 row(s) have a blank id" in err


def test_latin1_is_read_with_warning(run, tmp_path):
    text = "id,original_text,rewritten_text\n1,café au lait,Caffè!\n"
    code, out, err = run(write(tmp_path / "t.csv", text, "latin-1"))
    assert code == 0 and "latin-1" in err
    assert_valid_submission(out, ["1"])


def test_header_only_gives_header_only_output(run, tmp_path):
    code, out, _err = run(write(tmp_path / "t.csv", "id,original_text,rewritten_text\n"))
    assert code == 0
    assert read_csv_rows(out) == [["id", "rewrite_prompt"]]


def test_too_many_fields_keeps_the_row(run, tmp_path):
    code, out, _err = run(write(tmp_path / "t.csv", "id,original_text,rewritten_text\n1,a,b,c\n2,d,e\n"))
    assert code == 0
    assert_valid_submission(out, ["1", "2"])


def test_huge_texts_are_truncated_not_fatal(run, tmp_path):
    path = tmp_path / "t.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "original_text", "rewritten_text"])
        w.writerow(["big", "word " * 400_000, "other " * 400_000])
        w.writerow(["small", "a b c", "d e f"])
    code, out, err = run(path, "--max-input-tokens", "256")
    assert code == 0, err
    assert_valid_submission(out, ["big", "small"])
    assert max(b["padded_len"] for b in report(tmp_path)["batches"]) <= 256


def test_unchanged_rows_get_the_rule_prompt(run, tmp_path):
    code, out, _err = run(write(tmp_path / "t.csv", 'id,original_text,rewritten_text\n1,"Same  text.","Same text. "\n'))
    assert code == 0
    assert "exactly as it is" in assert_valid_submission(out, ["1"])[0]


def test_fallback_prompt_file_and_suffix(run, tmp_path):
    (tmp_path / "fb.txt").write_text("Improve the text to this.\n")
    (tmp_path / "suffix.txt").write_text("  Make it lucid.  ")
    write_test_csv(tmp_path / "t.csv", n=3)
    code, out, err = run(tmp_path / "t.csv", "--fallback-prompt-file", str(tmp_path / "fb.txt"),
                         "--suffix-file", str(tmp_path / "suffix.txt"), "--max-new-tokens", "4")
    assert code == 0, err
    prompts = assert_valid_submission(out, ["0000", "0001", "0002"])
    # The tiny model (fixed seed) answers every row within the default budget: a run where rows fell back
    # would show nothing about the suffix, so it fails here instead of passing vacuously.
    assert report(tmp_path)["generated"] == 3 and report(tmp_path)["fallback"] == 0
    for p in prompts:
        assert p != "Improve the text to this."
        assert p.startswith("Rewrite this text ") and len(p) > len("Rewrite this text  Make it lucid.")
        assert p.endswith(" Make it lucid.") and p.count("Make it lucid.") == 1  # appended once, normalised
    # The fallback file's prompt is the one rows get when the model is not run at all.
    code, out, err = run(tmp_path / "t.csv", "--fallback-prompt-file", str(tmp_path / "fb.txt"),
                         "--suffix-file", str(tmp_path / "suffix.txt"), "--time-limit", "0.001",
                         "--safety-margin", "0")
    assert code == 0, err
    assert assert_valid_submission(out, ["0000", "0001", "0002"]) == ["Improve the text to this."] * 3


def test_bad_option_values_are_one_line_errors(run, tmp_path):
    write_test_csv(tmp_path / "t.csv", n=2)
    code, out, err = run(tmp_path / "t.csv", "--budget-per-row", "0")
    assert code == 2 and "budget_per_row" in err and not out.exists()
    code, out, err = run(tmp_path / "t.csv", "--fallback-prompt", "   ")
    assert code == 2 and "blank" in err


def test_a_template_too_long_for_max_input_tokens_is_one_line_exit_2(run, tmp_path):
    ids = write_test_csv(tmp_path / "t.csv", n=2)
    code, out, err = run(tmp_path / "t.csv", "--max-input-tokens", "64")  # the template alone takes ~50
    assert code == 2, err
    assert err.strip().count("\n") == 0 and "Traceback" not in err
    assert "leaves no room for the texts" in err and "--max-input-tokens" in err
    assert_valid_submission(out, ids)  # the fallback file written before the model loaded stays


def test_a_sentencepiece_style_model_without_a_pad_token_generates_every_row(tmp_path, capsys):
    from conftest import make_metaspace_tokenizer, make_model

    tok = make_metaspace_tokenizer()  # Llama 2 / Mistral style: Metaspace, byte fallback, no pad token
    make_model(tok).save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    ids = write_test_csv(tmp_path / "t.csv", n=4)
    out = tmp_path / "s.csv"
    code = main(["predict", str(tmp_path / "t.csv"), "-o", str(out), "--model", str(tmp_path / "model"),
                 "--adapter", "none", "--no-progress", "--max-new-tokens", "6",
                 "--report", str(tmp_path / "report.json")])
    assert code == 0, capsys.readouterr().err
    assert_valid_submission(out, ids)
    assert report(tmp_path)["generated"] == 4


def test_missing_model_is_exit_2_with_fallback_file_in_place(tmp_path, capsys):
    ids = write_test_csv(tmp_path / "t.csv", n=3)
    out = tmp_path / "s.csv"
    code = main(["predict", str(tmp_path / "t.csv"), "-o", str(out), "--model", str(tmp_path / "none")])
    assert code == 2 and "model not found" in capsys.readouterr().err
    assert_valid_submission(out, ids)  # on Kaggle even this still scores


def test_output_paths_that_would_fail_or_destroy_the_input_are_refused_before_any_work(
        tiny_model_dir, tmp_path, capsys, monkeypatch):
    from prompt_recovery import model as model_lib

    def no_load(*a, **k):
        raise AssertionError("the model must not load for a refused run")

    monkeypatch.setattr(model_lib, "load", no_load)
    src = tmp_path / "t.csv"
    write_test_csv(src, n=2)
    before = src.read_bytes()
    (tmp_path / "folder").mkdir()
    cases = [
        (["-o", str(src)], "is the input file"),
        (["-o", str(tmp_path / "folder")], "is a folder"),
        (["-o", str(tmp_path / "s.csv"), "--report", str(tmp_path / "folder")], "is a folder"),
        (["-o", str(tmp_path / "s.csv"), "--report", str(src)], "is the input file"),
        (["-o", str(tmp_path / "s.csv"), "--report", str(tmp_path / "s.csv")], "same file"),
        (["-o", str(tmp_path / "s.csv"), "--template", str(tmp_path / "nope.json")], "cannot read template"),
    ]
    for extra, message in cases:
        code = main(["predict", str(src), "--model", tiny_model_dir, "--no-progress", *extra])
        err = capsys.readouterr().err
        assert code == 2 and message in err and err.strip().count("\n") == 0 and "Traceback" not in err, (extra, err)
        assert src.read_bytes() == before
        # Paths are refused before anything is written; a bad template, like a missing model, after the
        # all-fallback file (which then stays, valid) but before any model loads.
        assert (tmp_path / "s.csv").exists() == ("--template" in extra)
        (tmp_path / "s.csv").unlink(missing_ok=True)


def test_a_report_in_a_folder_not_yet_made_is_written(run, tmp_path):
    ids = write_test_csv(tmp_path / "t.csv", n=2)
    code, out, err = run(tmp_path / "t.csv", "--report", str(tmp_path / "new" / "deeper" / "r.json"))
    assert code == 0, err
    assert json.loads((tmp_path / "new" / "deeper" / "r.json").read_text())["rows"] == 2
    assert_valid_submission(out, ids)


@pytest.mark.parametrize("text, message", [
    ("id,original_text,rewritten_text,id\n1,a,b,2\n", "'id' more than once"),
    ("id\toriginal_text\trewritten_text\n1\ta\tb\n", "tab-separated"),
    ("id;original_text;rewritten_text\n1;a;b\n", "semicolon-separated"),
])
def test_tables_that_cannot_be_read_right_say_why(run, tmp_path, text, message):
    code, out, err = run(write(tmp_path / "t.csv", text))
    assert code == 2 and message in err and err.strip().count("\n") == 0 and not out.exists()


def test_utf16_with_a_byte_order_mark_is_read(run, tmp_path):
    code, out, err = run(write(tmp_path / "t.csv", "id,original_text,rewritten_text\nü1,a cat,the cat\n", "utf-16"))
    assert code == 0, err
    assert read_csv_rows(out)[1][0] == "ü1"


def test_a_folder_as_input_says_so(run, tmp_path):
    code, out, err = run(tmp_path)
    assert code == 2 and "it is a folder" in err
