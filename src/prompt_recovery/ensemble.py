"""Ensemble members and the ways a row's candidates become one prompt.

A member is a model + adapter with its own template, answer prefix, share of the time and samples per row.
Members come from repeated ``--adapter`` (one base, several adapters) or from a run spec (``--members``,
TOML or JSON). Members over the same model form a group: the model loads once and serves every member's
adapter side by side in one batch; groups run one after another.

Combinations of a row's candidates (members in priority order):
- ``first``: the first member's usable candidate;
- ``concat``: the candidates joined (the winners' recipe; the suffix and the scorer's window trim the tail);
- ``mbr``: minimum Bayes risk under the metric: the candidate with the highest mean sharpened cosine to the
  other candidates and to the fallback prompt (a prior reference, so two candidates do not tie).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from typing import get_args

import numpy as np

from .config import Combine, MemberArgs, PredictArgs
from .data import InputError
from .score import sharpen

FIRST, CONCAT, MBR = "first", "concat", "mbr"
COMBINES = get_args(Combine)  # first, concat, mbr


@dataclass(frozen=True)
class Member:
    """A resolved member: its args, a unique name, and a key that changes when anything it generates with does."""

    args: MemberArgs
    name: str
    key: str
    rank: int
    """Priority: 0 is the first member."""

    @property
    def model(self) -> str | None:
        return self.args.model


def read_spec(path: str, resolve_paths: bool = True) -> tuple[list[MemberArgs], str | None]:
    """Members (and an optional combine) from a TOML or JSON run spec; InputError for anything malformed.

    ``resolve_paths``: relative paths become paths relative to the spec's folder (False: as written).
    """
    if not os.path.isfile(path):
        raise InputError(f"members spec not found: {path}")
    try:
        if path.lower().endswith(".json"):
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        else:
            import tomllib  # Python 3.11+; JSON specs work everywhere

            with open(path, "rb") as f:
                data = tomllib.load(f)
    except ImportError:
        raise InputError(f"{path}: TOML specs need Python 3.11 or newer; write it as JSON") from None
    except (OSError, ValueError) as exc:  # json and tomllib errors are ValueErrors
        raise InputError(f"cannot read members spec {path}: {exc}") from None
    if isinstance(data, dict):
        unknown = sorted(set(data) - {"members", "combine"})
        if unknown:  # a misspelt key would otherwise be silently ignored
            raise InputError(f"{path}: unknown key(s) {', '.join(unknown)} (known: combine, members)")
    entries = data.get("members") if isinstance(data, dict) else None
    if not isinstance(entries, list) or not entries:
        raise InputError(f"{path}: no members (expected a 'members' list, [[members]] in TOML)")
    known = {f.name for f in fields(MemberArgs)}
    members = []
    for n, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise InputError(f"{path}: member {n + 1} is not a table/object")
        unknown = sorted(set(entry) - known)
        if unknown:
            raise InputError(f"{path}: member {n + 1} has unknown field(s) {', '.join(unknown)} "
                             f"(known: {', '.join(sorted(known))})")
        for key, value in entry.items():
            want = _FIELD_TYPES[key]
            if not _of_type(value, want):
                raise InputError(f"{path}: member {n + 1}: {key} must be {want}; got {value!r}")
        try:
            member = MemberArgs(**entry)
        except (TypeError, ValueError) as exc:
            raise InputError(f"{path}: member {n + 1}: {exc}") from None
        members.append(resolved(member, os.path.dirname(os.path.abspath(path))) if resolve_paths else member)
    combine = data.get("combine")
    if combine is not None and combine not in COMBINES:
        raise InputError(f"{path}: combine must be one of {', '.join(COMBINES)}; got {combine!r}")
    return members, combine


PATH_FIELDS = ("model", "adapter", "template")
_FIELD_TYPES = {f.name: str(f.type) for f in fields(MemberArgs)}


def _of_type(value, annotation: str) -> bool:
    """Whether a spec value fits a MemberArgs field's annotation (str, int, float, each maybe | None)."""
    if value is None:
        return "None" in annotation
    if isinstance(value, bool):  # a bool is an int to Python, never to a spec
        return False
    if "str" in annotation:
        return isinstance(value, str)
    if "float" in annotation:
        return isinstance(value, (int, float))
    if "int" in annotation:
        return isinstance(value, int)
    return True


def resolved(member: MemberArgs, folder: str) -> MemberArgs:
    """The member with its relative paths made relative to ``folder`` (the spec's own).

    So a bundle (or a Kaggle dataset) can carry a spec and the adapters it names, and work wherever it is mounted.
    """
    changes = {}
    for key in PATH_FIELDS:
        value = getattr(member, key)
        if isinstance(value, str) and value and value not in ("auto", "none") and not os.path.isabs(
                os.path.expanduser(value)):
            changes[key] = os.path.join(folder, value)
    return dataclasses.replace(member, **changes)


def resolve_members(args: PredictArgs) -> tuple[list[Member], str]:
    """The run's members in priority order and its combine method, from --members or the --adapter list."""
    combine = args.ensemble.combine
    if args.ensemble.members:
        specs, spec_combine = read_spec(args.ensemble.members)
        combine = spec_combine or combine
    else:
        specs = [MemberArgs(adapter=a) for a in args.model.adapter]
    if args.prompt.template is not None:  # every member without its own template uses it
        _check_paths(MemberArgs(adapter="none", template=args.prompt.template))
    members = []
    taken: set[str] = set()
    for rank, spec in enumerate(specs):
        spec = MemberArgs(**{**asdict(spec), "model": spec.model or args.model.model})
        _check_paths(spec)
        name = spec.name or _default_name(spec.adapter)
        base, k = name, 2
        while name in taken:  # two members on the same adapter (say greedy and sampled) need two names
            name, k = f"{base}#{k}", k + 1
        taken.add(name)
        members.append(Member(spec, name, _key(name, spec, args), rank))
    return members, combine


