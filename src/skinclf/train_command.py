"""`skinclf train ARGS`: Hydra composes the config, the run folder is claimed, and the run
itself (:mod:`skinclf.train`) or, with -m, each sweep job runs.

This module imports neither torch nor the data and model code, so that `skinclf train --help`
and a mistyped option (``model=resnt``) answer without the seconds that importing torch takes
(4 s on a 2-core VM); :mod:`skinclf.train` is imported once the config has been composed.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from hydra_plugins import skinclf_launcher
from skinclf import __version__
from skinclf.config import is_searchpath, keys_not_in
from skinclf.errors import EXIT_USER_ERROR, SkinclfError, out_of_space
from skinclf.io import atomic_write_text, remove_empty_folders
from skinclf.run_files import HYDRA_CONFIG, HYDRA_DIR, HYDRA_OVERRIDES, HYDRA_SETTINGS, TRAIN_LOG
from skinclf.run_folder import (
    BOOKKEEPING,
    FolderBusy,
    claim_run_dir,
    holds_a_run,
    log_to_file_only,
    recorded_status,
    release_claim,
    run_dir_lock,
)
from skinclf.sweep.jobs import record_stopped_jobs, run_sweep_job
from skinclf.sweep.summary import SweepSummary, remove_unstarted
from skinclf.train_arguments import asks_version, checked_for_hydra, resume_command


def check_appended_keys(cfg: DictConfig, overrides: Sequence[str]) -> None:
    """Refuse keys added with ``+key=value`` that no skinclf config defines: nothing reads them,
    so the run would train with the defaults without a word. Hydra itself suggests the ``+`` for
    a misspelt key (``+trainer.max_epoch=3``) and for a group that belongs elsewhere
    (``+pipeline=augmented``, which is ``pipeline@model.pipeline=augmented``). Keys beside a
    ``_target_`` are let through: they are handed to that class's constructor."""
    appended = [o for o in overrides if o.startswith("+")]
    if not appended:
        return
    # Within the running Hydra app: the same config, composed without the appended keys. The
    # config folders added with hydra.searchpath (a Hydra override, not among the job's) come
    # along, or a model of the user's own would not be found.
    searchpath = [o for o in HydraConfig.get().overrides.hydra if is_searchpath(o)]
    kept = [o for o in overrides if o not in appended]
    known = hydra.compose(config_name="train", overrides=[*searchpath, *kept])
    unknown = keys_not_in(cfg, known)
    if unknown:
        given = next((o for o in appended if o.lstrip("+").split("=")[0].split("@")[0] == unknown[0]), "")
        choices = HydraConfig.get().runtime.choices
        chosen = ", ".join(f"{g}={choices[g]}" for g in ("model", "data", "recipe") if g in choices)
        # A plain key that only a sweep's other choices have reached this job as ++key (see
        # check_override_keys): named as the user typed it.
        given = given.removeprefix("++")
        raise SkinclfError(
            f"{unknown[0]}: not a key of this run's configs ({chosen}; given as "
            f"{given or 'an override with +'}), so nothing would read it; check its spelling, or leave "
            "it out where the config lacks it (`skinclf train --help` lists the keys; a pipeline goes "
            "in as pipeline@model.pipeline=NAME)"
        )


def _claim(out_dir: Path, cfg: DictConfig, overrides: list[str], single_run: bool = False) -> str:
    """:func:`claim_run_dir` after :func:`check_appended_keys` and :func:`skinclf.train.check_settings`; a
    folder taken for (more) work gets its .hydra/ record then, before the job changes anything
    in ``cfg`` (a re-launch sets resume)."""
    from skinclf.train import check_settings  # torch: imported once a config has been composed

    check_appended_keys(cfg, overrides)
    check_settings(cfg)
    state = claim_run_dir(out_dir, cfg, overrides, single_run=single_run)
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


def _undo_refused_run(out_dir: Path, state: str | None, found: set[str]) -> None:
    """Leave nothing of a run refused before it produced anything (it added only the log, the
    config and status records to the ``found`` entries of its folder). A folder this launch made
    goes, with the folders above it that the launch made (outputs/runs on first use) when that
    leaves them empty. A folder that existed before (the user's own, files and all) keeps its
    train.log, with the error; if the run had claimed it (``state`` new), the claim goes, so that
    the corrected launch is not held to the refused config. An earlier run's folder (even one
    stopped before its first epoch) stays."""
    if not out_dir.is_dir() or _produced_files(out_dir, found):  # no refusal to undo
        return
    if SweepSummary.started == out_dir:
        shutil.rmtree(out_dir, ignore_errors=True)
        remove_empty_folders(SweepSummary.created)
    elif state == "new":
        release_claim(out_dir)


def _produced_files(out_dir: Path, found: set[str]) -> bool:
    """Whether the run in ``out_dir`` wrote more than its log, config and status records to the
    ``found`` entries of its folder (metrics, checkpoints: it trained)."""
    if not out_dir.is_dir():
        return False
    added = {p.name for p in out_dir.iterdir()} - found
    return not added <= BOOKKEEPING


# The folder a stopped run or sweep leaves to resume (its `output directory:` line); None when
# it stopped before it had one, so that the command line does not send the user to resume it.
resume_folder: Path | None = None
# The command line of this launch (as checked_for_hydra orders it), for the command that resumes it.
launch_args: list[str] = []


def resume_hint() -> str:
    """What the stop line adds: the command that continues the stopped run or sweep; nothing
    where there is nothing to resume."""
    if resume_folder is None:
        return ""
    sweep = SweepSummary.sweep_dir is not None and resume_folder == SweepSummary.sweep_dir.absolute()
    return f"; to go on: {resume_command(launch_args, resume_folder, sweep)}"


