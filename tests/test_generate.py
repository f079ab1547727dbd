"""generate-data: pairs, judging, resume, deadline, inputs; whole runs on a tiny Llama into tmp_path."""

from __future__ import annotations

import csv
import json
import os
from collections import Counter
from types import SimpleNamespace

import pytest
from conftest import make_tokenizer, read_csv_rows, save_tiny

from prompt_recovery.cli import main
from prompt_recovery.config import BudgetArgs, GenerateArgs, ModelArgs
from prompt_recovery.generate import (
    COLUMNS,
    Pair,
    Prompter,
    fill_slots,
    generate,
    judge,
    load_slots,
    pair_up,
    pool_path,
    propose_prompts,
    rejected_path,
)
from prompt_recovery.scheduler import Outcome

TEXTS = ["The bus was late again, so I walked the last mile in the rain.",
         "Our bake sale raised 412 dollars for the library roof.",
         "Dear team, the server move is on Saturday at 9; expect an hour of downtime.",
         "A fox crossed the frozen river at dawn and never looked back.",
         "Mix flour, sugar and butter, then bake for twenty minutes at 180 degrees."]
PROMPTS = ["Rewrite this as a haiku.", "Make it sound like a pirate.", "Turn this into a formal memo.",
           "Summarize in ten words."]


def write_csv(path, column, values):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow([column])
        w.writerows([v] for v in values)
    return str(path)


