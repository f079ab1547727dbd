"""The Kaggle notebook, executed top to bottom by a real kernel, offline, in a folder laid out like /kaggle."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import assert_valid_submission, write_test_csv

from prompt_recovery.bundle import bundle
from prompt_recovery.config import BundleArgs
from prompt_recovery.notebook import render

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "kaggle_notebook" / "submission.ipynb"


def test_notebook_is_generated_from_its_py_twin():
    assert NOTEBOOK.read_text(encoding="utf-8") == render(NOTEBOOK.with_suffix(".py")), (
        "kaggle_notebook/submission.ipynb is stale: run python -m prompt_recovery.notebook"
    )


def kaggle_layout(tmp_path, model_dir, adapter=None, members=None):
    kaggle = tmp_path / "kaggle"
    (kaggle / "working").mkdir(parents=True)
    (kaggle / "input" / "llm-prompt-recovery").mkdir(parents=True)
    ids = write_test_csv(kaggle / "input" / "llm-prompt-recovery" / "test.csv", n=6)
    bundle(BundleArgs(output=str(kaggle / "input" / "prompt-recovery-bundle"), deps="none", model=model_dir,
                      adapter=[adapter] if adapter else [], members=members))
    return kaggle, ids


def execute(kaggle, tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("PROMPT_RECOVERY_KAGGLE_ROOT", str(kaggle))
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    # pip is barred from every index: the bundle is the only source.
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    nb = nbformat.reads(NOTEBOOK.read_text(encoding="utf-8"), as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    return "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))


@pytest.mark.slow
def test_notebook_runs_offline_from_a_bundle_and_leaves_a_valid_submission(tiny_model_dir, tmp_path, monkeypatch):
    from test_model import make_adapter

    adapter = tmp_path / "tiny-lora"
    make_adapter(tiny_model_dir, "lora", adapter)
    kaggle, ids = kaggle_layout(tmp_path, tiny_model_dir, str(adapter))
    out = execute(kaggle, tmp_path, monkeypatch)
    assert_valid_submission(kaggle / "working" / "submission.csv", ids)
    assert f"from {tmp_path / 'prompt_recovery_site'}" in out  # the bundled wheel, not the dev checkout
    assert "mode: single" in out and "submission OK: 6 rows" in out
    report = json.loads((kaggle / "working" / "report.json").read_text())
    assert report["model"]["adapter"].endswith("tiny-lora") and report["rows"] == 6
    assert "contract: 0 problem(s)" in out and report["stage"] is None
    n = report["rows_generated"]
    assert n == 6 - report["fallback"] and out.strip().splitlines()[-1].startswith(f"{n} of 6 rows generated")


@pytest.mark.slow
def test_a_broken_bundle_still_leaves_the_fallback_submission(tiny_model_dir, tmp_path, monkeypatch):
    kaggle, ids = kaggle_layout(tmp_path, tiny_model_dir)
    for whl in (kaggle / "input" / "prompt-recovery-bundle" / "wheels").glob("*.whl"):
        whl.write_bytes(b"not a wheel")
    out = execute(kaggle, tmp_path, monkeypatch)
    prompts = assert_valid_submission(kaggle / "working" / "submission.csv", ids)
    assert "install failed" in out and "submission OK: 6 rows" in out
    assert len(set(prompts)) == 1
    report = json.loads((kaggle / "working" / "report.json").read_text())
    assert report["stage"] == "install" and report["error_type"] == "InstallError"
    assert report["error_message"].startswith("pip exit 1: ") and report["rows_generated"] == 0
    last = out.strip().splitlines()[-1]
    assert last == report["last_line"] and last.startswith("0 of 6 rows generated: install: pip exit 1: ")


@pytest.mark.slow
def test_a_model_that_does_not_load_is_reported_with_its_stage(tiny_model_dir, tmp_path, monkeypatch):
    kaggle, ids = kaggle_layout(tmp_path, tiny_model_dir)
    for weights in (kaggle / "input" / "prompt-recovery-bundle" / "model").glob("*.safetensors"):
        weights.write_bytes(b"not safetensors")
    out = execute(kaggle, tmp_path, monkeypatch)
    assert_valid_submission(kaggle / "working" / "submission.csv", ids)
    report = json.loads((kaggle / "working" / "report.json").read_text())
    assert report["stage"] == "model load" and report["error_type"] and report["rows_generated"] == 0
    assert report["fallback"] == 6 and report["model"] == {}  # predict's own report is inside
    last = out.strip().splitlines()[-1]
    assert last == f"0 of 6 rows generated: model load: {report['error_message']}" == report["last_line"]


@pytest.mark.slow
def test_notebook_runs_the_bundled_run_spec(tiny_model_dir, tmp_path, monkeypatch):
    from test_model import make_adapter

    make_adapter(tiny_model_dir, "prompt_tuning", tmp_path / "specs" / "soft")
    make_adapter(tiny_model_dir, "lora", tmp_path / "specs" / "lora")
    spec = tmp_path / "specs" / "members.toml"  # paths relative to the spec, as a user keeps them
    spec.write_text('combine = "mbr"\n[[members]]\nadapter = "soft"\n[[members]]\nadapter = "lora"\n'
                    'samples = 2\ntemperature = 0.8\n')
    kaggle, ids = kaggle_layout(tmp_path, tiny_model_dir, members=str(spec))
    bundled = kaggle / "input" / "prompt-recovery-bundle"
    assert json.loads((bundled / "members.json").read_text())["members"][0]["adapter"] == "adapters/soft"
    out = execute(kaggle, tmp_path, monkeypatch)
    assert f"members {bundled / 'members.json'}, combine first" in out
    assert_valid_submission(kaggle / "working" / "submission.csv", ids)
    report = json.loads((kaggle / "working" / "report.json").read_text())
    assert [m["name"] for m in report["members"]] == ["soft", "lora"] and report["combine"] == "mbr"
    log = (kaggle / "working" / "submission.csv.candidates.jsonl").read_text().splitlines()[1:]
    recs = [json.loads(x) for x in log]
    assert sorted({(r["name"], r["sample"]) for r in recs}) == [("lora", 0), ("lora", 1), ("soft", 0)]
    written = assert_valid_submission(kaggle / "working" / "submission.csv", ids)
    fallback = " ".join((bundled / "mean_prompt.txt").read_text().split())
    for i, prompt in enumerate(written):  # mbr picks one of the row's own candidates (then the suffix, if any)
        usable = [r["text"] for r in recs if r["row"] == i and r["text"]]
        if usable:
            assert any(prompt == u or prompt.startswith(u + " ") for u in usable), (prompt, usable)
        else:
            assert prompt == fallback
