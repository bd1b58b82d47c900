"""`skinclf COMMAND ...`: a thin dispatcher; each command lives in its own module."""

from __future__ import annotations

import importlib
import io
import signal
import sys

from skinclf import __version__
from skinclf.arguments import PARSERS
from skinclf.errors import EXIT_USER_ERROR, SkinclfError, out_of_space
from skinclf.io import FILE_NAME_ERRORS

# command -> (module with a ``main(args: list[str])``, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("skinclf.train_command", "train one combination; -m/--multirun sweeps (Hydra overrides)"),
    "report": (
        "skinclf.report.command",
        "paper Table 1, confusion matrix, curves and ROC from finished runs",
    ),
    "summary": ("skinclf.summary", "layer table, parameters and mult-adds of a model (paper Appendix C)"),
    "predict": ("skinclf.predict", "MEL probabilities for new images with a finished run's model"),
    "explain": ("skinclf.explain", "Grad-CAM overlays: where a finished run's model looked"),
    "prepare": ("skinclf.prepare", "128x128 MEL/NV folder layout from an ISIC 2019 or HAM10000 download"),
}

# How work stopped by Ctrl-C or `kill` goes on, per command (the others simply start again).
EXIT_INTERRUPTED = 128 + signal.SIGINT  # 130, as a shell reports Ctrl-C

USAGE = """usage: skinclf COMMAND [ARGS]

Melanoma vs nevus classification experiments: the eight CNN combinations of the DAT341 study.
A research aid, not a diagnostic device.

commands:
{commands}

`skinclf COMMAND --help` explains each command; `skinclf --version` names this version."""


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    return USAGE.format(commands="\n".join(lines))


class Terminated(SystemExit):
    """What stop signal N (`kill`) raises: ``SystemExit`` with the code a shell reports for it
    (128 + N, 143 for SIGTERM), of a type of its own so that :func:`_dispatch` can tell it from an
    ordinary exit and say how to go on, as after Ctrl-C. Code that reads only the exit code (the
    sweep folder's line in train_command) takes it as any SystemExit."""


def _exit_on_sigterm(signum: int, frame: object) -> None:
    # Python's default for SIGTERM ends the process on the spot; raising instead lets every
    # `finally` run, so that an atomic write in progress removes its temporary file (vgg16's
    # last.pt is 1.3 GB). The run folder is then left as Ctrl-C leaves it: resumable.
    raise Terminated(128 + signum)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    # File names whose bytes are no UTF-8 (printed paths, predict's CSV on stdout) go out as those
    # bytes, whatever the locale: a strict stdout (en_US.UTF-8) would end in UnicodeEncodeError.
    for stream in (sys.stdout, sys.stderr):  # stderr: errors and the stop line name paths too
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors=FILE_NAME_ERRORS)
    # `kill`, a scheduler's time limit: stop as Ctrl-C does (only the main thread can set this).
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        _dispatch(argv)
    except BrokenPipeError:
        # `skinclf ... | head` closed the pipe early: not an error worth a traceback.
        sys.stderr.close()
    finally:
        signal.signal(signal.SIGTERM, previous)


def _dispatch(argv: list[str]) -> None:
    if argv and argv[0] in {"-h", "--help", "help"}:
        print(_usage())
        return
    if argv and argv[0] in {"-V", "--version"}:
        print(f"skinclf {__version__}")
        return
    if not argv:
        # Nothing was done: a script that forgot the command must not carry on as if it had run.
        print(_usage(), file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    command, args = argv[0], argv[1:]
    if command not in COMMANDS:
        known = ", ".join(COMMANDS)
        print(f"skinclf: error: unknown command {command!r}; expected one of {known}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    if command in PARSERS:
        # Before the command's module (torch: seconds): --help and a wrong argument answer now.
        PARSERS[command]().parse_args(args)
    module = None
    try:
        # Inside: a Ctrl-C or `kill` while the command's module (torch) imports is a stop too.
        module = importlib.import_module(COMMANDS[command][0])
        module.main(args)
    except SkinclfError as err:
        print(f"skinclf {command}: error: {err}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    except OSError as err:
        full = out_of_space(err)
        if full is None:
            raise
        print(f"skinclf {command}: error: {full}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    except KeyboardInterrupt:
        _report_stop(command, "Ctrl-C", module)
        sys.exit(EXIT_INTERRUPTED)
    except Terminated as stop:
        _report_stop(command, signal.Signals(stop.code - 128).name, module)
        raise


def _report_stop(command: str, by: str, module: object) -> None:
    # A stop is the user's own doing (or their scheduler's), not a crash: one line, not a
    # traceback. Files being written are atomic, so nothing is left half-written. The hint only
    # where there is something to resume (train's: not when stopped before its folder).
    hint = module.resume_hint() if hasattr(module, "resume_hint") else ""
    print(f"skinclf {command}: stopped ({by}){hint}", file=sys.stderr)
