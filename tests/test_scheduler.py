"""The scheduler by property, with fake engines and a fake clock: no model, no sleeps."""

from __future__ import annotations

import random

import pytest

from prompt_recovery.scheduler import DEADLINE, OOM, Scheduler


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class FakeEngine:
    """Costs `per_slot` seconds per (row x position); honours max_time like the real engine.

    The answer for a row is its own prompt reversed, so order mix-ups show. `prefill` is the part of a
    batch that cannot be interrupted.
    """

    def __init__(self, clock, per_slot=0.001, new_tokens=8, prefill=0.01, oom_above=None, fail_on=None):
        self.clock, self.per_slot, self.new_tokens, self.prefill = clock, per_slot, new_tokens, prefill
        self.oom_above, self.fail_on = oom_above, fail_on
        self.batches: list[int] = []

    def __call__(self, batch, max_time):
        self.batches.append(len(batch))
        if self.oom_above is not None and len(batch) > self.oom_above:
            raise MemoryError("CUDA out of memory (fake)")
        if self.fail_on is not None and any(self.fail_on in row for row in batch):
            raise RuntimeError("boom")
        width = max(len(r) for r in batch)
        cost = self.per_slot * len(batch) * (width + self.new_tokens)
        self.clock.now += self.prefill + min(cost, max_time if max_time is not None else cost)
        return [list(reversed(r))[: self.new_tokens] for r in batch]


def make_prompts(n, seed):
    rng = random.Random(seed)
    # Token values carry the row index so each answer can be traced back to its row.
    return {i: [i] * rng.randint(1, 300) for i in range(n)}


def scheduler(engine, clock, deadline, **kw):
    args = {"deadline": deadline, "max_new_tokens": 8, "max_batch_tokens": 2000, "max_batch_size": 16,
                "budget_per_row": 25.0, "clock": clock}
    args.update(kw)
    return Scheduler(engine, **args)


@pytest.mark.parametrize("seed", range(8))
def test_every_row_answered_in_its_own_slot(seed):
    clock = FakeClock()
    engine = FakeEngine(clock)
    prompts = make_prompts(random.Random(seed).randint(1, 60), seed)
    out = scheduler(engine, clock, deadline=1e9).run(prompts)
    assert set(out) == set(prompts)
    for i, o in out.items():
        assert o.reason is None
        assert o.tokens == [i] * min(8, len(prompts[i]))


@pytest.mark.parametrize("seed", range(8))
def test_deadline_held_and_unreached_rows_fall_back(seed):
    rng = random.Random(seed)
    clock = FakeClock()
    engine = FakeEngine(clock, per_slot=rng.uniform(0.0005, 0.01))
    prompts = make_prompts(rng.randint(20, 80), seed)
    deadline = rng.uniform(0.5, 20)
    out = scheduler(engine, clock, deadline=deadline).run(prompts)
    assert set(out) == set(prompts)
    # Overrun by at most one batch's uninterruptible prefill.
    assert clock.now <= deadline + engine.prefill + 1e-9
    fallen = [i for i, o in out.items() if o.tokens is None]
    assert all(out[i].reason == DEADLINE for i in fallen)
    assert len(out) - len(fallen) == sum(engine.batches)


def test_estimate_stops_batches_that_cannot_fit():
    clock = FakeClock()
    engine = FakeEngine(clock, per_slot=0.01, prefill=0.0)
    prompts = {i: [i] * 100 for i in range(10)}
    # One row costs 0.01 * 108 = 1.08 s; 10 rows per batch would need 10.8 s.
    s = scheduler(engine, clock, deadline=3.0, max_batch_size=1)
    out = s.run(prompts)
    assert sum(o.tokens is not None for o in out.values()) == 2
    assert clock.now <= 3.0
    # Never started a third row that the measured rate said would not fit.
    assert engine.batches == [1, 1]


def test_batches_respect_token_budget_and_size():
    clock = FakeClock()
    engine = FakeEngine(clock)
    prompts = {i: [i] * 50 for i in range(40)}
    scheduler(engine, clock, deadline=1e9, max_batch_tokens=58 * 5, max_batch_size=4).run(prompts)
    assert max(engine.batches) == 4
    scheduler(engine, clock, deadline=1e9, max_batch_tokens=58 * 3, max_batch_size=64).run(prompts)
    assert engine.batches[-1] <= 3


def test_a_failing_batch_costs_only_its_rows():
    clock = FakeClock()
    engine = FakeEngine(clock, fail_on=7)
    prompts = {i: [i] * (10 + i) for i in range(20)}
    out = scheduler(engine, clock, deadline=1e9, max_batch_size=4).run(prompts)
    failed = {i for i, o in out.items() if o.tokens is None}
    assert 7 in failed and len(failed) == 4  # its batch of four, no more
    assert all(out[i].reason.startswith("error: RuntimeError") for i in failed)
    assert all(out[i].tokens == [i] * 8 for i in set(prompts) - failed)


def test_out_of_memory_halves_down_and_all_rows_finish():
    clock = FakeClock()
    engine = FakeEngine(clock, oom_above=3)
    prompts = {i: [i] * 20 for i in range(48)}
    s = scheduler(engine, clock, deadline=1e9, max_batch_size=16, calibration_rows=16)
    out = s.run(prompts)
    assert all(o.tokens == [i] * 8 for i, o in out.items())
    assert s.stats.oom_splits >= 2
    # Only the first batch tried 16 rows; later ones start no larger than what was seen to fail, halved.
    assert engine.batches.count(16) == 1
    assert engine.batches.count(8) <= 2


def test_a_row_that_runs_out_of_memory_alone_falls_back_alone():
    clock = FakeClock()

    def engine(batch, max_time):
        if any(5 in row for row in batch):
            raise MemoryError("out of memory")
        return [row[:2] for row in batch]

    prompts = {i: [i] * 10 for i in range(9)}
    out = scheduler(engine, clock, deadline=1e9).run(prompts)
    assert out[5].tokens is None and out[5].reason == OOM
    assert all(out[i].tokens == [i, i] for i in prompts if i != 5)


def test_wrong_row_count_from_engine_is_an_error_not_a_shift():
    clock = FakeClock()
    out = scheduler(lambda b, t: [[1]], clock, deadline=1e9).run({0: [1], 1: [2]})
    assert all(o.tokens is None and o.reason.startswith("error") for o in out.values())


def test_on_batch_sees_every_row_once():
    clock = FakeClock()
    seen: list[int] = []
    prompts = make_prompts(30, 1)
    scheduler(FakeEngine(clock), clock, deadline=2.0, on_batch=lambda d: seen.extend(d)).run(prompts)
    assert sorted(seen) == sorted(prompts)


def test_batch_time_bound_is_its_rows_share():
    clock = FakeClock()
    bounds = []

    def engine(batch, max_time):
        bounds.append(max_time)
        return [[1] for _ in batch]

    scheduler(engine, clock, deadline=1e9, budget_per_row=2.0, max_batch_size=3).run({i: [i] for i in range(6)})
    assert bounds == [6.0, 6.0]


def test_first_batch_is_a_small_calibration_batch():
    clock = FakeClock()
    engine = FakeEngine(clock)
    scheduler(engine, clock, deadline=1e9, calibration_rows=2).run({i: [i] * 10 for i in range(20)})
    assert engine.batches[0] == 2 and max(engine.batches[1:]) > 2
