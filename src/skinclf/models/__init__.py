"""Architectures. Each config in conf/model/ names one class here through ``arch._target_``."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from omegaconf import DictConfig, OmegaConf

from skinclf.config import instantiate_config
from skinclf.errors import SkinclfError

if TYPE_CHECKING:  # torch itself is imported by the architecture's module, when it is built:
    # `skinclf report` reads PAPER_MODELS from here and needs no torch.
    import torch

# The paper's eight model/dataset combinations (files in conf/model/), in its Table 1 order.
PAPER_MODELS = (
    "baseline",
    "batch_norm",
    "group_norm",
    "layer_norm",
    "augmented",
    "resnet",
    "vgg16",
    "res_aug",
)


def model_order(model: str) -> tuple[int, str]:
    """Sort key: the paper's models in Table 1 order, then any other model by name."""
    return (PAPER_MODELS.index(model), "") if model in PAPER_MODELS else (len(PAPER_MODELS), model)


# What every model config sets (conf/model/baseline.yaml is the smallest): a config of the
# user's own (hydra.searchpath) that lacks one would otherwise fail halfway into the run.
MODEL_CONFIG_KEYS = ("name", "arch._target_", "pipeline._target_")


def check_model_config(model_cfg: DictConfig, where: str) -> None:
    """A SkinclfError naming a key that ``model_cfg`` lacks, or a ``_target_`` of it that cannot
    be imported; ``where``: the config's origin, for the message (``model=NAME``, a checkpoint)."""
    for key in MODEL_CONFIG_KEYS:
        value = OmegaConf.select(model_cfg, key, default=None)
        if value in (None, ""):
            raise SkinclfError(
                f"{where}: model.{key} is not set; a model config sets name, arch._target_ (its class) "
                "and a pipeline (`defaults: [/pipeline@pipeline: default, _self_]`), "
                "as conf/model/baseline.yaml does"
            )
        if key.endswith("._target_"):
            _check_importable(f"{where}: model.{key}={value}", str(value))


def _check_importable(setting: str, target: str) -> None:
    """A SkinclfError starting with ``setting`` when ``target`` (``package.module.Class``) cannot
    be imported: Hydra would say so only once the run has started, over several lines."""
    module_name, _, name = target.rpartition(".")
    try:
        module = importlib.import_module(module_name) if module_name else None
    except ImportError as err:  # the module, or something it imports, is not installed
        raise SkinclfError(
            f"{setting}: cannot import {module_name} ({err}); it must be installed or on PYTHONPATH"
        ) from err
    if not hasattr(module, name):
        raise SkinclfError(f"{setting}: {module_name or 'no module'} has no {name!r}")


def build_model(model_cfg: DictConfig) -> torch.nn.Module:
    """Instantiate the architecture described by ``model_cfg.arch`` (one output logit)."""
    return instantiate_config(model_cfg.arch)
