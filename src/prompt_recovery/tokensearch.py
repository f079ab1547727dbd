"""Candidate moves for the mean-prompt search: word edits, and token swaps proposed by the embedder's gradient.

A move source proposes ``n`` (candidate text, description) pairs from the search's current beams; the search
scores every proposal exactly with the real objective and keeps the best, so a source only has to propose
well, never to score. ``WordMoves`` edits words from a word list. ``TokenMoves`` works in the embedder's own
token vocabulary (HotFlip / GCG): the gradient of the objective with respect to each position's token one-hot
ranks every vocabulary token by how much swapping it in would raise the score to first order; a batch of
single swaps drawn from each position's top-k goes to exact scoring. That reaches tokens no word list holds
(the winning teams' " lucrarea" under sentence-t5), at the price of readability.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence

import numpy as np

from .data import InputError
from .postprocess import normalise

Proposal = tuple[str, str]  # (candidate text, how it was made from its parent)


def _mutate(words: list[str], vocab: Sequence[str], rng: random.Random, max_words: int) -> tuple[list[str], str]:
    move = rng.random()
    out = list(words)
    if (move < 0.4 or not out) and len(out) < max_words:
        pos, word = rng.randint(0, len(out)), rng.choice(vocab)
        out.insert(pos, word)
        return out, f"insert {word!r} at {pos}"
    if move < 0.65 and len(out) > 1:
        pos = rng.randrange(len(out))
        return out[:pos] + out[pos + 1:], f"delete {out[pos]!r} at {pos}"
    if out:
        pos, word = rng.randrange(len(out)), rng.choice(vocab)
        old, out[pos] = out[pos], word
        return out, f"replace {old!r} with {word!r} at {pos}"
    return out, "none"


class WordMoves:
    """Insert, delete or replace one word (from ``vocab``) of a random beam."""

    def __init__(self, vocab: Sequence[str], max_words: int = 40) -> None:
        if not vocab:
            raise ValueError("the word vocabulary is empty")
        self.vocab, self.max_words = list(vocab), max_words

    def propose(self, parents: Sequence[str], n: int, rng: random.Random) -> list[Proposal]:
        out = []
        for _ in range(n):
            parent = parents[rng.randrange(len(parents))]
            words, how = _mutate(parent.split(), self.vocab, rng, self.max_words)
            out.append((" ".join(words), f"{how} of {parent!r}"))
        return out


class MixedMoves:
    """Several sources sharing each round's batch in turn (``--vocabulary both``)."""

    def __init__(self, sources: Sequence) -> None:
        self.sources = list(sources)

    def propose(self, parents: Sequence[str], n: int, rng: random.Random) -> list[Proposal]:
        share, extra = divmod(n, len(self.sources))
        out: list[Proposal] = []
        for k, source in enumerate(self.sources):
            out += source.propose(parents, share + (k < extra), rng)
        return out


# Vocabulary entries that are markup rather than text: BERT's [unused0], T5's <extra_id_0>, byte fallbacks.
_MARKUP = re.compile(r"^(\[.*\]|<.*>)$")


