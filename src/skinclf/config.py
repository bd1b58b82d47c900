"""Composing the train config outside a Hydra app (summary, predict, tests)."""

from __future__ import annotations

from collections.abc import Sequence

from hydra import compose, initialize_config_module
from hydra.errors import HydraException
from omegaconf import DictConfig

from skinclf.errors import SkinclfError

CONFIG_MODULE = "skinclf.conf"
CONFIG_NAME = "train"


def compose_config(overrides: Sequence[str] = (), return_hydra_config: bool = False) -> DictConfig:
    """The train config with ``overrides`` applied, exactly as ``skinclf train`` would see it."""
    try:
        with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
            return compose(CONFIG_NAME, overrides=list(overrides), return_hydra_config=return_hydra_config)
    except HydraException as err:
        raise SkinclfError(str(err).strip().splitlines()[0]) from err
