"""predict end to end on the tiny model: faults, resume, deadline, and kill -9 at random moments."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import assert_valid_submission, write_test_csv

from prompt_recovery import model as model_lib
from prompt_recovery.config import BudgetArgs, GenerationArgs, ModelArgs, PredictArgs
from prompt_recovery.predict import predict, shipped_text
from prompt_recovery.submission import CandidateLog, SubmissionError, write_submission

FALLBACK = shipped_text("mean_prompt.txt")


class Counting:
    """Watches a model's forward: counts prefill rows and can raise on the n-th prefill (a batch)."""

    def __init__(self, model, fail_on_call=None, exc=KeyboardInterrupt):
        self.model, self.fail_on_call, self.exc = model, fail_on_call, exc
        self.calls = self.rows = 0
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        base.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs):
        x = kwargs.get("input_ids")
        x = kwargs["inputs_embeds"] if x is None else x
        if x.shape[1] == 1:
            return  # a decoding step, not a batch's prefill
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise self.exc("injected")
        self.rows += x.shape[0]


def loader_with(wrapper_kwargs, seen):
    def load(args: ModelArgs):
        loaded = model_lib.load(args)
        seen.append(Counting(loaded.model, **wrapper_kwargs))
        return loaded

    return load


def args_for(tmp_path, model_dir, n=10, **kw):
    write_test_csv(tmp_path / "t.csv", n=n)
    return PredictArgs(test_csv=str(tmp_path / "t.csv"), output=str(tmp_path / "s.csv"), progress=False,
                       model=ModelArgs(model=model_dir, adapter="none"),
                       generation=GenerationArgs(max_new_tokens=6, max_batch_size=2), **kw)


def test_resume_skips_rows_finished_before_a_crash(tiny_model_dir, tmp_path):
    args = args_for(tmp_path, tiny_model_dir, n=10)
    ids = [f"{i:04d}" for i in range(10)]
    seen: list[Counting] = []
    with pytest.raises(KeyboardInterrupt):
        predict(args, loader=loader_with({"fail_on_call": 3}, seen))
    partial = assert_valid_submission(args.output, ids)
    finished = sum(p != FALLBACK for p in partial)
    before = seen[0].rows  # rows generated before the crash (its batches: a one-row calibration, then more)
    assert 1 <= before < 10 and finished >= 1

    args.resume = True
    report = predict(args, loader=loader_with({}, seen))
    assert report.resumed == before and report.members[0]["resumed"] == before
    assert f"{before} resumed" in report.summary()
    assert seen[1].rows == 10 - before  # only the rows the crash left
    final = assert_valid_submission(args.output, ids)
    assert all(f == p for f, p in zip(final, partial) if p != FALLBACK)  # finished rows kept as they were

    # A fresh run without --resume starts over.
    args.resume = False
    predict(args, loader=loader_with({}, seen))
    assert seen[2].rows == 10


def test_checkpoint_of_another_input_is_ignored(tiny_model_dir, tmp_path):
    args = args_for(tmp_path, tiny_model_dir, n=4)
    predict(args)
    write_test_csv(tmp_path / "t.csv", n=5)  # the input changed under the same output name
    args.resume = True
    seen: list[Counting] = []
    report = predict(args, loader=loader_with({}, seen))
    assert report.resumed == 0 and seen[0].rows == 5


def test_torn_candidates_line_is_skipped(tmp_path):
    cp = CandidateLog(str(tmp_path / "c.jsonl"), "abc")
    cp.start(keep=False)
    cp.append([{"row": 0, "id": "a", "member": "m@1", "name": "m", "sample": 0, "text": "Make it formal."}])
    with open(cp.path, "a") as f:
        f.write('{"row": 1, "id": "b", "member": "m@1", "name": "m", "sam')
    assert [r["text"] for r in cp.load(["a", "b"])] == ["Make it formal."]
    assert CandidateLog(cp.path, "another input").load(["a", "b"]) == []


def test_a_failing_load_leaves_an_all_fallback_submission(tiny_model_dir, tmp_path):
    args = args_for(tmp_path, tiny_model_dir, n=3)

    def broken(_):
        raise RuntimeError("CUDA driver exploded")

    report = predict(args, loader=broken)
    assert report.error and "CUDA driver exploded" in report.error
    assert assert_valid_submission(args.output, ["0000", "0001", "0002"]) == [FALLBACK] * 3
    assert report.fallback == 3


