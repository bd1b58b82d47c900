"""The modern recipe's training augmentation for dermoscopy (``recipe.augment``), batched on tensors.

A dermoscopic image has no up, down, left or right, and its colours carry diagnostic cues
(blue-grey veil, red areas): so every flip and 90-degree rotation is fair, while colour changes
stay small and the hue is never shifted. Per image, each applied independently:

- random resized crop: a window of ``crop_scale`` of the image area and aspect ratio in
  ``crop_ratio`` (clipped to the image), resized back to full size (bilinear);
- horizontal flip and vertical flip, each with probability ``flip_p``;
- rotation by 0, 90, 180 or 270 degrees, equally likely (``rot90``);
- brightness, contrast and saturation factors drawn from ``1 +- brightness`` etc.

Each piece is off at its neutral value (``crop_scale=[1, 1]`` and ``crop_ratio=[1, 1]``,
``flip_p=0``, ``rot90=false``, ``brightness=0`` ...). torchvision's v2 transforms draw one set of
parameters per call, i.e. per batch; here every image draws its own, from the loop's generator in a
fixed order, so a run's augmentation depends only on its seed, on any device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from skinclf.errors import SkinclfError

# ITU-R 601 luma, as torchvision's rgb_to_grayscale.
_GRAY = (0.299, 0.587, 0.114)
JITTER = ("brightness", "contrast", "saturation")


@dataclass(frozen=True)
class AugmentParams:
    """One batch's random draws, one row per image."""

    hflip: torch.Tensor  # bool (N,)
    vflip: torch.Tensor  # bool (N,)
    quarter_turns: torch.Tensor  # int64 (N,) in 0..3
    crop: torch.Tensor  # float (N, 4): width, height (fractions of the side), centre x, y in [-1, 1]
    colour: torch.Tensor  # float (N, 3): brightness, contrast, saturation factors


def recipe_pipeline(pipeline: Any, augment: Any) -> Any:
    """The training pipeline of a recipe: ``pipeline`` (the model's own) when ``augment.enabled``
    is false, otherwise :class:`DermoscopyAugmentation` around it with the other ``augment`` keys."""
    options = {str(k): v for k, v in dict(augment).items()}
    if not options.pop("enabled", False):
        return pipeline
    try:
        return DermoscopyAugmentation(pipeline, **options)
    except TypeError as err:  # an unknown key
        raise SkinclfError(
            f"recipe.augment: {err}; expected the keys enabled, flip_p, rot90, crop_scale, crop_ratio, "
            "brightness, contrast, saturation"
        ) from err


