"""LoRA: adapters loaded once each, under their names, into one PeftModel, left unmerged for per-row routing.

peft's mixed-batch inference (``adapter_names=``) runs each row through its own adapter, on bitsandbytes
4-bit bases too; the engine passes ``__base__`` for rows that take none. A lone plain LoRA that is to be
merged is merged here by hand, without peft (see ``merge_plain``).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping

from ..engine import out_of_memory
from ..errors import AdapterMismatch, one_line

WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."  # peft saves each key under its wrapper's path to the base model


def load(model, folders: Mapping[str, str], merge: bool, configs: Mapping[str, dict] | None = None):
    """(model, merged): a PeftModel holding every adapter, or the base with the single adapter merged in.

    ``configs``: {name: adapter_config} already read by the caller (read here when absent).
    """
    if merge and len(folders) == 1:
        name, folder = next(iter(folders.items()))
        try:
            merged = merge_plain(model, folder, (configs or {}).get(name))
            if merged is not None:
                return merged, True
        except (RuntimeError, ValueError, KeyError) as exc:
            if out_of_memory(exc):
                raise
            raise AdapterMismatch(f"LoRA adapter {folder} does not fit the model: {one_line(exc)}") from None
    from peft import PeftModel  # here: its import alone is about 2 s (it pulls in bitsandbytes)

    peft_model = None
    for name, folder in folders.items():
        _grow_to_saved_vocabulary(model, folder)
        try:
            if peft_model is None:
                peft_model = PeftModel.from_pretrained(model, folder, adapter_name=name, is_trainable=False)
            else:
                peft_model.load_adapter(folder, adapter_name=name, is_trainable=False)
        except (RuntimeError, ValueError, KeyError) as exc:
            if out_of_memory(exc):
                raise  # not a mismatch: the caller's out-of-memory handling applies
            raise AdapterMismatch(f"LoRA adapter {folder} does not fit the model: {one_line(exc)}") from None
    peft_model.eval()
    if merge:
        return peft_model.merge_and_unload(), True
    return peft_model, False


# adapter_config.json keys that change nothing in a merge of B A (bookkeeping, training-only settings, or what
# the saved weights themselves say: which modules carry A and B). Any other key with a truthy value sends the
# adapter through peft, so a field a later peft adds (a new variant) is never merged wrongly by hand.
HARMLESS_KEYS = frozenset({
    "auto_mapping", "base_model_name_or_path", "revision", "task_type", "peft_version", "inference_mode",
    "target_modules", "exclude_modules", "layers_to_transform", "layers_pattern", "lora_dropout", "eva_config",
    "megatron_core", "qalora_group_size", "ensure_weight_tying", "peft_type", "r", "lora_alpha", "use_rslora",
    "bias", "init_lora_weights",
})
# Initialisations that leave the base weights as they are (PiSSA, OLoRA, CorDA, LoftQ... rewrite them at load).
PLAIN_INITS = (True, False, "gaussian", "orthogonal", "eva")


def plain_config(cfg: dict) -> bool:
    """True for a LoRA config of only A and B, one rank and alpha, no variant, bias, saved module or base-rewriting
    initialisation: what ``merge_plain`` merges exactly as peft's ``merge_and_unload`` would."""
    return (cfg.get("peft_type") == "LORA" and cfg.get("bias", "none") == "none"
            and cfg.get("init_lora_weights", True) in PLAIN_INITS
            and isinstance(cfg.get("r"), int) and cfg["r"] > 0 and isinstance(cfg.get("lora_alpha"), (int, float))
            and not any(value for key, value in cfg.items() if key not in HARMLESS_KEYS))


def _plain_keys(keys) -> bool:
    """Every saved tensor an A or a B of a module (no saved embedding, head or other module)."""
    keys = list(keys)
    return bool(keys) and all(k.startswith(PREFIX) and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)


