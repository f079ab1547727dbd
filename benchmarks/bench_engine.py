"""The engine against its ceiling and its predecessor: same rows, same model, same batches, one run.

    python benchmarks/bench_engine.py                    # embedded Gemma 3 270M, CPU, data_samples/val.csv
    python benchmarks/bench_engine.py --rows 40 --variants prefill,engine

Variants (each in its own child process, so each peak memory is its own):
  prefill         a bare prefill forward over the batches (``logits_to_keep=1``): the ceiling
  generate        the old path: ``model.generate`` per batch, stop criteria for line breaks and the time bound
  engine          the engine's own loop: finished rows leave the batch
  one-row         the engine, one row at a time (no padding)
  generate_batch  transformers' continuous batching (bare base only; token ids only, no time bound)
  soft-mixed      N soft prompts served together: every row once per soft prompt, mixed in shared batches
  soft-separate   the same N soft prompts as N separate runs over the rows, one after another
Prompt positions per second = padded prompt positions processed (rows x width of every batch; one-row: the
row's own length) / seconds, decoding included. Outputs are compared: the same ids, or the count that differ.
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
ALL = ("prefill", "generate", "engine", "one-row", "generate_batch", "soft-mixed", "soft-separate")


def batches_of(lengths: list[int], max_batch_tokens: int, max_batch_size: int, max_new: int) -> list[list[int]]:
    """The scheduler's batching without a deadline: shortest first, under the token and size caps."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    out, cur, width = [], [], 0
    for i in order:
        w = max(width, lengths[i])
        if cur and (len(cur) >= max_batch_size or (len(cur) + 1) * (w + max_new) > max_batch_tokens):
            out.append(cur)
            cur, w = [], lengths[i]
        cur.append(i)
        width = w
    if cur:
        out.append(cur)
    return out


def _setup(opts):
    import torch

    from prompt_recovery import model as model_lib
    from prompt_recovery.config import ModelArgs
    from prompt_recovery.data import read_test
    from prompt_recovery.prompt import PromptBuilder, Template, newline_token_ids

    torch.set_num_threads(opts["threads"])
    loaded = model_lib.load(ModelArgs(adapter=["none"], device="cpu"))
    tok = loaded.tokenizer
    rows = read_test(opts["csv"]).rows[: opts["rows"]]
    builder = PromptBuilder(tok, Template(), opts["max_input_tokens"])
    prompts = [builder.build(r.original_text, r.rewritten_text) for r in rows]
    eos = {tok.eos_token_id} | set(_as_list(getattr(loaded.model.generation_config, "eos_token_id", None)))
    return loaded, tok, prompts, eos, newline_token_ids(tok)


def _as_list(x):
    return [] if x is None else x if isinstance(x, list) else [x]


