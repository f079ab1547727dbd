"""Command line: a dispatch table of typed entry functions; options are generated from the dataclasses.

Exit codes: 0 done (even with fallbacks); 2 unusable input, with a one-line message; 1 an internal
error after a valid fallback submission was written.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import sys
import types
import typing
from collections.abc import Callable

from .config import BundleArgs, EvaluateArgs, GenerateArgs, OptimizeArgs, PredictArgs, ScoreArgs, TrainArgs, field_docs
from .data import InputError
from .errors import one_line

# Short spellings promised by the command-line contract.
SHORT = {"output": "-o"}
# Options of shared dataclasses that mean nothing to a command: train and generate-data attach no stored adapter.
SKIP = {"train": frozenset({"adapter", "merge_lora"}), "generate-data": frozenset({"adapter", "merge_lora"})}


def _base_type(tp):
    """(python type, choices) for a field annotation: unwraps Optional and Literal."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _base_type(args[0])
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        return type(choices[0]), list(choices)
    return tp, None


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type, positional: tuple[str, ...] = (),
                       skip: frozenset[str] = frozenset()) -> None:
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            add_dataclass_args(parser, tp, skip=skip)
            continue
        if f.name in skip:
            continue
        help_text = docs.get(f.name, "")
        if f.name in positional:
            parser.add_argument(f.name, help=help_text)
            continue
        flag = "--" + f.name.replace("_", "-")
        names = [SHORT[f.name], flag] if f.name in SHORT else [flag]
        base, choices = _base_type(tp)
        default = f.default if f.default is not dataclasses.MISSING else None
        if typing.get_origin(base) is list:
            parser.add_argument(*names, dest=f.name, action="append", default=None, help=help_text)
            continue
        if base is bool:
            parser.add_argument(*names, dest=f.name, action=argparse.BooleanOptionalAction, default=default,
                                help=help_text)
        else:
            parser.add_argument(*names, dest=f.name, type=base, choices=choices, default=default,
                                help=f"{help_text} (default: {default})" if default is not None else help_text)


def build(cls: type, ns: argparse.Namespace):
    """Construct ``cls`` (and its nested dataclasses) from parsed options."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            value = build(tp, ns)
        elif hasattr(ns, f.name):
            value = getattr(ns, f.name)
        else:  # an option this command does not offer keeps its dataclass default
            value = f.default if f.default is not dataclasses.MISSING else None
        if value is None and f.default is dataclasses.MISSING and f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()  # an append option given no times
        kwargs[f.name] = value
    return cls(**kwargs)


class _FileHandler(logging.FileHandler):
    """The run's log file, opened only when something is written to it (so a quiet run leaves none).

    ``hidden`` tells whether it holds a warning or a traceback that the terminal did not show.
    """

    hidden = False

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info or (record.levelno >= logging.WARNING and not _ours(record)):
            self.hidden = True
        super().emit(record)


def _ours(record: logging.LogRecord) -> bool:
    return record.name == "prompt_recovery" or record.name.startswith("prompt_recovery.")


class _OneLine(logging.Formatter):
    """One line a message on the terminal: a traceback goes to the log file only."""

    def format(self, record: logging.LogRecord) -> str:
        return f"{record.levelname} {record.name}: {record.getMessage()}"


def log_path(args) -> str | None:
    """Where a command's library warnings and details go: beside its output (OUTPUT.log), if it has one;
    evaluate's output is a folder of its own, so its log goes inside it."""
    output = getattr(args, "output", None)
    if output and isinstance(args, EvaluateArgs):
        os.makedirs(output, exist_ok=True)
        return os.path.join(output, "evaluate.log")
    return os.path.normpath(output) + ".log" if output else None


