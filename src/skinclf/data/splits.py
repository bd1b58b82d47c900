"""The in-memory form of a dataset: decoded uint8 images and 0/1 labels per split."""

from __future__ import annotations

import functools
import hashlib
import logging
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from hydra.utils import get_method
from omegaconf import DictConfig

from skinclf.config import data_path
from skinclf.errors import SkinclfError

log = logging.getLogger(__name__)

SPLIT_NAMES = ("train", "val", "test")


@dataclass
class Split:
    """One split. ``images``: uint8 (N, 3, H, W) in channels-last memory; ``labels``: float (N,), MEL = 1."""

    images: torch.Tensor
    labels: torch.Tensor
    # The lesion each image shows, where the dataset says (a folder made by `skinclf prepare`,
    # from its manifest.csv), so that cross-validation keeps a lesion's images in one fold; None
    # where unknown.
    lesions: np.ndarray | None = None
    # Where each image came from, for a person reading predictions.csv: a folder dataset's file
    # under data.root, a DermaMNIST image's place in its npz array; None where there is no such
    # place (the built-in synthetic data).
    sources: list[str] | None = None

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4 or self.images.shape[1] != 3:
            raise ValueError(
                f"expected uint8 (N, 3, H, W) images, got {self.images.dtype} {tuple(self.images.shape)}"
            )
        if len(self.images) != len(self.labels):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")
        if self.lesions is not None and len(self.lesions) != len(self.labels):
            raise ValueError(f"{len(self.labels)} images but {len(self.lesions)} lesion ids")
        if self.sources is not None and len(self.sources) != len(self.labels):
            raise ValueError(f"{len(self.labels)} images but {len(self.sources)} sources")
        self.images = self.images.contiguous(memory_format=torch.channels_last)
        self.labels = self.labels.to(torch.float32)

    def __len__(self) -> int:
        return len(self.labels)

    def images_at(self, idx: torch.Tensor) -> torch.Tensor:
        """The images at positions ``idx``, channels-last like ``images``.

        ``index_select`` on a channels-last tensor hands back NCHW, and every later pass over the
        batch (augmentation, normalisation) would then pay for a relayout; gathering NHWC rows is
        also a plain contiguous copy.
        """
        return self.images.permute(0, 2, 3, 1).index_select(0, idx).permute(0, 3, 1, 2)

    def to(self, device: torch.device) -> Split:
        """This split with its images and labels on ``device``."""
        return replace(self, images=self.images.to(device), labels=self.labels.to(device))

    def class_counts(self) -> dict[str, int]:
        n_mel = int(self.labels.sum().item())
        return {"NV": len(self) - n_mel, "MEL": n_mel}

    @functools.cached_property
    def image_digests(self) -> list[bytes]:
        """One SHA-256 per image (see :func:`image_digests`), computed once: the resume check
        (:func:`content_hash`) and folder data's copy check both read them."""
        return image_digests(self.images)

    def pos_weight(self) -> float:
        """NV / MEL count: the BCE weight of MEL examples that makes both classes weigh the same."""
        counts = self.class_counts()
        if counts["MEL"] == 0:
            raise SkinclfError("class-weighted loss needs at least one MEL image in the training split")
        return counts["NV"] / counts["MEL"]


# Images hashed at a time: bounds the memory of the contiguous copy of a channels-last split.
_HASH_CHUNK = 512


def hash_tensor(h: Any, t: torch.Tensor) -> None:
    """Feed a tensor's dtype, shape and values into hash ``h`` (layout-independent, in chunks)."""
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    rows = t.reshape(1, -1) if t.ndim == 0 else t
    for start in range(0, len(rows), _HASH_CHUNK):
        part = rows[start : start + _HASH_CHUNK].detach().cpu().contiguous()
        h.update(part.reshape(-1).view(torch.uint8).numpy().data)


def image_digests(images: torch.Tensor) -> list[bytes]:
    """The SHA-256 of each image's values (or feature map's), in (H, W, C) order whatever the
    memory layout: about 0.2 s for the paper's 9,000 images."""
    hwc = images.detach().permute(0, 2, 3, 1) if images.ndim == 4 else images.detach()
    digests = []
    for start in range(0, len(hwc), _HASH_CHUNK):
        part = hwc[start : start + _HASH_CHUNK].cpu().contiguous()  # channels-last: no copy
        rows = part.reshape(len(part), -1).view(torch.uint8).numpy()
        digests += [hashlib.sha256(row.data).digest() for row in rows]
    return digests


def content_hash(*splits: Split) -> str:
    """A SHA-256 of the splits' images and labels: what a resume compares to be sure it goes on
    with the data the run began on."""
    digest = hashlib.sha256()
    for split in splits:
        digest.update(f"{split.images.dtype}{tuple(split.images.shape)}".encode())
        digest.update(b"".join(split.image_digests))
        hash_tensor(digest, split.labels)
    return digest.hexdigest()


def undersample_majority(labels: np.ndarray, seed: int) -> np.ndarray:
    """Sorted indices keeping every image of the rarer class and as many, drawn at random, of the other."""
    labels = np.asarray(labels)
    by_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    n = min((len(idx) for idx in by_class), default=0)
    rng = np.random.default_rng(seed)
    return np.sort(
        np.concatenate([rng.choice(idx, n, replace=False) for idx in by_class] or [[]]).astype(int)
    )


@dataclass
class ImageSplits:
    """train/val/test splits of one dataset. ``test`` is None where a dataset has no test split."""

    name: str
    train: Split
    val: Split
    test: Split | None = None
    # content_hash of the whole training split where ``train`` is a subset of it drawn with the
    # run's seed (dermamnist's data.balance_train): what every seed's subset comes from.
    train_drawn_from: str | None = None

    def items(self) -> list[tuple[str, Split]]:
        return [(name, getattr(self, name)) for name in SPLIT_NAMES if getattr(self, name) is not None]

    def describe(self) -> str:
        parts = [
            f"{n} {len(s)} (MEL {s.class_counts()['MEL']}, NV {s.class_counts()['NV']})"
            for n, s in self.items()
        ]
        return f"data={self.name}: " + ", ".join(parts)


def load_splits(data_cfg: DictConfig) -> ImageSplits:
    """Load the dataset named by ``data_cfg.loader`` (a dotted path to a function of data_cfg)."""
    loader = get_method(data_cfg.loader)
    splits: ImageSplits = loader(data_cfg)
    for name, split in splits.items():
        # Without both classes a split cannot pick a threshold (val) or measure sensitivity and
        # AUC (test), and training learns one answer; folder data refuses an empty class already.
        counts = split.class_counts()
        missing = [label for label in ("MEL", "NV") if counts[label] == 0]
        if missing:
            where = f"{data_path(data_cfg)}: " if data_cfg.get("root") not in (None, "") else ""
            raise SkinclfError(
                f"{where}the {name} split of data={splits.name} has no {' or '.join(missing)} image; "
                "expected both MEL and NV in every split"
            )
    log.info(splits.describe())
    return splits
