"""The images a user gives `skinclf predict` and `skinclf explain`: the files named (folders
scanned), decoded one by one (one that cannot be read is reported, not fatal), and the check
that keeps their --out off the run being used."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from skinclf.data.images import IMAGE_SIZE, decode_image
from skinclf.errors import SkinclfError, counted
from skinclf.io import files_under
from skinclf.report.runs import run_file_at
from skinclf.training.progress import progress

# How `skinclf explain` names its figures (X_gradcam.png for X.png).
FIGURE_SUFFIX = "_gradcam.png"


def collect_images(paths: Sequence[str | Path], skip: Path | None = None) -> list[Path]:
    """The files named by ``paths``: files as given, folders expanded to every file inside them
    (see :func:`files_under`), but those in the folder ``skip`` where it lies inside a folder being
    scanned (an output folder among the inputs: its earlier output is no input; a ``skip`` that
    is the scanned folder itself, or holds it, skips nothing), and explain's figures
    (``*_gradcam.png``, said on stderr): a heat map scored as a lesion is a false MEL or NV call.
    Non-image files and dangling links are kept: they get a reported error."""
    skipped = None if skip is None else os.path.realpath(skip)
    files: list[Path] = []
    for arg in map(Path, paths):
        if arg.is_dir():
            found = files_under(arg)
            inside = skipped is not None and skipped.startswith(os.path.realpath(arg) + os.sep)
            if inside:
                found = [f for f in found if not os.path.realpath(f).startswith(skipped + os.sep)]
            figures = [f for f in found if f.name.endswith(FIGURE_SUFFIX)]
            if figures:
                found = [f for f in found if not f.name.endswith(FIGURE_SUFFIX)]
                print(
                    f"{arg}: left out {counted(len(figures), 'figure')} of skinclf explain "
                    f"(*{FIGURE_SUFFIX}, such as {figures[0]}); name a file to use it",
                    file=sys.stderr,
                )
            if not found:
                left_out = [f"the output folder {skip}"] if inside else []
                left_out += ["skinclf explain's figures"] if figures else []
                besides = f" besides {' and '.join(left_out)}" if left_out else ""
                raise SkinclfError(f"{arg}: folder holds no files{besides}; expected images (JPEG, PNG, ...)")
            files += found
        elif arg.is_file():
            files.append(arg)
        else:  # a named pipe or device exists, but is no image file either
            what = "not a regular file or folder" if arg.exists() else "no such file or folder"
            raise SkinclfError(f"{arg}: {what}; expected an image or a folder of images")
    return files


def no_readable_image(problems: Sequence[str], what: str) -> SkinclfError:
    """The error when none of the files could be decoded (each problem names its file): a result
    of errors only would pass for a result."""
    if len(problems) == 1:
        return SkinclfError(f"no image to {what}: {problems[0]}")
    many = f"none of the {len(problems)} files could be read as an image"
    return SkinclfError(f"{many}; the first: {problems[0]}")


def decode_all(files: Sequence[Path], desc: str = "decoding") -> Iterator[tuple[Path, torch.Tensor | str]]:
    """Yield (path, uint8 image) or (path, reason it cannot be read), with a progress bar."""
    bar_mode = "auto" if len(files) > 1 else "never"
    for path in progress(files, mode=bar_mode, desc=desc, unit="image"):
        try:
            yield path, decode_image(path, IMAGE_SIZE)
        except SkinclfError as err:
            yield path, str(err)


def check_out_spares_runs(out: Path, run_dir: Path, expected: str) -> None:
    """--out (``expected``: what it should be instead) must not go anywhere inside the run folder
    used, nor be any run's own file: a typo there would destroy what the user came to use (its
    predictions.csv, which `skinclf report` reads back; its .hydra/config.yaml, which makes it a
    run), and a new file in the run used would be taken for one the run wrote. In another run's
    folder a new file is allowed: only that run's own files are kept from harm."""
    target, run_folder = out.resolve(), run_dir.resolve()
    if target.is_relative_to(run_folder):
        where = "is" if target == run_folder else "is inside"
        raise SkinclfError(f"--out {out}: {where} the run folder {run_dir}; expected {expected} outside it")
    own = run_file_at(target)
    if own is not None:
        where = "is" if own == target else "lies in"
        raise SkinclfError(
            f"--out {out}: {where} {own}, which the skinclf run in {own.parent} writes; "
            f"expected {expected} that is none of a run's own files"
        )
