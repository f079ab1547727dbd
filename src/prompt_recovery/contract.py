"""contract: what a bundle takes from the environment it runs in, and the check of an interpreter against it.

A bundle ships pinned wheels but never torch and the CUDA stack, and by default not the scientific stack a
Kaggle image holds (numpy, pandas, scipy, ...). ``manifest.json``'s ``from_image`` names every package its
wheels require and do not ship, with the version range each wheel asks for (read from the wheels' own
``Requires-Dist`` when the bundle is built). This module checks an interpreter against that.

Standard library only, and runnable as a script by any interpreter (``python contract.py MANIFEST``): the
notebook imports it right after its install cell, and ``prompt-recovery bundle --check PYTHON`` runs it under
the target interpreter, which may hold none of this package's dependencies. The version comparison is
written by hand for the same reason: ``packaging`` may be absent from the image.
"""

from __future__ import annotations

import json
import re
import sys
from importlib import metadata

_VERSION = re.compile(
    r"^\s*v?(?:(?P<epoch>\d+)!)?(?P<release>\d+(?:\.\d+)*)"
    r"(?:[-_.]?(?P<pre_l>a|b|c|rc|alpha|beta|pre|preview)[-_.]?(?P<pre_n>\d+)?)?"
    r"(?:-(?P<post_n1>\d+)|[-_.]?(?P<post_l>post|rev|r)[-_.]?(?P<post_n2>\d+)?)?"
    r"(?:[-_.]?(?P<dev_l>dev)[-_.]?(?P<dev_n>\d+)?)?"
    r"(?:\+(?P<local>[a-z0-9]+(?:[-_.][a-z0-9]+)*))?\s*$",
    re.IGNORECASE,
)
_PRE = {"a": 0, "alpha": 0, "b": 1, "beta": 1, "c": 2, "rc": 2, "pre": 2, "preview": 2}
_CLAUSE = re.compile(r"^\s*(===|~=|==|!=|<=|>=|<|>)\s*(\S+?)\s*$")


class ContractError(Exception):
    """The interpreter lacks a package the bundle takes from the image, or holds one out of range."""


class Version:
    """A PEP 440 version, ordered as PEP 440 orders them; the local label (``+cpu``) is kept apart."""

    def __init__(self, text: str) -> None:
        m = _VERSION.match(text)
        if m is None:
            raise ValueError(f"not a PEP 440 version: {text!r}")
        self.text = text.strip()
        self.epoch = int(m["epoch"] or 0)
        self.written = tuple(int(x) for x in m["release"].split("."))  # as written: ~=2.0 and ==2.0.* need it
        release = list(self.written)
        while len(release) > 1 and release[-1] == 0:  # 1.0 == 1.0.0
            release.pop()
        self.release = tuple(release)
        self.pre = (_PRE[m["pre_l"].lower()], int(m["pre_n"] or 0)) if m["pre_l"] else None
        post = m["post_n1"] or ((m["post_n2"] or "0") if m["post_l"] else None)
        self.post = int(post) if post is not None else None
        self.dev = int(m["dev_n"] or 0) if m["dev_l"] else None
        self.local = m["local"]

    @property
    def is_pre(self) -> bool:
        return self.pre is not None or self.dev is not None

    def key(self) -> tuple:
        """The public version's sort key (the local label plays no part)."""
        inf = (float("inf"),)
        # 1.0.dev0 < 1.0a1 < 1.0 < 1.0.post1: a dev release of a final version sorts before its pre-releases.
        pre = self.pre if self.pre is not None else ((-1,) if self.dev is not None and self.post is None else inf)
        post = (self.post,) if self.post is not None else (-1,)
        dev = (self.dev,) if self.dev is not None else inf
        return (self.epoch, self.release, pre, post, dev)


def _starts_with(version: Version, epoch: int, prefix: tuple) -> bool:
    """``==1.2.*``: the release, padded with zeros, begins with 1.2 (its pre, post and dev releases included)."""
    n = len(prefix)
    return version.epoch == epoch and (version.release + (0,) * n)[:n] == prefix


