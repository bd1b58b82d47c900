"""Paper C.7: torchvision's VGG-16 convolutional features (ImageNet weights, frozen) + an MLP head.

The only transfer-learning combination of the study. The features are frozen, so
:meth:`VGG16Transfer.frozen_split` hands them to the feature cache (skinclf.data.features):
they run once per split, and the training loop only ever trains the head. Where the images
change every epoch (an augmenting pipeline, mixup, test-time flips) the cache is off and they
run on every batch.
"""

from __future__ import annotations

import itertools
import logging
from pathlib import Path
from typing import Literal

import torch
import torchvision.transforms.v2.functional as TF
from torch import nn
from torchvision.models import VGG16_Weights, vgg16

from skinclf.config import check_bool
from skinclf.errors import SkinclfError
from skinclf.models.layers import checked_dropout
from skinclf.models.pretrained import load_pretrained, weights_path

log = logging.getLogger(__name__)

WEIGHTS = VGG16_Weights.IMAGENET1K_V1
HEAD_WIDTHS = (25088, 4096, 512, 128, 1)
Preset = Literal["appendix", "full"]


def weights_file() -> Path:
    """Where torchvision keeps (and looks for) the IMAGENET1K_V1 file: the torch hub cache."""
    return weights_path(WEIGHTS)


def imagenet_features() -> nn.Sequential:
    """VGG-16 ``features`` with IMAGENET1K_V1 weights, through torchvision's own loading path
    (the torch hub cache, downloaded on first use); a clear SkinclfError when that is impossible."""
    return load_pretrained(
        vgg16, WEIGHTS, "VGG-16", without="random features, not the paper's setup"
    ).features


class ResizeCrop(nn.Module):
    """The weights' own input preset: shorter side resized to ``resize``, centre crop ``crop``."""

    def __init__(self, resize: int = 256, crop: int = 224) -> None:
        super().__init__()
        self.resize, self.crop = resize, crop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Antialiased bilinear resizing is not implemented for every low-precision dtype: do it in fp32.
        out = TF.center_crop(TF.resize(x.float(), [self.resize], antialias=True), [self.crop])
        return out.to(x.dtype)

    def window(self, height: int, width: int) -> tuple[int, int, int, int]:
        """(top, left, height, width) of the part of a ``height`` x ``width`` input that the crop
        keeps, in input pixels (rounded): 128x128 images keep their centre 112x112."""
        scale = self.resize / min(height, width)  # TF.resize's: the shorter side becomes resize
        resized = [
            self.resize if side == min(height, width) else int(side * scale) for side in (height, width)
        ]
        # TF.center_crop's offsets, in resized pixels, then back to input pixels.
        top, left = (round((side - self.crop) / 2.0) for side in resized)
        crop = min(self.crop, *resized)
        return round(top / scale), round(left / scale), round(crop / scale), round(crop / scale)

    def extra_repr(self) -> str:
        return f"resize={self.resize}, crop={self.crop}"


class VGG16Transfer(nn.Module):
    """VGG-16 features (frozen) -> AdaptiveAvgPool2d(7, 7) -> MLP 25088-4096-512-128-1 (ReLU, dropout).

    One logit per image. Attribute names follow torchvision's VGG (``features``, ``avgpool``,
    ``classifier``), so the state dict reads like a VGG-16 one. ``input_preset``: ``appendix``
    feeds the images as they are (128x128, paper C.7); ``full`` first applies the weights' own
    resize 256 / crop 224.
    """

    def __init__(
        self, pretrained: bool = True, dropout: float = 0.5, input_preset: Preset = "appendix"
    ) -> None:
        super().__init__()
        if input_preset not in ("appendix", "full"):
            raise SkinclfError(f"model.input_preset={input_preset!r}: expected appendix or full")
        dropout = checked_dropout(dropout)
        # No module at all for the appendix preset, so the layer table matches Appendix C.7 row by row.
        self.preset = ResizeCrop() if input_preset == "full" else None
        if check_bool("model.pretrained", pretrained):
            self.features = imagenet_features()
            # No model name here: vgg16_ft builds its features with this class too.
            log.info(f"VGG-16 features: ImageNet IMAGENET1K_V1 weights from {weights_file()}")
        else:
            self.features = vgg16(weights=None).features
            log.warning(
                "model.pretrained=false: randomly initialised VGG-16 features, NOT the paper's setup "
                "(which uses ImageNet IMAGENET1K_V1 weights)"
            )
        self.features.requires_grad_(False)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        layers: list[nn.Module] = []
        for i, (n_in, n_out) in enumerate(itertools.pairwise(HEAD_WIDTHS)):
            layers.append(nn.Linear(n_in, n_out))
            if i < len(HEAD_WIDTHS) - 2:
                layers += [nn.ReLU(inplace=True), nn.Dropout(dropout)]
        self.classifier = nn.Sequential(*layers)

    def train(self, mode: bool = True) -> VGG16Transfer:
        super().train(mode)
        # Frozen means frozen: the features behave as at inference time even while the head trains.
        self.features.eval()
        return self

    def input_window(self, height: int, width: int) -> tuple[int, int, int, int]:
        """(top, left, height, width) of the part of an input image the network sees: all of it,
        or the preset's centre crop."""
        return (0, 0, height, width) if self.preset is None else self.preset.window(height, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.preset is not None:
            x = self.preset(x)
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))

    def frozen_split(self) -> tuple[nn.Module, nn.Module]:
        """(frozen extractor, trained head) with ``model(x) == head(extractor(x))``; the head
        starts at the pooling, so the cached extractor output is the small feature map (512x4x4 for
        the paper's 128x128 input; 512x7x7 with input_preset=full)."""
        extractor = nn.Sequential(self.preset, self.features) if self.preset is not None else self.features
        head = nn.Sequential(self.avgpool, nn.Flatten(), self.classifier)
        return extractor, head
