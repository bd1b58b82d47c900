"""tqdm progress bars that are live on a terminal and stay readable in log files."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any, TextIO

from tqdm import tqdm

PROGRESS_MODES = ("auto", "always", "never")  # trainer.progress, see progress()
_LOG_INTERVAL_S = 60.0  # one progress line per minute at most when writing to a file


class _LineWriter:
    """Turns tqdm's carriage-return redraws into whole lines, so a log file gets one line per update."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, text: str) -> None:
        text = text.replace("\r", "\n").replace("\x1b[A", "")
        lines = [line.rstrip() for line in text.split("\n")]
        for line in lines:
            if line:
                self.stream.write(line + "\n")

    def flush(self) -> None:
        self.stream.flush()


def progress(iterable: Iterable | None = None, *, mode: str = "auto", **kwargs: Any) -> tqdm:
    """A tqdm bar. ``mode``: auto (live on a terminal, sparse lines otherwise), always, never."""
    if mode == "never":
        return tqdm(iterable, disable=True, **kwargs)
    if mode == "auto" and not sys.stderr.isatty():
        # Nothing for short loops; then at most a line a minute.
        kwargs.setdefault("mininterval", _LOG_INTERVAL_S)
        kwargs.setdefault("delay", _LOG_INTERVAL_S)
        kwargs["leave"] = False
        return tqdm(
            iterable,
            file=_LineWriter(sys.stderr),
            ascii=True,
            ncols=100,
            dynamic_ncols=False,
            **kwargs,
        )
    return tqdm(iterable, dynamic_ncols=True, **kwargs)
