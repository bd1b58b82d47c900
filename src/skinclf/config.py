"""Composing the train config outside a Hydra app (summary, predict, tests), and instantiating from it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hydra import compose, initialize_config_module
from hydra.errors import HydraException, InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig

from skinclf.errors import SkinclfError, first_line

CONFIG_MODULE = "skinclf.conf"
CONFIG_NAME = "train"


def compose_config(overrides: Sequence[str] = (), return_hydra_config: bool = False) -> DictConfig:
    """The train config with ``overrides`` applied, exactly as ``skinclf train`` would see it."""
    try:
        with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
            return compose(CONFIG_NAME, overrides=list(overrides), return_hydra_config=return_hydra_config)
    except HydraException as err:
        raise SkinclfError(first_line(err)) from err


def instantiate_config(node: DictConfig) -> Any:
    """``hydra.utils.instantiate``, letting our own SkinclfError through unwrapped.

    Hydra wraps whatever a constructor raises in a multi-line InstantiationException; a
    SkinclfError (missing weights, a bad option) must stay the one clear line it was written as.
    """
    try:
        return instantiate(node)
    except InstantiationException as err:
        if isinstance(err.__cause__, SkinclfError):
            raise err.__cause__ from None
        raise
