"""Batched generation on token ids with its own decode loop and KV cache. Knows nothing of CSVs or tokenizers.

A batch is prefilled once, then decoded one token a step. A row leaves the batch the moment it produces EOS
or a stop token (a line break: the answer is one line) or reaches ``max_new_tokens``: its rows of the KV
cache, mask, positions and inputs are dropped, so a step costs only the rows still running. The time bound
is checked between steps; only the prefill and one step are uninterruptible.

Rows may carry different adapters in one batch (``Request.adapter``), served by one model in memory:
- soft prompts (prompt tuning): a row is ``[pad..][soft prompt][text]`` fed as ``inputs_embeds``, mask 0 on
  the pads and positions counted from the mask, so the row sees exactly what training showed it
  (``[soft][text]`` at positions 0..) whatever its batch's padding (peft's own path puts the virtual tokens
  before the padding and shifts positions: peft issue 1093);
- prefixes (prefix tuning): each row's key/value prefix seeds the cache, right-aligned in a prefix region,
  masked where a row has none; positions continue after the prefix as in training;
- LoRA: peft's mixed-batch routing (``adapter_names``), ``__base__`` for rows without one.
Greedy rows take the argmax in float32 (as ``generate`` does); sampled rows draw from their own seeded
generator, so a row's sample does not depend on which rows share its batch.

Out of memory comes out as ``MemoryError`` raised *after* the failed batch's frames, cache and activations
are released (never from inside the ``except`` block, whose traceback would keep them alive), so the caller
can retry a smaller batch with that memory free. Non-finite logits (float16 overflow) come out as
``FloatingPointError`` so the caller can switch to a safe dtype.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
from accelerate.utils.memory import clear_device_cache, should_reduce_batch_size
from torch.nn.utils.rnn import pad_sequence
from transformers import DynamicCache

BASE = "__base__"  # peft's name for "no LoRA adapter" in a mixed batch


@dataclass(frozen=True)
class Request:
    """One row to generate for: its prompt ids and how to answer it."""

    ids: Sequence[int]
    """Prompt token ids (without any virtual tokens)."""
    adapter: str | None = None
    """Name of a served adapter (soft prompt, prefix or LoRA); None for the bare base model."""
    temperature: float = 0.0
    """0: greedy; above 0: sample at this temperature."""
    top_p: float = 1.0
    """Nucleus sampling mass kept when sampling."""
    seed: int = 0
    """Seed of this row's own sampling generator."""


@dataclass
class BatchOutput:
    """New ids per row (input order) and what the batch cost, for the scheduler's cost model."""

    tokens: list[list[int]]
    prefill_tokens: int = 0
    """Padded prompt positions the prefill processed (rows x width, virtual tokens included)."""
    prefill_s: float = 0.0
    row_steps: int = 0
    """Decoding work: the sum over decoding steps of the rows still running."""
    decode_s: float = 0.0
    timed_out: bool = False
    """The time bound stopped decoding before every row finished."""
    cut: list[bool] = field(default_factory=list)
    """Per row: the time bound stopped it while it was still running (its answer may be unfinished)."""


@dataclass
class Served:
    """Adapters the engine serves by name, beside one model in memory (see ``adapters.attach``)."""

    soft_prompts: dict[str, torch.Tensor] = field(default_factory=dict)
    """Prompt-tuning vectors, [virtual tokens, hidden], used as they are (never scaled)."""
    prefixes: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)
    """Prefix-tuning keys and values per layer, each [1, kv heads, virtual tokens, head dim]."""
    lora: frozenset[str] = frozenset()
    """LoRA adapters loaded unmerged in the PeftModel, routed per row."""
    merged: str | None = None
    """A LoRA merged into the weights: rows naming it run on the (merged) base."""

    def names(self) -> set[str]:
        return set(self.soft_prompts) | set(self.prefixes) | set(self.lora) | ({self.merged} if self.merged else set())

    def virtual_tokens(self, name: str | None) -> int:
        if name in self.soft_prompts:
            return int(self.soft_prompts[name].shape[0])
        if name in self.prefixes:
            return int(self.prefixes[name][0][0].shape[-2])
        return 0


