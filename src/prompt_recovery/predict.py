"""predict: test table in, valid submission out, inside a time budget; no row is ever blank.

Data flow, top to bottom (every step reads and writes the one ``Rows`` object):
1. read the table; write an all-fallback submission before anything heavy can fail;
2. rules (unchanged text), resumed candidates from an earlier run's log;
3. for each group of members sharing a model, with its share of the time left: load the model once with
   every member's adapter, build each member's prompts, and let the scheduler serve all of them together
   (after each batch: clean answers into candidates, log them, combine each touched row, rewrite the file);
   unload before the next group;
4. report.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import resource
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from .config import OutputArgs, PredictArgs
from .data import InputError, read_test
from .ensemble import MBR, Combiner, Member, groups, resolve_members, share_of
from .errors import one_line
from .postprocess import clean, fit_with_suffix, normalise, shipped_text
from .rows import FALLBACK, MODEL, RULE, Rows
from .scheduler import Hooks, Limits, Outcome, Scheduler

log = logging.getLogger(__name__)


@dataclass
class MemberReport:
    name: str
    key: str
    model: str | None
    adapter: str
    adapter_type: str | None = None
    requests: int = 0
    """Answers asked of this member in this run (rows x samples, minus those resumed)."""
    answered: int = 0
    """Usable answers it gave."""
    resumed: int = 0
    """Answers taken from an earlier run's candidates log (--resume) instead of generated."""
    cut: int = 0
    """Answers the time bound stopped while still running (used, but made again by --resume)."""
    failed: dict = field(default_factory=dict)
    """Answers it did not give, by reason."""

    def count(self, reason: str | None) -> None:
        self.failed[reason or "unknown"] = self.failed.get(reason or "unknown", 0) + 1


@dataclass
class Report:
    rows: int = 0
    generated: int = 0
    """Rows answered by the model in this run."""
    rule_based: int = 0
    resumed: int = 0
    """Rows answered entirely from an earlier run's candidates (--resume)."""
    fallback: int = 0
    fallback_reasons: dict = field(default_factory=dict)
    elapsed_s: float = 0.0
    load_s: float = 0.0
    generate_s: float = 0.0
    budget_s: float = 0.0
    deadline_used: float = 0.0
    """Share of the run's budget (before the safety margin) spent."""
    new_tokens: int = 0
    prompt_tokens: int = 0
    """Padded prompt positions processed (rows x width of every batch)."""
    tokens_per_s: float = 0.0
    rows_per_s: float = 0.0
    peak_rss_mb: float = 0.0
    peak_cuda_mb: float | None = None
    batches: list = field(default_factory=list)
    oom_splits: int = 0
    recoveries: list = field(default_factory=list)
    """Switches to a safe dtype after non-finite logits, with what changed."""
    combine: str = "first"
    members: list = field(default_factory=list)
    model: dict = field(default_factory=dict)
    startup: dict = field(default_factory=dict)
    """Where the first model load's seconds went (model.load_base: imports, resolve, tokenizer, weights, adapters)."""
    template: dict = field(default_factory=dict)
    warnings: list = field(default_factory=list)
    error: str | None = None
    """The failure as one line, ``Type: message`` (None when nothing failed)."""
    stage: str | None = None
    """Where it failed: ``model load`` (the members, model and adapters) or ``predict`` (generating)."""
    error_type: str | None = None
    """The failure's exception type, e.g. ``ModuleNotFoundError``."""
    error_message: str | None = None
    """The failure's whole message."""
    output: str = ""

    def read_submission(self):
        """The submission written, as a pandas DataFrame of strings (id, rewrite_prompt)."""
        import pandas as pd

        return pd.read_csv(self.output, dtype=str, keep_default_na=False)

    def startup_line(self) -> str:
        parts = ", ".join(f"{k[:-2]} {v:.1f}s" for k, v in self.startup.items()
                          if k != "since_process_start_s" and v is not None)
        before = self.startup.get("since_process_start_s")
        return f"load steps: {parts}" + (f"; the process had run {before:.1f}s before the load" if before else "")

    def summary(self) -> str:
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(self.fallback_reasons.items())) or "none"
        lines = [
            (f"wrote {self.output}: {self.rows} rows; {self.generated} generated, {self.rule_based} by rule, "
             f"{self.resumed} resumed, {self.fallback} fallback ({reasons})"),
            (f"time {self.elapsed_s:.1f}s of {self.budget_s:.0f}s budget ({100 * self.deadline_used:.0f}%); "
             f"load {self.load_s:.1f}s, generate {self.generate_s:.1f}s in {len(self.batches)} batches, "
             f"{self.rows_per_s:.2f} rows/s, {self.tokens_per_s:.1f} new tokens/s"),
            *([self.startup_line()] if self.startup else []),
            f"peak memory: {self.peak_rss_mb:.0f} MB RSS"
            + (f", {self.peak_cuda_mb:.0f} MB CUDA" if self.peak_cuda_mb is not None else ""),
        ]
        if self.model:
            lines.append(f"model {self.model.get('name')} ({self.model.get('device')}, {self.model.get('dtype')}, "
                         f"quantize {self.model.get('quantize')})")
        if len(self.members) > 1 or any(m["adapter"] not in ("none",) for m in self.members):
            for m in self.members:
                failed = ", ".join(f"{k}: {v}" for k, v in sorted(m["failed"].items()))
                cut = f", {m['cut']} cut short by the time bound" if m["cut"] else ""
                resumed = f", {m['resumed']} resumed" if m["resumed"] else ""
                lines.append(f"member {m['name']} ({m['adapter_type'] or 'no adapter'}): {m['answered']} of "
                             f"{m['requests']} answered{cut}{resumed}" + (f" ({failed})" if failed else ""))
            if len(self.members) > 1:
                lines.append(f"candidates combined by {self.combine}")
        lines += [f"recovered: {r}" for r in self.recoveries]
        lines += [f"warning: {w}" for w in self.warnings]
        if self.error:
            lines.append(f"error: {self.error}")
        return "\n".join(lines)


