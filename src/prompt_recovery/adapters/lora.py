"""LoRA: adapters loaded once each, under their names, into one PeftModel, left unmerged for per-row routing.

peft's mixed-batch inference (``adapter_names=``) runs each row through its own adapter, on bitsandbytes
4-bit bases too; the engine passes ``__base__`` for rows that take none.
"""

from __future__ import annotations

from collections.abc import Mapping

from peft import PeftModel

from ..engine import out_of_memory
from ..model import AdapterMismatch


def load(model, folders: Mapping[str, str], merge: bool):
    """(model, merged): a PeftModel holding every adapter, or the base with the single adapter merged in."""
    peft_model = None
    for name, folder in folders.items():
        try:
            if peft_model is None:
                peft_model = PeftModel.from_pretrained(model, folder, adapter_name=name, is_trainable=False)
            else:
                peft_model.load_adapter(folder, adapter_name=name, is_trainable=False)
        except (RuntimeError, ValueError, KeyError) as exc:
            if out_of_memory(exc):
                raise  # not a mismatch: the caller's out-of-memory handling applies
            raise AdapterMismatch(f"LoRA adapter {folder} does not fit the model: {str(exc).splitlines()[0]}") from None
    peft_model.eval()
    if merge:
        return peft_model.merge_and_unload(), True
    return peft_model, False
