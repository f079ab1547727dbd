"""generate-data: rewrite original texts under rewrite prompts with an instruction model -> train.csv rows.

The competitors' first step: the host made its data by asking Gemma 7b-it to rewrite texts, so the training
rows are made the same way. Texts come from a CSV or a folder; prompts from a CSV or filled from templates
with slots (tones, personas, forms...), optionally with prompts the model proposes itself. Each text is paired
with ``per_text`` different prompts, and every pair is rewritten through the same engine and scheduler as
predict: batched, under the time limit, with a progress bar. Rows are written atomically after every batch;
a rewrite that is unfinished (deadline, memory) is never written and is made on the next run (resume skips
what OUTPUT and OUTPUT.rejected.csv already hold). Rewrites that are empty, echo the prompt or the original,
or stop at the token limit are dropped, each with its reason.
"""

from __future__ import annotations

import csv
import dataclasses
import difflib
import hashlib
import io
import json
import logging
import os
import random
import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib import resources

from .config import GenerateArgs
from .data import MAX_CELL_CHARS, InputError, read_table
from .scheduler import Hooks, Limits, Outcome, Scheduler
from .submission import write_atomic

log = logging.getLogger(__name__)

COLUMNS = ("id", "original_text", "rewritten_text", "rewrite_prompt")
TEXT_SUFFIXES = (".txt", ".md")
# Below this the rewrite is the original with a word or two changed: no instruction can be read from it.
ECHO_RATIO = 0.95
# How a base model without a chat template is asked: a block it can continue (an instruction model would
# rather get its chat turn, which is what the host did with Gemma 7b-it).
PLAIN = "Instruction: {prompt}\n\nText:\n{text}\n\nRewritten text:\n"
PROPOSE = ("Here are instructions that ask for a text to be rewritten in a particular way (a tone, a persona, "
           "a form, an audience, a length):\n{examples}\nWrite one new instruction of this kind, different from "
           "these. Reply with the instruction only, on one line.")
PROPOSE_PLAIN = "Instructions for rewriting a text:\n{examples}\n-"


@dataclass(frozen=True)
class Pair:
    """One row to make: a text and the prompt to rewrite it under."""

    id: str
    text: str
    prompt: str


@dataclass
class GenerateReport:
    """What a generate-data run made, dropped and left unfinished, and why."""

    output: str
    texts: int = 0
    prompts: int = 0
    prompt_sources: dict = field(default_factory=dict)
    """Pool size by where each prompt came from: file, slots, model."""
    pairs: int = 0
    kept: int = 0
    """Rows (and dropped ids) an earlier run already settled: not made again."""
    requested: int = 0
    written: int = 0
    """Rows this run added to OUTPUT."""
    dropped: dict = field(default_factory=dict)
    """Rewrites made but not written, by reason (empty, echo_prompt, echo_original, truncated)."""
    unfinished: dict = field(default_factory=dict)
    """Pairs with no finished rewrite, by reason (deadline, oom, ...): the next run makes them."""
    skipped: dict = field(default_factory=dict)
    """Pairs never sent to the model, by reason (too_long: over --max-input-tokens)."""
    template: str = ""
    """How the model was asked: chat (its chat template) or plain (an Instruction / Text block)."""
    new_tokens: int = 0
    load_s: float = 0.0
    generate_s: float = 0.0
    seconds: float = 0.0
    model: dict = field(default_factory=dict)
    warnings: list = field(default_factory=list)

    def summary(self) -> str:
        def counts(d: dict) -> str:
            return ", ".join(f"{k} {v}" for k, v in sorted(d.items(), key=lambda kv: -kv[1]))

        lines = [f"generate-data: {self.pairs} pairs of {self.texts} texts and a pool of {self.prompts} prompts; "
                 f"{self.kept} settled by an earlier run"]
        if self.requested or self.template:
            lines.append(f"  {self.written} rows written to {self.output} in {self.seconds:.0f}s "
                         f"(load {self.load_s:.0f}s, generation {self.generate_s:.0f}s, {self.new_tokens} tokens, "
                         f"{self.template or 'no'} prompts)")
        elif not self.unfinished:
            lines.append(f"  nothing left to make: {self.output} is complete for these inputs")
        if self.dropped:
            lines.append(f"  dropped {sum(self.dropped.values())}: {counts(self.dropped)} "
                         f"(ids in {rejected_path(self.output)})")
        if self.unfinished:
            lines.append(f"  unfinished {sum(self.unfinished.values())}: {counts(self.unfinished)}; "
                         "run the same command again to make them")
        if self.skipped:
            lines.append(f"  skipped {sum(self.skipped.values())}: {counts(self.skipped)}")
        return "\n".join(lines)


