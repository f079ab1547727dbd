"""Typed arguments, one dataclass per concern, validated in __post_init__.

Each field carries a one-line docstring; the CLI reads them (``field_docs``) as its help text, so the
command line and the Python API never drift apart.
"""

from __future__ import annotations

import ast
import inspect
import itertools
import re
import textwrap
from dataclasses import dataclass, field, fields
from functools import cache
from typing import Literal, get_args

Quantize = Literal["none", "4bit", "8bit"]
DType = Literal["auto", "float32", "bfloat16", "float16"]
Device = Literal["auto", "cpu", "cuda"]


def _choice(name: str, value: object, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(str, choices))}; got {value!r}")


@dataclass
class ModelArgs:
    model: str | None = None
    """HF model folder, a .gguf file, or empty for the embedded Gemma 3 270M."""
    adapter: list[str] = field(default_factory=lambda: ["auto"])
    """PEFT adapter folder (repeat for an ensemble over one base); auto: the shipped one; none: the bare base."""
    quantize: Quantize = "none"
    """bitsandbytes quantization of the base model: none, 4bit (nf4, double quantization) or 8bit."""
    dtype: DType = "auto"
    """Weights and compute dtype; auto: float32 on CPU, bfloat16 where the GPU has it, else float16."""
    device: Device = "auto"
    """Where the model runs; auto: every visible GPU (device_map=auto), else the CPU."""
    merge_lora: bool = True
    """Merge a LoRA adapter into an unquantized base for speed."""
    cache_dir: str | None = None
    """Where GGUF files are converted once into HF folders (default ~/.cache/prompt_recovery)."""

    def __post_init__(self) -> None:
        # One folder may be given as a string; an empty list means the default.
        if self.adapter is None or isinstance(self.adapter, str):
            self.adapter = [self.adapter or "none"]
        self.adapter = list(self.adapter) or ["auto"]
        _choice("quantize", self.quantize, ("none", "4bit", "8bit"))
        _choice("dtype", self.dtype, ("auto", "float32", "bfloat16", "float16"))
        _choice("device", self.device, ("auto", "cpu", "cuda"))
        if self.model == "":
            self.model = None


@dataclass
class PromptArgs:
    max_input_tokens: int = 1024
    """Whole recovery prompt length in tokens; both texts are truncated to fit."""
    answer_prefix: str | None = None
    """Text that starts the model's answer and is part of the prediction (default: the template's)."""
    template: str | None = None
    """JSON file with a recovery template (default: the adapter's, else the built-in one)."""

    def __post_init__(self) -> None:
        if self.max_input_tokens < 64:
            raise ValueError(f"max_input_tokens must be at least 64; got {self.max_input_tokens}")


@dataclass
class GenerationArgs:
    max_new_tokens: int = 48
    """Most tokens generated for one row."""
    max_batch_tokens: int = 16384
    """Most tokens in one batch, counted as rows x (padded prompt + max_new_tokens)."""
    max_batch_size: int = 64
    """Most rows in one batch."""

    def __post_init__(self) -> None:
        for name in ("max_new_tokens", "max_batch_tokens", "max_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1; got {getattr(self, name)}")


@dataclass
class BudgetArgs:
    budget_per_row: float = 25.0
    """Seconds allowed per row; the run deadline is rows x this, or --time-limit if smaller."""
    time_limit: float | None = None
    """Seconds for the whole run, model load included."""
    safety_margin: float = 30.0
    """Seconds kept free before the deadline for the last writes; at most a tenth of the budget."""

    def __post_init__(self) -> None:
        if self.budget_per_row <= 0:
            raise ValueError(f"budget_per_row must be positive; got {self.budget_per_row}")
        if self.time_limit is not None and self.time_limit <= 0:
            raise ValueError(f"time_limit must be positive; got {self.time_limit}")
        if self.safety_margin < 0:
            raise ValueError(f"safety_margin must be >= 0; got {self.safety_margin}")

    def seconds(self, n_rows: int) -> float:
        """The whole run's budget in seconds, before the safety margin."""
        by_rows = max(n_rows, 1) * self.budget_per_row
        return by_rows if self.time_limit is None else min(by_rows, self.time_limit)

    def margin(self, n_rows: int) -> float:
        # A fixed margin would swallow a tight budget whole, so it never takes more than a tenth.
        return min(self.safety_margin, 0.1 * self.seconds(n_rows))


