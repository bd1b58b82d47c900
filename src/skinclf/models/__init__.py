"""Architectures. Each config in conf/model/ names one class here through ``arch._target_``."""

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig


def build_model(model_cfg: DictConfig) -> torch.nn.Module:
    """Instantiate the architecture described by ``model_cfg.arch`` (one output logit)."""
    return instantiate(model_cfg.arch)
