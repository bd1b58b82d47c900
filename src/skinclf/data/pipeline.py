"""Batch pipelines: uint8 image batches -> model input, with the paper's two preprocessings.

They work on whole batches of tensors already in memory (no PIL, no per-image Python loop),
so that the training step, not data handling, dominates an epoch. Normalisation is fused into
the uint8 -> float conversion (one multiply-add per pixel).
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import NamedTuple

import torch
import torch.nn.functional as F

from skinclf.data.splits import gather_images

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
        """(N, 3, H, W) in 0-255 units (uint8 or float) -> normalised channels-last ``dtype``:
        (x / 255 - mean) / std in one pass, into a new tensor."""
        n, c, h, w = images.shape
        # Cast first, then one fused multiply-add in the target dtype: bf16 input goes straight
        # to the model without a later fp32 -> bf16 cast (0..255 integers are exact in bf16).
        # Cast and relayout as two passes: torch's fused cast-and-relayout is slower than both.
        x = images.to(dtype).contiguous(memory_format=torch.channels_last)
        # The multiply-add runs on (N*H, W*C) rows with the per-channel constants tiled along a
        # row: broadcasting them over a channels-last tensor's 3-element inner dim is ~4x slower.
        rows = x.permute(0, 2, 3, 1).view(n * h, w * c)
        scale = (1.0 / (255.0 * self.std)).to(images.device, dtype).repeat(w)
        shift = (-self.mean / self.std).to(images.device, dtype).repeat(w)
        return torch.addcmul(shift, rows, scale).view(n, h, w, c).permute(0, 3, 1, 2)

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
    probability ``p`` per image (see :func:`augment`). All splits: normalised with the training
    split's mean/std. Rotation and crop are one affine warp (``grid_sample``).
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
        return augment(images, generator, self, dtype)

    def draw(self, n: int, generator: torch.Generator) -> AugmentationDraws:
        """Each image's random choices, drawn on the CPU ``generator`` in a fixed order, so that
        a batch's augmentation depends only on the seed, on any device."""
        draws = torch.rand(n, 5, generator=generator)
        flip, rotate, crop = draws[:, 0] < self.p, draws[:, 1] < self.p, draws[:, 2] < self.p
        angle = (draws[:, 3] * 2 - 1) * self.max_rotation * rotate
        lo, hi = self.crop_scale
        scale = torch.where(crop, lo + (hi - lo) * draws[:, 4], torch.ones(n))
        # The crop window sits anywhere inside the image: offset up to (1 - scale) in [-1, 1].
        offset = (torch.rand(n, 2, generator=generator) * 2 - 1) * (1 - scale).unsqueeze(1)
        return AugmentationDraws(flip, rotate | crop, angle, scale, offset)


class AugmentationDraws(NamedTuple):
    """Per image: flip it?, warp it (rotation or crop)?, and the warp's angle, scale and offset."""

    flip: torch.Tensor
    warp: torch.Tensor
    angle: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor


def augment(
    images: torch.Tensor, generator: torch.Generator, pipeline: AugmentedPipeline, dtype: torch.dtype
) -> torch.Tensor:
    """Flip / rotate / crop a uint8 (N, 3, H, W) batch per image at random, normalised into a new
    channels-last ``dtype`` tensor (``images`` is left as it is).

    The random choices come from :meth:`AugmentedPipeline.draw`. Flips and warps run on just
    the chosen images, as contiguous slices (torch's index_copy_ and per-image masks cost more
    than the transforms): the batch is gathered in the order plain, flipped, flipped-and-warped,
    warped, so that each transform runs on one slice, and put back in order at the end.
    """
    n, _, height, width = images.shape
    flip, warp, angle, scale, offset = pipeline.draw(n, generator)
    groups = [(~flip & ~warp), (flip & ~warp), (flip & warp), (~flip & warp)]
    order = torch.cat([group.nonzero().flatten() for group in groups])
    n_plain, n_flip, n_flip_warp = (int(group.sum()) for group in groups[:3])
    # One gather of NHWC rows in that order, then a flip and a warp of slices.
    nhwc = gather_images(images, order.to(images.device)).permute(0, 2, 3, 1)
    flips = slice(n_plain, n_plain + n_flip + n_flip_warp)
    nhwc[flips] = nhwc[flips].flip(2)
    parts = [pipeline.to_input(nhwc[: n_plain + n_flip].permute(0, 3, 1, 2), dtype)]
    warped = order[n_plain + n_flip :]
    if len(warped):
        cos, sin, s = angle[warped].cos(), angle[warped].sin(), scale[warped]
        theta = torch.zeros(len(warped), 2, 3)
        theta[:, 0, 0], theta[:, 0, 1], theta[:, 0, 2] = s * cos, -s * sin, offset[warped, 0]
        theta[:, 1, 0], theta[:, 1, 1], theta[:, 1, 2] = s * sin, s * cos, offset[warped, 1]
        # NCHW float32: the warp (grid_sample) is slower on channels-last tensors on CPUs.
        sub = (
            nhwc[n_plain + n_flip :]
            .permute(0, 3, 1, 2)
            .to(torch.float32, memory_format=torch.contiguous_format)
        )
        grid = _affine_grid(theta.to(sub.device), height, width)
        # Pixels rotated in from outside the image are black, as torchvision's RandomRotation(fill=0).
        sub = F.grid_sample(sub, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        parts.append(pipeline.to_input(sub, dtype))
    # Back in batch order: row i of the result is image order^-1[i] of the gathered ones.
    out = torch.cat(parts)  # channels-last, as its parts are
    return gather_images(out, torch.argsort(order).to(out.device))


@lru_cache(maxsize=8)
def _identity_grid(height: int, width: int, device: torch.device) -> torch.Tensor:
    """``F.affine_grid``'s base grid, (1, H*W, 3) rows of (x, y, 1): built once per size."""
    identity = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]], device=device)
    xy = F.affine_grid(identity, [1, 1, height, width], align_corners=False)
    return torch.cat([xy, torch.ones_like(xy[..., :1])], dim=-1).view(1, height * width, 3)


def _affine_grid(theta: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``F.affine_grid(theta, (N, C, H, W), align_corners=False)`` with the same numbers, without
    rebuilding the base grid for every batch (it cost as much as the warp itself)."""
    base = _identity_grid(height, width, theta.device)
    return base.expand(len(theta), -1, -1).bmm(theta.transpose(1, 2)).view(len(theta), height, width, 2)