def test_a_batch_that_raises_costs_only_its_rows(tiny_model_dir, tmp_path):
    args = args_for(tmp_path, tiny_model_dir, n=6)
    seen: list[Counting] = []
    report = predict(args, loader=loader_with({"fail_on_call": 2, "exc": ValueError}, seen))
    prompts = assert_valid_submission(args.output, [f"{i:04d}" for i in range(6)])
    assert report.error is None
    assert sum(r.startswith("error") for r in report.fallback_reasons) == 1
    assert report.fallback_reasons[next(iter(report.fallback_reasons))] == 2
    assert sum(p == FALLBACK for p in prompts) >= 2


def test_deadline_with_a_fake_clock(tiny_model_dir, tmp_path):
    ticks = iter(range(0, 10_000, 7))  # every look at the clock costs 7 fake seconds

    def clock():
        return float(next(ticks))

    args = args_for(tmp_path, tiny_model_dir, n=20, budget=BudgetArgs(time_limit=100, safety_margin=5))
    report = predict(args, clock=clock)
    assert_valid_submission(args.output, [f"{i:04d}" for i in range(20)])
    assert report.fallback_reasons.get("deadline", 0) > 0
    # The scheduler stops starting batches once the (fake) deadline is near. What may pass the deadline: the
    # engine's last step check and its timing read, the scheduler's batch timing and next check, predict's
    # timing reads: eight looks at the clock. Ignoring the deadline would cost hundreds of seconds.
    assert report.elapsed_s <= 100 + 7 * 8


def test_report_file_has_the_promised_fields(tiny_model_dir, tmp_path):
    args = args_for(tmp_path, tiny_model_dir, n=5, report=str(tmp_path / "r.json"))
    predict(args)
    rep = json.loads((tmp_path / "r.json").read_text())
    for key in ("rows", "generated", "fallback", "fallback_reasons", "batches", "tokens_per_s", "deadline_used",
                "peak_rss_mb", "model", "elapsed_s"):
        assert key in rep
    assert rep["rows"] == 5 and rep["generated"] + rep["fallback"] + rep["rule_based"] == 5


def test_writer_refuses_an_invalid_submission_and_keeps_the_old(tmp_path):
    out = tmp_path / "s.csv"
    write_submission(str(out), ["1", "2"], ["a b", "c d"])
    with pytest.raises(SubmissionError):
        write_submission(str(out), ["1", "2"], ["a b", "  "])
    assert_valid_submission(out, ["1", "2"])
    assert sorted(os.listdir(tmp_path)) == ["s.csv"]  # no temporary file left behind


def _temporaries(folder) -> list[str]:
    return sorted(p for p in os.listdir(folder) if p.startswith(".s.csv.tmp-"))


class FolderEvents:
    """Linux inotify on one folder, through ctypes (the standard library has no binding): the file events
    as they happen, so a watcher sleeps until there is something to see and takes no CPU from the run."""

    MODIFY, MOVED_TO, CREATE = 0x2, 0x80, 0x100

    def __init__(self, folder) -> None:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        self.fd = libc.inotify_init1(os.O_CLOEXEC)
        if self.fd < 0 or libc.inotify_add_watch(self.fd, os.fsencode(folder), self.MODIFY | self.MOVED_TO
                                                 | self.CREATE) < 0:
            raise OSError(ctypes.get_errno(), "inotify")
        self.pending = b""

    def wait(self, timeout: float) -> list[tuple[int, str]]:
        """(event mask, file name) of what happened, waiting at most ``timeout`` for the first."""
        import select
        import struct

        if not select.select([self.fd], [], [], timeout)[0]:
            return []
        data, events = os.read(self.fd, 1 << 16), []
        while data:
            _wd, mask, _cookie, size = struct.unpack_from("iIII", data)
            events.append((mask, data[16:16 + size].rstrip(b"\0").decode()))
            data = data[16 + size:]
        return events

    def close(self) -> None:
        os.close(self.fd)


def _watch(proc, out, ids, kill_at_write=None):
    """Follow a predict run through its folder's events: every version of the output is read and validated
    as it appears, as any reader (Kaggle's scorer after a killed notebook cell) would get it, and the output
    must never be written in place (a reader would see it truncated). With ``kill_at_write=k`` the run gets
    SIGKILL as soon as its k-th write has opened its temporary file. Returns (writes begun, versions)."""
    events = FolderEvents(out.parent)
    writes = versions = 0
    try:
        while True:
            running = proc.poll() is None
            for mask, name in events.wait(0.2):
                if name.startswith(f".{out.name}.tmp-") and mask & events.CREATE:
                    writes += 1
                    if writes == kill_at_write:
                        proc.kill()
                        proc.wait()
                        return writes, versions
                elif name == out.name:
                    assert not mask & events.MODIFY, "the output was written in place, not replaced whole"
                    versions += 1
                    assert_valid_submission(out, ids)  # raises on a torn, short or half-written file
            if not running:
                return writes, versions
    finally:
        events.close()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="watches the folder with Linux inotify")
