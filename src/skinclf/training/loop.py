"""The one training loop shared by every model: Adam, early stopping on validation accuracy,
atomic checkpoints (last.pt every trainer.checkpoint_every epochs), one metrics.csv row per
epoch, and exact resume.

Beyond the paper, ``settings.recipe`` (skinclf.training.recipe) may switch on AdamW, a per-batch
learning-rate schedule, mixup, an EMA of the weights and test-time augmentation; its default is
the paper's recipe, with which the loop does exactly what the paper describes."""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from skinclf.data.splits import Split, content_hash
from skinclf.errors import SkinclfError, first_line
from skinclf.evaluation.metrics import DEFAULT_THRESHOLD
from skinclf.io import atomic_write
from skinclf.run_files import BEST_CHECKPOINT, LAST_CHECKPOINT, METRICS
from skinclf.run_folder import config_differences
from skinclf.training.checkpoint import link_checkpoint, load_checkpoint, save_checkpoint
from skinclf.training.hardware import (
    DATA_SHARE_OF_FREE_GPU_MEMORY,
    autocast,
    data_fits_on_device,
    input_dtype,
)
from skinclf.training.progress import progress
from skinclf.training.recipe import (
    FlipTTA,
    Recipe,
    WeightEMA,
    build_optimizer,
    build_scheduler,
    mixup,
    pretrained_parameters,
)

log = logging.getLogger(__name__)

METRICS_COLUMNS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds"]


@dataclass
class LoopSettings:
    """What the loop needs to know besides model and data (from cfg.trainer / cfg.optim)."""

    max_epochs: int = 30
    patience: int = 10
    batch_size: int = 64
    eval_batch_size: int = 256
    lr: float = 1e-4
    weight_decay: float = 0.0
    precision: str = "fp32"
    channels_last: bool = True
    progress: str = "auto"
    seed: int = 0
    # last.pt (what a resume needs) is written every this many epochs and after the last one.
    checkpoint_every: int = 1
    # Weight of MEL (positive) examples in the training loss (BCE pos_weight); None = unweighted,
    # the paper's. Reported losses stay unweighted so runs remain comparable.
    pos_weight: float | None = None
    # Optimizer, schedule, mixup, weight EMA and TTA (cfg.recipe); the default is the paper's.
    recipe: Recipe = field(default_factory=Recipe)


@dataclass
class EarlyStopping:
    """Tracks the best validation accuracy; ``should_stop`` after ``patience`` epochs without one."""

    patience: int
    best_val_acc: float = -1.0
    best_epoch: int = 0
    bad_epochs: int = 0

    def update(self, epoch: int, val_acc: float) -> bool:
        """Record an epoch; True when it is a new best."""
        if val_acc > self.best_val_acc:
            self.best_val_acc, self.best_epoch, self.bad_epochs = val_acc, epoch, 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.bad_epochs >= self.patience


@dataclass
class FitResult:
    best_epoch: int
    best_val_acc: float
    epochs_run: int


def memory_format(settings: LoopSettings) -> torch.memory_format:
    """The layout batches are fed in. Pipelines produce channels-last (the fast path); with
    ``trainer.channels_last=false`` the loop feeds the default NCHW layout instead, so that the
    plain path is plain all through (a channels-last input would make convolutions run
    channels-last even with NCHW weights)."""
    return torch.channels_last if settings.channels_last else torch.contiguous_format


@torch.inference_mode()
def forward_batches(
    model: nn.Module,
    pipeline: Any,
    images: torch.Tensor,
    settings: LoopSettings,
    device: torch.device,
    out_dtype: torch.dtype = torch.float32,
    desc: str | None = None,
) -> torch.Tensor:
    """``model``'s outputs (``out_dtype``, on CPU) for a split's inputs, in eval mode, large batches,
    no augmentation; a progress bar when ``desc`` is given."""
    model.eval()
    forward_ctx, dtype = autocast(settings.precision, device), input_dtype(settings.precision)
    layout = memory_format(settings)
    out = []
    starts = range(0, len(images), settings.eval_batch_size)
    for start in progress(starts, mode=settings.progress if desc else "never", desc=desc, unit="batch"):
        batch = images[start : start + settings.eval_batch_size].to(device, non_blocking=True)
        x = pipeline.eval_batch(batch, dtype).contiguous(memory_format=layout)
        with forward_ctx():
            out.append(model(x).to(out_dtype).cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=out_dtype)


