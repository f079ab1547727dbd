"""Issue 8's GPU measurements in one invocation: each step in its own child process, one Markdown table + JSON.

    python benchmarks/bench_gpu.py --out DIR                    # on a GPU: about 6-8 minutes on an H100
    python benchmarks/bench_gpu.py --tiny --out DIR             # CPU smoke run of the same code (a test runs it)

On a GPU every step runs in its own child process (separate GPU memory, its own time limit); --tiny runs them in
this process unless --children is given (replicas are processes either way).

Steps (``--steps`` picks some):
  prepare    a randomly initialised Mistral-7B-shaped model (config written here, random float16 weights written
             once to the work folder: the cost of running it is the real one), a LoRA and a soft-prompt adapter for
             it, a tokenizer, and a test CSV whose recovery prompts are 300-700 tokens
  scheduler  4-bit nf4 base, LoRA then soft prompt: batched Scheduler against one row at a time (rows/s, ratio,
             peak GPU memory), on the GPU as it is
  t4         the same under T4 emulation: memory capped at 15 GB, sm_75 choices forced
             (PROMPT_RECOVERY_CUDA_CAPABILITY=7.5: float16 weights and 4-bit compute), a prefill-only run for the
             projection; then a real CUDA out of memory provoked by an oversized --max-batch-tokens under the cap,
             through predict (the report shows the splits and the out_of_memory fallbacks, none wanted)
  replicas   two replica processes on the one GPU, each capped at half its memory, T4 choices forced, through
             multigpu.predict_sharded: merged file valid, both replicas with the whole run's deadline
  gemma      the embedded Gemma 3 270M end to end on CUDA in float16 (first-batch logits checked for non-finite
             values) and in the safe dtypes (float32: a T4's; bfloat16 where native)

The GPU side needs bitsandbytes (and gguf for the Gemma step): README.md, Benchmarks, has the command that carries
their wheels. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # the checkout's package, also in every child process

GiB = 2**30
T4_MEMORY = 15 * GiB
STEPS = ("prepare", "scheduler", "t4", "replicas", "gemma")
# Seconds each step may take at most (the whole run also stops at --time-budget).
STEP_LIMIT = {"prepare": 150, "scheduler": 180, "t4": 220, "replicas": 150, "gemma": 200}
MISTRAL_7B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=8, vocab_size=32000, max_position_embeddings=32768, rope_theta=1e6,
                  sliding_window=None)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=512, max_position_embeddings=4096)
# Datasheet figures for the projection: dense float16 tensor TFLOP/s and memory bandwidth in GB/s.
CARDS = {"T4": (65.0, 320.0), "H100 PCIe": (756.0, 2000.0), "H100": (989.0, 3350.0), "H200": (989.0, 4800.0)}
FALLBACK = "BENCH FALLBACK"


def _opts_from_env() -> dict:
    return json.loads(os.environ["BENCH_GPU_OPTS"])


# ---- helpers ----------------------------------------------------------------------------------------------------

def _cuda():
    import torch

    return torch.cuda.is_available()


def _peak_mb():
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**20) if torch.cuda.is_available() else None


def _reset_peak():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _cap_memory(nbytes: int) -> dict:
    """Cap this process's CUDA allocations at ``nbytes`` (T4 emulation); returns what was set."""
    import torch

    if not torch.cuda.is_available():
        return {"memory_cap_gb": None}
    total = torch.cuda.get_device_properties(0).total_memory
    fraction = min(1.0, nbytes / total)
    torch.cuda.set_per_process_memory_fraction(fraction)
    return {"memory_cap_gb": round(fraction * total / GiB, 1)}


def _save(work: Path, step: str, result: dict) -> None:
    (work / f"{step}.json").write_text(json.dumps(result, indent=2, default=str))


# ---- prepare ----------------------------------------------------------------------------------------------------

