"""Composing the train config outside a Hydra app (summary, report, tests), instantiating from it,
and reading settings and paths from it."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import cache
from importlib.resources import files
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException, InstantiationException
from hydra.utils import instantiate, to_absolute_path
from omegaconf import DictConfig, OmegaConf

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


ABSENT = object()  # OmegaConf.select's answer (its default=) for a key the config does not have


def holds_key(cfg: DictConfig, key: str) -> bool:
    """Whether ``cfg`` has the dotted ``key`` (its value may be anything, null included)."""
    return OmegaConf.select(cfg, key, default=ABSENT) is not ABSENT


@cache
def composed_or_none(overrides: tuple[str, ...]) -> DictConfig | None:
    """:func:`compose_config` of ``overrides``, cached (the checks of a command line and the report
    ask for the same few configs again and again; never modify what it returns); None where it
    does not compose: a bad choice or value, which is Hydra's to report, or a model this skinclf
    no longer has."""
    try:
        return compose_config(overrides)
    except SkinclfError:
        return None


def keys_not_in(cfg: DictConfig, known: DictConfig, prefix: str = "") -> list[str]:
    """Dotted keys of ``cfg`` that ``known`` lacks (the outermost of each new subtree), except
    those beside a ``_target_`` (they go to its constructor): what ``+key=value`` overrides added
    that no config defines."""
    if "_target_" in cfg:
        return []
    found = []
    for key in cfg:
        path = f"{prefix}{key}"
        if key not in known:
            found.append(path)
        elif isinstance(cfg[key], DictConfig) and isinstance(known[key], DictConfig):
            found += keys_not_in(cfg[key], known[key], f"{path}.")
    return found


def interpolated_strings(node: Any, prefix: str = "") -> list[str]:
    """The dotted keys of a plain (resolved) config tree whose keys or string values still hold
    ``${``: an escaped interpolation, which a config stored resolved (run_config.json, a
    checkpoint's) would read back as one."""
    if isinstance(node, dict):
        found = []
        for key, value in node.items():
            path = f"{prefix}{key}"
            found += [path] if "${" in str(key) else interpolated_strings(value, f"{path}.")
        return found
    if isinstance(node, list):
        return [key for i, value in enumerate(node) for key in interpolated_strings(value, f"{prefix}{i}.")]
    return [prefix.rstrip(".")] if isinstance(node, str) and "${" in node else []


def config_choices(group: str) -> list[str]:
    """The configs shipped in config group ``group`` (``model``: baseline, ...), sorted; none when
    skinclf has no such group. Hydra's own groups (``hydra/launcher``) have Hydra's, its plugins'
    and skinclf's choices."""
    if group.startswith("hydra/"):
        return list(_hydra_group_choices(group))
    folder = files(CONFIG_MODULE).joinpath(group)
    if not folder.is_dir():
        return []
    names = (entry.name for entry in folder.iterdir() if entry.name.endswith(".yaml"))
    return sorted(name.removesuffix(".yaml") for name in names if not name.startswith("_"))


@cache
def _hydra_group_choices(group: str) -> tuple[str, ...]:
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        return tuple(sorted(GlobalHydra.instance().config_loader().get_group_options(group)))


def override_key(override: str) -> str:
    """The key a command-line override sets or removes: ``a.b`` of ``a.b=1``, ``+a.b=1``, ``~a.b``."""
    return override.split("=", 1)[0].lstrip("+~")


def is_searchpath(override: str) -> bool:
    """Whether ``override`` sets ``hydra.searchpath`` (config folders of the user's own)."""
    return override_key(override) == "hydra.searchpath"


def adds_config_folders(args: Sequence[str]) -> bool:
    """Whether ``args`` add config folders of the user's own beside skinclf's (hydra.searchpath,
    --config-dir) or replace skinclf's (--config-path): their choices and keys are then Hydra's to
    know, not :func:`config_choices`'."""
    return any(
        is_searchpath(arg) or arg.startswith(("--config-dir", "-cd", "--config-path", "-cp")) for arg in args
    )


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


def check_bool(key: str, value: object) -> bool:
    """``value`` of the true/false switch ``key``, or a SkinclfError naming it. Only real booleans
    pass: Hydra reads ``off``, ``no`` or ``0`` as a string or a number, and those would count as true."""
    if not isinstance(value, bool):
        raise SkinclfError(f"{key}={value!r}: expected true or false")
    return value


def is_number(value: object) -> bool:
    """A finite int or float (not a bool, not inf or nan): what a numeric option accepts."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def is_count(value: object) -> bool:
    """A whole number >= 0 (an int, not a bool): an epoch, a count of images in a record."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def number_option(key: str, value: object, ok: Callable[[float], bool], expected: str) -> float:
    """Option ``key`` as a float, or a SkinclfError naming it: a string or inf must not reach
    ``float()`` or the comparisons (a ValueError traceback, or a NaN batch)."""
    if not (is_number(value) and ok(value)):
        raise SkinclfError(f"{key}={value!r}: expected {expected}")
    return float(value)


def number_pair(
    key: str, value: object, ok: Callable[[float, float], bool], expected: str
) -> tuple[float, float]:
    """Option ``key`` as a (lo, hi) pair of floats, or a SkinclfError naming it: exactly two finite
    numbers (a third one is not silently dropped) for which ``ok(lo, hi)`` holds."""
    # Hydra hands over a ListConfig, a Sequence; a string is one too but never a pair.
    items = list(value) if isinstance(value, Sequence) and not isinstance(value, str) else None
    if items is None or len(items) != 2 or not all(is_number(v) for v in items) or not ok(*items):
        shown = items if items is not None else value
        raise SkinclfError(f"{key}={shown!r}: expected [lo, hi] with {expected}")
    return float(items[0]), float(items[1])


def number_setting(cfg: DictConfig, key: str, kind: type[int] | type[float], prefix: str = "") -> int | float:
    """``cfg``'s dotted ``key`` as an int or a float; a SkinclfError names a value that is not
    one (``trainer.max_epochs=abc``, ``=3.5``, ``=null``, ``optim.lr=inf``) before anything trains.
    ``prefix``: where ``cfg`` sits in the whole config (``data.`` for cfg.data), for the message."""
    value = OmegaConf.select(cfg, key)
    key = prefix + key
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


def data_path(data_cfg: DictConfig, key: str = "root") -> Path:
    """``data_cfg[key]`` as an absolute path; relative paths are from where the user started skinclf."""
    value = data_cfg.get(key)
    if value in (None, ""):
        raise SkinclfError(f"data.{key} is not set: data={data_cfg.name} needs data.{key}=PATH")
    return Path(to_absolute_path(str(Path(str(value)).expanduser())))


def grid_search_without_folds(search: str) -> SkinclfError:
    """The refusal of ``hparams_search=search`` with cv.folds=0: each point would be trained and
    tested, and the search would choose on the test split."""
    return SkinclfError(
        f"cv.folds=0: hparams_search={search} ranks its points by cross-validation on the training "
        "split; expected at least 2 folds"
    )
