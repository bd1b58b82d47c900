"""`skinclf predict RUN_DIR IMAGES...`: MEL probabilities for new images with a finished run's model."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import torch

from skinclf.arguments import predict_parser
from skinclf.errors import SkinclfError, counted
from skinclf.image_inputs import check_out_spares_runs, collect_images, decode_all, no_readable_image
from skinclf.io import FILE_NAME_ERRORS, atomic_write_text, output_folder, python_strings
from skinclf.trained_run import TrainedRun, load_trained_run

COLUMNS = ["path", "prob_mel", "prediction", "threshold", "error"]
# Images decoded and scored together: bounds memory on large folders, keeps batches large.
CHUNK = 256


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
    with python_strings():
        table = pd.DataFrame(rows, columns=COLUMNS)
        return table.sort_values("path", key=lambda s: s.map(order), kind="stable").reset_index(drop=True)


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
    run.print_notes()
