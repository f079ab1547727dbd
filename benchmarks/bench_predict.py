"""Batched scheduler against a one-row-at-a-time loop: same model, same rows, one run, side by side.

Each variant runs in its own child process so its peak memory is its own. Prints a Markdown table.

    python benchmarks/bench_predict.py                         # Gemma 3 270M (embedded), CPU
    python benchmarks/bench_predict.py --device cuda --quantize 4bit --model /path/to/hf-folder
    python benchmarks/bench_predict.py --device cuda --random-init /path/to/config-folder   # no weights needed

``--random-init`` builds a randomly initialised model of the real shape from a config folder: it costs
the same to run as the trained one, so a GPU throughput test needs no weights on the machine.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _load(opts):
    import torch

    from prompt_recovery import model as model_lib
    from prompt_recovery.config import ModelArgs

    if opts["random_init"]:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        folder = opts["random_init"]
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
        dtype = torch.float32 if opts["device"] == "cpu" else torch.bfloat16
        torch.manual_seed(0)  # each variant's process builds the same weights, so their ids compare
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).to(opts["device"]).eval()
        tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model_lib.ensure_pad_token(tok, model)
        tok.padding_side = "left"
        return model, tok
    loaded = model_lib.load(ModelArgs(model=opts["model"], adapter="none", quantize=opts["quantize"],
                                      device=opts["device"]))
    return loaded.model, loaded.tokenizer


def _variant(name, opts, queue):
    import torch

    from prompt_recovery.data import read_test
    from prompt_recovery.engine import Engine
    from prompt_recovery.prompt import PromptBuilder, Template, newline_token_ids
    from prompt_recovery.scheduler import Limits, Scheduler

    torch.set_num_threads(opts["threads"])
    model, tok = _load(opts)
    rows = read_test(opts["csv"]).rows * opts["repeat"]
    builder = PromptBuilder(tok, Template(), opts["max_input_tokens"])
    prompts = [builder.build(r.original_text, r.rewritten_text) for r in rows]
    engine = Engine(model, tok.pad_token_id, [tok.eos_token_id], opts["max_new_tokens"],
                    stop_ids=newline_token_ids(tok))
    engine.generate([prompts[0]])  # warm-up: first-call allocations are not throughput
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    if name == "batched scheduler":
        sched = Scheduler(engine.run, Limits(time.monotonic() + 1e9, opts["max_new_tokens"],
                                             opts["max_batch_tokens"], opts["max_batch_size"]))
        out = sched.run(dict(enumerate(prompts)))
        outs = [out[i].tokens for i in range(len(prompts))]
    else:
        outs = [engine.generate([p])[0] for p in prompts]
    seconds = time.perf_counter() - start
    queue.put({
        "variant": name,
        "rows": len(prompts),
        "seconds": seconds,
        "rows_per_s": len(prompts) / seconds,
        "new_tokens": sum(len(o or []) for o in outs),
        "outputs": outs,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_cuda_mb": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
        "device": opts["device"],
    })


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--csv", default=str(ROOT / "data_samples" / "test.csv"))
    p.add_argument("--repeat", type=int, default=2, help="rows = the CSV's rows x this")
    p.add_argument("--model", default=None, help="HF folder or .gguf (default: embedded Gemma 3 270M)")
    p.add_argument("--random-init", default=None, help="config folder: random weights of that shape")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--quantize", default="none", choices=["none", "4bit", "8bit"])
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--max-input-tokens", type=int, default=1024)
    p.add_argument("--max-batch-tokens", type=int, default=16384)
    p.add_argument("--max-batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--json", default=None, help="also write the results here")
    opts = vars(p.parse_args(argv))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    ctx = mp.get_context("spawn")
    results = []
    for name in ("one row at a time", "batched scheduler"):
        queue = ctx.Queue()
        proc = ctx.Process(target=_variant, args=(name, opts, queue))
        proc.start()
        results.append(queue.get())
        proc.join()
    base = results[0]["rows_per_s"]
    # Greedy decoding batched or not must give the same ids; a variant whose batches failed shows here too.
    same = results[1]["outputs"] == results[0]["outputs"]
    print(f"\n{results[0]['rows']} rows, device {opts['device']}, quantize {opts['quantize']}, "
          f"max_new_tokens {opts['max_new_tokens']}, {opts['threads']} threads\n")
    print("| variant | rows/s | speed-up | new tokens | peak RSS MB | peak CUDA MB |")
    print("|---|---|---|---|---|---|")
    for r in results:
        cuda = f"{r['peak_cuda_mb']:.0f}" if r["peak_cuda_mb"] is not None else "-"
        print(f"| {r['variant']} | {r['rows_per_s']:.2f} | {r['rows_per_s'] / base:.2f}x | {r['new_tokens']} | "
              f"{r['peak_rss_mb']:.0f} | {cuda} |")
    print(f"\nsame ids both ways: {'yes' if same else 'NO'}")
    if opts["json"]:
        Path(opts["json"]).write_text(json.dumps(results, indent=2))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