def predict_logits(
    model: nn.Module,
    pipeline: Any,
    images: torch.Tensor,
    settings: LoopSettings,
    device: torch.device,
) -> torch.Tensor:
    """Logits (float32, on CPU) for uint8 images, in eval mode, large batches, no training
    augmentation; averaged over flips when the recipe has test-time augmentation."""
    if settings.recipe.tta:
        model = FlipTTA(model)
    return forward_batches(model, pipeline, images, settings, device).flatten()


def evaluate(
    model: nn.Module, pipeline: Any, split: Split, settings: LoopSettings, device: torch.device
) -> tuple[float, float, np.ndarray]:
    """(mean BCE loss, accuracy at p >= 0.5, MEL probabilities) on a split."""
    logits = predict_logits(model, pipeline, split.images, settings, device)
    # The logits come back on the CPU; on CUDA, fit has moved the split's labels to the GPU.
    labels = split.labels.cpu()
    loss = F.binary_cross_entropy_with_logits(logits, labels).item()
    acc = (predicted_mel(logits) == labels).float().mean().item()
    return loss, acc, torch.sigmoid(logits).numpy()


def predicted_mel(logits: torch.Tensor) -> torch.Tensor:
    """1.0 where a logit calls MEL (float32 sigmoid >= 0.5, as the test metrics and the report
    count it from the probabilities), else 0.0. "logit >= 0" differs where float32's sigmoid rounds
    a small negative logit up to 0.5; training and validation accuracy use this one rule."""
    return (torch.sigmoid(logits.float()) >= DEFAULT_THRESHOLD).float()


def train_one_epoch(
    model: nn.Module,
    pipeline: Any,
    split: Split,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    generator: torch.Generator,
    settings: LoopSettings,
    device: torch.device,
    desc: str,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    ema: WeightEMA | None = None,
) -> tuple[float, float]:
    """One pass over ``split`` in shuffled batches: (mean training loss, training accuracy)."""
    model.train()
    forward_ctx, dtype = autocast(settings.precision, device), input_dtype(settings.precision)
    layout = memory_format(settings)
    # Batches are gathered where the split lives (the GPU when it fits there), then moved.
    order = torch.randperm(len(split), generator=generator).to(split.images.device)
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device)
    pos_weight = None if settings.pos_weight is None else torch.tensor(settings.pos_weight, device=device)
    starts = range(0, len(split), settings.batch_size)
    for start in progress(starts, mode=settings.progress, desc=desc, unit="batch"):
        idx = order[start : start + settings.batch_size]
        x = pipeline.train_batch(split.images_at(idx).to(device, non_blocking=True), generator, dtype)
        x = x.contiguous(memory_format=layout)
        y = split.labels.index_select(0, idx).to(device, non_blocking=True)
        target = y
        if settings.recipe.mixup_alpha > 0:
            x, target = mixup(x, y, settings.recipe.mixup_alpha, generator)
        with forward_ctx():
            logits = model(x).flatten()
        # Loss in fp32 whatever the forward precision.
        loss = F.binary_cross_entropy_with_logits(logits.float(), target, pos_weight=pos_weight)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if scheduler is not None:
            scheduler.step()
        if ema is not None:
            ema.update(model)
        if pos_weight is not None:  # reported unweighted, so that runs stay comparable
            loss = F.binary_cross_entropy_with_logits(logits.detach().float(), target)
        # Accumulated on the device: no host sync per step.
        loss_sum += loss.detach() * len(idx)
        correct += (predicted_mel(logits.detach()) == y).sum()
    return loss_sum.item() / len(split), correct.item() / len(split)