def _old_generate(model, tok, eos, stop_ids, max_new):
    """The engine before this change, kept here as the reference: generate() with stopping criteria."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    stop = torch.tensor(sorted(stop_ids - eos))

    class StopAfter(StoppingCriteria):
        def __init__(self, prompt_len):
            self.prompt_len = prompt_len

        def __call__(self, input_ids, scores, **kwargs):
            new = input_ids[:, self.prompt_len:]
            if new.shape[1] < 2:
                return torch.zeros(input_ids.shape[0], dtype=torch.bool)
            return torch.isin(new[:, 1:], stop).any(dim=1)

    def run(batch):
        width = max(len(r) for r in batch)
        ids = torch.full((len(batch), width), tok.pad_token_id)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for n, r in enumerate(batch):
            ids[n, width - len(r):] = torch.tensor(r)
            mask[n, width - len(r):] = 1
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False,
                                 temperature=None, top_p=None, top_k=None, num_beams=1, pad_token_id=tok.pad_token_id,
                                 eos_token_id=sorted(eos), stopping_criteria=StoppingCriteriaList([StopAfter(width)]))
        rows = []
        for r in out[:, width:].tolist():
            cut = next((k for k, t in enumerate(r) if t in eos), len(r))
            r = r[:cut]
            while r and r[-1] == tok.pad_token_id:
                r = r[:-1]
            rows.append(r)
        return rows

    return run


def _soft_prompts(loaded, n):
    """N distinct soft prompts: the shipped one and N-1 perturbed copies (the cost is what is measured)."""
    from importlib.resources import files

    import torch
    from peft.utils import load_peft_weights

    path = str(files("prompt_recovery").joinpath("assets", "adapters", "gemma-3-270m-prompt-tuning"))
    base = load_peft_weights(path, device="cpu")["prompt_embeddings"]
    gen = torch.Generator().manual_seed(0)
    return {f"soft{k}": (base + 0.05 * k * torch.randn(base.shape, generator=gen)).to(
        loaded.model.get_input_embeddings().weight.dtype) for k in range(n)}


def _variant(name, opts, queue):
    import torch

    from prompt_recovery.engine import Engine, Request, Served

    loaded, tok, prompts, eos, stop_ids = _setup(opts)
    model = loaded.model
    max_new = opts["max_new_tokens"]
    lengths = [len(p) for p in prompts]
    batches = batches_of(lengths, opts["max_batch_tokens"], opts["max_batch_size"], max_new)
    positions = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    outs: list = [None] * len(prompts)
    warm = [prompts[0][:64]]
    if name == "prefill":
        def work():
            for b in batches:
                width = max(lengths[i] for i in b)
                ids = torch.full((len(b), width), tok.pad_token_id)
                mask = torch.zeros((len(b), width), dtype=torch.long)
                for n, i in enumerate(b):
                    ids[n, width - lengths[i]:] = torch.tensor(prompts[i])
                    mask[n, width - lengths[i]:] = 1
                with torch.inference_mode():
                    model(input_ids=ids, attention_mask=mask, logits_to_keep=1)
        Engine(model, tok.pad_token_id, eos, max_new).generate(warm)
    elif name == "generate":
        run = _old_generate(model, tok, eos, stop_ids, max_new)
        run(warm)

        def work():
            for b in batches:
                for i, o in zip(b, run([prompts[i] for i in b])):
                    outs[i] = o
    elif name in ("engine", "one-row"):
        engine = Engine(model, tok.pad_token_id, eos, max_new, stop_ids=stop_ids)
        engine.generate(warm)
        groups = batches if name == "engine" else [[i] for i in range(len(prompts))]
        if name == "one-row":
            positions = sum(lengths)

        def work():
            for b in groups:
                for i, o in zip(b, engine.generate([prompts[i] for i in b])):
                    outs[i] = o
    elif name == "generate_batch":
        from transformers import GenerationConfig

        gc_ = GenerationConfig(max_new_tokens=max_new, do_sample=False, eos_token_id=sorted(eos | stop_ids),
                               pad_token_id=tok.pad_token_id)

        def work():
            res = model.generate_batch(prompts, generation_config=gc_, progress_bar=False)
            for n, key in enumerate(sorted(res, key=lambda k: int(k.split("_")[-1]))):
                outs[n] = [t for t in res[key].generated_tokens if t not in eos]
    else:  # soft prompts
        soft = _soft_prompts(loaded, opts["soft_prompts"])
        engine = Engine(model, tok.pad_token_id, eos, max_new, stop_ids=stop_ids, served=Served(soft_prompts=soft))
        reqs = [Request(p, adapter=a) for a in soft for p in prompts]
        req_len = [engine.length(r) for r in reqs]
        engine.generate([Request(warm[0], adapter="soft0")])
        outs = [None] * len(reqs)
        if name == "soft-mixed":
            groups = batches_of(req_len, opts["max_batch_tokens"], opts["max_batch_size"], max_new)
        else:  # one run per soft prompt, each batched on its own
            per = len(prompts)
            groups = [[k * per + i for i in b] for k in range(len(soft))
                      for b in batches_of(req_len[:per], opts["max_batch_tokens"], opts["max_batch_size"], max_new)]
        positions = sum(len(b) * max(req_len[i] for i in b) for b in groups)

        def work():
            for b in groups:
                for i, o in zip(b, engine.generate([reqs[i] for i in b])):
                    outs[i] = o
    start = time.perf_counter()
    work()
    seconds = time.perf_counter() - start
    queue.put({
        "variant": name, "rows": len(outs), "batches": len(batches), "positions": positions, "seconds": seconds,
        "positions_per_s": positions / seconds, "rows_per_s": len(outs) / seconds,
        "new_tokens": sum(len(o) for o in outs if o is not None), "outputs": outs if outs[0] is not None else None,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    })


def _wait(proc, queue, timeout: float):
    """The child's result, or None if it dies or outlives ``timeout`` seconds (then it is stopped)."""
    import queue as queue_lib

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            result = queue.get(timeout=5)
            proc.join()
            return result
        except queue_lib.Empty:
            if not proc.is_alive():
                return None
    proc.kill()
    proc.join()
    return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--csv", default=str(ROOT / "data_samples" / "val.csv"))
    p.add_argument("--rows", type=int, default=80)
    p.add_argument("--max-input-tokens", type=int, default=1024)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--max-batch-tokens", type=int, default=16384)
    p.add_argument("--max-batch-size", type=int, default=64)
    p.add_argument("--soft-prompts", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--variants", default="prefill,generate,engine,one-row,generate_batch,soft-mixed,soft-separate")
    p.add_argument("--variant-timeout", type=float, default=1800, help="seconds a variant may take")
    p.add_argument("--json", default=None)
    opts = vars(p.parse_args(argv))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    names = [v for v in opts["variants"].split(",") if v]
    bad = [v for v in names if v not in ALL]
    if bad:
        p.error(f"unknown variant(s) {bad}; choose from {', '.join(ALL)}")
    ctx = mp.get_context("spawn")
    results = {}
    for name in names:
        queue = ctx.Queue()
        proc = ctx.Process(target=_variant, args=(name, opts, queue))
        proc.start()
        r = _wait(proc, queue, opts["variant_timeout"])
        if r is None:  # died, or too slow to finish: said in the table, the other variants still run
            print(f"{name}: no result (exit {proc.exitcode}, {opts['variant_timeout']} s limit)", file=sys.stderr)
            continue
        results[name] = r
        print(f"{name}: {r['positions_per_s']:.0f} positions/s, {r['seconds']:.1f}s", file=sys.stderr, flush=True)
    ceiling = results.get("prefill", {}).get("positions_per_s")
    ref = results.get("engine", {}).get("outputs")
    print(f"\n{opts['rows']} rows of {Path(opts['csv']).name}, embedded Gemma 3 270M float32 on CPU "
          f"({opts['threads']} threads), max_new_tokens {opts['max_new_tokens']}, token cap "
          f"{opts['max_batch_tokens']}, {opts['soft_prompts']} soft prompts in the soft variants\n")
    print("| variant | prompt positions/s | of the prefill ceiling | rows/s | seconds | new tokens | "
          "same ids as the engine | peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        same = "-"
        if ref is not None and r["outputs"] is not None and len(r["outputs"]) == len(ref) and name != "engine":
            diff = sum(a != b for a, b in zip(r["outputs"], ref))
            same = "yes" if diff == 0 else f"{diff} rows differ"
        share = f"{100 * r['positions_per_s'] / ceiling:.0f}%" if ceiling else "-"
        print(f"| {name} | {r['positions_per_s']:.0f} | {share} | {r['rows_per_s']:.2f} | {r['seconds']:.1f} | "
              f"{r['new_tokens']} | {same} | {r['peak_rss_mb']:.0f} |")
    if opts["json"]:
        Path(opts["json"]).write_text(json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "outputs"}
                                                  for k, v in results.items()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
