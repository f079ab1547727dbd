"""Real 7B / 8B shapes, two layers, random weights, through the CLI on the CPU: train, predict, bundle.

    python benchmarks/shapes_7b.py --work /tmp/shapes --json benchmarks/results_shapes_7b.json
    python benchmarks/shapes_7b.py --shapes llama-3-8b --rows 4       # one shape

The cost of a layer is what changes with depth; shapes do not. Each model keeps its family's widths (hidden size,
grouped-query heads, head size, sliding window, vocabulary) with ``num_hidden_layers=2``, so every code path that
depends on a shape (bitsandbytes nf4 layers of that width, a 32k / 128k / 256k vocabulary in the embedding and the
logits, 8 KV heads, head size 256) runs here as it would on the full model. Each shape gets a byte-level BPE
tokenizer trained on the sample texts and filled to the family's exact vocabulary size, with the family's special
tokens: Mistral bos, eos and unk; Gemma bos, eos, pad and unk; Llama 3 bos and eos only (neither pad nor unk, the
case where train adds a pad token and the vocabulary grows by one row).

Steps per shape, each a ``prompt-recovery`` child process measured with ``/usr/bin/time`` (peak RSS):
QLoRA (``train --method lora --quantize 4bit``), prompt tuning on the same 4-bit base, ``predict --quantize 4bit``
with each adapter batched and again one row at a time (``--max-batch-size 1``), then the engine's token ids
batched against one row in a child process (a random model's text is junk that postprocess rejects),
and ``bundle --deps none --model`` with that folder. Wall seconds a row are the CPU's, not a GPU's.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SHAPES = {
    # Mistral-7B-v0.1: GQA 32/8, head 128, sliding window 4096, 32k vocabulary.
    "mistral-7b": dict(model_type="mistral", hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                       num_key_value_heads=8, head_dim=128, vocab_size=32000, sliding_window=4096,
                       max_position_embeddings=32768, rope_theta=10000.0,
                       specials=dict(bos="<s>", eos="</s>", unk="<unk>")),
    # Gemma-7B: 16 heads of 256 (multi-head, not grouped), MLP 24576, 256k vocabulary tied to the head.
    "gemma-7b": dict(model_type="gemma", hidden_size=3072, intermediate_size=24576, num_attention_heads=16,
                     num_key_value_heads=16, head_dim=256, vocab_size=256000, max_position_embeddings=8192,
                     specials=dict(bos="<bos>", eos="<eos>", pad="<pad>", unk="<unk>")),
    # Llama-3-8B: GQA 32/8, 128k vocabulary, untied head; bos and eos but neither pad nor unk.
    "llama-3-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                       num_key_value_heads=8, head_dim=128, vocab_size=128256, max_position_embeddings=8192,
                       rope_theta=500000.0, specials=dict(bos="<|begin_of_text|>", eos="<|end_of_text|>")),
}


def build_tokenizer(texts: list[str], vocab_size: int, specials: dict, folder: Path) -> None:
    """A byte-level BPE of exactly ``vocab_size`` tokens: trained merges, then filler entries no text reaches."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    names = list(specials.values())
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=3000, special_tokens=names, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    i = 0
    while len(vocab) < vocab_size:  # "Ġ" is byte-level's space: the fillers decode as words " f123"
        vocab.setdefault(f"Ġf{i}", len(vocab))
        i += 1
    fast = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
                                   **{f"{k}_token": v for k, v in specials.items()})
    assert len(fast) == vocab_size, (len(fast), vocab_size)
    fast.save_pretrained(folder)


def build_model(name: str, folder: Path, texts: list[str]) -> dict:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    shape = dict(SHAPES[name])
    specials = shape.pop("specials")
    folder.mkdir(parents=True, exist_ok=True)
    build_tokenizer(texts, shape["vocab_size"], specials, folder)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    ids = {f"{k}_token_id": tok.convert_tokens_to_ids(v) for k, v in specials.items() if k != "unk"}
    config = AutoConfig.for_model(num_hidden_layers=2, tie_word_embeddings=name == "gemma-7b", **ids, **shape)
    torch.manual_seed(0)
    t = time.perf_counter()
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)  # bfloat16 on disk: half the bytes
    model.save_pretrained(folder)
    params = sum(p.numel() for p in model.parameters())
    del model
    return {"params": params, "build_s": time.perf_counter() - t,
            "disk_gib": sum(f.stat().st_size for f in folder.iterdir()) / 2**30}


