"""The bench tools as a user meets them: one help line per command, help and a default
for every option, the same output flags everywhere."""

from __future__ import annotations

import argparse
import importlib

import pytest

from bench.__main__ import COMMANDS, HelpFormatter, add_output_arguments, main


def test_top_level_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for name, (_, summary) in COMMANDS.items():
        assert name in text and summary.split()[0] in text


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_option_has_help_and_the_shared_output_flags(name: str) -> None:
    parser = argparse.ArgumentParser(formatter_class=HelpFormatter)
    importlib.import_module(COMMANDS[name][0]).add_arguments(parser)
    add_output_arguments(parser)
    options = {a.dest: a for a in parser._actions if a.option_strings and a.dest != "help"}
    assert [dest for dest, a in options.items() if not a.help] == []
    assert options["json"].metavar == "FILE"
    assert isinstance(options["quiet"], argparse._StoreTrueAction)
    parser.format_help()  # every help string formats (no stray % signs)
