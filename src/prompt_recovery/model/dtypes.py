"""Which dtype a model runs in on which device, the bitsandbytes settings, and the switch to a safe dtype.

bfloat16 only on GPUs with native bfloat16 (compute capability 8.0+), float16 on older ones (a T4 is 7.5),
float32 on CPU; ``PROMPT_RECOVERY_CUDA_CAPABILITY`` forces an older card's choices on a newer one. ``upcast``
switches a loaded model to the safe dtype when its float16 run overflows (Gemma 3 can).
"""

from __future__ import annotations

import logging
import os
import re

from ..errors import InputError

log = logging.getLogger(__name__)

# Forces the dtype choice of a card with this compute capability (T4 emulation on a newer GPU: 7.5).
CAPABILITY_ENV = "PROMPT_RECOVERY_CUDA_CAPABILITY"
# bfloat16 tensor cores arrived with Ampere; torch.cuda.is_bf16_supported() also counts emulation (True on a T4).
NATIVE_BF16 = (8, 0)


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


def _name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def upcast(loaded, why: str = "non-finite logits on the first batch") -> dict:
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
    tensors, linear4bit, linear8bit = _cast_in_place(loaded.model, half, target)
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


def _cast_in_place(model, half: tuple, target) -> tuple[int, int, int]:
    """(tensors cast, 4-bit layers switched, 8-bit layers seen): every 16-bit tensor not in ``target`` cast to it,
    every bitsandbytes 4-bit layer computing in it; quantized weights are integers and stay."""
    import torch  # noqa: F401  (bitsandbytes needs torch first)

    tensors = linear4bit = linear8bit = 0
    try:
        import bitsandbytes as bnb

        lin4, lin8 = bnb.nn.Linear4bit, bnb.nn.Linear8bitLt
    except ImportError:  # no bitsandbytes: no quantized layers either
        lin4 = lin8 = ()
    for module in model.modules():
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
    return tensors, linear4bit, linear8bit


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
