"""argparse helpers shared by `mmgen` and `mmgen launch`: `type=` functions (a value out of
range is argparse's one-line usage error naming the flag, exit 2, before anything runs) and
`exact_options`. Standard library only, so building a parser stays cheap."""

from __future__ import annotations

import argparse


def int_in(lo: int, hi: int | None = None, note: str = ""):
    """An integer in [lo, hi] (hi None: no upper bound); `note` explains the bound."""
    want = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"must be an integer {want}{note}, got {text!r}") from None
        if value < lo or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"must be {want}{note}, got {value}")
        return value

    return parse


def exact_options(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Turn off prefix matching on `parser` and every subcommand parser under it.

    argparse takes `--work` for `--workdir` by default, so a flag renamed or misspelt in a
    script keeps "working" until a new flag makes the prefix ambiguous; exact names fail
    at once, naming the flag."""
    parser.allow_abbrev = False
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                exact_options(sub)
    return parser
