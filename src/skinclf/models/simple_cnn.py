"""The paper's baseline CNN and its three normalisation variants (Appendix C.1-C.5)."""

from typing import Literal

from torch import nn

from skinclf import IMAGE_SIZE
from skinclf.errors import SkinclfError
from skinclf.models.layers import LayerNorm

Norm = Literal["none", "batch", "group", "layer"]

GROUP_SIZE = 8  # channels per GroupNorm group, as in the paper (32 channels -> 4 groups)


def _norm_layer(norm: Norm, channels: int, spatial: int) -> nn.Module | None:
    if norm == "none":
        return None
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if norm == "group":
        return nn.GroupNorm(channels // GROUP_SIZE, channels)
    if norm == "layer":
        # Over (C, H, W) with an affine weight per element: this is what makes layer_norm the
        # paper's largest from-scratch model (9,981,121 parameters).
        # skinclf's LayerNorm: torch's function, without a layout copy (see layers.py).
        return LayerNorm([channels, spatial, spatial])
    raise SkinclfError(f"model.arch.norm={norm!r}: expected one of none, batch, group, layer")


class SimpleCNN(nn.Sequential):
    """2 x (conv3x3 [+ norm] + ReLU + maxpool2) with 32 and 64 channels, then FC 65536-128-1.

    Each block runs max-pool before ReLU, which is the same function (see ``__init__``), so
    torchinfo lists MaxPool2d before ReLU where paper Appendix C lists them the other way round.

    Returns one logit per image; ``sigmoid(logit) >= 0.5`` means MEL.
    """

    def __init__(self, norm: Norm = "none") -> None:
        layers: list[nn.Module] = []
        in_channels, spatial = 3, IMAGE_SIZE
        for out_channels in (32, 64):
            layers.append(nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1))
            norm_layer = _norm_layer(norm, out_channels, spatial)
            if norm_layer is not None:
                layers.append(norm_layer)
            # ReLU and max-pooling commute (ReLU is monotonic): pooling first gives the paper's
            # conv-ReLU-pool outputs and gradients exactly, with 4x fewer elements to rectify.
            layers += [nn.MaxPool2d(2), nn.ReLU(inplace=True)]
            in_channels, spatial = out_channels, spatial // 2
        layers += [
            nn.Flatten(),
            nn.Linear(in_channels * spatial * spatial, 128),
            nn.ReLU(inplace=True),
            nn.Linear(128, 1),
        ]
        super().__init__(*layers)

    def grad_cam_layer(self) -> nn.Module:
        """Where Grad-CAM explains the model: the second block's output (its last ReLU, after the
        norm and the max-pool), the activations the classifier reads. Its second conv's raw output
        holds negative values the ReLU discards, and (with a norm layer) offsets the norm removes:
        the map would change with values the model ignores."""
        return [module for module in self if isinstance(module, nn.ReLU)][1]