@contextlib.contextmanager
def _logging(path: str | None, verbose: bool):
    """The terminal gets this package's warnings (about the user's input and options, which the user can act
    on), progress and summaries; libraries' warnings (transformers, peft, torch ``warnings.warn``, their
    logging) and this package's details go to ``path``. With --verbose everything goes to the terminal."""
    from transformers.utils import logging as hf_logging

    root, ours = logging.getLogger(), logging.getLogger("prompt_recovery")
    saved = root.level, ours.level, hf_logging.get_verbosity()
    terminal = logging.StreamHandler(sys.stderr)
    if verbose:
        terminal.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    else:
        terminal.setLevel(logging.WARNING)
        terminal.addFilter(_ours)
        terminal.setFormatter(_OneLine())
    handlers: list[logging.Handler] = [terminal]
    file = None
    if path and not verbose:
        try:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            file = _FileHandler(path, mode="w", encoding="utf-8", delay=True)
        except OSError:
            file = None  # an unwritable folder: the run goes on, library messages are dropped
        else:
            file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
            handlers.append(file)
    for h in handlers:
        root.addHandler(h)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    ours.setLevel(logging.DEBUG)
    logging.captureWarnings(True)  # warnings.warn -> the "py.warnings" logger -> the file, not the terminal
    # transformers logs through its own stderr handler and does not propagate: hand its records to ours.
    hf_logging.disable_default_handler()
    hf_logging.enable_propagation()
    hf_logging.set_verbosity(logging.INFO if verbose else logging.WARNING)
    if not verbose:
        hf_logging.disable_progress_bar()  # weight-loading bars would bury the lines this CLI promises
    try:
        yield file
    finally:
        for h in handlers:
            root.removeHandler(h)
            h.close()
        logging.captureWarnings(False)
        hf_logging.disable_propagation()
        hf_logging.enable_default_handler()
        hf_logging.set_verbosity(saved[2])
        root.setLevel(saved[0])
        ours.setLevel(saved[1])


def run_predict(args: PredictArgs) -> int:
    from .predict import predict

    report = predict(args)
    print(report.summary(), file=sys.stderr)
    return 1 if report.error else 0


def run_evaluate(args: EvaluateArgs) -> int:
    from .evaluate import evaluate, markdown

    result = evaluate(args)
    print(result.report.summary(), file=sys.stderr)
    print(markdown(result))
    print(f"per-row scores, table and chart in {args.output}", file=sys.stderr)
    return 1 if result.report.error else 0


def run_score(args: ScoreArgs) -> int:
    from .score import Embedder, score_files, write_per_row

    result = score_files(args.submission, args.gold, lambda: Embedder(args.embedder))
    if args.per_row:
        write_per_row(args.per_row, result)
    print(f"score {result.mean:.4f} over {len(result.ids)} rows ({result.label})")
    return 0


def run_optimize(args: OptimizeArgs) -> int:
    from .meanprompt import optimize

    r = optimize(args)
    what = "suffix" if r["mode"] == "suffix" else "mean prompt"
    err = sys.stderr
    held = bool(r["heldout_history"]) or r["heldout"] is not None
    rel = f" of scores relative to {r['relative_to']!r}" if r["relative_to"] else ""
    print(f"{what} written to {args.output}; combined scores are the {r['objective']}{rel} over "
          f"{len(r['embedders'])} embedder(s): " + "; ".join(r["embedders"]), file=err)
    cols = "train / held-out" if held else "train"
    print(f"  accepted moves (round: {cols}: text <- move):", file=err)
    for m in r["moves"]:
        scores = f"{m['train']:.4f}" + (f" / {m['heldout']:.4f}" if m["heldout"] is not None else "")
        print(f"    r{m['round']}: {scores}: {m['text']!r} <- {m['move'][:60]}", file=err)
    for name, row in r["scores"].items():
        parts = []
        for k, label in enumerate(r["embedders"]):
            s = f"{row['train']['per_embedder'][k]:.4f}"
            if row["heldout"] is not None:
                s += f" / {row['heldout']['per_embedder'][k]:.4f}"
            parts.append(f"{s} ({label})")
        total = f"{row['train']['combined']:.4f}" + (
            f" / {row['heldout']['combined']:.4f}" if row["heldout"] is not None else "")
        print(f"  {name} {row['text']!r}: {cols} {total} ({r['objective']}); " + "; ".join(parts), file=err)
    print(f"  {r['rounds']} rounds (stopped: {r['stopped']}), {r['evaluated']} candidates in {r['seconds']:.1f}s "
          f"({r['candidates_per_s']:.1f}/s), {r['rejected_by_fluency_guard']} rejected by the fluency guard",
          file=err)
    print("  " + _selection_line(r), file=err)
    return 0


def _selection_line(r: dict) -> str:
    """Why the written string was chosen, and how sure: the cross-validation's verdict and figures."""
    sel = r["selection"]
    if "adopted" in sel and "reason" not in sel:
        return f"written: the search result {r['best']!r} (no cross-validation: --folds 0)"
    figures = "; ".join(f"out-of-fold gain {e['gain']:+.1%} of the baseline's score, {e['lower']:+.1%} at the "
                        f"bootstrap lower bound, {e['without_top']:+.1%} without the prompts that gained most"
                        for e in sel["evidence"])
    verdict = "the search result" if sel["adopted"] else "the baseline"
    return (f"written: {verdict} {r['best']!r}; {sel['by']} over {sel['prompts']} prompts: {sel['reason']}"
            + (f" ({figures})" if figures else ""))


