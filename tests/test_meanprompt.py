"""Mean-prompt search with several embedders, held-out prompts, accepted moves and fluency guards."""

from __future__ import annotations

import json
import re
from functools import partial

import numpy as np
import pytest
from conftest import StubEmbedder as BagOfWords

from prompt_recovery import score
from prompt_recovery.cli import main
from prompt_recovery.config import OptimizeArgs
from prompt_recovery.data import InputError
from prompt_recovery.meanprompt import (
    Combined,
    MeanObjective,
    Perplexity,
    Problem,
    SearchConfig,
    SuffixObjective,
    function_word_guard,
    optimize,
    search,
    split_holdout,
)

VOCAB = ["make", "it", "formal", "please", "improve", "the", "text", "to", "this", "poem", "a", "rewrite", "as"]


StubEmbedder = partial(BagOfWords, VOCAB)  # the shared stub over this file's vocabulary


def test_combined_mean_worst_and_relative_scaling():
    def big(c):
        return np.array([0.4 + 0.1 * len(t) for t in c])

    def small(c):
        return np.array([0.01 * len(t) for t in c])

    cands = ["ab", "abcd"]
    raw = np.stack([big(cands), small(cands)])
    assert np.allclose(Combined([big, small]).per_embedder(cands), raw)
    assert np.allclose(Combined([big, small])(cands), raw.mean(axis=0))
    assert np.allclose(Combined([big, small], "worst")(cands), raw.min(axis=0))
    # Relative to a reference: each embedder's score over its own score of the reference, then combined.
    ref = np.array([big(["abc"])[0], small(["abc"])[0]])
    rel = Combined([big, small], "mean", reference="abc")
    assert np.allclose(rel(cands), (raw / ref[:, None]).mean(axis=0))
    assert rel(["abc"])[0] == pytest.approx(1.0)
    assert np.allclose(Combined([big, small], "worst", "abc")(cands), (raw / ref[:, None]).min(axis=0))


def test_two_embedders_score_a_candidate_by_the_mean_of_their_own_metrics():
    gold = ["make it formal", "rewrite this as a poem"]
    a, b = StubEmbedder(name="a"), StubEmbedder(weights=np.linspace(0.2, 3, len(VOCAB)), name="b")
    combined = Combined([MeanObjective(a, gold), MeanObjective(b, gold)])
    cand = "make this a poem"
    each = [float(score.score_pairs(e, [cand] * 2, gold).mean()) for e in (a, b)]
    assert each[0] != pytest.approx(each[1])
    assert combined([cand])[0] == pytest.approx(np.mean(each))


def test_shared_cache_embeds_each_candidate_once_per_embedder():
    e = StubEmbedder()
    cache: dict = {}
    train, held = MeanObjective(e, ["make it formal"], cache), MeanObjective(e, ["a poem"], cache)
    e.calls = 0
    train(["make it", "a poem"])
    held(["make it", "a poem"])
    assert e.calls == 2


def test_held_out_prompts_pick_the_result_and_stop_the_search():
    # Training prompts pull towards "formal"; the held-out ones want a poem, which one start already is.
    train_gold, held_gold = ["make it formal"] * 3, ["rewrite this as a poem"] * 2
    e = StubEmbedder()
    objective, holdout = MeanObjective(e, train_gold), MeanObjective(e, held_gold)
    starts = ["improve the text to this", "rewrite this as a poem please"]
    r = search(Problem(objective, starts, holdout), VOCAB, SearchConfig(rounds=60, per_round=32, patience=5, seed=1))
    best_start_held = max(float(holdout([s])[0]) for s in starts)
    assert r.heldout == pytest.approx(float(holdout([r.best])[0]))
    assert r.heldout >= best_start_held - 1e-12
    assert r.stopped == "held-out patience" and r.rounds < 60
    # The beams did climb on the training prompts meanwhile: stopping was the held-out side's doing.
    assert r.history[-1] > r.history[0]
    # Held-out patience counts rounds since the last held-out gain, not since the last training gain.
    gains = [k for k in range(1, len(r.heldout_history)) if r.heldout_history[k] > r.heldout_history[k - 1]]
    assert r.rounds - (gains[-1] if gains else 0) == 5