@dataclass
class OutputArgs:
    fallback_prompt: str | None = None
    """Prompt for rows that get no usable generation (default: the shipped mean prompt)."""
    fallback_prompt_file: str | None = None
    """File holding the fallback prompt (for example from optimize-prompt)."""
    suffix_file: str | None = "auto"
    """File appended to every model prediction (mean-prompt ensembling); auto: the shipped one; none: no suffix."""
    max_prompt_words: int = 60
    """Most words kept of a generated prompt (the scorer reads only its first 128 tokens)."""
    embedder: str | None = None
    """Scorer's sentence-transformers folder: predictions are trimmed (never the suffix) to what it reads."""

    def __post_init__(self) -> None:
        if self.fallback_prompt is not None and self.fallback_prompt_file is not None:
            raise ValueError("give --fallback-prompt or --fallback-prompt-file, not both")
        if self.fallback_prompt is not None and not self.fallback_prompt.strip():
            raise ValueError("fallback_prompt must not be blank: a blank row fails the whole submission")
        if self.max_prompt_words < 1:
            raise ValueError(f"max_prompt_words must be at least 1; got {self.max_prompt_words}")


Combine = Literal["first", "concat", "mbr"]


@dataclass
class MemberArgs:
    """One member of an ensemble: a model + adapter, how it is prompted, and what share of the time it gets."""

    name: str | None = None
    """Name in reports and in the candidates file (default: the adapter folder's name, or 'base')."""
    model: str | None = None
    """HF folder or .gguf (default: --model, else the embedded Gemma 3 270M)."""
    adapter: str = "auto"
    """Adapter folder; auto: the one shipped for the embedded model; none: the bare base."""
    answer_prefix: str | None = None
    """Text that starts this member's answers (default: --answer-prefix, else its template's)."""
    template: str | None = None
    """Recovery template JSON (default: --template, else the adapter's, else the built-in one)."""
    share: float = 1.0
    """Relative share of the time left when this member's model runs (members over one model add up)."""
    samples: int = 1
    """Answers per row: 1 is greedy; more are sampled (temperature, top_p), each row and sample seeded from seed."""
    temperature: float = 0.7
    """Sampling temperature when samples > 1."""
    top_p: float = 0.95
    """Nucleus mass kept when samples > 1."""
    seed: int = 0
    """Seed of this member's sampled answers (each row and sample gets its own stream)."""

    def __post_init__(self) -> None:
        if self.share <= 0:
            raise ValueError(f"member share must be positive; got {self.share}")
        if self.samples < 1:
            raise ValueError(f"member samples must be at least 1; got {self.samples}")
        if self.samples > 1 and self.temperature <= 0:
            raise ValueError("sampled members (samples > 1) need a temperature above 0")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1]; got {self.top_p}")
        if not self.adapter:
            self.adapter = "none"


@dataclass
class EnsembleArgs:
    members: str | None = None
    """Run spec (TOML or JSON) listing the members; overrides --adapter."""
    combine: Combine = "first"
    """How a row's candidates become one prompt: first (members in order), concat, or mbr (metric medoid)."""

    def __post_init__(self) -> None:
        _choice("combine", self.combine, get_args(Combine))