def rows_of(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def stopping_model_dir(tmp_path_factory) -> str:
    """The tiny Llama with its EOS row scaled: sampled rewrites end at mixed lengths (some at once, some past
    the limit), so runs write rows and drop others; a plain random model almost never ends a row."""
    import torch
    from transformers import AutoModelForCausalLM

    folder = save_tiny(tmp_path_factory.mktemp("tiny-stopping"))
    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        model.lm_head.weight[model.config.eos_token_id] *= 30
    model.save_pretrained(folder)
    return folder


@pytest.fixture
def inputs(tmp_path):
    return write_csv(tmp_path / "texts.csv", "original_text", TEXTS), write_csv(tmp_path / "p.csv", "rewrite_prompt",
                                                                                 PROMPTS)


def args_for(tmp_path, inputs, model, **kw):
    texts, prompts = inputs
    kw.setdefault("max_new_tokens", 12)
    return GenerateArgs(texts=texts, prompts=prompts, output=str(tmp_path / "out.csv"), progress=False,
                        model=ModelArgs(model=model), **kw)


def accounted(report):
    return (report.written + sum(report.dropped.values()) + sum(report.unfinished.values())
            + sum(report.skipped.values()))


def test_every_pair_is_written_or_dropped_once_in_train_format_and_pair_order(tmp_path, inputs, stopping_model_dir,
                                                                              capsys):
    out, report_path = tmp_path / "out.csv", tmp_path / "r.json"
    code = main(["generate-data", inputs[0], "--prompts", inputs[1], "-o", str(out), "--model", stopping_model_dir,
                 "--per-text", "3", "--max-new-tokens", "12", "--no-progress", "--report", str(report_path)])
    assert code == 0, capsys.readouterr().err
    err = capsys.readouterr().err
    assert "no chat template" in err and "generate-data: 15 pairs" in err
    report = json.loads(report_path.read_text())
    pairs = pair_up(TEXTS, PROMPTS, 3, 0)
    assert report["pairs"] == len(pairs) == 15 and report["requested"] == 15
    assert report["written"] + sum(report["dropped"].values()) == 15  # no deadline: every pair settled
    rows = rows_of(out)
    assert read_csv_rows(out)[0] == list(COLUMNS)
    rejected = rows_of(rejected_path(str(out)))
    assert sorted(r["id"] for r in rows + rejected) == sorted(p.id for p in pairs)
    by_id = {p.id: p for p in pairs}
    for r in rows:
        assert (r["original_text"], r["rewrite_prompt"]) == (by_id[r["id"]].text, by_id[r["id"]].prompt)
        assert r["rewritten_text"].strip() and judge(by_id[r["id"]], r["rewritten_text"], 0, 12) is None
    order = [p.id for p in pairs]
    assert [r["id"] for r in rows] == sorted((r["id"] for r in rows), key=order.index)
    assert Counter(r["reason"] for r in rejected) == Counter(report["dropped"])
    assert rows and rejected  # both paths taken


def test_pairs_never_repeat_a_prompt_for_a_text_and_use_the_pool_evenly():
    pool = [f"Prompt number {k}." for k in range(7)]
    texts = [f"Text number {k}." for k in range(10)]
    pairs = pair_up(texts, pool, 3, seed=4)
    for text in texts:
        prompts = [p.prompt for p in pairs if p.text == text]
        assert len(prompts) == len(set(prompts))
    uses = Counter(p.prompt for p in pairs)
    assert max(uses.values()) - min(uses.values()) <= 1
    assert len({p.id for p in pairs}) == len(pairs)
    assert pair_up(TEXTS, pool, 3, seed=4) == pair_up(TEXTS, pool, 3, seed=4)
    assert len(pair_up(TEXTS, pool[:2], 5, seed=0)) == 2 * len(TEXTS)  # never more prompts than the pool has


def test_slots_fill_every_slot_distinctly_and_deterministically():
    slots = load_slots("auto")
    pool = fill_slots(slots, 200, seed=1)
    assert len(pool) == len(set(pool)) == 200
    assert not any("{" in p or "}" in p for p in pool)
    assert pool == fill_slots(slots, 200, seed=1) and pool != fill_slots(slots, 200, seed=2)
    tiny = {"templates": ["Make it {tone}."], "tone": ["calm", "loud"]}
    assert sorted(fill_slots(tiny, 10, seed=0)) == ["Make it calm.", "Make it loud."]


@pytest.mark.parametrize("rewrite,tokens,reason", [
    ("", 3, "empty"),
    ("  !! ", 3, "empty"),
    ("Rewrite this as a pirate shanty.", 6, "echo_prompt"),
    ("Sure! Rewrite this as a pirate shanty: the bus was late", 9, "echo_prompt"),
    ("The bus was late again, so I walked the last mile in the rain.", 14, "echo_original"),
    ("the bus was late again so i walked the last mile in the rain!", 14, "echo_original"),
    ("Yo ho, the bus be late, I trudged a mile through rain, me hearties!", 40, "truncated"),
    ("Yo ho, the bus be late, I trudged a mile through rain, me hearties!", 16, None),
])
def test_judge_names_each_reason(rewrite, tokens, reason):
    pair = Pair("g1", TEXTS[0], "Rewrite this as a pirate shanty.")
    assert judge(pair, rewrite, tokens, max_new_tokens=40) == reason


def test_a_second_run_makes_only_what_is_missing(tmp_path, inputs, stopping_model_dir):
    args = args_for(tmp_path, inputs, stopping_model_dir)
    first = generate(args)
    assert first.requested == 10 and accounted(first) == 10
    assert first.written > 1
    before = (tmp_path / "out.csv").read_text()
    again = generate(args)
    assert again.requested == 0 and again.kept == 10 and (tmp_path / "out.csv").read_text() == before
    rows = rows_of(tmp_path / "out.csv")
    with open(tmp_path / "out.csv", "w", newline="", encoding="utf-8") as f:  # lose the last written row
        w = csv.DictWriter(f, fieldnames=list(COLUMNS))
        w.writeheader()
        w.writerows(rows[:-1])
    third = generate(args)
    assert third.requested == 1 and third.written == 1
    assert (tmp_path / "out.csv").read_text() == before  # the same rewrite: seeded by its id, not its batch
    assert generate(GenerateArgs(**{**vars(args), "resume": False})).requested == 10


def test_a_larger_token_limit_makes_truncated_rows_again(tmp_path, inputs, tiny_model_dir):
    first = generate(args_for(tmp_path, inputs, tiny_model_dir, max_new_tokens=2))
    assert first.dropped == {"truncated": 10} and first.written == 0
    assert generate(args_for(tmp_path, inputs, tiny_model_dir, max_new_tokens=2)).requested == 0
    assert generate(args_for(tmp_path, inputs, tiny_model_dir, max_new_tokens=40)).requested == 10


class JumpClock:
    """A clock that ticks 10 ms a reading, then jumps past every deadline at its ``at``-th reading: the run is
    cut in the middle of a batch's decoding, no sleeping."""

    def __init__(self, at: int) -> None:
        self.readings, self.at = 0, at

    def __call__(self) -> float:
        self.readings += 1
        return self.readings * 0.01 + (1000.0 if self.readings >= self.at else 0.0)


@pytest.mark.parametrize("jump_at", [30, 40, 50, 60])  # cuts before, inside and between batches
def test_rows_unfinished_at_the_deadline_are_never_written_and_made_next_time(tmp_path, inputs, tiny_model_dir,
                                                                              jump_at):
    args = args_for(tmp_path, inputs, tiny_model_dir, max_batch_size=2,
                    budget=BudgetArgs(time_limit=60, safety_margin=0))
    report = generate(args, clock=JumpClock(jump_at))
    assert report.unfinished and accounted(report) == 10
    settled = {r["id"] for r in rows_of(tmp_path / "out.csv")}
    if os.path.exists(rejected_path(args.output)):
        settled |= {r["id"] for r in rows_of(rejected_path(args.output))}
    assert len(settled) == 10 - sum(report.unfinished.values())
    rest = generate(GenerateArgs(**{**vars(args), "budget": BudgetArgs()}))
    assert rest.requested == sum(report.unfinished.values()) and rest.unfinished == {}
    # Cut and resumed, the files are what one uninterrupted run writes: no half rewrite was kept.
    whole = GenerateArgs(**{**vars(args), "budget": BudgetArgs(), "output": str(tmp_path / "whole.csv")})
    generate(whole)
    assert rows_of(args.output) == rows_of(whole.output)
    assert rows_of(rejected_path(args.output)) == rows_of(rejected_path(whole.output))


def test_texts_over_the_input_limit_are_skipped_with_their_reason(tmp_path, tiny_model_dir):
    texts = write_csv(tmp_path / "t.csv", "text", ["Short one.", "word " * 300])
    prompts = write_csv(tmp_path / "p.csv", "prompt", PROMPTS)
    report = generate(GenerateArgs(texts=texts, prompts=prompts, output=str(tmp_path / "o.csv"), progress=False,
                                   max_input_tokens=64, max_new_tokens=4, model=ModelArgs(model=tiny_model_dir)))
    assert report.skipped == {"too_long": 2} and report.requested == 2


def test_a_folder_of_text_files_and_the_shipped_slots(tmp_path, tiny_model_dir):
    folder = tmp_path / "texts"
    folder.mkdir()
    for k, text in enumerate(TEXTS[:3]):
        (folder / f"{k}.txt").write_text(text + "\n", encoding="utf-8")
    (folder / "notes.md").write_text(TEXTS[3], encoding="utf-8")
    (folder / "skip.json").write_text("{}", encoding="utf-8")
    (folder / "again.txt").write_text(TEXTS[0], encoding="utf-8")  # a repeat: kept once
    out = tmp_path / "o.csv"
    report = generate(GenerateArgs(texts=str(folder), output=str(out), n_prompts=20, max_new_tokens=4,
                                   progress=False, model=ModelArgs(model=tiny_model_dir)))
    assert report.texts == 4 and report.pairs == 8 and report.prompt_sources == {"slots": 20}
    pool = rows_of(pool_path(str(out)))
    assert [r["rewrite_prompt"] for r in pool] == fill_slots(load_slots("auto"), 20, 0)
    assert any("repeated" in w for w in report.warnings)


def test_bad_inputs_are_one_line_errors(tmp_path, capsys):
    bad = write_csv(tmp_path / "b.csv", "body", ["x"])
    assert main(["generate-data", bad, "-o", str(tmp_path / "o.csv")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'original_text' or 'text'" in err and "'body'" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["generate-data", str(empty)]) == 2
    assert "no .txt or .md files" in capsys.readouterr().err
    texts = write_csv(tmp_path / "t.csv", "text", ["A text."])
    assert main(["generate-data", texts, "-o", texts]) == 2
    assert "would be overwritten" in capsys.readouterr().err
    slots = tmp_path / "s.json"
    slots.write_text(json.dumps({"templates": ["Make it {mood}."]}))
    assert main(["generate-data", texts, "--prompt-slots", str(slots), "-o", str(tmp_path / "o.csv")]) == 2
    assert "mood" in capsys.readouterr().err


def test_an_instruction_model_is_asked_through_its_chat_template():
    tok = make_tokenizer()
    tok.chat_template = "{% for m in messages %}<bos>user: {{ m['content'] }}\n{% endfor %}model:"
    prompter = Prompter(tok, 512)
    pair = Pair("g1", TEXTS[1], PROMPTS[0])
    assert prompter.chat
    want = tok(f"<bos>user: {PROMPTS[0]}\n\n{TEXTS[1]}\nmodel:", add_special_tokens=False)["input_ids"]
    assert prompter.rewrite(pair) == want
    tok.chat_template = None
    plain = Prompter(tok, 512).rewrite(pair)
    assert plain == tok(f"Instruction: {PROMPTS[0]}\n\nText:\n{TEXTS[1]}\n\nRewritten text:\n")["input_ids"]


def test_proposed_prompts_are_new_distinct_lines_within_the_count():
    tok = make_tokenizer()
    answers = iter(["- Make it sound like a sea shanty sung by tired sailors\nmore", "Rewrite this as a haiku.",
                    "ok", "\"Turn this into a breaking news bulletin.\"", "Make it sound like a sea shanty sung "
                    "by tired sailors", "Explain this to a curious five year old."])

    class Session:
        args = GenerateArgs(texts="x", temperature=0.7)
        prompter = Prompter(tok, 512)
        loaded = SimpleNamespace(tokenizer=tok)

        def run(self, requests, max_new_tokens, stop_ids, on_batch, desc):
            return {k: Outcome(tok(next(answers), add_special_tokens=False)["input_ids"]) for k in requests}

    new = propose_prompts(Session(), ["Rewrite this as a haiku.", "Make it formal."], 2)
    assert new == ["Make it sound like a sea shanty sung by tired sailors", "Turn this into a breaking news bulletin."]
