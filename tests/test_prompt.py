"""Recovery prompts: the ids are those of the whole rendered prompt, for a byte-level tokenizer and for a
sentencepiece-style (Metaspace) one; truncation fits and keeps both texts; training labels line up; the
stop tokens are exactly the line breaks."""

from __future__ import annotations

import random

import pytest
from conftest import make_metaspace_tokenizer, make_tokenizer

from prompt_recovery.data import InputError
from prompt_recovery.prompt import PromptBuilder, PromptTooLongError, Template, newline_token_ids, render_text

TOKENIZERS = {"byte-level": make_tokenizer, "metaspace": make_metaspace_tokenizer}
PIECES = ["word", "The", "text", "Rewrite", " ", "  ", "\n", "\n\n", "\t", ".", ",", "!", "?", ":", "'", '"', "(",
          "é", "ß", "Ċirku", "日本語", "🙂", "naïve", "-", "0", "42"]
# Texts that start (and end) the way pieces tokenized one by one get wrong.
EDGES = [" leading space", "  two spaces", "\nnewline first", "\n\nblank line first", ".punctuation first",
         "\"quoted\"", "éaccent first", "🙂 emoji first", "Ċirku Maltese", "trailing space ", "trailing newline\n",
         "x", "日本語のテキスト"]


def texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = list(EDGES)
    while len(out) < n:
        out.append("".join(rng.choice(PIECES) + rng.choice(["", " "]) for _ in range(rng.randint(1, 40))))
    return out


def pairs(n: int = 60) -> list[tuple[str, str]]:
    t = texts(2 * n)
    return list(zip(t[:n], t[n:][::-1]))


@pytest.fixture(scope="module", params=list(TOKENIZERS))
def tok(request):
    return TOKENIZERS[request.param]()


def whole(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("prefix", ["Rewrite this text", ""])
def test_ids_are_the_whole_rendered_prompt_tokenized_at_once(tok, prefix):
    template = Template(answer_prefix=prefix)
    builder = PromptBuilder(tok, template, max_input_tokens=4096)
    for original, rewritten in pairs():
        assert builder.build(original, rewritten) == whole(tok, render_text(template, tok, original, rewritten))


@pytest.mark.parametrize("limit", [72, 112, 160])
def test_truncation_fits_keeps_both_texts_and_is_the_whole_prompt_of_the_cut_texts(tok, limit):
    template = Template()
    builder = PromptBuilder(tok, template, max_input_tokens=limit)
    room = limit - builder.fixed
    long_texts = [t * 6 for t in texts(40, seed=1)]
    for original, rewritten in [*zip(long_texts, long_texts[::-1]), *pairs(30)]:
        a, b, ids = builder.fit(original, rewritten)
        assert ids == builder.build(original, rewritten)
        assert original.startswith(a) and rewritten.startswith(b)  # cut, never changed
        assert ids == whole(tok, render_text(template, tok, a, b))
        assert len(ids) <= limit
        if len(whole(tok, render_text(template, tok, original, rewritten))) <= limit:
            assert (a, b) == (original, rewritten)  # nothing is cut from a prompt that fits
            continue
        # Both texts are kept, each at least the smaller of its length and a quarter of the room
        # (half the room, less what byte-fallback characters and re-merged cut edges cost).
        for full, cut in ((original, a), (rewritten, b)):
            assert len(whole(tok, cut)) >= min(len(whole(tok, full)), room // 4), (full, cut)
        assert len(ids) >= limit - room // 4  # the room is used, not squandered


def test_the_tiny_metaspace_tokenizer_is_one_that_pieces_get_wrong():
    """Guards the property test above: one-by-one pieces differ from the whole text on this tokenizer."""
    tok = make_metaspace_tokenizer()
    head, text = "Original text:\n", "The text."
    assert whole(tok, head) + whole(tok, text) != whole(tok, head + text)
    assert tok.pad_token is None  # like Llama 2's


# The answer after a space, and (as after a chat turn's "model\n") right after a line break, where a
# Metaspace tokenizer writes "Make", while alone it would write "▁Make".
ANSWER_TEMPLATES = [Template(), Template(answer_prefix=""),
                    Template(answer_intro="\n\nInstruction:\n", answer_prefix="")]


@pytest.mark.parametrize("template", ANSWER_TEMPLATES, ids=["prefix", "no prefix", "after a line break"])
def test_training_labels_are_the_answer_as_it_follows_the_prompt(tok, template):
    from prompt_recovery.train import RecoveryDataset

    builder = PromptBuilder(tok, template, max_input_tokens=4096)
    golds = ["Make it formal.", "  Turn this into a poem  ", "Écris-le en français.", "Write it as a pirate!"]
    rows = [(o, r, g) for (o, r), g in zip(pairs(len(golds)), golds)]
    ds = RecoveryDataset(rows, builder, eos_id=tok.eos_token_id)
    for (original, rewritten, gold), item in zip(rows, ds):
        text = render_text(template, tok, original, rewritten) + builder.answer_sep + gold.strip()
        assert item["input_ids"] == whole(tok, text) + [tok.eos_token_id]
        labelled = [t for t, lab in zip(item["input_ids"], item["labels"]) if lab != -100]
        assert tok.decode(labelled[:-1]).strip() == gold.strip() and labelled[-1] == tok.eos_token_id


def test_a_template_too_long_for_the_limit_is_a_bad_option():
    with pytest.raises(PromptTooLongError, match="--max-input-tokens") as exc:
        PromptBuilder(make_tokenizer(), Template(), max_input_tokens=64)
    assert isinstance(exc.value, InputError)


def test_stop_tokens_are_exactly_those_that_write_a_line_break(tok):
    stops = newline_token_ids(tok)
    samples = texts(200, seed=2) + ["a\nb", "a\r\nb", "x\n\n\ny", "Ċirku", "Il-Ċirku Ċentrali", "Ċaw ċaw"]
    for text in samples:
        ids = whole(tok, text)
        breaks = "\n" in text or "\r" in text
        assert any(i in stops for i in ids) == breaks, (text, tok.convert_ids_to_tokens(ids))


def test_the_maltese_letter_is_no_stop_token_where_the_vocabulary_holds_it():
    tok = make_metaspace_tokenizer()
    vocab = tok.get_vocab()
    stops = newline_token_ids(tok)
    letters = [t for t in vocab if "Ċ" in t]
    assert "Ċ" in letters and len(letters) > 1  # the letter alone and in learned pieces ("▁Ċ", ...)
    assert not stops & {vocab[t] for t in letters}
    assert vocab["<0x0A>"] in stops


@pytest.mark.slow
def test_gemma_stop_tokens_are_line_breaks_not_the_letter():
    from transformers import AutoTokenizer

    from prompt_recovery.config import ModelArgs
    from prompt_recovery.model import resolve

    tok = AutoTokenizer.from_pretrained(resolve(ModelArgs())[0], local_files_only=True)
    stops = newline_token_ids(tok)
    vocab = tok.get_vocab()
    assert vocab["Ċ"] not in stops  # a real token of Gemma's vocabulary: the Maltese letter
    assert {vocab["\n"], vocab["\n\n"]} <= stops
    assert all("\n" in tok.decode([i]) or "\r" in tok.decode([i]) for i in stops)
    builder = PromptBuilder(tok, Template(), 256)
    o, r = "The sun rises.", "Golden sun ascends!"
    assert builder.build(o, r) == whole(tok, render_text(Template(), tok, o, r))
