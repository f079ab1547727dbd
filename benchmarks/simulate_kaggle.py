"""A whole Kaggle run rehearsed without a GPU: the real predict, a simulated T4 and a fake clock.

What runs for real: the notebook's call (``multigpu.predict_sharded`` with one spawned replica per GPU, as
``predict_on_gpus`` picks for a 4-bit 7B on T4 x2), each replica's ``predict`` (reading the table, rows, the
all-fallback file, rules, prompts built with a tokenizer, the scheduler and its cost model, out-of-memory
splits, per-batch submission writes, the candidates log, the report) and the merge of the replicas' files and
logs. What is simulated: the model load and the engine (``Loaded.engine`` serves ``SimEngine``, which has
``engine.Engine``'s interface), whose costs move a fake clock (``SimClock``) by a written-out roofline of the
card and the model; nothing sleeps, so nine hours take seconds. Each replica's clock is its own copy (its
GPU's time), taken at its spawn; the run ends when the last replica does.

The notebook's limit counts from the notebook's start: its install and imports (``Costs``), each replica's
start-up and model load are on the clock. Tokens are words (one token a word, a word-level tokenizer built in
process), so prompt lengths are exact.

Not simulated: host-side work (tokenizing, file writes, the merge) costs no simulated time (milliseconds a
batch here); a model load longer than the time left is charged in full, where predict would abandon it at its
deadline (``_load_before`` waits in real seconds, which a fake clock cannot drive), so keep loads inside the
budget; a replica that hangs rather than dies is not simulated (its stop waits in real seconds too).

    python benchmarks/simulate_kaggle.py --json sim.json --plot sim.png          # every scenario
    python benchmarks/simulate_kaggle.py --normal --dead --die-at 1800 --rows 400
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import math
import os
import sys
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT / "src"))

from prompt_recovery.config import BudgetArgs, EnsembleArgs, GenerationArgs, ModelArgs, OutputArgs, PredictArgs  # noqa: E402
from prompt_recovery.multigpu import REPLICA_ENV, plan, predict_sharded  # noqa: E402
from prompt_recovery.submission import read_submission  # noqa: E402

FALLBACK = "Rewrite this text in a creative tone."  # the shipped mean prompt; any text the model never writes
GIB = 2**30
HOUR = 3600.0
DIED_EXIT = 3  # a replica killed mid-run exits as the OOM killer or a CUDA crash would end it


# ---- the roofline: card, model shapes, costs ---------------------------------------------------------------------

@dataclass(frozen=True)
class Card:
    """One GPU as the engine sees it: datasheet peaks times the share of them a 4-bit HF model reaches."""

    name: str = "T4"
    fp16_tflops: float = 65.0
    """Dense float16 tensor-core peak (datasheet)."""
    prefill_efficiency: float = 0.35
    """Share of that peak a prefill reaches: bitsandbytes dequantizes each weight before its float16 GEMM, and
    the T4's 70 W cap throttles sustained clocks."""
    bandwidth_gbs: float = 320.0
    """Memory bandwidth (datasheet)."""
    decode_efficiency: float = 0.6
    """Share of the bandwidth a decoding step's reads reach (the 4-bit GEMV kernels)."""
    step_overhead_s: float = 0.04
    """Fixed cost of one decoding step: kernel launches and Python for every layer (HF decoding is
    launch-bound at small batches)."""
    memory_gib: float = 15.0
    """What the card has; 0.45 GiB of it goes to the CUDA context and the allocator."""

    @property
    def free_bytes(self) -> float:
        return (self.memory_gib - 0.45) * GIB