def place_splits(train: Split, val: Split, device: torch.device) -> tuple[Split, Split]:
    """On CUDA, the splits (uint8 images, or vgg16's cached features) on the GPU when they fit
    there (moved once, not every batch), else left in CPU memory, each batch then copied over.
    Logs which. Elsewhere the splits as they are."""
    if device.type != "cuda":
        return train, val
    data_bytes = sum(t.nbytes for split in (train, val) for t in (split.images, split.labels))
    free_bytes, _ = torch.cuda.mem_get_info(device)
    if data_fits_on_device(data_bytes, free_bytes):
        log.info(f"data: train and val ({data_bytes / 2**20:.0f} MB) moved to {device} once")
        return train.to(device), val.to(device)
    log.info(
        f"data: train and val ({data_bytes / 2**20:.0f} MB) stay in CPU memory, more than "
        f"{DATA_SHARE_OF_FREE_GPU_MEMORY:.0%} of {device}'s free {free_bytes / 2**20:.0f} MB; "
        "batches are copied over one by one"
    )
    return train, val


def _foreign_config(stored: Any, own: Any) -> list[str]:
    """The keys in which a checkpoint's config differs from this run's (none where either lacks
    one: checkpoints of a plain ``fit``, or of a skinclf version before configs were stored)."""
    if not (isinstance(stored, dict) and isinstance(own, dict)):
        return []
    return config_differences(stored, own)


def _rng_state(generator: torch.Generator, device: torch.device) -> dict[str, torch.Tensor]:
    state = {"generator": generator.get_state(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, torch.Tensor], generator: torch.Generator, device: torch.device) -> None:
    # The checkpoint was loaded onto the run's device, but RNG states are CPU byte tensors always.
    generator.set_state(state["generator"].cpu())
    torch.set_rng_state(state["torch"].cpu())
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


def _check_finite(loss: float, split: str, epoch: int) -> None:
    """A nan or infinite loss means the weights have diverged: every later epoch, the checkpoint
    and the test metrics would be meaningless (and metrics such as ROC AUC refuse NaN scores)."""
    if not math.isfinite(loss):
        raise SkinclfError(
            f"epoch {epoch}: the {split} loss is {loss}: training diverged; expected finite losses "
            "(a lower optim.lr, or trainer.precision=fp32, may help)"
        )


def _write_metrics(path: Path, history: list[dict[str, float]]) -> None:
    # METRICS_COLUMNS, then any the recipe adds (the raw weights' validation scores beside an EMA).
    columns = list(history[0]) if history else METRICS_COLUMNS
    # Rewritten whole every epoch, atomically: `skinclf report` may read it while the run goes on.
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=columns)
    writer.writeheader()
    writer.writerows(history)
    atomic_write(path, lambda tmp: tmp.write_bytes(text.getvalue().encode()))


