"""Speed benchmark: skinclf's fast path vs plain PyTorch, per model, on this machine.

Prints a table and writes JSON. For each model:
  * step_fp32_s   one training step (forward, backward, Adam) at batch 64, fp32, NCHW;
  * step_fast_s   the same step as skinclf runs it by default (precision=auto, channels-last,
                  fused Adam, input fed in the autocast dtype, freed memory kept for reuse);
  * step_fast_default_malloc_s  ("not kept") that step with glibc's default allocator, which
                  page-faults each step's activations in afresh (trainer.keep_freed_memory=false);
  * epoch_ref_s   one training epoch of a straightforward loop on a folder of JPEGs
                  (ImageFolder + PIL + ToTensor + DataLoader, fp32, NCHW), doing the same
                  per-image work as skinclf's pipeline: the augmented models' flips, rotations
                  and crops as torchvision PIL transforms with the same probabilities, and
                  Normalize where the pipeline normalises;
  * train_epoch_skinclf_s  the training pass of skinclf's own loop (`train_one_epoch`, images
                  from the decode cache, batched augmentation) on the same images;
  * epoch_skinclf_s  a whole epoch of `fit` as its metrics.csv clock counts it: that pass plus
                  validation (the checkpoints are written after the clock stops);
  * pure_steps_s  the same number of training steps on the loop's batches, prepared before
                  the clock starts;
  * overhead      what the loop adds to the pure steps (batching, augmentation, normalisation,
                  bookkeeping): the median over repeats of train pass / pure steps - 1, the two
                  timed alternately so that each pair sees the same machine state;
  * peak_rss_mb / peak_cuda_mb  peak memory of skinclf's measurement process for that model.
and, for vgg16, the head's epoch time on cached features vs running the frozen extractor.

    python scripts/benchmark.py                        # the paper's eight models, 1024 training images
    python scripts/benchmark.py --models baseline res_aug --images 1024 --repeats 5

Medians over --repeats after warm-up (three steps before the step times, one pass before the
epochs); the reference and fit epochs and vgg16's head epochs on cached features over half as
many, its epochs through the extractor over a quarter (at least one each). The plain-PyTorch
side, skinclf's side and the "not kept" step each run in their own process per model, so
allocator settings never leak from one to the other; peak memory is that of skinclf's process.
Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _args import add_models_argument, int_at_least, positive_int, writable_json
from _provenance import describe, provenance

from skinclf.models import PAPER_MODELS
from skinclf.training.hardware import resolve_device

BATCH = 64


def _cfg(model: str, overrides: list[str] | None = None):
    from skinclf.config import compose_config

    # No ImageNet weights needed: speed does not depend on the weights' values.
    pretrained = (
        ["model.pretrained=false"] if "pretrained" in compose_config([f"model={model}"]).model else []
    )
    return compose_config([f"model={model}", *pretrained, *(overrides or [])])


def _folder_cfg(model: str, root: Path, cache_dir: Path):
    """The train config of ``model`` on the JPEG folder dataset, without progress bars."""
    return _cfg(
        model, ["data=folder", f"data.root={root}", f"data.cache_dir={cache_dir}", "trainer.progress=never"]
    )


def _timed(fn, device: torch.device) -> float:
    """Seconds one call of ``fn`` takes, the GPU's queued work included."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def _median_time(fn, repeats: int, device: torch.device, warmups: int = 1) -> float:
    for _ in range(warmups):  # first-call allocations, oneDNN kernel selection
        fn()
    return statistics.median(_timed(fn, device) for _ in range(repeats))


def _paired_times(fn_a, fn_b, repeats: int, device: torch.device) -> tuple[list[float], list[float]]:
    """Times of ``fn_a`` and ``fn_b`` run alternately (a, b, a, b, ...), after one warm-up each:
    the two of a pair see the same machine state, so that their ratio does not pick up drift
    (another process, clock changes) between two separate blocks of runs."""
    fn_a(), fn_b()
    pairs = [(_timed(fn_a, device), _timed(fn_b, device)) for _ in range(repeats)]
    return [a for a, _ in pairs], [b for _, b in pairs]


