"""`skinclf predict RUN_DIR IMAGES...`: MEL probabilities for new images with a finished run's model."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import pandas as pd
import torch

from skinclf.arguments import DISCLAIMER, SYNTHETIC_MODEL_NOTE, predict_parser
from skinclf.data.images import IMAGE_SIZE, decode_image
from skinclf.errors import SkinclfError, counted
from skinclf.io import FILE_NAME_ERRORS, atomic_write_text, files_under, output_folder
from skinclf.report.runs import run_file_at
from skinclf.trained_run import TrainedRun, load_trained_run
from skinclf.training.progress import progress

COLUMNS = ["path", "prob_mel", "prediction", "threshold", "error"]
# Images decoded and scored together: bounds memory on large folders, keeps batches large.
CHUNK = 256


def collect_images(paths: Sequence[str | Path], skip: Path | None = None) -> list[Path]:
    """The files named by ``paths``: files as given, folders expanded to every file inside them
    (see :func:`files_under`), but those in the folder ``skip`` where it lies inside a folder being
    scanned (an output folder among the inputs: its earlier output is no input; a ``skip`` that
    is the scanned folder itself, or holds it, skips nothing). Non-image files and dangling links
    are kept: they get a reported error."""
    skipped = None if skip is None else os.path.realpath(skip)
    files: list[Path] = []
    for arg in map(Path, paths):
        if arg.is_dir():
            found = files_under(arg)
            inside = skipped is not None and skipped.startswith(os.path.realpath(arg) + os.sep)
            if inside:
                found = [f for f in found if not os.path.realpath(f).startswith(skipped + os.sep)]
            if not found:
                besides = f" besides the output folder {skip}" if inside else ""
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


def predict_files(run: TrainedRun, files: Sequence[Path], threshold: float) -> pd.DataFrame:
    """One row per file: path, prob_mel, prediction (MEL/NV at ``threshold``), threshold, error.

    Unreadable files get an empty probability and the reason in ``error``; the rest are scored
    in chunks, with the run's own evaluation preprocessing and precision.
    """
    rows: list[dict] = []
    pending: list[tuple[Path, torch.Tensor]] = []

    def score_pending() -> None:
        if not pending:
            return
        probs = run.predict_probs(torch.stack([img for _, img in pending])).tolist()
        for (path, _), prob in zip(pending, probs, strict=True):
            label = "MEL" if prob >= threshold else "NV"
            rows.append(
                {
                    "path": str(path),
                    "prob_mel": prob,
                    "prediction": label,
                    "threshold": threshold,
                    "error": "",
                }
            )
        pending.clear()

    for path, decoded in decode_all(files, desc="predicting"):
        if isinstance(decoded, str):
            rows.append({"path": str(path), "prediction": "", "threshold": threshold, "error": decoded})
        else:
            pending.append((path, decoded))
            if len(pending) >= CHUNK:
                score_pending()
    score_pending()
    order = {str(p): i for i, p in enumerate(files)}
    table = pd.DataFrame(rows, columns=COLUMNS)
    return table.sort_values("path", key=lambda s: s.map(order), kind="stable").reset_index(drop=True)


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


def _check_out_spares_inputs(out: Path, images: list[Path], run_dir: Path) -> None:
    """--out must not overwrite an image being scored, nor a run's files (check_out_spares_runs)."""
    if any(out.resolve() == image.resolve() for image in images):
        raise SkinclfError(f"--out {out}: is one of the images to score; expected the path of a new CSV file")
    check_out_spares_runs(out, run_dir, "a CSV path")


def main(args: list[str]) -> None:
    """Entry point of ``skinclf predict ARGS``."""
    opts = predict_parser().parse_args(args)
    out = None if opts.out is None else Path(opts.out)
    if out is not None and out.is_dir():
        raise SkinclfError(f"--out {out}: is a folder; expected the path of a CSV file")
    # An unwritable --out fails now, not after every image was scored.
    with output_folder(out.parent) if out is not None else contextlib.nullcontext():
        files = collect_images(opts.images)
        if out is not None:
            _check_out_spares_inputs(out, files, Path(opts.run_dir))
        run = load_trained_run(opts.run_dir, device=opts.device)
        threshold = run.threshold if opts.threshold is None else opts.threshold
        source = run.threshold_source if opts.threshold is None else "--threshold"
        table = predict_files(run, files, threshold)
        n_bad = int((table["error"] != "").sum())
        if n_bad == len(table):
            raise no_readable_image(table["error"].tolist(), "score")

        csv_text = table.to_csv(index=False)
        if out is not None:
            # A file name that is no UTF-8 as its bytes, which find the file again.
            atomic_write_text(csv_text, out, errors=FILE_NAME_ERRORS)
        else:
            sys.stdout.write(csv_text)
    where = f" -> {out}" if out is not None else ""
    print(
        f"model={run.model_name} ({run.path}): {counted(len(table) - n_bad, 'image')} scored, "
        f"{n_bad} unreadable{where}; "
        f"MEL when prob_mel >= {float(threshold)!r}, from {source}",  # exact: the rule the CSV follows
        file=sys.stderr,
    )
    if run.trained_on_synthetic_data:
        print(f"note: {SYNTHETIC_MODEL_NOTE}", file=sys.stderr)
    print(DISCLAIMER, file=sys.stderr)
