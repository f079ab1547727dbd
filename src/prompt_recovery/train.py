"""train: soft prompts (prompt tuning, prefix tuning) and LoRA / QLoRA adapters for prompt recovery.

Rows of (original_text, rewritten_text, rewrite_prompt) become the same recovery prompt predict builds
(same template, same token truncation) followed by the gold prompt and EOS; the loss is on the gold
prompt's tokens only. transformers' Trainer runs the loop: its sampler reshuffles the rows every epoch
from the seed, evaluation on --val every N steps keeps the best checkpoint, and --resume continues from
the last checkpoint. The output folder is what predict loads as it is.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .config import TrainArgs
from .data import InputError, read_table
from .model import bnb_config, choose_dtype, cuda_capability, ensure_pad_token, identity, resolve, write_identity
from .prompt import PromptBuilder, Template

log = logging.getLogger(__name__)

TRAIN_COLUMNS = ("original_text", "rewritten_text", "rewrite_prompt")
TASK_SENTENCE = "Recover the instruction that turned the original text into the rewritten text:"
# LoRA learning rates of 1e-4..3e-4 are standard; soft prompts have few weights and need far larger steps.
DEFAULT_LR = {"lora": 2e-4, "prompt-tuning": 3e-2, "prefix-tuning": 1e-2}


def read_train(path: str) -> list[tuple[str, str, str]]:
    """Training rows; a clear InputError for anything that cannot train."""
    table, n, warnings, _ = read_table(path, required=TRAIN_COLUMNS, optional=())
    for w in warnings:
        log.warning(w)
    rows = list(zip(*(table[c] for c in TRAIN_COLUMNS)))
    empty = [table["id"][k] if "id" in table else str(k) for k, r in enumerate(rows) if not all(x.strip() for x in r)]
    if empty:
        raise InputError(f"{path}: {len(empty)} row(s) have an empty text or prompt (first ids: {empty[:5]})")
    if len(rows) < 2:
        raise InputError(f"{path}: {len(rows)} row(s); training needs at least 2")
    return rows


class RecoveryDataset(torch.utils.data.Dataset):
    """Token ids and labels (-100 on the prompt) for each row; ``row`` kept to observe the order."""

    def __init__(self, rows, builder: PromptBuilder, eos_id: int, max_target_tokens: int = 64) -> None:
        self.items = []
        for k, (orig, rewr, gold) in enumerate(rows):
            prompt = builder.build(orig, rewr)
            target = builder.target(gold)[:max_target_tokens] + [eos_id]
            self.items.append({"input_ids": prompt + target, "labels": [-100] * len(prompt) + target, "row": k})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, k: int) -> dict:
        return self.items[k]


class Collator:
    """transformers' ``DataCollatorForSeq2Seq`` (labels padded with -100), on the right; records the rows it
    saw, in order (the only reason for this wrapper: the order is what the reshuffle test observes)."""

    def __init__(self, tokenizer) -> None:
        from transformers import DataCollatorForSeq2Seq

        # Its own copy: the collator pads on the tokenizer's side, and generation (_val_score) sets the
        # shared tokenizer to the left; training pads on the right so that positions start at 0.
        right = copy.copy(tokenizer)
        right.padding_side = "right"
        self.pad = DataCollatorForSeq2Seq(right, label_pad_token_id=-100, return_tensors="pt")
        self.seen: list[int] = []

    def __call__(self, batch: list[dict]) -> dict:
        self.seen.extend(b["row"] for b in batch)
        return self.pad([{k: v for k, v in b.items() if k != "row"} for b in batch])


def peft_config(args: TrainArgs, model_folder: str, tokenizer):
    from peft import LoraConfig, PrefixTuningConfig, PromptTuningConfig, PromptTuningInit, TaskType

    if args.method == "lora":
        targets = args.target_modules
        return LoraConfig(task_type=TaskType.CAUSAL_LM, r=args.lora_r, lora_alpha=args.lora_alpha,
                          lora_dropout=args.lora_dropout,
                          target_modules=targets if targets == "all-linear" else targets.split(","))
    if args.method == "prefix-tuning":
        return PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=args.num_virtual_tokens)
    if args.prompt_init == "text":
        init_text = args.init_text or TASK_SENTENCE
        n_text = len(tokenizer(init_text, add_special_tokens=False)["input_ids"])
        if n_text > args.num_virtual_tokens:
            log.warning("init text has %d tokens; peft repeats or cuts it to %d", n_text, args.num_virtual_tokens)
        return PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=args.num_virtual_tokens,
                                  prompt_tuning_init=PromptTuningInit.TEXT, prompt_tuning_init_text=init_text,
                                  tokenizer_name_or_path=model_folder)
    return PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=args.num_virtual_tokens,
                              prompt_tuning_init=PromptTuningInit.RANDOM)


def _load_for_training(args: TrainArgs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = resolve(args.model)
    cuda = torch.cuda.is_available() and args.model.device != "cpu"
    # bfloat16 only where it is native (not torch.cuda.is_bf16_supported(), True on a T4); float32 elsewhere.
    dtype, reason = choose_dtype(args.model.dtype, "cuda" if cuda else "cpu", cuda_capability() if cuda else None,
                                 training=True)
    log.info("training in %s: %s", str(dtype).replace("torch.", ""), reason)
    kwargs: dict = {"dtype": dtype, "local_files_only": True}
    if args.model.quantize != "none":
        kwargs["quantization_config"] = bnb_config(args.model.quantize, dtype)
        # bitsandbytes 0.50 quantizes, and trains through, its 4- and 8-bit layers on the CPU as well.
        kwargs["device_map"] = {"": 0} if cuda else {"": "cpu"}
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    if args.model.quantize != "none":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model)
    elif cuda:
        model = model.to("cuda")
    # The base as on disk, before a pad token grows the vocabulary: what predict finds when it loads the base.
    base = identity(model.config, name)
    ensure_pad_token(tokenizer, model)
    return model, tokenizer, folder, base


def _split_val(rows, args: TrainArgs):
    if args.val:
        return rows, read_train(args.val)
    return rows, []


@dataclass
class TrainResult:
    summary: dict
    """What train_log.json holds: losses, steps, time, peak memory."""
    model: object
    """The trained PeftModel, in memory."""
    order: list[int]
    """Training rows in the order the batches saw them (across epochs)."""


@dataclass
class Prepared:
    """What one training run works on, built once: the base with its adapter, the tokenized rows, the template."""

    peft_model: object
    tokenizer: object
    builder: PromptBuilder
    base: dict
    """The base model's identity as on disk (what predict checks an adapter against)."""
    train_ds: RecoveryDataset
    val_ds: RecoveryDataset | None
    val_rows: list
    trainable: int
    total: int


