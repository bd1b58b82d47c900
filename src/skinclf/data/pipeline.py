"""Batch pipelines: uint8 image batches -> model input, with the paper's two preprocessings.

They work on whole batches of tensors already in memory (no PIL, no per-image Python loop),
so that the training step, not data handling, dominates an epoch. Normalisation is fused into
the uint8 -> float conversion (one multiply-add per pixel).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

_CHUNK = 512  # images per chunk when computing dataset statistics, to bound memory


class DefaultPipeline:
    """The paper's default dataset: pixel values scaled to [0, 1]; no augmentation."""

    def __init__(self) -> None:
        self.mean = torch.zeros(3)
        self.std = torch.ones(3)

    def fit(self, train_images: torch.Tensor) -> None:
        """Compute whatever statistics the pipeline needs, from the training split only."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"mean": self.mean.clone(), "std": self.std.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.mean, self.std = state["mean"].float(), state["std"].float()

    def to_input(self, images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """uint8 (N, 3, H, W) -> normalised float ``dtype``: (x / 255 - mean) / std in one pass."""
        scale = (1.0 / (255.0 * self.std)).to(images.device, dtype).view(1, 3, 1, 1)
        shift = (-self.mean / self.std).to(images.device, dtype).view(1, 3, 1, 1)
        # Cast first, then one fused multiply-add in the target dtype: bf16 input goes straight
        # to the model without a later fp32 -> bf16 cast (0..255 integers are exact in bf16).
        x = images.to(dtype).contiguous(memory_format=torch.channels_last)
        return torch.addcmul(shift, x, scale)

    def train_batch(
        self, images: torch.Tensor, generator: torch.Generator, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """A training batch: augmentation (if any) and normalisation."""
        return self.to_input(images, dtype)

    def eval_batch(self, images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A validation/test/prediction batch: normalisation only, never augmentation."""
        return self.to_input(images, dtype)


class ImageNetPipeline(DefaultPipeline):
    """Fixed ImageNet mean/std, for backbones pretrained on ImageNet."""

    def __init__(self) -> None:
        super().__init__()
        self.mean = torch.tensor([0.485, 0.456, 0.406])
        self.std = torch.tensor([0.229, 0.224, 0.225])


def channel_stats(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of uint8 images in [0, 1] units, in chunks (float64 sums)."""
    total = torch.zeros(3, dtype=torch.float64)
    total_sq = torch.zeros(3, dtype=torch.float64)
    for start in range(0, len(images), _CHUNK):
        chunk = images[start : start + _CHUNK].to(torch.float64) / 255.0
        total += chunk.sum(dim=(0, 2, 3))
        total_sq += chunk.square().sum(dim=(0, 2, 3))
    count = images.shape[0] * images.shape[2] * images.shape[3]
    mean = total / count
    std = (total_sq / count - mean.square()).clamp_min(1e-12).sqrt()
    return mean.float(), std.float()


class AugmentedPipeline(DefaultPipeline):
    """The paper's augmented dataset.

    Training images: horizontal flip, rotation and crop, each applied independently with
    probability ``p`` per image. All splits: normalised with the training split's mean/std.
    Rotation and crop are one affine warp (``grid_sample``) of just the images that need it.
    """

    def __init__(
        self,
        p: float = 0.5,
        max_rotation_degrees: float = 30.0,
        crop_scale: tuple[float, float] = (0.75, 1.0),
    ) -> None:
        super().__init__()
        self.p = float(p)
        self.max_rotation = math.radians(float(max_rotation_degrees))
        self.crop_scale = (float(crop_scale[0]), float(crop_scale[1]))

    def fit(self, train_images: torch.Tensor) -> None:
        self.mean, self.std = channel_stats(train_images)

    def train_batch(
        self, images: torch.Tensor, generator: torch.Generator, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        # NCHW scratch copy: the warp (grid_sample) is slower on channels-last tensors on CPUs.
        x = images.to(torch.float32, memory_format=torch.contiguous_format)
        x = augment(x, generator, self.p, self.max_rotation, self.crop_scale)
        return self.to_input(x, dtype)


def augment(
    x: torch.Tensor,
    generator: torch.Generator,
    p: float,
    max_rotation: float,
    crop_scale: tuple[float, float],
) -> torch.Tensor:
    """Flip / rotate / crop a float (N, 3, H, W) batch in 0-255 units, per image at random,
    in place (``x`` is the caller's scratch copy) and returned.

    Random numbers are drawn on the CPU ``generator`` in a fixed order, so a batch's
    augmentation depends only on the seed, on any device.
    """
    n = x.shape[0]
    draws = torch.rand(n, 5, generator=generator)
    flip, rotate, crop = draws[:, 0] < p, draws[:, 1] < p, draws[:, 2] < p
    angle = (draws[:, 3] * 2 - 1) * max_rotation * rotate
    lo, hi = crop_scale
    scale = torch.where(crop, lo + (hi - lo) * draws[:, 4], torch.ones(n))
    # The crop window sits anywhere inside the image: offset up to (1 - scale) in [-1, 1] coords.
    offset = (torch.rand(n, 2, generator=generator) * 2 - 1) * (1 - scale).unsqueeze(1)

    # Only the chosen images are touched: full-batch passes cost more than the transforms.
    flipped = flip.nonzero().flatten().to(x.device)
    if len(flipped):
        x.index_copy_(0, flipped, x.index_select(0, flipped).flip(-1))
    warp = (rotate | crop).nonzero().flatten()
    if len(warp):
        cos, sin, s = angle[warp].cos(), angle[warp].sin(), scale[warp]
        theta = torch.zeros(len(warp), 2, 3)
        theta[:, 0, 0], theta[:, 0, 1], theta[:, 0, 2] = s * cos, -s * sin, offset[warp, 0]
        theta[:, 1, 0], theta[:, 1, 1], theta[:, 1, 2] = s * sin, s * cos, offset[warp, 1]
        warp = warp.to(x.device)
        sub = x.index_select(0, warp)
        grid = F.affine_grid(theta.to(x.device), list(sub.shape), align_corners=False)
        # Pixels rotated in from outside the image are black, as torchvision's RandomRotation(fill=0).
        warped = F.grid_sample(sub, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        x.index_copy_(0, warp, warped)
    return x
