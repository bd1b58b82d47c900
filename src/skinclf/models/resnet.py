"""The paper's shallow ResNet (Appendix C.6, also used by res_aug in C.8)."""

import torch
from torch import nn

from skinclf import IMAGE_SIZE
from skinclf.models.layers import Dropout, Flatten, checked_dropout


class ResBlock(nn.Module):
    """conv3x3(stride) + BN + ReLU + conv3x3 + BN + ReLU, plus a 1x1-conv + BN projection.

    As the paper describes, the block input (projected) is added to the output of the
    block's last activation.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 2) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 1, stride=stride),
            nn.BatchNorm2d(out_channels),
        )
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return out + self.shortcut(x)


class ShallowResNet(nn.Module):
    """Stem conv (16 ch) + ReLU + maxpool, ResBlocks to 32 and 64 channels, dropout, FC 16384-128-1."""

    def __init__(self, dropout: float = 0.5) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d(2)
        self.block1 = ResBlock(16, 32)
        self.block2 = ResBlock(32, 64)
        # skinclf's Dropout and Flatten: torch's function, faster on the CPU (see layers.py).
        self.dropout = Dropout(checked_dropout(dropout))
        self.flatten = Flatten()
        spatial = IMAGE_SIZE // 8
        self.fc1 = nn.Linear(64 * spatial * spatial, 128)
        self.fc2 = nn.Linear(128, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Pool, then ReLU: the same as the paper's ReLU-then-pool (ReLU is monotonic), 4x cheaper.
        x = self.relu(self.pool(self.stem(x)))
        x = self.block2(self.block1(x))
        x = self.flatten(self.dropout(x))
        return self.fc2(self.relu(self.fc1(x)))
