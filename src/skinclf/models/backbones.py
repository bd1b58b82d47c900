"""Beyond the paper: torchvision ImageNet backbones fine-tuned for one logit, and vgg16_ft.

``resnet18``, ``efficientnet_b0`` and ``convnext_tiny`` are torchvision's networks with their
ImageNet weights (through the torch hub cache, :mod:`skinclf.models.pretrained`) and the last
linear layer of their classifier replaced by a freshly initialised single-logit one. ``vgg16_ft``
is the paper's vgg16 with its last convolutional block trained too (the paper's suggestion in
section 4).

``freeze`` (``model.freeze``) freezes the first stages of the pretrained body: ``none`` (or 0)
fine-tunes end to end, an integer N freezes the first N stages, ``all`` freezes every stage so
only the classifier block trains. Frozen stages get no gradient and stay in eval mode while the
rest trains, so their BatchNorm statistics are the pretrained ones too. The stages, in order:

- resnet18: stem (conv1 + bn1), layer1, layer2, layer3, layer4 (5)
- efficientnet_b0: ``features[0]`` (stem) to ``features[8]`` (final 1x1 conv), the 9 stages of
  the EfficientNet paper's table 1 without its pooling/FC stage (9)
- convnext_tiny: stem, then stages 1-4, each with the downsampling layer in front of it (5)
- vgg16_ft: the 5 convolutional blocks of VGG-16, each ending in its max-pool (5; default 4)
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import ClassVar

import torch
from torch import nn
from torchvision import models as tv

from skinclf.config import check_bool
from skinclf.errors import SkinclfError
from skinclf.models.pretrained import load_pretrained
from skinclf.models.vgg16 import VGG16Transfer

log = logging.getLogger(__name__)

Freeze = int | str


def frozen_stage_count(freeze: Freeze, stages: int, model: str) -> int:
    """``model.freeze`` as a number of first stages: ``none`` -> 0, ``all`` -> ``stages``, N -> N."""
    text = str(freeze).strip().lower()
    if text in ("none", "all"):
        return 0 if text == "none" else stages
    if text.isdigit() and int(text) <= stages:
        return int(text)
    raise SkinclfError(
        f"model.freeze={freeze!r}: expected none, all or a number of first stages 0-{stages} "
        f"to freeze ({model} has {stages} stages)"
    )


class Backbone(nn.Module):
    """A torchvision ImageNet classifier with one output logit and its first stages optionally frozen.

    Subclasses name the torchvision builder, its weights, the stages of its body and the path of
    the classifier's last linear layer (the one replaced). ``self.net`` is torchvision's module,
    so the state dict reads like torchvision's (``net.layer1.0.conv1.weight``).
    """

    build: ClassVar[Callable[..., nn.Module]]
    weights: ClassVar[tv.WeightsEnum]
    label: ClassVar[str]
    head_path: ClassVar[str]
    # len(stages()): known before the network exists, so a bad freeze fails before any weight loading.
    stage_count: ClassVar[int]

    def __init__(self, pretrained: bool = True, freeze: Freeze = "none") -> None:
        super().__init__()
        name = type(self).build.__name__
        self.frozen_stages = frozen_stage_count(freeze, self.stage_count, name)
        if check_bool("model.pretrained", pretrained):
            self.net = load_pretrained(type(self).build, self.weights, self.label)
            log.info(f"{name}: ImageNet {self.weights.name} weights")
        else:
            self.net = type(self).build(weights=None)
            log.warning(f"{name}: model.pretrained=false: random initialisation, no ImageNet weights")
        old = self.net.get_submodule(self.head_path)
        self.net.set_submodule(self.head_path, nn.Linear(old.in_features, 1))
        self.pretrained = bool(pretrained)
        for stage in self.stages()[: self.frozen_stages]:
            for module in stage:
                module.requires_grad_(False)

    def stages(self) -> list[list[nn.Module]]:
        """The body's stages in input order, each a list of modules (what ``freeze`` counts)."""
        raise NotImplementedError

    def head(self) -> nn.Module:
        """The new single-logit linear layer."""
        return self.net.get_submodule(self.head_path)

    def pretrained_parameters(self) -> list[nn.Parameter]:
        """Parameters that start from ImageNet weights (all but the new head); none without them.
        The recipe trains these at the body learning rate (``recipe.body_lr_scale``)."""
        if not self.pretrained:
            return []
        new = {id(p) for p in self.head().parameters()}
        return [p for p in self.parameters() if id(p) not in new]

    def train(self, mode: bool = True) -> Backbone:
        super().train(mode)
        # Frozen means frozen: BatchNorm statistics and stochastic depth as at inference time.
        for stage in self.stages()[: self.frozen_stages]:
            for module in stage:
                module.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ResNet18(Backbone):
    """torchvision ResNet-18 (11.2 M parameters), IMAGENET1K_V1, fc replaced by 512-1."""

    build = staticmethod(tv.resnet18)
    weights = tv.ResNet18_Weights.IMAGENET1K_V1
    label = "ResNet-18"
    head_path = "fc"
    stage_count = 5

    def stages(self) -> list[list[nn.Module]]:
        n = self.net
        return [[n.conv1, n.bn1], [n.layer1], [n.layer2], [n.layer3], [n.layer4]]


