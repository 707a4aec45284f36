"""Each option is defined once (``byot.config.TrainConfig``'s field metadata): the command line's flags, the
checks' ranges and choices, and docs/OPTIONS.md are generated from that definition."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from byot.cli.parser import build_parser
from byot.cli.reference import options_markdown
from byot.config import CHOICES, RANGES, SECTIONS, TrainConfig, build_config, default_of, options

ROOT = Path(__file__).resolve().parents[1]


def test_the_options_page_is_the_generated_one():
    assert (ROOT / "docs" / "OPTIONS.md").read_text() == options_markdown(), (
        "docs/OPTIONS.md is stale: python -m byot.cli.reference > docs/OPTIONS.md")


def test_every_field_is_defined_once_with_its_section_help_and_checks():
    for name, (_, option) in options().items():
        assert option.section in SECTIONS and len(option.help) > 10, name
        assert (name in RANGES) == (option.range is not None) and (name in CHOICES) == bool(option.choices)
    numeric = {f.name for f in dataclasses.fields(TrainConfig) if str(f.type).split(" |")[0] in ("int", "float")}
    assert set(RANGES) == numeric  # every number has a range, from the same place


def _flag(name: str) -> str:
    option = options()[name][1]
    return (option.flags or ("--" + name.replace("_", "-"),))[0]


VALUES = {"int": "3", "float": "0.5", "str": "x"}


@pytest.mark.parametrize("name", [n for n in options() if n != "arch"])
def test_every_option_is_a_flag_of_byot_train_that_sets_it(name):
    field, option = options()[name]
    action = dict(option.extra).get("action")
    kind = str(field.type).split(" |")[0]
    if action in ("store_true", "store_false"):
        argv = [_flag(name)]
        expected = action == "store_true"
    elif action == "boolean_optional":
        argv, expected = ["--no-" + name.replace("_", "-")], False
    elif name == "model_options":
        argv, expected = [_flag(name), "depth=28"], [("depth", 28)]
    else:
        value = option.choices[-1] if option.choices else (
            str(int(option.range.low) + 1) if kind == "int" else VALUES.get(kind, "x"))
        argv, expected = [_flag(name), value], {"int": int, "float": float}.get(kind, str)(value)
        if kind == "float" and option.range is not None and not option.range.holds(expected):
            expected = option.range.low + (option.range.high - option.range.low) / 2
            argv[-1] = str(expected)
    args = build_parser().parse_args(["train", "multi_resnet18_kd", *argv])
    assert getattr(args, name) == expected


def test_a_train_command_line_with_no_flag_sets_nothing_and_the_defaults_come_from_the_definition():
    args = build_parser().parse_args(["train", "multi_resnet18_kd"])
    assert set(vars(args)) == {"command", "arch"}
    assert build_config({}, {}) == TrainConfig(**{n: default_of(f) for n, (f, _) in options().items()})


def test_help_texts_show_the_defaults_of_the_definition(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "initial learning rate (default 0.1)" in out and "epochs (default 200)" in out


def test_the_data_sets_the_options_name_are_the_ones_the_data_layer_reads():
    from byot.data import DATASETS

    assert CHOICES["dataset"] == DATASETS
