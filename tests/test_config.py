"""Arguments: every field documented (the CLI help is read from the docstrings), bad values refused."""

from __future__ import annotations

import dataclasses
import typing

import pytest

from prompt_recovery import config
from prompt_recovery.cli import COMMANDS, main

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


@pytest.mark.parametrize("command", list(COMMANDS))
def test_help_lists_every_option(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    cls = COMMANDS[command][0]
    from prompt_recovery.cli import SKIP

    for name in config.field_docs(cls):
        if name not in COMMANDS[command][1] and name not in SKIP.get(command, ()):
            assert "--" + name.replace("_", "-") in text


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
