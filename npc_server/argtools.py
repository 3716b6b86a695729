"""Shared argparse helpers: the "advanced" group of research knobs, and hidden aliases for renamed flags."""

from __future__ import annotations

import argparse

ADVANCED = "advanced"
ADVANCED_DESCRIPTION = "research knobs: the defaults are the shipped recipe; change them for experiments"


def advanced(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """The parser's one "advanced" argument group (created on first use), listed after the everyday flags."""
    for group in parser._action_groups:
        if group.title == ADVANCED:
            return group
    return parser.add_argument_group(ADVANCED, ADVANCED_DESCRIPTION)


def alias(parser: argparse.ArgumentParser | argparse._ArgumentGroup, primary: argparse.Action, *old: str) -> None:
    """Accept the old option strings `old` for the flag `primary` (same dest, type, choices and action) without
    listing them in --help, so commands written with the old word keep working."""
    kwargs: dict = {"dest": primary.dest, "help": argparse.SUPPRESS, "default": argparse.SUPPRESS}
    if isinstance(primary, argparse._StoreTrueAction):
        kwargs["action"] = "store_true"
    elif isinstance(primary, argparse._StoreFalseAction):
        kwargs["action"] = "store_false"
    else:
        kwargs.update(type=primary.type, choices=primary.choices, metavar=primary.metavar, nargs=primary.nargs)
    parser.add_argument(*old, **kwargs)
