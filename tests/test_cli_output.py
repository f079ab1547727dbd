"""What a predict run shows: progress, the summary and warnings about the user's input on the terminal;
libraries' warnings (warnings.warn, transformers' logging, other libraries' logging) in OUTPUT.log."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings

from conftest import assert_valid_submission, write_test_csv

from prompt_recovery import model as model_lib
from prompt_recovery.cli import main

LIBRARY_LINES = ("warnings.warn", "Warning:", "FutureWarning", "UserWarning", "Position ids", "py.warnings")


def test_library_warnings_go_to_the_log_file_and_input_warnings_to_the_terminal(tiny_model_dir, tmp_path, capsys,
                                                                                 monkeypatch):
    from transformers.utils import logging as hf_logging

    real_load = model_lib.load

    def noisy_load(args):
        # The three ways libraries speak: warnings.warn, transformers' own logger, plain logging.
        warnings.warn("a library's deprecation notice", FutureWarning, stacklevel=1)
        hf_logging.get_logger("transformers.modeling_utils").warning("transformers says something")
        logging.getLogger("peft.tuners").warning("peft says something")
        return real_load(args)

    monkeypatch.setattr(model_lib, "load", noisy_load)
    ids = write_test_csv(tmp_path / "t.csv", n=3) + ["empty"]
    with open(tmp_path / "t.csv", "a") as f:
        f.write("empty,,\n")  # an input problem the user can fix: it must stay on the terminal
    out = tmp_path / "s.csv"
    code = main(["predict", str(tmp_path / "t.csv"), "-o", str(out), "--model", tiny_model_dir,
                 "--adapter", "none", "--no-progress", "--max-new-tokens", "4"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert_valid_submission(out, ids)
    for said in ("deprecation notice", "transformers says", "peft says"):
        assert said not in err
    assert "empty text" in err and "wrote " in err
    assert err.rstrip().splitlines()[-1] == f"library warnings and details: {out}.log"
    log = (tmp_path / "s.csv.log").read_text()
    for said in ("deprecation notice", "transformers says", "peft says"):
        assert said in log


def test_a_run_with_nothing_hidden_names_no_log_file(tmp_path, capsys):
    (tmp_path / "t.csv").write_text("id,original_text,rewritten_text\n\n")  # a header and a blank line
    code = main(["predict", str(tmp_path / "t.csv"), "-o", str(tmp_path / "s.csv"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 0 and "1 blank line(s)" in err  # the user's input problem is on the terminal
    assert "library warnings" not in err


def test_a_real_run_with_a_soft_prompt_keeps_peft_and_transformers_off_the_terminal(tiny_model_dir, tmp_path):
    from test_model import make_adapter

    make_adapter(tiny_model_dir, "prompt_tuning", tmp_path / "pt")
    ids = write_test_csv(tmp_path / "t.csv", n=4)
    out = tmp_path / "s.csv"
    proc = subprocess.run(
        [sys.executable, "-m", "prompt_recovery", "predict", str(tmp_path / "t.csv"), "-o", str(out),
         "--model", tiny_model_dir, "--adapter", str(tmp_path / "pt"), "--max-new-tokens", "4", "--no-progress"],
        capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": ""}, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    assert_valid_submission(out, ids)
    assert not [line for line in proc.stderr.splitlines() if any(k in line for k in LIBRARY_LINES)], proc.stderr
    # Whether the libraries say anything at all depends on the machine (bitsandbytes warns at import on some);
    # what they say goes to the log, which the last line names.
    log_file = tmp_path / "s.csv.log"
    log = log_file.read_text() if log_file.exists() else ""
    # (the log also holds our own warnings, which the terminal showed: those alone do not name it)
    if any(w in line and " prompt_recovery" not in line for line in log.splitlines() for w in ("WARNING", "ERROR")):
        assert proc.stderr.rstrip().endswith(f"library warnings and details: {out}.log")
    # The engine serves soft prompts itself: peft's forward, and its position-ids warning, never run.
    assert "Position ids are not supported" not in log


def test_top_level_help_says_what_the_tool_does_and_lists_every_command_in_order(capsys):
    import pytest as _pytest

    from prompt_recovery.cli import COMMANDS, DESCRIPTION

    with _pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "rewrite prompt" in out and "submission.csv" in out
    listed = [line.split()[0] for line in DESCRIPTION.splitlines() if line.startswith("  ")]
    assert sorted(listed) == sorted(COMMANDS)
    assert listed.index("generate-data") < listed.index("train") < listed.index("predict")
