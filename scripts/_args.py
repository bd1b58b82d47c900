"""Argument checks shared by the benchmark scripts: a bad argument is argparse's usage error
(exit 2) before any work starts, not a traceback from a worker or an empty list of timings."""

from __future__ import annotations

import argparse

from skinclf.summary import model_names


def positive_int(text: str) -> int:
    """An argparse ``type`` for counts that must be at least 1 (``--repeats``: a median or a best of
    zero timings does not exist)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: expected an integer >= 1")
    return value


def add_models_argument(parser: argparse.ArgumentParser, default: tuple[str, ...]) -> None:
    """``--models``: one or more names of conf/model/*.yaml, checked by argparse."""
    parser.add_argument(
        "--models",
        nargs="+",
        default=list(default),
        choices=model_names(),
        metavar="MODEL",
        help=f"model configs to run (default: %(default)s), any of: {', '.join(model_names())}",
    )
