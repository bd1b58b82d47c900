"""Drop-in replacements for torch layers that compute the same function, faster on the CPU.

All keep torch's class names, so ``skinclf summary`` still prints the paper's layer table.
"""

import torch
import torch.nn.functional as F
from torch import nn

from skinclf.config import is_number
from skinclf.errors import SkinclfError


def checked_dropout(p: object) -> float:
    """``model.arch.dropout`` as a probability, or a SkinclfError naming the key: torch's own
    check is a ValueError (a traceback through Hydra), and p = 1 would zero every activation."""
    if not (is_number(p) and 0 <= p < 1):
        raise SkinclfError(f"model.arch.dropout={p!r}: expected a number in [0, 1)")
    return float(p)


class Dropout(nn.Dropout):
    """``nn.Dropout`` whose CPU training mask comes from ``rand_like(x) >= p``.

    torch's CPU ``bernoulli_`` draws one number at a time (about 10 ms for the shallow ResNet's
    64 x 16,384 activations); ``rand_like`` is vectorised (about 3 ms) and, unlike a mask built
    with ``torch.rand(shape)``, keeps the input's channels-last layout. Each element is still
    kept with probability 1 - p and scaled by 1 / (1 - p); the draws come from torch's global
    generator, so a seeded run is reproducible. CUDA and evaluation use torch's own path.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or x.device.type != "cpu" or not 0 < self.p < 1:
            return super().forward(x)
        keep = torch.rand_like(x, dtype=torch.float32) >= self.p
        return x * (keep.to(x.dtype) * (1.0 / (1.0 - self.p)))


class _FlattenKeepingGradLayout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.shape = x.shape
        ctx.channels_last = _is_channels_last(x)
        return x.flatten(1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.reshape(ctx.shape)
        return grad.contiguous(memory_format=torch.channels_last) if ctx.channels_last else grad


class Flatten(nn.Flatten):
    """``nn.Flatten`` (from dim 1) whose gradient keeps the input's channels-last layout.

    torch's flatten hands back a gradient in the default (NCHW) layout; the layers behind it
    then mix layouts, and BatchNorm's CPU backward on mixed layouts is several times slower.
    """

    def __init__(self) -> None:
        super().__init__(start_dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _FlattenKeepingGradLayout.apply(x)


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` over (C, H, W) that keeps a channels-last input channels-last.

    torch normalises the trailing dims of the logical NCHW shape, so a channels-last input is
    first copied to NCHW, and the max-pool, ReLU and next conv after it then run on NCHW, several
    times slower.
    The statistics are per image over all C*H*W elements, the same set in either layout, so this
    normalises the NHWC view with the weight and bias permuted to match: the same function and
    the same (C, H, W) parameters, no layout copy. Other inputs take torch's own path.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            tuple(x.shape[1:]) != tuple(self.normalized_shape)
            or not _is_channels_last(x)
            or not self.elementwise_affine
        ):
            return super().forward(x)  # torch's own path (and its error for a wrong shape)
        nhwc = x.permute(0, 2, 3, 1)  # a contiguous view: no copy
        weight = self.weight.permute(1, 2, 0).contiguous()
        bias = self.bias.permute(1, 2, 0).contiguous() if self.bias is not None else None
        return F.layer_norm(nhwc, nhwc.shape[1:], weight, bias, self.eps).permute(0, 3, 1, 2)


def _is_channels_last(x: torch.Tensor) -> bool:
    """A 4-D tensor stored NHWC (and not also NCHW-contiguous, as 1x1 images are)."""
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
