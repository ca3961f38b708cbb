"""Every flag of every command says what it does and what it defaults to
(issue 14, point 7): the parsers are walked, not listed by hand, so a flag
added later without help fails here."""
from __future__ import annotations

import argparse

import pytest


def _parsers():
    from launch.cli import parser as launch_parser
    from merge.cli import parser as merge_parser
    from trainer.cli import init_parser, slice_parser, train_parser
    todo = [("python -m trainer", train_parser()), ("python -m trainer init", init_parser()),
            ("python -m trainer slice", slice_parser()), ("python -m merge", merge_parser()),
            ("python -m launch", launch_parser())]
    while todo:
        name, p = todo.pop(0)
        yield name, p
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                todo += [(f"{name} {sub}", sp) for sub, sp in action.choices.items()]


PARSERS = dict(_parsers())


def _states_default(action) -> bool:
    """A flag that takes a value and has a default must say which."""
    if action.required or not action.option_strings or action.nargs == 0:
        return True
    if action.default in (None, False, argparse.SUPPRESS):
        return True
    return "default" in (action.help or "").lower()


@pytest.mark.parametrize("name", sorted(PARSERS))
def test_every_flag_has_help_stating_its_default(name):
    p = PARSERS[name]
    p.format_help()  # a stray % in a help text would only fail when a user asks for --help
    missing, no_default = [], []
    for action in p._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)) or action.help == argparse.SUPPRESS:
            continue
        flag = "/".join(action.option_strings) or action.dest
        if not (action.help or "").strip():
            missing.append(flag)
        elif not _states_default(action):
            no_default.append(f"{flag} (default {action.default!r})")
    assert missing == [], f"{name}: flags without help"
    assert no_default == [], f"{name}: help does not state the default"


def test_the_walk_reaches_every_command():
    assert {"python -m trainer", "python -m trainer init", "python -m trainer slice",
            "python -m merge fedavg", "python -m merge evaluate", "python -m launch slurm",
            "python -m launch federated", "python -m launch horovod"} <= set(PARSERS)


def test_trainer_help_names_its_subcommands(capsys):
    from trainer.cli import main
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines anywhere
    assert "python -m trainer init" in out and "python -m trainer slice" in out