def rejected_path(output: str) -> str:
    return output + ".rejected.csv"


def pool_path(output: str) -> str:
    return output + ".prompts.csv"


# ---------------------------------------------------------------------------------------------------- inputs


def read_texts(path: str, warnings: list[str]) -> list[str]:
    """Texts from a CSV (original_text or text column) or a folder of .txt / .md files, in order, deduplicated."""
    if os.path.isdir(path):
        names = sorted(n for n in os.listdir(path) if n.lower().endswith(TEXT_SUFFIXES))
        if not names:
            raise InputError(f"{path} holds no {' or '.join(TEXT_SUFFIXES)} files")
        texts = [_read_file(os.path.join(path, n), warnings) for n in names]
    else:
        texts = _column(path, ("original_text", "text"))
    cleaned = [t.strip()[:MAX_CELL_CHARS] for t in texts]
    empty = sum(1 for t in cleaned if not t)
    unique = list(dict.fromkeys(t for t in cleaned if t))
    if empty:
        warnings.append(f"{empty} empty text(s) of {path} skipped")
    if len(unique) < len(cleaned) - empty:
        warnings.append(f"{len(cleaned) - empty - len(unique)} repeated text(s) of {path} kept once")
    if not unique:
        raise InputError(f"{path} holds no text to rewrite")
    return unique


def _read_file(path: str, warnings: list[str]) -> str:
    try:
        with open(path, encoding="utf-8-sig") as f:
            return f.read()
    except UnicodeDecodeError:
        warnings.append(f"{path} is not UTF-8; read as latin-1, some characters may be wrong")
        with open(path, encoding="latin-1") as f:
            return f.read()


def _column(path: str, names: tuple[str, ...]) -> list[str]:
    """The first of ``names`` that ``path`` (a CSV) has, as strings."""
    table, _, warnings, _ = read_table(path, required=(), optional=())
    for w in warnings:
        log.warning(w)
    for name in names:
        if name in table:
            return table[name]
    found = ", ".join(repr(c) for c in list(table)[:6]) or "none"
    raise InputError(f"{path} has no {' or '.join(repr(n) for n in names)} column (columns found: {found})")


def read_prompts(path: str) -> list[str]:
    prompts = list(dict.fromkeys(p.strip() for p in _column(path, ("rewrite_prompt", "prompt")) if p.strip()))
    if not prompts:
        raise InputError(f"{path} holds no prompt")
    return prompts


def load_slots(path: str) -> dict:
    """Templates and slot lists: the shipped file for "auto", else a JSON file of the same shape."""
    try:
        if path == "auto":
            text = resources.files("prompt_recovery").joinpath("assets/prompt_slots.json").read_text("utf-8")
        else:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        slots = json.loads(text)
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"cannot read prompt slots {path}: {exc}") from None
    templates = slots.get("templates") if isinstance(slots, dict) else None
    if not templates or not all(isinstance(t, str) for t in templates):
        raise InputError(f"prompt slots {path} need a 'templates' list of strings")
    for t in templates:
        missing = [s for s in re.findall(r"\{(\w+)\}", t) if not slots.get(s)]
        if missing:
            raise InputError(f"prompt slots {path}: template {t!r} names slot(s) with no values: {missing}")
    return slots


