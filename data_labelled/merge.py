"""Merge the hand-written batches (parts/*.json) into labelled.csv, checked, in train.csv's format.

    python data_labelled/merge.py            # writes data_labelled/labelled.csv and data_labelled/heldout.csv

Checks every row (three non-empty texts, rewrite != original, rewrite does not contain the prompt) and the
set against data_samples/ (no original or prompt shared with test, val or train, so the sample sets stay
unseen), drops exact repeats, and splits off a held-out set by ORIGINAL TEXT (every prompt of one text lands on
the same side: a text seen in training would leak into its held-out rows) for choosing epochs. Prints the spread:
lengths of the originals and the kinds of prompts.
"""

from __future__ import annotations

import argparse
import csv
import glob
import hashlib
import json
import os
import re
import sys
from collections import Counter

HERE = os.path.dirname(os.path.abspath(__file__))
SAMPLES = os.path.join(HERE, "..", "data_samples")
COLUMNS = ["id", "original_text", "rewritten_text", "rewrite_prompt"]
KINDS = {  # rough prompt kinds, first match wins: for the spread report only
    "form": r"haiku|sonnet|poem|limerick|rap|shanty|song|verse|headline|tweet|recipe|contract|screenplay|"
            r"fairy tale|bullet|faq|list|letter|email|memo|news|script|ad\b|advert|dialogue|story|ballad|ode",
    "persona": r"\bas (a|an|if)\b|voice of|pirate|yoda|shakespeare|gangster|detective|wizard|robot|cowboy",
    "audience": r"child|kid|year-old|investor|beginner|non-native|students|audience|teen|grandparent",
    "length": r"shorten|one sentence|summar|expand|words|brief|concise|longer|shorter|condense|tl;dr",
    "tone": r"tone|formal|casual|friendly|sarcas|cheerful|urgent|polite|humor|funn|serious|dramatic|optimis|"
            r"professional|enthusias|gloomy|angry|calm|playful|romantic|mysterious|persuasive",
}


def sample_strings() -> tuple[set[str], set[str]]:
    originals, prompts = set(), set()
    for path in glob.glob(os.path.join(SAMPLES, "*.csv")):
        with open(path, newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                if row.get("original_text"):
                    originals.add(norm(row["original_text"]))
                if row.get("rewrite_prompt"):
                    prompts.add(norm(row["rewrite_prompt"]))
    return originals, prompts


def norm(text: str) -> str:
    return " ".join(re.findall(r"\w+", text.lower()))


def problem(row: dict, originals: set[str], prompts: set[str]) -> str | None:
    o, r, p = (str(row.get(k, "")).strip() for k in ("original_text", "rewritten_text", "rewrite_prompt"))
    if not (o and r and p):
        return "a text is empty"
    if norm(r) == norm(o):
        return "rewrite equals original"
    if len(norm(p).split()) >= 3 and norm(p) in norm(r):
        return "rewrite contains the prompt"
    if norm(o) in originals:
        return "original is in data_samples"
    if norm(p) in prompts:
        return "prompt is in data_samples"
    return None


def kind(prompt: str) -> str:
    low = prompt.lower()
    hits = [k for k, pattern in KINDS.items() if re.search(pattern, low)]
    if len(re.findall(r"\band\b|,|;", low)) >= 2 and len(hits) >= 2:
        return "compound"
    return hits[0] if hits else "other"


def bucket(words: int) -> str:
    return "<30" if words < 30 else "30-199" if words < 200 else "200-399" if words < 400 else "400+"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default=os.path.join(HERE, "parts"))
    ap.add_argument("-o", "--output", default=os.path.join(HERE, "labelled.csv"))
    ap.add_argument("--heldout", default=os.path.join(HERE, "heldout.csv"))
    ap.add_argument("--heldout-share", type=float, default=0.06, help="share of originals held out")
    args = ap.parse_args(argv)
    originals, prompts = sample_strings()
    rows, dropped, seen = [], Counter(), set()
    for path in sorted(glob.glob(os.path.join(args.parts, "*.json"))):
        try:
            with open(path, encoding="utf-8") as f:
                batch = json.load(f)
        except (OSError, json.JSONDecodeError) as exc:
            print(f"skipped {path}: {exc}", file=sys.stderr)
            continue
        for row in batch:
            why = problem(row, originals, prompts) if isinstance(row, dict) else "not an object"
            key = (norm(str(row.get("original_text", ""))), norm(str(row.get("rewrite_prompt", "")))) \
                if isinstance(row, dict) else None
            if why is None and key in seen:
                why = "repeated (original, prompt)"
            if why:
                dropped[why] += 1
                continue
            seen.add(key)
            o, r, p = (row[k].strip() for k in ("original_text", "rewritten_text", "rewrite_prompt"))
            rows.append({"original_text": o, "rewritten_text": r, "rewrite_prompt": p,
                         "batch": os.path.basename(path).split(".")[0]})
    for k, row in enumerate(rows):
        row["id"] = f"L{k:05d}"
    # Held out by a hash of the original: stable as batches are added, and a text's rows stay together.
    held = [r for r in rows if int(hashlib.sha1(norm(r["original_text"]).encode()).hexdigest()[:8], 16)
            < args.heldout_share * 16**8]
    train = [r for r in rows if r not in held]
    for path, part in ((args.output, train), (args.heldout, held)):
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
            w.writeheader()
            w.writerows(part)
    texts = {r["original_text"] for r in rows}
    print(f"{len(rows)} rows ({len(train)} in {os.path.relpath(args.output)}, {len(held)} held out in "
          f"{os.path.relpath(args.heldout)}), {len(texts)} originals, "
          f"{len({r['rewrite_prompt'] for r in rows})} distinct prompts; dropped: {dict(dropped) or 'none'}")
    lengths = Counter(bucket(len(t.split())) for t in texts)
    print("original lengths in words:", {b: lengths[b] for b in ("<30", "30-199", "200-399", "400+")})
    print("prompt kinds:", dict(Counter(kind(r["rewrite_prompt"]) for r in rows).most_common()))
    print("rows per batch:", dict(sorted(Counter(r["batch"][0] for r in rows).items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