class DermoscopyAugmentation:
    """Wraps a model's pipeline: its normalisation (fit on the training split, state, evaluation
    batches) is kept, its own training augmentation (if any) is replaced by this one."""

    def __init__(
        self,
        base: Any,
        flip_p: float = 0.5,
        rot90: bool = True,
        crop_scale: tuple[float, float] = (0.6, 1.0),
        crop_ratio: tuple[float, float] = (3 / 4, 4 / 3),
        brightness: float = 0.1,
        contrast: float = 0.1,
        saturation: float = 0.1,
    ) -> None:
        self.base = base
        self.flip_p = float(flip_p)
        self.rot90 = bool(rot90)
        self.crop_scale = (float(crop_scale[0]), float(crop_scale[1]))
        self.crop_ratio = (float(crop_ratio[0]), float(crop_ratio[1]))
        self.jitter = (float(brightness), float(contrast), float(saturation))
        values = {"flip_p": self.flip_p, "crop_scale": self.crop_scale, "crop_ratio": self.crop_ratio}
        values.update(zip(JITTER, self.jitter, strict=True))
        lo, hi = self.crop_scale
        checks = (
            ("flip_p", 0 <= self.flip_p <= 1, "a probability in [0, 1]"),
            ("crop_scale", 0 < lo <= hi <= 1, "[lo, hi] with 0 < lo <= hi <= 1 (fractions of the area)"),
            ("crop_ratio", 0 < self.crop_ratio[0] <= self.crop_ratio[1], "[lo, hi] with 0 < lo <= hi"),
            *((key, 0 <= values[key] < 1, "a number in [0, 1)") for key in JITTER),
        )
        for key, ok, expected in checks:
            if not ok:
                raise SkinclfError(f"recipe.augment.{key}={values[key]!r}: expected {expected}")

    def fit(self, train_images: torch.Tensor) -> None:
        """The base pipeline's statistics, from the training split only."""
        self.base.fit(train_images)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.base.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.base.load_state_dict(state)

    def eval_batch(self, images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Evaluation batches are the base pipeline's: never augmented."""
        return self.base.eval_batch(images, dtype)

    def train_batch(
        self, images: torch.Tensor, generator: torch.Generator, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """Augmented, then normalised by the base pipeline."""
        params = self.draw(len(images), generator)
        return self.base.to_input(apply_augmentation(images.float(), params), dtype)

    def draw(self, n: int, generator: torch.Generator) -> AugmentParams:
        """The random choices for ``n`` images, from ``generator`` (CPU) in a fixed order."""
        u = torch.rand(n, 10, generator=generator)
        lo, hi = self.crop_scale
        area = lo + (hi - lo) * u[:, 3]
        log_lo, log_hi = math.log(self.crop_ratio[0]), math.log(self.crop_ratio[1])
        ratio = torch.exp(log_lo + (log_hi - log_lo) * u[:, 4])
        width, height = (area * ratio).sqrt().clamp(max=1.0), (area / ratio).sqrt().clamp(max=1.0)
        # The window lies inside the image: its centre moves at most (1 - size) from the middle.
        cx, cy = (u[:, 5] * 2 - 1) * (1 - width), (u[:, 6] * 2 - 1) * (1 - height)
        factors = 1 + (u[:, 7:10] * 2 - 1) * torch.tensor(self.jitter)
        turns = (u[:, 2] * 4).long().clamp(max=3) if self.rot90 else torch.zeros(n, dtype=torch.long)
        return AugmentParams(
            hflip=u[:, 0] < self.flip_p,
            vflip=u[:, 1] < self.flip_p,
            quarter_turns=turns,
            crop=torch.stack([width, height, cx, cy], dim=1),
            colour=factors,
        )


def apply_augmentation(x: torch.Tensor, params: AugmentParams) -> torch.Tensor:
    """Crop, flip, rotate and colour-jitter a float (N, 3, H, W) batch in 0-255 units as ``params`` say."""
    n, device = x.shape[0], x.device
    width, height, cx, cy = params.crop.unbind(1)
    cropped = ((width < 1) | (height < 1)).nonzero().flatten()
    if len(cropped):
        theta = torch.zeros(len(cropped), 2, 3)
        theta[:, 0, 0], theta[:, 0, 2] = width[cropped], cx[cropped]
        theta[:, 1, 1], theta[:, 1, 2] = height[cropped], cy[cropped]
        cropped = cropped.to(device)
        sub = x.index_select(0, cropped)
        grid = F.affine_grid(theta.to(device, x.dtype), list(sub.shape), align_corners=False)
        x = x.index_copy(0, cropped, F.grid_sample(sub, grid, mode="bilinear", align_corners=False))
    x = torch.where(params.hflip.to(device).view(n, 1, 1, 1), x.flip(-1), x)
    x = torch.where(params.vflip.to(device).view(n, 1, 1, 1), x.flip(-2), x)
    for turns in (1, 2, 3):
        idx = (params.quarter_turns == turns).nonzero().flatten().to(device)
        if len(idx):
            if x.shape[-1] != x.shape[-2]:
                raise ValueError(f"90-degree rotations need square images, got {tuple(x.shape[-2:])}")
            x = x.index_copy(0, idx, torch.rot90(x.index_select(0, idx), turns, dims=(-2, -1)))
    if bool((params.colour != 1).any()):
        brightness, contrast, saturation = (
            f.to(device, x.dtype).view(n, 1, 1, 1) for f in params.colour.unbind(1)
        )
        gray_weights = torch.tensor(_GRAY, device=device, dtype=x.dtype).view(1, 3, 1, 1)
        # Each step clipped to the pixel range, as torchvision's adjust_* functions do.
        x = (x * brightness).clamp(0, 255)
        mean = (x * gray_weights).sum(1, keepdim=True).mean(dim=(2, 3), keepdim=True)
        x = ((x - mean) * contrast + mean).clamp(0, 255)
        gray = (x * gray_weights).sum(1, keepdim=True)
        x = ((x - gray) * saturation + gray).clamp(0, 255)
    return x
