"""Sweep benchmark: the paper's eight-model sweep at the paper's data size, timed end to end.

Runs ``skinclf train -m experiment=paper`` as a user would (one process, Hydra's basic launcher,
the paper's settings: batch 64, lr 1e-4, at most 30 epochs, early stopping with patience 10) on
the built-in synthetic images at the paper's split sizes (6,429 / 1,255 / 1,369), and prints a
table: per model the epochs run, the seconds its epochs took (training and validation; the
clock of metrics.csv), seconds per epoch, the job's wall-clock time from its first file to its
last (adding data loading, vgg16's feature extraction, checkpoint writes, test evaluation and
figures) and best validation accuracy; then the whole sweep's wall-clock time, start-up included.
The images are generated before the clock starts, as a real dataset is decoded once into the
decode cache.

vgg16 uses its ImageNet weights when they are in torch's weight cache; otherwise (offline) it
runs with ``model.pretrained=false``: random frozen features, the same amount of compute, in a
second launch (only vgg16's config has that key) whose wall-clock time is added; the table says so.

    python scripts/benchmark_sweep.py                         # the paper sweep, device auto
    python scripts/benchmark_sweep.py --models baseline res_aug --train-size 1024 --device cpu
    python scripts/benchmark_sweep.py --data-dir ~/.cache/skinclf-sweep   # generate the images once
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _args import add_models_argument
from _provenance import describe, provenance

from skinclf.models import PAPER_MODELS
from skinclf.run_files import METRICS, RUN_CONFIG, TEST_METRICS
from skinclf.training.hardware import resolve_device

# The paper's split sizes (section 2, data collection).
PAPER_SIZES = {"train": 6429, "val": 1255, "test": 1369}


def vgg16_weights_cached() -> bool:
    from torchvision.models import VGG16_Weights

    from skinclf.models.pretrained import weights_path

    return weights_path(VGG16_Weights.IMAGENET1K_V1).exists()


def generate_data(overrides: list[str]) -> float:
    """Generate (or find cached) the synthetic splits; returns the seconds it took."""
    from skinclf.config import compose_config
    from skinclf.data.synthetic import load_splits

    t0 = time.perf_counter()
    load_splits(compose_config(overrides).data)
    return time.perf_counter() - t0


def read_job(job_dir: Path) -> dict:
    """Epochs, seconds and best validation accuracy of one finished sweep job."""
    with open(job_dir / METRICS, newline="") as f:
        rows = list(csv.DictReader(f))
    seconds = sum(float(r["seconds"]) for r in rows)
    # run_config.json is the first file a job writes, test_metrics.json the last.
    job_s = (job_dir / TEST_METRICS).stat().st_mtime - (job_dir / RUN_CONFIG).stat().st_mtime
    return {
        "epochs": len(rows),
        "epoch_seconds": seconds,
        "s_per_epoch": seconds / len(rows),
        "job_seconds": job_s,
        "best_val_acc": max(float(r["val_acc"]) for r in rows),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_models_argument(parser, PAPER_MODELS)
    parser.add_argument("--train-size", type=int, default=PAPER_SIZES["train"])
    parser.add_argument("--val-size", type=int, default=PAPER_SIZES["val"])
    parser.add_argument("--test-size", type=int, default=PAPER_SIZES["test"])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--out", type=Path, default=None, help="keep the sweep here (default: a temp folder)")
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="cache the generated images here, so a rerun skips generating them (default: a temp folder)",
    )
    parser.add_argument("--json", type=Path, default=Path("benchmark_sweep.json"))
    args = parser.parse_args()

    record = provenance(resolve_device(args.device))  # before: a sweep can take hours
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp) / "sweep"
        data = [
            f"data.train_size={args.train_size}",
            f"data.val_size={args.val_size}",
            f"data.test_size={args.test_size}",
            f"data.cache_dir={args.data_dir or Path(tmp) / 'data'}",
        ]
        generate_s = generate_data(data)
        pretrained = "vgg16" not in args.models or vgg16_weights_cached()
        launches = [(args.models, [], out)]
        if not pretrained:
            # model.pretrained is a key of vgg16's config only, and skinclf refuses a key that
            # nothing reads: offline, vgg16 runs as a second launch, its wall clock added.
            others = [model for model in args.models if model != "vgg16"]
            offline = (["vgg16"], ["model.pretrained=false"], out.with_name(f"{out.name}_vgg16"))
            launches = [(others, [], out), offline] if others else [offline]
        sweep_s, returncode, jobs = 0.0, 0, {}
        for models, extra, sweep_dir in launches:
            command = [
                *[sys.executable, "-m", "skinclf", "train", "-m", "experiment=paper"],
                f"model={','.join(models)}",
                f"device={args.device}",
                "trainer.progress=never",
                f"hydra.sweep.dir={sweep_dir}",
                *data,
                *extra,
            ]
            print("running:", " ".join(command[2:]), flush=True)
            t0 = time.perf_counter()
            # A failed job fails the sweep command; the finished jobs are still reported below.
            returncode = subprocess.run(command).returncode or returncode
            sweep_s += time.perf_counter() - t0
            # Job folders are <job number>_<model>.
            finished = [d for d in sorted(sweep_dir.iterdir()) if (d / TEST_METRICS).exists()]
            jobs.update({d.name.split("_", 1)[1]: read_job(d) for d in finished})
        jobs = {model: jobs[model] for model in args.models if model in jobs}

    print(
        f"\n{describe(record)}; "
        f"{args.train_size}/{args.val_size}/{args.test_size} synthetic images "
        f"(generated beforehand in {generate_s:.0f} s)"
    )
    if not pretrained:
        print(
            "vgg16: ImageNet weights not in torch's cache, ran with model.pretrained=false (same compute) "
            "as a second launch; the wall clock adds both"
        )
    header = f"{'model':<11} {'epochs':>6} {'epoch s':>9} {'s/epoch':>8} {'job s':>7} {'best val':>9}"
    print(header)
    print("-" * len(header))
    for model, job in jobs.items():
        print(
            f"{model:<11} {job['epochs']:>6} {job['epoch_seconds']:>9.1f} {job['s_per_epoch']:>8.2f} "
            f"{job['job_seconds']:>7.1f} {job['best_val_acc']:>9.2%}"
        )
    total_epochs = sum(j["epoch_seconds"] for j in jobs.values())
    total_jobs = sum(j["job_seconds"] for j in jobs.values())
    print(f"{'all':<11} {'':>6} {total_epochs:>9.1f} {'':>8} {total_jobs:>7.1f}")
    print(f"whole sweep, wall clock: {sweep_s:.1f} s ({len(jobs)} of {len(args.models)} jobs finished)")
    args.json.write_text(
        json.dumps(
            {
                **record,
                "sizes": [args.train_size, args.val_size, args.test_size],
                "vgg16_pretrained": pretrained,
                "generate_s": generate_s,
                "sweep_s": sweep_s,
                "jobs": jobs,
            },
            indent=2,
        )
    )
    print(f"written: {args.json}")
    if returncode:
        sys.exit(f"the sweep exited with status {returncode}: see its log above for the failed jobs")


if __name__ == "__main__":
    main()
