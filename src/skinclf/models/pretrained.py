"""ImageNet weights through torchvision's own mechanism (the torch hub cache), or one clear error.

Every model with pretrained weights (vgg16, vgg16_ft, resnet18, efficientnet_b0, convnext_tiny)
loads them here, so that the offline message, the file it names and the way to get that file are
the same for all of them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn
from torchvision.models import WeightsEnum

from skinclf.errors import SkinclfError, first_line

# What model.pretrained=false gives, as the offline message says it.
RANDOM = "random weights, for tests and offline trials"


def weights_path(weights: WeightsEnum) -> Path:
    """Where torchvision keeps (and looks for) the file of ``weights``: the torch hub cache."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(weights.url).path).name


def download_hint(builder: str, weights: WeightsEnum, without: str = RANDOM) -> str:
    """How to get the weight file onto an offline machine, and the offline alternative."""
    path = weights_path(weights)
    return (
        f'on a machine with network run `python -c "import torchvision; '
        f"torchvision.models.{builder}(weights='{weights.name}')\"` (or download {weights.url}) and copy "
        f"{path.name} into {path.parent}/ here; "
        f"or set model.pretrained=false ({without}; where a launch also has models without the "
        "key, as experiment=paper has, launch this one on its own)"
    )


def load_pretrained(
    build: Callable[..., nn.Module], weights: WeightsEnum, label: str, without: str = RANDOM
) -> nn.Module:
    """``build(weights=weights)``, torchvision's own loading path (download on first use into the
    torch hub cache); a SkinclfError naming the file, its folder and how to get it when impossible.

    ``label`` names the network in the message (``VGG-16``); ``without`` says what
    ``model.pretrained=false`` gives instead.
    """
    path = weights_path(weights)
    hint = download_hint(build.__name__, weights, without)
    try:
        return build(weights=weights)
    # Any error at all once the file is there: a truncated file ends in EOFError, an HTML page
    # saved under the weight's name in UnpicklingError, a wrong archive in RuntimeError.
    except Exception as err:
        reason = first_line(err)
        if path.is_file():
            raise SkinclfError(
                f"{path}: cannot load the {label} {weights.name} weights ({reason}); delete the file "
                f"and get it again: {hint}"
            ) from err
        if not isinstance(err, OSError | RuntimeError):  # URLError is an OSError
            raise
        raise SkinclfError(
            f"{path}: {label} {weights.name} weights not found and the download failed ({reason}); {hint}"
        ) from err