@dataclass(frozen=True)
class Shape:
    """A model's widths: what its 4-bit weights take, read and compute per token."""

    name: str
    linear_params: float
    """Parameters of the quantized linear layers (everything but embeddings and the output head)."""
    vocab: int
    hidden: int
    layers: int
    kv_heads: int
    head_dim: int
    intermediate: int
    tied: bool
    """Output head tied to the embedding (Gemma): one float16 matrix, read at every step."""
    disk_gb: float
    """float16 safetensors read at load (quantized to nf4 on the card)."""

    @property
    def head_bytes(self) -> float:
        return 2.0 * self.vocab * self.hidden  # embeddings and lm_head stay float16 under bitsandbytes 4-bit

    @property
    def weight_bytes(self) -> float:
        """Resident on the card: nf4 linears (4.127 bits a parameter with double-quantized scales), float16 heads."""
        return self.linear_params * 4.127 / 8 + self.head_bytes * (1 if self.tied else 2)

    @property
    def step_read_bytes(self) -> float:
        """Read by one decoding step whatever the batch: every linear and the output head."""
        return self.linear_params * 4.127 / 8 + self.head_bytes

    @property
    def kv_bytes_per_token(self) -> float:
        return 2.0 * self.layers * self.kv_heads * self.head_dim * 2  # keys and values, float16

    @property
    def activation_bytes_per_token(self) -> float:
        # One layer's transients at a time: hidden states (4 copies) and the MLP's gate, up and product.
        return 2.0 * (4 * self.hidden + 3 * self.intermediate)

    def prefill_flops(self, rows: int, width: int) -> float:
        # 2 per weight per position; attention 2 * 2 * hidden per key (scores, values), causal: width/2 keys
        # on average; the output head only at the last position (logits_to_keep=1).
        linear = 2.0 * self.linear_params * rows * width
        attention = 2.0 * self.layers * self.hidden * rows * width * width
        return linear + attention + 2.0 * self.vocab * self.hidden * rows

    def step_flops(self, rows: int) -> float:
        return 2.0 * (self.linear_params + self.vocab * self.hidden) * rows


SHAPES = {
    "mistral-7b": Shape("Mistral-7B", 6.98e9, 32000, 4096, 32, 8, 128, 14336, tied=False, disk_gb=14.5),
    "gemma-7b": Shape("Gemma-7B", 7.75e9, 256000, 3072, 28, 16, 256, 24576, tied=True, disk_gb=17.1),
}


@dataclass(frozen=True)
class Costs:
    """Everything outside the roofline that the clock is charged for, and the noise."""

    install_s: float = 45.0
    """The notebook's pip install of the bundle's wheels."""
    notebook_imports_s: float = 15.0
    """The notebook's imports of prompt_recovery and torch, and the CUDA query that picks the plan."""
    replica_imports_s: float = 25.0
    """A spawned replica's start-up: Python, torch, transformers and bitsandbytes imported anew."""
    disk_mb_s: float = 200.0
    """Reading the dataset mount; replicas loading at once share it."""
    quantize_s: float = 15.0
    """Quantizing the float16 weights to nf4 on the card as they arrive."""
    load_s: float | None = None
    """A model load of this many seconds instead (start-up included)."""
    noise: float = 0.05
    """Log-normal spread of every batch's and every load's cost."""
    tail_p: float = 0.02
    """Chance that a batch is slow (thermal throttling, a neighbour on the host)..."""
    tail_factor: tuple[float, float] = (3.0, 8.0)
    """...and how much slower, drawn uniformly."""
    slowdown: float = 1.0
    """Every compute cost times this (a model that cannot finish in time)."""


# ---- the fakes: clock, model, engine, loader ---------------------------------------------------------------------

