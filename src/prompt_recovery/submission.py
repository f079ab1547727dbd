"""Write submissions atomically and keep a checkpoint of finished rows.

Invariant: the output path is at every moment either absent or a complete, valid submission. Each write
goes to a temporary file in the same folder, is read back and validated, fsynced, and only then
``os.replace``d over the output (atomic on POSIX and Windows), so a kill at any instant leaves the old
file or the new one, never a mix.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
from collections.abc import Callable, Sequence

log = logging.getLogger(__name__)

HEADER = ("id", "rewrite_prompt")


class SubmissionError(Exception):
    """A submission that the competition would reject."""


def validate_rows(ids: Sequence[str], found: Sequence[tuple[str, str]]) -> None:
    """Raise SubmissionError unless ``found`` has every id of ``ids`` in order, each with a prompt."""
    if len(found) != len(ids):
        raise SubmissionError(f"submission has {len(found)} rows, expected {len(ids)}")
    for n, (want, (got, prompt)) in enumerate(zip(ids, found)):
        if got != want:
            raise SubmissionError(f"row {n}: id {got!r} where {want!r} was expected")
        if not prompt.strip():
            raise SubmissionError(f"row {n} (id {want!r}) has a blank prompt")


def read_submission(path: str) -> list[tuple[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or tuple(h.strip() for h in header) != HEADER:
            raise SubmissionError(f"{path}: header is {header}, expected {list(HEADER)}")
        return [(r[0], r[1]) if len(r) == 2 else ("<bad line>", "") for r in reader]


def render(ids: Sequence[str], prompts: Sequence[str]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(HEADER)
    writer.writerows(zip(ids, prompts))
    return buf.getvalue()


def write_submission(path: str, ids: Sequence[str], prompts: Sequence[str]) -> None:
    """Atomically replace ``path`` with a validated submission; on any failure the old file stays."""
    if len(ids) != len(prompts):
        raise SubmissionError(f"{len(ids)} ids but {len(prompts)} prompts")
    # Read back what is on disk, not what we meant to write: that is what gets replaced in.
    write_atomic(path, render(ids, prompts), check=lambda tmp: validate_rows(ids, read_submission(tmp)))


def write_atomic(path: str, text: str, check: Callable[[str], None] | None = None) -> None:
    """Replace ``path`` with ``text`` through a synced temporary file; ``check(tmp)`` may refuse it (raise),
    and on any failure the old file stays: a run killed mid-write never leaves half a file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    if (folder, os.path.basename(path)) not in _swept:
        _sweep_stale_temps(folder, os.path.basename(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        if check is not None:
            check(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    _fsync_dir(folder)


_swept: set[tuple[str, str]] = set()


def _sweep_stale_temps(folder: str, base: str) -> None:
    """Remove the temporary files that runs killed during a write left beside this output.

    A process killed by SIGKILL cannot remove its own, and each run names its own by pid, so they would
    pile up for ever; one whose process is still alive (another run writing now) is kept.
    """
    _swept.add((folder, base))
    if os.name != "posix":
        return  # os.kill(pid, 0) probes a process only on POSIX (on Windows it would end it)
    prefix = f".{base}.tmp-"
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        pid = name[len(prefix):]
        if name.startswith(prefix) and pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            try:
                os.unlink(os.path.join(folder, name))
            except OSError:
                pass  # gone already, or not ours to remove: it is never the output either way


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process holds that pid
    return True


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # not every platform can open a directory; the replace itself is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def input_fingerprint(ids: Sequence[str], texts: Sequence[tuple[str, str]]) -> str:
    h = hashlib.sha256()
    for i, (a, b) in zip(ids, texts):
        for part in (i, a, b):
            h.update(part.encode("utf-8", "surrogatepass"))
            h.update(b"\x00")
    return h.hexdigest()


class CandidateLog:
    """Append-only JSONL beside the output: every candidate each member produced for each row.

    It lets ``--resume`` skip what is done (a row's candidates of a member whose key is unchanged) and lets
    combinations be re-scored without generating again. The first line names the input (a hash of ids and
    texts); a log of another input is ignored. A line cut short by a kill is skipped on reading.
    """

    def __init__(self, path: str, fingerprint: str) -> None:
        self.path = path
        self.fingerprint = fingerprint

    @staticmethod
    def path_for(output: str) -> str:
        return output + ".candidates.jsonl"

    @classmethod
    def for_rows(cls, output: str, rows) -> CandidateLog:
        """The log beside ``output`` for these rows (objects with id, original_text, rewritten_text)."""
        rows = list(rows)
        return cls(cls.path_for(output),
                   input_fingerprint([r.id for r in rows], [(r.original_text, r.rewritten_text) for r in rows]))

    def _lines(self) -> list[str]:
        with open(self.path, encoding="utf-8") as f:
            return f.read().splitlines()

    def _ours(self, lines: list[str]) -> bool:
        try:
            return bool(lines) and json.loads(lines[0]).get("input") == self.fingerprint
        except (json.JSONDecodeError, AttributeError):
            return False

    def load(self, ids: Sequence[str]) -> list[dict]:
        """Records of this input whose row index and id still agree: {row, id, member, name, sample, text}."""
        if not os.path.exists(self.path):
            return []
        lines = self._lines()
        if not self._ours(lines):
            log.warning("candidates file %s belongs to another input; starting afresh", self.path)
            return []
        records = []
        for line in lines[1:]:
            try:
                rec = json.loads(line)
                n, rid = rec["row"], rec["id"]
                ok = isinstance(rec["member"], str) and isinstance(rec["sample"], int)
            except (json.JSONDecodeError, KeyError, TypeError):
                continue  # a line torn by a kill: that candidate is simply made again
            text = rec.get("text")
            fits = ok and isinstance(n, int) and 0 <= n < len(ids) and ids[n] == rid
            if fits and (text is None or str(text).strip()):
                records.append(rec)
        return records

    def start(self, keep: bool) -> None:
        """Begin the log; when resuming the same input, keep its lines (a torn last line is cut off, so the
        next record starts on a line of its own). A log of another input is replaced, never appended to."""
        if keep and os.path.exists(self.path):
            with open(self.path, "rb") as f:
                data = f.read()
            if self._ours(data.decode("utf-8", "replace").splitlines()):
                end = data.rfind(b"\n") + 1
                if end < len(data):
                    with open(self.path, "r+b") as f:
                        f.truncate(end)
                        os.fsync(f.fileno())
                return
        with open(self.path, "w", encoding="utf-8") as f:
            f.write(json.dumps({"input": self.fingerprint}) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def append(self, records: Sequence[dict]) -> None:
        if not records:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
            f.flush()
            os.fsync(f.fileno())
