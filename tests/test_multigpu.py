"""Replica planning, and sharded prediction merged back in input order (run on CPU processes here)."""

from __future__ import annotations

import json
import os

import pytest
from conftest import assert_valid_submission, read_csv_rows, write_test_csv

from prompt_recovery.config import BudgetArgs, GenerationArgs, ModelArgs, PredictArgs
from prompt_recovery.data import read_test
from prompt_recovery.multigpu import REPLICA_ENV, plan, predict_sharded, shard_budget, weight_bytes
from prompt_recovery.predict import predict
from prompt_recovery.submission import CandidateLog, input_fingerprint

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
    # 1000 s a row: the whole run has 7000 s; a replica's own 3 or 4 rows would give it only 3000 or 4000.
    sharded = PredictArgs(output=str(tmp_path / "sharded.csv"), budget=BudgetArgs(budget_per_row=1000.0), **common)
    summary = predict_sharded(sharded, [None, None], fallback="Improve the text to this.")
    assert summary["exit_codes"] == [0, 0] and summary["merged"] == len(ids)
    # Every replica ran to the one absolute end of the whole run, less only the time it took to start.
    assert [b["end_wall"] for b in summary["budgets"]] == [summary["end_wall"]] * 2
    for k in range(2):
        used = json.loads((tmp_path / "sharded.csv.shards" / f"shard{k}_report.json").read_text())["budget_s"]
        assert used == pytest.approx(summary["budgets"][k]["time_limit"]) and 6000 < used <= 7000
    # Greedy decoding is deterministic: two half-size replicas give the rows one process gives.
    sharded_prompts = assert_valid_submission(tmp_path / "sharded.csv", ids)
    assert sharded_prompts == assert_valid_submission(tmp_path / "single.csv", ids)
    # ...and one candidates file for the whole input, rows numbered as in it, as one process writes it.
    rows = read_test(str(tmp_path / "t.csv")).rows
    fp = input_fingerprint(ids, [(r.original_text, r.rewritten_text) for r in rows])
    def texts(out):
        return sorted((r["row"], r["text"]) for r in CandidateLog(CandidateLog.path_for(out), fp).load(ids))
    assert texts(str(tmp_path / "sharded.csv")) == texts(str(tmp_path / "single.csv"))
    assert len(texts(str(tmp_path / "sharded.csv"))) == len(ids)


def test_a_dead_shard_leaves_its_rows_on_the_fallback(tiny_model_dir, tmp_path):
    ids = write_test_csv(tmp_path / "t.csv", n=6)
    args = PredictArgs(test_csv=str(tmp_path / "t.csv"), output=str(tmp_path / "s.csv"), progress=False,
                       model=ModelArgs(model=str(tmp_path / "missing-model"), adapter="none"))
    summary = predict_sharded(args, [None, None], fallback="Improve the text to this.")
    assert summary["merged"] == 6  # each shard wrote its own fallback file before failing on the model
    assert set(assert_valid_submission(tmp_path / "s.csv", ids)) == {"Improve the text to this."}


def test_a_replica_budget_is_what_is_left_of_the_whole_run():
    budget = BudgetArgs(budget_per_row=10.0, time_limit=None)
    # 100 rows in all (1000 s), 50 in this replica, started 30 s into the run.
    got = shard_budget(budget, end_wall=1000.0, rows=50, now=30.0)
    assert got.seconds(50) == pytest.approx(970.0) and got.time_limit == pytest.approx(970.0)
    assert shard_budget(budget, end_wall=1000.0, rows=50, now=2000.0).seconds(50) > 0  # spent: falls back at once


def loader_killing_replica_1(model_args):
    """model.load in replica 0; replica 1 dies the way a CUDA crash or the OOM killer ends a process."""
    if os.environ.get(REPLICA_ENV) == "1":
        os._exit(3)
    from prompt_recovery.model import load

    return load(model_args)


def loader_hanging_replica_1(model_args):
    """Replica 1's model hangs in its first forward, as a CUDA call that never returns would."""
    import time as _time

    from prompt_recovery.model import load

    loaded = load(model_args)
    if os.environ.get(REPLICA_ENV) == "1":
        loaded.model.register_forward_pre_hook(lambda *a: _time.sleep(600))
    return loaded


def test_a_hung_replica_is_stopped_at_the_end_of_the_run(tiny_model_dir, tmp_path, monkeypatch):
    import time as _time

    from prompt_recovery import multigpu

    monkeypatch.setattr(multigpu, "REPLICA_GRACE_S", 1.0)
    ids = write_test_csv(tmp_path / "t.csv", n=6)
    args = PredictArgs(test_csv=str(tmp_path / "t.csv"), output=str(tmp_path / "s.csv"), progress=False,
                       model=ModelArgs(model=tiny_model_dir, adapter="none"), budget=BudgetArgs(time_limit=20),
                       generation=GenerationArgs(max_new_tokens=4))
    start = _time.monotonic()
    summary = predict_sharded(args, [None, None], fallback="FALLBACK SENTINEL", loader=loader_hanging_replica_1)
    assert _time.monotonic() - start < 20 + 1 + 10  # the run's end, the grace, the stop: not the 600 s hang
    assert summary["exit_codes"][0] == 0 and summary["exit_codes"][1] != 0
    prompts = assert_valid_submission(tmp_path / "s.csv", ids)
    assert [p == "FALLBACK SENTINEL" for p in prompts] == [False, True] * 3


def test_a_dead_replica_costs_only_its_own_rows(tiny_model_dir, tmp_path):
    ids = write_test_csv(tmp_path / "t.csv", n=6)
    fallback = "FALLBACK SENTINEL"
    args = PredictArgs(test_csv=str(tmp_path / "t.csv"), output=str(tmp_path / "s.csv"), progress=False,
                       model=ModelArgs(model=tiny_model_dir, adapter="none"),
                       generation=GenerationArgs(max_new_tokens=4))
    summary = predict_sharded(args, [None, None], fallback=fallback, loader=loader_killing_replica_1)
    assert summary["exit_codes"] == [0, 3]
    prompts = assert_valid_submission(tmp_path / "s.csv", ids)
    assert [p == fallback for p in prompts] == [False, True] * 3  # replica 0 has rows 0, 2, 4
    replica0 = read_csv_rows(tmp_path / "s.csv.shards" / "shard0_submission.csv")[1:]
    assert prompts[0::2] == [r[1] for r in replica0]
