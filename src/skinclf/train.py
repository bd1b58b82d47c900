"""`skinclf train`: one run (or, with -m, a sweep) of a paper combination, from Hydra config.

The data flows: source (cfg.data) -> decoded uint8 splits -> pipeline of the model
(cfg.model.pipeline) -> architecture (cfg.model.arch) -> the shared loop -> run files.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import hydra
import numpy as np
import pandas as pd
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from hydra_plugins import skinclf_launcher
from skinclf.config import check_bool, instantiate_config, is_number
from skinclf.data import ImageSplits, load_splits
from skinclf.data.dermoscopy import recipe_pipeline
from skinclf.data.features import TrainingStage, training_stage
from skinclf.data.splits import data_path
from skinclf.errors import EXIT_USER_ERROR, SkinclfError
from skinclf.evaluation.curves import write_run_curves
from skinclf.evaluation.metrics import binary_metrics
from skinclf.evaluation.threshold import threshold_for_sensitivity
from skinclf.io import atomic_write_json, atomic_write_text, remove_empty_folders
from skinclf.models import build_model
from skinclf.run_files import (
    BEST_CHECKPOINT,
    HYDRA_CONFIG,
    HYDRA_DIR,
    HYDRA_OVERRIDES,
    HYDRA_SETTINGS,
    LAST_CHECKPOINT,
    PREDICTIONS,
    TEST_METRICS,
    TRAIN_LOG,
)
from skinclf.sweep import resources
from skinclf.sweep.cross_validation import cross_validate
from skinclf.sweep.jobs import (
    RUN_CONFIG,
    claim_run_dir,
    holds_only_bookkeeping,
    recorded_status,
    run_sweep_job,
)
from skinclf.sweep.summary import SweepSummary, remove_unstarted_sweep
from skinclf.training.allocator import keep_freed_memory
from skinclf.training.checkpoint import load_checkpoint
from skinclf.training.hardware import resolve_device, resolve_precision
from skinclf.training.loop import LoopSettings, evaluate, fit
from skinclf.training.progress import PROGRESS_MODES
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


def number_setting(cfg: DictConfig, key: str, kind: type[int] | type[float]) -> int | float:
    """``cfg``'s dotted ``key`` as an int or a float; a SkinclfError names a value that is not
    one (``trainer.max_epochs=abc``, ``=3.5``, ``=null``, ``optim.lr=inf``) before anything trains."""
    value = OmegaConf.select(cfg, key)
    try:
        if isinstance(value, bool):
            number = None
        elif kind is int and isinstance(value, float):
            number = int(value) if value.is_integer() else None  # 3.5 epochs is a typo, not 3
        else:
            number = kind(value)  # an int as it is (no float round trip for big seeds), or text
    except (TypeError, ValueError, OverflowError):
        number = None
    if number is None:
        raise SkinclfError(f"{key}={value}: expected {'an integer' if kind is int else 'a number'}")
    if not is_number(number):  # optim.lr=inf would train on nan weights without complaint
        raise SkinclfError(f"{key}={value}: expected a finite number")
    return number


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
    model = build_model(cfg.model)
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


def run(cfg: DictConfig, out_dir: Path) -> dict:
    """Train and test one combination; writes the run files into ``out_dir`` and returns the test metrics."""
    device = resolve_device(str(cfg.device))
    precision = run_precision(cfg, device, [out_dir / LAST_CHECKPOINT])
    settings = loop_settings(cfg, precision)
    target = target_sensitivity(cfg)
    torch.manual_seed(settings.seed)
    log.info(
        f"model={cfg.model.name} data={cfg.data.name} seed={cfg.seed} device={device} "
        f"precision={precision} channels_last={settings.channels_last}"
    )

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
        extra_state={"config": config, "precision": precision},
        resume=bool(cfg.resume),
        checkpoint_model=model,
    )

    # The checkpoint with the best validation accuracy is the one that is tested.
    best = load_checkpoint(out_dir / BEST_CHECKPOINT, map_location=device)
    if best["epoch"] != result.best_epoch:
        # The interrupted attempt wrote best.pt after the checkpoint the resume started from, and
        # no redone epoch beat that checkpoint's best: possible only where kernels do not repeat
        # exactly (GPU). The metrics describe the weights that are tested.
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
        "operating_point": {"target_sensitivity": target, "threshold": threshold},
    }
    predictions = [
        pd.DataFrame(
            {
                "split": "val",
                "index": np.arange(len(val_probs)),
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


def _run_in_hydra(cfg: DictConfig, out_dir: Path) -> dict:
    """``task`` with this job's share of the hardware: torch threads divided between parallel
    jobs (trainer.num_threads), sweep jobs spread over the GPUs when device=auto, and freed
    memory kept for reuse (trainer.keep_freed_memory)."""
    hydra_cfg = HydraConfig.get()
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    launcher = hydra_cfg.launcher if multirun else None
    threads = resources.threads_per_job(cfg.trainer.num_threads, launcher, resources.available_cores())
    if threads is not None:
        torch.set_num_threads(threads)
    if cfg.trainer.keep_freed_memory:
        keep_freed_memory()
    if multirun and torch.cuda.is_available():
        cfg.device = resources.spread_device(str(cfg.device), hydra_cfg.job.num, torch.cuda.device_count())
    return task(cfg, out_dir)


def check_settings(cfg: DictConfig) -> None:
    """Every check of ``cfg`` that needs no data (device, numbers, sizes, target sensitivity).
    Run before the run folder is claimed, so that a refused run writes nothing into it: a
    resume's folder keeps its record and status, a sweep job's folder takes no config."""
    device = resolve_device(str(cfg.device))
    seed = loop_settings(cfg, resolve_precision(str(cfg.trainer.precision), device)).seed
    target_sensitivity(cfg)
    number_setting(cfg, "cv.folds", int)
    if not 0 <= seed < 2**32:
        raise SkinclfError(f"seed={seed}: expected 0 to 2**32 - 1 (what NumPy and scikit-learn take)")
    threads_given = OmegaConf.select(cfg, "trainer.num_threads") is not None
    if threads_given and number_setting(cfg, "trainer.num_threads", int) < 1:
        raise SkinclfError(
            f"trainer.num_threads={cfg.trainer.num_threads}: expected at least 1, or null (auto)"
        )
    if cfg.data.get("name") == "synthetic":  # its sizes and seed, read as they are further on
        for key in ("data.train_size", "data.val_size", "data.test_size", "data.seed"):
            if number_setting(cfg, key, int) < 0:
                raise SkinclfError(f"{key}={OmegaConf.select(cfg, key)}: must be 0 or more")
    # Switches read with bool() further on, where Hydra's `off` or `no` (strings) would count as true.
    for key in SWITCHES:
        value = OmegaConf.select(cfg, key, default=None)
        if value is not None:
            check_bool(key, value)


def check_appended_keys(cfg: DictConfig, overrides: Sequence[str]) -> None:
    """Refuse keys added with ``+key=value`` that no skinclf config defines: nothing reads them,
    so the run would train with the defaults without a word. Hydra itself suggests the ``+`` for
    a misspelt key (``+trainer.max_epoch=3``) and for a group that belongs elsewhere
    (``+pipeline=augmented``, which is ``pipeline@model.pipeline=augmented``). Keys beside a
    ``_target_`` are let through: they are handed to that class's constructor."""
    appended = [o for o in overrides if o.startswith("+")]
    if not appended:
        return
    # Within the running Hydra app: the same config, composed without the appended keys.
    known = hydra.compose(config_name="train", overrides=[o for o in overrides if o not in appended])
    unknown = _keys_not_in(cfg, known)
    if unknown:
        given = next((o for o in appended if o.lstrip("+").split("=")[0].split("@")[0] == unknown[0]), "")
        raise SkinclfError(
            f"{unknown[0]}: not a skinclf config key (added by {given or 'an override with +'}), so "
            "nothing would read it; check its spelling (`skinclf train --help` lists the keys; a "
            "pipeline goes in as pipeline@model.pipeline=NAME)"
        )