def _read_config(folder: str) -> dict | None:
    try:
        with open(os.path.join(folder, "adapter_config.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def plain_lora(folder: str) -> bool:
    """Whether the adapter in ``folder`` is one ``merge_plain`` merges by hand (config and saved keys)."""
    cfg, path = _read_config(folder), os.path.join(folder, WEIGHTS)
    if not cfg or not plain_config(cfg) or not os.path.isfile(path):
        return False
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return _plain_keys(f.keys())


def merge_plain(model, folder: str, cfg: dict | None = None):
    """The base with W += scale * B @ A for every adapted linear layer, computed as peft computes it; None (the
    base untouched) for an adapter that is not plain (``plain_config``, saved keys), a quantized or offloaded
    base, or a saved name that is no module of this model (peft's own key mapping may resolve it).

    By hand because peft's import (about 2 s, most of a warm start's adapter time) buys nothing here: a merged
    plain LoRA is this one product per layer.
    """
    import torch
    from safetensors.torch import load_file

    cfg = cfg if cfg is not None else _read_config(folder)
    path = os.path.join(folder, WEIGHTS)
    if not cfg or not plain_config(cfg) or not os.path.isfile(path):
        return None
    if getattr(model, "is_quantized", False) or getattr(model, "hf_device_map", None) and any(
            d in ("disk", "meta") for d in model.hf_device_map.values()):
        return None  # packed 4/8-bit or offloaded weights: peft's merge knows their layouts
    weights = load_file(path, device="cpu")  # read once: the keys decide, the same tensors merge
    if not _plain_keys(weights):
        return None  # a saved embedding, head or other module: peft loads those
    r = cfg["r"]
    scale = cfg["lora_alpha"] / (math.sqrt(r) if cfg.get("use_rslora") else r)
    modules = dict(model.named_modules())
    names = sorted({k[len(PREFIX):-len(".lora_A.weight")] for k in weights if k.endswith(".lora_A.weight")})
    if not names or len(names) * 2 != len(weights):
        raise ValueError(f"{WEIGHTS} does not pair every lora_A with a lora_B")
    deltas = {}
    for name in names:
        layer = modules.get(name)
        # Exactly nn.Linear holding real floating weights: bitsandbytes' layers subclass it with packed integers.
        if (type(layer) is not torch.nn.Linear or not layer.weight.is_floating_point()
                or layer.weight.device.type == "meta"):
            return None
        a, b = weights[f"{PREFIX}{name}.lora_A.weight"], weights[f"{PREFIX}{name}.lora_B.weight"]
        if a.shape[1] != layer.in_features or b.shape[0] != layer.out_features or a.shape[0] != b.shape[1]:
            raise ValueError(f"size mismatch for {name}: A {list(a.shape)}, B {list(b.shape)}, "
                             f"layer {[layer.out_features, layer.in_features]}")
        # peft builds A and B in the weight's dtype, 16-bit raised to float32 (autocast_adapter_dtype), copies the
        # saved factors in, and adds the product in place, rounding once: the same here, bit for bit.
        weight_dtype = layer.weight.dtype
        compute = torch.float32 if weight_dtype in (torch.float16, torch.bfloat16) else weight_dtype
        dev = layer.weight.device  # the product where peft would take it: on the layer's device
        deltas[name] = (b.to(dev, compute) @ a.to(dev, compute)) * scale
    with torch.no_grad():  # every check passed first: a refused adapter leaves the base untouched
        for name, delta in deltas.items():
            modules[name].weight.data += delta
    model.eval()
    return model


def _grow_to_saved_vocabulary(model, folder: str) -> None:
    """Give the base the embedding rows an adapter saved beyond its vocabulary (train once added a pad token to
    tokenizers with neither pad nor unk, and peft saved the grown embed_tokens / lm_head with the adapter).

    Those rows only ever held padding, which is masked: the adapter loads and generates as it was trained.
    """
    from safetensors import safe_open

    path = os.path.join(folder, WEIGHTS)
    if not os.path.isfile(path):
        return
    with safe_open(path, framework="pt") as f:
        rows = [f.get_slice(k).get_shape()[0] for k in f.keys() if k.endswith(("embed_tokens.weight",  # noqa: SIM118 (safe_open is not iterable)
                                                                            "lm_head.weight"))]
    have = model.get_input_embeddings().weight.shape[0]
    if rows and max(rows) > have:
        model.resize_token_embeddings(max(rows), mean_resizing=False)
