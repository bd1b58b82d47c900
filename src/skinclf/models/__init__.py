"""Architectures. Each config in conf/model/ names one class here through ``arch._target_``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from omegaconf import DictConfig

from skinclf.config import instantiate_config

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


def build_model(model_cfg: DictConfig) -> torch.nn.Module:
    """Instantiate the architecture described by ``model_cfg.arch`` (one output logit)."""
    return instantiate_config(model_cfg.arch)
