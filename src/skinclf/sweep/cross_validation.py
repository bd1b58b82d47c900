"""Stratified k-fold cross-validation on the training split: the inner loop of the grid search.

Paper section 2: batch size and learning rate "were chosen by cross-validated grid search".
Each grid point is one sweep job (conf/hparams_search/grid.yaml) that runs this instead of the
usual train-and-test. Only the training split goes into the folds (the dataset's validation and
test splits are loaded with it, then dropped), so the test split can never influence which
hyperparameters win.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from skinclf.config import number_setting
from skinclf.data import ImageSplits, Split, load_splits
from skinclf.data.splits import content_hash
from skinclf.errors import SkinclfError
from skinclf.io import atomic_write_json
from skinclf.run_files import BEST_CHECKPOINT, CV_RESULT, FOLD_RESULT, FOLDS_RECORD, LAST_CHECKPOINT
from skinclf.training.environment import UNKNOWN, environment_history, recorded_environments
from skinclf.training.hardware import resolve_device
from skinclf.training.loop import LoopSettings, fit
from skinclf.training.progress import progress_mode

log = logging.getLogger("skinclf")


def stratified_folds(
    labels: np.ndarray, k: int, seed: int, lesions: np.ndarray | None = None
) -> list[tuple[np.ndarray, np.ndarray]]:
    """``k`` (train indices, validation indices) pairs: disjoint validation folds that cover every
    image once, each with the class ratio of ``labels``; the same for the same seed.

    With ``lesions`` (the lesion of each image), all images of a lesion fall in one fold: a
    lesion photographed twice, in training and validation, would be partly recognised rather than
    classified, and favour the grid points that memorise most. The class ratios are then met as
    closely as the lesions allow (scikit-learn's StratifiedGroupKFold)."""
    labels = np.asarray(labels).astype(int)
    if lesions is None:
        smallest, unit = int(np.bincount(labels, minlength=2).min()), "images"
    else:
        smallest, unit = min(len(set(lesions[labels == c])) for c in (0, 1)), "lesions"
    if k < 2 or k > smallest:
        raise SkinclfError(
            f"cv.folds={k}: expected 2 <= k <= {smallest} (the smaller class of the training split has "
            f"{smallest} {unit}, and every fold needs at least one of each class)"
        )
    # Here: sklearn is slow to import.
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    if lesions is None:
        splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
        return list(splitter.split(np.zeros(len(labels)), labels))
    grouped = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    folds = list(grouped.split(np.zeros(len(labels)), labels, groups=lesions))
    # Its greedy spread does not promise both classes in every fold (lesions of mixed labels).
    for i, (_, val) in enumerate(folds):
        for label, name in ((1, "MEL"), (0, "NV")):
            if not (labels[val] == label).any():
                raise SkinclfError(
                    f"cv.folds={k}: fold {i} gets no {name} image (its lesions could not be spread "
                    f"over {k} folds); expected fewer folds"
                )
    return folds


def _check_same_folds(out_dir: Path, folds: list[tuple[np.ndarray, np.ndarray]], grouped: bool) -> None:
    """A grid point resumes only on the folds it began with: a fold's result or checkpoint from
    other folds (the data or its manifest.csv changed, or the point began before skinclf kept
    lesions whole) would be averaged with, or go on training on, images now in its validation
    part. Records the folds in FOLDS_RECORD on the first start."""
    digest = hashlib.sha256()
    for _, val in folds:
        digest.update(np.asarray(val, dtype=np.int64).tobytes() + b"|")
    record = {"images": int(sum(len(val) for _, val in folds)), "folds_sha256": digest.hexdigest()}
    path = out_dir / FOLDS_RECORD
    if path.exists():
        if json.loads(path.read_text()) != record:
            raise SkinclfError(
                f"{out_dir}: its folds were drawn from other images or lesions than this launch's "
                "(data.root's images or manifest.csv changed since the grid point began); use a new "
                "hydra.sweep.dir"
            )
        return
    # Begun by a skinclf that kept no record: its folds match only where they did not group lesions.
    if grouped and any(out_dir.glob("fold_*/*")):
        raise SkinclfError(
            f"{out_dir}: began before skinclf kept each lesion's images in one fold, so its finished "
            "folds let lesions into both parts; use a new hydra.sweep.dir"
        )
    atomic_write_json(record, path)


def subset(split: Split, indices: np.ndarray) -> Split:
    """The images of ``split`` at ``indices``, as a Split of their own."""
    idx = torch.as_tensor(indices, dtype=torch.long)
    return Split(split.images_at(idx), split.labels.index_select(0, idx))


def _fit_fold(
    cfg: DictConfig,
    fold_splits: ImageSplits,
    fold: int,
    fold_dir: Path,
    device: torch.device,
    settings: LoopSettings,
    environment: dict[str, Any],
) -> dict[str, Any]:
    """Train a fresh model on one fold (resumable, like a run); its fold_result.json record: best
    validation accuracy, and where it trained."""
    # train.py dispatches here, so a top-level import would be circular.
    from skinclf.train import prepare_training

    done = fold_dir / FOLD_RESULT
    if cfg.resume and done.exists():
        return json.loads(done.read_text())
    # Same initialisation in every fold: the folds then differ only in their data.
    torch.manual_seed(int(cfg.seed))
    # A copy: prepare_training sets the fold's own class weights on it.
    settings = replace(settings)
    environments = environment_history(
        fold_dir / LAST_CHECKPOINT,
        environment,
        bool(cfg.resume),
        settings.max_epochs,
        FOLD_RESULT,
        tested=False,
    )
    # Exactly as a run trains, with statistics (normalisation, class weights) from the fold's
    # training part only.
    model, stage = prepare_training(cfg, fold_splits, settings, device)
    config = OmegaConf.to_container(cfg, resolve=True)
    result = fit(
        stage.module,
        stage.pipeline,
        stage.splits.train,
        stage.splits.val,
        settings,
        device,
        fold_dir,
        extra_state={
            "config": config,
            "fold": fold,
            "precision": settings.precision,
            "environments": environments,
        },
        resume=bool(cfg.resume),
        checkpoint_model=model,
        data_hash=content_hash(fold_splits.train, fold_splits.val),
    )
    record = {
        "fold": fold,
        "best_val_acc": result.best_val_acc,
        "best_epoch": result.best_epoch,
        "precision": settings.precision,
        # As a run's test_metrics.json: where the fold ended, and each it trained in if several.
        **recorded_environments(environment, environments),
    }
    atomic_write_json(record, done)
    # Only the accuracy matters for model selection: drop the checkpoints (a full grid of
    # them would take gigabytes). metrics.csv stays for inspection.
    for name in (BEST_CHECKPOINT, LAST_CHECKPOINT):
        (fold_dir / name).unlink(missing_ok=True)
    log.info(f"fold {fold}: best validation accuracy {result.best_val_acc:.4f} (epoch {result.best_epoch})")
    return record


def _fold_environment(record: dict[str, Any]) -> dict[str, Any] | list[dict[str, Any]]:
    """What a finished fold trained in (its fold_result.json ``record``): its environments where
    several, else its environment; unknown where it holds neither (written before skinclf recorded
    them)."""
    return record.get("environments", record.get("environment", dict(UNKNOWN)))


def cross_validate(cfg: DictConfig, out_dir: Path) -> dict:
    """k-fold CV (k = cv.folds) of one configuration on the training split.

    Writes ``fold_<i>/`` (each a training run's metrics.csv) and ``cv_result.json`` (per-fold and
    mean ± std validation accuracy) into ``out_dir``, and returns that result. Folds depend only
    on the labels, the lesions (where known) and ``seed``. std is the population std (ddof=0), as
    scikit-learn's GridSearchCV.
    """
    from skinclf.train import log_setup, loop_settings, run_precision  # lazily: train.py dispatches here

    device = resolve_device(str(cfg.device))
    # Every fold in the precision the job began in, should a resume run where auto picks another.
    records = [
        *sorted(out_dir.glob(f"fold_*/{FOLD_RESULT}")),
        *sorted(out_dir.glob(f"fold_*/{LAST_CHECKPOINT}")),
    ]
    precision = run_precision(cfg, device, records)
    settings = loop_settings(cfg, precision)  # refuses bad settings before the data loads
    k, seed = number_setting(cfg, "cv.folds", int), settings.seed
    environment = log_setup(cfg, device, settings)
    # Keep the training split only: the test split must not take part in choosing hyperparameters
    # (the loaders decode every split; a corrupt test image still stops the grid point here).
    with progress_mode(settings.progress):  # decoding a folder dataset's images
        splits = load_splits(cfg.data)
    name, train = splits.name, splits.train
    del splits
    folds = stratified_folds(train.labels.numpy(), k, seed, train.lesions)
    _check_same_folds(out_dir, folds, grouped=train.lesions is not None)
    grouping = "" if train.lesions is None else f", {len(set(train.lesions))} lesions kept whole"
    log.info(
        f"{k}-fold cross-validation of model={cfg.model.name} batch_size={cfg.data.batch_size} "
        f"lr={cfg.optim.lr} on the training split ({len(train)} images{grouping}), device={device}"
    )
    fold_records = [
        _fit_fold(
            cfg,
            ImageSplits(name, subset(train, tr), subset(train, va)),
            i,
            out_dir / f"fold_{i}",
            device,
            settings,
            environment,
        )
        for i, (tr, va) in enumerate(folds)
    ]
    # Folds an earlier launch finished keep the environment they trained in: a mean over folds of
    # several environments is said, as a run resumed in another is.
    accs = [float(record["best_val_acc"]) for record in fold_records]
    fold_environments = [_fold_environment(record) for record in fold_records]
    others = [str(i) for i, recorded in enumerate(fold_environments) if recorded != environment]
    first = fold_environments[0]
    if others and all(isinstance(e, dict) and e == first != UNKNOWN for e in fold_environments):
        log.info(f"every fold trained in an earlier launch's environment ({CV_RESULT} lists it)")
    elif others:
        log.warning(
            f"{'fold' if len(others) == 1 else 'folds'} {', '.join(others)} trained in another "
            "environment than this launch's, in several, or in one not recorded: the mean may differ "
            f"from that of folds all trained in one ({CV_RESULT} lists each fold's)"
        )
    result = {
        "folds": k,
        "fold_val_acc": accs,
        "mean_val_acc": float(np.mean(accs)),
        "std_val_acc": float(np.std(accs)),
        "model": str(cfg.model.name),
        "batch_size": int(cfg.data.batch_size),
        "lr": float(cfg.optim.lr),
        "seed": seed,
        "n_train": len(train),
        # Where this launch ran; each fold's own where the folds' differ.
        "environment": environment,
        **({"fold_environments": fold_environments} if others else {}),
    }
    atomic_write_json(result, out_dir / CV_RESULT)
    log.info(
        f"cross-validation: validation accuracy {result['mean_val_acc']:.4f} ± {result['std_val_acc']:.4f} "
        f"over {k} folds"
    )
    return result