def write_rows(out: Path, n: int, words: int) -> tuple[Path, Path, list[str]]:
    """n rows of data_samples/train.csv with texts cut to ``words`` words (keeps CPU prefill short)."""
    with open(ROOT / "data_samples" / "train.csv", newline="") as f:
        every = list(csv.DictReader(f))
    rows = every[:n]
    cut = [{**r, "original_text": " ".join(r["original_text"].split()[:words]),
            "rewritten_text": " ".join(r["rewritten_text"].split()[:words])} for r in rows]
    train, test = out / "train.csv", out / "test.csv"
    for path, cols in ((train, ["id", "original_text", "rewritten_text", "rewrite_prompt"]),
                       (test, ["id", "original_text", "rewritten_text"])):
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, cols, extrasaction="ignore")
            w.writeheader()
            w.writerows(cut)
    texts = [v for r in every for v in (r["original_text"], r["rewritten_text"], r["rewrite_prompt"])]
    return train, test, texts


def run(step: str, args: list[str], cwd: Path) -> dict:
    """One CLI call in its own process: exit code, wall seconds, peak RSS, the last lines of its output."""
    cmd = ["/usr/bin/time", "-f", "PEAK_KB %M", sys.executable, "-m", "prompt_recovery", *args]
    t = time.perf_counter()
    p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    wall = time.perf_counter() - t
    peak = next((int(line.split()[1]) for line in p.stderr.splitlines() if line.startswith("PEAK_KB")), 0)
    tail = [line for line in (p.stdout + p.stderr).splitlines() if line.strip() and not line.startswith("PEAK_KB")]
    result = {"step": step, "rc": p.returncode, "wall_s": round(wall, 1), "peak_gib": round(peak / 2**20, 2),
              "tail": tail[-4:]}
    print(f"  {step}: rc {p.returncode}, {wall:.1f} s, peak {peak / 2**20:.2f} GiB", flush=True)
    if p.returncode:
        print("\n".join("    " + line for line in tail[-8:]), flush=True)
    return result


def candidates(path: Path) -> dict[str, str]:
    """row id -> generated (cleaned) text, from a predict run's candidates log."""
    out = {}
    if path.is_file():
        for line in path.read_text().splitlines()[1:]:
            rec = json.loads(line)
            out[rec["id"]] = rec["text"]
    return out


def ids_check(folder: str, adapter: str, test_csv: str, max_new: int) -> None:
    """Child process: the adapter on the 4-bit base, batched against one row at a time; prints a JSON line.

    Token ids, not the CLI's cleaned text: a random model's words are junk that postprocess rejects.
    """
    import time as _time

    from prompt_recovery import model as model_lib
    from prompt_recovery.config import ModelArgs
    from prompt_recovery.data import read_test
    from prompt_recovery.engine import Engine, Request
    from prompt_recovery.prompt import PromptBuilder, Template, eos_token_ids

    t = _time.perf_counter()
    loaded = model_lib.load(ModelArgs(model=folder, adapter=[adapter], quantize="4bit", device="cpu"))
    load_s = _time.perf_counter() - t
    tok = loaded.tokenizer
    path = os.path.join(adapter, "recovery_template.json")
    builder = PromptBuilder(tok, Template.load(adapter) if os.path.isfile(path) else Template(), 512)
    name = loaded.adapter_names[0]
    reqs = [Request(builder.build(r.original_text, r.rewritten_text), adapter=name) for r in read_test(test_csv).rows]
    engine = Engine(loaded.model, tok.pad_token_id, eos_token_ids(tok, loaded.model), max_new, served=loaded.served)
    t = _time.perf_counter()
    batched = engine.generate(reqs)
    batched_s = _time.perf_counter() - t
    t = _time.perf_counter()
    alone = [engine.generate([r])[0] for r in reqs]
    alone_s = _time.perf_counter() - t
    print("IDS " + json.dumps({"rows": len(reqs), "same": sum(a == b for a, b in zip(batched, alone)),
                               "tokens": sum(map(len, batched)), "load_s": round(load_s, 1),
                               "batched_s": round(batched_s, 1), "one_row_s": round(alone_s, 1),
                               "quantized_layers": sum("Linear4bit" in type(m).__name__
                                                       for m in loaded.model.modules())}), flush=True)


def run_ids_check(out: Path, adapter: str, max_new: int) -> dict:
    cmd = ["/usr/bin/time", "-f", "PEAK_KB %M", sys.executable, __file__, "--ids-check", str(out / "base"),
           str(out / adapter), str(out / "test.csv"), str(max_new)]
    p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    peak = next((int(line.split()[1]) for line in p.stderr.splitlines() if line.startswith("PEAK_KB")), 0)
    line = next((line[4:] for line in p.stdout.splitlines() if line.startswith("IDS ")), None)
    result = {**(json.loads(line) if line else {"error": p.stderr.strip().splitlines()[-3:]}),
              "peak_gib": round(peak / 2**20, 2)}
    print(f"  {adapter} ids, batched against one row: {result}", flush=True)
    return result


