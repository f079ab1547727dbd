"""Batched greedy generation: token ids in, token ids out, in input order. Knows nothing of CSVs.

Rows are left-padded so every row's last prompt token sits at the same position and generation starts
together. A batch stops when every row has produced EOS or a stop token (a newline: the answer is one
line), after ``max_new_tokens``, or when its time bound runs out. Out-of-memory errors come out as
``MemoryError`` with the allocator's cache freed, so the scheduler can split the batch without torch.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence

import torch
from transformers import StoppingCriteria, StoppingCriteriaList


class _StopAfter(StoppingCriteria):
    """Per row: done once a stop token was generated after at least one other token."""

    def __init__(self, prompt_len: int, stop_ids: set[int]) -> None:
        self.prompt_len = prompt_len
        self.stop = torch.tensor(sorted(stop_ids), dtype=torch.long) if stop_ids else None

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        new = input_ids[:, self.prompt_len:]
        if self.stop is None or new.shape[1] < 2:
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        hit = torch.isin(new[:, 1:], self.stop.to(new.device))
        return hit.any(dim=1)


class _Deadline(StoppingCriteria):
    """Stops the whole batch at a monotonic-clock deadline (checked between decoding steps)."""

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        done = time.monotonic() >= self.deadline
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def free_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def newline_token_ids(tokenizer) -> set[int]:
    """Ids of every vocabulary token that contains a line break (byte-level, sentencepiece or plain)."""
    ids = set()
    for tok, i in tokenizer.get_vocab().items():
        if "\n" in tok or "Ċ" in tok or tok == "<0x0A>":
            ids.add(i)
    return ids


class Engine:
    """Greedy generation on a causal LM (plain or PeftModel) for batches of token-id lists."""

    def __init__(self, model, pad_id: int, eos_ids: Iterable[int], max_new_tokens: int,
                 stop_ids: Iterable[int] = ()) -> None:
        self.model = model
        self.pad_id = int(pad_id)
        self.eos_ids = sorted({int(i) for i in eos_ids})
        self._eos_set = set(self.eos_ids)
        self.max_new_tokens = max_new_tokens
        self.stop_ids = {int(i) for i in stop_ids} - set(self.eos_ids)
        self.device = _input_device(model)

    def _pad(self, batch: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(x) for x in batch)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for n, row in enumerate(batch):
            if row:
                ids[n, width - len(row):] = torch.tensor(row, dtype=torch.long)
                mask[n, width - len(row):] = 1
        return ids.to(self.device), mask.to(self.device)

    def generate(self, batch: Sequence[Sequence[int]], max_time: float | None = None) -> list[list[int]]:
        """New token ids per row, in input order, EOS and anything after it removed."""
        if not batch:
            return []
        if any(len(row) == 0 for row in batch):
            raise ValueError("empty prompt in batch")
        ids, mask = self._pad(batch)
        criteria = StoppingCriteriaList([_StopAfter(ids.shape[1], self.stop_ids)])
        if max_time is not None:
            criteria.append(_Deadline(time.monotonic() + max_time))
        try:
            with torch.inference_mode():
                out = self.model.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    max_new_tokens=self.max_new_tokens,
                    do_sample=False,
                    temperature=None,
                    top_p=None,
                    top_k=None,
                    num_beams=1,
                    pad_token_id=self.pad_id,
                    eos_token_id=self.eos_ids or None,
                    stopping_criteria=criteria,
                )
        except Exception as exc:
            if is_oom(exc):
                del ids, mask
                free_memory()
                raise MemoryError(str(exc).splitlines()[0] if str(exc) else "out of memory") from exc
            raise
        new = out[:, ids.shape[1]:].tolist()
        return [self._cut(row) for row in new]

    def _cut(self, row: list[int]) -> list[int]:
        for n, tok in enumerate(row):
            if tok in self._eos_set:
                return row[:n]
        # Trailing pad after a stop criterion finished this row early.
        while row and row[-1] == self.pad_id:
            row = row[:-1]
        return row


def _input_device(model) -> torch.device:
    try:
        return model.get_input_embeddings().weight.device
    except (AttributeError, NotImplementedError):
        return next(model.parameters()).device
