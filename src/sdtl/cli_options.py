"""Command-line options more than one command declares (argparse only: the study commands register
their own subcommands and import this, so it sits below them with the base helpers)."""
from __future__ import annotations

import argparse


def add_set(p: argparse.ArgumentParser, help: str) -> None:
    """``--set KEY=VALUE`` (repeatable, into ``args.overrides``): the same option on every command that takes it."""
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=help)