def bench_shape(name: str, work: Path, n_rows: int, words: int, max_new: int) -> dict:
    out = work / name
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    train_csv, test_csv, texts = write_rows(out, n_rows, words)
    base = out / "base"
    print(f"{name}: building the two-layer model", flush=True)
    info = build_model(name, base, texts)
    steps = []
    common = ["--model", "base", "--quantize", "4bit", "--device", "cpu"]
    steps.append(run("train lora 4bit", ["train", "train.csv", "--method", "lora", "-o", "lora", "--max-steps", "2",
                                         "--batch-size", "2", "--lora-r", "8", *common], out))
    steps.append(run("train prompt-tuning 4bit", ["train", "train.csv", "--method", "prompt-tuning", "-o", "soft",
                                                  "--max-steps", "2", "--batch-size", "2", *common], out))
    same = {}
    for adapter in ("lora", "soft"):
        pred = ["predict", "test.csv", "--adapter", adapter, "--max-new-tokens", str(max_new), "--time-limit",
                "3000", "--budget-per-row", "1000", "--no-progress", *common]
        steps.append(run(f"predict {adapter} batched", [*pred, "-o", f"{adapter}_batched.csv",
                                                        "--report", f"{adapter}_batched.json"], out))
        steps.append(run(f"predict {adapter} one row", [*pred, "-o", f"{adapter}_one.csv", "--max-batch-size", "1",
                                                        "--report", f"{adapter}_one.json"], out))
        a = candidates(out / f"{adapter}_batched.csv.candidates.jsonl")
        b = candidates(out / f"{adapter}_one.csv.candidates.jsonl")
        same[adapter] = {"cli_same_text": sum(a.get(k) == b.get(k) for k in a), "cli_rows": len(a),
                         **run_ids_check(out, adapter, max_new)}
    steps.append(run("bundle --model", ["bundle", "-o", "bundle", "--deps", "none", "--model", "base",
                                        "--adapter", "lora", "--overwrite"], out))
    manifest = out / "bundle" / "manifest.json"
    info["bundle_ok"] = manifest.is_file()
    shutil.rmtree(out / "bundle", ignore_errors=True)  # a copy of the model: gigabytes
    return {"shape": name, **info, "steps": steps, "batched_vs_one": same, "rows": n_rows}


def table(results: list[dict]) -> str:
    lines = ["| shape | params (2 layers) | step | exit | wall s | s/row | peak RSS GiB |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        for s in r["steps"]:
            per_row = f"{s['wall_s'] / r['rows']:.1f}" if s["step"].startswith("predict") else ""
            lines.append(f"| {r['shape']} | {r['params'] / 1e9:.2f} B | {s['step']} | {s['rc']} | {s['wall_s']} "
                         f"| {per_row} | {s['peak_gib']} |")
    lines.append("")
    for r in results:
        parts = ", ".join(f"{k}: the same ids on {v.get('same')} of {v.get('rows')} rows ({v.get('tokens')} tokens)"
                          for k, v in r["batched_vs_one"].items())
        lines.append(f"- {r['shape']}: batched against one row: {parts}; bundle manifest written: {r['bundle_ok']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--work", default="/tmp/shapes_7b", help="scratch folder (gigabytes: the models)")
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--words", type=int, default=24, help="words kept of each text")
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--keep", action="store_true", help="keep the model folders")
    ap.add_argument("--ids-check", nargs=4, metavar=("BASE", "ADAPTER", "TEST_CSV", "MAX_NEW"), help=argparse.SUPPRESS)
    ap.add_argument("--only-ids", action="store_true", help="the ids check alone, on adapters a run kept")
    opts = ap.parse_args(argv)
    if opts.ids_check:
        base, adapter, test_csv, max_new = opts.ids_check
        ids_check(base, adapter, test_csv, int(max_new))
        return 0
    work = Path(opts.work)
    results = []
    for name in opts.shapes:
        if opts.only_ids:  # the same seed rebuilds the same weights the adapters were trained on
            out = work / name
            _, _, texts = write_rows(out, opts.rows, opts.words)
            build_model(name, out / "base", texts)
            results.append({"shape": name, "ids": {a: run_ids_check(out, a, opts.max_new_tokens)
                                                   for a in ("lora", "soft")}})
        else:
            results.append(bench_shape(name, work, opts.rows, opts.words, opts.max_new_tokens))
        if not opts.keep:
            shutil.rmtree(work / name / "base", ignore_errors=True)
        if opts.json:  # after every shape: a run cut short keeps what it measured
            Path(opts.json).write_text(json.dumps(results, indent=1))
    if not opts.only_ids:
        print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
