"""The modern recipe's training augmentation for dermoscopy (``recipe.augment``), batched on tensors.

A dermoscopic image has no up, down, left or right, and its colours carry diagnostic cues
(blue-grey veil, red areas): so every flip and 90-degree rotation is fair, while colour changes
stay small and the hue is never shifted. Per image, each applied independently:

- random resized crop: a window of ``crop_scale`` of the image area and aspect ratio in
  ``crop_ratio``, drawn as torchvision's RandomResizedCrop draws it (up to 10 tries for a window
  that fits in the image, else the centre crop), resized back to full size (bilinear);
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
from dataclasses import dataclass, fields
from typing import Any

import torch

from skinclf.config import check_bool, number_option, number_pair
from skinclf.data.pipeline import input_in_chunks, warp
from skinclf.errors import SkinclfError

# ITU-R 601 luma, as torchvision's rgb_to_grayscale.
_GRAY = (0.299, 0.587, 0.114)
JITTER = ("brightness", "contrast", "saturation")
# Tries for a crop window that fits in the image, as torchvision's RandomResizedCrop.
CROP_TRIES = 10


@dataclass(frozen=True)
class AugmentParams:
    """One batch's random draws, one row per image."""

    hflip: torch.Tensor  # bool (N,)
    vflip: torch.Tensor  # bool (N,)
    quarter_turns: torch.Tensor  # int64 (N,) in 0..3
    crop: torch.Tensor  # float (N, 4): width, height (fractions of the side), centre x, y in [-1, 1]
    colour: torch.Tensor  # float (N, 3): brightness, contrast, saturation factors

    def __getitem__(self, rows: slice) -> AugmentParams:
        """The draws of the images at ``rows`` only."""
        return AugmentParams(**{f.name: getattr(self, f.name)[rows] for f in fields(self)})


