"""Prompt tuning (and p-tuning): the stored virtual-token vectors, placed after a row's padding by the engine.

peft's own path puts them before the left padding and numbers positions by arange (peft issue 1093), so a
row's answer would depend on its batch; the engine builds ``[pad..][soft][text]`` with positions from the
mask instead, which is what training saw (``[soft][text]`` from position 0).
"""

from __future__ import annotations

import os

import torch

from ..data import InputError
from ..errors import AdapterMismatch


def load(model, folder: str) -> torch.Tensor:
    """[virtual tokens, hidden] on the embedding's device and dtype, exactly as trained (never rescaled)."""
    path = os.path.join(folder, "adapter_model.safetensors")
    if os.path.isfile(path):  # read directly: peft's import alone is about 2 s of a warm start
        from safetensors.torch import load_file

        weights = load_file(path, device="cpu")
    else:  # peft's older .bin layout
        from peft.utils import load_peft_weights

        weights = load_peft_weights(folder, device="cpu")
    vectors = weights.get("prompt_embeddings")
    embedding = model.get_input_embeddings().weight
    if vectors is None or vectors.dim() != 2:
        raise InputError(f"adapter {folder} holds no prompt_embeddings [virtual tokens, hidden]")
    if vectors.shape[1] != embedding.shape[1]:
        raise AdapterMismatch(f"adapter {folder} has soft prompts of width {vectors.shape[1]}; "
                         f"the model's embeddings are {embedding.shape[1]} wide")
    return vectors.to(device=embedding.device, dtype=embedding.dtype)
