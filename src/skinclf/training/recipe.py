"""Training recipes (``cfg.recipe``): what the shared loop uses besides the model and the data.

Optimizer (Adam or AdamW, a lower learning rate for a pretrained body), learning-rate schedule
(constant, or cosine with linear warm-up, stepped per batch), mixup, an exponential moving average
(EMA) of the weights, and test-time augmentation (TTA, the mean over flips). ``Recipe()`` is the
paper's recipe: Adam at a constant learning rate and none of the rest, so that the loop then does
exactly what it did before recipes existed. Each piece is switched on its own (conf/recipe/).
The data augmentation of ``recipe=modern`` is a pipeline (skinclf.data.dermoscopy), not a loop step.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, fields
from functools import partial
from typing import Any

import scipy.special
import torch
from torch import nn

from skinclf.config import check_bool, is_number
from skinclf.errors import SkinclfError

OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
SCHEDULES = ("constant", "cosine")


@dataclass(frozen=True)
class Recipe:
    """The loop's recipe switches (``recipe.*`` keys); the defaults are the paper's."""

    optimizer: str = "adam"
    # Learning rate of the pretrained body = optim.lr x this (the new head trains at optim.lr).
    body_lr_scale: float = 1.0
    schedule: str = "constant"
    warmup_epochs: float = 0.0
    # > 0: mixup with a Beta(alpha, alpha) mixing weight; 0: off.
    mixup_alpha: float = 0.0
    ema: bool = False
    ema_decay: float = 0.99
    tta: bool = False

    @classmethod
    def from_config(cls, cfg: Any) -> Recipe:
        """The loop's part of ``cfg.recipe`` (other keys, e.g. ``augment``, are ignored here),
        checked: a SkinclfError names any key with an unusable value."""
        values = {f.name: cfg[f.name] for f in fields(cls) if f.name in cfg}
        recipe = cls(**values)
        checks = (
            ("optimizer", recipe.optimizer in OPTIMIZERS, f"one of {', '.join(OPTIMIZERS)}"),
            ("schedule", recipe.schedule in SCHEDULES, f"one of {', '.join(SCHEDULES)}"),
            (
                "body_lr_scale",
                is_number(recipe.body_lr_scale) and recipe.body_lr_scale > 0,
                "a finite number > 0",
            ),
            (
                "warmup_epochs",
                is_number(recipe.warmup_epochs) and recipe.warmup_epochs >= 0,
                "a finite number >= 0",
            ),
            (
                "mixup_alpha",
                is_number(recipe.mixup_alpha) and recipe.mixup_alpha >= 0,
                "a finite number >= 0",
            ),
            ("ema_decay", is_number(recipe.ema_decay) and 0 < recipe.ema_decay < 1, "a number in (0, 1)"),
        )
        for key, ok, expected in checks:
            if not ok:
                raise SkinclfError(f"recipe.{key}={getattr(recipe, key)!r}: expected {expected}")
        for key in ("ema", "tta"):
            check_bool(f"recipe.{key}", getattr(recipe, key))
        return recipe


def pretrained_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of ``model`` that start from pretrained weights: what its optional
    ``pretrained_parameters()`` method returns (skinclf.models.backbones); none otherwise."""
    method = getattr(model, "pretrained_parameters", None)
    return list(method()) if callable(method) else []


def build_optimizer(
    module: nn.Module,
    lr: float,
    weight_decay: float,
    recipe: Recipe,
    pretrained: Iterable[nn.Parameter] = (),
) -> torch.optim.Optimizer:
    """The recipe's optimizer over ``module``'s trainable parameters. Those in ``pretrained``
    train at ``lr * recipe.body_lr_scale`` (a second parameter group); the first group is at ``lr``.
    The fused kernel (one pass over all tensors) when available."""
    params = [p for p in module.parameters() if p.requires_grad]
    body = {id(p) for p in pretrained}
    groups: list[Any] = params
    if recipe.body_lr_scale != 1.0 and any(id(p) in body for p in params):
        head = [p for p in params if id(p) not in body]
        groups = [{"params": head}] if head else []
        groups.append({"params": [p for p in params if id(p) in body], "lr": lr * recipe.body_lr_scale})
    optimizer = OPTIMIZERS[recipe.optimizer]
    try:
        return optimizer(groups, lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, TypeError):  # older torch, or a device without a fused kernel
        return optimizer(groups, lr=lr, weight_decay=weight_decay, foreach=True)


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, cosine: bool = True) -> float:
    """Learning-rate factor at optimizer step ``step`` (0-based): linear warm-up to 1 over
    ``warmup_steps``, then a cosine decay towards 0 at ``total_steps`` (or 1 on, when not
    ``cosine``: the constant schedule's warm-up)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if not cosine:
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def build_scheduler(
    optimizer: torch.optim.Optimizer, recipe: Recipe, steps_per_epoch: int, max_epochs: int
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """The recipe's per-batch schedule over ``max_epochs`` epochs; None for a constant rate
    without warm-up (the paper's), which leaves the optimizer exactly as it was."""
    total = steps_per_epoch * max_epochs
    warmup = min(total, round(recipe.warmup_epochs * steps_per_epoch))
    cosine = recipe.schedule != "constant"
    if not cosine and warmup == 0:
        return None
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, partial(warmup_cosine, warmup_steps=warmup, total_steps=total, cosine=cosine)
    )


