"""Loading a finished run folder for inference: its config, best model, pipeline and threshold."""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException
from torch import nn

from skinclf.arguments import DISCLAIMER, SYNTHETIC_MODEL_NOTE
from skinclf.config import instantiate_config, interpolated_strings, is_number
from skinclf.data.images import image_file_suffixes
from skinclf.errors import SkinclfError, first_line, not_a_folder
from skinclf.evaluation.metrics import DEFAULT_THRESHOLD
from skinclf.models import build_model, check_model_config
from skinclf.run_files import (
    BEST_CHECKPOINT,
    CV_RESULT,
    GRID_MD,
    HYDRA_MULTIRUN,
    HYDRA_SETTINGS,
    RUN_CONFIG,
    TEST_METRICS,
    TRAIN_LOG,
)
from skinclf.run_folder import (
    differences_from_record,
    holds_a_run,
    hydra_record,
    process_gone,
    read_status,
    recorded,
    recorded_overrides,
    trained_now,
)
from skinclf.train_arguments import resume_command
from skinclf.training.checkpoint import load_checkpoint
from skinclf.training.hardware import resolve_device, resolve_precision, runs_natively
from skinclf.training.loop import LoopSettings, predict_logits
from skinclf.training.recipe import Recipe


@dataclass
class TrainedRun:
    """A finished run, ready for inference on new images."""

    path: Path
    config: DictConfig
    model: nn.Module
    pipeline: Any
    threshold: float
    # Where ``threshold`` comes from, for messages: the operating point or the 0.5 default.
    threshold_source: str
    settings: LoopSettings
    device: torch.device

    @property
    def model_name(self) -> str:
        return str(self.config.model.name)

    @property
    def trained_on_synthetic_data(self) -> bool:
        return OmegaConf.select(self.config, "data.name") == "synthetic"

    @property
    def emulation_note(self) -> str:
        """A note where this device only emulates the run's precision (a bf16 run on a CPU without
        AVX-512 BF16 or AMX, or on a T4 or V100): predictions reproduce the run's, but slowly."""
        precision = self.settings.precision
        if runs_natively(precision, self.device):
            return ""
        return (
            f"the run was evaluated in {precision}, which {self.device.type} here only emulates: "
            "its probabilities are reproduced, at a fraction of fp32's speed"
        )

    def print_notes(self) -> None:
        """What a user of its outputs must know, on stderr, after predict's or explain's summary:
        an emulated precision, a model trained on synthetic data, and that this is no diagnosis."""
        for note in (self.emulation_note, SYNTHETIC_MODEL_NOTE if self.trained_on_synthetic_data else ""):
            if note:
                print(f"note: {note}", file=sys.stderr)
        print(DISCLAIMER, file=sys.stderr)

    def predict_probs(self, images: torch.Tensor) -> torch.Tensor:
        """MEL probabilities (float32, CPU) for uint8 (N, 3, H, W) images, exactly as at test time."""
        logits = predict_logits(self.model, self.pipeline, images, self.settings, self.device)
        return torch.sigmoid(logits)


def without_pretrained_download(model_cfg: DictConfig) -> DictConfig:
    """A copy of the model config that builds random-init weights: the checkpoint replaces them
    all, so fetching ImageNet weights (a download on a fresh machine) would be wasted."""
    model_cfg = model_cfg.copy()
    with open_dict(model_cfg):
        for node in (model_cfg, model_cfg.get("arch")):
            if isinstance(node, DictConfig) and "pretrained" in node:
                node.pretrained = False
    return model_cfg


@contextlib.contextmanager
def quiet_logs() -> Iterator[None]:
    """No log lines up to warnings inside: a model built only to load weights into, or to count."""
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


def _operating_threshold(metrics: dict, metrics_path: Path) -> tuple[float, str]:
    point = metrics.get("operating_point")
    if point is None:
        # Runs from before the operating point existed: the paper's own decision rule.
        return DEFAULT_THRESHOLD, "the default 0.5 (no operating point stored in the run)"
    if not isinstance(point, dict) or "threshold" not in point:
        raise SkinclfError(
            f"{metrics_path}: operating_point={point!r}; expected an object with a threshold, as "
            "skinclf train writes it"
        )
    threshold = point["threshold"]
    if isinstance(threshold, bool) or not isinstance(threshold, int | float) or not 0 <= threshold <= 1:
        raise SkinclfError(
            f"{metrics_path}: operating_point.threshold={threshold!r}; expected a number in [0, 1]"
        )
    threshold = float(threshold)
    target = point.get("target_sensitivity")
    source = "the run's operating point"
    if target is not None:
        source += f" (chosen on validation for sensitivity >= {target})"
    return threshold, source


