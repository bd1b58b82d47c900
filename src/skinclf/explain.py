"""`skinclf explain RUN_DIR IMAGES...`: Grad-CAM overlays showing where a finished run's model looked."""

from __future__ import annotations

import os
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import torch
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from skinclf.arguments import EXPLAIN_TARGETS, explain_parser
from skinclf.data.images import image_file_suffixes
from skinclf.errors import SkinclfError, counted
from skinclf.evaluation.gradcam import grad_cam, grad_cam_over_flips
from skinclf.image_inputs import (
    FIGURE_SUFFIX,
    check_out_spares_runs,
    collect_images,
    decode_all,
    no_readable_image,
)
from skinclf.io import output_folder, readable, save_figure
from skinclf.trained_run import TrainedRun, load_trained_run

# Images explained per forward/backward pass: Grad-CAM keeps activations and gradients in memory.
CHUNK = 16


def _told_apart(prob: float, threshold: float) -> tuple[str, str]:
    """Probability and threshold to as many decimals as tell them apart, at least 3: "P(MEL) =
    0.399: NV at threshold 0.39864066" read as a contradiction. Equal, both in full."""
    for digits in range(3, 18):
        shown = f"{prob:.{digits}f}", f"{threshold:.{digits}f}"
        if shown[0] != shown[1]:
            return shown
    return repr(prob), repr(threshold)


def render(
    image: torch.Tensor,
    heatmap: torch.Tensor,
    prob_mel: float,
    threshold: float,
    title: str,
    evidence: str,
    window: tuple[int, int, int, int] | None = None,
    synthetic: bool = False,
) -> Figure:
    """The image and the image with its Grad-CAM heat map overlaid, P(MEL) in the title. A
    ``window`` (top, left, height, width) smaller than the image, the part the network sees, is
    outlined and named; a model trained on the ``synthetic`` data says so below."""
    fig = Figure(figsize=(7.2, 4.0))
    left, right = fig.subplots(1, 2)
    rgb = image.permute(1, 2, 0).cpu().numpy()
    height, width = rgb.shape[:2]
    left.imshow(rgb)
    caption = f"image (as the model sees it: RGB {height}x{width})"
    right.imshow(rgb)
    shown = right.imshow(heatmap.numpy(), cmap="jet", alpha=0.45, vmin=0.0, vmax=1.0)
    if window is not None and tuple(window) != (0, 0, height, width):
        top, x0, seen_height, seen_width = window
        caption = (
            f"image (RGB {height}x{width}; the model sees the outlined {seen_height}x{seen_width} centre)"
        )
        for ax in (left, right):  # pixel centres are at integers: the box's edges at -0.5
            ax.add_patch(
                Rectangle((x0 - 0.5, top - 0.5), seen_width, seen_height, fill=False, ec="white", lw=1)
            )
    left.set_title(caption, fontsize=8)
    right.set_title(f"Grad-CAM: evidence for {evidence}", fontsize=8)
    if float(heatmap.max()) == 0:
        # Grad-CAM keeps only positive evidence: an all-blue overlay would read as a drawing error.
        note = f"no positive evidence for {evidence.split(',')[0]}\nat this layer"
        box = {"facecolor": "white", "alpha": 0.8, "lw": 0}
        right.text(0.5, 0.5, note, transform=right.transAxes, ha="center", va="center", fontsize=8, bbox=box)
    for ax in (left, right):
        ax.set_axis_off()
    fig.colorbar(shown, ax=right, fraction=0.046, pad=0.03)
    call = "MEL" if prob_mel >= threshold else "NV"
    prob_text, threshold_text = _told_apart(prob_mel, float(threshold))
    fig.suptitle(f"{title}\nP(MEL) = {prob_text}: {call} at threshold {threshold_text}", fontsize=10)
    footer = "Research aid, not a diagnosis."
    if synthetic:
        footer += " Model trained on synthetic data, not real lesions."
    fig.text(0.5, 0.02, footer, ha="center", fontsize=8, style="italic")
    return fig


def _labels(files: Sequence[Path]) -> dict[Path, str]:
    """What each figure's title calls its image: the file name; for files of one name from several
    folders, their paths from the deepest folder they share (a/x.png, b/x.png), so that
    x_gradcam.png and x_2_gradcam.png can be told apart."""
    by_name: dict[str, list[Path]] = defaultdict(list)
    for path in files:
        by_name[path.name].append(path)
    labels = {}
    for name, paths in by_name.items():
        if len(paths) == 1:
            labels[paths[0]] = name
            continue
        try:
            shared = os.path.commonpath([os.path.abspath(path.parent) for path in paths])
        except ValueError:  # Windows: folders on different drives share none
            shared = None
        for path in paths:
            labels[path] = str(path) if shared is None else os.path.relpath(path, shared)
    return labels