@dataclass
class PredictArgs:
    test_csv: str
    """Competition test table: id, original_text, rewritten_text."""
    output: str = "submission.csv"
    """Submission to write (id, rewrite_prompt); valid at every moment."""
    resume: bool = False
    """Skip rows finished by an earlier run of the same input (from the checkpoint beside the output)."""
    report: str | None = None
    """Write the run report as JSON here."""
    progress: bool = True
    """Show a progress bar."""
    model: ModelArgs = field(default_factory=ModelArgs)
    prompt: PromptArgs = field(default_factory=PromptArgs)
    generation: GenerationArgs = field(default_factory=GenerationArgs)
    budget: BudgetArgs = field(default_factory=BudgetArgs)
    out: OutputArgs = field(default_factory=OutputArgs)
    ensemble: EnsembleArgs = field(default_factory=EnsembleArgs)


@dataclass
class EvaluateArgs:
    labeled_csv: str
    """Rows with gold prompts: id, original_text, rewritten_text, rewrite_prompt."""
    gold: str | None = None
    """Gold prompts (id, rewrite_prompt) in their own file, when LABELED_CSV has none (a test.csv + gold pair)."""
    output: str = "evaluation"
    """Folder for the submission, candidates, per-row scores, table and chart."""
    scorer: list[str] = field(default_factory=list)
    """Scoring embedder folder (repeat to score under several); default: the packaged MiniLM stand-in."""
    resume: bool = False
    """Keep the candidates an earlier run on the same rows stored in OUTPUT; generate only what is missing."""
    progress: bool = True
    """Show a progress bar."""
    model: ModelArgs = field(default_factory=ModelArgs)
    prompt: PromptArgs = field(default_factory=PromptArgs)
    generation: GenerationArgs = field(default_factory=GenerationArgs)
    budget: BudgetArgs = field(default_factory=BudgetArgs)
    out: OutputArgs = field(default_factory=OutputArgs)
    ensemble: EnsembleArgs = field(default_factory=EnsembleArgs)


@dataclass
class ScoreArgs:
    submission: str
    """Submission CSV (id, rewrite_prompt)."""
    gold: str
    """Gold CSV (id, rewrite_prompt)."""
    embedder: str | None = None
    """sentence-transformers folder (sentence-t5-base on Kaggle); default: the packaged MiniLM stand-in."""
    per_row: str | None = None
    """Write each row's score beside both prompts to this CSV."""


