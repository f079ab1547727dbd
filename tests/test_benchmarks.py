"""The CPU benchmarks run end to end on a tiny model, so an API change cannot leave them silently broken."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def bench_predict(monkeypatch):
    # Imported by name: its spawned variants unpickle their target from the module.
    monkeypatch.syspath_prepend(str(BENCH))
    return importlib.import_module("bench_predict")


def test_bench_predict_batched_equals_one_row_on_a_tiny_model(bench_predict, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = bench_predict.main(["--random-init", tiny_model_dir, "--repeat", "1", "--max-new-tokens", "6",
                               "--max-batch-size", "8", "--threads", "1", "--json", str(out)])
    results = json.loads(out.read_text())
    assert code == 0 and [r["variant"] for r in results] == ["one row at a time", "batched scheduler"]
    one, batched = results
    assert one["rows"] == batched["rows"] == 32
    assert batched["new_tokens"] == one["new_tokens"] > 0 and batched["outputs"] == one["outputs"]
    assert "same ids both ways: yes" in capsys.readouterr().out
