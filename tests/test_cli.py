"""The ``dints3d`` command line: every subcommand's ``--help`` shows the defaults of its options."""

from __future__ import annotations

import argparse
import re

import pytest

from dints3d.cli import COMMANDS, _command_module, _parser, main


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_shows_every_default(command, capsys):
    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: None)" not in text and "(default: False)" not in text
    if command == "infer":
        assert "--device {auto,cpu,cuda} auto (a GPU if there is one), cpu, or cuda (an error without a GPU) " \
               "(default: auto)" in text
    if command == "evaluate":
        assert re.search(r"--nsd-tolerance NSD_TOLERANCE .*default 1", text)


def test_an_option_with_a_default_says_it(capsys):
    """Every option of every subcommand that has a default other than None / False / [] names it in its help."""
    _, subparsers = _parser()
    missing = []
    for name, sub in subparsers.items():
        module = _command_module(name)
        adder = getattr(module, f"add_{name.replace('-', '_')}_arguments", None) or module.add_arguments
        adder(sub)
        formatter = sub._get_formatter()
        for action in sub._actions:
            if not action.option_strings or action.default in (None, False, [], (), argparse.SUPPRESS):
                continue
            if "default" not in formatter._get_help_string(action).lower():
                missing.append(f"{name} {action.option_strings[0]}")
    assert missing == []