def _keys_not_in(cfg: DictConfig, known: DictConfig, prefix: str = "") -> list[str]:
    """Dotted keys of ``cfg`` that ``known`` lacks (the outermost of each new subtree), except
    those beside a ``_target_``."""
    if "_target_" in cfg:
        return []
    found = []
    for key in cfg:
        path = f"{prefix}{key}"
        if key not in known:
            found.append(path)
        elif isinstance(cfg[key], DictConfig) and isinstance(known[key], DictConfig):
            found += _keys_not_in(cfg[key], known[key], f"{path}.")
    return found


def _claim(out_dir: Path, cfg: DictConfig, overrides: list[str]) -> str:
    """:func:`claim_run_dir` after :func:`check_appended_keys` and :func:`check_settings`; a
    folder taken for (more) work gets its .hydra/ record then, before the job changes anything
    in ``cfg`` (a re-launch sets resume)."""
    check_appended_keys(cfg, overrides)
    check_settings(cfg)
    state = claim_run_dir(out_dir, cfg, overrides)
    if state != "finished":
        _write_hydra_record(cfg, out_dir)
    return state


def _write_hydra_record(cfg: DictConfig, out_dir: Path) -> None:
    """The job's .hydra/ record (its config, Hydra's settings, its overrides), as Hydra writes it.

    Written here, once claim_run_dir has accepted the folder, rather than by Hydra before the
    job starts (conf/train.yaml sets hydra.output_subdir to null): a refused resume or re-launch
    would otherwise overwrite the record of the run the folder holds, and `skinclf report`,
    which reads the settings from it, would mislabel that run.
    """
    hydra_cfg = HydraConfig.instance().cfg
    (out_dir / HYDRA_DIR).mkdir(exist_ok=True)
    atomic_write_text(OmegaConf.to_yaml(cfg), out_dir / HYDRA_CONFIG)
    atomic_write_text(OmegaConf.to_yaml(hydra_cfg), out_dir / HYDRA_SETTINGS)
    atomic_write_text(OmegaConf.to_yaml(hydra_cfg.hydra.overrides.task), out_dir / HYDRA_OVERRIDES)


