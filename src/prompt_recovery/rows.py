"""The run's rows: the one place where each row's prompt, source, fallback reason and candidates live.

Every stage of predict reads and writes this object: the reader fills it, rules and resumed candidates
update it, each member's batches add candidates, the combiner turns candidates into the row's prompt, and
the writer renders it. After any change, ``write`` puts a complete, valid submission on disk.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from .data import Row
from .postprocess import UNCHANGED_PROMPT, unchanged
from .submission import CandidateLog, write_submission

FALLBACK = "fallback"
RULE = "rule"
MODEL = "model"


@dataclass
class RowState:
    row: Row
    prompt: str
    """What the submission holds for this row now."""
    source: str = FALLBACK
    """fallback, rule or model."""
    reason: str | None = None
    """Why the row falls back: the first reason an answer for it was not made (read only while it does)."""
    candidates: dict[str, dict[int, str | None]] = field(default_factory=dict)
    """Member name -> {sample: answer}; None marks an answer that was unusable (done, not to be made again)."""
    fresh: bool = False
    """Some of its candidates were made in this run (not all restored from an earlier run's log)."""


class Rows:
    """All rows of one run, in input order, with the output they are written to."""

    def __init__(self, rows: Sequence[Row], fallback: str, output: str) -> None:
        self.fallback = fallback
        self.output = output
        self.states = [RowState(r, fallback) for r in rows]
        self.log = CandidateLog.for_rows(output, rows)

    def __len__(self) -> int:
        return len(self.states)

    def __getitem__(self, i: int) -> RowState:
        return self.states[i]

    @property
    def ids(self) -> list[str]:
        return [s.row.id for s in self.states]

    def write(self) -> None:
        """Atomically replace the output with the rows' current prompts (valid at every moment)."""
        write_submission(self.output, self.ids, [s.prompt for s in self.states])

    # -- candidates ---------------------------------------------------------------------------------------
    def add(self, i: int, member: str, sample: int, text: str | None, fresh: bool = True) -> None:
        """Record a finished answer, usable or not: either way it is not generated again on resume."""
        self.states[i].candidates.setdefault(member, {})[sample] = text
        self.states[i].fresh |= fresh

    def has(self, i: int, member: str, sample: int) -> bool:
        return sample in self.states[i].candidates.get(member, {})

    def usable(self, i: int, members: Sequence[str]) -> list[str]:
        """The row's usable candidates, members in priority order, samples in order."""
        cands = self.states[i].candidates
        return [t for m in members for _, t in sorted(cands.get(m, {}).items()) if t]

    def resume(self, keys: dict[str, str]) -> dict[str, int]:
        """Restore candidates of members whose key is unchanged ({key: member name}); returns {name: restored}."""
        restored: dict[str, int] = {}
        for rec in self.log.load(self.ids):
            name = keys.get(rec["member"])
            if name is None:
                continue  # made by a member that no longer exists or generates differently
            self.add(rec["row"], name, rec["sample"], rec.get("text"), fresh=False)
            restored[name] = restored.get(name, 0) + 1
        return restored

    def record(self, entries: Iterable[tuple[int, str, str, int, str | None]]) -> None:
        """Append finished answers to the candidates log: (row, member key, member name, sample, text)."""
        self.log.append([{"row": i, "id": self.states[i].row.id, "member": key, "name": name, "sample": sample,
                          "text": text} for i, key, name, sample, text in entries])

    # -- prompts ------------------------------------------------------------------------------------------
    def apply_rules(self) -> None:
        """Rows answered without a model: an empty text keeps the fallback, an unchanged text gets its rule."""
        for i, s in enumerate(self.states):
            if not s.row.usable:
                self.fall_back(i, "empty_text")  # nothing to read a prompt from: the mean prompt is the best guess
            elif unchanged(s.row.original_text, s.row.rewritten_text):
                self.set_rule(i, UNCHANGED_PROMPT)

    def set_rule(self, i: int, prompt: str) -> None:
        s = self.states[i]
        s.prompt, s.source, s.reason = prompt, RULE, None

    def fall_back(self, i: int, reason: str) -> None:
        """The row keeps the fallback prompt; the first reason given is the one reported."""
        s = self.states[i]
        if s.source == FALLBACK and s.reason is None:
            s.reason = reason

    def recombine(self, indices: Iterable[int], members: Sequence[str], combine: Callable, finish: Callable) -> None:
        """Re-derive the prompts of ``indices`` from their candidates (combine, then suffix and trimming)."""
        indices = [i for i in indices if self.states[i].source != RULE]
        texts = combine([self.usable(i, members) for i in indices])
        for i, text in zip(indices, texts):
            s = self.states[i]
            if text:
                s.prompt, s.source = finish(text), MODEL
            else:
                s.prompt, s.source = self.fallback, FALLBACK

    # -- counts -------------------------------------------------------------------------------------------
    def count(self, source: str, fresh: bool | None = None) -> int:
        """Rows from ``source``; with ``fresh``, only those that did (or did not) get answers in this run."""
        return sum(1 for s in self.states if s.source == source and (fresh is None or s.fresh == fresh))

    def reasons(self) -> dict[str, int]:
        return dict(Counter(s.reason or "unknown" for s in self.states if s.source == FALLBACK))
