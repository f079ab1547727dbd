"""Run generation over all requests under a deadline; every request comes back, in its own slot, whatever fails.

Requests are sorted by (tier, prompt length): every row's first candidate is served before anyone's second,
and each batch pads little. Batches are bounded by a token budget (rows x (padded prompt + max_new_tokens)).
Before each batch, a cost model fitted on the batches so far (prefill per prompt position, decoding per
running row-step: rows leave a batch when they finish) says how many rows fit the time left; each batch's
decoding is also bounded in time, so the deadline is overrun by at most one batch's prefill and one step.
Out of memory halves the batch, retried only after the failed attempt's memory is released; non-finite
logits call ``recover`` (switch to a safe dtype) and retry once; any other error costs only that batch's
rows (a batch mixing tiers, that is members or samples, runs again tier by tier first, so one member's failure
is not another's). The scheduler sees requests as opaque items with a length and knows nothing of tokenizers or torch.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Hashable, Mapping
from dataclasses import asdict, dataclass, field

from tqdm.auto import tqdm

log = logging.getLogger(__name__)

DEADLINE = "deadline"
OOM = "out_of_memory"
NON_FINITE = "non_finite"
ERROR = "error"


@dataclass
class Outcome:
    tokens: list[int] | None
    """Generated ids, or None where the request falls back."""
    reason: str | None = None
    """Why the request falls back (None when it was generated)."""
    timed_out: bool = False
    """The time bound stopped it while it was still running: the answer may be unfinished."""


@dataclass
class BatchStat:
    rows: int
    padded_len: int
    seconds: float
    new_tokens: int
    status: str
    prefill_s: float = 0.0
    decode_s: float = 0.0
    row_steps: int = 0
    estimate_s: float | None = None
    """What the cost model predicted for this batch before it ran (None while uncalibrated)."""
    prefill_tokens: int = 0
    """Prompt positions the prefill processed (rows x width, virtual tokens and prefixes included)."""


@dataclass
class SchedulerStats:
    batches: list[BatchStat] = field(default_factory=list)
    oom_splits: int = 0
    recoveries: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"batches": [asdict(b) for b in self.batches], "oom_splits": self.oom_splits,
                "recoveries": list(self.recoveries)}


@dataclass
class CostModel:
    """Seconds a batch takes: prefill per padded prompt position, decoding per running row-step.

    Rates come from the most recent batch, which is the closest in length (requests are served shortest
    first); a rate only falls halfway towards a faster measurement, since underestimating is what overruns a
    deadline. A batch wider than the one measured is charged as if attention made every position cost in
    proportion to the width (the quadratic worst case), so longer batches are never underestimated.
    """

    max_new_tokens: int
    prefill_rate: float | None = None
    """Seconds per padded prompt position, at width ``ref_width``."""
    step_rate: float | None = None
    """Seconds per row-step (one running row, one decoding step), at width ``ref_width``."""
    ref_width: int = 1
    steps_per_row: float | None = None
    """Decoding steps a row takes on average (rows stop early at a line break or EOS)."""
    _rows_seen: int = 0
    _steps_seen: int = 0

    @property
    def calibrated(self) -> bool:
        return self.prefill_rate is not None

    def _scale(self, width: int) -> float:
        return max(1.0, width / self.ref_width)

    def update(self, rows: int, width: int, prefill_s: float, decode_s: float, row_steps: int) -> None:
        measured_p = prefill_s / max(rows * width, 1)
        measured_d = decode_s / row_steps if row_steps else None
        scale = self._scale(width)
        self.prefill_rate = _slow(self.prefill_rate and self.prefill_rate * scale, measured_p)
        if measured_d is not None:
            self.step_rate = _slow(self.step_rate and self.step_rate * scale, measured_d)
        self.ref_width = width
        self._rows_seen += rows
        self._steps_seen += row_steps
        # The last batch's own mean counts too: later (longer) rows tend to need more steps, never fewer.
        self.steps_per_row = max(self._steps_seen / self._rows_seen, row_steps / max(rows, 1))

    def prefill(self, rows: int, width: int) -> float:
        return (self.prefill_rate or 0.0) * rows * width * self._scale(width)

    def decode(self, rows: int, width: int) -> float:
        steps = self.max_new_tokens if self.steps_per_row is None else min(self.steps_per_row, self.max_new_tokens)
        rate = self.step_rate if self.step_rate is not None else (self.prefill_rate or 0.0)
        return rate * rows * steps * self._scale(width)

    def total(self, rows: int, width: int) -> float:
        return self.prefill(rows, width) + self.decode(rows, width)


def _slow(old: float | None, new: float) -> float:
    return new if old is None or new >= old else 0.5 * (old + new)


@dataclass(frozen=True)
class Limits:
    """What bounds one scheduler run: its deadline, each batch's size, each row's share of the time."""

    deadline: float
    """Clock time by which every request has come back (generated, cut short or fallen back)."""
    max_new_tokens: int
    """Tokens a request may generate."""
    max_batch_tokens: int
    """Token slots a batch may hold: rows x (padded prompt + max_new_tokens)."""
    max_batch_size: int
    """Rows a batch may hold."""
    budget_per_row: float = math.inf
    """Seconds of decoding a row may take at most, whatever time is left."""
    calibration_rows: int = 1
    """Rows of the first batch, which measures the rates (the shortest requests)."""

    def __post_init__(self) -> None:
        for name in ("max_new_tokens", "max_batch_tokens", "max_batch_size", "calibration_rows"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1; got {getattr(self, name)}")


@dataclass
class Hooks:
    """What a scheduler run calls back and shows."""

    on_batch: Callable[[dict[Hashable, Outcome]], None] | None = None
    """Called with each finished batch's outcomes (the caller writes its file there)."""
    recover: Callable[[str], bool] | None = None
    """Called on non-finite logits; True when it changed something (a safe dtype), so the batch runs again."""
    progress: bool = False
    """Show a tqdm bar."""
    desc: str = "predict"
    """The bar's label."""


