"""The scheduler by property, with fake engines and a fake clock: no model, no sleeps.

The main fake engine is deliberately unlike the scheduler's cost model: an uninterruptible prefill that grows
with the square of the width (attention), decoding steps with a fixed overhead plus a per-row cost that grows
with the context, rows of different answer lengths leaving the batch, and multiplicative noise.
"""

from __future__ import annotations

import gc
import random
import weakref

import pytest

from prompt_recovery.engine import BatchOutput
from prompt_recovery.scheduler import DEADLINE, NON_FINITE, OOM, CostModel, Hooks, Limits, Scheduler

MAX_NEW = 8


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class FakeEngine:
    """Answers a row with its own tokens (so order mix-ups show), as many as the row's own answer length."""

    def __init__(self, clock, seed=0, per_pos=2e-4, quad=2e-6, step_fixed=2e-3, step_per_row=2e-4, noise=0.3,
                 oom_above=None, fail_on=None):
        self.clock, self.rng = clock, random.Random(seed)
        self.per_pos, self.quad, self.step_fixed, self.step_per_row, self.noise = (
            per_pos, quad, step_fixed, step_per_row, noise)
        self.oom_above, self.fail_on = oom_above, fail_on
        self.batches: list[int] = []
        self.worst_uninterruptible = 0.0  # the longest prefill + one step seen

    def jitter(self) -> float:
        return 1 + self.rng.uniform(-self.noise, self.noise)

    def answer_len(self, row) -> int:
        return 1 + (len(row) * 7 + row[0]) % MAX_NEW

    def __call__(self, batch, max_time):
        self.batches.append(len(batch))
        if self.oom_above is not None and len(batch) > self.oom_above:
            raise MemoryError("CUDA out of memory (fake)")
        if self.fail_on is not None and any(self.fail_on in row for row in batch):
            raise RuntimeError("boom")
        start = self.clock.now
        width = max(len(r) for r in batch)
        prefill = len(batch) * (self.per_pos * width + self.quad * width**2) * self.jitter()
        self.clock.now += prefill
        out = [[row[0]] for row in batch]
        running = [k for k in range(len(batch)) if self.answer_len(batch[k]) > 1]
        steps = 0
        first_step = 0.0
        timed_out = False
        while running:
            if self.clock.now >= start + max_time:
                timed_out = True
                break
            cost = (self.step_fixed + self.step_per_row * len(running) * (1 + (width + len(out[0])) / 200))
            cost *= self.jitter()
            first_step = first_step or cost
            self.clock.now += cost
            steps += len(running)
            for k in running:
                out[k].append(batch[k][0])
            running = [k for k in running if len(out[k]) < self.answer_len(batch[k])]
        self.worst_uninterruptible = max(self.worst_uninterruptible, prefill + first_step)
        return BatchOutput(out, len(batch) * width, prefill, steps, self.clock.now - start - prefill, timed_out)


def make_prompts(n, seed, longest=400):
    rng = random.Random(seed)
    # Token values carry the row index so each answer can be traced back to its row.
    return {i: [i] * rng.randint(1, longest) for i in range(n)}


def scheduler(engine, clock, deadline, **kw):
    limits = {"deadline": deadline, "max_new_tokens": MAX_NEW, "max_batch_tokens": 4000, "max_batch_size": 16,
              "budget_per_row": 25.0}
    limits.update({k: kw.pop(k) for k in list(kw) if k in limits or k == "calibration_rows"})
    hooks = Hooks(**{k: kw.pop(k) for k in list(kw) if k in ("on_batch", "recover", "progress", "desc")})
    return Scheduler(engine, Limits(**limits), clock=clock, hooks=hooks, **kw)


@pytest.mark.parametrize("seed", range(8))
def test_every_row_answered_in_its_own_slot(seed):
    clock = FakeClock()
    engine = FakeEngine(clock, seed)
    prompts = make_prompts(random.Random(seed).randint(1, 60), seed)
    out = scheduler(engine, clock, deadline=1e9).run(prompts)
    assert set(out) == set(prompts)
    for i, o in out.items():
        assert o.reason is None
        assert o.tokens == [i] * engine.answer_len(prompts[i])


