"""predict: test CSV in, valid submission out, inside a time budget; no row is ever blank.

Order of work, chosen so that a failure at any step still leaves a scoring submission:
read input -> write an all-fallback submission -> apply checkpoint and rules -> load model ->
build prompts -> scheduler (after each batch: postprocess, atomic rewrite, checkpoint) -> report.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib.resources import files

from .config import OutputArgs, PredictArgs
from .data import InputError, read_test
from .postprocess import UNCHANGED_PROMPT, clean, fit_with_suffix, normalise, unchanged
from .scheduler import Outcome, Scheduler
from .submission import Checkpoint, input_fingerprint, write_submission

log = logging.getLogger(__name__)

MODEL = "model"
RULE = "rule"
FALLBACK = "fallback"


@dataclass
class Report:
    rows: int = 0
    generated: int = 0
    rule_based: int = 0
    resumed: int = 0
    fallback: int = 0
    fallback_reasons: dict = field(default_factory=dict)
    elapsed_s: float = 0.0
    load_s: float = 0.0
    generate_s: float = 0.0
    budget_s: float = 0.0
    deadline_used: float = 0.0
    """Share of the run's budget (before the safety margin) spent."""
    new_tokens: int = 0
    tokens_per_s: float = 0.0
    rows_per_s: float = 0.0
    peak_rss_mb: float = 0.0
    peak_cuda_mb: float | None = None
    batches: list = field(default_factory=list)
    oom_splits: int = 0
    model: dict = field(default_factory=dict)
    template: dict = field(default_factory=dict)
    warnings: list = field(default_factory=list)
    error: str | None = None
    output: str = ""

    def summary(self) -> str:
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(self.fallback_reasons.items())) or "none"
        lines = [
            (f"wrote {self.output}: {self.rows} rows; {self.generated} generated, {self.rule_based} by rule, "
            f"{self.resumed} resumed, {self.fallback} fallback ({reasons})"),
            (f"time {self.elapsed_s:.1f}s of {self.budget_s:.0f}s budget ({100 * self.deadline_used:.0f}%); "
            f"load {self.load_s:.1f}s, generate {self.generate_s:.1f}s in {len(self.batches)} batches, "
            f"{self.rows_per_s:.2f} rows/s, {self.tokens_per_s:.1f} new tokens/s"),
            f"peak memory: {self.peak_rss_mb:.0f} MB RSS"
            + (f", {self.peak_cuda_mb:.0f} MB CUDA" if self.peak_cuda_mb is not None else ""),
        ]
        if self.model:
            lines.append(
                f"model {self.model.get('name')} ({self.model.get('device')}, {self.model.get('dtype')}, "
                f"quantize {self.model.get('quantize')}); adapter {self.model.get('adapter') or 'none'}"
                + (f" ({self.model.get('adapter_type')})" if self.model.get("adapter_type") else "")
            )
        lines += [f"warning: {w}" for w in self.warnings]
        if self.error:
            lines.append(f"error: {self.error}")
        return "\n".join(lines)


def shipped_text(name: str) -> str:
    """A text file shipped in the package's assets, stripped; empty if the package ships none."""
    path = files("prompt_recovery").joinpath("assets", name)
    return path.read_text(encoding="utf-8").strip() if path.is_file() else ""


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


def predict(args: PredictArgs, *, clock: Callable[[], float] = time.monotonic, loader=None) -> Report:
    """Write ``args.output`` for ``args.test_csv``; returns the run report.

    Raises InputError before writing anything for a test file that cannot be read at all, and after the
    all-fallback file is written for a model or adapter that is missing or does not fit. Any other failure
    leaves a complete submission (fallbacks where nothing was generated) and is recorded in ``report.error``.
    """
    start = clock()
    table = read_test(args.test_csv)
    fallback = resolve_fallback(args.out)
    suffix = resolve_suffix(args.out)
    count = limit = None
    if args.out.embedder:
        from .score import embedder_token_counter

        count, limit = embedder_token_counter(args.out.embedder)  # trim to what the scorer reads

    def finish(text: str) -> str:
        return fit_with_suffix(text, suffix, count, limit)

    rows = table.rows
    n = len(rows)
    ids = [r.id for r in rows]
    report = Report(rows=n, output=args.output, warnings=list(table.warnings))
    report.budget_s = args.budget.seconds(n)
    deadline = start + report.budget_s - args.budget.margin(n)

    prompts: list[str] = [fallback] * n
    sources: list[str] = [FALLBACK] * n
    reasons: dict[int, str] = {}
    # A valid file exists before anything heavy can fail: from here on the output always scores.
    write_submission(args.output, ids, prompts)

    checkpoint = Checkpoint(Checkpoint.path_for(args.output),
                            input_fingerprint(ids, [(r.original_text, r.rewritten_text) for r in rows]))
    done = checkpoint.load(ids) if args.resume else {}
    checkpoint.start(keep=bool(done))
    for i, (prompt, source) in done.items():
        prompts[i], sources[i] = prompt, source
    report.resumed = len(done)

    todo: list[int] = []
    rule_rows: list[tuple[int, str, str, str]] = []
    for i, row in enumerate(rows):
        if i in done:
            continue
        if not row.usable:
            reasons[i] = "empty_text"  # nothing to read a prompt from: the mean prompt is the best guess
        elif unchanged(row.original_text, row.rewritten_text):
            prompts[i], sources[i] = UNCHANGED_PROMPT, RULE
            rule_rows.append((i, row.id, UNCHANGED_PROMPT, RULE))
        else:
            todo.append(i)
    if rule_rows:
        checkpoint.append(rule_rows)
    report.rule_based = len(rule_rows)
    if done or rule_rows:
        write_submission(args.output, ids, prompts)

    if todo:
        try:
            _generate(args, rows, todo, prompts, sources, reasons, ids, checkpoint, finish, report,
                      deadline, clock, loader)
        except InputError:
            raise
        except Exception as exc:  # the fallback file is already in place; say what broke and keep it
            log.exception("prediction failed; rows not yet generated keep the fallback prompt")
            report.error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            for i in todo:
                if sources[i] == FALLBACK:
                    reasons.setdefault(i, f"error: {type(exc).__name__}")
        write_submission(args.output, ids, prompts)

    report.generated = sum(1 for s in sources if s == MODEL) - sum(1 for _, s in done.values() if s == MODEL)
    report.fallback = sum(1 for s in sources if s == FALLBACK)
    report.fallback_reasons = dict(Counter(reasons[i] for i in range(n) if sources[i] == FALLBACK and i in reasons))
    report.elapsed_s = clock() - start
    report.deadline_used = report.elapsed_s / report.budget_s if report.budget_s else 0.0
    _peak_memory(report)
    if args.report:
        with open(args.report, "w", encoding="utf-8") as f:
            json.dump(asdict(report), f, indent=2)
    return report


