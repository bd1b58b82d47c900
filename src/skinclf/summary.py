"""`skinclf summary model=NAME`: a model's layer table, parameters and mult-adds (paper Appendix C).

The table is torchinfo's, for the paper's input (64, 3, 128, 128). Only shapes matter for it, so
the model is built and run on PyTorch's ``meta`` device: no memory for weights or activations,
no computation, and no ImageNet download (``model.pretrained`` is set to false unless given).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from omegaconf import DictConfig
from torchinfo import ModelStatistics, summary

from skinclf import IMAGE_SIZE
from skinclf.arguments import summary_parser
from skinclf.config import (
    adds_config_folders,
    compose_config,
    composed_or_none,
    config_choices,
    holds_key,
    keys_not_in,
    override_key,
)
from skinclf.errors import SkinclfError, first_line
from skinclf.models import build_model, check_model_config, check_model_output, model_order
from skinclf.train_arguments import check_override_keys
from skinclf.trained_run import quiet_logs, without_pretrained_download

INPUT_SIZE = (64, 3, IMAGE_SIZE, IMAGE_SIZE)  # the paper's batch of 64 RGB 128x128 images


def model_names() -> list[str]:
    """Every model config shipped in conf/model/, in the paper's order."""
    return sorted(config_choices("model"), key=model_order)


def model_config(name: str, overrides: list[str] = ()) -> DictConfig:
    """The train config of model ``name`` with ``overrides``; random weights unless asked otherwise.
    A model of the user's own comes from a folder added with ``hydra.searchpath=[file://DIR]``."""
    if name not in model_names() and not adds_config_folders(overrides):
        several = " (one model, or all: summary takes no list)" if "," in name else ""
        raise SkinclfError(
            f"model={name}: unknown model{several}; expected one of {', '.join(model_names())} or all"
        )
    cfg = compose_config([f"model={name}", *overrides])
    check_model_config(cfg.model, f"model={name}")
    if "pretrained" in cfg.model and not any(o.startswith("model.pretrained=") for o in overrides):
        # Weights do not change the table; downloading them would need a network.
        cfg = compose_config([f"model={name}", *overrides, "model.pretrained=false"])
    # As `skinclf train` checks it: a constructor that refuses a key, or a forward pass that
    # fails, is one line here too, not torchinfo's traceback.
    with quiet_logs():
        check_model_output(without_pretrained_download(cfg.model), f"model={name}")
    return cfg


def has_key(name: str, override: str) -> bool:
    """Whether model ``name``'s config has the key ``override`` sets (``model.pretrained=true``:
    only the models with pretrained weights)."""
    cfg = composed_or_none((f"model={name}",))
    return cfg is not None and holds_key(cfg, override_key(override))


def model_statistics(cfg: DictConfig) -> ModelStatistics:
    """torchinfo's statistics of ``cfg.model`` at input (64, 3, 128, 128), computed on shapes only
    (on the CPU, for real, for a model of the user's own that the meta device cannot run)."""
    try:
        return _statistics_on(cfg, "meta")
    except RuntimeError:  # torchinfo's "Failed to run torchinfo": data-dependent code, custom ops
        pass
    try:
        return _statistics_on(cfg, "cpu")
    except RuntimeError as err:  # a CUDA-only op: trainable on a GPU, not countable here
        cause = first_line(err.__cause__ or err)
        raise SkinclfError(
            f"model={cfg.model.name}: torchinfo cannot run it on the meta device or the CPU ({cause})"
        ) from err


def _statistics_on(cfg: DictConfig, device: str) -> ModelStatistics:
    # Quietly: a table of shapes needs no weights, and "random VGG-16 features, NOT the paper's
    # setup" would read as if it changed the table.
    with torch.device(device), quiet_logs():
        model = build_model(cfg.model)
    return summary(
        model,
        input_size=INPUT_SIZE,
        device=device,
        verbose=0,
        col_names=("output_size", "num_params"),
        depth=4,
    )