def _unique_name(path: Path, taken: set[str]) -> str:
    name, n = f"{path.stem}{FIGURE_SUFFIX}", 1
    while name in taken:  # same file name from two folders
        n += 1
        name = f"{path.stem}_{n}{FIGURE_SUFFIX}"
    taken.add(name)
    return name


def explain_files(
    run: TrainedRun, files: Sequence[Path], out_dir: Path, target: str = "mel"
) -> tuple[list[Path], list[str], list[Path]]:
    """Write one Grad-CAM PNG per readable file into ``out_dir``; returns (written, problems, and
    the written figures whose map is empty: no positive evidence at the layer)."""
    if target not in EXPLAIN_TARGETS:
        raise SkinclfError(f"--class {target}: expected one of {', '.join(EXPLAIN_TARGETS)}")
    written: list[Path] = []
    problems: list[str] = []
    empty: list[Path] = []
    # An input image in out_dir named like an output (X_gradcam.png beside X.png) keeps its name:
    # the figure of X.png takes the next free one instead of overwriting it.
    out_folder = out_dir.resolve()
    taken = {path.name for path in files if path.resolve().parent == out_folder}
    chunk: list[tuple[Path, torch.Tensor]] = []
    synthetic = run.trained_on_synthetic_data  # said at the foot of every figure
    labels = _labels(files)

    def explain_chunk() -> None:
        if not chunk:
            return
        images = torch.stack([img for _, img in chunk])
        # The same probabilities as `skinclf predict` (the run's precision); Grad-CAM itself in fp32.
        probs = run.predict_probs(images)
        toward_mel = {
            "mel": torch.ones(len(chunk), dtype=torch.bool),
            "nv": torch.zeros(len(chunk), dtype=torch.bool),
            "predicted": probs >= run.threshold,
        }[target]
        # With test-time augmentation the probability is the mean over flips: so is the map.
        tta = run.settings.recipe.tta
        explain = grad_cam_over_flips if tta else grad_cam
        cam = explain(run.model, run.pipeline.eval_batch(images.to(run.device)), toward_mel)
        for (path, image), heatmap, prob, mel in zip(
            chunk, cam.heatmaps, probs.tolist(), toward_mel, strict=True
        ):
            title = f"{readable(labels[path])} - model={run.model_name}, layer {cam.layer}"
            evidence = ("MEL" if mel else "NV") + (", mean of image + 3 flips" if tta else "")
            fig = render(image, heatmap, prob, run.threshold, title, evidence, cam.window, synthetic)
            out = out_dir / _unique_name(path, taken)
            save_figure(fig, out)
            written.append(out)
            if float(heatmap.max()) == 0:
                empty.append(out)
        chunk.clear()

    for path, decoded in decode_all(files, desc="explaining"):
        if isinstance(decoded, str):
            problems.append(decoded)
            continue
        chunk.append((path, decoded))
        if len(chunk) >= CHUNK:
            explain_chunk()
    explain_chunk()
    return written, problems, empty


def main(args: list[str]) -> None:
    """Entry point of ``skinclf explain ARGS``."""
    opts = explain_parser().parse_args(args)
    named_like_a_file = (
        not opts.out.endswith(("/", os.sep)) and Path(opts.out).suffix.lower() in image_file_suffixes()
    )
    if named_like_a_file and not Path(opts.out).exists():
        # --out heatmap.png would become a folder of that name holding the figures.
        raise SkinclfError(f"--out {opts.out}: names a file; expected a folder, to hold one figure per image")
    # Before the folder is made: refused, it leaves nothing behind.
    check_out_spares_runs(Path(opts.out), Path(opts.run_dir), "a folder")
    # An unwritable --out fails now, not after the model was loaded; an --out made here is
    # removed again should no image be explained.
    with output_folder(Path(opts.out)) as out_dir:
        # An --out inside a folder being explained: its figures from an earlier run are no input.
        files = collect_images(opts.images, skip=out_dir)
        run = load_trained_run(opts.run_dir, device=opts.device)
        written, problems, empty = explain_files(run, files, out_dir, opts.target)
        if not written:  # before any output: the --out made here is removed again
            raise no_readable_image(problems, "explain")
        for problem in problems:
            print(f"skipped: {problem}", file=sys.stderr)
        for path in written:
            print(path)
        print(
            f"model={run.model_name} ({run.path}): {counted(len(written), 'Grad-CAM image')} in "
            f"{out_dir}/, {counted(len(problems), 'file')} unreadable",
            file=sys.stderr,
        )
        if empty:
            # Legitimate Grad-CAM (no channel at the layer pushes toward the class), common for a
            # briefly trained model: said, so that blank figures do not read as a failure.
            print(
                f"note: {len(empty)}/{len(written)} maps show no positive evidence for the class "
                "explained (an all-blue overlay; each such figure says so)",
                file=sys.stderr,
            )
        run.print_notes()
