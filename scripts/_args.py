"""Argument checks shared by the benchmark scripts: a bad argument is argparse's usage error
(exit 2) before any work starts, not a traceback from a worker or an empty list of timings."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from skinclf.summary import model_names


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse ``type`` for counts that must be at least ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value}: expected an integer >= {minimum}")
        return value

    return parse


# Counts that must be at least 1 (``--repeats``: a median or a best of zero timings does not exist).
positive_int = int_at_least(1)


def writable_json(text: str) -> Path:
    """An argparse ``type`` for the JSON a benchmark writes its results to: checked now, so that
    a bad path fails before the measurements, not after them. A new file starts as an empty
    result; an existing one (earlier results) is only opened, and kept until new ones replace it."""
    path = Path(text)
    try:
        if path.is_file():
            path.open("a").close()
        else:
            path.write_text("{}\n")
    except OSError as err:
        raise argparse.ArgumentTypeError(f"{text}: cannot write there ({err.strerror})") from None
    return path


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