@hydra.main(version_base="1.3", config_path="pkg://skinclf.conf", config_name="train")
def hydra_main(cfg: DictConfig) -> None:
    global resume_folder
    from skinclf.train import run_in_hydra  # torch and the run's code: only now that cfg is composed

    hydra_cfg = HydraConfig.get()
    out_dir = Path(hydra_cfg.runtime.output_dir)
    overrides = list(hydra_cfg.overrides.task)
    if hydra_cfg.mode == RunMode.MULTIRUN:
        # Never exits: a failed job is recorded and the sweep goes on (SweepSummary reports it).
        run_sweep_job(
            cfg, out_dir, run_in_hydra, hydra_cfg.job.num, Path(hydra_cfg.sweep.dir), overrides, _claim
        )
        return
    state = None
    found = {p.name for p in out_dir.iterdir()}  # what a refusal must leave (Hydra made out_dir)
    try:
        with run_dir_lock(out_dir):
            try:
                state = _claim(out_dir, cfg, overrides, single_run=True)
                if state == "finished":
                    # As a sweep skips its finished jobs: retraining over the results would leave
                    # the old test_metrics.json until the end, so an interrupted retrain would read
                    # as finished.
                    print(
                        f"{out_dir}: holds a finished run of this config; nothing to do "
                        "(a new hydra.run.dir trains it again)"
                    )
                else:
                    # A crash is then listed by `skinclf report` as failed with its error, not as
                    # unfinished; Ctrl-C or `kill` as stopped, resumable with resume=true. A
                    # refused folder is left alone.
                    with recorded_status(out_dir, None, log=str(out_dir / TRAIN_LOG)):
                        try:
                            run_in_hydra(cfg, out_dir)
                        except BaseException as stop:
                            # Stopped (Ctrl-C, kill) or crashed: the folder that resume=true needs,
                            # or that holds the log; a timestamped one is otherwise hard to find.
                            # So is that of an error after training began (diverged in epoch 2),
                            # which keeps its checkpoints; a refusal leaves nothing to find.
                            stopped_or_crashed = not isinstance(stop, SkinclfError)
                            if stopped_or_crashed or _produced_files(out_dir, found):
                                print(f"output directory: {out_dir}")
                            if stopped_or_crashed:
                                resume_folder = out_dir
                            raise
            except SkinclfError as err:
                # Undone while the folder is still ours: no other process claims it in between.
                if not isinstance(err, FolderBusy):
                    _undo_refused_run(out_dir, state, found)
                raise
    except OSError as err:
        # A full disk, while the folder is claimed or the run writes: Hydra would print a
        # traceback. (A checkpoint that cannot be written is a SkinclfError already.)
        full = out_of_space(err)
        if full is None:
            raise
        where = "" if err.filename else f"{out_dir}: "  # PIL's and json's writes name no file
        print(f"skinclf train: error: {where}{full}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    except FolderBusy as err:
        # Another process trains there (it may not have written its records yet): the folder is
        # left exactly as it is, not removed as one this launch made and nothing ran in.
        SweepSummary.started = None
        print(f"skinclf train: error: {err}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    except SkinclfError as err:
        print(f"skinclf train: error: {err}", file=sys.stderr)
        # A folder the user made keeps only its log: the log says why nothing ran. One that holds
        # an earlier run is left exactly as it was.
        if out_dir.is_dir() and not holds_a_run(out_dir):
            log_to_file_only(f"skinclf train: error: {err}")
        sys.exit(EXIT_USER_ERROR)
    print(f"output directory: {out_dir}")


def main(args: list[str]) -> None:
    """Entry point of ``skinclf train ARGS``: hand the arguments to Hydra."""
    global resume_folder, launch_args
    resume_folder = None
    if asks_version(args):  # Hydra's own answer names only Hydra
        print(f"skinclf {__version__} (Hydra {hydra.__version__})")
        return
    # As checked: options after the overrides, which Hydra then reads (and _override_words too).
    launch_args = checked_for_hydra(args)
    sys.argv = ["skinclf train", *launch_args]
    # Class-level (Hydra makes the callback instance): a previous call's must not count.
    SweepSummary.started = SweepSummary.sweep_dir = SweepSummary.last = None
    SweepSummary.created = []
    skinclf_launcher.register()  # hydra/launcher=local, slurm, slurm_local
    try:
        hydra_main()
    except BaseException as stop:
        # Nothing half-written: a sweep refused before its first job, or a run stopped before it
        # began, leaves no folder behind.
        remove_unstarted(SweepSummary.started, SweepSummary.created)
        # A stopped sweep (Ctrl-C, or a signal's exit 128 + N) is continued by re-launching it into
        # its folder: named here. Not after a config error (Hydra's exit 1) or a refusal (exit 2).
        code = stop.code if isinstance(stop, SystemExit) else None
        stopped = isinstance(stop, KeyboardInterrupt) or (isinstance(code, int) and code > 128)
        if stopped and SweepSummary.sweep_dir is not None and SweepSummary.sweep_dir.is_dir():
            # Jobs whose launcher ended them before they recorded the stop (submitit_local).
            record_stopped_jobs(SweepSummary.sweep_dir)
            print(f"output directory: {SweepSummary.sweep_dir}")
            resume_folder = SweepSummary.sweep_dir.absolute()  # the command works from any folder
        raise
    if SweepSummary.last is not None and SweepSummary.last.failed:
        sys.exit(1)  # the summary above names the failed jobs; scripts and CI must notice too