@dataclass
class OptimizeArgs:
    prompts_csv: str
    """CSV of gold prompts to optimise against."""
    output: str = "mean_prompt.txt"
    """Where the best string is written."""
    column: str = "rewrite_prompt"
    """Column of PROMPTS_CSV (and of --extra-prompts and --val) holding the gold prompts."""
    extra_prompts: list[str] = field(default_factory=list)
    """More CSVs of gold prompts for the search, beside PROMPTS_CSV (repeatable; mean-prompt search only)."""
    predictions: str | None = None
    """Predictions CSV (id, rewrite_prompt): search for the suffix appended to them instead."""
    embedder: list[str] = field(default_factory=list)
    """sentence-transformers folder scoring the candidates (repeatable); 'packaged' or none: the MiniLM stand-in."""
    objective: Literal["mean", "worst"] = "mean"
    """Combine the embedders' scores by their mean, or by the lowest (worst) of them."""
    relative: bool = True
    """Divide each embedder's score by its score of the baseline (no suffix) first, so each counts alike."""
    holdout: float = 0.0
    """Share of distinct gold prompts (rows, with --predictions) kept out of each search to stop it; 0: none."""
    val: str | None = None
    """Held-out gold prompts from this CSV instead of --holdout (with --predictions: ids that have predictions)."""
    start: list[str] = field(default_factory=list)
    """Another start candidate beside the built-in ones (repeatable)."""
    start_file: str | None = None
    """Text file of more start candidates, one per line (blank lines skipped)."""
    fluency: list[str] = field(default_factory=list)
    """Fluency guard (repeatable, all must pass): function-words (a heuristic) or perplexity (under the base LM)."""
    max_function_rate: float = 0.5
    """--fluency function-words: most function words per word of a candidate."""
    max_perplexity: float | None = None
    """--fluency perplexity: ceiling (default: the 25th percentile of the training prompts' perplexities)."""
    seed: int = 0
    """Random seed: the same seed and inputs give the same result."""
    time_limit: float = 300.0
    """Seconds the search may take."""
    rounds: int = 60
    """Most rounds of edits."""
    beam_width: int = 4
    """Candidates kept after each round."""
    candidates_per_round: int = 128
    """Edited candidates scored in each round's batch."""
    max_words: int = 40
    """Most words in a candidate."""
    patience: int = 12
    """Stop after this many rounds without improvement (on the held-out prompts where there are some)."""
    folds: int = 5
    """Cross-validation folds of the prompts: the result replaces the baseline only if it wins out of fold; 0: off."""
    margin: float = 0.02
    """Least out-of-fold mean gain over the baseline, as a share of the baseline's score."""
    confidence: float = 0.95
    """Confidence of the bootstrap lower bound of the out-of-fold gain, which must be above 0."""
    drop_top: int = 2
    """The out-of-fold gain must stay above 0 without this many prompts that gained most."""
    trim: int = 2
    """Mean-prompt search: each candidate's this many best training prompts do not count (no win by copying one)."""
    vocabulary: Literal["words", "embedder", "both"] = "words"
    """Moves: word edits, swaps of the first embedder's tokens ranked by its gradient, or both."""
    top_k: int = 64
    """--vocabulary embedder: tokens per position, by gradient, that swaps are drawn from."""
    report: str | None = None
    """Write the search report as JSON here."""
    progress: bool = True
    """Show a progress bar."""

    def __post_init__(self) -> None:
        for name in ("rounds", "beam_width", "candidates_per_round", "max_words", "patience", "top_k"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1; got {getattr(self, name)}")
        if self.time_limit <= 0:
            raise ValueError(f"time_limit must be positive; got {self.time_limit}")
        if not 0 <= self.holdout < 1:
            raise ValueError(f"holdout must be a fraction in [0, 1); got {self.holdout}")
        _choice("objective", self.objective, ("mean", "worst"))
        _choice("vocabulary", self.vocabulary, ("words", "embedder", "both"))
        if self.folds < 0 or self.folds == 1:
            raise ValueError(f"folds must be 0 (no check) or at least 2; got {self.folds}")
        if self.margin < 0 or self.drop_top < 0 or self.trim < 0:
            raise ValueError("margin, drop_top and trim must be at least 0")
        if not 0 < self.confidence < 1:
            raise ValueError(f"confidence must be in (0, 1); got {self.confidence}")
        self.fluency = [g for g in dict.fromkeys(self.fluency or []) if g != "none"]
        for guard in self.fluency:
            _choice("fluency", guard, ("function-words", "perplexity"))
        if not 0 < self.max_function_rate <= 1:
            raise ValueError(f"max_function_rate must be in (0, 1]; got {self.max_function_rate}")
        if self.max_perplexity is not None and self.max_perplexity <= 1:
            raise ValueError(f"max_perplexity must be above 1; got {self.max_perplexity}")
        self.embedder = list(self.embedder or [])
        self.extra_prompts = list(self.extra_prompts or [])
        self.start = list(self.start or [])


Method = Literal["prompt-tuning", "prefix-tuning", "lora"]


@dataclass
class TrainArgs:
    train_csv: str
    """Training rows: original_text, rewritten_text, rewrite_prompt."""
    output: str = "adapter"
    """Adapter folder to write (predict --adapter loads it as it is)."""
    method: Method = "prompt-tuning"
    """prompt-tuning, prefix-tuning or lora (QLoRA with --quantize 4bit, on CUDA or the CPU)."""
    val: str | None = None
    """Validation rows (same columns): evaluated every --eval-steps; the best checkpoint is kept."""
    num_virtual_tokens: int = 20
    """Soft prompt / prefix length in tokens."""
    prompt_init: Literal["text", "random"] = "text"
    """Prompt tuning start: the embeddings of a task sentence, or random."""
    init_text: str | None = None
    """Task sentence for --prompt-init text (default: a built-in one)."""
    lora_r: int = 8
    """LoRA rank."""
    lora_alpha: int = 16
    """LoRA scaling numerator."""
    lora_dropout: float = 0.05
    """LoRA dropout."""
    target_modules: str = "q_proj,k_proj,v_proj,o_proj"
    """Comma-separated module names LoRA adapts, or all-linear."""
    epochs: float = 3.0
    """Passes over the training rows (reshuffled every epoch)."""
    max_steps: int = 0
    """Stop after this many optimizer steps (0: use --epochs)."""
    batch_size: int = 4
    """Rows per device batch."""
    grad_accum: int = 1
    """Batches accumulated per optimizer step."""
    lr: float | None = None
    """Learning rate (default: 3e-2 prompt tuning, 1e-2 prefix tuning, 2e-4 LoRA)."""
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "cosine"
    """Learning-rate schedule."""
    warmup: float = 0.05
    """Warm-up: a fraction of all steps if below 1, else a number of steps."""
    eval_steps: int = 0
    """Evaluate and checkpoint every N steps (0: once an epoch)."""
    eval_score: bool = False
    """Also generate prompts for --val and score them with the competition metric; pick the best by it."""
    embedder: str | None = None
    """Embedder for --eval-score (default: the packaged MiniLM stand-in)."""
    logging_steps: int = 5
    """Log the training loss every N steps."""
    max_input_tokens: int = 512
    """Recovery prompt length in tokens, texts truncated to fit (as in predict)."""
    template: str | None = None
    """Recovery template JSON (default: the built-in one); saved with the adapter."""
    answer_prefix: str = ""
    """Answer prefix baked into the adapter's template (empty: the model writes the whole prompt)."""
    seed: int = 42
    """Seed for initialisation and for the per-epoch shuffles."""
    resume: bool = False
    """Continue from the last checkpoint in OUTPUT/checkpoints."""
    keep_checkpoints: bool = False
    """Keep OUTPUT/checkpoints after training."""
    progress: bool = True
    """Show progress bars."""
    model: ModelArgs = field(default_factory=lambda: ModelArgs(adapter=["none"]))

    def __post_init__(self) -> None:
        _choice("method", self.method, ("prompt-tuning", "prefix-tuning", "lora"))
        _choice("prompt_init", self.prompt_init, ("text", "random"))
        for name in ("num_virtual_tokens", "lora_r", "batch_size", "grad_accum", "logging_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1; got {getattr(self, name)}")
        if self.epochs <= 0 and self.max_steps <= 0:
            raise ValueError("give --epochs > 0 or --max-steps > 0")
        if self.lr is not None and self.lr <= 0:
            raise ValueError(f"lr must be positive; got {self.lr}")


@dataclass
class GenerateArgs:
    texts: str
    """Original texts: a CSV with an original_text (or text) column, or a folder of .txt / .md files."""
    output: str = "generated.csv"
    """Rows to write in train.csv's format (id, original_text, rewritten_text, rewrite_prompt)."""
    prompts: str | None = None
    """CSV of rewrite prompts (a rewrite_prompt or prompt column); default: filled from --prompt-slots."""
    prompt_slots: str = "auto"
    """JSON of prompt templates with slots (tones, personas, forms, audiences...); auto: the shipped one."""
    n_prompts: int = 300
    """How many distinct prompts to fill from the slots (when no --prompts file is given)."""
    propose_prompts: int = 0
    """Also ask the model for this many new rewrite prompts of its own and add them to the pool."""
    per_text: int = 2
    """Prompts each text is rewritten under (never the same prompt twice for one text)."""
    max_input_tokens: int = 1024
    """Longest prompt + text in tokens; longer texts are skipped (a cut text would not match its rewrite)."""
    max_new_tokens: int = 512
    """Most tokens of one rewrite; a rewrite still running at this limit is dropped as truncated."""
    max_batch_tokens: int = 16384
    """Most tokens in one batch, counted as rows x (padded prompt + max_new_tokens)."""
    max_batch_size: int = 32
    """Most rows in one batch."""
    temperature: float = 0.7
    """Sampling temperature of the rewrites (0: greedy)."""
    top_p: float = 0.95
    """Nucleus sampling mass of the rewrites."""
    seed: int = 0
    """Seed of the prompt pool, the pairing and each row's sampling."""
    resume: bool = True
    """Keep the rows (and the dropped ids) of an existing OUTPUT and make only the missing ones."""
    report: str | None = None
    """Write the run report as JSON here."""
    progress: bool = True
    """Show a progress bar."""
    model: ModelArgs = field(default_factory=ModelArgs)
    budget: BudgetArgs = field(default_factory=BudgetArgs)

    def __post_init__(self) -> None:
        for name in ("n_prompts", "per_text", "max_new_tokens", "max_batch_tokens", "max_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1; got {getattr(self, name)}")
        if self.propose_prompts < 0:
            raise ValueError(f"propose_prompts must be >= 0; got {self.propose_prompts}")
        if self.max_input_tokens < 16:
            raise ValueError(f"max_input_tokens must be at least 16; got {self.max_input_tokens}")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1; got {self.temperature}, {self.top_p}")


@dataclass
class BundleArgs:
    output: str = "bundle"
    """Folder to create: upload it as a Kaggle dataset."""
    adapter: list[str] = field(default_factory=list)
    """Adapter folder to include (repeat for several)."""
    model: str | None = None
    """Model folder to copy in (optional: Kaggle models are usually attached as their own input)."""
    members: str | None = None
    """Run spec (TOML or JSON) to ship as members.json, with the adapters and templates it names copied in."""
    mean_prompt: str | None = None
    """Fallback prompt file (default: the shipped mean prompt)."""
    suffix: str | None = None
    """Suffix file (default: the shipped suffix)."""
    deps: Literal["default", "none"] = "default"
    """default: pinned wheels of the dependencies a Kaggle image may lack; none: only this package."""
    extra_packages: list[str] = field(default_factory=list)
    """Further installed packages to pin and include with their dependencies (repeatable)."""
    with_image_packages: bool = False
    """Also ship what a Kaggle image holds (numpy, pandas, scipy, ...; never torch, CUDA): for other machines."""
    python_version: str = "3.11"
    """Python version of the Kaggle image the wheels are for."""
    overwrite: bool = False
    """Replace OUTPUT if it exists."""
    check: str | None = None
    """Python to check against the bundle at OUTPUT: does it hold what the bundle takes from the image?"""

    def __post_init__(self) -> None:
        _choice("deps", self.deps, ("default", "none"))
        if self.check is not None:
            given = [f"--{k.replace('_', '-')}" for k in ("adapter", "model", "members", "mean_prompt", "suffix",
                                                             "extra_packages", "with_image_packages", "overwrite")
                     if getattr(self, k)]
            if given:
                raise ValueError(f"--check reads an existing bundle and builds nothing: drop {', '.join(given)}")
            if not self.check.strip():
                raise ValueError("--check needs a Python interpreter, for example --check /usr/bin/python3")
        if not re.fullmatch(r"3\.\d+", self.python_version):
            raise ValueError(f"python_version must look like 3.11; got {self.python_version!r}")


@cache
def field_docs(cls: type) -> dict[str, str]:
    """The one-line docstring under each dataclass field, read from the source."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in itertools.pairwise(body):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = nxt.value.value.strip()
    return docs


def public_fields(cls: type) -> list[str]:
    return [f.name for f in fields(cls)]