def _corpus_words() -> list[str]:
    words = []
    for name in ("train.csv", "test.csv"):
        with open(ROOT / "data_samples" / name, newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                words += (row.get("original_text", "") + " " + row.get("rewritten_text", "")).split()
    return words


def _make_tokenizer(words: list[str], vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=min(vocab, 8000), special_tokens=["<pad>", "<bos>", "<eos>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([" ".join(words[i:i + 64]) for i in range(0, len(words), 64)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>", padding_side="left")


def _write_random_weights(model_dir: Path, config, shard_bytes: int = 2 * GiB) -> int:
    """Random float16 safetensors of the config's shape, written tensor by tensor (no model is instantiated)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        shapes = {k: v.shape for k, v in AutoModelForCausalLM.from_config(config).state_dict().items()}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device=device).manual_seed(0)
    shards, current, size, weight_map = [], {}, 0, {}
    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            t = torch.ones(shape, dtype=torch.float16)
        else:
            t = (torch.randn(shape, generator=gen, device=device, dtype=torch.float16) * 0.02).cpu()
        current[name] = t
        size += t.numel() * 2
        if size >= shard_bytes:
            shards.append(current)
            current, size = {}, 0
    if current:
        shards.append(current)
    total = 0
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(model_dir / fname), metadata={"format": "pt"})
        for name, t in shard.items():
            weight_map[name] = fname
            total += t.numel() * 2
    (model_dir / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return total


def _write_adapters(work: Path, model_dir: Path, config, name: str) -> None:
    """A LoRA (r 16 on the attention projections) and a 20-token soft prompt, random, saved as peft folders."""
    import torch
    from peft import LoraConfig, PromptTuningConfig, TaskType, get_peft_model, get_peft_model_state_dict
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from prompt_recovery.model import identity, write_identity

    gen = torch.Generator().manual_seed(1)
    for kind, cfg in (("lora", LoraConfig(task_type=TaskType.CAUSAL_LM, r=16, lora_alpha=32,
                                          target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])),
                      ("soft_prompt", PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=20))):
        with torch.device("meta"):  # shapes only: peft builds its layers on the meta base
            peft_model = get_peft_model(AutoModelForCausalLM.from_config(config), cfg)
        if kind == "lora":
            shapes = {k: v.shape for k, v in get_peft_model_state_dict(peft_model).items()}
        else:
            shapes = {"prompt_embeddings": (cfg.num_virtual_tokens, config.hidden_size)}
        tensors = {k: torch.randn(s, generator=gen) * 0.02 for k, s in shapes.items()}
        folder = work / kind
        folder.mkdir(exist_ok=True)
        peft_cfg = peft_model.peft_config["default"]
        peft_cfg.base_model_name_or_path = name
        peft_cfg.save_pretrained(str(folder))
        save_file(tensors, str(folder / "adapter_model.safetensors"))
        write_identity(str(folder), identity(config, name))


def _write_csv(path: Path, tok, words: list[str], n: int, lo: int, hi: int, seed: int = 0) -> None:
    """Rows whose two texts together take lo..hi tokens (the template adds a few dozen)."""
    rng = random.Random(seed)
    cost = {}
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", "original_text", "rewritten_text"])
        for k in range(n):
            target = rng.randint(lo, hi)
            texts = []
            for share in (0.5, 0.5):
                out, used = [], 0
                while used < share * target:
                    word = rng.choice(words)
                    if word not in cost:
                        cost[word] = len(tok(" " + word, add_special_tokens=False)["input_ids"])
                    out.append(word)
                    used += cost[word]
                texts.append(" ".join(out))
            w.writerow([f"r{k:04d}", *texts])


def step_prepare(o: dict, work: Path) -> dict:
    from transformers import MistralConfig

    from prompt_recovery.model import IDENTITY_FILE

    start = time.perf_counter()
    model_dir = work / "model"
    model_dir.mkdir(parents=True, exist_ok=True)
    shape = TINY if o["tiny"] else MISTRAL_7B
    words = _corpus_words()
    tok = _make_tokenizer(words, shape["vocab_size"])
    config = MistralConfig(**shape, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                           eos_token_id=tok.eos_token_id, tie_word_embeddings=False)
    config.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    name = "random-mistral-tiny" if o["tiny"] else "random-mistral-7b"
    (model_dir / IDENTITY_FILE).write_text(json.dumps({"name": name}))
    index = model_dir / "model.safetensors.index.json"
    done = model_dir / "weights.done.json"
    shape_key = json.dumps(config.to_dict(), sort_keys=True, default=str)
    if done.exists() and index.exists() and done.read_text() == shape_key:
        weight_bytes = json.loads(index.read_text())["metadata"]["total_size"]  # a rerun on a warm machine
    else:
        weight_bytes = _write_random_weights(model_dir, config)
        done.write_text(shape_key)
    _write_adapters(work, model_dir, config, name)
    lo, hi = (20, 60) if o["tiny"] else (270, 640)  # plus the template: prompts of about 300-700 tokens
    _write_csv(work / "test.csv", tok, words, o["rows"], lo, hi)
    return {"model": name, "weights_gb": round(weight_bytes / GiB, 2), "tokenizer_vocab": len(tok),
            "seconds": round(time.perf_counter() - start, 1)}


# ---- scheduler and t4 -------------------------------------------------------------------------------------------

def _load(o: dict, work: Path, adapters: list[str]):
    """The 4-bit base once, with every adapter served beside it (LoRA routed per row, soft prompts placed)."""
    from prompt_recovery.config import ModelArgs
    from prompt_recovery.model import load

    t = time.perf_counter()
    loaded = load(ModelArgs(model=str(work / "model"), adapter=[str(work / a) for a in adapters], quantize="4bit",
                            device="cuda" if _cuda() else "cpu"))
    return loaded, time.perf_counter() - t


def _token_prompts(o: dict, tok) -> list[list[int]]:
    """Random token ids of 300-700 tokens (a random model reads ids, not meaning), seeded."""
    rng = random.Random(1)
    lo, hi = (30, 70) if o["tiny"] else (300, 700)
    first = 4  # after the special tokens
    return [[rng.randrange(first, len(tok)) for _ in range(rng.randint(lo, hi))] for _ in range(o["rows"])]


def _measure(o: dict, loaded, prompts, adapter: str | None, prefill_only: bool = False) -> dict:
    """Batched scheduler on every row, one row at a time on an evenly spread subset; rows/s, ratio, peak memory."""
    from prompt_recovery.engine import Engine, Request
    from prompt_recovery.scheduler import Limits, Scheduler

    tok = loaded.tokenizer

    def engine_for(max_new_tokens: int):
        return Engine(loaded.model, tok.pad_token_id, [tok.eos_token_id], max_new_tokens, stop_ids=(),
                      served=loaded.served)

    requests = [Request(p, adapter=adapter) for p in prompts]
    engine = engine_for(o["max_new_tokens"])
    engine.generate([Request(prompts[0][:32], adapter=adapter), Request(prompts[1][:48], adapter=adapter)])  # warm-up
    out: dict = {"rows": len(prompts), "prompt_tokens": [min(map(len, prompts)), round(sum(map(len, prompts))
                                                           / len(prompts)), max(map(len, prompts))]}

    def batched(max_new_tokens: int) -> tuple[float, int, dict]:
        eng = engine_for(max_new_tokens)
        sched = Scheduler(eng.run, Limits(time.monotonic() + 1e9, max_new_tokens, o["max_batch_tokens"],
                                          o["max_batch_size"]), length=eng.length)
        _reset_peak()
        t = time.perf_counter()
        res = sched.run(dict(enumerate(requests)))
        _sync()
        seconds = time.perf_counter() - t
        return seconds, sum(len(r.tokens or []) for r in res.values()), sched.stats.as_dict()

    seconds, new_tokens, stats = batched(o["max_new_tokens"])
    out["batched"] = {"seconds": round(seconds, 2), "rows_per_s": round(len(prompts) / seconds, 3),
                      "new_tokens": new_tokens, "peak_mb": _peak_mb(), "batches": len(stats.get("batches", [])),
                      "oom_splits": stats.get("oom_splits")}
    if prefill_only:
        seconds1, _, _ = batched(1)
        out["batched_prefill"] = {"seconds": round(seconds1, 2), "max_new_tokens": 1}
    subset = prompts[:: max(1, len(prompts) // o["one_row_rows"])][: o["one_row_rows"]]
    _reset_peak()
    t = time.perf_counter()
    new_tokens = sum(len(engine.generate([Request(p, adapter=adapter)])[0]) for p in subset)
    _sync()
    seconds = time.perf_counter() - t
    out["one_row"] = {"rows": len(subset), "seconds": round(seconds, 2), "rows_per_s": round(len(subset) / seconds, 3),
                      "new_tokens": new_tokens, "peak_mb": _peak_mb()}
    out["speedup"] = round(out["batched"]["rows_per_s"] / out["one_row"]["rows_per_s"], 2)
    return out


def _scheduler_runs(o: dict, work: Path, result: dict, step: str, prefill_only: bool) -> object:
    loaded, load_s = _load(o, work, ["lora", "soft_prompt"])
    result["load_s"] = round(load_s, 1)
    result["model_info"] = {k: loaded.info.get(k) for k in ("device", "dtype", "dtype_reason", "capability",
                                                             "capability_forced", "attention", "quantize")}
    prompts = _token_prompts(o, loaded.tokenizer)
    for adapter, name in zip(("lora", "soft_prompt"), loaded.adapter_names):
        result[adapter] = _measure(o, loaded, prompts, name, prefill_only)
        _save(work, step, result)
    return loaded


def step_scheduler(o: dict, work: Path) -> dict:
    result: dict = {}
    _scheduler_runs(o, work, result, "scheduler", prefill_only=False)
    return result


def step_t4(o: dict, work: Path) -> dict:
    from prompt_recovery.config import BudgetArgs, GenerationArgs, ModelArgs, OutputArgs, PredictArgs
    from prompt_recovery.predict import predict

    result: dict = _cap_memory(T4_MEMORY)
    result["forced_capability"] = os.environ.get("PROMPT_RECOVERY_CUDA_CAPABILITY")
    loaded = _scheduler_runs(o, work, result, "t4", prefill_only=True)
    if not _cuda():
        result["oom"] = {"skipped": "no CUDA: a real CUDA out of memory needs a GPU"}
        return result
    # Far more tokens in one batch than 15 GB hold: the engine must run out of memory and the scheduler recover.
    _reset_peak()
    args = PredictArgs(test_csv=str(work / "test.csv"), output=str(work / "oom_submission.csv"),
                       report=str(work / "oom_report.json"), progress=False,
                       model=ModelArgs(model=str(work / "model"), adapter=loaded.adapter, quantize="4bit"),
                       generation=GenerationArgs(max_new_tokens=o["max_new_tokens"], max_batch_tokens=1 << 21,
                                                 max_batch_size=o["rows"]),
                       budget=BudgetArgs(time_limit=o["oom_time_limit"], budget_per_row=1e6),
                       out=OutputArgs(fallback_prompt=FALLBACK, suffix_file="none"))
    t = time.perf_counter()
    report = predict(args, loader=lambda _model_args: loaded)
    batches = report.batches
    result["oom"] = {
        "seconds": round(time.perf_counter() - t, 1), "rows": report.rows, "generated": report.generated,
        "oom_splits": report.oom_splits, "fallback_reasons": report.fallback_reasons, "error": report.error,
        "batch_statuses": [(b["rows"], b["status"]) for b in batches], "peak_mb": _peak_mb(),
        "out_of_memory_fallbacks": report.fallback_reasons.get("out_of_memory", 0),
    }
    return result


# ---- replicas ---------------------------------------------------------------------------------------------------

def replica_loader(model_args):
    """model.load under this replica's memory cap (BENCH_REPLICA_FRACTION of the GPU)."""
    import torch

    from prompt_recovery.model import load

    fraction = float(os.environ.get("BENCH_REPLICA_FRACTION", "0"))
    if fraction and torch.cuda.is_available():
        torch.cuda.set_per_process_memory_fraction(fraction)
    return load(model_args)


def step_replicas(o: dict, work: Path) -> dict:
    from prompt_recovery.config import BudgetArgs, GenerationArgs, ModelArgs, OutputArgs, PredictArgs
    from prompt_recovery.multigpu import predict_sharded
    from prompt_recovery.submission import read_submission

    os.environ["BENCH_REPLICA_FRACTION"] = "0.5"
    out = work / "replicas_submission.csv"
    args = PredictArgs(test_csv=str(work / "test.csv"), output=str(out), progress=False,
                       model=ModelArgs(model=str(work / "model"), adapter=str(work / "lora"), quantize="4bit"),
                       generation=GenerationArgs(max_new_tokens=o["max_new_tokens"]),
                       # Bound by rows x budget_per_row, as on Kaggle: a replica's own rows would give it half.
                       budget=BudgetArgs(budget_per_row=o["replica_time_limit"] / o["rows"]),
                       out=OutputArgs(fallback_prompt=FALLBACK, suffix_file="none"))
    devices = ["0", "0"] if _cuda() else [None, None]
    t = time.perf_counter()
    summary = predict_sharded(args, devices, FALLBACK, loader=replica_loader)
    seconds = time.perf_counter() - t
    shards = out.parent / (out.name + ".shards")
    reports = []
    for k in range(2):
        path = shards / f"shard{k}_report.json"
        rep = json.loads(path.read_text()) if path.exists() else {}
        reports.append({k2: rep.get(k2) for k2 in ("rows", "generated", "fallback_reasons", "budget_s", "elapsed_s",
                                                   "load_s", "peak_cuda_mb", "error")})
    rows = read_submission(str(out))
    ends = [b["end_wall"] if b else None for b in summary["budgets"]]
    return {"seconds": round(seconds, 1), "rows": summary["rows"], "exit_codes": summary["exit_codes"],
            "merged_valid": len(rows) == summary["rows"] and all(p.strip() for _, p in rows),
            "model_rows": sum(1 for _, p in rows if p != FALLBACK),
            "same_absolute_end": len(set(ends)) == 1 and ends[0] == summary["end_wall"],
            "budget_share_of_whole_run": [round((r.get("budget_s") or 0) / o["replica_time_limit"], 3)
                                          for r in reports],
            "whole_run_s": o["replica_time_limit"], "replicas": reports, "devices": devices,
            "memory_fraction_each": 0.5 if _cuda() else None}


# ---- gemma ------------------------------------------------------------------------------------------------------

def _nonfinite_rows(model, ids, mask) -> int:
    import torch

    with torch.inference_mode():
        logits = model(input_ids=ids, attention_mask=mask).logits[:, -1]
    return int((~torch.isfinite(logits)).any(dim=-1).sum())


def step_gemma(o: dict, work: Path) -> dict:
    import torch

    from prompt_recovery import model as model_lib
    from prompt_recovery.config import BudgetArgs, GenerationArgs, ModelArgs, OutputArgs, PredictArgs
    from prompt_recovery.predict import predict
    from prompt_recovery.prompt import PromptBuilder, Template

    if not _cuda() and not o["gemma_on_cpu"]:
        return {"skipped": "no CUDA (pass --gemma-on-cpu to run it on the CPU anyway)"}
    t = time.perf_counter()
    if o["gemma_gguf"]:
        folder = model_lib.convert_gguf(o["gemma_gguf"], str(work / "cache"), name=model_lib.EMBEDDED_NAME)
    else:
        try:
            folder = model_lib.convert_gguf(model_lib.embedded_gguf(), str(work / "cache"),
                                            name=model_lib.EMBEDDED_NAME)
        except ImportError:
            return {"skipped": "the embedded model's package is not installed; pass --gemma-gguf PATH"}
    result: dict = {"convert_s": round(time.perf_counter() - t, 1), "variants": {}}
    adapter = model_lib.shipped_adapter(model_lib.EMBEDDED_NAME)
    device = "cuda" if _cuda() else "cpu"
    capability = model_lib.cuda_capability() if device == "cuda" else None
    dtypes = ["float16", "float32"] + (["bfloat16"] if model_lib.native_bf16(capability) else [])
    csv_path = str(ROOT / "data_samples" / "test.csv")
    outputs = {}
    from prompt_recovery.data import read_test

    rows = read_test(csv_path).rows[:8]
    for dtype in dtypes:
        margs = ModelArgs(model=folder, adapter=adapter or "none", dtype=dtype, device=device)
        loaded = model_lib.load(margs)
        # Independent of predict: the first batch's last-position logits, any inf or NaN? And does upcast() fix it?
        builder = PromptBuilder(loaded.tokenizer, Template.load(adapter) if adapter else Template(), 1024)
        batch = [builder.build(r.original_text, r.rewritten_text) for r in rows]
        width = max(map(len, batch))
        ids = torch.tensor([[loaded.tokenizer.pad_token_id] * (width - len(b)) + b for b in batch], device=device)
        mask = torch.tensor([[0] * (width - len(b)) + [1] * len(b) for b in batch], device=device)
        variant = {"first_batch_nonfinite_rows": _nonfinite_rows(loaded.model, ids, mask),
                   "dtype_reason": loaded.info.get("dtype_reason")}
        if variant["first_batch_nonfinite_rows"]:
            variant["upcast"] = model_lib.upcast(loaded)
            variant["nonfinite_rows_after_upcast"] = _nonfinite_rows(loaded.model, ids, mask)
        del loaded
        _reset_peak()
        # End to end through predict with its own load: whatever the package does with this dtype.
        out = work / f"gemma_{dtype}.csv"
        args = PredictArgs(test_csv=csv_path, output=str(out), progress=False, model=margs,
                           budget=BudgetArgs(time_limit=120.0), generation=GenerationArgs(max_new_tokens=32),
                           out=OutputArgs(fallback_prompt=FALLBACK))
        report = predict(args)
        with open(out, newline="", encoding="utf-8") as f:
            outputs[dtype] = [r[1] for r in list(csv.reader(f))[1:]]
        variant.update({"rows": report.rows, "generated": report.generated, "fallback_reasons": report.fallback_reasons,
                        "rows_per_s": round(report.rows_per_s, 2), "peak_mb": _peak_mb(), "error": report.error,
                        "report_dtype": report.model.get("dtype"), "report_upcast": report.model.get("upcast"),
                        "report_dtype_reason": report.model.get("dtype_reason"),
                        "fallback_rows": sum(1 for x in outputs[dtype] if x == FALLBACK)})
        result["variants"][dtype] = variant
        _save(work, "gemma", result)
    for dtype in dtypes[1:]:
        same = sum(a == b for a, b in zip(outputs["float16"], outputs[dtype]))
        result["variants"][dtype]["same_as_float16"] = f"{same}/{len(outputs[dtype])}"
    return result


# ---- the parent: children, table, projection --------------------------------------------------------------------

def _in_process(step: str, o: dict, work: Path, env: dict) -> dict:
    """--tiny: the step in this process (no GPU memory to keep apart), its environment set for its duration."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    t = time.perf_counter()
    try:
        result = globals()[f"step_{step}"](o, work)
        status = "ok"
    except Exception as exc:  # reported like a failed child: the other steps still run
        result, status = {"log_tail": repr(exc)}, f"error {type(exc).__name__}"
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    _save(work, step, result)
    return {**result, "status": status, "wall_s": round(time.perf_counter() - t, 1)}


def _child(step: str, o: dict, work: Path, limit: float, env: dict) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", step]
    full_env = {**os.environ, **env, "BENCH_GPU_OPTS": json.dumps(o), "BENCH_GPU_WORK": str(work),
                "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    t = time.perf_counter()
    # Its own process group: on a timeout the step's replica processes go too, and their GPU memory with them.
    proc = subprocess.Popen(cmd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=max(limit, 1))
        status = "ok" if proc.returncode == 0 else f"exit {proc.returncode}"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        status = f"timeout after {limit:.0f}s"
    log = (output or "")[-8000:]
    (work / f"{step}.log").write_text(log)
    path = work / f"{step}.json"
    result = json.loads(path.read_text()) if path.exists() else {}
    result.update({"status": status, "wall_s": round(time.perf_counter() - t, 1)})
    if status != "ok":
        result["log_tail"] = log[-1500:]
    return result


def _card(name: str) -> str | None:
    for key in ("H100 PCIe", "H200", "H100", "T4"):
        if all(part in name for part in key.split()):
            return key
    return None


def projection(t4: dict, gpu: str | None, rows: int = 1300, replicas: int = 2) -> dict | None:
    """1,300 rows on T4 x2 from the emulated run: prefill scaled by float16 TFLOP/s, decode by memory bandwidth."""
    card = _card(gpu or "")
    if card is None or card == "T4":
        return None
    flops, bandwidth = CARDS[card]
    out = {}
    for adapter in ("lora", "soft_prompt"):
        m = t4.get(adapter) or {}
        if "batched_prefill" not in m:
            continue
        n = m["rows"]
        prefill = m["batched_prefill"]["seconds"]
        decode = max(m["batched"]["seconds"] - prefill, 0.0)
        f_ratio, b_ratio = flops / CARDS["T4"][0], bandwidth / CARDS["T4"][1]
        per_row = (prefill * f_ratio + decode * b_ratio) / n
        total = per_row * rows / replicas
        out[adapter] = {
            "arithmetic": (f"prefill {prefill:.2f}s x {f_ratio:.1f} ({flops:.0f}/{CARDS['T4'][0]:.0f} TFLOP/s) + "
                           f"decode {decode:.2f}s x {b_ratio:.1f} ({bandwidth:.0f}/{CARDS['T4'][1]:.0f} GB/s) "
                           f"= {per_row * n:.1f}s for {n} rows on one T4; x {rows}/{n} rows / {replicas} T4s "
                           f"= {total:.0f}s"),
            "t4x2_seconds": round(total),
        }
    return out or None


def _fmt(x, spec=".2f"):
    return "-" if x is None else format(x, spec)


def markdown(results: dict) -> str:
    env = results["environment"]
    lines = [f"GPU: {env.get('gpu') or 'none (CPU)'}; torch {env.get('torch')}, transformers "
             f"{env.get('transformers')}, bitsandbytes {env.get('bitsandbytes')}; {env.get('mode')}", ""]
    lines += ["| step | variant | rows | rows/s | ratio | peak GPU MB | notes |", "|---|---|---|---|---|---|---|"]
    for step, label in (("scheduler", "as it is"), ("t4", "T4 emulation (15 GB cap, sm_75 choices)")):
        r = results.get(step, {})
        info = r.get("model_info", {})
        note = f"{info.get('dtype')}, attention {info.get('attention')}, load {r.get('load_s')}s"
        for adapter in ("lora", "soft_prompt"):
            m = r.get(adapter)
            if not m:
                lines.append(f"| {step} ({label}) | {adapter} | - | - | - | - | {r.get('status')} |")
                continue
            lines.append(f"| {step} ({label}) | {adapter}, one row at a time | {m['one_row']['rows']} | "
                         f"{_fmt(m['one_row']['rows_per_s'])} | 1.00x | {_fmt(m['one_row']['peak_mb'], '.0f')} | "
                         f"{note} |")
            lines.append(f"| {step} ({label}) | {adapter}, batched scheduler | {m['rows']} | "
                         f"{_fmt(m['batched']['rows_per_s'])} | {m['speedup']:.2f}x | "
                         f"{_fmt(m['batched']['peak_mb'], '.0f')} | prompts {m['prompt_tokens']} tokens, "
                         f"{m['batched']['batches']} batches |")
    oom = results.get("t4", {}).get("oom", {})
    if "skipped" in oom or not oom:
        lines.append(f"| provoked CUDA OOM | - | - | - | - | - | {oom.get('skipped', 'not run')} |")
    else:
        lines.append(f"| provoked CUDA OOM (15 GB cap, max-batch-tokens 2M) | predict | {oom['rows']} | - | - | "
                     f"{_fmt(oom['peak_mb'], '.0f')} | {oom['oom_splits']} splits, {oom['out_of_memory_fallbacks']} "
                     f"out_of_memory fallbacks, batches {oom['batch_statuses']} |")
    rep = results.get("replicas", {})
    if rep.get("replicas"):
        budgets = ", ".join(_fmt(x.get("budget_s"), ".0f") + "s" for x in rep["replicas"])
        lines.append(f"| replicas (2 processes, half the GPU each) | LoRA | {rep['rows']} | "
                     f"{_fmt(rep['rows'] / rep['seconds'] if rep.get('seconds') else None)} | - | "
                     f"{', '.join(_fmt(x.get('peak_cuda_mb'), '.0f') for x in rep['replicas'])} | merged valid "
                     f"{rep['merged_valid']}, same absolute end {rep['same_absolute_end']}, budgets {budgets} of "
                     f"{rep['whole_run_s']}s, exit codes {rep['exit_codes']} |")
    else:
        lines.append(f"| replicas | - | - | - | - | - | {rep.get('status', 'not run')} |")
    gem = results.get("gemma", {})
    for dtype, v in (gem.get("variants") or {}).items():
        fixed = (f" ({v['nonfinite_rows_after_upcast']} after upcast to {v['upcast']['to']})"
                 if "upcast" in v else "")
        lines.append(f"| Gemma 3 270M end to end | {dtype} | {v['rows']} | {_fmt(v['rows_per_s'])} | - | "
                     f"{_fmt(v['peak_mb'], '.0f')} | first batch non-finite rows {v['first_batch_nonfinite_rows']}/8"
                     f"{fixed}; predict ran in {v['report_dtype']}"
                     + (f" (upcast: {v['report_upcast']})" if v.get("report_upcast") else "")
                     + f", generated {v['generated']}, fallbacks {v['fallback_reasons']}"
                     + (f", same as float16 {v['same_as_float16']}" if "same_as_float16" in v else "") + " |")
    if not gem.get("variants"):
        lines.append(f"| Gemma 3 270M | - | - | - | - | - | {gem.get('skipped') or gem.get('status', 'not run')} |")
    proj = results.get("projection")
    if proj:
        lines += ["", "Projection of 1,300 rows onto Kaggle's T4 x2 (from the T4-emulation run):"]
        lines += [f"- {adapter}: {p['arithmetic']}" for adapter, p in proj.items()]
    return "\n".join(lines)


def _environment(o: dict) -> dict:
    import torch
    import transformers

    env = {"torch": torch.__version__, "transformers": transformers.__version__,
           "mode": "tiny CPU smoke run" if o["tiny"] else "Mistral-7B shape, random weights, 4-bit nf4"}
    try:
        import bitsandbytes

        env["bitsandbytes"] = bitsandbytes.__version__
    except ImportError:
        env["bitsandbytes"] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update({"gpu": props.name, "gpu_memory_gb": round(props.total_memory / GiB, 1),
                    "capability": f"{props.major}.{props.minor}"})
    return env


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "benchmarks" / "out"),
                   help="where bench_gpu.md and bench_gpu.json go")
    p.add_argument("--work", default=None, help="scratch folder (default: OUT/../bench_gpu_work or /tmp)")
    p.add_argument("--tiny", action="store_true", help="tiny model on the CPU: checks the code, measures nothing")
    p.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated, of {', '.join(STEPS)}")
    p.add_argument("--rows", type=int, default=None, help="rows (default 128; --tiny 8)")
    p.add_argument("--one-row-rows", type=int, default=None, help="rows run one at a time (default 12; --tiny 3)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default 32; --tiny 4")
    p.add_argument("--max-batch-tokens", type=int, default=16384)
    p.add_argument("--max-batch-size", type=int, default=64)
    p.add_argument("--time-budget", type=float, default=570.0, help="seconds for everything (steps are cut short)")
    p.add_argument("--gemma-gguf", default=None, help="the Gemma 3 270M GGUF, where its package is not installed")
    p.add_argument("--gemma-on-cpu", action="store_true", help="run the Gemma step without CUDA too")
    p.add_argument("--children", action="store_true", help="with --tiny: each step in a child process anyway")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        o, work = _opts_from_env(), Path(os.environ["BENCH_GPU_WORK"])
        result = globals()[f"step_{a.child}"](o, work)
        _save(work, a.child, result)
        return 0
    o = {"tiny": a.tiny, "rows": a.rows or (8 if a.tiny else 128),
         "one_row_rows": a.one_row_rows or (3 if a.tiny else 12),
         "max_new_tokens": a.max_new_tokens or (4 if a.tiny else 32), "max_batch_tokens": a.max_batch_tokens,
         "max_batch_size": a.max_batch_size, "gemma_gguf": a.gemma_gguf, "gemma_on_cpu": a.gemma_on_cpu,
         "oom_time_limit": 240.0, "replica_time_limit": 300.0 if not a.tiny else 120.0}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(a.work or os.path.join(os.environ.get("TMPDIR", "/tmp"), "bench_gpu_work"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    steps = [s for s in a.steps.split(",") if s]
    unknown = set(steps) - set(STEPS)
    if unknown:
        print(f"unknown steps: {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    end = time.monotonic() + a.time_budget
    results: dict = {"environment": _environment(o), "options": o}
    t4_env = {"PROMPT_RECOVERY_CUDA_CAPABILITY": "7.5"}
    for step in steps:
        left = end - time.monotonic()
        if left < 10:
            results[step] = {"status": "not run: the time budget was spent"}
            continue
        env = t4_env if step in ("t4", "replicas") else {}
        if a.tiny and not a.children:
            results[step] = _in_process(step, o, work, env)
        else:
            results[step] = _child(step, o, work, min(STEP_LIMIT[step], left), env)
        print(f"[bench_gpu] {step}: {results[step]['status']} in {results[step]['wall_s']}s", flush=True)
        if step == "prepare" and results[step]["status"] != "ok":
            break  # every later step needs its model
    results["projection"] = projection(results.get("t4", {}), results["environment"].get("gpu"))
    table = markdown(results)
    (out / "bench_gpu.json").write_text(json.dumps(results, indent=2, default=str))
    (out / "bench_gpu.md").write_text(table + "\n")
    print(table)
    return 0 if all(results.get(s, {}).get("status") == "ok" for s in steps) else 1


if __name__ == "__main__":
    sys.exit(main())
