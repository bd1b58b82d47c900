"""The command lines of `skinclf predict`, `explain`, `prepare`, `summary` and `report`.

Apart from the commands' modules, which import torch for their work: cli.py parses a command's
arguments with these before it imports the module, so that `--help` and a wrong argument answer
in 0.1 s instead of the 4-6 s that importing torch takes (2-core VM; report's pandas and
matplotlib, about 1 s). Each module
parses with the same parser when its ``main`` is called.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import NoReturn

DISCLAIMER = "skinclf is a research tool, not a diagnosis: do not use its output for medical decisions."
# Said wherever a model that learned from the built-in data scores images: the synthetic data is
# labelled as such wherever it appears (report titles, explain's figures), and a user may score
# real photographs with it.
SYNTHETIC_MODEL_NOTE = "this model was trained on synthetic data (procedurally generated, not real lesions)"
# What `explain --class` may name: a class, or each image's predicted one.
EXPLAIN_TARGETS = ("mel", "nv", "predicted")
# The ground-truth files `prepare` recognises a download by.
ISIC_2019_CSV = "ISIC_2019_Training_GroundTruth.csv"
HAM10000_CSV = "HAM10000_metadata.csv"


class CommandParser(argparse.ArgumentParser):
    """argparse's parser whose errors are one line, as every other skinclf error is: the usage
    block argparse prints above it is what ``--help`` is for."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (`{self.prog} --help` shows the usage)\n")


def _output(text: str) -> str:
    """argparse type of an output path: not empty. ``--out "$DIR"`` with DIR unset would
    otherwise write into the current folder (an empty path is ``.``)."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"{text!r}: empty; expected a path (. for the current folder)")
    return text


def _threshold(text: str) -> float:
    """argparse type of --threshold: a probability."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a probability threshold in [0, 1]")
    return value + 0.0  # -0 is 0, not "-0.0" in the output


def _seed(text: str) -> int:
    """argparse type of --seed: numpy's generators take only non-negative integers."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a non-negative integer")
    return value


def _run_and_images_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """A parser of ``RUN_DIR IMAGE_OR_FOLDER... [--device D]``, the part predict and explain share."""
    parser = CommandParser(prog=prog, description=f"{description} {DISCLAIMER}")
    parser.add_argument("run_dir", metavar="RUN_DIR", help="output directory of a finished `skinclf train`")
    parser.add_argument(
        "images",
        metavar="IMAGE_OR_FOLDER",
        nargs="+",
        help="image files, or folders scanned recursively (leaving out explain's *_gradcam.png figures)",
    )
    parser.add_argument(
        "--device", metavar="D", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)"
    )
    return parser


def predict_parser() -> argparse.ArgumentParser:
    parser = _run_and_images_parser(
        "skinclf predict",
        "Probability of melanoma (MEL) vs nevus (NV) for new images, with the best checkpoint and the "
        "exact preprocessing of a finished run. Images are converted to RGB 128x128 like the training data.",
    )
    parser.add_argument(
        "--out",
        type=_output,
        metavar="FILE.csv",
        help="write the table here (default: print it to standard output)",
    )
    parser.add_argument(
        "--threshold",
        type=_threshold,
        metavar="T",
        help="call MEL when prob_mel >= T (default: the run's operating point chosen on validation)",
    )
    return parser


def explain_parser() -> argparse.ArgumentParser:
    parser = _run_and_images_parser(
        "skinclf explain",
        "Grad-CAM heat maps from the last convolutional block of a finished run's model, overlaid on "
        "each image, with the probability of melanoma in the title: one PNG per image.",
    )
    parser.add_argument(
        "--out",
        type=_output,
        metavar="DIR",
        default="explanations",
        help="folder for the PNGs (default: explanations/)",
    )
    parser.add_argument(
        "--class",
        dest="target",
        choices=EXPLAIN_TARGETS,
        default="mel",
        help="map the evidence for MEL (default), for NV, or for the class predicted at the run's threshold",
    )
    return parser


def prepare_parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        prog="skinclf prepare",
        description=(
            "Build the paper's ROOT/{train,val,test}/{MEL,NV} layout of 128x128 images from a raw ISIC 2019 "
            f"training-set or HAM10000 download (detected from {ISIC_2019_CSV} or {HAM10000_CSV} in SOURCE). "
            "Splits are stratified by class, and all images of one lesion stay in one split. "
            "Then: skinclf train data=folder data.root=OUT"
        ),
    )
    parser.add_argument(
        "source", metavar="SOURCE", help="the unpacked download (metadata CSV and images anywhere under it)"
    )
    parser.add_argument(
        "out", metavar="OUT", type=_output, help="output folder (must not exist, or be empty)"
    )
    parser.add_argument(
        "--balance",
        action="store_true",
        help="undersample the larger class (NV in both downloads) to as many images as the other",
    )
    parser.add_argument(
        "--split",
        default="71,14,15",
        help="train,val,test percentages summing to 100 (default 71,14,15, the paper's); test may be 0",
    )
    parser.add_argument(
        "--seed", type=_seed, default=0, help="seed of the balancing and the split (default 0)"
    )
    parser.add_argument(
        "--format", choices=["jpg", "png"], default="jpg", help="output image format (default jpg)"
    )
    parser.add_argument(
        "--skip-bad-images",
        action="store_true",
        help="leave out images that cannot be read (each named), instead of stopping at the first",
    )
    return parser


SUMMARY_EPILOG = """examples:
  skinclf summary model=resnet                  the layer table of paper Appendix C.6
  skinclf summary model=all                     one line per model in conf/model/
  skinclf summary model=vgg16 model.pretrained=true   any other train override is accepted"""


def summary_parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        prog="skinclf summary",
        description="The layer table of paper Appendix C (torchinfo) for input (64, 3, 128, 128): "
        "output shapes, parameters per layer, total and trainable parameters, mult-adds.",
        epilog=SUMMARY_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="model=NAME or model=all, then any train override"
    )
    return parser


REPORT_DESCRIPTION = """\
Writes paper Table 1 (table1.csv/.md/.tex), the best model's test confusion matrix
(confusion_matrix.csv/.png, paper Table 2), training curves (curves.png/.pdf, paper Figure 2),
test ROC curves of all models (roc.png) and a list of every run found (runs.csv).
Runs are grouped per dataset and never averaged across datasets; runs of one model that differ
only in seed are aggregated as mean ± std over n. Unfinished or failed runs are listed in
runs.csv only; a run whose predictions.csv is damaged or missing is left out of roc.png alone (a warning
names the file)."""


def report_parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        prog="skinclf report",
        description=REPORT_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "dirs",
        nargs="*",
        type=Path,
        default=[Path("outputs")],
        metavar="DIR",
        help="run or multirun folders to search, recursively (default: outputs)",
    )
    parser.add_argument("--out", type=_output, default="reports", help="output folder (default: reports)")
    return parser


# command -> its parser, for cli.py
PARSERS = {
    "predict": predict_parser,
    "explain": explain_parser,
    "prepare": prepare_parser,
    "summary": summary_parser,
    "report": report_parser,
}