@pytest.mark.parametrize("seed", range(12))
def test_deadline_held_within_one_uninterruptible_prefill(seed):
    rng = random.Random(seed)
    clock = FakeClock()
    engine = FakeEngine(clock, seed, quad=rng.choice([0, 2e-6, 2e-5]), noise=rng.choice([0, 0.3, 0.6]))
    prompts = make_prompts(rng.randint(20, 120), seed)
    deadline = rng.uniform(0.3, 20)
    s = scheduler(engine, clock, deadline=deadline)
    out = s.run(prompts)
    assert set(out) == set(prompts)
    # Decoding is bounded in time; what may overrun is one batch's prefill and one step.
    assert clock.now <= deadline + engine.worst_uninterruptible + 1e-9
    fallen = [i for i, o in out.items() if o.tokens is None]
    assert all(out[i].reason == DEADLINE for i in fallen)
    assert len(out) - len(fallen) == sum(b.rows for b in s.stats.batches)
    # An honest cost model starts no batch it cannot finish: at most the last batch is cut short.
    cut = [i for i, o in out.items() if o.timed_out]
    assert len(cut) <= s.stats.batches[-1].rows
    if fallen:
        # ...and does not give up early: the time left unused would not have paid for one more row.
        nxt = min(len(prompts[i]) for i in fallen)
        one_row = 1.6 * (engine.per_pos * nxt + engine.quad * nxt**2 + MAX_NEW * (
            engine.step_fixed + engine.step_per_row * (1 + (nxt + MAX_NEW) / 200)))
        assert deadline - clock.now < 4 * one_row + 0.05 * deadline


@pytest.mark.parametrize("seed", range(4))
def test_deadline_held_when_the_engine_slows_down_unforeseeably(seed):
    """Estimates can be wrong (thermal throttling, a neighbour on the GPU): the per-batch time bound holds."""
    clock = FakeClock()
    engine = FakeEngine(clock, seed, noise=0)
    calls = {"n": 0}
    real = engine.__call__

    def slowing(batch, max_time):
        calls["n"] += 1
        if calls["n"] == 3:
            engine.step_fixed *= 500
            engine.step_per_row *= 500
        return real(batch, max_time)

    prompts = make_prompts(80, seed)
    deadline = 3.0
    out = scheduler(slowing, clock, deadline=deadline).run(prompts)
    assert set(out) == set(prompts)
    assert clock.now <= deadline + engine.worst_uninterruptible + 1e-9


def test_cost_model_counts_prefill_and_decoding_separately():
    cost = CostModel(max_new_tokens=32)
    # 8 rows of width 100: 0.8 s of prefill; rows stopped after 4 steps on average: 32 row-steps in 0.32 s.
    cost.update(rows=8, width=100, prefill_s=0.8, decode_s=0.32, row_steps=32)
    assert cost.prefill(8, 100) == pytest.approx(0.8)
    assert cost.decode(8, 100) == pytest.approx(0.32)  # 4 steps a row, not max_new_tokens
    assert cost.total(16, 100) == pytest.approx(2 * 1.12)
    assert cost.prefill(8, 200) == pytest.approx(0.8 * 2 * 2)  # wider: charged as quadratic, never less
    # A faster measurement moves the rate only halfway: underestimates are what overrun deadlines.
    cost.update(rows=8, width=100, prefill_s=0.4, decode_s=0.32, row_steps=32)
    assert cost.prefill(8, 100) == pytest.approx(0.6)


def test_estimate_stops_batches_that_cannot_fit():
    clock = FakeClock()
    engine = FakeEngine(clock, per_pos=0.01, quad=0, step_fixed=0, step_per_row=0.001, noise=0)
    prompts = {i: [i] * 100 for i in range(10)}
    # One row costs 1 s of prefill plus a few ms of decoding: three fit in 3.2 s, never a fourth.
    s = scheduler(engine, clock, deadline=3.2, max_batch_size=1)
    out = s.run(prompts)
    assert sum(o.tokens is not None for o in out.values()) == 3
    assert clock.now <= 3.2
    assert engine.batches == [1, 1, 1]