def layer_table(name: str, overrides: list[str] = ()) -> str:
    """The Appendix C block of one model: a header line, then torchinfo's table."""
    cfg = model_config(name, overrides)
    pipeline = cfg.model.pipeline._target_.rsplit(".", 1)[-1]
    header = f"model={name}: {cfg.model.arch._target_}, pipeline {pipeline}, input {INPUT_SIZE}"
    return f"{header}\n{model_statistics(cfg)}"


@dataclass
class Totals:
    """One line of ``model=all``."""

    model: str
    architecture: str
    total_params: int
    trainable_params: int
    mult_adds_g: float


def totals(name: str, overrides: list[str] = ()) -> Totals:
    """Parameter and mult-add totals of one model."""
    cfg = model_config(name, overrides)
    stats = model_statistics(cfg)
    return Totals(
        name,
        cfg.model.arch._target_.rsplit(".", 1)[-1],
        stats.total_params,
        stats.trainable_params,
        round(stats.total_mult_adds / 1e9, 2),
    )


def overview(overrides: list[str] = (), some_models_only: list[str] = ()) -> str:
    """One line per model in conf/model/: architecture, total and trainable parameters, mult-adds.
    ``some_models_only``: the overrides of keys only some models have (model.pretrained,
    model.freeze), each given to those models alone."""
    rows = [
        totals(name, [o for o in overrides if o not in some_models_only or has_key(name, o)])
        for name in model_names()
    ]
    width = max(len(r.model) for r in rows)
    arch = max(len(r.architecture) for r in rows)
    header = ("model", "architecture", "total params", "trainable", "mult-adds (G)")
    lines = [f"{header[0]:<{width}}  {header[1]:<{arch}}  {header[2]:>13}  {header[3]:>13}  {header[4]:>13}"]
    lines += [
        f"{r.model:<{width}}  {r.architecture:<{arch}}  {r.total_params:>13,}  {r.trainable_params:>13,}  "
        f"{r.mult_adds_g:>13.2f}"
        for r in rows
    ]
    return "\n".join(lines) + f"\n(input {INPUT_SIZE}, torchinfo)"


def _check_appended_keys(name: str, overrides: list[str]) -> None:
    """A ``+key=value`` that no config of model ``name`` defines, as `skinclf train` refuses it:
    nothing reads it, so a misspelt ``+model.freez=3`` would print the table of another setting."""
    appended = [o for o in overrides if o.startswith("+")]
    if not appended:
        return
    given = compose_config([f"model={name}", *overrides])
    known = compose_config([f"model={name}", *(o for o in overrides if o not in appended)])
    unknown = keys_not_in(given, known)
    if unknown:
        raise SkinclfError(
            f"{unknown[0]}: not a key of the configs (model={name}), so nothing would read it; check its "
            "spelling (`skinclf train --help` lists the keys)"
        )


def main(args: list[str]) -> None:
    """Entry point of ``skinclf summary model=NAME [OVERRIDES]``."""
    overrides = summary_parser().parse_args(args).overrides
    for override in overrides:
        if "=" not in override:
            raise SkinclfError(f"{override!r}: expected KEY=VALUE, e.g. model=resnet")
    names = [o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0] == "model"]
    rest = [o for o in overrides if o.split("=", 1)[0] != "model"]
    name = names[-1] if names else None
    # A misspelt key named with the nearest one, as `skinclf train` names it (Hydra's "Could not
    # override 'trainer.max_epoch'" says neither). model=all is checked as a sweep over the models:
    # a key only some have (model.pretrained) goes to those.
    chosen = ",".join(model_names()) if name == "all" else name
    some_models_only = check_override_keys([*([f"model={chosen}"] if chosen else []), *rest])
    name = name or str(compose_config(rest).model.name)
    if name != "all":
        _check_appended_keys(name, rest)
    print(overview(rest, some_models_only) if name == "all" else layer_table(name, rest))