def out_of_memory(exc: BaseException) -> bool:
    """accelerate's test (CUDA, CPU allocator and other backends' messages) plus the typed torch error."""
    return isinstance(exc, (torch.OutOfMemoryError, MemoryError)) or should_reduce_batch_size(exc)


def _input_device(model) -> torch.device:
    try:
        return model.get_input_embeddings().weight.device
    except (AttributeError, NotImplementedError):
        return next(model.parameters()).device


class Engine:
    """Generation for batches of requests (or plain token-id lists) on a causal LM, outputs in input order."""

    def __init__(self, model, pad_id: int, eos_ids: Iterable[int], max_new_tokens: int,
                 stop_ids: Iterable[int] = (), *, served: Served | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        config = getattr(model, "active_peft_config", None)
        if config is not None and config.is_prompt_learning:
            # Its virtual tokens live in the wrapper, which this loop bypasses: they would be silently lost.
            raise ValueError("serve soft prompts and prefixes through adapters.attach / adapters.from_peft")
        self.model = model  # a transformers model, or a PeftModel holding LoRA adapters
        self.base = model.get_base_model() if hasattr(model, "get_base_model") else model
        # transformers 5.24 renamed the forward's `past_key_values` to `cache` (the old name goes in 5.40).
        self._cache_kw = "cache" if "cache" in inspect.signature(self.base.forward).parameters else "past_key_values"
        self.served = served or Served()
        if self.served.lora and not hasattr(model, "peft_config"):
            raise ValueError("LoRA adapters are served from a PeftModel; got a plain model")
        self.pad_id = int(pad_id)
        self.eos_ids = {int(i) for i in eos_ids}
        self.stop_ids = {int(i) for i in stop_ids} - self.eos_ids
        self.max_new_tokens = max_new_tokens
        self.clock = clock
        self.device = _input_device(self.base)

    # -- what the scheduler needs ---------------------------------------------------------------------------
    def length(self, item: Request | Sequence[int]) -> int:
        """Prompt positions a row takes in a batch, virtual tokens included."""
        req = _as_request(item)
        return len(req.ids) + self.served.virtual_tokens(req.adapter)

    def generate(self, batch: Sequence[Request | Sequence[int]], max_time: float | None = None) -> list[list[int]]:
        """New token ids per row, in input order, EOS removed (a stop token is kept: it ends the row)."""
        return self.run(batch, max_time).tokens

    def run(self, batch: Sequence[Request | Sequence[int]], max_time: float | None = None) -> BatchOutput:
        """Generate for a batch; raises MemoryError (memory already freed) or FloatingPointError."""
        if not batch:
            return BatchOutput([])
        reqs = [_as_request(r) for r in batch]
        if any(len(r.ids) == 0 for r in reqs):
            raise ValueError("empty prompt in batch")
        unknown = {r.adapter for r in reqs if r.adapter is not None} - self.served.names()
        if unknown:
            raise ValueError(f"adapter(s) not served by this engine: {', '.join(sorted(unknown))}")
        deadline = float("inf") if max_time is None else self.clock() + max_time
        message = None
        try:
            with torch.inference_mode():
                return self._run(reqs, deadline)
        except Exception as exc:
            if not out_of_memory(exc):
                raise
            message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        # Out of the except block: the exception, its traceback and the failed frames (KV cache, activations)
        # are gone now, so the memory they held can really be returned before the caller retries.
        clear_device_cache(garbage_collection=True)
        raise MemoryError(message)

    # -- the loop -------------------------------------------------------------------------------------------
    def _run(self, reqs: list[Request], deadline: float) -> BatchOutput:
        t0 = self.clock()
        n = len(reqs)
        routing = _Routing(self.model if self.served.lora else None)
        try:
            routing.set([self._lora_name(r.adapter) for r in reqs])
            cache = DynamicCache(config=self.base.config)
            prefix_mask = self._seed_prefixes(reqs, cache)
            inputs, mask = self._prefill_inputs(reqs)
            if prefix_mask is not None:
                mask = torch.cat([prefix_mask, mask], dim=1)
            positions = mask.cumsum(-1) - 1
            positions.masked_fill_(mask == 0, 1)  # as generate does; masked columns are never attended
            width = inputs["input_ids" if "input_ids" in inputs else "inputs_embeds"].shape[1]
            logits = self._forward(attention_mask=mask, position_ids=positions[:, -width:],
                                   **{self._cache_kw: cache}, **inputs)
            samplers = [_Sampler(r, self.device) if r.temperature > 0 else None for r in reqs]
            out: list[list[int]] = [[] for _ in range(n)]
            rows = list(range(n))  # batch index -> request index, for the rows still running
            next_ids = self._pick(logits, [samplers[i] for i in rows])
            t1 = self.clock()
            stats = BatchOutput(out, prefill_tokens=n * mask.shape[1], prefill_s=t1 - t0, cut=[False] * n)
            last = positions[:, -1]
            while True:
                keep = []
                for b, tok in enumerate(next_ids):
                    i = rows[b]
                    if tok in self.eos_ids:
                        continue
                    out[i].append(tok)
                    stopped = tok in self.stop_ids and len(out[i]) > 1  # a leading line break is not an answer
                    if not stopped and len(out[i]) < self.max_new_tokens:
                        keep.append(b)
                if not keep:
                    break
                if self.clock() >= deadline:
                    stats.timed_out = True
                    for b in keep:
                        stats.cut[rows[b]] = True  # still running: its answer may be unfinished
                    break
                if len(keep) < len(rows):
                    # Finished rows leave the batch: every later step costs only the rows still running. The
                    # index stays on the CPU: a model spread over GPUs holds each layer's cache on its own device.
                    index = torch.tensor(keep)
                    cache.batch_select_indices(index)
                    mask, last = mask[index.to(mask.device)], last[index.to(last.device)]
                    rows = [rows[b] for b in keep]
                    next_ids = [next_ids[b] for b in keep]
                    routing.set([self._lora_name(reqs[i].adapter) for i in rows])
                mask = torch.cat([mask, mask.new_ones((len(rows), 1))], dim=1)
                last = last + 1
                step = torch.tensor(next_ids, device=self.device).unsqueeze(1)
                logits = self._forward(input_ids=step, attention_mask=mask, position_ids=last.unsqueeze(1),
                                       **{self._cache_kw: cache})
                stats.row_steps += len(rows)
                next_ids = self._pick(logits, [samplers[i] for i in rows])
            stats.decode_s = self.clock() - t1
            return stats
        finally:
            routing.close()

    def _prefill_inputs(self, reqs: list[Request]) -> tuple[dict, torch.Tensor]:
        """Left-padded ids (or embeddings where a row has a soft prompt) and their mask."""
        soft = [self.served.soft_prompts.get(r.adapter) for r in reqs]
        rows = [torch.tensor([self.pad_id] * (0 if s is None else s.shape[0]) + list(r.ids), dtype=torch.long)
                for r, s in zip(reqs, soft)]
        ids = pad_sequence(rows, batch_first=True, padding_value=self.pad_id, padding_side="left").to(self.device)
        mask = pad_sequence([torch.ones(len(x), dtype=torch.long) for x in rows], batch_first=True,
                            padding_value=0, padding_side="left").to(self.device)
        if all(s is None for s in soft):
            return {"input_ids": ids}, mask
        # Through the embedding module, not its weight: Gemma scales embeddings inside it (transformers 5) and
        # training embedded the text the same way; the soft prompt itself was never scaled.
        embeds = self.base.get_input_embeddings()(ids)
        width = ids.shape[1]
        for b, (row, s) in enumerate(zip(rows, soft)):
            if s is not None:
                start = width - len(row)
                embeds[b, start:start + s.shape[0]] = s.to(device=embeds.device, dtype=embeds.dtype)
        return {"inputs_embeds": embeds}, mask

    def _seed_prefixes(self, reqs: list[Request], cache: DynamicCache) -> torch.Tensor | None:
        """Put each row's key/value prefix in the cache (right-aligned); return the prefix region's mask."""
        prefixes = [self.served.prefixes.get(r.adapter) for r in reqs]
        if all(p is None for p in prefixes):
            return None
        lengths = [0 if p is None else p[0][0].shape[-2] for p in prefixes]
        width = max(lengths)
        mask = torch.zeros((len(reqs), width), dtype=torch.long, device=self.device)
        for b, v in enumerate(lengths):
            mask[b, width - v:] = 1
        template = next(p for p in prefixes if p is not None)
        dtype = self.base.get_input_embeddings().weight.dtype  # follows the model if it is upcast later
        for layer, (k0, v0) in enumerate(template):
            # On the layer's own device: a model spread over GPUs keeps each layer's cache where the layer is.
            keys = torch.zeros((len(reqs), k0.shape[1], width, k0.shape[3]), dtype=dtype, device=k0.device)
            values = torch.zeros((len(reqs), v0.shape[1], width, v0.shape[3]), dtype=dtype, device=v0.device)
            for b, p in enumerate(prefixes):
                if p is not None:
                    keys[b, :, width - lengths[b]:] = p[layer][0][0]
                    values[b, :, width - lengths[b]:] = p[layer][1][0]
            cache.update(keys, values, layer)
        return mask

    def _lora_name(self, adapter: str | None) -> str:
        return adapter if adapter in self.served.lora else BASE

    def _forward(self, **kwargs) -> torch.Tensor:
        """Last-position logits of one forward (LoRA rows routed by the hooks ``_Routing`` holds)."""
        return self.base(use_cache=True, logits_to_keep=1, **kwargs).logits[:, -1]

    def _pick(self, logits: torch.Tensor, samplers: list[_Sampler | None]) -> list[int]:
        logits = logits.float()
        best, ids = logits.max(dim=-1)  # max, not argmax: its values show NaN or inf at no extra cost
        if not bool(torch.isfinite(best).all()):
            raise FloatingPointError("non-finite logits: the model overflows in this dtype")
        picked = ids.tolist()
        for b, sampler in enumerate(samplers):
            if sampler is not None:
                picked[b] = sampler.draw(logits[b])
        return picked


class _Routing:
    """peft's mixed-batch LoRA routing (what PeftModel.forward does with adapter_names=) for the rows running.

    Held around the base model's forward, so that our inputs_embeds, positions and cache reach it unchanged,
    and registered again only when the running rows change (not at every decoding step).
    """

    def __init__(self, peft_model) -> None:
        self.model, self.ctx = peft_model, None

    def set(self, names: list[str]) -> None:
        if self.model is None:
            return
        self.close()
        self.ctx = self.model._enable_peft_forward_hooks(adapter_names=names)
        self.ctx.__enter__()

    def close(self) -> None:
        if self.ctx is not None:
            ctx, self.ctx = self.ctx, None
            ctx.__exit__(None, None, None)


class _Sampler:
    """Temperature / nucleus sampling for one row with its own generator (independent of its batch)."""

    def __init__(self, req: Request, device: torch.device) -> None:
        self.temperature, self.top_p = req.temperature, req.top_p
        self.generator = torch.Generator(device=device).manual_seed(req.seed)

    def draw(self, logits: torch.Tensor) -> int:
        probs = torch.softmax(logits / self.temperature, dim=-1)
        if self.top_p < 1.0:
            sorted_p, order = probs.sort(descending=True)
            # Keep the smallest set of tokens whose mass reaches top_p (the first token always stays).
            drop = sorted_p.cumsum(-1) - sorted_p >= self.top_p
            sorted_p[drop] = 0
            probs = torch.zeros_like(probs).scatter(0, order, sorted_p)
        return int(torch.multinomial(probs, 1, generator=self.generator))


def _as_request(item: Request | Sequence[int]) -> Request:
    return item if isinstance(item, Request) else Request(ids=list(item))