def test_result_is_the_best_held_out_string_among_starts_and_beams():
    train_gold, held_gold = ["make it formal please"], ["make it formal", "make it a poem"]
    e = StubEmbedder()
    objective, holdout = MeanObjective(e, train_gold), MeanObjective(e, held_gold)
    r = search(Problem(objective, ["improve the text to this"], holdout), VOCAB,
               SearchConfig(rounds=30, per_round=32, patience=30, seed=2))
    seen = [r.start, *(m.text for m in r.moves)]
    assert len(seen) > 3
    assert r.heldout == pytest.approx(float(holdout([r.best])[0]))
    assert r.heldout >= max(float(holdout([t])[0]) for t in seen) - 1e-12


def test_accepted_moves_are_reported_with_true_scores():
    e = StubEmbedder()
    objective, holdout = MeanObjective(e, ["make it formal"] * 2), MeanObjective(e, ["make it a poem"])
    r = search(Problem(objective, ["improve the text to this"], holdout), VOCAB,
               SearchConfig(rounds=25, per_round=32, patience=25, seed=0))
    assert r.moves[0].move == "start" and len(r.moves) > 2
    trains = [m.train for m in r.moves]
    assert all(b > a for a, b in zip(trains, trains[1:]))  # each accepted move raised the training score
    for m in r.moves:
        assert m.train == pytest.approx(float(objective([m.text])[0]))
        assert m.heldout == pytest.approx(float(holdout([m.text])[0]))
        assert m.move == "start" or re.match(r"(insert|delete|replace) ", m.move)


def test_fluency_guard_keeps_rejected_candidates_out_of_the_beams():
    e = StubEmbedder()
    objective = MeanObjective(e, ["make it formal formal"])
    r = search(Problem(objective, ["improve the text"], accept=lambda c: ["formal" not in t for t in c]), VOCAB,
               SearchConfig(rounds=30, per_round=32, patience=30))
    assert r.rejected > 0
    assert all("formal" not in m.text for m in r.moves) and "formal" not in r.best


@pytest.mark.parametrize("text, ok", [
    ("Make this as and rewritten more formal.", False),
    ("Rewrite this poem as and story formally.", False),  # two joining words in a row
    ("Rewrite this text in a more formal tone.", True),
    ("Make this more formal.", True),
    ("Rewrite this as a poem. Keep it short.", True),
    ("Rewrite this help. a new tone.", False),  # a sentence ends and the next starts in lower case
    ("Rewrite this text text.", False),
    ("Rewrite this text in a", False),
    ("this is it and the of a to", False),  # mostly function words
])
def test_function_word_guard(text, ok):
    assert function_word_guard(0.5)([text]) == [ok]


def test_holdout_split_keeps_each_prompt_text_on_one_side():
    prompts = ["a", "b", "a", "c", "d", "b", "e", "f", "g", "h"]
    tr, he = split_holdout(prompts, 0.25, seed=3)
    assert sorted(tr + he) == list(range(len(prompts)))
    assert not {prompts[i] for i in tr} & {prompts[i] for i in he}
    assert len({prompts[i] for i in he}) == 2  # a quarter of 8 distinct prompts
    assert split_holdout(prompts, 0.25, seed=3) == (tr, he)


def test_perplexity_is_the_texts_own_tokens_after_the_context_whatever_the_batch():
    import torch
    from conftest import make_model, make_tokenizer

    tok = make_tokenizer()
    model = make_model(tok)
    ppl = Perplexity(model, tok, batch_size=3, context="Make it formal.\n- ")
    texts = ["Turn this into a poem.", "Hello world!", "Write it as a pirate. Summarise the text in one line."]
    got = ppl(texts)
    ctx = tok("Make it formal.\n- ", add_special_tokens=True)["input_ids"]
    for t, g in zip(texts, got):
        ids = tok(t, add_special_tokens=False)["input_ids"]
        x = torch.tensor([ctx + ids])
        labels = torch.tensor([[-100] * len(ctx) + ids])
        with torch.no_grad():
            want = float(torch.exp(model(input_ids=x, labels=labels).loss))
        assert g == pytest.approx(want, rel=1e-4)


def _args(tmp_path, **kw):
    return OptimizeArgs(prompts_csv=kw.pop("prompts_csv"), output=str(tmp_path / "out.txt"), progress=False,
                        rounds=kw.pop("rounds", 15), candidates_per_round=kw.pop("candidates_per_round", 32), **kw)


def _prompts(path, rows):
    path.write_text("id,rewrite_prompt\n" + "".join(f"{i},{p}\n" for i, p in rows))
    return str(path)


