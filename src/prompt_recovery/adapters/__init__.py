"""Several stored PEFT adapters served side by side by one base model in memory, one method a module.

``attach`` reads each adapter folder once under its name and returns the model plus what the engine needs to
route rows: soft prompts and prefixes as tensors the engine places itself (exact under left padding), LoRA
adapters loaded unmerged into one PeftModel and routed per row by peft (``adapter_names``). A lone LoRA on an
unquantized base, with nothing else needing the bare weights, is merged instead: one matmul a layer, not two.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

from ..data import InputError
from ..engine import Served
from . import lora, prefix, soft_prompt

log = logging.getLogger(__name__)

# peft_type -> how it is served
METHODS = {
    "PROMPT_TUNING": "soft_prompt",
    "P_TUNING": "soft_prompt",  # its saved vectors are the encoder's output: served the same way
    "PREFIX_TUNING": "prefix",
    "LORA": "lora",
}


@dataclass
class Attached:
    model: object
    """The base model, or a PeftModel over it holding the LoRA adapters."""
    served: Served
    kinds: dict[str, str] = field(default_factory=dict)
    """Adapter name -> peft type (PROMPT_TUNING, PREFIX_TUNING, LORA, ...)."""


def attach(model, folders: Mapping[str, str], configs: Mapping[str, dict], *, quantized: bool,
           merge_lora: bool = True, base_needed: bool = False) -> Attached:
    """Serve the adapters ``folders`` ({name: folder}, configs already checked against the base) on ``model``.

    ``base_needed``: some rows run on the bare base, so a LoRA may not be merged into it.
    """
    served = Served()
    kinds: dict[str, str] = {}
    loras: dict[str, str] = {}
    for name, folder in folders.items():
        kind = configs[name].get("peft_type", "UNKNOWN")
        if kind not in METHODS:
            raise InputError(f"adapter {folder} is {kind}; served methods: {', '.join(sorted(METHODS))}")
        kinds[name] = kind
        method = METHODS[kind]
        if method == "soft_prompt":
            served.soft_prompts[name] = soft_prompt.load(model, folder)
        elif method == "prefix":
            served.prefixes[name] = prefix.load(model, folder)
        else:
            loras[name] = folder
    if loras:
        alone = len(folders) == 1 and not base_needed
        model, merged = lora.load(model, loras, merge=alone and merge_lora and not quantized, configs=configs)
        if merged:
            served.merged = next(iter(loras))
        else:
            served.lora = frozenset(loras)
    return Attached(model=model, served=served, kinds=kinds)


def from_peft(peft_model) -> tuple[object, Served, str]:
    """An in-memory PeftModel (as training holds it) as the engine serves it: (model, served, adapter name)."""
    import torch

    name = peft_model.active_adapter
    kind = str(peft_model.active_peft_config.peft_type).split(".")[-1]
    base = peft_model.get_base_model()
    if kind in ("PROMPT_TUNING", "P_TUNING"):
        with torch.no_grad():
            vectors = peft_model.get_prompt_embedding_to_save(name)
        weight = base.get_input_embeddings().weight
        return base, Served(soft_prompts={name: vectors.to(device=weight.device, dtype=weight.dtype)}), name
    if kind == "PREFIX_TUNING":
        return base, Served(prefixes={name: prefix.from_peft(peft_model)}), name
    if kind == "LORA":
        return peft_model, Served(lora=frozenset([name])), name
    raise InputError(f"{kind} adapters are not served; served methods: {', '.join(sorted(METHODS))}")
