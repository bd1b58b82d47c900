"""Architectures. Each config in conf/model/ names one class here through ``arch._target_``."""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from skinclf.config import instantiate_config
from skinclf.errors import SkinclfError, first_line

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
    be imported or is no class of the kind its place takes; ``where``: the config's origin, for
    the message (``model=NAME``, a checkpoint).

    Building the model calls every ``_target_`` in ``arch`` and ``pipeline``, so each must name a
    class: a ``torch.nn.Module`` (the architecture and its parts), a skinclf pipeline under
    ``pipeline``. The same rule for the configs a run is trained from and the one its checkpoint
    stores, which predict and explain build again: a function there (``builtins.open``,
    ``os.makedirs``) would run with a crafted checkpoint's arguments, and loading it with
    ``weights_only=True`` must not be a way around that. (A factory function such as
    ``torchvision.models.resnet18`` goes in a class of one's own.)"""
    import torch

    from skinclf.data.pipeline import DefaultPipeline

    # Resolved, as instantiate resolves them: a _target_ may come by interpolation (${..cls}, or
    # a node put in by ${oc.create:...} or from elsewhere in a crafted checkpoint's config). The
    # model's other keys (a tag reading ${hydra:...}) are never instantiated: left as they are.
    built = {}
    for part in ("name", "arch", "pipeline"):
        try:
            value = model_cfg.get(part)
            built[part] = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
        except OmegaConfBaseException as err:
            raise SkinclfError(f"{where}: model.{part} does not resolve: {first_line(err)}") from err
    for key in MODEL_CONFIG_KEYS:
        value: Any = built
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if value in (None, ""):
            raise SkinclfError(
                f"{where}: model.{key} is not set; a model config sets name, arch._target_ (its class) "
                "and a pipeline (`defaults: [/pipeline@pipeline: default, _self_]`), "
                "as conf/model/baseline.yaml does"
            )
    for key, target in _targets({"arch": built["arch"], "pipeline": built["pipeline"]}):
        setting = f"{where}: model.{key}={target}"
        found = _check_importable(setting, target)
        kind, expected = (
            (DefaultPipeline, "pipeline")
            if key.startswith("pipeline.")
            else (torch.nn.Module, "torch.nn.Module")
        )
        if not (isinstance(found, type) and issubclass(found, kind)):
            what = "a class" if isinstance(found, type) else f"a {type(found).__name__}"
            raise SkinclfError(
                f"{setting}: is {what}, not a {expected} class; every _target_ of a model config "
                "names one (a factory function goes in a class of one's own)"
            )


def _targets(node: Any, prefix: str = "") -> list[tuple[str, str]]:
    """(dotted key, value) of every ``_target_`` in a plain config tree."""
    found = []
    if isinstance(node, dict):
        for key, value in node.items():
            path = f"{prefix}{key}"
            if key == "_target_":
                found.append((path, str(value)))
            else:
                found += _targets(value, f"{path}.")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found += _targets(value, f"{prefix}{i}.")
    return found


def _check_importable(setting: str, target: str) -> object:
    """What ``target`` (``package.module.Class``) names, found the way Hydra's instantiate finds
    it (its first part imported, then attribute by attribute, importing submodules); a
    SkinclfError starting with ``setting`` when it cannot be found: Hydra would say so only once
    the run has started, over several lines."""
    parts = target.split(".")
    if len(parts) < 2 or not all(parts):
        raise SkinclfError(f"{setting}: expected package.module.Class")
    found: object = None
    for i, part in enumerate(parts):
        path = ".".join(parts[: i + 1])
        if i and hasattr(found, part):
            found = getattr(found, part)
            continue
        if i and not isinstance(found, ModuleType):
            raise SkinclfError(f"{setting}: {'.'.join(parts[:i])} has no {part!r}")
        try:
            found = importlib.import_module(path)
        except ModuleNotFoundError as err:
            if err.name != path:  # the module is there, but something it imports is not
                raise SkinclfError(
                    f"{setting}: importing {path} needs {err.name}, which is not installed"
                ) from err
            if i:
                raise SkinclfError(f"{setting}: {'.'.join(parts[:i])} has no {part!r}") from err
            raise SkinclfError(f"{setting}: no module {path}; it must be installed or on PYTHONPATH") from err
        except (ImportError, SyntaxError) as err:
            raise SkinclfError(f"{setting}: importing {path} failed: {first_line(err)}") from err
    if isinstance(found, ModuleType):
        raise SkinclfError(f"{setting}: {target} is a module; expected a class in it")
    return found


def build_model(model_cfg: DictConfig) -> torch.nn.Module:
    """Instantiate the architecture described by ``model_cfg.arch`` (one output logit)."""
    return instantiate_config(model_cfg.arch)


def check_model_output(model_cfg: DictConfig, where: str) -> None:
    """A model of the user's own, built and run on a batch of two images before anything trains:
    a constructor that refuses its arguments, a class that is no ``torch.nn.Module``, a forward
    pass that fails whatever the images and device (layer sizes that do not fit 128x128 images)
    or an output other than one logit per image is one line, not a traceback once the run has
    begun.

    First on PyTorch's meta device (shapes only: no memory, no computation, no weights), in
    training mode as the first step runs it. A pass that fails there (the meta device cannot run
    data-dependent code or custom ops) is tried again for real on the CPU, on random images, and
    refused only if it fails there too; an op with no CPU kernel (a CUDA-only custom op) is left
    to the run itself."""
    import torch

    from skinclf import IMAGE_SIZE

    try:
        with torch.device("meta"):
            logits = _run_on_two_images(model_cfg, where, "meta")
    except Exception:  # noqa: BLE001 - no verdict on the model yet: the CPU's decides
        try:
            logits = _run_on_two_images(model_cfg, where, "cpu")
        except SkinclfError:
            raise
        except NotImplementedError:  # no CPU kernel: the run's device may have one
            return
        except Exception as err:  # noqa: BLE001 - the user's code may raise anything
            raise SkinclfError(
                f"{where}: the model fails on a batch of 2 images of {IMAGE_SIZE}x{IMAGE_SIZE}: "
                f"{type(err).__name__}: {first_line(err)}"
            ) from err
    if not isinstance(logits, torch.Tensor) or tuple(logits.shape) not in {(2,), (2, 1)}:
        got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise SkinclfError(
            f"{where}: the model returns {got} for a batch of 2 images; expected one logit per "
            "image, (2, 1) or (2,)"
        )


def _run_on_two_images(model_cfg: DictConfig, where: str, device: str) -> Any:
    """``model_cfg``'s model, built on ``device`` (also the default device around the call), in
    training mode, and its output for two images there (random ones from a generator of its own
    on the CPU, so that the run's random streams are untouched)."""
    import torch
    from hydra.errors import InstantiationException

    from skinclf import IMAGE_SIZE

    try:
        model = build_model(model_cfg)
    except InstantiationException as err:
        raise SkinclfError(f"{where}: {first_line(err)}") from err
    if not isinstance(model, torch.nn.Module):
        raise SkinclfError(
            f"{where}: model.arch._target_ builds a {type(model).__name__}; expected a torch.nn.Module"
        )
    shape = (2, 3, IMAGE_SIZE, IMAGE_SIZE)
    images = (
        torch.zeros(shape, device=device)
        if device == "meta"
        else torch.rand(shape, generator=torch.Generator().manual_seed(0))
    )
    with torch.no_grad():
        return model.train()(images)