def test_optimize_with_val_writes_the_best_held_out_string_never_below_the_best_start(tmp_path):
    train = _prompts(tmp_path / "t.csv", [(i, "make it formal") for i in range(4)] + [(9, "improve the text")])
    val = _prompts(tmp_path / "v.csv", [(1, "rewrite this as a poem"), (2, "make it a poem")])
    embedders = [StubEmbedder(name="a"), StubEmbedder(weights=np.linspace(0.5, 2, len(VOCAB)), name="b")]
    report = optimize(_args(tmp_path, prompts_csv=train, val=val, patience=4, folds=0), embedders)
    written = (tmp_path / "out.txt").read_text().strip()
    assert written == report["best"]
    held = Combined([MeanObjective(e, ["rewrite this as a poem", "make it a poem"]) for e in embedders], "mean",
                    "Improve the text to this.")
    assert report["heldout"] == pytest.approx(float(held([written])[0]))
    assert report["heldout"] >= report["start_heldout"] - 1e-12
    assert report["scores"]["best start"]["heldout"]["combined"] == pytest.approx(report["start_heldout"])
    assert report["heldout_prompts"] == 2 and report["train_prompts"] == 5
    assert [m["round"] for m in report["moves"]][0] == 0


def test_optimize_worst_objective_follows_the_weaker_embedder(tmp_path):
    train = _prompts(tmp_path / "t.csv", [(1, "make it formal"), (2, "rewrite this as a poem"), (3, "make a poem")])
    embedders = [StubEmbedder(name="a"), StubEmbedder(weights=np.linspace(3, 0.1, len(VOCAB)), name="b")]
    report = optimize(_args(tmp_path, prompts_csv=train, holdout=0, objective="worst", relative=False), embedders)
    per = report["scores"]["result"]["train"]["per_embedder"]
    assert report["score"] == pytest.approx(min(per))


def test_suffix_search_holds_rows_out(tmp_path):
    gold = _prompts(tmp_path / "g.csv", list(enumerate(["make it formal", "make it formal please", "make this formal",
                                                        "make the text formal", "rewrite it formal", "formal"])))
    preds = _prompts(tmp_path / "p.csv", [(i, "make it") for i in range(6)])
    report = optimize(_args(tmp_path, prompts_csv=gold, predictions=preds, holdout=0.5, folds=0), [StubEmbedder()])
    assert report["mode"] == "suffix" and report["train_rows"] + report["heldout_rows"] == 6
    assert "formal" in report["best"].split()
    assert report["heldout"] > report["scores"]["no suffix"]["heldout"]["combined"]
    # A start given on the command line is among the starts: here the best of them on the held-out rows.
    args = _args(tmp_path, prompts_csv=gold, predictions=preds, holdout=0.5, start=["formal"], rounds=1,
                 candidates_per_round=1)
    assert optimize(args, [StubEmbedder()])["start"] == "formal"
    # ... and so is a line of --start-file (blank lines skipped); a file that cannot be read is an input error.
    (tmp_path / "starts.txt").write_text("make it\n\nformal\n")
    args = _args(tmp_path, prompts_csv=gold, predictions=preds, holdout=0.5, start_file=str(tmp_path / "starts.txt"),
                 rounds=1, candidates_per_round=1)
    assert optimize(args, [StubEmbedder()])["start"] == "formal"
    with pytest.raises(InputError, match="start file"):
        optimize(_args(tmp_path, prompts_csv=gold, start_file=str(tmp_path / "nope.txt")), [StubEmbedder()])


def test_cli_takes_embedder_twice_and_prints_labelled_moves(tmp_path, monkeypatch, capsys):
    made = []

    def fake_embedder(path=None, *a, **k):
        made.append(path)
        return StubEmbedder(name=f"stub-{path}")

    monkeypatch.setattr(score, "Embedder", fake_embedder)
    train = _prompts(tmp_path / "t.csv", [(i, p) for i, p in enumerate(
        ["make it formal", "rewrite this as a poem", "make a poem", "improve the text", "make it a poem please"])])
    code = main(["optimize-prompt", train, "-o", str(tmp_path / "o.txt"), "--embedder", "x", "--embedder",
                 "packaged", "--rounds", "5", "--holdout", "0.4", "--no-progress", "--report",
                 str(tmp_path / "r.json"), "--fluency", "function-words"])
    assert code == 0 and made == ["x", "packaged"]
    err = capsys.readouterr().err
    assert "stand-in embedder stub-x" in err and "stand-in embedder stub-packaged" in err
    assert re.search(r"r0: [0-9.]+ / [0-9.]+: '.+' <- start", err)
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["fluency"]["guards"] == ["function-words"] and report["heldout_prompts"] == 2