def _inference_settings(cfg: DictConfig, precision: str) -> LoopSettings:
    """What scoring images needs of the run's settings (batch size, layout, TTA), each key that an
    older skinclf did not record at its default: a run from before ``trainer.eval_batch_size``
    or ``trainer.channels_last`` existed still predicts. (The training loop's settings,
    :func:`skinclf.train.loop_settings`, would require today's keys, checkpoint_every included.)"""
    trainer = cfg.get("trainer") or {}
    return LoopSettings(
        eval_batch_size=int(trainer.get("eval_batch_size", LoopSettings.eval_batch_size)),
        precision=str(precision),
        channels_last=bool(trainer.get("channels_last", LoopSettings.channels_last)),
        progress=str(trainer.get("progress", LoopSettings.progress)),
        recipe=Recipe.from_config(cfg.get("recipe") or {}),
    )


def _check_own_checkpoint(run_dir: Path, state: dict[str, Any], metrics: dict[str, Any]) -> None:
    """Refuse a best.pt copied in from another run: it would be scored with this run's threshold
    and named after this folder, without a word. Its config must match the folder's
    run_config.json (on the keys both hold; another data.root is not compared, recorded absolute
    on one side only), and its epoch and validation accuracy the best_epoch and best_val_acc that
    test_metrics.json took from it (another dataset or seed gives another accuracy)."""
    where = f"{run_dir / BEST_CHECKPOINT}: is not this run's checkpoint"
    expected = "expected the best.pt the run wrote"
    foreign = differences_from_record(run_dir, state["config"])
    if foreign:
        raise SkinclfError(
            f"{where}: its config differs from the folder's {RUN_CONFIG} in {', '.join(foreign[:5])}; "
            f"{expected}"
        )
    # Each compared where test_metrics.json records it. A checkpoint without a validation
    # accuracy is no best.pt: a last.pt written apart from it holds none (one written with it is
    # best.pt under a second name, and passes only if it is the best epoch's).
    own = (state.get("epoch"), state.get("val_acc"))
    in_metrics = (metrics.get("best_epoch"), metrics.get("best_val_acc"))
    if any(
        is_number(best) and not (is_number(mine) and float(mine) == float(best))
        for mine, best in zip(own, in_metrics, strict=True)
    ):
        acc = (
            f"validation accuracy {float(own[1])}"
            if is_number(own[1])
            else "no validation accuracy (a last.pt?)"
        )
        raise SkinclfError(
            f"{where}: its epoch {own[0]} and {acc} are not the best_epoch {in_metrics[0]} and "
            f"best_val_acc {in_metrics[1]} of {TEST_METRICS}; {expected}"
        )


def _not_a_run_hint(folder: Path) -> str:
    """What to give instead of ``folder``, which holds no finished run: a grid search trains no
    model (its points are cross-validated, never tested), a sweep's folder holds runs."""
    if _grid_search(folder):
        return (
            "; a grid search's points are cross-validated and keep no model: train the best point "
            f"of its {GRID_MD} with `skinclf train` and give that run"
        )
    if (folder / HYDRA_MULTIRUN).is_file():
        return "; a sweep's folder: give one of its job folders"
    status = read_status(folder)
    if trained_now(status):
        return f"; its run is still training (its {TRAIN_LOG} says how far)"
    if status.get("status") == "stopped" or process_gone(status):  # stopped, or killed outright
        return f"; its run ended unfinished: {_how_to_finish(folder)}"
    if status.get("status") == "running":  # on another machine, or killed there: cannot be told
        host = status.get("host", "another machine")
        return f"; its run is recorded as running on {host} (its {TRAIN_LOG} says how far)"
    if status.get("status") == "failed":
        return f"; its run failed (its {TRAIN_LOG} says why)"
    if holds_a_run(folder):
        return ""
    try:
        images = any(
            entry.suffix.lower() in image_file_suffixes() for entry in folder.iterdir() if entry.is_file()
        )
    except OSError:  # a folder that can be entered but not listed: no hint, the error stands
        return ""
    return "; it holds images: the run folder comes first, then the images" if images else ""


def _how_to_finish(folder: Path) -> str:
    """How a stopped or killed run goes on: a sweep job by re-launching its sweep, a run by the
    command that resumes it (its recorded overrides)."""
    if (folder.parent / HYDRA_MULTIRUN).is_file():
        return (
            f"the same `skinclf train -m` command with hydra.sweep.dir={folder.parent.absolute()} resumes it"
        )
    overrides = recorded_overrides(folder)
    if overrides is None:
        return f"`skinclf train` with its overrides, hydra.run.dir={folder.absolute()} and resume=true"
    return resume_command(overrides, folder.absolute(), sweep=False)