def mixup(
    x: torch.Tensor, y: torch.Tensor, alpha: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup of a batch with a shuffled copy of itself: ``lam * x + (1 - lam) * x[perm]`` and the
    same for the labels (soft BCE targets). ``lam`` ~ Beta(alpha, alpha), drawn from ``generator``
    (through the inverse CDF, so the run stays reproducible), folded to >= 0.5 so that each mixed
    image keeps its own label as the larger part (training accuracy is counted against it)."""
    u = torch.rand((), generator=generator, dtype=torch.float64).item()
    lam = float(scipy.special.betaincinv(alpha, alpha, u))
    lam = max(lam, 1.0 - lam)
    perm = torch.randperm(len(x), generator=generator).to(x.device)
    mixed = x * lam + x.index_select(0, perm) * (1.0 - lam)
    return mixed.to(x.dtype), y * lam + y.index_select(0, perm) * (1.0 - lam)


class WeightEMA:
    """Exponential moving average of a module's weights (parameters and floating buffers).

    ``update`` after every optimizer step. The decay warms up as ``min(decay, (1 + n) / (10 + n))``
    after n updates (timm's ModelEmaV2), so that short runs are not dominated by the initial weights.
    """

    def __init__(self, module: nn.Module, decay: float) -> None:
        self.decay = float(decay)
        self.updates = 0
        self.shadow = {k: v.detach().clone() for k, v in module.state_dict().items()}

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        """Move the average towards ``module``'s current weights."""
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        current = module.state_dict()
        floats = [k for k, v in self.shadow.items() if v.is_floating_point()]
        torch._foreach_lerp_([self.shadow[k] for k in floats], [current[k] for k in floats], 1.0 - decay)
        for k, v in self.shadow.items():
            if not v.is_floating_point():
                v.copy_(current[k])  # counters (BatchNorm's num_batches_tracked)

    @contextlib.contextmanager
    def applied(self, module: nn.Module) -> Iterator[nn.Module]:
        """Within the block, ``module`` holds the averaged weights; its own weights afterwards."""
        raw = {k: v.detach().clone() for k, v in module.state_dict().items()}
        module.load_state_dict(self.shadow)
        try:
            yield module
        finally:
            module.load_state_dict(raw)

    def state_dict(self) -> dict[str, Any]:
        """What resuming needs: the averaged weights and the number of updates."""
        return {"decay": self.decay, "updates": self.updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.decay, self.updates = float(state["decay"]), int(state["updates"])
        for k, v in state["shadow"].items():
            self.shadow[k].copy_(v)


class FlipTTA(nn.Module):
    """Test-time augmentation: one logit per image, that of the mean MEL probability of ``model``
    over the image, its horizontal, vertical and double flip (dermoscopy has no up or left)."""

    # The dimensions each view flips: none, width, height, both.
    FLIPS: tuple[tuple[int, ...], ...] = ((), (-1,), (-2,), (-2, -1))

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    @staticmethod
    def view(x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
        """``x`` flipped along ``dims`` (one of FLIPS); a flip is its own inverse."""
        return x.flip(dims) if dims else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        views = [self.view(x, dims) for dims in self.FLIPS]
        probs = torch.stack([torch.sigmoid(self.model(v).float()) for v in views]).mean(0)
        return torch.logit(probs, eps=1e-6)
