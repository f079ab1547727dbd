"""Two (or more) GPUs: one model spread over all of them, or one replica per GPU on a share of the rows.

A replica per GPU doubles throughput when the model fits one card with room for its batches; a model that
does not fit is spread with ``device_map="auto"`` in a single process instead. Replicas run the same
``predict`` function in spawned processes (CUDA_VISIBLE_DEVICES set before torch starts in each), each on
an interleaved shard of the rows, and their outputs are merged by row position into one validated file.
A shard that fails leaves its rows with the fallback prompt: the merged file is always complete.

Every replica gets the whole run's deadline (one absolute end time), not a budget from its own share of the rows.
Hand-made rather than accelerate's notebook_launcher: its elastic agent stops every replica when one fails
(measured, benchmarks/check_notebook_launcher.py: replica 1 raising at 1 s killed replica 0 after 2 of its 10
steps), so a dead replica would cost all rows, and it forks, which fails once the notebook has initialised CUDA.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import multiprocessing as mp
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .config import BudgetArgs, PredictArgs
from .data import read_test
from .submission import CandidateLog, read_submission, write_submission

log = logging.getLogger(__name__)

# Weights take this share of a card at most when replicated; the rest holds activations and KV cache.
REPLICA_HEADROOM = 0.6
# Set in each replica process to its index (logs, tests, benchmarks).
REPLICA_ENV = "PROMPT_RECOVERY_REPLICA"
# Seconds past the run's end a replica may take to exit (it has stopped itself a margin before the end).
REPLICA_GRACE_S = 10.0


def weight_bytes(folder: str | None, quantize: str) -> int | None:
    """Bytes the model's weights take on a GPU, from the files on disk (None if unknown)."""
    if folder is None or not os.path.isdir(folder):
        return None
    total = sum(p.stat().st_size for p in Path(folder).glob("*.safetensors")) or sum(
        p.stat().st_size for p in Path(folder).glob("*.bin"))
    if not total:
        return None
    # Files hold 16- or 32-bit weights; 4-bit keeps about a quarter of 16-bit, 8-bit half.
    return {"4bit": total // 4, "8bit": total // 2}.get(quantize, total)


def plan(n_gpus: int, per_gpu_bytes: int | None, model_bytes: int | None) -> str:
    """'single' (one or no GPU), 'replicas' (the model fits one card with headroom) or 'spread'."""
    if n_gpus < 2:
        return "single"
    if per_gpu_bytes and model_bytes and model_bytes <= REPLICA_HEADROOM * per_gpu_bytes:
        return "replicas"
    return "spread"


def shard_budget(budget: BudgetArgs, end_wall: float, rows: int, now: float) -> BudgetArgs:
    """A replica's budget: whatever is left of the whole run's time at ``now``, spread over its own rows.

    The time limit is the run's absolute end minus now; budget_per_row is raised so that rows x budget_per_row
    never binds first (it would give a replica only its half's share of the run).
    """
    left = max(end_wall - now, 1e-3)  # BudgetArgs needs a positive limit; a spent budget falls back at once
    return dataclasses.replace(budget, time_limit=left, budget_per_row=max(budget.budget_per_row, left / max(rows, 1)))


@dataclass
class Shard:
    """One replica's share of the run: its rows, files and device (pickled into its spawned process)."""

    index: int
    device: str | None
    """CUDA_VISIBLE_DEVICES for the replica (None: leave it as it is)."""
    positions: list[int]
    """Rows of the whole input it serves, in order (interleaved: k, k + n, ...)."""
    work: Path
    """Folder of every shard's files."""
    args: PredictArgs | None = None
    """Its predict arguments: its own test CSV, output and report."""

    @property
    def csv(self) -> Path:
        return self.work / f"shard{self.index}.csv"

    @property
    def output(self) -> Path:
        return self.work / f"shard{self.index}_submission.csv"

    @property
    def budget_file(self) -> Path:
        return self.work / f"shard{self.index}_budget.json"


@dataclass
class Replicas:
    """What every replica of one run shares: one absolute end, the stand-ins tests and the simulator pass."""

    end_wall: float
    """The whole run's end on the wall clock, the same for every replica."""
    loader: Callable | None = None
    """Picklable ModelArgs -> Loaded replacing model.load in every replica."""
    clock: Callable[[], float] | None = None
    """Picklable wall clock (default time.time): copied into each replica at its start."""


def _shard_worker(shard: Shard, run: Replicas) -> None:
    if shard.device is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = shard.device  # before torch starts in this process
    os.environ[REPLICA_ENV] = str(shard.index)
    from .predict import predict

    # Taken after this process's start-up, which is part of the run's time like everything else.
    budget = shard_budget(shard.args.budget, run.end_wall, len(shard.positions), (run.clock or time.time)())
    with open(shard.budget_file, "w", encoding="utf-8") as f:
        json.dump({"end_wall": run.end_wall, "time_limit": budget.time_limit,
                   "budget_per_row": budget.budget_per_row}, f)
    report = predict(dataclasses.replace(shard.args, budget=budget), loader=run.loader,
                     clock=run.clock or time.monotonic)
    print(f"[replica {shard.index}] " + report.summary().replace("\n", "\n  "), flush=True)


def predict_sharded(args: PredictArgs, devices: list[str | None], fallback: str, loader=None, clock=None) -> dict:
    """Run one predict per device on interleaved shards; merge into ``args.output``. Returns a summary.

    ``loader`` (picklable, ModelArgs -> Loaded) replaces ``model.load`` in every replica. ``clock`` (picklable,
    () -> seconds; default ``time.time``) is the run's wall clock here and, as a copy made at its start, in each
    replica: the Kaggle simulator's fake clock, so each replica's simulated time runs on its own, as on its GPU.
    """
    now = clock or time.time
    start_wall = now()
    rows = read_test(args.test_csv).rows
    ids = [r.id for r in rows]
    # One absolute end for every replica: the whole run's budget, as one process would have had it.
    run = Replicas(start_wall + args.budget.seconds(len(ids)), loader, clock)
    write_submission(args.output, ids, [fallback] * len(ids))  # complete before any replica starts
    work = Path(args.output).parent / (Path(args.output).name + ".shards")
    work.mkdir(parents=True, exist_ok=True)
    shards = [Shard(k, device, list(range(k, len(rows), len(devices))), work) for k, device in enumerate(devices)]
    procs = [_start_replica(args, shard, rows, fallback, run) for shard in shards]
    for proc in procs:
        _stop_at_the_end(proc, run.end_wall, now)
    _merge_candidates(args.output, rows, shards)
    prompts, merged = _merge_submissions(ids, fallback, shards, procs)
    write_submission(args.output, ids, prompts)
    return {"shards": len(shards), "rows": len(ids), "merged": merged, "exit_codes": [p.exitcode for p in procs],
            "end_wall": run.end_wall, "budgets": [_read_json(s.budget_file) for s in shards]}


def _start_replica(args: PredictArgs, shard: Shard, rows, fallback: str, run: Replicas):
    """Write the shard's rows, give it its own files and the run's fallback, and spawn its process."""
    with open(shard.csv, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", "original_text", "rewritten_text"])
        w.writerows([rows[i].id, rows[i].original_text, rows[i].rewritten_text] for i in shard.positions)
    # Every shard falls back to the same prompt as the merged file, whatever fails where.
    out_args = dataclasses.replace(args.out, fallback_prompt=fallback, fallback_prompt_file=None)
    shard.args = dataclasses.replace(args, test_csv=str(shard.csv), output=str(shard.output), out=out_args,
                                     report=str(shard.work / f"shard{shard.index}_report.json"), progress=False)
    if shard.output.exists() and not args.resume:
        shard.output.unlink()
    shard.budget_file.unlink(missing_ok=True)  # an earlier run's would pass for this one's
    ctx = mp.get_context("spawn")  # fork after CUDA or tokenizers threads start can deadlock
    proc = ctx.Process(target=_shard_worker, args=(shard, run))
    proc.start()
    return proc


def _stop_at_the_end(proc, end_wall: float, now: Callable[[], float]) -> None:
    # Each replica stops itself before the end (its own deadline and margin); one that hangs (a CUDA call
    # that never returns) must not hold the notebook past its limit, where Kaggle would score nothing.
    proc.join(max(0.0, end_wall + REPLICA_GRACE_S - now()))
    if proc.is_alive():
        log.warning("replica %s is still running at the run's end; it is stopped, its rows keep what it wrote",
                    proc.name)
        proc.terminate()
        proc.join(5)
        if proc.is_alive():
            proc.kill()
            proc.join()


def _merge_submissions(ids: list[str], fallback: str, shards: list[Shard], procs) -> tuple[list[str], int]:
    """(prompts by row, rows merged): each shard's answers in its rows' places, the fallback elsewhere."""
    prompts = [fallback] * len(ids)
    merged = 0
    for shard, proc in zip(shards, procs):
        try:
            found = read_submission(str(shard.output))
        except Exception as exc:  # a replica that died leaves its rows on the fallback
            log.warning("shard %s gave no usable output (exit %s): %s", shard.output.name, proc.exitcode, exc)
            continue
        if [f[0] for f in found] != [ids[i] for i in shard.positions]:
            log.warning("shard %s does not match its rows; its rows keep the fallback", shard.output.name)
            continue
        for i, (_, prompt) in zip(shard.positions, found):
            if prompt.strip():
                prompts[i] = prompt
                merged += 1
    return prompts, merged


def _merge_candidates(output: str, rows, shards) -> None:
    """The replicas' candidate logs as one OUTPUT.candidates.jsonl, rows numbered as in the whole input."""
    merged = CandidateLog.for_rows(output, rows)
    merged.start(keep=False)
    for shard in shards:
        shard_rows = [rows[i] for i in shard.positions]
        log_ = CandidateLog.for_rows(str(shard.output), shard_rows)
        merged.append([{**rec, "row": shard.positions[rec["row"]]} for rec in log_.load([r.id for r in shard_rows])])


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # the replica died before it started: its rows are on the fallback


def predict_on_gpus(args: PredictArgs, fallback: str) -> tuple[str, object]:
    """Pick single / spread / replicas from the GPUs present and the model's size, then run predict."""
    import torch

    from .ensemble import resolve_members
    from .model import resolve
    from .predict import predict

    n = torch.cuda.device_count() if args.model.device != "cpu" else 0
    per_gpu = min(torch.cuda.get_device_properties(i).total_memory for i in range(n)) if n else None
    largest = None
    if n >= 2:
        # Every member's model must fit a card for replicas: a spec naming a 7B beside the embedded 270M spreads.
        models = {m.model for m in resolve_members(args)[0]}
        sizes = [weight_bytes(resolve(dataclasses.replace(args.model, model=m))[0], args.model.quantize)
                 for m in models]
        largest = None if None in sizes else max(sizes)
    mode = plan(n, per_gpu, largest)
    if mode == "replicas":
        return mode, predict_sharded(args, [str(i) for i in range(n)], fallback)
    return mode, predict(args)  # one GPU, none, or a model that must spread over all (device_map="auto")
