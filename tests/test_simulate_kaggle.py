"""The Kaggle simulator on a small fast case: the real predict and replicas over a simulated T4 and clock."""

from __future__ import annotations

import dataclasses
import importlib
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
ROWS = 40


@pytest.fixture(scope="module")
def sim():
    # Imported by name: the spawned replicas unpickle the simulated loader from the module.
    sys.path.insert(0, str(BENCH))
    try:
        yield importlib.import_module("simulate_kaggle")
    finally:
        sys.path.remove(str(BENCH))


def small(sim, name, **kw):
    return sim.Scenario(name, name, rows=ROWS, seed=3, **kw)


def prompts_of(folder: Path) -> list[str]:
    from prompt_recovery.submission import read_submission

    return [p for _, p in read_submission(str(folder / "submission.csv"))]


def prompt_lengths(sim, folder: Path) -> list[int]:
    """Each row's prompt in tokens, as the simulated model was given it (the texts, truncated as predict does)."""
    import pandas as pd

    from prompt_recovery.prompt import PromptBuilder, Template

    builder = PromptBuilder(sim.sim_tokenizer(), Template(), 1024)
    table = pd.read_csv(folder / "test.csv", dtype=str, keep_default_na=False)
    return [len(builder.build(a, b)) for a, b in zip(table["original_text"], table["rewritten_text"])]


@pytest.fixture(scope="module")
def normal(sim, tmp_path_factory):
    folder = tmp_path_factory.mktemp("normal")
    return sim.run(small(sim, "normal"), folder), folder


def test_every_row_is_filled_and_generated_within_the_limit(sim, normal):
    result, folder = normal
    assert result["mode"] == "replicas" and [r["exit_code"] for r in result["replicas"]] == [0, 0]
    assert result["filled"] == result["generated"] == result["rows"] == ROWS and result["fallback"] == 0
    assert sim.FALLBACK not in prompts_of(folder)
    # The merged candidates log holds every row's answer, numbered as in the whole input.
    log = [json.loads(line) for line in (folder / "submission.csv.candidates.jsonl").read_text().splitlines()[1:]]
    assert sorted(r["row"] for r in log) == list(range(ROWS))
    # The limit counts from the notebook's start: install, imports and each replica's load are on the clock.
    costs = sim.Costs()
    for rep in result["replicas"]:
        assert rep["start_s"] == costs.install_s + costs.notebook_imports_s
        assert rep["end_s"] >= rep["start_s"] + rep["load_s"] > rep["start_s"] + 60
    assert result["end_s"] <= result["limit_s"]


def test_a_dead_replica_costs_only_its_rows(sim, normal, tmp_path):
    before, before_folder = normal
    # Die half-way through replica 1's batches (the same batches as in the normal run: same seed, same dice).
    times = [t for t, _ in before["timeline"][1]]
    die_at = (times[0] + times[-1]) / 2
    answered_before = max(n for t, n in before["timeline"][1] if t <= die_at)
    dead = sim.run(small(sim, "dead", die_at=die_at), tmp_path)
    rep0, rep1 = dead["replicas"]
    assert rep1["exit_code"] == sim.DIED_EXIT and rep1["died_at"] == pytest.approx(die_at, abs=1e-3)
    assert rep0["exit_code"] == 0 and rep0["generated"] == rep0["rows"]
    assert dead["fallback"] == rep1["rows"] - answered_before > 0
    assert dead["fallback_reasons"] == {"replica died": dead["fallback"]}
    prompts, normal_prompts = prompts_of(tmp_path), prompts_of(before_folder)
    assert prompts[0::2] == normal_prompts[0::2]  # replica 0's rows exactly as without the death
    lost = [i for i, p in enumerate(prompts) if p == sim.FALLBACK]
    assert lost and all(i % 2 == 1 for i in lost)  # only replica 1's rows
    # What replica 1 wrote before it died is kept, as it was.
    kept = [i for i in range(1, ROWS, 2) if i not in lost]
    assert len(kept) == answered_before and all(prompts[i] == normal_prompts[i] for i in kept)
    assert dead["end_s"] <= dead["limit_s"]


def test_out_of_memory_on_the_longest_batches_splits_them_and_loses_no_row(sim, tmp_path):
    # An 8 GB card: short batches fit, the longest (about 1,000-token prompts, many rows) do not.
    result = sim.run(small(sim, "oom", max_batch_tokens=65536, card=sim.Card(memory_gib=8.0)), tmp_path)
    assert result["oom_events"] > 0 and result["oom_splits"] > 0
    assert result["filled"] == result["generated"] == ROWS and result["fallback_reasons"] == {}
    assert result["end_s"] <= result["limit_s"]


def replica_deadline(sim, sc) -> float:
    """Where each replica's predict stops: the notebook's limit less what passed before it, less the margin."""
    from prompt_recovery.config import BudgetArgs

    start = sc.costs.install_s + sc.costs.notebook_imports_s
    left = sc.notebook_limit_s - start  # a replica's budget is all of it (multigpu.shard_budget)
    return start + left - BudgetArgs(budget_per_row=left, time_limit=left).margin(1)


