"""Architectures. Each config in conf/model/ names one class here through ``arch._target_``."""

import torch
from omegaconf import DictConfig

from skinclf.config import instantiate_config

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


def build_model(model_cfg: DictConfig) -> torch.nn.Module:
    """Instantiate the architecture described by ``model_cfg.arch`` (one output logit)."""
    return instantiate_config(model_cfg.arch)