def fill_slots(slots: dict, n: int, seed: int) -> list[str]:
    """Up to ``n`` distinct prompts: a template drawn in turn, each slot filled at random (seeded)."""
    rng = random.Random(seed)
    templates = list(slots["templates"])
    out: dict[str, None] = {}
    # Small slot lists may hold fewer than n distinct fillings: stop after a bounded number of repeats.
    for _ in range(20 * n):
        if len(out) >= n:
            break
        template = rng.choice(templates)
        prompt = re.sub(r"\{(\w+)\}", lambda m: rng.choice(slots[m.group(1)]), template)
        out.setdefault(prompt[0].upper() + prompt[1:], None)
    return list(out)


def pair_up(texts: list[str], pool: list[str], per_text: int, seed: int) -> list[Pair]:
    """Each text with ``per_text`` different prompts, the pool's uses balanced (round robin over a shuffle)."""
    order = list(pool)
    random.Random(seed).shuffle(order)
    k = min(per_text, len(order))  # a text never gets the same prompt twice
    pairs = []
    for t, text in enumerate(texts):
        for j in range(k):
            prompt = order[(t * k + j) % len(order)]
            pairs.append(Pair(pair_id(text, prompt), text, prompt))
    return pairs


def pair_id(text: str, prompt: str) -> str:
    # From the content, not the position: the same pair keeps its id when inputs are reordered or extended.
    return "g" + hashlib.sha1(f"{text}\0{prompt}".encode()).hexdigest()[:12]


# ---------------------------------------------------------------------------------------------------- judging


def _norm(text: str) -> str:
    return " ".join(re.findall(r"\w+", text.lower()))


def judge(pair: Pair, rewrite: str, n_tokens: int, max_new_tokens: int) -> str | None:
    """Why a finished rewrite is not a training row, or None when it is one."""
    if n_tokens >= max_new_tokens:
        return "truncated"  # still running at the limit: the end of the rewrite is missing
    got, prompt, original = _norm(rewrite), _norm(pair.prompt), _norm(pair.text)
    if not got:
        return "empty"
    if got == prompt or (len(prompt.split()) >= 3 and prompt in got):
        return "echo_prompt"  # the label would sit in the input: a model would learn to copy it
    if got == original or difflib.SequenceMatcher(None, got.split(), original.split(),
                                                  autojunk=False).ratio() >= ECHO_RATIO:
        return "echo_original"
    return None


# ---------------------------------------------------------------------------------------------------- output


class Store:
    """OUTPUT's rows and OUTPUT.rejected.csv's ids: what an earlier run settled, and this run's additions."""

    def __init__(self, output: str, resume: bool, max_new_tokens: int) -> None:
        self.output = output
        self.rows: list[dict] = _read_csv(output) if resume else []
        self.rejected: list[dict] = _read_csv(rejected_path(output)) if resume else []
        # A rewrite cut at a smaller token limit is made again under a larger one.
        self.settled = {r["id"] for r in self.rows} | {
            r["id"] for r in self.rejected
            if r.get("reason") != "truncated" or int(r.get("max_new_tokens") or 0) >= max_new_tokens}
        self.rejected = [r for r in self.rejected if r["id"] in self.settled]
        self.order: dict[str, int] = {}
        """Pair id -> its place in the input; rows are written in that order whatever batch made them."""

    def add(self, pair: Pair, rewrite: str) -> None:
        self.rows.append({"id": pair.id, "original_text": pair.text, "rewritten_text": rewrite,
                          "rewrite_prompt": pair.prompt})

    def reject(self, pair: Pair, reason: str, max_new_tokens: int) -> None:
        self.rejected.append({"id": pair.id, "reason": reason, "max_new_tokens": str(max_new_tokens)})

    def write(self) -> None:
        # Rows of an earlier run's inputs that this run does not pair (order -1) stay first, as they were.
        self.rows.sort(key=lambda r: self.order.get(r["id"], -1))
        n = len(self.rows)
        write_atomic(self.output, _render(COLUMNS, self.rows),
                     check=lambda tmp: _expect(len(_read_csv(tmp)), n, self.output))
        if self.rejected or os.path.exists(rejected_path(self.output)):
            write_atomic(rejected_path(self.output), _render(("id", "reason", "max_new_tokens"), self.rejected))


