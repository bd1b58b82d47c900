"""Frozen front ends run once: their outputs per split are cached on disk and the head trains on them.

A model that declares a frozen front end (:class:`FrozenFrontEnd`: ``frozen_split()`` returns
``(extractor, head)`` with ``model(x) == head(extractor(x))``, e.g. vgg16) never runs that front
end inside the training loop: :func:`training_stage` computes its outputs on every split once,
stores them under ``data.cache_dir/features/``, and hands the loop the head, those outputs and a
pass-through pipeline. Every other model trains whole, on images, exactly as before; so does a
frozen-front-end model whose training images are augmented or mixed (mixup) or whose evaluation
averages flips (``recipe=modern``), since its front end's outputs then change from batch to batch.

A cache file is keyed by everything the outputs depend on: the split's images (their bytes),
the extractor (its structure and weights, so random initialisations with different seeds never
share features), the image pipeline's state (normalisation), the numeric precision, the memory
layout, and the device (its type and model, torch's version, CUDA's TF32 switches; see
:func:`extractor_key`): kernels round differently, and a CPU run must get the same numbers
whether or not a GPU run (or another machine sharing the cache) filled it first. A changed dataset or model is
never served stale; the old file is simply not used again.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from skinclf.data.pipeline import DefaultPipeline
from skinclf.data.splits import ImageSplits, Split, hash_tensor
from skinclf.io import remove_stale_cache_temporaries, save_cache
from skinclf.training.hardware import cpu_model
from skinclf.training.loop import LoopSettings, forward_batches

log = logging.getLogger(__name__)

# Bump when what is stored changes, so that old cache files are not read.
CACHE_VERSION = 1
# Half the memory and disk of fp32; the rounding (~5e-4 relative) is far below what the head can resolve.
CACHE_DTYPE = torch.float16


@runtime_checkable
class FrozenFrontEnd(Protocol):
    """A model whose first part is frozen, so that its outputs can be computed once."""

    def frozen_split(self) -> tuple[nn.Module, nn.Module]:
        """(frozen extractor, trained head), sharing the model's modules: model(x) == head(extractor(x))."""
        ...


@dataclass
class FeatureSplit(Split):
    """A split of cached extractor outputs: ``images`` float (N, C, H, W) maps, ``labels`` as in Split."""

    def __post_init__(self) -> None:
        if not self.images.is_floating_point() or self.images.ndim != 4:
            shape = tuple(self.images.shape)
            raise ValueError(f"expected float (N, C, H, W) feature maps, got {self.images.dtype} {shape}")
        if len(self.images) != len(self.labels):
            raise ValueError(f"{len(self.images)} feature maps but {len(self.labels)} labels")
        self.labels = self.labels.to(torch.float32)


class FeaturePipeline:
    """Cached feature maps -> head input: a cast to the loop's dtype, nothing else (features are fixed).

    Its state is the image pipeline's, so checkpoints still say how images are prepared for the
    full model (predict, explain).
    """

    def __init__(self, image_pipeline: Any) -> None:
        self.image_pipeline = image_pipeline

    def fit(self, train_images: torch.Tensor) -> None:
        """Nothing to fit: the image pipeline was fitted before the features were computed."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.image_pipeline.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.image_pipeline.load_state_dict(state)

    def train_batch(
        self, features: torch.Tensor, generator: torch.Generator, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """A training batch: the cached features in ``dtype``."""
        return features.to(dtype)

    def eval_batch(self, features: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """An evaluation batch: the cached features in ``dtype``."""
        return features.to(dtype)


@dataclass
class TrainingStage:
    """What the loop trains: ``module`` on ``splits``, whose batches ``pipeline`` prepares."""

    module: nn.Module
    pipeline: Any
    splits: ImageSplits


def device_numerics(device: torch.device) -> str:
    """What about ``device`` changes an extractor's outputs: its type (CPU and CUDA kernels differ by
    up to ~1e-3 in fp32), its model and torch's version (which kernels run, and how they round:
    a cache shared between machines must not serve one machine's features to another), and on
    CUDA whether matmuls and convolutions may round through TF32. Computable without a GPU."""
    if device.type != "cuda":
        return f"{device.type} {cpu_model()} torch {torch.__version__}"
    gpu = torch.cuda.get_device_name(device) if torch.cuda.is_available() else "no GPU here"
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    return f"cuda {gpu} torch {torch.__version__} tf32(matmul={tf32[0]}, cudnn={tf32[1]})"


def extractor_key(
    extractor: nn.Module, pipeline: Any, precision: str, device: torch.device, channels_last: bool = True
) -> str:
    """A hex digest of what an extractor's outputs depend on besides the images. The memory
    layout is part of it: channels-last and NCHW convolutions round differently."""
    numerics = f"{precision} {'channels_last' if channels_last else 'nchw'} {device_numerics(device)}"
    h = hashlib.sha256(f"v{CACHE_VERSION} {numerics} {type(pipeline).__qualname__}\n{extractor!r}".encode())
    for name, tensor in [*extractor.state_dict().items(), *pipeline.state_dict().items()]:
        h.update(name.encode())
        hash_tensor(h, tensor)
    return h.hexdigest()


def split_key(images: torch.Tensor, extractor_digest: str) -> str:
    """A hex digest of one split's images together with the extractor key."""
    h = hashlib.sha256(extractor_digest.encode())
    hash_tensor(h, images)
    return h.hexdigest()


