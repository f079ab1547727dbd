"""Arguments: every field documented (the CLI help is read from the docstrings), bad values refused."""

from __future__ import annotations

import dataclasses
import typing

import pytest

from prompt_recovery import config
from prompt_recovery.cli import COMMANDS, SKIP, main

ARG_CLASSES = [config.ModelArgs, config.PromptArgs, config.GenerationArgs, config.BudgetArgs, config.OutputArgs,
               config.PredictArgs, config.ScoreArgs, config.OptimizeArgs, config.TrainArgs, config.BundleArgs]


@pytest.mark.parametrize("cls", ARG_CLASSES, ids=lambda c: c.__name__)
def test_every_field_has_a_one_line_docstring(cls):
    docs = config.field_docs(cls)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            continue  # nested arguments: their own fields are checked
        assert f.name in docs and "\n" not in docs[f.name], f"{cls.__name__}.{f.name}"


def offered(cls: type, command: str):
    """(name on the command line, docstring) of every option a command offers, nested dataclasses included."""
    hints = typing.get_type_hints(cls)
    docs = config.field_docs(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from offered(hints[f.name], command)
        elif f.name not in SKIP.get(command, ()):
            positional = cls is COMMANDS[command][0] and f.name in COMMANDS[command][1]
            yield (f.name if positional else "--" + f.name.replace("_", "-")), docs[f.name]


def help_entries(text: str) -> dict[str, str]:
    """{each option string of an entry: the entry's text, white space collapsed} from argparse's help."""
    entries: list[list[str]] = []
    for line in text.splitlines():
        if line.startswith("  ") and not line.startswith("   "):
            entries.append([line])  # "  --flag VALUE   help" starts an entry
        elif line.startswith("   ") and entries:
            entries[-1].append(line)  # the help continued, or put under a long flag
    out = {}
    for lines in entries:
        head = lines[0].split("  ")[1] if "  " in lines[0].strip() else lines[0].strip()
        for name in head.replace(",", " ").split():
            out.setdefault(name, " ".join(" ".join(lines).split()))
    return out


@pytest.mark.parametrize("command", list(COMMANDS))
def test_help_shows_every_option_nested_ones_included_with_its_help(command, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")  # no wrapping: a docstring is compared whole
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    entries = help_entries(capsys.readouterr().out)
    for name, doc in offered(COMMANDS[command][0], command):
        assert name in entries, f"{command} --help does not show {name}"
        assert " ".join(doc.split()) in entries[name], f"{command} --help shows {name} without its help"
    for name in SKIP.get(command, ()):
        assert "--" + name.replace("_", "-") not in entries  # options that mean nothing to the command


def test_nested_options_are_among_those_checked():
    names = {name for name, _ in offered(config.PredictArgs, "predict")}
    assert {"--budget-per-row", "--quantize", "--max-batch-tokens", "--max-input-tokens", "--suffix-file"} <= names


@pytest.mark.parametrize("make", [
    lambda: config.ModelArgs(quantize="3bit"),
    lambda: config.BudgetArgs(budget_per_row=-1),
    lambda: config.BudgetArgs(time_limit=0),
    lambda: config.GenerationArgs(max_new_tokens=0),
    lambda: config.PromptArgs(max_input_tokens=10),
    lambda: config.OutputArgs(fallback_prompt="a", fallback_prompt_file="b"),
    lambda: config.TrainArgs(train_csv="x", method="full"),
    lambda: config.BundleArgs(python_version="py3"),
    lambda: config.OptimizeArgs(prompts_csv="x", rounds=0),
])
def test_bad_values_are_refused_at_construction(make):
    with pytest.raises(ValueError):
        make()


def test_budget_margin_never_eats_a_tight_budget():
    b = config.BudgetArgs(time_limit=20, safety_margin=30)
    assert b.seconds(100) == 20 and b.margin(100) == pytest.approx(2.0)
    assert config.BudgetArgs(budget_per_row=25).seconds(1300) == 32500