def _expect(got: int, want: int, path: str) -> None:
    if got != want:
        raise OSError(f"{path}: {got} rows read back, {want} written")


def _render(columns: tuple[str, ...], rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def _read_csv(path: str) -> list[dict]:
    if not os.path.isfile(path):
        return []
    table, n, _, _ = read_table(path, required=("id",), optional=())
    return [{c: table[c][k] for c in table} for k in range(n)]


# ---------------------------------------------------------------------------------------------------- the model


class Prompter:
    """Token ids that ask the model for a rewrite (or a new prompt): its chat template, else a plain block."""

    def __init__(self, tokenizer, max_input_tokens: int) -> None:
        self.tok = tokenizer
        self.max_input_tokens = max_input_tokens
        self.chat = bool(getattr(tokenizer, "chat_template", None))

    def _ids(self, content: str, plain: str) -> list[int]:
        if self.chat:
            text = self.tok.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                add_generation_prompt=True)
            return list(self.tok(text, add_special_tokens=False)["input_ids"])
        return list(self.tok(plain, add_special_tokens=True)["input_ids"])

    def rewrite(self, pair: Pair) -> list[int] | None:
        """None when the prompt would be longer than max_input_tokens."""
        ids = self._ids(f"{pair.prompt}\n\n{pair.text}", PLAIN.format(prompt=pair.prompt, text=pair.text))
        return ids if len(ids) <= self.max_input_tokens else None

    def propose(self, examples: list[str]) -> list[int]:
        listed = "\n".join(f"- {e}" for e in examples)
        return self._ids(PROPOSE.format(examples=listed), PROPOSE_PLAIN.format(examples=listed))


@dataclass
class Session:
    """The loaded model and what every scheduler run of this command shares."""

    args: GenerateArgs
    loaded: object
    prompter: Prompter
    deadline: float
    clock: Callable[[], float]
    report: GenerateReport

    def run(self, requests: dict, max_new_tokens: int, stop_ids, on_batch, desc: str) -> dict[object, Outcome]:
        from . import model as model_lib
        from .engine import Engine
        from .prompt import eos_token_ids

        tok, loaded = self.loaded.tokenizer, self.loaded
        engine = Engine(loaded.model, tok.pad_token_id, eos_token_ids(tok, loaded.model), max_new_tokens,
                        stop_ids=stop_ids, served=loaded.served, clock=self.clock)

        def recover(message: str) -> bool:
            # float16 overflow (Gemma on a T4): the loaded model moves to the safe dtype and the batch runs again.
            return bool(model_lib.upcast(loaded, why=message)["changed"])

        limits = Limits(self.deadline, max_new_tokens, self.args.max_batch_tokens, self.args.max_batch_size,
                        self.args.budget.budget_per_row)
        scheduler = Scheduler(engine.run, limits, length=engine.length, clock=self.clock,
                              hooks=Hooks(on_batch, recover, self.args.progress, desc))
        return scheduler.run(requests)


def _seed(seed: int, key: str) -> int:
    # A stream per row from its id: the same rewrite whatever batch it lands in, and on a resumed run.
    return (seed * 1_000_003 + int(hashlib.sha1(key.encode()).hexdigest()[:15], 16)) % (2**63)