def test_batches_fill_the_size_and_token_caps():
    clock = FakeClock()
    engine = FakeEngine(clock)
    prompts = {i: [i] * 50 for i in range(40)}
    scheduler(engine, clock, deadline=1e9, max_batch_tokens=58 * 16, max_batch_size=4, calibration_rows=4).run(prompts)
    assert engine.batches == [4] * 10  # every batch full, none above the cap
    engine.batches.clear()
    scheduler(engine, clock, deadline=1e9, max_batch_tokens=58 * 3, max_batch_size=64, calibration_rows=3).run(prompts)
    assert engine.batches == [3] * 13 + [1]  # the token budget allows three rows of 50 + 8


def test_tiers_are_served_in_order():
    clock = FakeClock()
    engine = FakeEngine(clock, noise=0)
    prompts = {(i, m): [i] * (10 + 30 * i) for i in range(6) for m in range(2)}
    tiers = {k: k[1] for k in prompts}
    seen: list = []
    scheduler(engine, clock, deadline=1e9, max_batch_size=3, on_batch=lambda d: seen.extend(d)).run(prompts, tiers)
    assert [k[1] for k in seen] == [0] * 6 + [1] * 6  # every row's first candidate before anyone's second
    assert [k[0] for k in seen[:6]] == list(range(6))  # shortest first inside a tier


def test_a_failing_member_in_a_mixed_batch_costs_only_its_own_rows():
    clock = FakeClock()
    # Member 1's rows carry a poisoned token; its batches fail wherever they run.
    prompts = {(i, m): [i] * 20 + ([999] if m == 1 else []) for i in range(7) for m in range(2)}
    tiers = {k: k[1] for k in prompts}
    fake = FakeEngine(clock, noise=0, fail_on=999)
    mixed = []

    def engine(batch, max_time):
        mixed.append(len({999 in row for row in batch}) > 1)
        return fake(batch, max_time)

    out = scheduler(engine, clock, deadline=1e9, max_batch_size=4).run(prompts, tiers)
    assert any(mixed)  # the case under test happened: one batch held rows of both members
    assert len(out) == 14
    assert all(out[(i, 0)].tokens for i in range(7))  # every row of the working member is answered
    assert all(out[(i, 1)].tokens is None and out[(i, 1)].reason == "error: RuntimeError: boom" for i in range(7))


def test_a_failing_batch_costs_only_its_rows():
    clock = FakeClock()
    engine = FakeEngine(clock, fail_on=7)
    prompts = {i: [i] * (10 + i) for i in range(20)}
    out = scheduler(engine, clock, deadline=1e9, max_batch_size=4).run(prompts)
    failed = {i for i, o in out.items() if o.tokens is None}
    assert 7 in failed and len(failed) == 4  # its batch of four, no more
    assert all(out[i].reason.startswith("error: RuntimeError") for i in failed)
    assert all(out[i].tokens == [i] * engine.answer_len(prompts[i]) for i in set(prompts) - failed)


def test_out_of_memory_halves_down_and_all_rows_finish():
    clock = FakeClock()
    engine = FakeEngine(clock, oom_above=4)
    prompts = {i: [i] * 20 for i in range(48)}
    s = scheduler(engine, clock, deadline=1e9, max_batch_size=16, calibration_rows=16)
    out = s.run(prompts)
    assert all(o.tokens == [i] * engine.answer_len(prompts[i]) for i, o in out.items())
    assert s.stats.oom_splits == 2  # 16 -> 8 -> 4: no cascade below what fits
    # Only the first batch tried 16 rows; later ones start no larger than what was seen to fail, halved.
    assert engine.batches[:3] == [16, 8, 4] and max(engine.batches[3:]) <= 4
    assert [b.status for b in s.stats.batches].count(OOM) == 2


def test_retry_starts_after_the_failed_batch_memory_is_gone():
    """The failed attempt's tensors must be released before the halves run (not kept by a traceback)."""
    import torch

    clock = FakeClock()
    held: list[weakref.ref] = []
    alive_at_retry: list[bool] = []

    def engine(batch, max_time):
        if held:
            gc.disable()  # only dropped references may free it, not a collection the retry happens to trigger
            alive_at_retry.append(any(r() is not None for r in held))
            gc.enable()
        if len(batch) > 2:
            activations = torch.ones(256, 256)
            held.append(weakref.ref(activations))
            raise MemoryError("CUDA out of memory (fake)")
        return BatchOutput([[1] for _ in batch], len(batch), 0.0, 0, 0.0)

    out = scheduler(engine, clock, deadline=1e9, max_batch_size=4, calibration_rows=4).run(
        {i: [i] * 5 for i in range(4)})
    assert all(o.tokens == [1] for o in out.values())
    assert alive_at_retry and not any(alive_at_retry)