class EfficientNetB0(Backbone):
    """torchvision EfficientNet-B0 (4.0 M parameters), IMAGENET1K_V1, classifier 1280-1 after dropout 0.2."""

    build = staticmethod(tv.efficientnet_b0)
    weights = tv.EfficientNet_B0_Weights.IMAGENET1K_V1
    label = "EfficientNet-B0"
    head_path = "classifier.1"
    stage_count = 9

    def stages(self) -> list[list[nn.Module]]:
        return [[block] for block in self.net.features]


class ConvNeXtTiny(Backbone):
    """torchvision ConvNeXt-Tiny (27.8 M parameters), IMAGENET1K_V1, classifier LayerNorm + 768-1."""

    build = staticmethod(tv.convnext_tiny)
    weights = tv.ConvNeXt_Tiny_Weights.IMAGENET1K_V1
    label = "ConvNeXt-Tiny"
    head_path = "classifier.2"
    stage_count = 5

    def stages(self) -> list[list[nn.Module]]:
        f = self.net.features
        # features = stem, stage 1, then (downsample, stage) three times.
        return [[f[0]], [f[1]], [f[2], f[3]], [f[4], f[5]], [f[6], f[7]]]


VGG16_BLOCKS = 5


def vgg_blocks(features: nn.Sequential) -> list[int]:
    """End index (exclusive) of each convolutional block of a VGG ``features``: after each max-pool."""
    return [i + 1 for i, m in enumerate(features) if isinstance(m, nn.MaxPool2d)]


class VGG16FineTune(VGG16Transfer):
    """The paper's vgg16 (C.7) with its last ``5 - freeze`` convolutional blocks trained as well.

    Default ``freeze=4``: blocks 1-4 frozen, block 5 (three 512-channel convolutions) fine-tuned
    with the MLP head. The frozen blocks still run once per split into the feature cache; the
    trained part starts at the first unfrozen block.
    """

    def __init__(
        self,
        pretrained: bool = True,
        dropout: float = 0.5,
        input_preset: str = "appendix",
        freeze: Freeze = 4,
    ) -> None:
        frozen = frozen_stage_count(freeze, VGG16_BLOCKS, "vgg16_ft")  # before any weight loading
        super().__init__(pretrained=pretrained, dropout=dropout, input_preset=input_preset)
        self.pretrained = bool(pretrained)
        ends = vgg_blocks(self.features)
        self.frozen_stages = frozen
        self.boundary = ends[self.frozen_stages - 1] if self.frozen_stages else 0
        self.features[self.boundary :].requires_grad_(True)

    def train(self, mode: bool = True) -> VGG16FineTune:
        super().train(mode)  # puts all features in eval mode
        self.features[self.boundary :].train(mode)
        return self

    def pretrained_parameters(self) -> list[nn.Parameter]:
        """The VGG-16 features' parameters when they hold ImageNet weights (the head is new)."""
        return list(self.features.parameters()) if self.pretrained else []

    def frozen_split(self) -> tuple[nn.Module, nn.Module]:
        """(frozen blocks, the rest): only the frozen blocks' outputs can be cached."""
        frozen = self.features[: self.boundary]
        extractor = nn.Sequential(self.preset, frozen) if self.preset is not None else frozen
        head = nn.Sequential(self.features[self.boundary :], self.avgpool, nn.Flatten(), self.classifier)
        return extractor, head
