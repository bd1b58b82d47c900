"""tqdm progress bars that are live on a terminal and stay readable in log files."""

from __future__ import annotations

import contextlib
import contextvars
import sys
from collections.abc import Iterable, Iterator
from typing import Any, TextIO

from tqdm import tqdm

PROGRESS_MODES = ("auto", "always", "never")  # trainer.progress, see progress()
_LOG_INTERVAL_S = 60.0  # one progress line per minute at most when writing to a file
# trainer.progress for bars whose code sees no trainer settings (a data loader sees data.* only).
_run_mode: contextvars.ContextVar[str] = contextvars.ContextVar("progress_mode", default="auto")


@contextlib.contextmanager
def progress_mode(mode: str) -> Iterator[None]:
    """Bars made inside that name no ``mode`` of their own take this one."""
    token = _run_mode.set(mode)
    try:
        yield
    finally:
        _run_mode.reset(token)


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


def progress(iterable: Iterable | None = None, *, mode: str | None = None, **kwargs: Any) -> tqdm:
    """A tqdm bar. ``mode``: auto (live on a terminal, sparse lines otherwise), always, never;
    None: the run's (:func:`progress_mode`), else auto."""
    mode = mode or _run_mode.get()
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
