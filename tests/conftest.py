"""Shared fixtures: a tiny Llama and two tokenizers built in-process (byte-level BPE as in GPT-2 / Llama 3,
and Metaspace BPE with byte fallback as in Llama 2 / Mistral), saved as an HF folder."""

from __future__ import annotations

import csv
import json
import os
import re

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import pytest

CORPUS = [
    "An LLM was given an instruction and the original text below, and it produced the rewritten text.",
    "Recover the instruction. Original text: Rewritten text: Instruction: Rewrite this text",
    "Make it formal. Turn this into a poem. Write it as a pirate. Summarise the text in one line.",
    "The quick brown fox jumps over the lazy dog. Hello world!\nNew line here.\n",
]



class StubEmbedder:
    """Bag of words over a fixed vocabulary: exact, fast, with a known optimum; ``weights`` scale dimensions so
    two stubs disagree. Counts the texts it embedded (``calls``)."""

    max_seq_length = 64

    def __init__(self, vocab, weights=None, name="stub"):
        self.index = {w: i for i, w in enumerate(vocab)}
        self.weights = np.ones(len(vocab) + 1) if weights is None else np.append(weights, 1.0)
        self.label = f"stand-in embedder {name}, not sentence-t5-base"
        self.calls = 0

    def embed(self, texts):
        self.calls += len(texts)
        out = np.zeros((len(texts), len(self.index) + 1))
        for n, t in enumerate(texts):
            for w in re.findall(r"[a-z]+", t.lower()):
                out[n, self.index.get(w, len(self.index))] += 1
            out[n, -1] += 1e-9
        out *= self.weights
        return out / np.linalg.norm(out, axis=1, keepdims=True)

    def token_count(self, texts):
        return [len(t.split()) + 2 for t in texts]

    def fits(self, texts):
        return [n <= self.max_seq_length for n in self.token_count(texts)]

def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<pad>", "<bos>", "<eos>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
        padding_side="left",
    )


# Words the Metaspace vocabulary learns as well: the Maltese letter Ċ (U+010A), which a byte-level
# vocabulary spells its newline with, must be an ordinary letter here.
MALTESE = ["Il-Ċirku Ċentrali", "Ċaw ċaw, Ċikku!"]


def make_metaspace_tokenizer():
    """A sentencepiece-style tokenizer as transformers 5 builds Llama 2's and Mistral's.

    ``LlamaTokenizer(vocab, merges)`` itself makes the backend: BPE with byte fallback, a Metaspace
    pre-tokenizer that prepends "▁" to the first piece only (legacy=False) and does not split on it, so
    pieces tokenized one by one would each get a "▁" that the whole text does not have. The vocabulary
    holds the 256 byte tokens and learns no "\n", so a line break is "<0x0A>" as in Llama 2; it has no
    pad token, like Llama 2.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaTokenizer

    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=specials, show_progress=False)
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    # Trained with splits at "▁" so that no merge crosses a word, as sentencepiece trains.
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    tok.train_from_iterator([c.replace("\n", " ") for c in CORPUS + MALTESE] * 4, trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    return LlamaTokenizer(vocab=model["vocab"], merges=merges, add_bos_token=True, padding_side="left")


def make_model(tokenizer, hidden_size: int = 16, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config).eval()


def greedy_without_cache(model, ids, eos, max_new: int) -> list[int]:
    """One row, greedy, the whole sequence through ``model(...)`` at every step, no KV cache: the reference for
    prompt-learning adapters. peft's ``generate`` loses them on transformers >= 5.24 (it passes the prefix as
    ``past_key_values`` while generate also sets the new ``cache``, and the model keeps ``cache``), so it cannot be
    the reference there; a plain forward still gets them right."""
    import torch

    seq, new = list(ids), []
    for _ in range(max_new):
        x = torch.tensor([seq])
        with torch.no_grad():
            t = int(model(input_ids=x, attention_mask=torch.ones_like(x), use_cache=False).logits[0, -1].argmax())
        if t in eos:
            break
        new.append(t)
        seq.append(t)
    return new


def save_tiny(folder, hidden_size: int = 16, seed: int = 0) -> str:
    tok = make_tokenizer()
    model = make_model(tok, hidden_size, seed)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    return save_tiny(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_model_dir_32(tmp_path_factory) -> str:
    """Another base model: different hidden size, for adapter mismatch tests."""
    return save_tiny(tmp_path_factory.mktemp("tiny-llama-32"), hidden_size=32)


TEXTS = [
    ("The meeting is at five.", "Yo, we meet at five, dude!"),
    ("Cats sleep a lot.", "Felines slumber for most of the day, it is said."),
    ("The sun rises in the east.", "Golden sun ascends from eastern shores."),
    ("Please send the report.", "Kindly forward the report at your earliest convenience."),
    ("It rained all day.", "Rain, rain, all the day, the sky would never go away."),
]


def write_test_csv(path, n: int = 5, ids=None) -> list[str]:
    ids = ids or [f"{i:04d}" for i in range(n)]
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", "original_text", "rewritten_text"])
        for k, rid in enumerate(ids):
            o, r = TEXTS[k % len(TEXTS)]
            w.writerow([rid, o + f" ({k})" * (k % 3), r])
    return ids


def read_csv_rows(path) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.reader(f))


def assert_valid_submission(path, ids) -> list[str]:
    rows = read_csv_rows(path)
    assert rows[0] == ["id", "rewrite_prompt"]
    assert [r[0] for r in rows[1:]] == list(ids)
    assert all(len(r) == 2 and r[1].strip() for r in rows[1:])
    return [r[1] for r in rows[1:]]
