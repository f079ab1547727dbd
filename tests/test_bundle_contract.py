"""The bundle's contract with the image: what it takes from it, the check of an interpreter, and the notebook in
an environment that holds only torch and torch's own requirements."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
import venv
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
from conftest import assert_valid_submission

from prompt_recovery import contract as contract_lib
from prompt_recovery.bundle import bundle, contract, contract_table
from prompt_recovery.cli import main
from prompt_recovery.config import BundleArgs

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_PY = ROOT / "kaggle_notebook" / "submission.py"


def make_wheel(folder: Path, name: str, version: str, requires: list[str]) -> Path:
    """A wheel holding only its METADATA: all the contract reads."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name.replace('-', '_')}-{version}-py3-none-any.whl"
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n" + "".join(
        f"Requires-Dist: {r}\n" for r in requires)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name.replace('-', '_')}-{version}.dist-info/METADATA", meta)
    return path


def fake_interpreter(folder: Path, dists: dict[str, str]) -> str:
    """A virtualenv (no pip: instant) whose site-packages holds only the named distributions' metadata."""
    venv.create(folder, with_pip=False)
    python = str(folder / "bin" / "python")
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    for name, version in dists.items():
        info = Path(site) / f"{name.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    return python


def fake_bundle(folder: Path, python_version: str = f"{sys.version_info[0]}.{sys.version_info[1]}") -> dict:
    """Wheels as a bundle would hold them, and the manifest.json their contract goes into."""
    wheels = folder / "wheels"
    make_wheel(wheels, "alpha", "1.0", ["numpy>=1.17", "torch>=2.4", "beta>=0.5", 'pandas; python_version < "3.9"',
                                        'scipy; extra == "plots"'])
    make_wheel(wheels, "beta", "0.7", ["numpy<3,>=2.0", "torch"])
    manifest = {"python_version": python_version, "from_image": contract(wheels, python_version)}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return manifest


def test_version_comparison_agrees_with_packaging():
    # The notebook's check cannot import packaging (the image may lack it); it must judge as packaging does.
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    versions = ["0.9", "1", "1.0.0", "1.0.post1", "1.0a1", "1.0b2", "1.0rc1", "1.0.dev0", "1.0a1.dev1",
                "1.0.post1.dev2", "1.2.3", "1.17", "1.17.0rc1", "2", "2.0rc1", "2.0.0.dev0", "2.0.1", "2.13.0+cpu",
                "2.13.0", "2.13.1", "1!0.5", "2.4.6", "3", "3.0a1", "10.0", "1.21.6", "2.2.0.post3", "2.2+local.1"]
    specs = ["", ">=1.17", ">=1.17,<3", "<3", "<2", "<2.0rc2", ">1.0", ">1.0.post0", ">=2.13.0", "==2.13.0",
             "==2.13.0+cpu", "!=2.0", "==2.*", "!=2.*", "==1.0.*", "~=2.2", "~=2.2.0", "~=1.0a1", "<=2.0", ">2",
             "===2.0", "==1!0.5", ">=1!0.1", "~=1.17", "<2.0.dev1", ">=2.0.dev0", "==2.2.0.post3", ">2.2",
             "==2.2+local.1", "!=2.2+local.1", ">=2.6.0,<3", "<3,>=2.4"]
    wrong = [(s, v) for s in specs for v in versions
             if contract_lib.satisfies(v, s) != SpecifierSet(s).contains(Version(v), prereleases=True)]
    assert wrong == []


def test_the_contract_is_read_from_each_wheels_own_requirements(tmp_path):
    manifest = fake_bundle(tmp_path, "3.11")
    c = manifest["from_image"]
    # beta is shipped; pandas's marker is false on Python 3.11; scipy is an extra nothing asks for.
    assert sorted(c) == ["numpy", "torch"]
    assert c["numpy"]["needed_by"] == [{"wheel": "alpha 1.0", "requires": ">=1.17"},
                                       {"wheel": "beta 0.7", "requires": "<3,>=2.0"}]
    assert c["numpy"]["requires"] == ">=2.0,<3"
    assert c["torch"]["requires"] == ">=2.4" and c["torch"]["needed_by"][1] == {"wheel": "beta 0.7", "requires": ""}
    assert c["numpy"]["built_with"] == metadata.version("numpy")