def test_a_model_too_slow_to_finish_falls_back_on_its_tail_and_ends_in_time(sim, tmp_path):
    sc = sim.Scenario("slow", "slow", rows=200, seed=3, costs=sim.Costs(slowdown=20.0), notebook_limit_s=900.0,
                      limit_s=1000.0)
    result = sim.run(sc, tmp_path)
    assert 0 < result["generated"] < 200 and result["fallback_reasons"] == {"deadline": result["fallback"]}
    # Each replica works up to its deadline and stops there (one decoding step past it at most).
    deadline = replica_deadline(sim, sc)
    assert all(deadline - 60 <= rep["end_s"] <= deadline + 2 for rep in result["replicas"])
    assert result["end_s"] <= result["limit_s"]
    # Rows are served shortest first: what falls back is each replica's longest prompts.
    lengths, prompts = prompt_lengths(sim, tmp_path), prompts_of(tmp_path)
    for k in (0, 1):
        mine = [(n, p == sim.FALLBACK) for n, p in list(zip(lengths, prompts))[k::2]]
        answered, lost = [n for n, f in mine if not f], [n for n, f in mine if f]
        assert lost and min(lost) >= max(answered)


def test_two_members_load_one_after_the_other_within_their_shares(sim, tmp_path):
    # Too little time for both: the first member (share 2) gets two thirds of what is left, the second the rest.
    sc = sim.Scenario("shares", "shares", rows=200, seed=3, members=(("mistral-7b", 2.0), ("gemma-7b", 1.0)),
                      costs=sim.Costs(load_s=20.0), notebook_limit_s=150.0, limit_s=200.0)
    result = sim.run(sc, tmp_path)
    assert result["filled"] == 200 and result["end_s"] <= result["limit_s"]
    start = sc.costs.install_s + sc.costs.notebook_imports_s
    deadline = start + (sc.notebook_limit_s - start) * 0.9  # predict's deadline: its budget less the margin
    first_end = start + (deadline - start) * 2 / 3
    for rep in result["replicas"]:
        report = json.loads((tmp_path / "submission.csv.shards" / f"shard{rep['replica']}_report.json").read_text())
        first, second = report["members"]
        assert (first["name"], second["name"]) == ("mistral-7b", "gemma-7b")
        assert first["requests"] == second["requests"] == rep["rows"]
        assert 0 < first["answered"] < rep["rows"] and second["answered"] > 0  # the first's share binds
        events = sim._events(tmp_path, rep["replica"])
        loads = [e for e in events if e["event"] == "load"]
        assert [e["model"] for e in loads] == ["Mistral-7B", "Gemma-7B"]
        # The first group's batches end within its share (one step's overrun at most); then the second loads.
        assert all(e["t"] <= first_end + 1.0 for e in events if e["event"] == "batch" and e["t"] <= loads[1]["t"])
        assert loads[1]["start"] <= first_end + 1.0
        assert rep["end_s"] <= deadline + 1.0


def test_a_long_load_counts_inside_the_limit(sim, tmp_path):
    # A 10-minute load in a 15-minute notebook: five minutes less install and imports are left to generate.
    sc = sim.Scenario("slow_load", "slow_load", rows=200, seed=3, costs=sim.Costs(load_s=600.0, slowdown=5.0),
                      notebook_limit_s=900.0, limit_s=1000.0)
    result = sim.run(sc, tmp_path)
    assert result["filled"] == 200 and 0 < result["generated"] < 200
    first_batch = min(t for points in result["timeline"].values() for t, _ in points)
    assert first_batch >= sc.costs.install_s + sc.costs.notebook_imports_s + 600.0
    deadline = replica_deadline(sim, sc)
    assert all(deadline - 60 <= rep["end_s"] <= deadline + 2 for rep in result["replicas"])


def test_one_gpu_runs_predict_in_process(sim, tmp_path):
    result = sim.run(dataclasses.replace(small(sim, "single"), replicas=1), tmp_path)
    assert result["mode"] == "single" and result["filled"] == result["generated"] == ROWS


def test_the_command_writes_its_table_json_and_picture(sim, tmp_path, capsys):
    out, png = tmp_path / "sim.json", tmp_path / "sim.png"
    assert sim.main(["--normal", "--dead", "--rows", "12", "--die-at", "200", "--work", str(tmp_path / "w"),
                     "--json", str(out), "--plot", str(png)]) == 0
    results = json.loads(out.read_text())["results"]
    assert [r["scenario"] for r in results] == ["normal", "dead"]
    for r in results:
        assert {"rows", "filled", "generated", "fallback", "end_s", "limit_s"} <= set(r)
        assert r["rows"] == r["filled"] == 12
    assert results[1]["replicas"][1]["died_at"] == pytest.approx(200.0)
    assert png.stat().st_size > 10_000
    assert "| normal: " in capsys.readouterr().out


def test_a_small_slow_shard_uses_its_time_after_the_calibration_row(sim, tmp_path):
    # The case the simulator found: 20 rows a replica, a model 40x slower, a 15-minute notebook. Pricing every
    # row of the next batch at its widest prompt made no row "fit" after the one-row calibration (2 of 40).
    sc = sim.Scenario("small", "small slow shard", rows=40, seed=0, costs=sim.Costs(slowdown=40.0),
                      notebook_limit_s=900.0, limit_s=1000.0)
    result = sim.run(sc, tmp_path)
    assert result["filled"] == 40 and result["generated"] >= 20
