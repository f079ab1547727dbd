"""The errors every stage may raise, in a module that imports nothing of the package: model/ and adapters/
both need AdapterMismatch, and neither may import the other for it (that was an import cycle)."""

from __future__ import annotations


class InputError(Exception):
    """Input that cannot be turned into a submission at all: the CLI prints it in one line, exit 2."""


class AdapterMismatch(InputError):
    """An adapter trained on another base model."""


def one_line(exc: BaseException) -> str:
    """The whole message on one line: library errors put their cause after the first line (torch's
    ``size mismatch for ...`` under ``Error(s) in loading state_dict``), so cutting there hides it."""
    return " ".join(part.strip() for part in str(exc).splitlines() if part.strip())