def _remove_unstarted_run(out_dir: Path) -> None:
    """Delete a run folder that holds nothing but what was written before the run failed (Hydra's
    files, the log, the config and status records), and the folders above it that its launch
    made (outputs/runs on first use) when that leaves them empty."""
    if holds_only_bookkeeping(out_dir):
        shutil.rmtree(out_dir, ignore_errors=True)
        remove_empty_folders(SweepSummary.created)


@hydra.main(version_base="1.3", config_path="pkg://skinclf.conf", config_name="train")
def hydra_main(cfg: DictConfig) -> None:
    hydra_cfg = HydraConfig.get()
    out_dir = Path(hydra_cfg.runtime.output_dir)
    overrides = list(hydra_cfg.overrides.task)
    if hydra_cfg.mode == RunMode.MULTIRUN:
        # Never exits: a failed job is recorded and the sweep goes on (SweepSummary reports it).
        run_sweep_job(
            cfg, out_dir, _run_in_hydra, hydra_cfg.job.num, Path(hydra_cfg.sweep.dir), overrides, _claim
        )
        return
    # Only a folder that this launch begins may be removed when it fails: a folder with a recorded
    # config holds an earlier run (even one stopped before its first epoch), whose files stay.
    began_here = not (out_dir / RUN_CONFIG).exists()
    try:
        state = _claim(out_dir, cfg, overrides)
        if state == "finished":
            # As a sweep skips its finished jobs: retraining over the results would leave the
            # old test_metrics.json until the end, so an interrupted retrain would read as finished.
            print(
                f"{out_dir}: holds a finished run of this config; nothing to do "
                "(a new hydra.run.dir trains it again)"
            )
        elif state == "unfinished" and not cfg.resume:
            # Training it anew would overwrite its checkpoint and metrics without a word.
            raise SkinclfError(
                f"{out_dir}: holds an unfinished run of this config; add resume=true to continue it, "
                "or use a new hydra.run.dir to train it again"
            )
        else:
            # A crash is then listed by `skinclf report` as failed with its error, not as
            # unfinished; Ctrl-C or `kill` as stopped, resumable with resume=true. A refused
            # folder is left alone.
            with recorded_status(out_dir, None, log=str(out_dir / TRAIN_LOG)):
                _run_in_hydra(cfg, out_dir)
    except SkinclfError as err:
        print(f"skinclf train: error: {err}", file=sys.stderr)
        if began_here:
            _remove_unstarted_run(out_dir)
        sys.exit(EXIT_USER_ERROR)
    print(f"output directory: {out_dir}")


def _check_output_folders(args: list[str]) -> None:
    """A hydra.run.dir / hydra.sweep.dir given on the command line must be a folder that can be
    made: Hydra makes it before any skinclf code runs, and reports a failure with a traceback."""
    for arg in args:
        key, has_value, value = arg.partition("=")
        if not has_value or key.lstrip("+") not in {"hydra.run.dir", "hydra.sweep.dir"}:
            continue
        # Up to the first interpolation (out/${model.name}): the folders above it are fixed already.
        folder = Path(os.path.abspath(value.split("${", 1)[0] or "."))
        existing = next(p for p in (folder, *folder.parents) if p.exists())
        if not existing.is_dir():
            raise SkinclfError(f"{arg}: {existing} is a file; expected a folder")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise SkinclfError(f"{arg}: {existing} is not writable")


def main(args: list[str]) -> None:
    """Entry point of ``skinclf train ARGS``: hand the arguments to Hydra."""
    _check_output_folders(args)
    sys.argv = ["skinclf train", *args]
    # Class-level (Hydra makes the callback instance): a previous call's must not count.
    SweepSummary.started, SweepSummary.last, SweepSummary.created = None, None, []
    skinclf_launcher.register()  # hydra/launcher=local
    try:
        hydra_main()
    except BaseException:
        # Nothing half-written: a sweep refused before its first job leaves no folder behind.
        remove_unstarted_sweep(SweepSummary.started, SweepSummary.created)
        raise
    if SweepSummary.last is not None and SweepSummary.last.failed:
        sys.exit(1)  # the summary above names the failed jobs; scripts and CI must notice too