def _load_before(load, model_args, seconds: float):
    """Load the model in a thread; None if it is not done within ``seconds``.

    A load cannot be interrupted, but it can be abandoned: the daemon thread dies with the process, and the
    deadline holds even when the disk or the dequantization is slower than the budget.
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
        return None
    if "error" in box:
        raise box["error"]
    return box["value"]


def _generate(args, rows, todo, prompts, sources, reasons, ids, checkpoint, finish, report, deadline,
              clock, loader) -> None:
    from . import model as model_lib
    from .engine import Engine
    from .prompt import TEMPLATE_FILE, PromptBuilder, Template, newline_token_ids

    t = clock()
    if t >= deadline:
        for i in todo:
            reasons[i] = "deadline"
        return
    loaded = _load_before(loader or model_lib.load, args.model, deadline - t)
    report.load_s = clock() - t
    if loaded is None:
        log.warning("the model did not load before the deadline; every row keeps the fallback prompt")
        for i in todo:
            reasons[i] = "deadline"
        return
    report.model = {**loaded.identity, **loaded.info}
    tok = loaded.tokenizer

    if args.prompt.template:
        template = Template.load(args.prompt.template)
    elif loaded.adapter and os.path.isfile(os.path.join(loaded.adapter, TEMPLATE_FILE)):
        template = Template.load(loaded.adapter)  # the template the adapter was trained with
    else:
        template = Template()
    template = template.with_prefix(args.prompt.answer_prefix)
    report.template = asdict(template)
    builder = PromptBuilder(tok, template, args.prompt.max_input_tokens)
    token_prompts = {i: builder.build(rows[i].original_text, rows[i].rewritten_text) for i in todo}

    eos = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    gen_eos = getattr(getattr(loaded.model, "generation_config", None), "eos_token_id", None)
    eos |= set(gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else [])
    engine = Engine(loaded.model, tok.pad_token_id, eos, args.generation.max_new_tokens,
                    stop_ids=newline_token_ids(tok))

    def on_batch(done: dict[int, Outcome]) -> None:
        finished = []
        for i, outcome in done.items():
            if outcome.tokens is None:
                reasons[i] = outcome.reason or "unknown"
                continue
            text = clean(tok.decode(outcome.tokens, skip_special_tokens=True), template.answer_prefix,
                         args.out.max_prompt_words)
            report.new_tokens += len(outcome.tokens)
            if text is None:
                reasons[i] = "unusable_generation"  # junk or empty output: the mean prompt scores better
                continue
            prompts[i], sources[i] = finish(text), MODEL
            finished.append((i, ids[i], prompts[i], MODEL))
        write_submission(args.output, ids, prompts)
        checkpoint.append(finished)

    gen_start = clock()
    scheduler = Scheduler(
        engine.generate,
        deadline=deadline,
        max_new_tokens=args.generation.max_new_tokens,
        max_batch_tokens=args.generation.max_batch_tokens,
        max_batch_size=args.generation.max_batch_size,
        budget_per_row=args.budget.budget_per_row,
        clock=clock,
        on_batch=on_batch,
        progress=args.progress,
    )
    scheduler.run(token_prompts)
    report.generate_s = clock() - gen_start
    stats = scheduler.stats.as_dict()
    report.batches, report.oom_splits = stats["batches"], stats["oom_splits"]
    if report.generate_s > 0:
        report.tokens_per_s = report.new_tokens / report.generate_s
        report.rows_per_s = len(todo) / report.generate_s