def train(args: TrainArgs) -> TrainResult:
    """Train an adapter into ``args.output``; returns the summary and the trained model."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    prep = _prepare(args)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    trainer, collator = _trainer(args, prep, out / "checkpoints")
    result = _fit(trainer, args, out / "checkpoints")
    _save_adapter(prep, out)
    summary = _summary(args, prep, trainer, result, time.monotonic() - start)
    (out / "train_args.json").write_text(json.dumps(_jsonable(asdict(args)), indent=2))
    (out / "train_log.json").write_text(json.dumps(_jsonable(summary), indent=2))
    _plot(trainer.state.log_history, out / "loss.png")
    if not args.keep_checkpoints:
        shutil.rmtree(out / "checkpoints", ignore_errors=True)  # the best weights are saved; checkpoints are bulk
    prep.peft_model.eval()
    return TrainResult(summary=summary, model=prep.peft_model, order=list(collator.seen))


def _prepare(args: TrainArgs) -> Prepared:
    """Rows read and tokenized as predict will tokenize them; the base loaded and wrapped in a fresh adapter."""
    from peft import get_peft_model
    from transformers import set_seed

    rows, val_rows = _split_val(read_train(args.train_csv), args)
    set_seed(args.seed)
    model, tokenizer, folder, base = _load_for_training(args)
    template = (Template.load(args.template) if args.template else Template()).with_prefix(args.answer_prefix)
    builder = PromptBuilder(tokenizer, template, args.max_input_tokens)
    train_ds = RecoveryDataset(rows, builder, tokenizer.eos_token_id)
    val_ds = RecoveryDataset(val_rows, builder, tokenizer.eos_token_id) if val_rows else None
    peft_model = get_peft_model(model, peft_config(args, folder, tokenizer))
    trainable, total = peft_model.get_nb_trainable_parameters()
    return Prepared(peft_model, tokenizer, builder, base, train_ds, val_ds, val_rows, trainable, total)


def _training_arguments(args: TrainArgs, n_rows: int, has_val: bool, ckpt_dir: Path):
    from transformers import TrainingArguments

    steps_per_epoch = math.ceil(n_rows / (args.batch_size * args.grad_accum))
    eval_steps = args.eval_steps or max(1, steps_per_epoch)
    return TrainingArguments(
        output_dir=str(ckpt_dir),
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        num_train_epochs=args.epochs,
        max_steps=args.max_steps if args.max_steps > 0 else -1,
        learning_rate=args.lr or DEFAULT_LR[args.method],
        lr_scheduler_type=args.lr_scheduler,
        warmup_steps=args.warmup,
        weight_decay=0.0,
        logging_steps=args.logging_steps,
        eval_strategy="steps" if has_val else "no",
        eval_steps=eval_steps if has_val else None,
        save_strategy="steps",
        save_steps=eval_steps,
        save_total_limit=2,
        load_best_model_at_end=has_val,
        metric_for_best_model=("eval_score" if args.eval_score else "eval_loss") if has_val else None,
        greater_is_better=bool(args.eval_score) if has_val else None,
        seed=args.seed,
        data_seed=args.seed,
        report_to="none",
        remove_unused_columns=False,
        use_cpu=args.model.device == "cpu" or not torch.cuda.is_available(),  # where _load_for_training put it
        disable_tqdm=not args.progress,
        save_only_model=False,
        dataloader_num_workers=0,
    )


def _trainer(args: TrainArgs, prep: Prepared, ckpt_dir: Path):
    """transformers' Trainer with the loss on answer positions only and the optional scored evaluation."""
    from transformers import Trainer, TrainerCallback

    virtual = _virtual_tokens(prep.peft_model)

    class RecoveryTrainer(Trainer):
        loss_is_scaled_for_ga = False  # target_loss is a per-batch mean: Trainer divides it by the accumulation

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = target_loss(model, inputs, virtual)
            return (loss, {}) if return_outputs else loss  # no logits kept: evaluation reads only the loss

        def evaluate(self, *a, **kw):
            metrics = super().evaluate(*a, **kw)
            if args.eval_score and prep.val_rows:
                metrics["eval_score"] = _val_score(self.model, prep.tokenizer, prep.builder, prep.val_rows, args)
                self.log({"eval_score": metrics["eval_score"]})
            return metrics

    class Losses(TrainerCallback):
        def on_log(self, _args, state, control, logs=None, **kw):
            if logs and args.progress:
                log.info("step %d: %s", state.global_step, logs)

    collator = Collator(prep.tokenizer)
    targs = _training_arguments(args, len(prep.train_ds), prep.val_ds is not None, ckpt_dir)
    trainer = RecoveryTrainer(model=prep.peft_model, args=targs, train_dataset=prep.train_ds,
                              eval_dataset=prep.val_ds, data_collator=collator, callbacks=[Losses()])
    return trainer, collator