def propose_prompts(session: Session, pool: list[str], n: int) -> list[str]:
    """Up to ``n`` new prompts the model writes itself, a few pool prompts shown as examples each time."""
    from .prompt import newline_token_ids

    args = session.args
    rng = random.Random(args.seed + 1)
    requests = {}
    for k in range(2 * n):  # twice as many asked as wanted: some come back empty or repeated
        examples = rng.sample(pool, min(4, len(pool)))
        requests[f"p{k}"] = _request(session.prompter.propose(examples), max(args.temperature, 1.0), args,
                                     f"propose{k}")
    done = session.run(requests, 48, newline_token_ids(session.loaded.tokenizer), None, "propose prompts")
    seen = {_norm(p) for p in pool}
    new: list[str] = []
    for key in requests:
        tokens = done[key].tokens
        text = session.loaded.tokenizer.decode(tokens or [], skip_special_tokens=True)
        line = next((s.strip(" -*\"'\t") for s in text.splitlines() if s.strip(" -*\"'\t")), "")
        if 3 <= len(line.split()) <= 45 and _norm(line) not in seen and len(new) < n:
            seen.add(_norm(line))
            new.append(line)
    return new


def _request(ids: list[int], temperature: float, args: GenerateArgs, key: str):
    from .engine import Request

    return Request(ids, temperature=temperature, top_p=args.top_p, seed=_seed(args.seed, key))


# ---------------------------------------------------------------------------------------------------- the run


def generate(args: GenerateArgs, *, clock: Callable[[], float] = time.monotonic, loader=None) -> GenerateReport:
    """Make the rows: read, pair, load under the deadline, rewrite batch by batch, write after every batch."""
    t0 = clock()
    _check_paths(args)
    report = GenerateReport(output=args.output)
    texts = read_texts(args.texts, report.warnings)
    pool, sources = _prompt_pool(args, report.warnings)
    store = Store(args.output, args.resume, args.max_new_tokens)
    for w in report.warnings:
        log.warning(w)
    propose = args.propose_prompts > 0 and "model" not in sources
    if not propose:
        _write_pool(args.output, pool, sources)
    pairs, todo = _plan(texts, pool, store, args, report)
    seconds = args.budget.seconds(len(pairs))
    deadline = t0 + seconds - args.budget.margin(len(pairs))
    if todo or propose:
        session = _open(args, report, deadline, clock, loader)
        if session is None:
            report.unfinished["deadline"] = len(todo)
        else:
            if propose:
                new = propose_prompts(session, pool, args.propose_prompts)
                pool, sources["model"] = pool + new, len(new)
                _write_pool(args.output, pool, sources)
                pairs, todo = _plan(texts, pool, store, args, report)
            _rewrite(session, todo, store)
    report.prompts, report.prompt_sources = len(pool), dict(sources)
    store.write()
    report.seconds = clock() - t0
    if args.report:
        write_atomic(args.report, json.dumps(asdict(report), indent=2))
    return report


def _plan(texts: list[str], pool: list[str], store: Store, args: GenerateArgs, report: GenerateReport):
    """The pairs, and those an earlier run has not settled."""
    pairs = pair_up(texts, pool, args.per_text, args.seed)
    todo = [p for p in pairs if p.id not in store.settled]
    store.order = {p.id: n for n, p in enumerate(pairs)}
    report.texts, report.pairs, report.kept = len(texts), len(pairs), len(pairs) - len(todo)
    return pairs, todo


def _check_paths(args: GenerateArgs) -> None:
    """Refuse, before any work, outputs that are folders or would overwrite an input."""
    for what, path in (("output", args.output), ("report", args.report)):
        if path and os.path.isdir(path):
            raise InputError(f"the {what} {path} is a folder; give a file path")
        for name, src in (("texts", args.texts), ("prompts", args.prompts)):
            if path and src and os.path.isfile(src) and os.path.exists(path) and os.path.samefile(path, src):
                raise InputError(f"the {what} {path} is the {name} file: it would be overwritten")