def resolve_fallback(out: OutputArgs) -> str:
    if out.fallback_prompt is not None:
        return normalise(out.fallback_prompt)
    if out.fallback_prompt_file is not None:
        text = _read_text(out.fallback_prompt_file, "fallback prompt file")
        if not text:
            raise InputError(f"fallback prompt file {out.fallback_prompt_file} is empty")
        return text
    return normalise(shipped_text("mean_prompt.txt"))


def resolve_suffix(out: OutputArgs) -> str:
    if out.suffix_file in (None, "", "none"):
        return ""
    if out.suffix_file == "auto":
        return shipped_text("suffix.txt")
    return _read_text(out.suffix_file, "suffix file")


def _read_text(path: str, what: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return normalise(f.read())
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read {what} {path}: {exc}") from None


def _peak_memory(report: Report) -> None:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    report.peak_rss_mb = rss / 1024 if sys.platform != "darwin" else rss / 2**20
    try:
        import torch

        if torch.cuda.is_available():
            report.peak_cuda_mb = sum(
                torch.cuda.max_memory_allocated(d) for d in range(torch.cuda.device_count())
            ) / 2**20
    except Exception:  # memory figures are informative only; never fail a run over them
        pass


class Finisher:
    """A combined prediction -> the submitted text: suffix appended, trimmed to what the scorer reads."""

    def __init__(self, out: OutputArgs, suffix: str | None = None) -> None:
        self.suffix = resolve_suffix(out) if suffix is None else suffix
        self.count = self.limit = None
        if out.embedder:
            from .score import embedder_token_counter

            self.count, self.limit = embedder_token_counter(out.embedder)

    def __call__(self, text: str) -> str:
        return fit_with_suffix(text, self.suffix, self.count, self.limit)


def make_combiner(method: str, fallback: str, out: OutputArgs) -> Combiner:
    """The run's combiner; MBR embeds with the scorer's embedder (--embedder), else the packaged stand-in."""
    embed = None
    if method == MBR:
        from .score import CachedEmbed, Embedder

        embedder = Embedder(out.embedder)  # MBR under the metric: the scorer's embedder, or the stand-in
        embed = CachedEmbed(embedder.embed)  # rows are recombined after every batch: embed each text once
    return Combiner(method, fallback, embed)


def predict(args: PredictArgs, *, clock: Callable[[], float] = time.monotonic, loader=None) -> Report:
    """Write ``args.output`` for ``args.test_csv`` (a path or a DataFrame); returns the run report.

    Raises InputError before writing anything for a test table that cannot be read at all, and after the
    all-fallback file is written for a model, adapter or members spec that is missing or does not fit. Any
    other failure leaves a complete submission (fallbacks where nothing was generated) in ``report.error``.
    """
    start = clock()
    _check_outputs(args)
    table = read_test(args.test_csv)
    rows = Rows(table.rows, resolve_fallback(args.out), args.output)
    n = len(rows)
    report = Report(rows=n, output=args.output, warnings=list(table.warnings))
    report.budget_s = args.budget.seconds(n)
    deadline = start + report.budget_s - args.budget.margin(n)
    rows.write()  # a valid file exists before anything heavy can fail: from here on the output always scores

    try:
        todo = _answer(args, rows, report, deadline, clock, loader)
    except InputError as exc:
        # The all-fallback file is on disk and scores: the report says why nothing better came (exit 2 follows).
        _record_failure(report, exc, getattr(exc, "stage", "model load"))  # the stage the group reached
        _finish_report(args, report, rows, [], clock() - start)
        raise
    _finish_report(args, report, rows, todo, clock() - start)
    return report


def _answer(args: PredictArgs, rows: Rows, report: Report, deadline: float, clock, loader) -> list[int]:
    """Rules, resumed answers, then every member group in turn; returns the rows sent to the models."""
    members, method = resolve_members(args)
    report.combine = method
    if method == "first" and any(m.args.samples > 1 for m in members):
        report.warnings.append("members with samples > 1 under --combine first use only their first sample; "
                               "--combine mbr or concat uses them all")
        log.warning(report.warnings[-1])
    reports = {m.name: MemberReport(m.name, m.key, m.model, m.args.adapter, _adapter_kind(m)) for m in members}
    report.members = [asdict(r) for r in reports.values()]
    one_answer = len(members) == 1 and members[0].args.samples == 1
    fallback, n = rows.fallback, len(rows)
    combine = make_combiner("first" if one_answer else method, fallback, args.out)  # one answer: nothing to pick
    names = [m.name for m in members]
    finish = Finisher(args.out)

    def recombine(indices) -> None:
        rows.recombine(indices, names, combine.many, finish)

    rows.apply_rules()
    report.rule_based = rows.count(RULE)
    if args.resume:
        for name, count in rows.resume({m.key: m.name for m in members}).items():
            reports[name].resumed = count
    rows.log.start(keep=args.resume)
    recombine(range(n))
    rows.write()

    todo = [i for i in range(n) if rows[i].row.usable and rows[i].source != RULE]
    if todo:
        plan = groups(members)
        run = Run(args, rows, report, reports, recombine, clock, loader)
        for g, group in enumerate(plan):
            left = deadline - clock()
            group_deadline = clock() + max(0.0, left) * share_of(group, plan[g:])
            server = GroupServer(run, group)
            try:
                server.serve(todo, group_deadline)
            except InputError as exc:
                exc.stage = server.stage  # predict reports the failure at the stage the group reached
                if len(plan) == 1:
                    raise  # the one model or adapter the run has is unusable: the user's to fix (exit 2)
                # A spec's later member that does not fit must not end the members that do.
                server.failed(todo, exc, "input")
            except Exception as exc:  # the file on disk is complete; this group's rows keep what others gave
                log.debug("member group failed", exc_info=True)
                server.failed(todo, exc, "error")
            finally:
                _release_memory()
                report.members = [asdict(r) for r in reports.values()]
        rows.write()
    return todo


def _finish_report(args: PredictArgs, report: Report, rows: Rows, todo: list[int], elapsed: float) -> None:
    """The run's totals into the report, written to --report when given (on every exit that leaves a file)."""
    report.generated = rows.count(MODEL, fresh=True)
    report.resumed = rows.count(MODEL, fresh=False)  # answered entirely from an earlier run's candidates
    report.fallback = rows.count(FALLBACK)
    report.fallback_reasons = rows.reasons()
    report.elapsed_s = elapsed
    report.deadline_used = report.elapsed_s / report.budget_s if report.budget_s else 0.0
    if report.generate_s > 0:
        report.tokens_per_s = report.new_tokens / report.generate_s
        report.rows_per_s = len(todo) / report.generate_s
    _peak_memory(report)
    if args.report:
        os.makedirs(os.path.dirname(os.path.abspath(args.report)), exist_ok=True)  # as the output's folder is
        with open(args.report, "w", encoding="utf-8") as f:
            json.dump(asdict(report), f, indent=2)


def _record_failure(report: Report, exc: BaseException, stage: str) -> None:
    report.stage, report.error_type, report.error_message = stage, type(exc).__name__, one_line(exc)
    report.error = f"{report.error_type}: {report.error_message}"


def _release_memory() -> None:
    # The group's model must be gone before the next group's model loads (two 7B models do not fit a T4).
    from accelerate.utils.memory import clear_device_cache  # a dependency; imported late for a fast start-up

    clear_device_cache(garbage_collection=True)


def _adapter_kind(member: Member) -> str | None:
    """The member's PEFT type from its adapter's config, known before (or without) any model load."""
    from . import model as model_lib

    try:
        path = model_lib.resolve_adapter(member.args.adapter, model_lib.EMBEDDED_NAME, member.model is None)
        return model_lib.read_adapter_config(path).get("peft_type") if path else None
    except InputError:
        return None


def _check_outputs(args: PredictArgs) -> None:
    """Refuse, before any work, output paths that would fail at the end or destroy the input."""
    given = [("output", args.output)] + ([("report", args.report)] if args.report else [])
    if isinstance(args.test_csv, str) and os.path.exists(args.test_csv):
        for what, path in given:
            if os.path.exists(path) and os.path.samefile(path, args.test_csv):
                raise InputError(f"the {what} {path} is the input file: it would be overwritten")
    for what, path in given:
        if os.path.isdir(path):
            raise InputError(f"the {what} {path} is a folder; give a file path")
    if args.report and os.path.abspath(args.report) == os.path.abspath(args.output):
        raise InputError(f"the report and the output are the same file: {args.output}")


def load_before(load, model_args, seconds: float, loading: list):
    """Load the model in a thread; None if it is not done within ``seconds``.

    A load cannot be interrupted, but it can be abandoned: the daemon thread dies with the process, and the
    deadline holds even when the disk or the dequantization is slower than the budget. An abandoned load
    goes on in the background, so it is kept in ``loading``: no later model may load beside it.
    """
    box: dict = {}

    def run() -> None:
        try:
            box["value"] = load(model_args)
        except BaseException as exc:  # handed to the caller's thread, which decides
            box["error"] = exc

    thread = threading.Thread(target=run, name="model-load", daemon=True)
    thread.start()
    thread.join(max(seconds, 0.0))
    if thread.is_alive():
        loading.append(thread)
        return None
    if "error" in box:
        raise box["error"]
    return box["value"]


@dataclass
class Run:
    """What every member group of one predict run shares: its arguments, rows, reports, clock and loads."""

    args: PredictArgs
    rows: Rows
    report: Report
    reports: dict[str, MemberReport]
    """Member name -> its report."""
    recombine: Callable
    """Re-combine the given rows' candidates into their submitted text."""
    clock: Callable[[], float] = time.monotonic
    loader: Callable | None = None
    """model.load, or a test's stand-in."""
    loading: list = field(default_factory=list)
    """Model loads abandoned at their deadline that may still be running."""


class GroupServer:
    """One model loaded with every member's adapter, serving all members' rows in one scheduler run."""

    def __init__(self, run: Run, group: list[Member]) -> None:
        self.run, self.group = run, group
        self.by_rank = {m.rank: m for m in group}
        self.loaded = None
        self.prefix: dict[int, str] = {}
        """Member rank -> the answer prefix its template puts before the answer (stripped by clean)."""
        self.stage = "model load"
        """Where a failure of this group is reported: ``model load`` until its model is loaded, then ``predict``."""

    def serve(self, todo: list[int], deadline: float) -> None:
        keys = self.keys_to_answer(todo)
        if not keys:
            return
        self.loaded = self.load_before(deadline, keys)
        if self.loaded is None:
            return
        self.stage = "predict"  # the model and its adapters are loaded: what fails from here fails generating
        requests = self.requests(keys)
        self.generate(requests, deadline)

    def keys_to_answer(self, todo: list[int]) -> list[tuple[int, int, int]]:
        """One key per answer to make: (row, member rank, sample), minus what an earlier run already made."""
        rows = self.run.rows
        keys = [(i, m.rank, s) for m in self.group for i in todo for s in range(m.args.samples)
                if not rows.has(i, m.name, s)]
        for m in self.group:
            self.run.reports[m.name].requests = sum(1 for k in keys if k[1] == m.rank)
        return keys

    def load_before(self, deadline: float, keys: list) -> object | None:
        """The group's model with its members' adapters, or None (every key missed) if not loaded in time."""
        from . import model as model_lib

        run = self.run
        for thread in run.loading:  # a model abandoned by an earlier group may still be loading onto the same device
            thread.join(max(0.0, deadline - run.clock()))
        if run.clock() >= deadline or any(t.is_alive() for t in run.loading):
            _miss(keys, run.rows, run.reports, self.by_rank, "deadline")
            return None
        t = run.clock()
        model_args = dataclasses.replace(run.args.model, model=self.group[0].model,
                                         adapter=[m.args.adapter for m in self.group])
        loaded = load_before(run.loader or model_lib.load, model_args, deadline - t, run.loading)
        run.report.load_s += run.clock() - t
        if loaded is None:
            log.warning("the model did not load before its deadline; its members' rows keep other answers or the "
                        "fallback prompt")
            _miss(keys, run.rows, run.reports, self.by_rank, "deadline")
            return None
        run.report.model = {**loaded.identity, **loaded.info}
        if not run.report.startup:
            run.report.startup = dict(loaded.startup)
        return loaded

    def requests(self, keys: list) -> dict:
        """{key: engine Request}: each row's prompt under its member's template, tokenized once per template."""
        from .engine import Request
        from .prompt import PromptBuilder

        run, loaded = self.run, self.loaded
        adapter = {m.rank: loaded.adapter_names[j] for j, m in enumerate(self.group)}
        template_of: dict[int, object] = {}
        # Once per row and template, whatever the members and samples sharing it (greedy and sampled members of
        # one adapter share its template): tokenizing a 1,024-token prompt is not free.
        prompt_ids: dict[tuple[int, object], list[int]] = {}
        for j, m in enumerate(self.group):
            template = template_of[m.rank] = _template(run.args, m, loaded.adapter_paths[j])
            self.prefix[m.rank] = template.answer_prefix
            if j == 0:
                run.report.template = asdict(template)
            builder = PromptBuilder(loaded.tokenizer, template, run.args.prompt.max_input_tokens)
            for i in {k[0] for k in keys if k[1] == m.rank}:
                if (i, template) not in prompt_ids:
                    prompt_ids[i, template] = builder.build(run.rows[i].row.original_text,
                                                            run.rows[i].row.rewritten_text)
        requests = {}
        for i, rank, s in keys:
            m = self.by_rank[rank]
            sampled = m.args.samples > 1
            requests[i, rank, s] = Request(prompt_ids[i, template_of[rank]], adapter=adapter[rank],
                                           temperature=m.args.temperature if sampled else 0.0, top_p=m.args.top_p,
                                           seed=_seed(m.args.seed, rank, i, s))
        return requests

    def generate(self, requests: dict, deadline: float) -> None:
        """All requests through one scheduler run; the report gets its batches and seconds."""
        from .engine import Engine
        from .prompt import eos_token_ids, newline_token_ids

        run, loaded, gen = self.run, self.loaded, self.run.args.generation
        tok = loaded.tokenizer
        engine = (loaded.engine or Engine)(loaded.model, tok.pad_token_id, eos_token_ids(tok, loaded.model),
                                           gen.max_new_tokens, stop_ids=newline_token_ids(tok),
                                           served=loaded.served, clock=run.clock)
        gen_start = run.clock()
        limits = Limits(deadline, gen.max_new_tokens, gen.max_batch_tokens, gen.max_batch_size,
                        run.args.budget.budget_per_row)
        desc = " + ".join(m.name for m in self.group) if len(self.group) > 1 else "predict"
        scheduler = Scheduler(engine.run, limits, length=engine.length, clock=run.clock,
                              hooks=Hooks(self.on_batch, self.recover, run.args.progress, desc))
        # Every member's first answer for every row before anyone's second sample, members in priority order:
        # when time runs short, rows lose extras, not answers.
        scheduler.run(requests, tiers={k: (k[2], k[1]) for k in requests})
        run.report.generate_s += run.clock() - gen_start
        stats = scheduler.stats.as_dict()
        run.report.batches += stats["batches"]
        run.report.oom_splits += stats["oom_splits"]
        run.report.prompt_tokens += sum(b["prefill_tokens"] for b in stats["batches"])

    def on_batch(self, done: dict[tuple, Outcome]) -> None:
        """A finished batch: answers cleaned into candidates and logged, touched rows recombined, file rewritten."""
        run = self.run
        entries = []
        for (i, rank, sample), outcome in done.items():
            member = self.by_rank[rank]
            mrep = run.reports[member.name]
            if outcome.tokens is None:
                mrep.count(outcome.reason)
                run.rows.fall_back(i, outcome.reason or "unknown")
                continue  # not logged: on --resume it is tried again
            run.report.new_tokens += len(outcome.tokens)
            text = clean(self.loaded.tokenizer.decode(outcome.tokens, skip_special_tokens=True), self.prefix[rank],
                         run.args.out.max_prompt_words)
            if text is None:
                mrep.count("unusable_generation")
                run.rows.fall_back(i, "unusable_generation")  # junk: the mean prompt scores better
            else:
                mrep.answered += 1
            run.rows.add(i, member.name, sample, text)
            if outcome.timed_out:
                mrep.cut += 1  # serves this run's file, but --resume makes it again: it may be unfinished
            else:
                entries.append((i, member.key, member.name, sample, text))
        run.rows.record(entries)
        run.recombine({k[0] for k in done})
        run.rows.write()

    def failed(self, todo: list[int], exc: Exception, kind: str) -> None:
        """The group failed at ``self.stage``: recorded in the report; its rows keep other answers or fall back."""
        _record_failure(self.run.report, exc, self.stage)
        log.warning("member(s) %s failed at %s (%s); their rows keep other members' answers or the fallback",
                    ", ".join(m.name for m in self.group), self.stage, self.run.report.error)
        for i in todo:
            self.run.rows.fall_back(i, f"{kind}: {type(exc).__name__}")

    def recover(self, message: str) -> bool:
        """float16 overflow (Gemma 3 on a T4): switch the loaded model to the safe dtype and retry the batch."""
        from . import model as model_lib

        result = model_lib.upcast(self.loaded, why=message)
        if result["changed"]:
            self.run.report.recoveries.append(f"{message}: upcast from {result['from']} to {result['to']}")
            self.run.report.model.update(self.loaded.info)
        return bool(result["changed"])


def _miss(keys, rows: Rows, reports: dict, by_rank: dict, reason: str) -> None:
    for i, rank, _ in keys:
        reports[by_rank[rank].name].count(reason)
        rows.fall_back(i, reason)


def _seed(seed: int, rank: int, row: int, sample: int) -> int:
    # A stream per (member, row, sample): the same answers whatever batch a row lands in, and two sampled
    # members with the same seed still draw different answers.
    return (seed * 1_000_003 + rank * 999_983 + row * 7_919 + sample) % (2**63)


def _template(args: PredictArgs, member: Member, adapter_path: str | None):
    from .prompt import TEMPLATE_FILE, Template

    path = member.args.template or args.prompt.template
    if path:
        template = Template.load(path)
    elif adapter_path and os.path.isfile(os.path.join(adapter_path, TEMPLATE_FILE)):
        template = Template.load(adapter_path)  # the template the adapter was trained with
    else:
        template = Template()
    prefix = member.args.answer_prefix if member.args.answer_prefix is not None else args.prompt.answer_prefix
    return template.with_prefix(prefix)