def test_a_row_that_runs_out_of_memory_alone_falls_back_alone():
    clock = FakeClock()

    def engine(batch, max_time):
        if any(5 in row for row in batch):
            raise MemoryError("out of memory")
        return BatchOutput([row[:2] for row in batch], 0, 0.0, 0, 0.0)

    prompts = {i: [i] * 10 for i in range(9)}
    out = scheduler(engine, clock, deadline=1e9).run(prompts)
    assert out[5].tokens is None and out[5].reason == OOM
    assert all(out[i].tokens == [i, i] for i in prompts if i != 5)


def test_non_finite_logits_recover_once_then_fall_back():
    clock = FakeClock()
    state = {"safe": False, "calls": 0}

    def engine(batch, max_time):
        state["calls"] += 1
        if not state["safe"]:
            raise FloatingPointError("non-finite logits")
        return BatchOutput([[7] for _ in batch], 0, 0.0, 0, 0.0)

    def recover(message):
        changed = not state["safe"]
        state["safe"] = True
        return changed

    s = scheduler(engine, clock, deadline=1e9, recover=recover)
    out = s.run({i: [i] for i in range(6)})
    assert all(o.tokens == [7] for o in out.values()) and s.stats.recoveries == ["non-finite logits"]

    s = scheduler(lambda b, t: (_ for _ in ()).throw(FloatingPointError("nan")), clock, deadline=1e9,
                  recover=lambda m: False)
    out = s.run({i: [i] for i in range(3)})
    assert all(o.reason == NON_FINITE for o in out.values())


def test_wrong_row_count_from_engine_is_an_error_not_a_shift():
    clock = FakeClock()
    out = scheduler(lambda b, t: BatchOutput([[1]] * (len(b) - 1)), clock, deadline=1e9).run({0: [1], 1: [2]})
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
        return BatchOutput([[1] for _ in batch], 1, 0.0, 0, 0.0)

    scheduler(engine, clock, deadline=1e9, budget_per_row=2.0, max_batch_size=3).run({i: [i] for i in range(6)})
    assert bounds == [2.0, 6.0, 4.0]  # a one-row calibration batch, then batches of 3 and 2 rows


def test_first_batch_is_a_small_calibration_batch():
    clock = FakeClock()
    engine = FakeEngine(clock)
    scheduler(engine, clock, deadline=1e9, calibration_rows=2).run({i: [i] * 10 for i in range(20)})
    assert engine.batches[0] == 2 and max(engine.batches[1:]) > 2


def test_length_function_counts_virtual_tokens():
    clock = FakeClock()
    widths = []

    def engine(batch, max_time):
        widths.append(max(len(r) for r in batch))
        return BatchOutput([[1] for _ in batch], 1, 0.0, 0, 0.0)

    # Rows of 10 ids plus 30 virtual tokens: a token cap of 2 x (40 + 8) allows two rows, not three.
    s = scheduler(engine, clock, deadline=1e9, max_batch_tokens=2 * 48, length=lambda r: len(r) + 30,
                  calibration_rows=8)
    s.run({i: [i] * 10 for i in range(6)})
    assert [b.rows for b in s.stats.batches] == [2, 2, 2] and all(b.padded_len == 40 for b in s.stats.batches)


def test_a_failing_callback_costs_nothing_and_split_pieces_are_handed_over_as_they_end():
    clock = FakeClock()
    engine = FakeEngine(clock, oom_above=2)
    calls: list[int] = []

    def on_batch(done):
        calls.append(len(done))
        if len(calls) == 1:
            raise OSError("disk full")  # the first write fails; the run goes on

    s = scheduler(engine, clock, deadline=1e9, max_batch_size=8, calibration_rows=8, on_batch=on_batch)
    out = s.run({i: [i] * 10 for i in range(8)})
    assert all(o.tokens is not None for o in out.values())
    assert calls == [2, 2, 2, 2]  # 8 fails, 4 fails, then each piece of 2 is handed over on its own
