"""Prefix tuning: per-layer key/value prefixes, seeded into each row's cache by the engine.

peft computes the prefix (its reshape per architecture, Gemma's cache layout included); we take it from
peft once per adapter and let the engine place it per row, so prefix rows can share a batch with others.
Exact as one-row generation except on sliding-window layers when a row's prefix, padding and text together
exceed the window: the padding sits between prefix and text there, which training never saw.
"""

from __future__ import annotations

import torch

from ..data import InputError


def load(model, folder: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """[(keys, values)] per layer, each [1, kv heads, virtual tokens, head dim]."""
    from peft import PeftModel  # here, not at the top: its import is about 2 s that other methods skip

    # Prefix tuning adds no modules to the base model: the wrapper is dropped once the prefix is read.
    return from_peft(PeftModel.from_pretrained(model, folder, is_trainable=False), folder)


def from_peft(peft_model, where: str = "in memory") -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The active prefix adapter's keys and values, as peft itself would put them in the cache."""
    with torch.inference_mode():
        cache = peft_model.get_prompt(batch_size=1, max_cache_len=peft_model.active_peft_config.num_virtual_tokens)
    layers = getattr(cache, "layers", None)
    if layers is None or not all(getattr(layer, "is_initialized", False) for layer in layers):
        raise InputError(f"prefix adapter {where}: not every layer of this model gets a prefix; not served")
    return [(layer.keys.clone(), layer.values.clone()) for layer in layers]
