"""Tokenizers: read fast from a folder we converted, and given a pad token that is never EOS."""

from __future__ import annotations

import json
import logging
import os

from .identity import IDENTITY_FILE

log = logging.getLogger(__name__)

# tokenizer_config.json keys that the fast path passes on; a conversion of ours writes nothing else that matters.
TOKENIZER_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "mask_token", "sep_token", "cls_token",
                  "additional_special_tokens", "extra_special_tokens", "model_max_length", "padding_side",
                  "truncation_side", "chat_template", "clean_up_tokenization_spaces")


def load_tokenizer(folder: str):
    """The folder's tokenizer; for a GGUF conversion of ours, read straight from its tokenizer.json.

    AutoTokenizer builds Gemma's tokenizer class, which parses the 33 MB tokenizer.json in Python several times
    and rebuilds the backend from it (3.1 s warm on one CPU core); the file already holds the whole pipeline, so
    the backend read from it is the same tokenizer (ids, decoding, specials: tests/test_real_model.py) in 1.1 s.
    Other folders keep AutoTokenizer: their class may add behaviour the file lacks.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path, config = os.path.join(folder, "tokenizer.json"), os.path.join(folder, "tokenizer_config.json")
    if not (os.path.isfile(path) and os.path.isfile(config) and _converted_gemma(folder)):
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    with open(config, encoding="utf-8") as f:
        settings = json.load(f)
    kwargs = {k: settings[k] for k in TOKENIZER_KEYS if k in settings}
    return PreTrainedTokenizerFast(tokenizer_file=path, **kwargs)


def _converted_gemma(folder: str) -> bool:
    """A Gemma GGUF conversion of ours: the only tokenizer the fast path was checked on (tests/test_real_model.py);
    another family's class may add behaviour (bos or prefix-space settings) its file lacks."""
    try:
        with open(os.path.join(folder, IDENTITY_FILE), encoding="utf-8") as f:
            ident = json.load(f)
    except (OSError, ValueError):
        return False
    return str(ident.get("source", "")).endswith(".gguf") and str(ident.get("name", "")).startswith("gemma")


def _has_own_pad(tokenizer) -> bool:
    return tokenizer.pad_token is not None and tokenizer.pad_token_id != tokenizer.eos_token_id


def _has_unk(tokenizer) -> bool:
    return tokenizer.unk_token is not None and tokenizer.unk_token_id != tokenizer.eos_token_id


def ensure_pad_token(tokenizer, model=None) -> None:
    """For training: give a tokenizer without a pad token one that is not EOS.

    Padding with EOS would make a training collator mask the real EOS and teach the model never to stop.
    With neither pad nor unk (Llama 3) the BOS token pads: padding is masked, so any id that is not EOS will do,
    and one already in the vocabulary leaves the embeddings as they are (a new row would be saved with the
    adapter, and whether peft saves it depends on where train ran). Only without BOS either is a token added.
    """
    if _has_own_pad(tokenizer):
        return
    if _has_unk(tokenizer):
        tokenizer.pad_token = tokenizer.unk_token
    elif tokenizer.bos_token is not None and tokenizer.bos_token_id != tokenizer.eos_token_id:
        tokenizer.pad_token = tokenizer.bos_token
    else:
        tokenizer.add_special_tokens({"pad_token": "<pad>"})
        if model is not None and len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    if model is not None:
        model.config.pad_token_id = tokenizer.pad_token_id


def set_inference_pad(tokenizer, model=None) -> None:
    """For inference: a pad id from the vocabulary as it is (pad, else unk, else EOS); the model is not resized.

    Padded positions are masked, so any existing id pads correctly; a new token would need an embedding row
    that the checkpoint lacks. EOS is harmless here: no labels are masked, and outputs are cut at the first EOS.
    """
    if not _has_own_pad(tokenizer):
        if _has_unk(tokenizer):
            tokenizer.pad_token = tokenizer.unk_token
        elif tokenizer.pad_token is None and tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
    if model is not None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id


def trained_vocab_size(vocab_size: int | None, tokenizer) -> int | None:
    """The vocab size train records for this base: larger by the pad token ensure_pad_token adds, if it adds one.

    Adapters trained before train recorded the base as on disk carry this size; it is the same base model.
    """
    if vocab_size is None or _has_own_pad(tokenizer) or _has_unk(tokenizer):
        return vocab_size
    # Adapters trained before BOS padded such tokenizers recorded the grown size: still this base.
    added = 0 if "<pad>" in tokenizer.get_vocab() else 1
    return max(vocab_size, len(tokenizer) + added)