class TokenMoves:
    """Single-token swaps (and appends) ranked by the gradient of the mean cubed cosine to ``gold``.

    ``embedder`` is a score.Embedder over a transformer sentence-transformers model (MiniLM, mpnet,
    sentence-t5): the forward runs from input embeddings (one-hot @ word-embedding matrix) through the
    transformer and the model's own pooling, dense and normalisation modules, so the gradient is that of the
    embedding the scorer computes. Each proposal is decoded to text and kept only if re-tokenising the text
    gives back the same ids: a string is what the scorer will read, and a swap that does not survive the round
    trip is not the candidate the gradient ranked.
    """

    def __init__(self, embedder, gold: Sequence[str], top_k: int = 64, max_tokens: int = 40) -> None:
        import torch

        st = getattr(embedder, "model", None)
        transformer = getattr(st[0], "auto_model", None) if st is not None and len(st) else None
        table = transformer.get_input_embeddings() if transformer is not None else None
        if not isinstance(table, torch.nn.Embedding):
            raise InputError(f"--vocabulary embedder needs a transformer sentence-transformers model; "
                             f"{getattr(embedder, 'label', embedder)} has no token embedding table")
        self.torch = torch
        self.tok = st.tokenizer
        self.transformer = transformer.eval()
        self.heads = [st[i] for i in range(1, len(st))]  # pooling, dense, normalize: as the scorer runs them
        self.weight = table.weight.detach()
        self.gold = torch.tensor(np.asarray(embedder.embed(list(gold))), dtype=self.weight.dtype)
        self.top_k = min(top_k, self.weight.shape[0])
        self.max_tokens = max(1, min(max_tokens, int(getattr(embedder, "max_seq_length", 512)) - 2))
        self.allowed = self._text_tokens()
        self.prefix, self.suffix = self._specials()
        # A neutral token in the extra trailing slot: its gradient row ranks what to append.
        self.filler = self.ids(".")[-1:] or [int(np.flatnonzero(self.allowed.numpy())[0])]
        self.rejected = 0  # proposals that did not survive decode and re-tokenisation
        self._top: dict[str, tuple[list[int], list[list[int]]]] = {}

    def _text_tokens(self):
        names = self.tok.convert_ids_to_tokens(list(range(self.weight.shape[0])))
        special = set(self.tok.all_special_ids)
        ok = [i not in special and bool(n) and not _MARKUP.match(n) and n.isprintable() for i, n in enumerate(names)]
        return self.torch.tensor(ok)

    def _specials(self) -> tuple[list[int], list[int]]:
        """The special ids the tokenizer puts before and after a text ([CLS] .. [SEP], <s> .. </s>, .. </s>)."""
        bare = self.ids("a")
        full = list(self.tok("a", add_special_tokens=True)["input_ids"])
        start = next(p for p in range(len(full) - len(bare) + 1) if full[p:p + len(bare)] == bare)
        return full[:start], full[start + len(bare):]

    def ids(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def text(self, ids: Sequence[int]) -> str:
        return normalise(self.tok.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False))

    def embedding(self, ids: Sequence[int], one_hot=None):
        """The scorer's normalised sentence embedding of ``ids``, from one-hot rows when given (for the gradient)."""
        torch = self.torch
        ids = list(ids)
        full, start = self.prefix + ids + self.suffix, len(self.prefix)
        x = self.weight[torch.tensor(full)]
        if one_hot is not None:
            x = torch.cat([x[:start], one_hot @ self.weight, x[start + len(ids):]])
        mask = torch.ones(1, len(full), dtype=torch.long)
        features = {"token_embeddings": self.transformer(inputs_embeds=x[None], attention_mask=mask).last_hidden_state,
                    "attention_mask": mask}
        for head in self.heads:
            features = head(features)
        return torch.nn.functional.normalize(features["sentence_embedding"][0], dim=-1)

    def gradient(self, ids: Sequence[int]):
        """d objective / d one-hot, shape (len(ids) + 1, vocabulary): the last row is the append slot."""
        torch = self.torch
        slots = list(ids) + self.filler
        one_hot = torch.nn.functional.one_hot(torch.tensor(slots), self.weight.shape[0]).to(self.weight.dtype)
        one_hot.requires_grad_()
        cos = self.gold @ self.embedding(slots, one_hot)
        objective = (cos ** 3).mean()  # an odd power keeps the sign, as the metric does
        (grad,) = torch.autograd.grad(objective, one_hot)  # not .backward(): no gradient piles up in the weights
        return grad

    def top_tokens(self, parent: str) -> tuple[list[int], list[list[int]]]:
        """(the parent's ids, the top-k token ids per slot); cached, a beam is proposed from many rounds."""
        if parent not in self._top:
            ids = self.ids(parent)[: self.max_tokens]
            grad = self.gradient(ids)
            grad[:, ~self.allowed] = -float("inf")
            for pos, tok in enumerate(ids):
                grad[pos, tok] = -float("inf")  # swapping a token for itself is no move
            top = grad.topk(self.top_k, dim=1).indices.tolist()
            if len(ids) >= self.max_tokens:
                top = top[:-1]  # no room to append
            self._top[parent] = (ids, top)
        return self._top[parent]

    def propose(self, parents: Sequence[str], n: int, rng: random.Random) -> list[Proposal]:
        out = []
        for _ in range(n):
            parent = parents[rng.randrange(len(parents))]
            ids, top = self.top_tokens(parent)
            if not top:
                continue
            pos = rng.randrange(len(top))
            tok = top[pos][rng.randrange(len(top[pos]))]
            new = ids[:pos] + [tok] + ids[pos + 1:]
            text = self.text(new)
            if self.ids(text) != new:
                self.rejected += 1
                continue
            piece = self.tok.convert_ids_to_tokens(tok)
            how = f"append token {piece!r}" if pos == len(ids) else f"swap token {pos} for {piece!r}"
            out.append((text, f"{how} of {parent!r}"))
        return out
