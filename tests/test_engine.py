"""The engine on a tiny in-process Llama: batched greedy equals one-row-at-a-time greedy."""

from __future__ import annotations

import pytest
import torch
from conftest import make_model, make_tokenizer

from prompt_recovery.engine import Engine, newline_token_ids
from prompt_recovery.prompt import PromptBuilder, Template


@pytest.fixture(scope="module")
def tok_model():
    tok = make_tokenizer()
    return tok, make_model(tok)


def prompts(tok):
    texts = ["Hello world", "The quick brown fox jumps over the lazy dog again and again", "Make it formal.",
             "Rewrite this text as a pirate would say it, with many words to make it long enough"]
    return [tok(t)["input_ids"] for t in texts]


def test_batched_and_unbatched_greedy_give_the_same_ids(tok_model):
    tok, model = tok_model
    engine = Engine(model, tok.pad_token_id, [tok.eos_token_id], max_new_tokens=12)
    batch = prompts(tok)
    together = engine.generate(batch)
    alone = [engine.generate([p])[0] for p in batch]
    assert together == alone
    assert all(len(r) > 0 for r in together)


def test_outputs_come_back_in_input_order(tok_model):
    tok, model = tok_model
    engine = Engine(model, tok.pad_token_id, [tok.eos_token_id], max_new_tokens=6)
    batch = prompts(tok)
    forward = engine.generate(batch)
    backward = engine.generate(batch[::-1])
    assert backward == forward[::-1]


def test_stop_token_ends_a_row_and_is_cut(tok_model):
    tok, model = tok_model
    first = Engine(model, tok.pad_token_id, [tok.eos_token_id], max_new_tokens=10).generate(prompts(tok)[:1])[0]
    # Declare the third generated token a stop token: the row ends there, as it would on a newline.
    stopper = Engine(model, tok.pad_token_id, [tok.eos_token_id], max_new_tokens=10, stop_ids=[first[2]])
    out = stopper.generate(prompts(tok)[:1])[0]
    assert out[: 3] == first[: 3] and len(out) <= len(first)
    assert len(out) < 10 or first[2] in first[:2]


def test_eos_is_removed(tok_model):
    tok, model = tok_model
    first = Engine(model, tok.pad_token_id, [tok.eos_token_id], max_new_tokens=8).generate(prompts(tok)[:1])[0]
    as_eos = Engine(model, tok.pad_token_id, [first[1]], max_new_tokens=8).generate(prompts(tok)[:1])[0]
    assert as_eos == first[: first.index(first[1])]


def test_time_bound_stops_generation(tok_model):
    tok, model = tok_model
    engine = Engine(model, tok.pad_token_id, [], max_new_tokens=200)
    out = engine.generate(prompts(tok)[:2], max_time=0.0)
    assert all(len(r) <= 2 for r in out)


def test_out_of_memory_becomes_memory_error(tok_model):
    _tok, _model = tok_model

    class Exploding(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(4, 2)

        def get_input_embeddings(self):
            return self.emb

        def generate(self, **kw):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    with pytest.raises(MemoryError):
        Engine(Exploding(), 0, [1], 4).generate([[1, 2]])


def test_newline_tokens_found_in_byte_level_vocab():
    tok = make_tokenizer()
    ids = newline_token_ids(tok)
    assert ids and all("\n" in tok.decode([i]) for i in ids)


def test_prompt_truncation_fits_and_keeps_both_texts():
    tok = make_tokenizer()
    builder = PromptBuilder(tok, Template(), max_input_tokens=200)
    long = "word " * 5000
    ids = builder.build(long, "short rewrite")
    assert len(ids) <= 200
    assert "short rewrite" in tok.decode(ids)
    ids2 = builder.build(long, long)
    assert len(ids2) <= 200
    text = tok.decode(ids2)
    assert text.count("word") > 10 and "Rewritten text:" in text
    assert text.endswith("Instruction: Rewrite this text")


def test_prompt_without_texts_room_is_refused():
    with pytest.raises(ValueError, match="no room"):
        PromptBuilder(make_tokenizer(), Template(), max_input_tokens=64)
