"""LoRA: adapters loaded once each, under their names, into one PeftModel, left unmerged for per-row routing.

peft's mixed-batch inference (``adapter_names=``) runs each row through its own adapter, on bitsandbytes
4-bit bases too; the engine passes ``__base__`` for rows that take none.
"""

from __future__ import annotations

from collections.abc import Mapping

from peft import PeftModel

from ..engine import out_of_memory
from ..errors import AdapterMismatch, one_line


def load(model, folders: Mapping[str, str], merge: bool):
    """(model, merged): a PeftModel holding every adapter, or the base with the single adapter merged in."""
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


def _grow_to_saved_vocabulary(model, folder: str) -> None:
    """Give the base the embedding rows an adapter saved beyond its vocabulary (train once added a pad token to
    tokenizers with neither pad nor unk, and peft saved the grown embed_tokens / lm_head with the adapter).

    Those rows only ever held padding, which is masked: the adapter loads and generates as it was trained.
    """
    import os

    from safetensors import safe_open

    path = os.path.join(folder, "adapter_model.safetensors")
    if not os.path.isfile(path):
        return
    with safe_open(path, framework="pt") as f:
        rows = [f.get_slice(k).get_shape()[0] for k in f.keys() if k.endswith(("embed_tokens.weight",  # noqa: SIM118 (safe_open is not iterable)
                                                                            "lm_head.weight"))]
    have = model.get_input_embeddings().weight.shape[0]
    if rows and max(rows) > have:
        model.resize_token_embeddings(max(rows), mean_resizing=False)