def fit(
    model: nn.Module,
    pipeline: Any,
    train: Split,
    val: Split,
    settings: LoopSettings,
    device: torch.device,
    out_dir: Path,
    extra_state: dict[str, Any] | None = None,
    resume: bool = False,
    checkpoint_model: nn.Module | None = None,
    data_hash: str | None = None,
) -> FitResult:
    """Train with early stopping. Writes metrics.csv, last.pt (every ``checkpoint_every`` epochs
    and after the last) and best.pt into ``out_dir``; with ``resume``, continues exactly from
    last.pt, redoing any epochs trained after it.

    ``checkpoint_model``: the module whose state dict the checkpoints hold, when ``model`` is only
    its trained part (a head on cached features); it must contain ``model``. Default: ``model``.
    ``data_hash``: :func:`content_hash` of the images the splits come from, which last.pt records
    and a resume compares (cached features differ with the machine: hash the images they came
    from). Default: that of ``train`` and ``val``.

    With an EMA of the weights (``recipe.ema``), the averaged weights are the ones validated for
    early stopping, saved in best.pt and so tested; the raw weights' validation loss and accuracy
    are logged beside them (metrics.csv ``val_loss_raw``, ``val_acc_raw``). last.pt holds the raw
    weights and the EMA, so that resuming continues both.
    """
    extra_state = extra_state or {}
    saved = model if checkpoint_model is None else checkpoint_model
    data_hash = data_hash or content_hash(train, val)
    train, val = place_splits(train, val, device)
    model.to(device)
    if settings.channels_last:
        model.to(memory_format=torch.channels_last)
    recipe = settings.recipe
    # A pretrained body (of the whole model, even when only a head on cached features trains)
    # may train at a lower learning rate than the new layers.
    optimizer = build_optimizer(
        model, settings.lr, settings.weight_decay, recipe, pretrained_parameters(saved)
    )
    scheduler = build_scheduler(
        optimizer, recipe, math.ceil(len(train) / settings.batch_size), settings.max_epochs
    )
    ema = WeightEMA(model, recipe.ema_decay) if recipe.ema else None
    # Loss scaling only matters for fp16; for other precisions the scaler is a pass-through.
    scaler = torch.amp.GradScaler(device.type, enabled=settings.precision == "fp16")
    generator = torch.Generator().manual_seed(settings.seed)
    stopper = EarlyStopping(settings.patience)
    history: list[dict[str, float]] = []
    start_epoch = 1

    last_path, best_path, metrics_path = (
        out_dir / LAST_CHECKPOINT,
        out_dir / BEST_CHECKPOINT,
        out_dir / METRICS,
    )
    if resume and last_path.exists():
        state = load_checkpoint(last_path, map_location=device)
        # Absent from checkpoints of skinclf versions before it: not checked there.
        if state.get("data_sha256", data_hash) != data_hash:
            raise SkinclfError(
                f"{last_path}: trained on other images or labels than the data gives now (files "
                "changed, moved between classes or splits, or decoded by another Pillow version); "
                "expected the same data to resume: start a new run for the new data"
            )
        # The folder's config matched (it was claimed): a last.pt of another config was copied in.
        foreign = _foreign_config(state.get("config"), extra_state.get("config"))
        if foreign:
            raise SkinclfError(
                f"{last_path}: is not this run's checkpoint: its config differs in {', '.join(foreign[:5])}; "
                "expected the last.pt this run wrote"
            )
        try:
            saved.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, KeyError, ValueError) as err:  # a checkpoint of another model
            raise SkinclfError(
                f"{last_path}: does not fit this run's model ({first_line(err)}); expected the last.pt "
                "this run wrote"
            ) from err
        scaler.load_state_dict(state["scaler"])
        for key, part in (("scheduler", scheduler), ("ema", ema)):
            if part is not None:
                if key not in state:
                    # The run's config matched (its folder was claimed), so its last.pt was written
                    # by an older skinclf (before warm-up applied to the constant schedule, it
                    # saved no scheduler state for it) or copied in from another recipe's run.
                    raise SkinclfError(
                        f"{last_path}: holds no {key} state, which this recipe needs (written by an "
                        "older skinclf that trained this recipe without one, or copied from a run of "
                        "another recipe); expected a last.pt of this run: start a new run"
                    )
                part.load_state_dict(state[key])
        _set_rng_state(state["rng"], generator, device)
        stopper = EarlyStopping(**state["early_stopping"])
        history = state["history"]
        start_epoch = state["epoch"] + 1
        # Rows written after the checkpoint (a crash mid-epoch) are dropped with the epoch.
        _write_metrics(metrics_path, history)
        log.info(f"resuming from {last_path} after epoch {state['epoch']}")
    elif resume:
        # Also a sweep re-launch's job that never started (re-launches set resume for every job).
        log.info(f"nothing to resume ({last_path} does not exist yet): starting from epoch 1")

    for epoch in range(start_epoch, settings.max_epochs + 1):
        if stopper.should_stop:
            break
        t0 = time.perf_counter()
        desc = f"epoch {epoch}/{settings.max_epochs}"
        # The rate of the epoch's first step (a schedule changes it every step): read after the
        # epoch, a cosine run's last row would say 0, as if that epoch had not trained.
        lr = optimizer.param_groups[0]["lr"]
        train_loss, train_acc = train_one_epoch(
            model, pipeline, train, optimizer, scaler, generator, settings, device, desc, scheduler, ema
        )
        _check_finite(train_loss, "training", epoch)
        # SPEC: a checkpoint holds model, optimizer, epoch and config; best.pt those (with what
        # predict needs), last.pt also all that a resume needs.
        common = {
            "epoch": epoch,
            "pipeline": pipeline.state_dict(),
            **extra_state,
            "optimizer": optimizer.state_dict(),
        }
        raw_scores = {}
        if ema is not None:
            raw_loss, raw_acc, _ = evaluate(model, pipeline, val, settings, device)
            raw_scores = {"val_loss_raw": round(raw_loss, 6), "val_acc_raw": round(raw_acc, 6)}
        # With an EMA, its averaged weights are the ones validated, selected and saved as best
        # (the optimizer state saved with them is the raw weights' that the EMA follows).
        with ema.applied(model) if ema is not None else contextlib.nullcontext():
            val_loss, val_acc, _ = evaluate(model, pipeline, val, settings, device)
            _check_finite(val_loss, "validation", epoch)
            is_best = stopper.update(epoch, val_acc)
            seconds = time.perf_counter() - t0  # training and validation; checkpoint writes not
            if is_best:
                best = {"model": saved.state_dict(), **common, "val_acc": val_acc}
                if ema is not None:
                    save_checkpoint(best, best_path)
        row = {
            "epoch": epoch,
            "train_loss": round(train_loss, 6),
            "train_acc": round(train_acc, 6),
            "val_loss": round(val_loss, 6),
            "val_acc": round(val_acc, 6),
            "lr": lr,
            "seconds": round(seconds, 3),
            **raw_scores,
        }
        history.append(row)
        last_epoch = stopper.should_stop or epoch == settings.max_epochs
        write_last = last_epoch or epoch % settings.checkpoint_every == 0
        last = {}
        if write_last:
            recipe_state = {
                k: v.state_dict() for k, v in (("scheduler", scheduler), ("ema", ema)) if v is not None
            }
            last = {
                "model": saved.state_dict(),
                **common,
                **recipe_state,
                "scaler": scaler.state_dict(),
                "rng": _rng_state(generator, device),
                "early_stopping": asdict(stopper),
                "history": history,
                "data_sha256": data_hash,
            }
        if is_best and ema is None:
            # Same weights in both: one file (best.pt first, as a crash between the two writes
            # always left it) that last.pt becomes a second name of. vgg16's checkpoints are
            # 1.3 GB: an improving epoch writes them once.
            save_checkpoint({**last, **best}, best_path)
            if write_last:
                link_checkpoint(best_path, last_path)
        elif write_last:
            save_checkpoint(last, last_path)
        _write_metrics(metrics_path, history)
        log.info(
            f"epoch {epoch:>2}/{settings.max_epochs} train_loss {train_loss:.4f} train_acc {train_acc:.4f} "
            f"val_loss {val_loss:.4f} val_acc {val_acc:.4f} ({row['seconds']:.1f}s)"
            + (f" raw-weights val_acc {raw_scores['val_acc_raw']:.4f}" if raw_scores else "")
            + (" *best*" if is_best else "")
        )
    if stopper.should_stop:
        log.info(f"early stopping: no better validation accuracy for {settings.patience} epochs")
    return FitResult(stopper.best_epoch, stopper.best_val_acc, len(history))