def _virtual_tokens(peft_model) -> int:
    """Positions peft prepends to the inputs (prompt tuning, p-tuning); prefix tuning lives in the cache instead."""
    cfg = peft_model.active_peft_config
    if getattr(cfg, "is_prompt_learning", False) and str(cfg.peft_type).rsplit(".", 1)[-1] != "PREFIX_TUNING":
        return int(cfg.num_virtual_tokens)
    return 0


def target_loss(model, inputs: dict, virtual_tokens: int = 0) -> torch.Tensor:
    """Mean cross-entropy of the answer tokens, with logits computed only at the positions that predict one.

    The vocabulary projection is most of a small model's cost (Gemma 3 270M: 168M of its 268M weights, and a
    262,144-wide float32 softmax per position), while the loss reads only the ~20 answer positions of a row of
    hundreds: projecting every position, as the model's own loss does, is wasted work. Same loss, same gradients.
    """
    labels = inputs["labels"]
    predicts = labels[:, 1:] != -100  # position p predicts token p + 1
    keep = torch.nn.functional.pad(predicts, (virtual_tokens, 1), value=False)  # peft prepends virtual tokens
    batch = {k: v for k, v in inputs.items() if k != "labels"}
    logits = model(**batch, logits_to_keep=keep).logits  # (answer positions, vocabulary): the mask flattens
    return torch.nn.functional.cross_entropy(logits.float(), labels[:, 1:][predicts])