def test_bad_options_are_one_line_errors(tmp_path, capsys):
    train = _prompts(tmp_path / "t.csv", [(1, "make it formal")])
    assert main(["optimize-prompt", train, "--holdout=-0.1"]) == 2
    assert main(["optimize-prompt", train, "--holdout", "0.5", "--embedder", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "holdout" in err[0] and "not found" in err[1]


def test_a_word_vector_embedder_folder_loads_and_counts_its_tokens(tmp_path):
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, WordEmbeddings
    from sentence_transformers.sentence_transformer.modules.tokenizer import WhitespaceTokenizer

    vocab = ["PADDING_TOKEN", "make", "formal", "poem", "rewrite"]
    weights = np.random.default_rng(0).normal(size=(len(vocab), 4)).astype(np.float32)
    emb = WordEmbeddings(WhitespaceTokenizer(vocab, do_lower_case=True), weights)
    SentenceTransformer(modules=[emb, Pooling(4, pooling_mode="mean")], device="cpu").save(str(tmp_path / "wv"))
    e = score.Embedder(str(tmp_path / "wv"))
    assert e.label == "stand-in embedder wv, not sentence-t5-base"
    assert e.token_count(["Make this formal.", "rewrite the poem"]) == [2, 2]  # stop words and unknowns dropped
    s = score.score_pairs(e, ["make formal"], ["formal make"])
    assert s[0] == pytest.approx(1.0)


def test_suffix_objective_matches_scoring_each_joined_row():
    e = StubEmbedder()
    preds, gold = ["make it", "rewrite this"], ["make it formal", "rewrite this as a poem"]
    obj = SuffixObjective(e, preds, gold)
    for k, suffix in enumerate(["a poem", "formal", ""]):
        want = float(score.score_pairs(e, [f"{p} {suffix}".strip() for p in preds], gold).mean())
        assert obj(["a poem", "formal", ""])[k] == pytest.approx(want)


def test_fluency_guards_combine_and_a_candidate_must_pass_all(tmp_path, monkeypatch):
    from conftest import make_model, make_tokenizer

    from prompt_recovery import meanprompt, model
    from prompt_recovery.model import Loaded

    tok = make_tokenizer()
    monkeypatch.setattr(model, "load", lambda args: Loaded(make_model(tok), tok, {"name": "tiny"}))
    texts = ["Make this as and rewritten more formal.", "Rewrite this text in a more formal tone."]
    for ceiling, want in [(1e9, [False, True]), (1.0001, [False, False])]:
        args = OptimizeArgs(prompts_csv="x", fluency=["function-words", "perplexity"], max_perplexity=ceiling)
        report: dict = {}
        accept = meanprompt._fluency_guard(args, ["Make it formal."], report)
        assert accept(texts) == want
        assert report["fluency"]["guards"] == ["function-words", "perplexity"]
    assert OptimizeArgs(prompts_csv="x", fluency=["none"]).fluency == []


# --- choosing the result by cross-validation ------------------------------------------------------------------------

def test_evidence_rejects_a_gain_from_two_prompts_and_samples_prompts_not_rows():
    from prompt_recovery.meanprompt import GateConfig, evidence

    cfg = GateConfig(drop_top=2)
    keys = [f"p{k}" for k in range(10)]
    two = evidence(np.array([1.0, 1.0] + [-0.05] * 8), keys, cfg)
    assert two["gain"] == pytest.approx(0.16) and two["without_top"] == pytest.approx(-0.05)
    broad = evidence(np.full(10, 0.1) + np.linspace(-0.02, 0.02, 10), keys, cfg)
    assert broad["lower"] > 0 and broad["without_top"] > 0
    # One prompt over five rows is one prompt: dropping the top two prompts drops all five of its rows.
    skewed = evidence(np.array([0.5] * 5 + [-0.01] * 5), ["a"] * 5 + [f"q{k}" for k in range(5)], cfg)
    assert skewed["gain"] > 0 and skewed["without_top"] == pytest.approx(-0.01)


def test_trimmed_objective_leaves_out_the_best_prompts_with_all_their_rows():
    e = StubEmbedder()
    gold = ["make it a poem"] * 3 + ["make it formal", "improve the text", "rewrite this as a poem"]
    plain, trimmed = MeanObjective(e, gold), MeanObjective(e, gold, trim=1)
    per = plain.per_prompt(["make it a poem"])[0]
    assert trimmed(["make it a poem"])[0] == pytest.approx(per[3:].mean())  # the three copies go together
    assert plain(["make it a poem"])[0] == pytest.approx(per.mean())


SKEWED_VOCAB = [*VOCAB, "convert", "into", "haiku", "story", "letter", "song", "friendly", "shorter", "plain"]


def _skewed(tmp_path):
    # A small set where one prompt fills a sixth of the rows (the haiku of the issue) and the rest vary.
    rows = ["convert this into a haiku"] * 4 + [f"rewrite the text as a {f}" for f in ("poem", "story", "letter")]
    rows += [f"make the text {w} {f}" for w in ("formal", "friendly", "shorter", "plain") for f in ("song", "story")]
    rows += [f"improve the {f} to be {w}" for w in ("formal", "friendly", "shorter") for f in ("song", "story")]
    return _prompts(tmp_path / "s.csv", list(enumerate(rows)))


def test_small_skewed_set_falls_back_to_the_baseline_when_the_search_does_not_hold(tmp_path, monkeypatch):
    from prompt_recovery import meanprompt

    def copies_the_haiku(problem, moves, config=None, **_):
        # A search that overfits as the held-out pick did: it returns a training prompt that fills many rows.
        best = "convert this into a haiku"
        score = float(problem.objective([best])[0])
        return meanprompt.SearchResult(best, score, best, score, 1, 1, 0.0)

    monkeypatch.setattr(meanprompt, "search", copies_the_haiku)
    report = optimize(_args(tmp_path, prompts_csv=_skewed(tmp_path)), [BagOfWords(SKEWED_VOCAB)])
    assert report["search_best"] == "convert this into a haiku"
    assert report["best"] == "Improve the text to this." == (tmp_path / "out.txt").read_text().strip()
    sel = report["selection"]
    assert sel["adopted"] is False and sel["folds"] == 5 and sel["prompts"] == 18
    assert "too weak" in sel["reason"] and sel["evidence"][0]["without_top"] < 0


def test_small_skewed_set_with_the_real_search_is_never_below_the_baseline_elsewhere(tmp_path):
    other = ["rewrite the text as a song", "make the text plain poem", "improve the letter to be plain",
             "make the text friendly letter", "rewrite the text as a poem please"]
    e = BagOfWords(SKEWED_VOCAB)
    report = optimize(_args(tmp_path, prompts_csv=_skewed(tmp_path)), [e])
    held = MeanObjective(e, other)
    assert held([report["best"]])[0] >= held(["Improve the text to this."])[0] - 1e-12


def test_a_result_that_wins_on_every_prompt_is_adopted_and_reported(tmp_path, capsys):
    rows = [f"make it formal {w}" for w in ("please", "poem", "text", "this", "a", "to", "the", "as")]
    path = _prompts(tmp_path / "f.csv", list(enumerate(rows)))
    args = _args(tmp_path, prompts_csv=path, rounds=10, report=str(tmp_path / "r.json"))
    report = optimize(args, [StubEmbedder()])
    assert report["selection"]["adopted"] is True and report["best"] == report["search_best"]
    assert {"make", "formal"} <= set(report["best"].split())
    ev = report["selection"]["evidence"][0]
    assert ev["gain"] > 0.02 and ev["lower"] > 0 and ev["without_top"] > 0
    assert len(report["selection"]["fold_results"]) == 5


def test_too_few_prompts_to_cross_validate_write_the_baseline(tmp_path):
    path = _prompts(tmp_path / "t.csv", [(1, "make it formal"), (2, "make it formal please"), (3, "make formal")])
    report = optimize(_args(tmp_path, prompts_csv=path), [StubEmbedder()])
    assert report["best"] == "Improve the text to this." and "too few" in report["selection"]["reason"]


def test_cli_says_why_the_result_was_written(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(score, "Embedder", lambda path=None, *a, **k: StubEmbedder(name="s"))
    path = _prompts(tmp_path / "t.csv", [(1, "make it formal"), (2, "a poem"), (3, "make formal")])
    assert main(["optimize-prompt", path, "-o", str(tmp_path / "o.txt"), "--rounds", "2", "--no-progress"]) == 0
    assert re.search(r"written: the baseline 'Improve the text to this.'; 5-fold cross-validation over 3 prompts: "
                     r"3 distinct prompts are too few", capsys.readouterr().err)
    assert main(["optimize-prompt", path, "--folds", "1"]) == 2
    assert main(["optimize-prompt", path, "--vocabulary", "embedder", "--predictions", path]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "folds" in err[0] and "suffix" in err[1]


# --- token moves under the embedder's gradient ----------------------------------------------------------------------

TINY_WORDS = ["make", "it", "formal", "poem", "rewrite", "this", "as", "a", "text", "the", "improve", "to", "song",
              "story", ".", "##s", "##ly"]


@pytest.fixture(scope="module")
def tiny_embedder(tmp_path_factory):
    """A tiny BertModel sentence-transformer (mean pooling, normalised), saved and loaded like a real one."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
    from transformers import BertConfig, BertModel, BertTokenizerFast

    root = tmp_path_factory.mktemp("tiny")
    (root / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *TINY_WORDS]) + "\n")
    BertTokenizerFast(str(root / "vocab.txt")).save_pretrained(str(root / "bert"))
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(TINY_WORDS) + 5, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=64)
    BertModel(cfg).save_pretrained(str(root / "bert"))
    st = SentenceTransformer(modules=[Transformer(str(root / "bert")), Pooling(16, pooling_mode="mean"), Normalize()],
                             device="cpu")
    st.save(str(root / "st"))
    return score.Embedder(str(root / "st"))


def test_token_moves_embed_as_the_scorer_does_and_their_gradient_is_the_objective_s(tiny_embedder):
    import torch

    from prompt_recovery.tokensearch import TokenMoves

    gold = ["make it formal", "rewrite this as a poem", "make it a song"]
    moves = TokenMoves(tiny_embedder, gold, top_k=4)
    ids = moves.ids("improve the text")
    want = tiny_embedder.embed(["improve the text"])[0]
    assert float(moves.embedding(ids).detach() @ torch.tensor(want)) == pytest.approx(1.0, abs=1e-5)
    slots = ids + moves.filler
    grad = moves.gradient(ids)
    base = torch.nn.functional.one_hot(torch.tensor(slots), moves.weight.shape[0]).double()
    gold_emb = moves.gold.double()

    def objective(one_hot):
        cos = gold_emb @ moves.embedding(slots, one_hot.to(moves.weight.dtype)).double()
        return float((cos ** 3).mean())

    # The one-hot gradient predicts the change of moving weight from the current token to another (first order).
    for pos, tok in [(0, 9), (2, 18), (len(ids), 7)]:
        step = torch.zeros_like(base)
        step[pos, slots[pos]], step[pos, tok] = -1.0, 1.0
        eps = 1e-3
        numeric = (objective(base + eps * step) - objective(base - eps * step)) / (2 * eps)
        assert float(grad[pos, tok] - grad[pos, slots[pos]]) == pytest.approx(numeric, rel=0.05, abs=1e-6)


def test_token_proposals_round_trip_skip_special_tokens_and_follow_the_gradient(tiny_embedder):
    import random

    from prompt_recovery.tokensearch import TokenMoves

    moves = TokenMoves(tiny_embedder, ["make it formal", "make it a poem"], top_k=3)
    special = set(moves.tok.all_special_ids)
    ids, top = moves.top_tokens("improve the text")
    assert len(top) == len(ids) + 1  # every position, and the append slot
    grad = moves.gradient(ids)
    for pos, row in enumerate(top):
        assert not special & set(row) and (pos == len(ids) or ids[pos] not in row)
        allowed = [t for t in range(grad.shape[1]) if t not in special and (pos == len(ids) or t != ids[pos])]
        best = sorted(allowed, key=lambda t: -float(grad[pos, t]))[:3]
        assert set(row) == set(best)
    proposals = moves.propose(["improve the text"], 40, random.Random(0))
    assert proposals
    for text, how in proposals:
        assert moves.text(moves.ids(text)) == text and re.match(r"(swap token \d+ for|append token) ", how)


def test_vocabulary_embedder_search_climbs_and_cross_validates(tmp_path, tiny_embedder):
    rows = [f"make it formal {w}" for w in ("poem", "text", "story", "song", "this", "a")]
    path = _prompts(tmp_path / "t.csv", list(enumerate(rows)))
    report = optimize(_args(tmp_path, prompts_csv=path, vocabulary="embedder", top_k=8, rounds=6, folds=2),
                      [tiny_embedder])
    assert report["vocabulary"] == "embedder" and report["search_score"] >= report["start_score"]
    assert any(m["move"].startswith(("swap token", "append token")) for m in report["moves"][1:])
    assert report["selection"]["folds"] == 2 and len(report["selection"]["fold_results"]) == 2
    with pytest.raises(InputError, match="token embedding table"):
        optimize(_args(tmp_path, prompts_csv=path, vocabulary="embedder"), [StubEmbedder()])