def test_check_names_a_package_out_of_range_and_a_missing_one(tmp_path, capsys):
    fake_bundle(tmp_path / "b")
    old = fake_interpreter(tmp_path / "old", {"numpy": "1.26.4"})
    assert main(["bundle", "-o", str(tmp_path / "b"), "--check", old]) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines == ["numpy 1.26.4: out of range (beta 0.7 needs <3,>=2.0)",
                     "torch: missing (alpha 1.0 needs >=2.4, beta 0.7 needs any version)"]
    good = fake_interpreter(tmp_path / "good", {"numpy": "2.1.0", "torch": "2.13.0+cpu"})
    assert main(["bundle", "-o", str(tmp_path / "b"), "--check", good]) == 0
    assert "contract met" in capsys.readouterr().out
    too_new = fake_interpreter(tmp_path / "new", {"numpy": "3.0.0rc1", "torch": "2.13.0"})
    assert main(["bundle", "-o", str(tmp_path / "b"), "--check", too_new]) == 1
    assert capsys.readouterr().out.strip() == "numpy 3.0.0rc1: out of range (beta 0.7 needs <3,>=2.0)"


def test_check_names_a_python_the_wheels_are_not_for(tmp_path):
    fake_bundle(tmp_path, "3.9")
    problems = contract_lib.check(json.loads((tmp_path / "manifest.json").read_text()),
                                  version_of={"numpy": "2.0", "torch": "2.4"}.__getitem__, python=(3, 11))
    assert problems == ["python 3.11: the bundle's wheels are for python 3.9 (rebuild it with --python-version 3.11)"]