def training_step(model, optimizer, precision: str, device: torch.device):
    """``step(x, y)``: forward under ``precision``'s autocast, fp32 BCE loss, backward and the
    optimizer step, as skinclf's loop does them (without its bookkeeping)."""
    from skinclf.training.hardware import autocast

    forward_ctx = autocast(precision, device)

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        with forward_ctx():
            logits = model(x).flatten()
        loss = F.binary_cross_entropy_with_logits(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def step_time(model_name: str, variant: str, repeats: int) -> float:
    """Median training-step time at batch 64: ``fp32`` is plain fp32/NCHW with torch's Adam,
    ``fast`` skinclf's default path (precision=auto, channels-last, fused Adam, input fed in the
    autocast dtype)."""
    from skinclf.models import build_model
    from skinclf.training.hardware import input_dtype, resolve_device, resolve_precision
    from skinclf.training.recipe import Recipe, build_optimizer

    device = resolve_device("auto")
    precision = "fp32" if variant == "fp32" else resolve_precision("auto", device)
    x = torch.rand(BATCH, 3, 128, 128, device=device).to(input_dtype(precision))
    y = torch.randint(0, 2, (BATCH,), device=device).float()
    torch.manual_seed(0)
    model = build_model(_cfg(model_name).model).to(device).train()
    if variant == "fp32":
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    else:
        model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
        optimizer = build_optimizer(model, 1e-4, 0.0, Recipe())
    step = training_step(model, optimizer, precision, device)
    # Three warm-up steps, not one: on a 2-core AMD EPYC (AVX2) VM the first steps after the first
    # were often the slowest (batch_norm: 1.05 s, then 0.6-0.8 s), and a median of three steps
    # after one warm-up reported batch_norm's step at 1.08 s against 0.66 s with this warm-up.
    return _median_time(lambda: step(x, y), repeats, device, warmups=3)


def write_jpeg_folder(root: Path, n_train: int, n_val: int) -> None:
    """The built-in synthetic images as JPEGs in the paper's folder layout."""
    from PIL import Image

    from skinclf.data.synthetic import generate_split

    for index, (split, n) in enumerate((("train", n_train), ("val", n_val))):
        data = generate_split(seed=0, split_index=index, n=n)
        for i, (image, label) in enumerate(zip(data.images, data.labels, strict=True)):
            folder = root / split / ("MEL" if label == 1 else "NV")
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{i:05d}.jpg", quality=95)


def reference_transform(model_name: str, root: Path, cache_dir: Path):
    """The textbook torchvision transform doing the per-image work skinclf's pipeline does:
    PIL augmentation with the same probabilities (augmented models), then normalisation."""
    from torchvision import transforms

    from skinclf.data.pipeline import AugmentedPipeline, DefaultPipeline

    pipeline = _folder_run(model_name, root, cache_dir)[-1]  # fitted: its mean/std are known
    steps = []
    if isinstance(pipeline, AugmentedPipeline):
        lo, hi = pipeline.crop_scale
        crop = transforms.RandomResizedCrop(128, scale=(lo * lo, hi * hi), ratio=(1.0, 1.0))
        steps += [
            transforms.RandomHorizontalFlip(pipeline.p),
            transforms.RandomApply(
                [transforms.RandomRotation(math.degrees(pipeline.max_rotation))], pipeline.p
            ),
            transforms.RandomApply([crop], pipeline.p),
        ]
    steps.append(transforms.ToTensor())
    if type(pipeline) is not DefaultPipeline:  # the default pipeline only scales to [0, 1]
        steps.append(transforms.Normalize(pipeline.mean.tolist(), pipeline.std.tolist()))
    return transforms.Compose(steps)


def reference_epoch(model_name: str, root: Path, cache_dir: Path, repeats: int) -> float:
    """One epoch of the textbook loop: ImageFolder + PIL (+ the model's augmentation) + ToTensor
    (+ Normalize) + DataLoader, fp32, NCHW."""
    from torch.utils.data import DataLoader
    from torchvision import datasets

    from skinclf.models import build_model

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    transform = reference_transform(model_name, root, cache_dir)
    dataset = datasets.ImageFolder(root / "train", transform=transform)
    loader = DataLoader(dataset, batch_size=BATCH, shuffle=True)
    torch.manual_seed(0)
    model = build_model(_cfg(model_name).model).to(device).train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    mel = dataset.class_to_idx["MEL"]

    def epoch():
        for x, y in loader:
            x, y = x.to(device), (y == mel).float().to(device)
            loss = F.binary_cross_entropy_with_logits(model(x).flatten(), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    return _median_time(epoch, repeats, device)


def _folder_run(model_name: str, root: Path, cache_dir: Path):
    """What `skinclf train` sets up for ``model_name`` on the JPEG folder, before its loop:
    (config, device, loop settings, decoded splits, fitted pipeline)."""
    from skinclf.config import instantiate_config
    from skinclf.data import load_splits
    from skinclf.train import loop_settings
    from skinclf.training.hardware import resolve_device, resolve_precision

    cfg = _folder_cfg(model_name, root, cache_dir)
    device = resolve_device("auto")
    settings = loop_settings(cfg, resolve_precision("auto", device))
    splits = load_splits(cfg.data)  # decodes once into the cache; timed runs read memory only
    pipeline = instantiate_config(cfg.model.pipeline)
    pipeline.fit(splits.train.images)
    return cfg, device, settings, splits, pipeline


def skinclf_epoch(model_name: str, root: Path, cache_dir: Path, repeats: int, fit_repeats: int) -> dict:
    """skinclf's own loop on the same images, read from the decode cache: the training pass alone
    (``train_one_epoch``), the same number of pure steps on batches prepared in advance, and a
    whole epoch of ``fit`` (plus validation and checkpoint writes)."""
    from skinclf.models import build_model
    from skinclf.training.hardware import input_dtype
    from skinclf.training.loop import fit, place_splits, train_one_epoch
    from skinclf.training.recipe import Recipe, build_optimizer

    cfg, device, settings, splits, pipeline = _folder_run(model_name, root, cache_dir)
    settings.max_epochs = 1

    torch.manual_seed(0)
    model = build_model(cfg.model).to(device).to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, settings.lr, settings.weight_decay, Recipe())
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    generator = torch.Generator().manual_seed(0)

    train, _ = place_splits(splits.train, splits.val, device)  # where fit keeps them

    def train_pass():
        train_one_epoch(model, pipeline, train, optimizer, scaler, generator, settings, device, "")

    # The loop's batches, made before the clock starts: the pure steps differ from the training
    # pass by the data handling alone (gathering, augmentation, normalisation, bookkeeping).
    order = torch.randperm(len(train), generator=generator).to(train.images.device)
    ready = [
        (
            pipeline.train_batch(train.images_at(idx).to(device), generator, input_dtype(settings.precision)),
            train.labels[idx].to(device),
        )
        for idx in order.split(settings.batch_size)
    ]
    step = training_step(model, optimizer, settings.precision, device)

    def pure_steps():
        for x, y in ready:
            step(x, y)

    fit_times = []
    for _ in range(fit_repeats + 1):
        torch.manual_seed(0)
        with tempfile.TemporaryDirectory() as out:
            fit(build_model(cfg.model), pipeline, splits.train, splits.val, settings, device, Path(out))
            fit_times.append(float((Path(out) / "metrics.csv").read_text().splitlines()[1].split(",")[-1]))
    loop_times, pure_times = _paired_times(train_pass, pure_steps, repeats, device)
    overheads = [loop / pure - 1 for loop, pure in zip(loop_times, pure_times, strict=True)]
    return {
        "train_epoch_skinclf_s": statistics.median(loop_times),
        "pure_steps_s": statistics.median(pure_times),
        "overhead": statistics.median(overheads),
        "overhead_per_repeat": overheads,
        "epoch_skinclf_s": statistics.median(fit_times[1:]),
    }


def vgg_cache_epochs(root: Path, cache_dir: Path, repeats: int) -> dict:
    """vgg16 head epoch on cached feature maps vs an epoch that runs the frozen extractor too."""
    from skinclf.data.features import training_stage
    from skinclf.models import build_model
    from skinclf.training.hardware import input_dtype
    from skinclf.training.recipe import Recipe, build_optimizer

    cfg, device, settings, splits, pipeline = _folder_run("vgg16", root, cache_dir)
    model = build_model(cfg.model).to(device).to(memory_format=torch.channels_last)
    t0 = time.perf_counter()
    stage = training_stage(model, pipeline, splits, cache_dir, settings, device)
    extract_s = time.perf_counter() - t0
    dtype = input_dtype(settings.precision)

    def epoch(module, stage_pipeline, images):
        module.train()
        step = training_step(module, build_optimizer(module, 1e-4, 0.0, Recipe()), settings.precision, device)
        generator = torch.Generator().manual_seed(0)
        for start in range(0, len(images), BATCH):
            x = stage_pipeline.train_batch(images[start : start + BATCH].to(device), generator, dtype)
            step(x, torch.zeros(len(x), device=device))

    cached = _median_time(
        lambda: epoch(stage.module, stage.pipeline, stage.splits.train.images), repeats, device
    )
    uncached = _median_time(lambda: epoch(model, pipeline, splits.train.images), max(1, repeats // 2), device)
    return {"vgg_epoch_cached_s": cached, "vgg_epoch_extractor_s": uncached, "vgg_extract_once_s": extract_s}


def _peak_memory() -> dict:
    peak = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.cuda.is_available():
        peak["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return peak


def _measure(job: tuple) -> dict:
    """One side of one model's measurements, in a fresh process (so that its peak memory and its
    allocator settings are its own).

    ``reference``: plain PyTorch as a user would write it (fp32 step, reference epoch), glibc's
    default allocator. ``skinclf``: skinclf's defaults, freed memory kept as ``skinclf train``
    keeps it (trainer.keep_freed_memory). ``skinclf_default_malloc``: the fast step alone with
    glibc's default allocator, to show what keeping freed memory is worth.
    """
    side, model_name, root, cache_dir, repeats, skip_epochs = job
    epoch_repeats = max(1, repeats // 2)
    if side == "reference":
        out = {"step_fp32_s": step_time(model_name, "fp32", repeats)}
        if not skip_epochs:
            out["epoch_ref_s"] = reference_epoch(model_name, Path(root), Path(cache_dir), epoch_repeats)
        return out
    if side == "skinclf_default_malloc":
        return {"step_fast_default_malloc_s": step_time(model_name, "fast", repeats)}
    from skinclf.training.allocator import keep_freed_memory
    from skinclf.training.hardware import resolve_device, resolve_precision

    out = {
        "precision": resolve_precision("auto", resolve_device("auto")),
        "kept_freed_memory": keep_freed_memory(),
        "step_fast_s": step_time(model_name, "fast", repeats),
    }
    if not skip_epochs:
        out.update(skinclf_epoch(model_name, Path(root), Path(cache_dir), repeats, epoch_repeats))
        if model_name == "vgg16":
            out.update(vgg_cache_epochs(Path(root), Path(cache_dir), epoch_repeats))
    return {**out, **_peak_memory()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_models_argument(parser, PAPER_MODELS)
    parser.add_argument(
        "--images",
        type=int_at_least(BATCH),
        default=1024,
        help=f"training images in the folder dataset (at least one batch: {BATCH})",
    )
    parser.add_argument(
        "--repeats",
        type=positive_int,
        default=5,
        help="timed repetitions of each step and paired pass (median); the epochs run half as often",
    )
    parser.add_argument("--steps-only", action="store_true", help="skip the epoch measurements")
    parser.add_argument(
        "--json",
        type=writable_json,
        default="benchmark.json",
        help="results file, rewritten after each model (default: benchmark.json)",
    )
    args = parser.parse_args()
    record = provenance(resolve_device("auto"))

    with tempfile.TemporaryDirectory() as tmp:
        root, cache_dir = Path(tmp) / "jpegs", Path(tmp) / "cache"
        if not args.steps_only:
            write_jpeg_folder(root, args.images, 256)
        context = mp.get_context("spawn")
        rows = []
        for model in args.models:
            row = {"model": model}
            # skinclf first: its process decodes the JPEGs into the cache both loops then read.
            for side in ("skinclf", "skinclf_default_malloc", "reference"):
                job = (side, model, str(root), str(cache_dir), args.repeats, args.steps_only)
                with context.Pool(1) as pool:
                    row.update(pool.apply(_measure, (job,)))
            rows.append(row)
            _write_results(args.json, record, args.images, rows)  # kept should a later model fail
            print(f"measured {model}", flush=True)

    batches = -(-args.images // BATCH)
    print(
        f"\n{describe(record)}; {args.images} training images "
        f"({batches} batches of {BATCH}), median of {args.repeats} steps"
    )
    if not all(r["kept_freed_memory"] for r in rows):
        print("freed memory NOT kept here (not glibc): 'not kept' measures the same as 'step fast'")
    header = f"{'model':<11} {'prec':>5} {'step fp32':>10} {'step fast':>10} {'speed-up':>8} {'not kept':>9} "
    if not args.steps_only:  # with --steps-only the rows have no epoch columns: neither has the header
        header += (
            f"{'epoch ref':>10} {'train skinclf':>13} {'speed-up':>8} {'pure steps':>10} {'overhead':>8} "
            f"{'fit epoch':>10} "
        )
    header += f"{'peak MB':>8}"
    print(header)
    print("-" * len(header))
    for r in rows:
        line = (
            f"{r['model']:<11} {r['precision']:>5} {r['step_fp32_s']:>9.3f}s {r['step_fast_s']:>9.3f}s "
            f"{r['step_fp32_s'] / r['step_fast_s']:>7.2f}x {r['step_fast_default_malloc_s']:>8.3f}s"
        )
        if "epoch_ref_s" in r:
            line += (
                f" {r['epoch_ref_s']:>9.2f}s {r['train_epoch_skinclf_s']:>12.2f}s "
                f"{r['epoch_ref_s'] / r['train_epoch_skinclf_s']:>7.2f}x {r['pure_steps_s']:>9.2f}s "
                f"{r['overhead']:>+7.0%} "
                f"{r['epoch_skinclf_s']:>9.2f}s"
            )
        line += f" {r.get('peak_cuda_mb', r['peak_rss_mb']):>8.0f}"
        print(line)
        if "vgg_epoch_cached_s" in r:
            print(
                f"{'':<11} vgg16 head epoch: {r['vgg_epoch_cached_s']:.2f}s on cached features vs "
                f"{r['vgg_epoch_extractor_s']:.2f}s running the extractor "
                f"(one-off extraction of all splits: {r['vgg_extract_once_s']:.2f}s)"
            )
    print(f"\nwritten: {args.json}")


def _write_results(path: Path, record: dict, images: int, rows: list[dict]) -> None:
    results = {**record, "images": images, "rows": rows}
    path.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
