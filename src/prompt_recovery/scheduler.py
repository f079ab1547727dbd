"""Run generation over all rows under a deadline; every row comes back, in its own slot, whatever fails.

Rows are sorted by prompt length so each batch pads little, and batches are bounded by a token budget
(rows x (padded prompt + max_new_tokens)). Before each batch the time it needs is estimated from the
throughput measured so far and the batch is only started (or shrunk) to fit the time left; each batch's
generation is also bounded in time, so the deadline is overrun by at most one batch's prefill. Out of
memory halves the batch down to one row; any other error costs only that batch's rows. The scheduler
sees token ids as opaque lists and knows nothing of tokenizers or torch.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

from tqdm.auto import tqdm

log = logging.getLogger(__name__)

GenerateFn = Callable[[Sequence[Sequence[int]], "float | None"], list[list[int]]]

DEADLINE = "deadline"
OOM = "out_of_memory"


@dataclass
class Outcome:
    tokens: list[int] | None
    """Generated ids, or None where the row falls back."""
    reason: str | None = None
    """Why the row falls back (None when it was generated)."""
    timed_out: bool = False
    """Its batch hit the time bound, so the generation may be cut short."""


@dataclass
class BatchStat:
    rows: int
    padded_len: int
    seconds: float
    new_tokens: int
    status: str


@dataclass
class SchedulerStats:
    batches: list[BatchStat] = field(default_factory=list)
    oom_splits: int = 0

    def as_dict(self) -> dict:
        return {"batches": [asdict(b) for b in self.batches], "oom_splits": self.oom_splits}


class Scheduler:
    def __init__(
        self,
        generate: GenerateFn,
        *,
        deadline: float,
        max_new_tokens: int,
        max_batch_tokens: int,
        max_batch_size: int,
        budget_per_row: float,
        clock: Callable[[], float] = time.monotonic,
        on_batch: Callable[[dict[int, Outcome]], None] | None = None,
        progress: bool = False,
        calibration_rows: int = 4,
    ) -> None:
        self.generate = generate
        self.deadline = deadline
        self.max_new_tokens = max_new_tokens
        self.token_cap = max_batch_tokens
        self.size_cap = max_batch_size
        self.budget_per_row = budget_per_row
        self.clock = clock
        self.on_batch = on_batch
        self.progress = progress
        self.calibration_rows = max(1, calibration_rows)
        self.rate: float | None = None  # seconds per token slot (row x position), measured
        self.stats = SchedulerStats()

    def _cost(self, rows: int, padded: int) -> int:
        return rows * (padded + self.max_new_tokens)

    def _next_batch(self, queue: list[int], prompts: Mapping[int, Sequence[int]]) -> list[int]:
        batch: list[int] = []
        for idx in queue:
            padded = len(prompts[idx])  # the queue is sorted by length: the newest row is the longest
            # A single row always forms a batch, however long: it was truncated to fit by the prompt stage.
            if batch and (len(batch) >= self.size_cap or self._cost(len(batch) + 1, padded) > self.token_cap):
                break
            batch.append(idx)
        return batch

    def _fit_to_time(self, batch: list[int], prompts: Mapping[int, Sequence[int]], left: float) -> list[int]:
        if self.rate is None:
            # Nothing measured yet: a small first batch measures the rate, so an uninterruptible prefill
            # of a full batch can never be what overruns a tight deadline.
            return batch[: self.calibration_rows]
        padded = max(len(prompts[i]) for i in batch)
        per_row = self.rate * (padded + self.max_new_tokens)
        fit = int(left // per_row) if per_row > 0 else len(batch)
        return batch[: max(0, min(fit, len(batch)))]

    def run(self, prompts: Mapping[int, Sequence[int]]) -> dict[int, Outcome]:
        """Generate for every row of ``prompts`` ({row index: token ids}); one Outcome per row."""
        queue = sorted(prompts, key=lambda i: (len(prompts[i]), i))
        results: dict[int, Outcome] = {}
        bar = tqdm(total=len(queue), disable=not self.progress, unit="row", desc="predict")
        fallbacks = 0
        try:
            while queue:
                left = self.deadline - self.clock()
                batch = self._next_batch(queue, prompts)
                batch = self._fit_to_time(batch, prompts, left) if left > 0 else []
                if not batch:
                    # The rows left cannot be reached in time: they fall back now rather than overrun.
                    done = {i: Outcome(None, DEADLINE) for i in queue}
                    self._emit(done, results)
                    fallbacks += len(done)
                    bar.update(len(done))
                    break
                queue = queue[len(batch):]
                done = self._run_batch(batch, prompts)
                self._emit(done, results)
                fallbacks += sum(1 for o in done.values() if o.tokens is None)
                bar.update(len(done))
                bar.set_postfix(fallback=fallbacks, refresh=False)
        finally:
            bar.close()
        return results

    def _emit(self, done: dict[int, Outcome], results: dict[int, Outcome]) -> None:
        results.update(done)
        if self.on_batch is not None and done:
            self.on_batch(done)

    def _run_batch(self, batch: list[int], prompts: Mapping[int, Sequence[int]]) -> dict[int, Outcome]:
        left = self.deadline - self.clock()
        if left <= 0:
            return {i: Outcome(None, DEADLINE) for i in batch}
        # Each batch is bounded by its own rows' share as well as by the run, so one slow batch cannot
        # eat the time of every row behind it.
        max_time = min(left, len(batch) * self.budget_per_row)
        padded = max(len(prompts[i]) for i in batch)
        start = self.clock()
        try:
            out = self.generate([prompts[i] for i in batch], max_time)
            if len(out) != len(batch):
                raise RuntimeError(f"engine returned {len(out)} rows for a batch of {len(batch)}")
        except MemoryError as exc:
            return self._split(batch, prompts, padded, start, exc)
        except Exception as exc:  # any failure costs only this batch's rows, never the run
            seconds = self.clock() - start
            log.warning("batch of %d rows failed: %s: %s", len(batch), type(exc).__name__, exc)
            self.stats.batches.append(BatchStat(len(batch), padded, seconds, 0, "error"))
            reason = f"error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".strip()
            return {i: Outcome(None, reason) for i in batch}
        seconds = self.clock() - start
        longest = max((len(t) for t in out), default=0)
        timed_out = seconds >= max_time
        slots = len(batch) * (padded + max(longest, 1))
        if seconds > 0 and slots > 0:
            measured = seconds / slots
            # Keep the slower of the estimates: underestimating is what overruns a deadline.
            self.rate = measured if self.rate is None else max(measured, 0.5 * (self.rate + measured))
        self.stats.batches.append(
            BatchStat(len(batch), padded, seconds, sum(len(t) for t in out), "timed_out" if timed_out else "ok")
        )
        return {i: Outcome(list(t), None, timed_out) for i, t in zip(batch, out)}

    def _split(self, batch, prompts, padded, start, exc) -> dict[int, Outcome]:
        self.stats.batches.append(BatchStat(len(batch), padded, self.clock() - start, 0, "out_of_memory"))
        if len(batch) == 1:
            log.warning("one row ran out of memory on its own; it falls back: %s", exc)
            return {batch[0]: Outcome(None, OOM)}
        self.stats.oom_splits += 1
        # Later batches start no larger than what is known to fail, halved.
        self.token_cap = max(1, min(self.token_cap, self._cost(len(batch), padded) // 2))
        self.size_cap = max(1, min(self.size_cap, math.ceil(len(batch) / 2)))
        half = math.ceil(len(batch) / 2)
        done: dict[int, Outcome] = {}
        for part in (batch[:half], batch[half:]):
            done.update(self._run_batch(part, prompts))
        return done