def _load_cached(path: Path, key: str, n: int) -> torch.Tensor | None:
    """The cached features at ``path`` if it holds ``n`` of them for ``key``; None otherwise."""
    if not path.is_file():
        return None
    try:
        stored = torch.load(path, weights_only=True)
    except Exception as err:  # a damaged file is a cache miss, never a failed run
        log.warning(
            f"feature cache {path} is unreadable ({type(err).__name__}): computing the features again"
        )
        return None
    stored = stored if isinstance(stored, dict) else {}
    features = stored.get("features")
    if stored.get("key") != key or not isinstance(features, torch.Tensor) or len(features) != n:
        log.warning(f"feature cache {path} does not match its data: computing the features again")
        return None
    return features


def cached_features(
    extractor: nn.Module,
    pipeline: Any,
    images: torch.Tensor,
    name: str,
    extractor_digest: str,
    cache_dir: Path,
    settings: LoopSettings,
    device: torch.device,
) -> torch.Tensor:
    """The extractor's outputs on ``images`` (CACHE_DTYPE, CPU): read from the cache, or computed
    once with a progress bar and written there atomically."""
    key = split_key(images, extractor_digest)
    path = Path(cache_dir) / "features" / f"{name}_{key[:16]}.pt"
    remove_stale_cache_temporaries(path)
    features = _load_cached(path, key, len(images))
    if features is not None:
        log.info(f"{name} features: cache hit, {path}")
        return features
    log.info(f"{name} features: cache miss, running the frozen extractor on {len(images)} images into {path}")
    features = forward_batches(
        extractor, pipeline, images, settings, device, out_dtype=CACHE_DTYPE, desc=f"{name} features"
    )
    save_cache(
        {"key": key, "features": features}, path, "the feature cache", "the next run extracts them again"
    )
    return features


def _why_not_cached(extractor: nn.Module, pipeline: Any, settings: LoopSettings) -> str | None:
    """Why the extractor's outputs cannot be computed once (None: they can). Features computed once
    see neither per-epoch augmentation, nor mixup (which mixes images, not feature maps), nor
    flipped test-time views; then the whole model trains on images, its frozen part still
    frozen: slower, but never silently wrong."""
    if type(pipeline).train_batch is not DefaultPipeline.train_batch:
        return f"the pipeline {type(pipeline).__name__} augments training images"
    if settings.recipe.tta:
        return "recipe.tta=true evaluates flipped images"
    if settings.recipe.mixup_alpha > 0:
        return f"recipe.mixup_alpha={settings.recipe.mixup_alpha} mixes training images"
    if not any(True for _ in extractor.parameters()):
        return "nothing is frozen"
    return None


def training_stage(
    model: nn.Module,
    pipeline: Any,
    splits: ImageSplits,
    cache_dir: Path,
    settings: LoopSettings,
    device: torch.device,
) -> TrainingStage:
    """What the loop should train: ``model`` on the image splits, or, for a :class:`FrozenFrontEnd`,
    its head on the extractor's cached outputs (computed here on a cache miss)."""
    if not isinstance(model, FrozenFrontEnd):
        return TrainingStage(model, pipeline, splits)
    extractor, head = model.frozen_split()
    reason = _why_not_cached(extractor, pipeline, settings)
    if reason is not None:
        log.info(f"feature cache off: {reason}, so the frozen layers run on every batch")
        return TrainingStage(model, pipeline, splits)
    digest = extractor_key(extractor, pipeline, settings.precision, device, settings.channels_last)
    # The whole model moves, so that it stays on one device for whatever follows training.
    model.to(device)
    if settings.channels_last:
        model.to(memory_format=torch.channels_last)
    features = {
        name: FeatureSplit(
            cached_features(extractor, pipeline, split.images, name, digest, cache_dir, settings, device),
            split.labels,
        )
        for name, split in splits.items()
    }
    return TrainingStage(head, FeaturePipeline(pipeline), ImageSplits(name=splits.name, **features))