def _clause(v: Version, op: str, target: str) -> bool:
    if op == "===":
        return v.text == target
    if op in ("==", "!=") and target.endswith(".*"):
        t = Version(target[:-2])
        return _starts_with(v, t.epoch, t.written) == (op == "==")
    t = Version(target)
    same = v.key() == t.key() and (not t.local or v.local == t.local)  # ==2.13.0 admits 2.13.0+cpu
    if op == "==":
        return same
    if op == "!=":
        return not same
    if op == ">=":
        return v.key() >= t.key()
    if op == "<=":
        return v.key() <= t.key()
    if op == ">":
        # >1.7 admits no post-release of 1.7 unless 1.7 itself is one, and not 1.7+local.
        post_of_t = t.post is None and v.post is not None and (v.epoch, v.release, v.pre) == (t.epoch, t.release, t.pre)
        return v.key() > t.key() and not post_of_t
    if op == "<":
        # <2 admits no pre-release of 2 itself (2.0rc1) unless the bound is a pre-release.
        pre_of_t = not t.is_pre and v.is_pre and (v.epoch, v.release) == (t.epoch, t.release)
        return v.key() < t.key() and not pre_of_t
    # ~=2.2.1 means >=2.2.1 and ==2.2.*
    if len(t.written) < 2:
        raise ValueError(f"~= needs at least two release numbers: {op}{target}")
    return v.key() >= t.key() and _starts_with(v, t.epoch, t.written[:-1])


def satisfies(version: str, spec: str) -> bool:
    """Whether an installed ``version`` meets ``spec`` (a comma-separated specifier set; empty: any).

    Judged as pip judges an installed distribution against a requirement: pre-releases allowed, and a local
    label (``2.13.0+cpu``) ignored unless the clause names one.
    """
    v = Version(version)
    for clause in (c for c in spec.split(",") if c.strip()):
        m = _CLAUSE.match(clause)
        if m is None:
            raise ValueError(f"not a version specifier: {clause.strip()!r}")
        if not _clause(v, *m.groups()):
            return False
    return True


def check(manifest: dict, version_of=metadata.version, python: tuple = sys.version_info[:2]) -> list[str]:
    """One line per problem: a wrong Python, a package missing, or one whose version is out of range."""
    problems = []
    want_py = manifest.get("python_version")
    if want_py and tuple(int(x) for x in want_py.split(".")) != tuple(python):
        problems.append(f"python {python[0]}.{python[1]}: the bundle's wheels are for python {want_py} "
                        f"(rebuild it with --python-version {python[0]}.{python[1]})")
    for name, entry in sorted(manifest.get("from_image", {}).items()):
        needs = ", ".join(f"{n['wheel']} needs {n['requires'] or 'any version'}" for n in entry["needed_by"])
        try:
            have = version_of(name)
        except metadata.PackageNotFoundError:
            problems.append(f"{name}: missing ({needs})")
            continue
        bad = [n for n in entry["needed_by"] if not _meets(have, n["requires"])]
        if bad:
            which = ", ".join(f"{n['wheel']} needs {n['requires']}" for n in bad)
            problems.append(f"{name} {have}: out of range ({which})")
    return problems


def _meets(version: str, spec: str) -> bool:
    try:
        return satisfies(version, spec)
    except ValueError:
        return False  # an installed version PEP 440 cannot read meets no range


def check_file(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return check(json.load(f))


def main(argv: list[str] | None = None) -> int:
    """``python contract.py MANIFEST``: prints each problem on its own line; exit 1 if any, else 0."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python contract.py BUNDLE/manifest.json", file=sys.stderr)
        return 2
    try:
        with open(argv[0], encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError) as exc:
        print(f"cannot read {argv[0]}: {exc}", file=sys.stderr)
        return 2
    problems = check(manifest)
    for line in problems:
        print(line)
    names = sorted(manifest.get("from_image", {}))
    if not problems:
        found = ", ".join(f"{n} {metadata.version(n)}" for n in names)
        print(f"contract met by {sys.executable} (python {sys.version.split()[0]}): {found or 'nothing required'}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