def _check_paths(spec: MemberArgs) -> None:
    # Checked before anything runs, cheaply (no weights): a typo in the second member must not cost the first
    # member's hour. What only a loaded model can tell (an adapter for another base) fails that member alone.
    from .model import read_adapter_config, resolve_adapter
    from .prompt import Template

    if spec.model is not None and not os.path.exists(os.path.expanduser(spec.model)):
        raise InputError(f"model not found: {spec.model} (give an HF model folder or a .gguf file)")
    folder = resolve_adapter(spec.adapter, "", embedded=False)  # "auto" is resolved where the model is known
    if folder is not None:
        read_adapter_config(folder)  # InputError: no adapter_config.json, or one that does not parse
    if spec.template is not None:
        Template.load(spec.template)  # InputError naming the file


def _default_name(adapter: str) -> str:
    if adapter in ("none", ""):
        return "base"
    if adapter == "auto":
        return "default"
    return os.path.basename(os.path.normpath(adapter)) or "adapter"


def _key(name: str, spec: MemberArgs, args: PredictArgs) -> str:
    # Everything that changes what this member generates; resumed candidates must have been made the same way
    # (an adapter retrained into the same folder, or another model file under the same path, counts too).
    what = {**asdict(spec), "share": None, "max_new_tokens": args.generation.max_new_tokens,
            "max_input_tokens": args.prompt.max_input_tokens, "answer_prefix_default": args.prompt.answer_prefix,
            "template_default": args.prompt.template, "quantize": args.model.quantize, "dtype": args.model.dtype,
            "device": args.model.device, "merge_lora": args.model.merge_lora,
            "max_prompt_words": args.out.max_prompt_words, "files": [_stamp(spec.adapter), _stamp(spec.model),
                                                                     _stamp(spec.template)]}
    digest = hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:10]
    return f"{name}@{digest}"


def _stamp(path: str | None) -> list | None:
    """Size and modification time of the weight / config files under ``path`` (cheap: no hashing)."""
    if not path or path in ("auto", "none") or not os.path.exists(path):
        return None
    if os.path.isfile(path):
        files = [path]
    else:
        files = sorted(os.path.join(path, f) for f in os.listdir(path)
                       if f.endswith((".safetensors", ".bin", ".json", ".gguf")))
    return [(os.path.basename(f), os.path.getsize(f), os.stat(f).st_mtime_ns) for f in files]


def groups(members: Sequence[Member]) -> list[list[Member]]:
    """Members grouped by model, groups in the order of their best-ranked member."""
    out: dict[str | None, list[Member]] = {}
    for m in members:
        out.setdefault(m.model, []).append(m)
    return list(out.values())


def share_of(group: Sequence[Member], remaining: Sequence[Sequence[Member]]) -> float:
    """This group's fraction of the time left, among the groups still to run (itself included)."""
    total = sum(m.args.share for g in remaining for m in g)
    return sum(m.args.share for m in group) / total if total > 0 else 1.0


# -- combining ---------------------------------------------------------------------------------------------

def combine_first(candidates: Sequence[str]) -> str:
    return candidates[0]


def combine_concat(candidates: Sequence[str]) -> str:
    seen: list[str] = []
    for c in candidates:
        if c not in seen:  # a repeated candidate adds nothing but length
            seen.append(c)
    return " ".join(seen)


def mbr_pick(embeddings: np.ndarray, prior: np.ndarray | None) -> int:
    """Index of the candidate with the highest mean sharpened cosine to the others (and to the prior).

    ``embeddings``: [k, d] L2-normalised; ``prior``: [d] or None.
    """
    k = embeddings.shape[0]
    if k == 1:
        return 0
    sims = sharpen(embeddings @ embeddings.T)
    np.fill_diagonal(sims, 0.0)
    total = sims.sum(axis=1)
    refs = k - 1
    if prior is not None:
        total = total + sharpen(embeddings @ prior)
        refs += 1
    return int(np.argmax(total / refs))


class Combiner:
    """Turns each row's candidate list (priority order, usable texts only) into one prediction."""

    def __init__(self, method: str, fallback: str, embed: Callable[[Sequence[str]], np.ndarray] | None = None):
        if method not in COMBINES:
            raise ValueError(f"combine must be one of {', '.join(COMBINES)}; got {method!r}")
        if method == MBR and embed is None:
            raise ValueError("mbr needs an embedder")
        self.method, self.fallback, self.embed = method, fallback, embed
        self._prior = None

    def __call__(self, candidates: Sequence[str]) -> str | None:
        if not candidates:
            return None
        if self.method == FIRST:
            return combine_first(candidates)
        if self.method == CONCAT:
            return combine_concat(candidates)
        return self.many([candidates])[0]

    def many(self, rows: Sequence[Sequence[str]]) -> list[str | None]:
        """Combine many rows at once (MBR embeds every candidate of every row in one batch)."""
        if self.method != MBR:
            return [self(c) for c in rows]
        flat = [c for row in rows for c in row]
        if not flat:
            return [None] * len(rows)
        if self._prior is None:
            self._prior = self.embed([self.fallback])[0]
        emb = self.embed(flat)
        out: list[str | None] = []
        start = 0
        for row in rows:
            if not row:
                out.append(None)
                continue
            out.append(row[mbr_pick(emb[start:start + len(row)], self._prior)])
            start += len(row)
        return out