def recipe_pipeline(pipeline: Any, augment: Any) -> Any:
    """The training pipeline of a recipe: ``pipeline`` (the model's own) when ``augment.enabled``
    is false, otherwise :class:`DermoscopyAugmentation` around it with the other ``augment`` keys.
    The keys are checked either way: a bad value is refused, not stored unused in the run's config."""
    options = {str(k): v for k, v in dict(augment).items()}
    enabled = check_bool("recipe.augment.enabled", options.pop("enabled", False))
    try:
        augmentation = DermoscopyAugmentation(pipeline, **options)
    except TypeError as err:  # an unknown key
        raise SkinclfError(
            f"recipe.augment: {err}; expected the keys enabled, flip_p, rot90, crop_scale, crop_ratio, "
            "brightness, contrast, saturation"
        ) from err
    return augmentation if enabled else pipeline


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
        self.rot90 = check_bool("recipe.augment.rot90", rot90)
        self.flip_p = number_option(
            "recipe.augment.flip_p", flip_p, lambda p: 0 <= p <= 1, "a probability in [0, 1]"
        )
        self.crop_scale = number_pair(
            "recipe.augment.crop_scale",
            crop_scale,
            lambda lo, hi: 0 < lo <= hi <= 1,
            "0 < lo <= hi <= 1 (fractions of the area)",
        )
        self.crop_ratio = number_pair(
            "recipe.augment.crop_ratio", crop_ratio, lambda lo, hi: 0 < lo <= hi, "0 < lo <= hi"
        )
        brightness, contrast, saturation = (
            number_option(f"recipe.augment.{key}", value, lambda f: 0 <= f < 1, "a number in [0, 1)")
            for key, value in zip(JITTER, (brightness, contrast, saturation), strict=True)
        )
        self.jitter = (brightness, contrast, saturation)

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
        """Augmented, then normalised by the base pipeline, a chunk of images at a time on the CPU
        (see :func:`~skinclf.data.pipeline.input_in_chunks`)."""
        params = self.draw(len(images), generator)
        return input_in_chunks(
            images,
            dtype,
            lambda rows, out: self.base.warped_to_input(apply_augmentation(images[rows], params[rows]), out),
        )

    def draw(self, n: int, generator: torch.Generator) -> AugmentParams:
        """The random choices for ``n`` images, from ``generator`` (CPU) in a fixed order."""
        u = torch.rand(n, 8, generator=generator)
        width, height, centred = self.crop_size(torch.rand(n, CROP_TRIES, 2, generator=generator))
        # The window lies inside the image: its centre moves at most (1 - size) from the middle.
        cx, cy = (u[:, 3] * 2 - 1) * (1 - width), (u[:, 4] * 2 - 1) * (1 - height)
        cx, cy = cx.masked_fill(centred, 0.0), cy.masked_fill(centred, 0.0)
        factors = 1 + (u[:, 5:8] * 2 - 1) * torch.tensor(self.jitter)
        turns = (u[:, 2] * 4).long().clamp(max=3) if self.rot90 else torch.zeros(n, dtype=torch.long)
        return AugmentParams(
            hflip=u[:, 0] < self.flip_p,
            vflip=u[:, 1] < self.flip_p,
            quarter_turns=turns,
            crop=torch.stack([width, height, cx, cy], dim=1),
            colour=factors,
        )

    def crop_size(self, tries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Crop windows' (width, height) as fractions of a square image's side, and whether each
        fell back to the centre crop, from uniform draws ``tries`` (N, CROP_TRIES, 2): per image
        the first try whose window of area in ``crop_scale`` and aspect ratio in ``crop_ratio``
        (log-uniform) fits in the image, as torchvision's RandomResizedCrop; where none fits, the
        whole image or, for a ratio range without 1, the largest centred window of the nearest
        ratio. (Clipping a window that does not fit instead, as skinclf did before, gave squarer
        windows than torchvision's, and larger: a mean area of 0.78 against 0.74.)"""
        lo, hi = self.crop_scale
        area = lo + (hi - lo) * tries[..., 0]
        ratio_lo, ratio_hi = self.crop_ratio
        ratio = torch.exp(math.log(ratio_lo) + (math.log(ratio_hi) - math.log(ratio_lo)) * tries[..., 1])
        width, height = (area * ratio).sqrt(), (area / ratio).sqrt()
        fits = (width <= 1) & (height <= 1)
        first = fits.int().argmax(dim=1, keepdim=True)  # argmax gives the first maximum
        width, height = width.gather(1, first).squeeze(1), height.gather(1, first).squeeze(1)
        centred = ~fits.any(dim=1)
        fallback = (1.0, 1 / ratio_lo) if ratio_lo > 1 else (ratio_hi, 1.0) if ratio_hi < 1 else (1.0, 1.0)
        return width.masked_fill(centred, fallback[0]), height.masked_fill(centred, fallback[1]), centred


# torch.rot90(x, k, dims=(-2, -1)) as maps from output to input positions (x, y) in [-1, 1]:
# one quarter turn samples the image at (-y, x).
_QUARTER_TURNS = torch.tensor(
    [
        [[1.0, 0.0], [0.0, 1.0]],
        [[0.0, -1.0], [1.0, 0.0]],
        [[-1.0, 0.0], [0.0, -1.0]],
        [[0.0, 1.0], [-1.0, 0.0]],
    ]
)


def geometry_theta(params: AugmentParams) -> torch.Tensor:
    """(N, 2, 3) affine maps (``affine_grid``'s convention) of the crop, then the flips, then the
    quarter turns: output position p samples the image at crop(hflip(vflip(turn(p))))."""
    width, height, cx, cy = params.crop.unbind(1)
    mirror = torch.stack([1.0 - 2.0 * params.hflip.float(), 1.0 - 2.0 * params.vflip.float()], dim=1)
    # Entries of the flips and turns are 0 and +-1, so the maps stay exact where nothing is cropped.
    linear = (
        torch.stack([width, height], dim=1).unsqueeze(2)
        * mirror.unsqueeze(2)
        * _QUARTER_TURNS[params.quarter_turns]
    )
    return torch.cat([linear, torch.stack([cx, cy], dim=1).unsqueeze(2)], dim=2)


def apply_augmentation(x: torch.Tensor, params: AugmentParams) -> torch.Tensor:
    """Crop, flip, rotate and colour-jitter an (N, 3, H, W) batch in 0-255 units (uint8 or float)
    as ``params`` say: a new float32 NCHW tensor.

    Crop, flips and quarter turns are one affine map per image (:func:`geometry_theta`) and the
    whole batch goes through one bilinear warp; flips and turns land on pixel centres, exactly
    for power-of-two sizes. The colour jitter then works in place on the warped batch.
    """
    n, _, height, width = x.shape
    if height != width and bool(params.quarter_turns.ne(0).any()):
        raise ValueError(f"90-degree rotations need square images, got {(height, width)}")
    # Border padding: a window at the image's edge samples up to half a pixel beyond it, which
    # resizing a crop fills with the edge pixels, not black. Flips and turns never leave the image.
    x = warp(x, geometry_theta(params), padding="border")
    if bool((params.colour != 1).any()):
        brightness, contrast, saturation = (f.to(x.device).view(n, 1, 1) for f in params.colour.unbind(1))
        v = x.view(n, 3, -1)
        # Each step clipped to the pixel range, as torchvision's adjust_* functions do; blending
        # with a gray image g by factor f is x * f + g * (1 - f).
        v.mul_(brightness).clamp_(0, 255)
        mean = _luma(v).mean(dim=2, keepdim=True)
        v.mul_(contrast).add_(mean * (1 - contrast)).clamp_(0, 255)
        gray = _luma(v)
        v.mul_(saturation).add_(gray * (1 - saturation)).clamp_(0, 255)
    return x


def _luma(v: torch.Tensor) -> torch.Tensor:
    """(N, 1, P) gray values of (N, 3, P) RGB rows."""
    r, g, b = _GRAY
    return (v[:, 0] * r).add_(v[:, 1], alpha=g).add_(v[:, 2], alpha=b).unsqueeze(1)
