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
    steps = rep["startup"]  # where a warm start's seconds went, step by step
    assert {"imports_s", "resolve_s", "tokenizer_s", "weights_s", "adapters_s"} <= set(steps)
    assert all(v >= 0 for v in steps.values() if v is not None)


@pytest.mark.slow
def test_the_converted_gemma_tokenizer_read_straight_from_its_file_is_the_same_tokenizer():
    from transformers import AutoTokenizer

    from prompt_recovery.config import ModelArgs
    from prompt_recovery.model import load_tokenizer, resolve

    folder, _ = resolve(ModelArgs())
    auto, fast = AutoTokenizer.from_pretrained(folder, local_files_only=True), load_tokenizer(folder)
    assert type(fast) is not type(auto)  # the fast path ran (Gemma's class is what AutoTokenizer builds)
    texts = [r[1] for r in read_csv_rows(ROOT / "data_samples" / "train.csv")[1:]]
    texts += ["  two  spaces\n\n<start_of_turn>user\nhi<end_of_turn>", "é 中文 🙂 <pad><eos>", ""]
    for text in texts:
        ids = auto(text)["input_ids"]
        assert fast(text)["input_ids"] == ids
        assert fast.decode(ids) == auto.decode(ids)
        assert fast.decode(ids, skip_special_tokens=True) == auto.decode(ids, skip_special_tokens=True)
    auto.padding_side = fast.padding_side = "left"
    assert fast(texts[:4], padding=True) == auto(texts[:4], padding=True)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id", "all_special_ids", "chat_template"):
        assert getattr(fast, name) == getattr(auto, name), name
    assert len(fast) == len(auto)
