"""One run of a paper combination from its composed config (the work of `skinclf train`, whose
command line, run folder and sweep jobs :mod:`skinclf.train_command` handles).

The data flows: source (cfg.data) -> decoded uint8 splits -> pipeline of the model
(cfg.model.pipeline) -> architecture (cfg.model.arch) -> the shared loop -> run files.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from skinclf.config import (
    check_bool,
    config_choices,
    data_path,
    grid_search_without_folds,
    instantiate_config,
    interpolated_strings,
    number_setting,
)
from skinclf.data import ImageSplits, load_splits
from skinclf.data.dermoscopy import recipe_pipeline
from skinclf.data.features import TrainingStage, training_stage
from skinclf.data.splits import content_hash
from skinclf.data.synthetic import synthetic_settings
from skinclf.errors import SkinclfError, first_line
from skinclf.evaluation.metrics import binary_metrics
from skinclf.evaluation.roc_pr import write_run_curves
from skinclf.evaluation.threshold import threshold_for_sensitivity
from skinclf.io import atomic_write_json, atomic_write_text
from skinclf.models import build_model, check_model_config, check_model_output
from skinclf.run_files import BEST_CHECKPOINT, LAST_CHECKPOINT, PREDICTIONS, TEST_METRICS
from skinclf.sweep import resources
from skinclf.sweep.cross_validation import cross_validate
from skinclf.training.allocator import keep_freed_memory
from skinclf.training.checkpoint import load_checkpoint
from skinclf.training.environment import (
    describe_environment,
    environment_history,
    recorded_environments,
    run_environment,
)
from skinclf.training.hardware import resolve_device, resolve_precision
from skinclf.training.loop import LoopSettings, evaluate, fit
from skinclf.training.progress import PROGRESS_MODES, progress_mode
from skinclf.training.recipe import Recipe

log = logging.getLogger("skinclf")

# True/false settings, checked before the run folder is claimed (those a dataset lacks are skipped).
SWITCHES = (
    "resume",
    "trainer.channels_last",
    "trainer.keep_freed_memory",
    "data.decode_cache",
    "data.skip_bad_images",
    "data.balance_train",
    "data.class_weighted_loss",
)


def loop_settings(cfg: DictConfig, precision: str) -> LoopSettings:
    """The training loop's settings from ``cfg``; a SkinclfError names a value that is not a
    number, a count below 1, or a learning rate or weight decay the optimizer would refuse."""
    settings = LoopSettings(
        max_epochs=number_setting(cfg, "trainer.max_epochs", int),
        patience=number_setting(cfg, "trainer.patience", int),
        batch_size=number_setting(cfg, "data.batch_size", int),
        eval_batch_size=number_setting(cfg, "trainer.eval_batch_size", int),
        lr=number_setting(cfg, "optim.lr", float),
        weight_decay=number_setting(cfg, "optim.weight_decay", float),
        precision=precision,
        channels_last=bool(cfg.trainer.channels_last),  # checked by check_settings before training
        progress=str(cfg.trainer.progress),
        seed=number_setting(cfg, "seed", int),
        checkpoint_every=number_setting(cfg, "trainer.checkpoint_every", int),
        recipe=Recipe.from_config(cfg.get("recipe", {})),
    )
    sizes = {
        "trainer.max_epochs": settings.max_epochs,
        "trainer.patience": settings.patience,
        "data.batch_size": settings.batch_size,
        "trainer.eval_batch_size": settings.eval_batch_size,
        "trainer.checkpoint_every": settings.checkpoint_every,
    }
    for key, value in sizes.items():
        if value < 1:
            raise SkinclfError(f"{key}={value}: must be at least 1")
    if settings.progress not in PROGRESS_MODES:
        raise SkinclfError(
            f"trainer.progress={settings.progress}: expected one of {', '.join(PROGRESS_MODES)}"
        )
    for key, value in {"optim.lr": settings.lr, "optim.weight_decay": settings.weight_decay}.items():
        if not value >= 0:  # as torch.optim refuses them, but before the data loads
            raise SkinclfError(f"{key}={value}: must be 0 or more")
    return settings


def target_sensitivity(cfg: DictConfig) -> float:
    """eval.target_sensitivity, checked before training rather than after it."""
    target = number_setting(cfg, "eval.target_sensitivity", float)
    if not 0 < target <= 1:
        raise SkinclfError(f"eval.target_sensitivity={target}: expected a fraction above 0, at most 1")
    return target


def prepare_training(
    cfg: DictConfig, splits: ImageSplits, settings: LoopSettings, device: torch.device
) -> tuple[torch.nn.Module, TrainingStage]:
    """The model and what the loop trains on ``splits``; statistics from ``splits.train`` only.

    Shared by run() and the grid search's cross-validation folds, so that both train alike.
    """
    if cfg.data.get("class_weighted_loss", False):
        settings.pos_weight = splits.train.pos_weight()
        log.info(f"class-weighted loss: MEL examples weigh {settings.pos_weight:.3f} (NV/MEL of train)")
    # The model's pipeline, or the recipe's augmentation around it (keeping its normalisation).
    pipeline = recipe_pipeline(instantiate_config(cfg.model.pipeline), cfg.recipe.augment)
    pipeline.fit(splits.train.images)
    try:
        model = build_model(cfg.model)
    except InstantiationException as err:
        # A key added beside a shipped model's _target_ (+model.arch.NAME=...), which the checks
        # let through to its constructor, refused there: one line, and the refused run's folder
        # goes. (A model of the user's own is built on the meta device before the folder is claimed.)
        raise SkinclfError(f"model={cfg.model.name}: {first_line(err)}") from err
    # A model with a frozen front end (vgg16) trains only its head, on the front end's outputs
    # computed once and cached; any other model trains whole, on the images (stage = as given).
    stage = training_stage(model, pipeline, splits, data_path(cfg.data, "cache_dir"), settings, device)
    return model, stage


def run_precision(cfg: DictConfig, device: torch.device, records: Sequence[Path]) -> str:
    """The precision a run (or grid-search job) trains in. ``auto`` picks by hardware, except that
    a resumed run keeps the precision it began in: one run, one precision, whichever machine goes
    on with it (a resume may run elsewhere, and bf16 and fp32 give different numbers).

    ``records``: files of the run that name the precision it trained in so far, the first that
    exists counts: checkpoints (read through mmap: vgg16's last.pt is 1.3 GB) or JSON results.
    """
    precision = resolve_precision(str(cfg.trainer.precision), device)
    if cfg.trainer.precision != "auto" or not cfg.resume:
        return precision
    for record in (path for path in records if path.is_file()):
        if record.suffix == ".json":
            began = json.loads(record.read_text()).get("precision")
        else:
            began = load_checkpoint(record, mmap=True).get("precision")
        if began not in ("bf16", "fp32"):  # what auto can pick; absent from older records
            continue
        if began != precision:
            log.warning(
                f"{record} was trained in {began}: the resume goes on in {began}, not in the "
                f"{precision} that trainer.precision=auto picks on this machine ({device})"
            )
        return began
    return precision


def data_digests(cfg: DictConfig, splits: ImageSplits) -> dict[str, str]:
    """What a run's scores were measured on (validation and test images and labels) and what it
    learned from: the report tells runs of other such data apart. ``data.balance_train`` draws
    its training subset with the seed by design (each seed would seem to learn from other data):
    such a run records the training split its subset is drawn from, or none where the loader
    does not say it."""
    evaluated = [split for split in (splits.val, splits.test) if split is not None]
    digests = {"eval_data_sha256": content_hash(*evaluated)}
    if not OmegaConf.select(cfg, "data.balance_train", default=False):
        digests["train_data_sha256"] = content_hash(splits.train)
    elif splits.train_drawn_from is not None:
        digests["train_data_sha256"] = splits.train_drawn_from
    return digests


def log_setup(cfg: DictConfig, device: torch.device, settings: LoopSettings) -> dict[str, Any]:
    """A run's (or grid point's) first log lines: what it trains, on what, in which precision and
    layout, and the versions and machine its numbers come from (returned, with the precision
    that auto picks by hardware and the layout, for its records)."""
    log.info(
        f"model={cfg.model.name} data={cfg.data.name} seed={cfg.seed} device={device} "
        f"precision={settings.precision} channels_last={settings.channels_last}"
    )
    environment = run_environment(device)
    log.info(describe_environment(environment))
    return {**environment, "precision": settings.precision, "channels_last": settings.channels_last}


def run(cfg: DictConfig, out_dir: Path) -> dict:
    """Train and test one combination; writes the run files into ``out_dir`` and returns the test metrics."""
    device = resolve_device(str(cfg.device))
    precision = run_precision(cfg, device, [out_dir / LAST_CHECKPOINT])
    settings = loop_settings(cfg, precision)
    target = target_sensitivity(cfg)
    torch.manual_seed(settings.seed)
    environment = log_setup(cfg, device, settings)
    environments = environment_history(
        out_dir / LAST_CHECKPOINT,
        environment,
        bool(cfg.resume),
        settings.max_epochs,
        TEST_METRICS,
        tested=True,
    )

    with progress_mode(settings.progress):  # decoding a folder dataset's images
        splits = load_splits(cfg.data)
    model, stage = prepare_training(cfg, splits, settings, device)
    config = OmegaConf.to_container(cfg, resolve=True)

    result = fit(
        stage.module,
        stage.pipeline,
        stage.splits.train,
        stage.splits.val,
        settings,
        device,
        out_dir,
        extra_state={"config": config, "precision": precision, "environments": environments},
        resume=bool(cfg.resume),
        checkpoint_model=model,
        data_hash=content_hash(splits.train, splits.val),
    )

    # The checkpoint with the best validation accuracy is the one that is tested.
    # mmap: the optimizer state it also holds is never read from disk.
    best = load_checkpoint(out_dir / BEST_CHECKPOINT, mmap=True)
    if best["epoch"] != result.best_epoch:
        # The interrupted attempt wrote best.pt after the checkpoint the resume started from, and
        # no redone epoch beat that checkpoint's best: possible where the redone epochs do not
        # repeat exactly (a GPU's kernels; another thread count). The metrics describe the weights
        # that are tested. Where they trained is best.pt's own record of environments;
        # test_metrics.json's environments is the resumed run's history, as metrics.csv's epochs.
        log.warning(
            f"{BEST_CHECKPOINT} is from epoch {best['epoch']} of the interrupted attempt, which the "
            f"redone epochs did not reproduce (their best: epoch {result.best_epoch}); testing it"
        )
    model.load_state_dict(best["model"])
    _, _, val_probs = evaluate(stage.module, stage.pipeline, stage.splits.val, settings, device)
    threshold = threshold_for_sensitivity(splits.val.labels.numpy(), val_probs, target)
    metrics: dict = {
        "best_epoch": int(best["epoch"]),
        "best_val_acc": float(best["val_acc"]),
        "epochs_run": result.epochs_run,
        "data": splits.name,
        **data_digests(cfg, splits),
        "operating_point": {"target_sensitivity": target, "threshold": threshold},
        # Where the run ended; a run resumed in another environment also lists each it trained in.
        **recorded_environments(environment, environments),
    }
    predictions = [
        pd.DataFrame(
            {
                "split": "val",
                "index": np.arange(len(val_probs)),
                "source": splits.val.sources,
                "label": splits.val.labels.numpy().astype(int),
                "prob_mel": val_probs,
            }
        )
    ]
    if splits.test is None:
        log.info("no test split in this dataset: the run ends after validation")
        metrics["n_test"] = 0
    else:
        _, _, test_probs = evaluate(stage.module, stage.pipeline, stage.splits.test, settings, device)
        labels = splits.test.labels.numpy()
        metrics.update(binary_metrics(labels, test_probs), n_test=len(labels))
        at_threshold = binary_metrics(labels, test_probs, threshold)
        metrics["operating_point"].update(
            test_sensitivity=at_threshold["sensitivity"],
            test_specificity=at_threshold["specificity"],
        )
        predictions.append(
            pd.DataFrame(
                {
                    "split": "test",
                    "index": np.arange(len(labels)),
                    "source": splits.test.sources,
                    "label": labels.astype(int),
                    "prob_mel": test_probs,
                }
            )
        )
        log.info(
            f"test ({len(labels)} images, best epoch {metrics['best_epoch']}): "
            f"accuracy {metrics['accuracy']:.4f} "
            f"f1 {metrics['f1']:.4f} sensitivity {metrics['sensitivity']:.4f} "
            f"specificity {metrics['specificity']:.4f} roc_auc {metrics['roc_auc']:.4f}"
        )
    predictions_table = pd.concat(predictions)
    atomic_write_text(predictions_table.to_csv(index=False), out_dir / PREDICTIONS)
    write_run_curves(predictions_table, out_dir, threshold, title=f"{cfg.model.name}, {splits.name} data")
    atomic_write_json(metrics, out_dir / TEST_METRICS)
    return metrics


def task(cfg: DictConfig, out_dir: Path) -> dict:
    """The work of one run: k-fold cross-validation on the training split when ``cv.folds`` > 0
    (the grid search, conf/hparams_search/grid.yaml), otherwise train and test."""
    if number_setting(cfg, "cv.folds", int) > 0:
        return cross_validate(cfg, out_dir)
    return run(cfg, out_dir)


def run_in_hydra(cfg: DictConfig, out_dir: Path) -> dict:
    """``task`` with this job's share of the hardware: torch threads divided between parallel
    jobs (trainer.num_threads), sweep jobs spread over the GPUs when device=auto (the job's GPU
    made the current one), and, on the CPU, freed memory kept for reuse (trainer.keep_freed_memory)."""
    hydra_cfg = HydraConfig.get()
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    launcher = hydra_cfg.launcher if multirun else None
    threads = resources.threads_per_job(cfg.trainer.num_threads, launcher, resources.available_cores())
    if threads is not None:
        torch.set_num_threads(threads)
    if multirun and torch.cuda.is_available():
        slot = OmegaConf.select(launcher, "slot", default=hydra_cfg.job.num)
        cfg.device = resources.spread_device(str(cfg.device), slot, torch.cuda.device_count())
    device = resolve_device(str(cfg.device))
    # For the CPU's training steps; a GPU run would only hold host memory with it (vgg16's 1.3 GB
    # checkpoint buffers, per job, until it ends).
    if cfg.trainer.keep_freed_memory and device.type == "cpu":
        keep_freed_memory()
    # The job's GPU is the current one while it runs. skinclf's own CUDA calls name their device;
    # this is a safeguard for code that uses "the current GPU" (a library's synchronize or
    # allocation), which would otherwise open a context and take memory on cuda:0, another job's.
    # Only while it runs: the next job of a sequential sweep may be on plain "cuda".
    numbered_gpu = device.type == "cuda" and device.index is not None
    with torch.cuda.device(device) if numbered_gpu else contextlib.nullcontext():
        return task(cfg, out_dir)


def check_settings(cfg: DictConfig) -> None:
    """Every check of ``cfg`` that needs no data: the model config (and a model of the user's own
    on the meta device), device, numbers and sizes, target sensitivity, cv.folds, seed, threads,
    the synthetic data's sizes, the augmentation options and the true/false switches.
    Run before the run folder is claimed, so that a refused run writes nothing into it: a
    resume's folder keeps its record and status, a sweep job's folder takes no config."""
    choices = HydraConfig.get().runtime.choices if HydraConfig.initialized() else {}
    # The choice as typed; a name that does not resolve is check_model_config's to report.
    name = OmegaConf.select(cfg, "model.name", default=None, throw_on_resolution_failure=False)
    model = str(choices.get("model", name))
    check_model_config(cfg.model, f"model={model}")
    if model not in config_choices("model"):  # a model of the user's own (hydra.searchpath)
        check_model_output(cfg.model, f"model={model}")
    try:
        escaped = interpolated_strings(OmegaConf.to_container(cfg, resolve=True))
    except OmegaConfBaseException as err:
        raise SkinclfError(f"the config does not resolve: {first_line(err)}") from err
    if escaped:
        # Stored resolved (run_config.json, best.pt), it would read back as an interpolation:
        # predict could not load the run (it refuses a checkpoint config holding ${).
        raise SkinclfError(
            f"{escaped[0]}: holds '${{' after resolving (an escaped interpolation); expected none"
        )
    device = resolve_device(str(cfg.device))
    seed = loop_settings(cfg, resolve_precision(str(cfg.trainer.precision), device)).seed
    target_sensitivity(cfg)
    folds = number_setting(cfg, "cv.folds", int)
    if folds < 0 or folds == 1:  # -1 would quietly train and test instead of cross-validating
        raise SkinclfError(f"cv.folds={folds}: expected 0 (no cross-validation) or at least 2 folds")
    if folds == 0 and choices.get("hparams_search") is not None:
        raise grid_search_without_folds(choices["hparams_search"])
    if not 0 <= seed < 2**32:
        raise SkinclfError(f"seed={seed}: expected 0 to 2**32 - 1 (what NumPy and scikit-learn take)")
    threads_given = OmegaConf.select(cfg, "trainer.num_threads") is not None
    if threads_given and number_setting(cfg, "trainer.num_threads", int) < 1:
        raise SkinclfError(
            f"trainer.num_threads={cfg.trainer.num_threads}: expected at least 1, or null (auto)"
        )
    if cfg.data.get("name") == "synthetic":
        synthetic_settings(cfg.data)
    # The pipeline's and the recipe's augmentation options, checked as they are built (cheap: no data).
    recipe_pipeline(instantiate_config(cfg.model.pipeline), cfg.recipe.augment)
    # Switches read with bool() further on, where Hydra's `off` or `no` (strings) would count as true.
    for key in SWITCHES:
        value = OmegaConf.select(cfg, key, default=None)
        if value is not None:
            check_bool(key, value)