def run_train(args: TrainArgs) -> int:
    from .train import train

    s = train(args).summary
    print(f"adapter written to {args.output}: {s['method']} on {s['base_model']['name']}, {s['steps']} steps, "
          f"train loss {s['train_loss']:.4f}, best {s['best_metric']}, {s['seconds']:.0f}s, "
          f"peak RSS {s['peak_rss_mb']:.0f} MB", file=sys.stderr)
    return 0


def run_generate(args: GenerateArgs) -> int:
    from .generate import generate

    print(generate(args).summary(), file=sys.stderr)
    return 0


def run_bundle(args: BundleArgs) -> int:
    from .bundle import bundle, check_interpreter

    if args.check is not None:
        # Exit 0: the interpreter meets the bundle's contract; 1: it does not (one line per problem).
        code, text = check_interpreter(args.output, args.check)
        print(text)
        return code
    m = bundle(args)
    size = sum(f["bytes"] for f in m["files"]) / 2**20
    print(f"bundle written to {args.output}: {len(m['files'])} files, {size:.1f} MiB, "
          f"{len(m['pinned'])} pinned dependency wheels, adapters {m['adapters'] or 'none'}", file=sys.stderr)
    taken = ", ".join(f"{k} {v['requires'] or '(any)'}" for k, v in m["from_image"].items())
    print(f"taken from the image (manifest.json from_image): {taken or 'nothing'}", file=sys.stderr)
    return 0


DESCRIPTION = """Recover the rewrite prompt an LLM was given, from each row's original and rewritten text
(Kaggle's LLM Prompt Recovery), and write submission.csv (id, rewrite_prompt) with no row ever blank.

A competitor's order:
  generate-data    make training rows: rewrite texts under prompts with an instruction model
  train            train a LoRA or soft prompt on labelled rows
  optimize-prompt  search the fallback (mean) prompt on gold prompts
  evaluate         predict and score labelled rows: each member and combination, table and chart
  predict          write the submission for the test table, under a time budget
  score            score a submission against gold prompts
  bundle           build the offline folder the Kaggle notebook installs from"""

# name: (argument dataclass, positional fields, entry function, help)
COMMANDS: dict[str, tuple[type, tuple[str, ...], Callable[..., int], str]] = {
    "predict": (PredictArgs, ("test_csv",), run_predict, "write a submission for a test CSV"),
    "evaluate": (EvaluateArgs, ("labeled_csv",), run_evaluate,
                 "predict and score rows with gold prompts: each member alone and each combination"),
    "score": (ScoreArgs, ("submission", "gold"), run_score, "score a submission against gold prompts"),
    "optimize-prompt": (OptimizeArgs, ("prompts_csv",), run_optimize,
                        "search the mean prompt (or, with --predictions, the suffix) that scores best"),
    "generate-data": (GenerateArgs, ("texts",), run_generate,
                      "rewrite texts under rewrite prompts with an instruction model: rows for train"),
    "train": (TrainArgs, ("train_csv",), run_train, "train a soft prompt or LoRA adapter"),
    "bundle": (BundleArgs, (), run_bundle, "build the offline folder a Kaggle notebook installs from"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="prompt-recovery", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (cls, positional, _, help_text) in COMMANDS.items():
        add_dataclass_args(sub.add_parser(name, help=help_text, description=help_text), cls, positional,
                           SKIP.get(name, frozenset()))
    ns = parser.parse_args(argv)
    cls, _, entry, _ = COMMANDS[ns.command]
    try:
        args = build(cls, ns)
    except (InputError, ValueError) as exc:
        print(f"prompt-recovery {ns.command}: error: {exc}", file=sys.stderr)
        return 2
    with _logging(log_path(args), ns.verbose) as log_file:
        try:
            code = entry(args)
        except (InputError, ValueError) as exc:
            # Bad input is the user's to fix: one line, no traceback.
            print(f"prompt-recovery {ns.command}: error: {one_line(exc)}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print(f"prompt-recovery {ns.command}: interrupted", file=sys.stderr)
            return 130
        except Exception as exc:
            logging.getLogger(__name__).debug("internal error", exc_info=True)
            print(f"prompt-recovery {ns.command}: internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
            code = 1
        if log_file is not None and log_file.hidden:
            print(f"library warnings and details: {log_file.baseFilename}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