def _prompt_pool(args: GenerateArgs, warnings: list[str]) -> tuple[list[str], dict]:
    """The prompt pool: an earlier run's (resume keeps the pairs it made), else from --prompts or the slots."""
    path = pool_path(args.output)
    if args.resume and os.path.isfile(path):
        kept = _read_csv(path)
        pool = [r["rewrite_prompt"] for r in kept if r.get("rewrite_prompt", "").strip()]
        if pool:
            return pool, dict(Counter(r.get("source", "file") for r in kept))
        warnings.append(f"{path} holds no prompt; the pool is made again")
    if args.prompts:
        prompts = read_prompts(args.prompts)
        return prompts, {"file": len(prompts)}
    pool = fill_slots(load_slots(args.prompt_slots), args.n_prompts, args.seed)
    if len(pool) < args.n_prompts:
        warnings.append(f"the prompt slots hold only {len(pool)} distinct prompts (asked for {args.n_prompts})")
    return pool, {"slots": len(pool)}


def _write_pool(output: str, pool: list[str], sources: dict) -> None:
    # The pool is written once, before any row: a resumed run pairs the same texts with the same prompts.
    names = [s for s in ("file", "slots", "model") if sources.get(s)]
    labels = [name for name in names for _ in range(sources[name])]
    rows = [{"id": f"p{k:04d}", "rewrite_prompt": p, "source": s} for k, (p, s) in enumerate(zip(pool, labels))]
    write_atomic(pool_path(output), _render(("id", "rewrite_prompt", "source"), rows))


def _open(args: GenerateArgs, report: GenerateReport, deadline: float, clock, loader) -> Session | None:
    """Load the bare model before the deadline (None when it does not make it)."""
    from . import model as model_lib
    from .predict import load_before

    # Rewrites come from the base model as it is: a recovery adapter (the "auto" default) would only harm them.
    model_args = dataclasses.replace(args.model, adapter=["none"])
    t = clock()
    loaded = load_before(loader or model_lib.load, model_args, deadline - t, [])
    report.load_s = clock() - t
    if loaded is None:
        log.warning("the model did not load before the deadline; no rewrite was made")
        return None
    report.model = {**loaded.identity, **loaded.info}
    prompter = Prompter(loaded.tokenizer, args.max_input_tokens)
    report.template = "chat" if prompter.chat else "plain"
    if not prompter.chat:
        log.warning("the model has no chat template: it is asked with plain 'Instruction / Text / Rewritten text' "
                    "blocks; an instruction model (the host used Gemma 7b-it) gives faithful rewrites")
    return Session(args, loaded, prompter, deadline, clock, report)


def _rewrite(session: Session, todo: list[Pair], store: Store) -> None:
    """Every pair through the scheduler; each finished batch judged, stored and written at once."""
    args, report, tok = session.args, session.report, session.loaded.tokenizer
    requests, by_id = {}, {}
    for pair in todo:
        ids = session.prompter.rewrite(pair)
        if ids is None:
            report.skipped["too_long"] = report.skipped.get("too_long", 0) + 1
            continue
        requests[pair.id], by_id[pair.id] = _request(ids, args.temperature, args, pair.id), pair
    report.requested = len(requests)
    dropped, unfinished = Counter(), Counter()

    def on_batch(done: dict[object, Outcome]) -> None:
        for key, outcome in done.items():
            pair = by_id[key]
            if outcome.tokens is None or outcome.timed_out:
                unfinished[outcome.reason or "deadline"] += 1  # never written: the next run makes it
                continue
            report.new_tokens += len(outcome.tokens)
            rewrite = tok.decode(outcome.tokens, skip_special_tokens=True).strip()
            reason = judge(pair, rewrite, len(outcome.tokens), args.max_new_tokens)
            if reason is None:
                store.add(pair, rewrite)
                report.written += 1
            else:
                dropped[reason] += 1
                store.reject(pair, reason, args.max_new_tokens)
        store.write()

    t = session.clock()
    if requests:
        session.run(requests, args.max_new_tokens, (), on_batch, "generate-data")
    report.generate_s = session.clock() - t
    report.dropped, report.unfinished = dict(dropped), dict(unfinished)
