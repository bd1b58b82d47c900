"""Architectures. Each config in conf/model/ names one class here through ``arch._target_``."""

import torch
from omegaconf import DictConfig

from skinclf.config import instantiate_config


def build_model(model_cfg: DictConfig) -> torch.nn.Module:
    """Instantiate the architecture described by ``model_cfg.arch`` (one output logit)."""
    return instantiate_config(model_cfg.arch)