def _grid_search(folder: Path) -> bool:
    """Whether ``folder`` is a grid search's sweep folder or one of its points, by its results
    or, before there are any (a search still running, or whose points all failed), by Hydra's
    record of the hparams_search chosen."""
    if any((folder / name).is_file() for name in (CV_RESULT, GRID_MD)) or (folder.parent / GRID_MD).is_file():
        return True
    return any(
        recorded(hydra_record(record), "hydra.runtime.choices.hparams_search") is not None
        for record in (folder / HYDRA_SETTINGS, folder / HYDRA_MULTIRUN)
    )


def load_trained_run(run_dir: str | Path, device: str = "auto") -> TrainedRun:
    """Load the finished run in ``run_dir``: best.pt (``weights_only``, format-checked), its config,
    the fitted pipeline, and the operating threshold from test_metrics.json.

    Raises :class:`SkinclfError` naming the folder and the missing or invalid file.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise SkinclfError(
            f"{run_dir}: {not_a_folder(run_dir)}; expected the output directory of `skinclf train`"
        )
    for name in (BEST_CHECKPOINT, TEST_METRICS):
        if not (run_dir / name).is_file():
            hint = _not_a_run_hint(run_dir)
            lacks = "is no file" if (run_dir / name).exists() else "is missing"
            raise SkinclfError(
                f"{run_dir}: not a finished skinclf run ({name} {lacks}); expected the output "
                f"directory of a completed `skinclf train`{hint}"
            )
    metrics_path = run_dir / TEST_METRICS
    try:
        metrics = json.loads(metrics_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SkinclfError(
            f"{metrics_path}: unreadable ({err}); expected the JSON written by skinclf train"
        ) from err
    if not isinstance(metrics, dict):
        raise SkinclfError(f"{metrics_path}: expected a JSON object")
    threshold, source = _operating_threshold(metrics, metrics_path)

    torch_device = resolve_device(device, option="--device ")
    # Load on the CPU: the checkpoint may come from a GPU machine. mmap: the optimizer state
    # it also holds is never read from disk.
    state = load_checkpoint(run_dir / BEST_CHECKPOINT, map_location="cpu", mmap=True)
    for key in ("model", "pipeline", "config"):
        if key not in state:
            raise SkinclfError(f"{run_dir / BEST_CHECKPOINT}: checkpoint has no {key!r} entry")
    if not (isinstance(state["config"], dict) and isinstance(state["config"].get("model"), dict)):
        raise SkinclfError(
            f"{run_dir / BEST_CHECKPOINT}: its 'config' entry is no training config with a model; "
            "expected a best.pt written by skinclf train"
        )
    interpolated = interpolated_strings(state["config"])
    if interpolated:
        # Stored resolved (train refuses a config that keeps one): a ${...} here could only make
        # the config read otherwise than it was trained.
        raise SkinclfError(
            f"{run_dir / BEST_CHECKPOINT}: its config holds an interpolation at {interpolated[0]}; "
            "skinclf train stores it resolved (expected a best.pt of skinclf train)"
        )
    _check_own_checkpoint(run_dir, state, metrics)
    # The checkpoint's config is the resolved one the model was built from (.hydra/ holds
    # interpolations, and in-process runs have no .hydra/ at all).
    try:
        cfg = OmegaConf.create(state["config"])
    except OmegaConfBaseException as err:
        raise SkinclfError(
            f"{run_dir / BEST_CHECKPOINT}: its config is unreadable ({first_line(err)})"
        ) from err
    # A model of the user's own must be importable here too (another machine, another venv).
    check_model_config(cfg.model, str(run_dir / BEST_CHECKPOINT))
    try:
        # Quiet: a "random init, not the paper's setup" warning would be false here, since the
        # checkpoint's weights replace the random ones right away.
        with quiet_logs():
            model = build_model(without_pretrained_download(cfg.model))
        if not isinstance(model, nn.Module):  # _partial_: true gives a partial, not a model
            raise TypeError(f"model.arch._target_ builds a {type(model).__name__}, not a torch.nn.Module")
        model.load_state_dict(state["model"])
        pipeline = instantiate_config(cfg.model.pipeline)
        pipeline.load_state_dict(state["pipeline"])
    except (RuntimeError, KeyError, TypeError, ValueError, InstantiationException) as err:
        raise SkinclfError(
            f"{run_dir / BEST_CHECKPOINT}: does not match model={cfg.model.get('name')} ({first_line(err)})"
        ) from err
    model.to(torch_device).eval()
    # The precision the run was evaluated in (recorded by newer runs), so that predictions
    # reproduce its test-time ones; older runs: resolved again, here.
    precision = state.get("precision") or resolve_precision(
        str(OmegaConf.select(cfg, "trainer.precision", default="auto")), torch_device
    )
    return TrainedRun(
        path=run_dir,
        config=cfg,
        model=model,
        pipeline=pipeline,
        threshold=threshold,
        threshold_source=source,
        settings=_inference_settings(cfg, precision),
        device=torch_device,
    )