class Scheduler:
    """Serve ``{key: request}`` through ``generate`` in time; ``run`` returns ``{key: Outcome}`` for every key.

    ``generate(batch, max_time)`` returns an object with ``tokens`` (one list per request, in order) and the
    batch's cost (``prefill_tokens``, ``prefill_s``, ``row_steps``, ``decode_s``): the engine's BatchOutput.
    """

    def __init__(self, generate: Callable, limits: Limits, *, length: Callable[[object], int] = len,
                 clock: Callable[[], float] = time.monotonic, hooks: Hooks | None = None) -> None:
        hooks = hooks or Hooks()
        self.generate = generate
        self.limits = limits
        self.deadline = limits.deadline
        self.max_new_tokens = limits.max_new_tokens
        self.token_cap = limits.max_batch_tokens
        self.size_cap = limits.max_batch_size
        self.budget_per_row = limits.budget_per_row
        self.calibration_rows = limits.calibration_rows
        self.length = length
        self.clock = clock
        self.on_batch = hooks.on_batch
        self.recover = hooks.recover
        self.progress = hooks.progress
        self.desc = hooks.desc
        self.cost = CostModel(limits.max_new_tokens)
        self.stats = SchedulerStats()

    def _slots(self, rows: int, padded: int) -> int:
        return rows * (padded + self.max_new_tokens)

    def _next_batch(self, queue: list, lengths: Mapping) -> list:
        batch: list = []
        width = 0
        for key in queue:
            width = max(width, lengths[key])
            # A single row always forms a batch, however long: it was truncated to fit by the prompt stage.
            if batch and (len(batch) >= self.size_cap or self._slots(len(batch) + 1, width) > self.token_cap):
                break
            batch.append(key)
        return batch

    def _fit_to_time(self, batch: list, lengths: Mapping, left: float) -> list:
        if not self.cost.calibrated:
            # Nothing measured yet: a first batch of one row (the shortest) measures the rates, so an
            # uninterruptible prefill of a full batch can never be what overruns a tight deadline.
            return batch[: self.calibration_rows]
        # Each prefix priced at its own padded width: charging every row at the batch's widest prompt (scaled
        # quadratically from a one-row calibration) made whole queues of short rows "not fit" and fall back.
        fit, width = 0, 0
        for k, key in enumerate(batch, start=1):
            width = max(width, lengths[key])
            if self.cost.total(k, width) > left:
                break
            fit = k
        return batch[:fit]

    def run(self, requests: Mapping[Hashable, object], tiers: Mapping[Hashable, object] | None = None
            ) -> dict[Hashable, Outcome]:
        """Generate for every request; one Outcome per key. ``tiers``: lower tiers are served first."""
        lengths = {k: self.length(r) for k, r in requests.items()}
        order = {k: n for n, k in enumerate(requests)}
        queue = sorted(requests, key=lambda k: ((tiers or {}).get(k, 0), lengths[k], order[k]))
        self._results: dict[Hashable, Outcome] = {}
        self._tiers = dict(tiers or {})
        self._bar = tqdm(total=len(queue), disable=not self.progress, unit="row", desc=self.desc)
        self._fallbacks = 0
        try:
            while queue:
                left = self.deadline - self.clock()
                batch = self._next_batch(queue, lengths)
                batch = self._fit_to_time(batch, lengths, left) if left > 0 else []
                if not batch:
                    # The rows left cannot be reached in time: they fall back now rather than overrun.
                    self._emit({k: Outcome(None, DEADLINE) for k in queue})
                    queue = []
                else:
                    queue = queue[len(batch):]
                    self._emit(self._run_batch(batch, requests, lengths))
        finally:
            self._bar.close()
        return self._results

    def _emit(self, done: dict) -> None:
        """Hand finished requests to the caller (as each batch, or each piece of a split batch, ends)."""
        if not done:
            return
        self._results.update(done)
        self._fallbacks += sum(1 for o in done.values() if o.tokens is None)
        self._bar.update(len(done))
        self._bar.set_postfix(fallback=self._fallbacks, refresh=False)
        if self.on_batch is not None:
            try:
                self.on_batch(done)
            except Exception as exc:  # recording one batch must not end the run: the outcomes are kept
                log.warning("recording a batch of %d failed: %s: %s", len(done), type(exc).__name__, exc)

    def _run_batch(self, batch: list, requests: Mapping, lengths: Mapping, retried: bool = False) -> dict:
        left = self.deadline - self.clock()
        if left <= 0:
            return {k: Outcome(None, DEADLINE) for k in batch}
        # Each batch is bounded by its own rows' share as well as by the run, so one slow batch cannot
        # eat the time of every row behind it.
        max_time = min(left, len(batch) * self.budget_per_row)
        padded = max(lengths[k] for k in batch)
        estimate = self.cost.total(len(batch), padded) if self.cost.calibrated else None
        start = self.clock()
        failure = None
        try:
            out = self.generate([requests[k] for k in batch], max_time)
            if len(out.tokens) != len(batch):
                raise RuntimeError(f"engine returned {len(out.tokens)} rows for a batch of {len(batch)}")
        except MemoryError as exc:
            failure = (OOM, _first_line(exc))
        except FloatingPointError as exc:
            failure = (NON_FINITE, _first_line(exc))
        except Exception as exc:  # any failure costs only this batch's rows, never the run
            log.warning("batch of %d rows failed: %s: %s", len(batch), type(exc).__name__, exc)
            failure = (ERROR, f"error: {type(exc).__name__}: {_first_line(exc)}".strip())
        # Failures are handled here, outside the except blocks: a retry must not run while the failed
        # attempt's exception (and through its traceback, its frames and tensors) is still alive.
        if failure is not None:
            kind, message = failure
            self.stats.batches.append(BatchStat(len(batch), padded, self.clock() - start, 0, kind,
                                                estimate_s=estimate))
            if kind == OOM:
                return self._split(batch, requests, lengths, padded, message)
            if kind == ERROR:
                parts = self._by_tier(batch)
                if len(parts) == 1:
                    return {k: Outcome(None, message) for k in batch}
                # The failure may be one member's (its adapter, its sampling): each tier runs again on its own,
                # so the rows of a member that works are not lost with those of one that does not.
                for part in parts:
                    self._emit(self._run_batch(part, requests, lengths, retried=retried))
                return {}
            if not retried and self.recover is not None and self.recover(message):
                self.stats.recoveries.append(message)
                return self._run_batch(batch, requests, lengths, retried=True)
            log.warning("batch of %d rows gave non-finite logits: %s", len(batch), message)
            return {k: Outcome(None, NON_FINITE) for k in batch}
        seconds = self.clock() - start
        self.cost.update(len(batch), padded, out.prefill_s, out.decode_s, out.row_steps)
        self.stats.batches.append(BatchStat(
            len(batch), padded, seconds, sum(len(t) for t in out.tokens),
            "timed_out" if out.timed_out else "ok", out.prefill_s, out.decode_s, out.row_steps, estimate,
            out.prefill_tokens))
        cut = out.cut or [out.timed_out] * len(batch)
        return {k: Outcome(list(t), None, c) for k, t, c in zip(batch, out.tokens, cut)}

    def _by_tier(self, batch: list) -> list[list]:
        parts: dict = {}
        for k in batch:
            parts.setdefault(self._tiers.get(k, 0), []).append(k)
        return list(parts.values())

    def _split(self, batch: list, requests: Mapping, lengths: Mapping, padded: int, message: str) -> dict:
        if len(batch) == 1:
            log.warning("one row ran out of memory on its own; it falls back: %s", message)
            return {batch[0]: Outcome(None, OOM)}
        self.stats.oom_splits += 1
        # Later batches start no larger than what is known to fail, halved.
        self.token_cap = max(1, min(self.token_cap, self._slots(len(batch), padded) // 2))
        self.size_cap = max(1, min(self.size_cap, math.ceil(len(batch) / 2)))
        # The rest goes in pieces under the caps as they stand now: a half that fails lowers them again, and
        # the pieces after it never try a size already known to fail. Each piece is handed over as it ends.
        rest = list(batch)
        while rest:
            piece = self._next_batch(rest, lengths)
            rest = rest[len(piece):]
            self._emit(self._run_batch(piece, requests, lengths))
        return {}


def _first_line(exc: BaseException) -> str:
    text = str(exc)
    return text.splitlines()[0] if text else type(exc).__name__

