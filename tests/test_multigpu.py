"""Replica planning, and sharded prediction merged back in input order (run on CPU processes here)."""

from __future__ import annotations

import pytest
from conftest import assert_valid_submission, write_test_csv

from prompt_recovery.config import GenerationArgs, ModelArgs, PredictArgs
from prompt_recovery.multigpu import plan, predict_sharded, weight_bytes
from prompt_recovery.predict import predict

GiB = 2**30


@pytest.mark.parametrize("n, per_gpu, model, want", [
    (0, None, None, "single"),
    (1, 16 * GiB, 1 * GiB, "single"),
    (2, 16 * GiB, 1 * GiB, "replicas"),  # Gemma 270M or a 2B in 4-bit: a copy per T4
    (2, 16 * GiB, 14 * GiB, "spread"),  # a 7B in fp16 must span both cards
    (2, 16 * GiB, None, "spread"),  # unknown size: spreading always fits
])
def test_plan(n, per_gpu, model, want):
    assert plan(n, per_gpu, model) == want


def test_weight_bytes_accounts_for_quantization(tiny_model_dir):
    full = weight_bytes(tiny_model_dir, "none")
    assert full and weight_bytes(tiny_model_dir, "4bit") == full // 4
    assert weight_bytes("/no/such/folder", "none") is None


def test_sharded_prediction_equals_one_process_in_input_order(tiny_model_dir, tmp_path):
    ids = write_test_csv(tmp_path / "t.csv", ids=["b", "007", "a", "007", "x", "1", "z"])
    common = dict(test_csv=str(tmp_path / "t.csv"), progress=False,
                  model=ModelArgs(model=tiny_model_dir, adapter="none"), generation=GenerationArgs(max_new_tokens=5))
    single = PredictArgs(output=str(tmp_path / "single.csv"), **common)
    predict(single)
    sharded = PredictArgs(output=str(tmp_path / "sharded.csv"), **common)
    summary = predict_sharded(sharded, [None, None], fallback="Improve the text to this.")
    assert summary["exit_codes"] == [0, 0] and summary["merged"] == len(ids)
    # Greedy decoding is deterministic: two half-size replicas give the rows one process gives.
    sharded_prompts = assert_valid_submission(tmp_path / "sharded.csv", ids)
    assert sharded_prompts == assert_valid_submission(tmp_path / "single.csv", ids)


def test_a_dead_shard_leaves_its_rows_on_the_fallback(tiny_model_dir, tmp_path):
    ids = write_test_csv(tmp_path / "t.csv", n=6)
    args = PredictArgs(test_csv=str(tmp_path / "t.csv"), output=str(tmp_path / "s.csv"), progress=False,
                       model=ModelArgs(model=str(tmp_path / "missing-model"), adapter="none"))
    summary = predict_sharded(args, [None, None], fallback="Improve the text to this.")
    assert summary["merged"] == 6  # each shard wrote its own fallback file before failing on the model
    assert set(assert_valid_submission(tmp_path / "s.csv", ids)) == {"Improve the text to this."}
