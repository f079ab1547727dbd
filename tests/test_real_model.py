"""The README's first command, end to end, with the real Gemma 3 270M from its PyPI package.

The first run converts the GGUF into a cached HF folder (about a minute on 2 cores); later runs load
it in seconds. Marked slow so a quick local loop can skip it with -m 'not slow'; CI runs it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import assert_valid_submission, read_csv_rows

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_readme_predict_on_data_samples_with_embedded_model(tmp_path):
    out, report = tmp_path / "submission.csv", tmp_path / "report.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "prompt_recovery", "predict", str(ROOT / "data_samples" / "test.csv"),
         "-o", str(out), "--report", str(report), "--no-progress"],
        env=env, capture_output=True, text=True, timeout=1800,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    ids = [r[0] for r in read_csv_rows(ROOT / "data_samples" / "test.csv")[1:]]
    prompts = assert_valid_submission(out, ids)
    rep = json.loads(report.read_text())
    assert rep["model"]["name"] == "gemma-3-270m"
    assert rep["generated"] + rep["rule_based"] + rep["fallback"] == len(ids)
    assert rep["generated"] >= len(ids) // 2, rep["fallback_reasons"]
    assert all(len(p.split()) <= 60 for p in prompts)
