"""Batch pipelines: uint8 image batches -> model input, with the paper's two preprocessings.

They work on whole batches of tensors already in memory (no PIL, no per-image Python loop),
so that the training step, not data handling, dominates an epoch. Normalisation is one
multiply-add per pixel, after the cast to the model's input dtype or after the augmentation's warp.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import lru_cache
from typing import NamedTuple

import torch
import torch.nn.functional as F

from skinclf.config import number_option, number_pair

_CHUNK = 512  # images per chunk when computing dataset statistics, to bound memory
# Images per warp on the CPU. A batch of 64 warps through about 33 MB of float32 input, sampling
# grid and output, more than a 2-core machine's caches hold, so each pass went to main memory; in
# chunks they stay in cache. 8 and 16 measured the same within noise, 4 and 32 worse; 16 has
# half the per-chunk calls. On CUDA the whole batch warps at once.
WARP_CHUNK = 16


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
        (x / 255 - mean) / std as one multiply-add after the cast, into a new tensor."""
        n, c, h, w = images.shape
        # Cast first, then one fused multiply-add in the target dtype: bf16 input goes straight
        # to the model without a later fp32 -> bf16 cast (0..255 integers are exact in bf16).
        # Cast and relayout as two passes: torch's fused cast-and-relayout is slower than both.
        x = images.to(dtype).contiguous(memory_format=torch.channels_last)
        # The multiply-add runs on (N*H, W*C) rows with the per-channel constants tiled along a
        # row: broadcasting them over a channels-last tensor's 3-element inner dim is ~4x slower.
        rows = x.permute(0, 2, 3, 1).view(n * h, w * c)
        scale, shift = self.scale_shift(images.device, dtype)
        return torch.addcmul(shift.repeat(w), rows, scale.repeat(w)).view(n, h, w, c).permute(0, 3, 1, 2)

    def warped_to_input(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """A float32 NCHW batch in 0-255 units, as :func:`warp` returns it -> the model's input in
        ``out`` (channels-last, the model's input dtype): normalised in place in float32 (the
        per-channel constants broadcast along contiguous rows), cast, then laid out channels-last.
        Cast first, then relayout: torch's one-pass cast-and-relayout took twice as long."""
        scale, shift = self.scale_shift(x.device, torch.float32)
        x.view(len(x), x.shape[1], -1).mul_(scale.view(1, -1, 1)).add_(shift.view(1, -1, 1))
        return out.copy_(x.to(out.dtype))

    def scale_shift(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Per channel, the ``x * scale + shift`` that normalises pixel values in 0-255 units."""
        return (1.0 / (255.0 * self.std)).to(device, dtype), (-self.mean / self.std).to(device, dtype)

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
    split's mean/std. Flip, rotation and crop are one affine warp (``grid_sample``).
    """

    def __init__(
        self,
        p: float = 0.5,
        max_rotation_degrees: float = 30.0,
        crop_scale: tuple[float, float] = (0.75, 1.0),
    ) -> None:
        super().__init__()
        # Checked here, where a bad value would otherwise train quietly: p=1.5 applies everything
        # always, crop_scale [0, 1] samples from a point, and nan turns the batch into nan.
        self.p = number_option("model.pipeline.p", p, lambda q: 0 <= q <= 1, "a probability in [0, 1]")
        degrees = number_option(
            "model.pipeline.max_rotation_degrees", max_rotation_degrees, lambda d: 0 <= d <= 180, "0 to 180"
        )
        self.max_rotation = math.radians(degrees)
        self.crop_scale = number_pair(
            "model.pipeline.crop_scale",
            crop_scale,
            lambda lo, hi: 0 < lo <= hi <= 1,
            "0 < lo <= hi <= 1 (fractions of the side)",
        )

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
    """Per image: flip it?, rotate or crop it? (``warp``: what the draw chose; every image goes
    through the warp, the identity where neither fires), and the warp's angle, scale and offset."""

    flip: torch.Tensor
    warp: torch.Tensor
    angle: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor

    def theta(self) -> torch.Tensor:
        """(N, 2, 3) affine maps from output to input pixel positions in [-1, 1] (``affine_grid``'s
        convention): the flip first (x -> -x), then the rotation by ``angle`` and the crop (a window
        of ``scale`` times the side, centred at ``offset``). The identity where nothing fires."""
        cos, sin = self.angle.cos() * self.scale, self.angle.sin() * self.scale
        # Sampling the flipped image at p is sampling the image at (-x, y): negate the x row.
        mirror = 1.0 - 2.0 * self.flip.float()
        x_row = torch.stack([cos, -sin, self.offset[:, 0]], dim=1) * mirror.unsqueeze(1)
        y_row = torch.stack([sin, cos, self.offset[:, 1]], dim=1)
        return torch.stack([x_row, y_row], dim=1)


def augment(
    images: torch.Tensor, generator: torch.Generator, pipeline: AugmentedPipeline, dtype: torch.dtype
) -> torch.Tensor:
    """Flip / rotate / crop a uint8 (N, 3, H, W) batch per image at random, normalised into a new
    channels-last ``dtype`` tensor (``images`` is left as it is).

    The random choices come from :meth:`AugmentedPipeline.draw`. The whole batch goes through one
    bilinear warp (``grid_sample``), each image with its own affine map: flip, rotation and crop
    composed (:meth:`AugmentationDraws.theta`). An image that draws no transform gets the
    identity, which samples its own pixels (exactly, for power-of-two sizes such as 128). Warping
    those too is cheaper than sorting the batch by transform and putting it back in order. The
    warps run a chunk at a time (:func:`input_in_chunks`); each image's warp is its own, and the
    chunk size changes values only by float rounding (the sampling grid's matrix product may
    round differently for a different number of rows).
    """
    theta = pipeline.draw(len(images), generator).theta()
    return input_in_chunks(
        images, dtype, lambda rows, out: pipeline.warped_to_input(warp(images[rows], theta[rows]), out)
    )


def input_in_chunks(
    images: torch.Tensor, dtype: torch.dtype, write_chunk: Callable[[slice, torch.Tensor], object]
) -> torch.Tensor:
    """A batch's model input (channels-last ``dtype``, on the images' device), built a chunk of
    images at a time: ``write_chunk(rows, out)`` writes the input of ``images[rows]`` into ``out``,
    that chunk's part of the result. On the CPU chunks of :data:`WARP_CHUNK` images, so that a
    warp's float32 intermediates stay in cache; on CUDA the whole batch at once."""
    out = torch.empty(images.shape, dtype=dtype, device=images.device, memory_format=torch.channels_last)
    chunk = WARP_CHUNK if images.device.type == "cpu" else max(len(images), 1)
    for start in range(0, len(images), chunk):
        rows = slice(start, start + chunk)
        write_chunk(rows, out[rows])
    return out


def warp(images: torch.Tensor, theta: torch.Tensor, padding: str = "zeros") -> torch.Tensor:
    """(N, C, H, W) images (any dtype, any memory format) sampled bilinearly through the affine
    maps ``theta`` (N, 2, 3), ``affine_grid``'s convention: a new float32 NCHW tensor. Pixels
    from outside the image are black (``padding="zeros"``, as torchvision's RandomRotation(fill=0))
    or repeat the image's edge (``"border"``, as resizing a crop that touches the edge does)."""
    n, _, height, width = images.shape
    theta = theta.to(images.device, torch.float32).reshape(n, 6)
    grid = (theta @ _grid_basis(height, width, images.device)).view(n, height, width, 2)
    return F.grid_sample(
        images.to(torch.float32), grid, mode="bilinear", padding_mode=padding, align_corners=False
    )


@lru_cache(maxsize=8)
def _grid_basis(height: int, width: int, device: torch.device) -> torch.Tensor:
    """The (6, H*W*2) matrix ``B`` with ``theta.view(N, 6) @ B`` = the (N, H, W, 2) sampling grid
    of the affine maps ``theta``, as ``F.affine_grid(theta, size, align_corners=False)`` builds it.

    One matrix product for the whole batch, built once per size: ``affine_grid``'s per-image
    (H*W, 3) x (3, 2) products took about 3x as long. The base points are the pixel centres
    (2j + 1) / size - 1, exact in float32 for power-of-two sizes, so that identity and flip maps
    land on pixel centres exactly.
    """
    xs = (torch.arange(width, dtype=torch.float32) * 2 + 1) / width - 1
    ys = (torch.arange(height, dtype=torch.float32) * 2 + 1) / height - 1
    base = torch.stack(torch.broadcast_tensors(xs, ys[:, None], torch.ones(1)), dim=-1).view(-1, 3)
    basis = torch.zeros(2, 3, height * width, 2)
    basis[0, :, :, 0] = base.T  # grid x = theta[0] . (x, y, 1)
    basis[1, :, :, 1] = base.T  # grid y = theta[1] . (x, y, 1)
    return basis.view(6, -1).to(device)
