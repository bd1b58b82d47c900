"""Grad-CAM (Selvaraju et al., 2017): where in the image the evidence for MEL lies.

The heat map of an image is ReLU(sum_k w_k A_k), where A_k are the channels of the last
convolutional block's output and w_k the spatial mean of d(logit)/dA_k; it is upsampled to the
image size and scaled to [0, 1]. A model may name that layer (``grad_cam_layer()``, as the
paper's plain CNNs do); otherwise it is found generically, so every architecture works.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from skinclf.errors import SkinclfError
from skinclf.training.recipe import FlipTTA


@dataclass
class GradCam:
    """Heat maps (N, H, W) in [0, 1] at the input's size, the MEL logits (N,), the layer used, and
    the (top, left, height, width) window of the input the network sees (outside it the map is 0)."""

    heatmaps: torch.Tensor
    logits: torch.Tensor
    layer: str
    window: tuple[int, int, int, int]


def _conv_blocks(model: nn.Module) -> dict[nn.Module, str]:
    """Every submodule that is or holds a Conv2d (the model itself excluded: its output is the logit)."""
    return _labelled(
        model, lambda module: module is not model and any(isinstance(m, nn.Conv2d) for m in module.modules())
    )


def _labelled(model: nn.Module, chosen: Callable[[nn.Module], bool]) -> dict[nn.Module, str]:
    """The ``chosen`` submodules of ``model``, each with its label in messages: ``name (Type)``."""
    return {
        module: f"{name} ({type(module).__name__})"
        for name, module in model.named_modules()
        if chosen(module)
    }


def grad_cam(model: nn.Module, inputs: torch.Tensor, toward_mel: torch.Tensor | None = None) -> GradCam:
    """Grad-CAM of ``model``'s decision for a batch of model inputs (already preprocessed).

    ``toward_mel`` (bool, one per image; default all True) picks the class explained: True maps
    the evidence for MEL (the logit), False the evidence for NV (minus the logit). A single-logit
    model has one score, so the NV map is the MEL map with the gradient's sign flipped; without it,
    an image the model calls NV would mostly get an empty map.

    The layer is the one the model names with a ``grad_cam_layer()`` method (the plain CNNs:
    their second block's ReLU), else the last module, in forward order, that is or holds a Conv2d
    and returns a 4-D feature map larger than 1x1: the last convolutional block. That is the
    residual block (not its 1x1 shortcut conv) in the ResNet, the whole frozen extractor in VGG-16.
    Runs in fp32 with the model in eval mode, on the model's device (``inputs`` are moved
    there); the model's parameters get no gradients. Heat maps and logits come back on the CPU.
    """
    model.eval()
    names_its_layer = hasattr(model, "grad_cam_layer")
    if names_its_layer:
        named = model.grad_cam_layer()
        blocks = _labelled(model, lambda module: module is named)
        if not blocks:
            # A name ("body.4") is the likely slip: say what was returned.
            returned = f"{named!r}" if isinstance(named, str) else f"a {type(named).__name__}"
            raise SkinclfError(
                f"{type(model).__name__}.grad_cam_layer(): returned {returned}, not one of the model's "
                "modules; expected the module itself (such as self.body[4], not its name)"
            )
    else:
        blocks = _conv_blocks(model)
    captured: list[tuple[str, torch.Tensor]] = []

    def keep(module: nn.Module, _inputs: tuple, output: torch.Tensor) -> torch.Tensor | None:
        # A 1x1 map (a block that ends in global pooling) has nothing to say about where.
        if not (isinstance(output, torch.Tensor) and output.ndim == 4 and output[0, 0].numel() > 1):
            return None
        if not output.requires_grad:
            # A frozen extractor run without autograd (e.g. under no_grad): restart the graph here.
            output = output.detach().requires_grad_()
        captured.append((blocks[module], output))
        return output

    handles = [module.register_forward_hook(keep) for module in blocks]
    try:
        with torch.enable_grad():
            # Gradients flow through the input, so frozen layers (requires_grad=False) still
            # produce activations that are part of the graph; the parameters stay untouched.
            device = next(model.parameters()).device
            x = inputs.detach().to(device, torch.float32).requires_grad_()
            logits = model(x).flatten()
            if not captured:
                what = (
                    "its grad_cam_layer() returns no feature map"
                    if names_its_layer
                    else "no convolutional layer with a feature map"
                )
                raise SkinclfError(f"{type(model).__name__}: {what} larger than 1x1 to explain with Grad-CAM")
            layer, activations = captured[-1]
            sign = (
                torch.ones_like(logits)
                if toward_mel is None
                else toward_mel.to(logits.device).float() * 2 - 1
            )
            # Each image's logit depends only on its own activations (eval mode): one backward pass.
            (grads,) = torch.autograd.grad((sign * logits).sum(), activations)
    finally:
        for handle in handles:
            handle.remove()
    weights = grads.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * activations).sum(dim=1, keepdim=True)).detach()
    height, width = inputs.shape[-2:]
    # The feature map covers what the network sees: the whole image, or (VGG-16 with its weights'
    # own resize-and-crop preset) a centre crop, where stretching it over the image would shift it.
    window = model.input_window(height, width) if hasattr(model, "input_window") else (0, 0, height, width)
    top, left, seen_height, seen_width = window
    seen = F.interpolate(cam, size=(seen_height, seen_width), mode="bilinear", align_corners=False)
    cam = cam.new_zeros(len(cam), height, width)
    cam[:, top : top + seen_height, left : left + seen_width] = seen.squeeze(1)
    return GradCam(heatmaps=_to_peak_one(cam).cpu(), logits=logits.detach().cpu(), layer=layer, window=window)


def _to_peak_one(maps: torch.Tensor) -> torch.Tensor:
    """(N, H, W) non-negative maps, each divided by its maximum (an all-zero map stays zero)."""
    return maps / maps.flatten(1).amax(dim=1).clamp_min(1e-12).view(-1, 1, 1)


def grad_cam_over_flips(
    model: nn.Module, inputs: torch.Tensor, toward_mel: torch.Tensor | None = None
) -> GradCam:
    """Grad-CAM of ``model`` under flip test-time augmentation (``recipe.tta``, :class:`FlipTTA`):
    the map of each flipped view, flipped back onto the image, averaged and rescaled to peak 1.
    Each view's map is at peak 1 before the mean, so the four views count alike, as their
    probabilities do in FlipTTA's mean. The logit is FlipTTA's (that of the mean probability), so
    map and probability describe the same prediction."""
    cams = [grad_cam(model, FlipTTA.view(inputs, dims), toward_mel) for dims in FlipTTA.FLIPS]
    views = [FlipTTA.view(cam.heatmaps, dims) for cam, dims in zip(cams, FlipTTA.FLIPS, strict=True)]
    probs = torch.stack([torch.sigmoid(cam.logits) for cam in cams]).mean(0)
    heatmaps = _to_peak_one(torch.stack(views).mean(0))
    return GradCam(heatmaps, torch.logit(probs, eps=1e-6), cams[0].layer, cams[0].window)