def _fit(trainer, args: TrainArgs, ckpt_dir: Path):
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    resume = args.resume and ckpt_dir.is_dir() and any(p.name.startswith("checkpoint-") for p in ckpt_dir.iterdir())
    return trainer.train(resume_from_checkpoint=True if resume else None)


def _save_adapter(prep: Prepared, out: Path) -> None:
    """The adapter as predict loads it: inference config, template and base identity beside the weights."""
    peft_model = prep.peft_model
    # Saved as inference adapters: a text init needs no tokenizer path on the machine that loads it.
    cfg = peft_model.peft_config["default"]
    if getattr(cfg, "prompt_tuning_init", None) is not None and str(cfg.prompt_tuning_init).endswith("TEXT"):
        cfg.prompt_tuning_init = "RANDOM"
        cfg.tokenizer_name_or_path = None
    cfg.base_model_name_or_path = prep.base["name"]  # a machine-local cache path means nothing elsewhere
    # The embeddings are never trained: saving them would only make the adapter as big as the base's vocabulary.
    peft_model.save_pretrained(str(out), save_embedding_layers=False)
    # peft's generated model card is boilerplate that records this machine's cache path: not worth shipping.
    (out / "README.md").unlink(missing_ok=True)
    prep.builder.template.save(str(out))
    write_identity(str(out), prep.base)


def _summary(args: TrainArgs, prep: Prepared, trainer, result, seconds: float) -> dict:
    return {
        "method": args.method,
        "base_model": prep.base,
        "rows": len(prep.train_ds),
        "val_rows": len(prep.val_rows),
        "trainable_params": prep.trainable,
        "total_params": prep.total,
        "steps": trainer.state.global_step,
        "train_loss": result.training_loss,
        "best_metric": trainer.state.best_metric,
        "best_checkpoint": trainer.state.best_model_checkpoint,
        "seconds": seconds,
        "peak_rss_mb": _peak_rss_mb(),
        "peak_cuda_mb": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
        "log_history": trainer.state.log_history,
    }


def _val_score(model, tokenizer, builder, val_rows, args) -> float:
    """Competition score of greedy predictions on the validation rows (stand-in embedder by default)."""
    from .adapters import from_peft
    from .engine import Engine, Request
    from .meanprompt import BASELINE
    from .postprocess import clean
    from .prompt import eos_token_ids, newline_token_ids
    from .score import Embedder, score_pairs

    was_training = model.training
    model.eval()
    served_model, served, name = from_peft(model)  # the adapter as predict will serve it
    engine = Engine(served_model, tokenizer.pad_token_id, eos_token_ids(tokenizer, served_model), max_new_tokens=32,
                    stop_ids=newline_token_ids(tokenizer), served=served)
    preds = []
    for k in range(0, len(val_rows), args.batch_size):
        chunk = val_rows[k:k + args.batch_size]
        outs = engine.generate([Request(builder.build(o, r), adapter=name) for o, r, _ in chunk])
        for out in outs:
            text = clean(tokenizer.decode(out, skip_special_tokens=True), builder.template.answer_prefix)
            preds.append(text or BASELINE)  # the scorer rejects blanks; so would Kaggle
    if was_training:
        model.train()
    key = args.embedder or ""
    if key not in _embedder_cache:  # loaded once per run, not at every evaluation (setdefault would load each time)
        _embedder_cache[key] = Embedder(args.embedder)
    embedder = _embedder_cache[key]
    return float(score_pairs(embedder, preds, [g for _, _, g in val_rows]).mean())


_embedder_cache: dict = {}


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _jsonable(x):
    return json.loads(json.dumps(x, default=str))


def _plot(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on Kaggle or CI
    import matplotlib.pyplot as plt

    train = [(h["step"], h["loss"]) for h in history if "loss" in h]
    val = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    fig, ax = plt.subplots(figsize=(6, 4))
    if train:
        ax.plot(*zip(*train), label="train loss")
    if val:
        ax.plot(*zip(*val), marker="o", label="val loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if train or val:
        ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