class SimClock:
    """Simulated seconds since the notebook started; only the simulated load and engine move it."""

    def __init__(self, t: float = 0.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += max(0.0, seconds)


@functools.cache
def words(n: int = 4000) -> tuple[str, ...]:
    """Pseudo-words of letters only (generated prompts must read as text to postprocess.clean)."""
    rng = np.random.default_rng(1234)
    syllables = [c + v for c in "bcdfghklmnprstvwz" for v in "aeiou"]
    out: dict[str, None] = {}
    while len(out) < n:
        out["".join(rng.choice(syllables, size=rng.integers(1, 4)))] = None
    return tuple(out)


SPECIAL = ["<pad>", "<bos>", "<eos>", "<unk>"]


@functools.cache
def sim_tokenizer():
    """A word-level fast tokenizer (offsets, batch decode): one token a word, so lengths are exact."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIAL + list(words()))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>", padding_side="left")


@dataclass
class SimModel:
    """What the loader hands predict as the model: the shape, the card, the replica's clock, dice and trace."""

    shape: Shape
    card: Card
    costs: Costs
    clock: SimClock
    replica: int
    seed: int
    trace: str
    die_at: float | None = None
    batches: int = 0

    def event(self, **record) -> None:
        with open(self.trace, "a", encoding="utf-8") as f:
            f.write(json.dumps({"t": round(self.clock(), 3), "replica": self.replica, **record}) + "\n")

    def spend(self, seconds: float) -> None:
        """Move the clock; a replica due to die in that time dies at its moment, mid-prefill or mid-load too."""
        if self.die_at is not None and self.clock() + seconds >= self.die_at:
            self.clock.advance(self.die_at - self.clock())
            self.event(event="died")
            logging.shutdown()
            os._exit(DIED_EXIT)  # no cleanup, no report: as a CUDA crash or the OOM killer ends a process
        self.clock.advance(seconds)

    def factor(self) -> float:
        """This batch's cost multiplier: noise, a rare slow batch, the scenario's slowdown."""
        rng = np.random.default_rng([self.seed, self.replica, self.batches])
        self.batches += 1
        f = float(rng.lognormal(0.0, self.costs.noise))
        if rng.random() < self.costs.tail_p:
            f *= float(rng.uniform(*self.costs.tail_factor))
        return f * self.costs.slowdown

    def prefill_s(self, rows: int, width: int) -> float:
        return self.shape.prefill_flops(rows, width) / (self.card.fp16_tflops * 1e12 * self.card.prefill_efficiency)

    def step_s(self, rows: int, context: int) -> float:
        read = self.shape.step_read_bytes + self.shape.kv_bytes_per_token * rows * context
        memory = read / (self.card.bandwidth_gbs * 1e9 * self.card.decode_efficiency)
        compute = self.shape.step_flops(rows) / (self.card.fp16_tflops * 1e12 * self.card.prefill_efficiency)
        return max(memory, compute) + self.card.step_overhead_s

    def memory_bytes(self, rows: int, width: int, max_new: int) -> float:
        s = self.shape
        prefill = rows * width * (s.kv_bytes_per_token + s.activation_bytes_per_token) + 2.0 * s.intermediate * s.hidden
        decode = rows * (width + max_new) * s.kv_bytes_per_token
        return s.weight_bytes + max(prefill, decode)

    def answer(self, ids, eos: int) -> list[int]:
        """A row's answer, the same whatever batch it lands in: 10 to 60 tokens (median 24), then EOS."""
        rng = np.random.default_rng([self.seed, zlib.crc32(np.asarray(ids, dtype=np.int64).tobytes())])
        n = int(np.clip(round(rng.lognormal(math.log(24), 0.45)), 10, 60))
        return [int(i) for i in rng.integers(len(SPECIAL), len(SPECIAL) + len(words()), size=n)] + [eos]


class SimEngine:
    """engine.Engine's interface (``length``, ``run``) with the costs of ``SimModel`` on the fake clock."""

    def __init__(self, model: SimModel, pad_id: int, eos_ids, max_new_tokens: int, stop_ids=(), *, served=None,
                 clock=None) -> None:
        self.model, self.max_new_tokens = model, max_new_tokens
        self.eos_ids = set(eos_ids)
        self.eos = min(self.eos_ids)
        self.clock = clock or model.clock

    def length(self, item) -> int:
        return len(item.ids)

    def run(self, batch, max_time: float | None = None):
        from prompt_recovery.engine import BatchOutput

        m, clock = self.model, self.model.clock
        n, width = len(batch), max(self.length(r) for r in batch)
        factor = m.factor()
        prefill_s = m.prefill_s(n, width) * factor
        need = m.memory_bytes(n, width, self.max_new_tokens)
        if need > m.card.free_bytes:
            m.spend(prefill_s / 2)  # the allocation fails part-way through the prefill
            m.event(event="oom", rows=n, width=width, need_gib=round(need / GIB, 2))
            raise MemoryError(f"CUDA out of memory (simulated): {need / GIB:.1f} GiB needed, "
                              f"{m.card.free_bytes / GIB:.1f} GiB free")
        start = clock()
        deadline = math.inf if max_time is None else start + max_time
        m.spend(prefill_s)
        out = BatchOutput([[] for _ in range(n)], prefill_tokens=n * width, prefill_s=prefill_s, cut=[False] * n)
        self._decode(out, [m.answer(r.ids, self.eos) for r in batch], width, deadline, factor)
        out.decode_s = clock() - start - prefill_s
        m.event(event="batch", rows=n, width=width, answered=n, seconds=round(clock() - start, 3),
                timed_out=out.timed_out)
        return out

    def _decode(self, out, answers: list[list[int]], width: int, deadline: float, factor: float) -> None:
        """As the engine's loop: the prefill gives each row its first token, every step one more to the rows
        still running; a row leaves at EOS or max_new_tokens; the time bound is checked between steps."""
        m, clock = self.model, self.model.clock
        running, step = list(range(len(answers))), 0
        while True:
            keep = []
            for i in running:
                token = answers[i][step]
                if token in self.eos_ids:
                    continue
                out.tokens[i].append(token)
                if len(out.tokens[i]) < self.max_new_tokens:
                    keep.append(i)
            if not keep:
                return
            if clock() >= deadline:
                out.timed_out = True
                for i in keep:
                    out.cut[i] = True
                return
            running, step = keep, step + 1
            m.spend(m.step_s(len(running), width + step) * factor)
            out.row_steps += len(running)


@dataclass
class SimLoader:
    """model.load's stand-in (picklable: each replica gets a copy, clock included, at its spawn)."""

    card: Card
    costs: Costs
    clock: SimClock
    trace_dir: str
    replicas: int = 2
    seed: int = 0
    die_at: float | None = None
    """When the last replica dies (None: it does not)."""
    loads: int = 0

    def seconds(self, shape: Shape, rng) -> float:
        if self.costs.load_s is not None:
            return self.costs.load_s
        start_up = self.costs.replica_imports_s if self.loads == 0 else 0.0  # imports once a process
        read = shape.disk_gb * 1000 / (self.costs.disk_mb_s / self.replicas)  # the replicas share the disk
        return (start_up + read + self.costs.quantize_s) * float(rng.lognormal(0.0, self.costs.noise))

    def __call__(self, model_args):
        from prompt_recovery.engine import Served
        from prompt_recovery.model import Loaded

        replica = int(os.environ.get(REPLICA_ENV, "0"))
        shape = SHAPES[Path(model_args.model).name]
        die_at = self.die_at if replica == self.replicas - 1 else None
        model = SimModel(shape, self.card, self.costs, self.clock, replica, self.seed,
                         os.path.join(self.trace_dir, f"replica{replica}.jsonl"), die_at)
        start = self.clock()
        seconds = self.seconds(shape, np.random.default_rng([self.seed, replica, 99, self.loads]))
        self.loads += 1
        model.spend(seconds)
        model.event(event="load", model=shape.name, start=round(start, 3), seconds=round(seconds, 3))
        n = len(model_args.adapter)
        return Loaded(model=model, tokenizer=sim_tokenizer(), identity={"name": f"{shape.name} (simulated)"},
                      info={"device": "cuda", "dtype": "float16", "quantize": model_args.quantize,
                            "card": self.card.name}, served=Served(), adapter_paths=[None] * n,
                      adapter_names=[None] * n, engine=SimEngine)


# ---- rows: the competition's lengths -----------------------------------------------------------------------------

def make_rows(n: int, seed: int = 0):
    """A test table of ``n`` rows: a fifth of texts a few words long (3-40), the rest log-normal around 260
    tokens (the labelled sets' 250-word originals), at most 1,000; rewritten texts 0.5-2x their original."""
    import pandas as pd

    rng = np.random.default_rng([seed, 7])
    vocab = np.array(words())
    short = rng.random(n) < 0.2
    original = np.where(short, rng.integers(3, 41, n), np.clip(rng.lognormal(math.log(260), 0.55, n), 3, 1000))
    rewritten = np.clip(original * rng.lognormal(0.0, 0.35, n), 3, 1000)
    texts = [(" ".join(rng.choice(vocab, int(a))), " ".join(rng.choice(vocab, int(b))))
             for a, b in zip(original, rewritten)]
    return pd.DataFrame({"id": [f"{k:06x}" for k in rng.choice(16**6, n, replace=False)],
                         "original_text": [t[0] for t in texts], "rewritten_text": [t[1] for t in texts]})


# ---- scenarios ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Scenario:
    name: str
    what: str
    rows: int = 1300
    replicas: int = 2
    seed: int = 0
    members: tuple[tuple[str, float], ...] = (("mistral-7b", 1.0),)
    """(model, share) per member, in priority order; one model: one member."""
    die_at: float | None = None
    """Seconds from the notebook's start at which the last replica dies."""
    max_batch_tokens: int = 16384
    limit_s: float = 9 * HOUR
    """Kaggle's limit for the notebook, from its start."""
    notebook_limit_s: float = 8.5 * HOUR
    """The notebook's TIME_LIMIT: what it gives predict, less what has passed."""
    card: Card = Card()
    costs: Costs = Costs()


def scenarios(opts) -> dict[str, Scenario]:
    base = dict(rows=opts.rows, replicas=opts.replicas, seed=opts.seed)
    costs = Costs()
    return {
        "normal": Scenario("normal", "Mistral-7B 4-bit, T4 x2, defaults", **base),
        # At the roofline the run is over in minutes: the death is rehearsed in a run still going at hour 3.
        "dead": Scenario("dead", f"the second replica dies at {opts.die_at / HOUR:g} h of a run "
                         f"{opts.dead_slowdown:g}x slower than the roofline", die_at=opts.die_at,
                         costs=dataclasses.replace(costs, slowdown=opts.dead_slowdown), **base),
        "oom": Scenario("oom", "--max-batch-tokens 65536: the longest batches do not fit 15 GB",
                        max_batch_tokens=65536, **base),
        "slow": Scenario("slow", f"a model {opts.slowdown:g}x slower than the roofline",
                         costs=dataclasses.replace(costs, slowdown=opts.slowdown), **base),
        "shares": Scenario("shares", "two members: Mistral-7B share 2, Gemma-7B share 1, one after the other",
                           members=(("mistral-7b", 2.0), ("gemma-7b", 1.0)), **base),
        "slow_load": Scenario("slow_load", f"a model load of {opts.load_min:g} minutes",
                              costs=dataclasses.replace(costs, load_s=opts.load_min * 60), **base),
    }


# ---- one run -----------------------------------------------------------------------------------------------------

def _predict_args(sc: Scenario, work: Path, elapsed: float) -> PredictArgs:
    members = None
    if len(sc.members) > 1:
        spec = {"members": [{"name": m, "model": str(work / "models" / m), "adapter": "none", "share": share}
                            for m, share in sc.members]}
        members = str(work / "members.json")
        Path(members).write_text(json.dumps(spec), encoding="utf-8")
    return PredictArgs(
        test_csv=str(work / "test.csv"), output=str(work / "submission.csv"), report=str(work / "report.json"),
        progress=False, model=ModelArgs(model=str(work / "models" / sc.members[0][0]), adapter="none",
                                        quantize="4bit"),
        generation=GenerationArgs(max_batch_tokens=sc.max_batch_tokens),
        # As the notebook does: its TIME_LIMIT less what the install and imports took.
        budget=BudgetArgs(budget_per_row=25.0, time_limit=max(60.0, sc.notebook_limit_s - elapsed)),
        out=OutputArgs(fallback_prompt=FALLBACK), ensemble=EnsembleArgs(members=members))


def run(sc: Scenario, work: Path) -> dict:
    """The notebook's cells on the fake clock, then the real predict over the simulated replicas."""
    from prompt_recovery.predict import predict

    work.mkdir(parents=True, exist_ok=True)
    (work / "trace").mkdir(exist_ok=True)
    for f in (work / "trace").glob("*.jsonl"):
        f.unlink()
    make_rows(sc.rows, sc.seed).to_csv(work / "test.csv", index=False)
    for m, _ in sc.members:
        (work / "models" / m).mkdir(parents=True, exist_ok=True)
        (work / "models" / m / "config.json").write_text(json.dumps(dataclasses.asdict(SHAPES[m])), "utf-8")
    clock = SimClock()
    clock.advance(sc.costs.install_s + sc.costs.notebook_imports_s)  # the all-fallback file is written before
    started = clock()
    args = _predict_args(sc, work, started)
    loader = SimLoader(sc.card, sc.costs, clock, str(work / "trace"), sc.replicas, sc.seed, sc.die_at)
    largest = max(SHAPES[m].weight_bytes for m, _ in sc.members)
    mode = plan(sc.replicas, sc.card.memory_gib * GIB, largest)  # what predict_on_gpus would pick
    if mode == "replicas":
        summary = predict_sharded(args, [None] * sc.replicas, FALLBACK, loader=loader, clock=clock)
        replicas = _replicas(work, summary, args.output)
    elif mode == "single":
        report = predict(args, clock=clock, loader=loader)
        replicas = [{"replica": 0, "rows": report.rows, "generated": report.generated, "end_s": clock(),
                     "exit_code": 0, "load_s": report.load_s, "generate_s": report.generate_s,
                     "start_s": started, "batches": len(report.batches),
                     "oom_splits": report.oom_splits, "fallback_reasons": report.fallback_reasons}]
    else:
        raise SystemExit(f"{sc.name}: the model does not fit one {sc.card.name}; spread mode is not simulated")
    return _summarise(sc, work, mode, started, replicas)


def _replicas(work: Path, summary: dict, output: str) -> list[dict]:
    shards = Path(output + ".shards")
    out = []
    for k, code in enumerate(summary["exit_codes"]):
        budget = json.loads((shards / f"shard{k}_budget.json").read_text())
        start = budget["end_wall"] - budget["time_limit"]  # the replica's clock at its start (its copy's value)
        events = _events(work, k)
        rep = {"replica": k, "exit_code": code, "start_s": start,
               "rows": len(read_submission(str(shards / f"shard{k}_submission.csv")))}
        report_file = shards / f"shard{k}_report.json"
        if code == 0 and report_file.exists():
            r = json.loads(report_file.read_text())
            rep.update(generated=r["generated"], end_s=start + r["elapsed_s"], load_s=r["load_s"],
                       generate_s=r["generate_s"],
                       batches=len(r["batches"]), oom_splits=r["oom_splits"], fallback_reasons=r["fallback_reasons"])
        else:  # died: no report; what it wrote before is in its shard file
            died = [e["t"] for e in events if e["event"] == "died"]
            rep.update(end_s=died[0] if died else (events[-1]["t"] if events else start), died_at=died[0] if died
                       else None, batches=sum(e["event"] == "batch" for e in events),
                       oom_splits=None, load_s=sum(e.get("seconds", 0) for e in events if e["event"] == "load"))
        out.append(rep)
    return out


def _events(work: Path, replica: int) -> list[dict]:
    path = work / "trace" / f"replica{replica}.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _summarise(sc: Scenario, work: Path, mode: str, started: float, replicas: list[dict]) -> dict:
    import pandas as pd

    ids = pd.read_csv(work / "test.csv", dtype=str, keep_default_na=False)["id"].tolist()
    found = read_submission(str(work / "submission.csv"))
    prompts = [p for _, p in found]
    assert [i for i, _ in found] == ids, "the merged submission lost the input's ids or their order"
    reasons: dict[str, int] = {}
    for rep in replicas:
        for k, v in (rep.get("fallback_reasons") or {}).items():
            reasons[k] = reasons.get(k, 0) + v
        if rep.get("died_at") is not None:
            reasons["replica died"] = reasons.get("replica died", 0) + sum(
                p == FALLBACK for p in prompts[rep["replica"]::len(replicas)])
    return {
        "scenario": sc.name, "what": sc.what, "mode": mode, "rows": len(ids),
        "filled": sum(bool(p.strip()) for p in prompts),
        "generated": sum(p != FALLBACK for p in prompts), "fallback": sum(p == FALLBACK for p in prompts),
        "fallback_reasons": reasons, "start_s": started, "end_s": max(r["end_s"] for r in replicas) + 1.0,
        "limit_s": sc.limit_s, "notebook_limit_s": sc.notebook_limit_s,
        "oom_splits": sum(r.get("oom_splits") or 0 for r in replicas),
        "oom_events": sum(e["event"] == "oom" for r in replicas for e in _events(work, r["replica"])),
        "replicas": replicas, "timeline": {r["replica"]: _timeline(work, r["replica"]) for r in replicas},
        "scenario_args": dataclasses.asdict(sc),
    }


def _timeline(work: Path, replica: int) -> list[tuple[float, int]]:
    """(seconds, rows answered so far) after each batch of the replica."""
    points, done = [], 0
    for e in _events(work, replica):
        if e["event"] == "batch":
            done += e["answered"]
            points.append((e["t"], done))
    return points


# ---- output ------------------------------------------------------------------------------------------------------

def _hm(seconds: float) -> str:
    return f"{int(seconds // 3600)}:{int(seconds % 3600 // 60):02d}:{int(seconds % 60):02d}"


def table(results: list[dict]) -> str:
    lines = ["| scenario | rows | filled | generated | fallback (why) | loads | replicas end | run end | limit | "
             "batches | OOM splits |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        why = ", ".join(f"{k} {v}" for k, v in sorted(r["fallback_reasons"].items())) or "-"
        loads = ", ".join(f"{rep['load_s'] / 60:.1f}" for rep in r["replicas"]) + " min"
        ends = ", ".join(_hm(rep["end_s"]) + (" (died)" if rep.get("died_at") is not None else "")
                         for rep in r["replicas"])
        lines.append(f"| {r['scenario']}: {r['what']} | {r['rows']} | {r['filled']} | {r['generated']} | "
                     f"{r['fallback']} ({why}) | {loads} | {ends} | {_hm(r['end_s'])} | {_hm(r['limit_s'])} | "
                     f"{sum(rep['batches'] for rep in r['replicas'])} | {r['oom_splits']} |")
    return "\n".join(lines)


def cost_figures(card: Card, costs: Costs) -> list[str]:
    m = SHAPES["mistral-7b"]
    sim = SimModel(m, card, costs, SimClock(), 0, 0, os.devnull)
    eff = card.fp16_tflops * card.prefill_efficiency
    return [
        f"card {card.name}: {card.fp16_tflops:g} TFLOP/s float16 x {card.prefill_efficiency:g} = {eff:.1f} TFLOP/s "
        f"for prefill; {card.bandwidth_gbs:g} GB/s x {card.decode_efficiency:g} for decoding, "
        f"+{card.step_overhead_s * 1000:.0f} ms a step; {card.memory_gib:g} GiB ({card.free_bytes / GIB:.2f} free)",
        f"{m.name} nf4: {m.weight_bytes / 1e9:.2f} GB on the card, {m.step_read_bytes / 1e9:.2f} GB read a step, "
        f"{2 * m.linear_params / 1e9:.1f} GFLOP a prompt token, KV {m.kv_bytes_per_token / 1024:.0f} KiB a token",
        f"so: a 500-token prompt prefills in {sim.prefill_s(1, 500):.2f} s; a step of 16 rows at 550 tokens "
        f"takes {sim.step_s(16, 550) * 1000:.0f} ms, of 1 row {sim.step_s(1, 550) * 1000:.0f} ms",
        f"load: {costs.replica_imports_s:g} s start-up + {m.disk_gb:g} GB at {costs.disk_mb_s:g} MB/s shared by the "
        f"replicas + {costs.quantize_s:g} s quantization; notebook install {costs.install_s:g} s, imports "
        f"{costs.notebook_imports_s:g} s",
        f"noise: log-normal sigma {costs.noise:g} a batch; {costs.tail_p:.0%} of batches "
        f"{costs.tail_factor[0]:g}-{costs.tail_factor[1]:g}x slower",
    ]


def plot(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, len(results))
    rows = math.ceil(len(results) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
    for ax, r in zip(axes.flat, results):
        for rep in r["replicas"]:
            pts = [(0.0, 0)] + [tuple(p) for p in r["timeline"][rep["replica"]]]
            line, = ax.step([t / HOUR for t, _ in pts], [n for _, n in pts], where="post",
                            label=f"replica {rep['replica']}" + (" (died)" if rep.get("died_at") is not None else ""))
            if rep.get("died_at") is not None:
                ax.plot([rep["died_at"] / HOUR], [pts[-1][1]], "x", color=line.get_color(), markersize=9)
        ax.axvline(r["end_s"] / HOUR, color="grey", linestyle=":", label="run ends")
        if r["end_s"] > 0.5 * r["limit_s"]:
            ax.axvline(r["limit_s"] / HOUR, color="red", linestyle="--", label="9 h limit")
        ax.set_title(f"{r['scenario']}: {r['generated']}/{r['rows']} generated", fontsize=10)
        ax.set_xlabel("hours from the notebook's start")
        ax.set_ylabel("answers made (rows x members)")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(results):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


NAMES = ("normal", "dead", "oom", "slow", "shares", "slow_load")


def parse(argv: list[str] | None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name in NAMES:
        p.add_argument(f"--{name.replace('_', '-')}", action="store_true", help=f"run the {name} scenario")
    p.add_argument("--rows", type=int, default=1300)
    p.add_argument("--replicas", type=int, default=2, help="GPUs (1: one process, no replicas)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--die-at", type=float, default=3 * HOUR, help="seconds from the start (dead)")
    p.add_argument("--dead-slowdown", type=float, default=100.0,
                   help="compute cost factor of the dead scenario's run (1: the roofline)")
    p.add_argument("--slowdown", type=float, default=200.0, help="compute cost factor (slow)")
    p.add_argument("--load-min", type=float, default=40.0, help="model load in minutes (slow-load)")
    p.add_argument("--work", help="folder for the runs' files (default: a temporary one)")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--plot", help="write a PNG of rows answered against time per replica here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    opts = parse(argv)
    logging.basicConfig(level=logging.ERROR)
    chosen = [n for n in NAMES if getattr(opts, n)] or list(NAMES)
    all_scenarios = scenarios(opts)
    work = Path(opts.work or tempfile.mkdtemp(prefix="simulate_kaggle_"))
    results = [run(all_scenarios[n], work / n) for n in chosen]
    figures = cost_figures(Card(), Costs())
    print(table(results))
    print("\n" + "\n".join(f"- {f}" for f in figures))
    if opts.json:
        with open(opts.json, "w", encoding="utf-8") as f:
            json.dump({"results": results, "cost_figures": figures}, f, indent=1)
    if opts.plot:
        plot(results, opts.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