@pytest.mark.parametrize("built, argv, message", [
    (False, ["--check", sys.executable], "has no manifest.json: build the bundle first"),
    (True, ["--check", "/no/such/python"], "cannot run /no/such/python"),
    (True, ["--check", sys.executable, "--adapter", "x"],
     "--check reads an existing bundle and builds nothing: drop --adapter"),
])
def test_check_with_bad_input_is_one_line_and_exit_2(tmp_path, capsys, built, argv, message):
    if built:
        fake_bundle(tmp_path)
    assert main(["bundle", "-o", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_the_manifest_holds_what_this_packages_own_wheel_requires(tmp_path):
    import tomllib
    from packaging.requirements import Requirement

    m = bundle(BundleArgs(output=str(tmp_path / "b"), deps="none"))
    # Nothing but this package is shipped, so everything it requires comes from the image, each range as
    # pyproject.toml (the wheel's source) writes it.
    declared = [Requirement(r) for r in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]]
    assert {re.sub(r"[-_.]+", "-", r.name).lower(): str(r.specifier) for r in declared} == {
        k: v["needed_by"][0]["requires"] for k, v in m["from_image"].items()}
    assert all(len(v["needed_by"]) == 1 and v["needed_by"][0]["wheel"] == "prompt-recovery 0.1.0"
               for v in m["from_image"].values())
    assert json.loads((tmp_path / "b" / "manifest.json").read_text())["from_image"] == m["from_image"]


# --- the notebook where the image lacks what the bundle takes from it --------------------------------------------


def _torch_closure() -> list[str]:
    """torch and what it requires on this machine, read from the installed metadata."""
    from packaging.requirements import Requirement

    out, todo = [], ["torch"]
    while todo:
        name = re.sub(r"[-_.]+", "-", todo.pop()).lower()
        if name in out:
            continue
        out.append(name)
        for line in metadata.requires(name) or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return out


@pytest.fixture(scope="module")
def torch_only_python(tmp_path_factory) -> str:
    """A fresh virtualenv holding only torch and torch's own requirements: the installed ones, linked in
    (no download), beside the pip and setuptools a virtualenv starts with."""
    root = tmp_path_factory.mktemp("torch-only")
    venv.create(root / "venv", with_pip=True)
    python = str(root / "venv" / "bin" / "python")
    linked = root / "linked"
    linked.mkdir()
    for name in _torch_closure():
        dist = metadata.distribution(name)
        for top in {Path(f).parts[0] for f in dist.files or [] if not str(f).startswith("..")} - {"__pycache__"}:
            src = Path(dist.locate_file(top))
            if src.exists() and not (linked / top).exists():
                (linked / top).symlink_to(src)
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    (Path(site) / "torch-only.pth").write_text(str(linked) + "\n")
    probe = subprocess.run([python, "-c", "import torch, importlib.util as u; print(u.find_spec('numpy'))"],
                           capture_output=True, text=True, env=_clean_env())
    assert probe.returncode == 0 and probe.stdout.strip() == "None", probe.stderr  # torch yes, numpy no
    return python


def _clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV", "PIP_"))}
    return {**env, "PIP_NO_INDEX": "1", "PIP_CONFIG_FILE": os.devnull, "HF_HUB_OFFLINE": "1", **extra}


def kaggle_folder(tmp_path: Path, bundle_dir: Path, rows: int) -> tuple[Path, list[str]]:
    kaggle = tmp_path / "kaggle"
    (kaggle / "working").mkdir(parents=True)
    (kaggle / "input" / "llm-prompt-recovery").mkdir(parents=True)
    (kaggle / "input" / "prompt-recovery-bundle").symlink_to(bundle_dir)
    with open(ROOT / "data_samples" / "test.csv", newline="", encoding="utf-8") as f:
        table = list(csv.reader(f))[: rows + 1]
    with open(kaggle / "input" / "llm-prompt-recovery" / "test.csv", "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(table)
    return kaggle, [r[0] for r in table[1:]]


def run_notebook(python: str, kaggle: Path, tmp_path: Path, edit: tuple[str, str] | None = None):
    """The notebook's code, top to bottom, under ``python`` (its .py twin: the .ipynb is generated from it, and
    a kernel would need ipykernel in an environment that is meant to hold nothing but torch)."""
    source = NOTEBOOK_PY.read_text(encoding="utf-8")
    if edit:
        assert edit[0] in source
        source = source.replace(*edit)  # a setting of the first cell, as a user changes it
    script = tmp_path / "notebook.py"
    script.write_text(source, encoding="utf-8")
    proc = subprocess.run([python, str(script)], capture_output=True, text=True, timeout=1800, cwd=tmp_path,
                          env=_clean_env(PROMPT_RECOVERY_KAGGLE_ROOT=str(kaggle), TMPDIR=str(tmp_path)))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]  # a crashed notebook scores nothing
    report = json.loads((kaggle / "working" / "report.json").read_text())
    last = proc.stdout.strip().splitlines()[-1]
    assert report["last_line"] == last
    return proc.stdout, report, last


@pytest.mark.slow
def test_imports_that_fail_are_reported_with_the_stage(torch_only_python, tmp_path):
    built = tmp_path / "bundle"
    bundle(BundleArgs(output=str(built), deps="none"))
    kaggle, ids = kaggle_folder(tmp_path, built, 4)
    out, report, last = run_notebook(torch_only_python, kaggle, tmp_path,
                                     ("STOP_ON_CONTRACT = True", "STOP_ON_CONTRACT = False"))
    assert "contract: transformers: missing (prompt-recovery 0.1.0 needs <6,>=5.0)" in out
    assert report["stage"] == "imports" and report["error_type"] == "ModuleNotFoundError"
    assert re.fullmatch(r"0 of 4 rows generated: imports: No module named '[a-z_]+'", last), last
    assert report["error_message"] in last and report["rows_generated"] == 0 and report["rows"] == 4
    assert_valid_submission(kaggle / "working" / "submission.csv", ids)


@pytest.fixture(scope="module")
def real_bundles(tmp_path_factory) -> dict[str, Path]:
    """The README's bundle, and the same with --with-image-packages (pip downloads; about two minutes)."""
    root = tmp_path_factory.mktemp("bundles")
    out = {}
    for name, kw in (("default", {}), ("with-image", {"with_image_packages": True})):
        bundle(BundleArgs(output=str(root / name), **kw))
        out[name] = root / name
    return out


def _needed_by_as_the_wheels_say(bundle_dir: Path) -> None:
    """Every range in the manifest is a Requires-Dist of the wheel it names, read here straight from the zip."""
    from email.parser import Parser

    from packaging.requirements import Requirement

    said = {}
    for whl in (bundle_dir / "wheels").glob("*.whl"):
        with zipfile.ZipFile(whl) as z:
            meta = Parser().parsestr(z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA")))
                                     .decode())
        said[f"{meta['Name']} {meta['Version']}"] = {
            (re.sub(r"[-_.]+", "-", r.name).lower(), str(r.specifier))
            for r in map(Requirement, meta.get_all("Requires-Dist") or [])}
    for name, entry in json.loads((bundle_dir / "manifest.json").read_text())["from_image"].items():
        for n in entry["needed_by"]:
            assert (name, n["requires"]) in said[n["wheel"]], (name, n)


@pytest.mark.slow
def test_torch_only_with_the_default_bundle_reports_what_the_image_lacks(torch_only_python, real_bundles, tmp_path,
                                                                          capsys):
    default = real_bundles["default"]
    manifest = json.loads((default / "manifest.json").read_text())
    assert {"numpy", "pandas", "scipy", "scikit-learn", "torch"} <= set(manifest["from_image"])
    _needed_by_as_the_wheels_say(default)
    readme = (ROOT / "kaggle_notebook" / "README.md").read_text(encoding="utf-8")
    shown = readme.split("<!-- from_image:", 1)[1].split("-->", 1)[1].split("<!-- /from_image -->", 1)[0].strip()
    assert shown == contract_table(manifest["from_image"]), "kaggle_notebook/README.md's table is stale"
    assert main(["bundle", "-o", str(default), "--check", torch_only_python]) == 1
    checked = capsys.readouterr().out
    assert re.search(r"^numpy: missing \(.*transformers [\d.]+ needs >=", checked, re.M), checked

    kaggle, ids = kaggle_folder(tmp_path, default, 6)
    out, report, last = run_notebook(torch_only_python, kaggle, tmp_path)
    for name in ("numpy", "pandas", "scipy", "scikit-learn"):
        assert re.search(rf"^contract: {name}: missing \(", out, re.M), out
    assert "contract: torch" not in out  # the image's torch meets it
    assert report["stage"] == "contract" and report["error_type"] == "ContractError"
    assert last.startswith("0 of 6 rows generated: contract: ") and "numpy: missing" in last
    assert report["rows_generated"] == 0
    assert set(assert_valid_submission(kaggle / "working" / "submission.csv", ids)) == {
        " ".join((default / "mean_prompt.txt").read_text().split())}


@pytest.mark.slow
def test_torch_only_with_image_packages_bundled_generates_rows(torch_only_python, real_bundles, tmp_path, capsys):
    full = real_bundles["with-image"]
    manifest = json.loads((full / "manifest.json").read_text())
    assert manifest["with_image_packages"] and set(manifest["from_image"]) == {"torch"}
    assert {"numpy", "pandas", "scipy", "scikit-learn"} <= set(manifest["pinned"])
    assert not any(re.match(r"(torch|triton|nvidia-|cuda-)", n) for n in manifest["pinned"])
    _needed_by_as_the_wheels_say(full)
    assert main(["bundle", "-o", str(full), "--check", torch_only_python]) == 0
    capsys.readouterr()

    kaggle, ids = kaggle_folder(tmp_path, full, 6)
    out, report, last = run_notebook(torch_only_python, kaggle, tmp_path)
    assert "contract: 0 problem(s)" in out
    assert report["stage"] is None and report["error"] is None
    assert report["rows_generated"] == 6 - report["fallback"] and report["rows_generated"] >= 4, out[-3000:]
    n = report["rows_generated"]
    assert last == "6 of 6 rows generated" if n == 6 else last.startswith(f"{n} of 6 rows generated: fallback for ")
    assert_valid_submission(kaggle / "working" / "submission.csv", ids)