def test_kill_9_during_the_writes_of_a_large_submission(tiny_model_dir, tmp_path):
    """Thousands of rows, one new token each and a long fallback prompt: every batch rewrites a ~2 MB file,
    so the run spends its time writing. Killed inside a write, the output is the previous or the next
    complete submission, never a mix, at the kill and at every moment before; the temporary file the kill
    leaves is removed by the next run, which resumes and finishes."""
    n = 1000
    ids = write_test_csv(tmp_path / "t.csv", n=n)
    out = tmp_path / "s.csv"
    fallback = " ".join(["Rewrite the text in another style, keeping its meaning."] * 25)
    cmd = [sys.executable, "-m", "prompt_recovery", "predict", str(tmp_path / "t.csv"), "-o", str(out),
           "--model", tiny_model_dir, "--adapter", "none", "--max-batch-size", "256", "--max-new-tokens", "1",
           "--fallback-prompt", fallback, "--no-progress", "--report", str(tmp_path / "r.json")]

    def start(*extra):
        return subprocess.Popen(cmd + list(extra), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    proc = start()
    writes, versions = _watch(proc, out, ids, kill_at_write=3)
    assert proc.returncode == -signal.SIGKILL and writes == 3 and versions >= 2  # killed among the rewrites
    assert_valid_submission(out, ids)
    # SIGKILL lets no process clean up: the write it was in leaves its temporary file (unless the kill
    # came after the replace); either way it is not the output, and the next run must remove it.
    stale = tmp_path / f".s.csv.tmp-{proc.pid}"
    if not stale.exists():
        stale.write_text("id,rewrite_prompt\n0000,torn")
    assert _temporaries(tmp_path) == [stale.name]

    proc = start("--resume")
    _writes, versions = _watch(proc, out, ids)
    assert proc.returncode == 0 and versions > 1
    prompts = assert_valid_submission(out, ids)
    assert _temporaries(tmp_path) == []  # the killed run's temporary file is gone
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["resumed"] > 0 and report["resumed"] + report["generated"] == n  # nothing done twice
    assert sum(p != fallback for p in prompts) == n


def test_a_load_slower_than_the_budget_is_abandoned_and_the_deadline_holds(tiny_model_dir, tmp_path):
    import threading

    release = threading.Event()

    def stuck(_):
        release.wait(30)  # a load that outlives the whole budget (slow disk, slow dequantization)
        raise RuntimeError("never reached in time")

    args = args_for(tmp_path, tiny_model_dir, n=3, budget=BudgetArgs(time_limit=0.5, safety_margin=0))
    start = time.monotonic()
    report = predict(args, loader=stuck)
    release.set()
    assert time.monotonic() - start < 5
    assert report.fallback_reasons == {"deadline": 3} and report.error is None
    assert_valid_submission(args.output, ["0000", "0001", "0002"])


def test_a_dataframe_in_and_out(tiny_model_dir, tmp_path):
    import pandas as pd

    frame = pd.DataFrame({"id": ["007", "1e5", "x"], "original_text": ["Hello there.", None, "Same."],
                          "rewritten_text": ["Hi!", "text", "Same."]})
    report = predict(PredictArgs(test_csv=frame, output=str(tmp_path / "s.csv"), progress=False,
                                 model=ModelArgs(model=tiny_model_dir, adapter="none"),
                                 generation=GenerationArgs(max_new_tokens=4)))
    out = report.read_submission()
    assert list(out["id"]) == ["007", "1e5", "x"]  # ids stay the strings they were
    assert out["rewrite_prompt"][1] == FALLBACK and report.fallback_reasons.get("empty_text") == 1
    assert report.rule_based == 1 and all(p.strip() for p in out["rewrite_prompt"])


def test_the_report_names_the_stage_a_failure_reached(tiny_model_dir, tmp_path):
    # The notebook's last line and report.json say where a run failed: loading the model, or generating.
    args = args_for(tmp_path, tiny_model_dir, n=3)

    def broken(_):
        raise RuntimeError("CUDA driver exploded\nsecond line of the cause")

    report = predict(args, loader=broken)
    assert (report.stage, report.error_type) == ("model load", "RuntimeError")
    assert report.error_message == "CUDA driver exploded second line of the cause"  # whole, on one line

    def engine_breaks(model_args):
        loaded = model_lib.load(model_args)

        def no_engine(*a, **k):
            raise MemoryError("no room for the KV cache")

        loaded.engine = no_engine
        return loaded

    report = predict(args, loader=engine_breaks)
    assert (report.stage, report.error_type, report.error_message) == ("predict", "MemoryError",
                                                                       "no room for the KV cache")
    assert report.error == "MemoryError: no room for the KV cache" and report.generated == 0
    assert predict(args).stage is None
