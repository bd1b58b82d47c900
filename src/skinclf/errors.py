"""User-facing errors (one clear line, a non-zero exit, no traceback wall) and message wording."""

import errno
import os
import sys
from pathlib import Path


class SkinclfError(Exception):
    """A problem with the user's input (path, config, data) that the user can fix.

    The message must name what is wrong and where (the path, key or value) and what
    was expected; the CLI prints it as a single ``error:`` line and exits with code 2.
    """


EXIT_USER_ERROR = 2

# A full disk, a quota, a file size limit: any write can meet one, deep in a library (PIL's PNG
# writer, pandas' to_csv).
OUT_OF_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


def out_of_space(err: BaseException) -> SkinclfError | None:
    """The one-line error for an OSError that a full disk, quota or file size limit raised; None
    for any other."""
    if not isinstance(err, OSError) or err.errno not in OUT_OF_SPACE:
        return None
    where = f"{err.filename}: " if err.filename else ""
    return SkinclfError(
        f"{where}{err.strerror or os.strerror(err.errno)} (while writing): no result file is left "
        "half-written (each is written whole or not at all); make room, or write elsewhere, and run it again"
    )


def exit_with_error(command: str, message: str) -> None:
    """The CLI's one ``error:`` line and exit code, from where an exception would not reach the
    CLI as one (inside Hydra's callbacks and launchers, which print their own traceback)."""
    print(f"skinclf {command}: error: {message}", file=sys.stderr)
    sys.exit(EXIT_USER_ERROR)


def first_line(err: BaseException) -> str:
    """The first line of an error's message (its type's name when it has none): torch and
    Hydra messages run to many lines, and a status file or an ``error:`` line wants one. A first
    line that only announces the next (Hydra's "Error in call to target 'X':") takes it along."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    if lines[0].endswith(":") and len(lines) > 1:
        return f"{lines[0]} {lines[1]}"
    return lines[0]


def counted(n: int, noun: str) -> str:
    """``n`` and the noun in the right number, for messages: "1 image", "3 images"."""
    return f"{n} {noun}" + ("" if n == 1 else "s")


def not_a_folder(path: Path) -> str:
    """What is wrong with ``path`` where a folder was expected and ``path`` is none: "is a file"
    when something is there (a file given for its folder), "is a symlink to nothing (TARGET)"
    for a dangling link, and "no such folder" only when nothing is, so that the user does not go
    looking for a typo in a path that exists."""
    path = Path(path)
    if path.exists():
        return "is a file"
    if path.is_symlink():
        return f"is a symlink to nothing ({os.readlink(path)})"
    return "no such folder"
