"""`data=dermamnist`: the MEL/NV subset of a locally downloaded DermaMNIST (MedMNIST+) npz file.

DermaMNIST is HAM10000 in seven classes; this source keeps label 4 (melanoma) as MEL and
label 5 (melanocytic nevi) as NV and drops the rest. The binary subset is imbalanced (about
14 % MEL): ``balance_train`` undersamples NV in the training split, and
``class_weighted_loss`` (read by train.py) weights the loss instead. Both are off by default.
"""

from __future__ import annotations

import logging
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from skinclf.config import data_path
from skinclf.data.images import IMAGE_SIZE
from skinclf.data.splits import SPLIT_NAMES, ImageSplits, Split, content_hash, undersample_majority
from skinclf.errors import SkinclfError

log = logging.getLogger(__name__)

MEL_LABEL, NV_LABEL = 4, 5
N_CLASSES = 7
FILE_NAME = "dermamnist_128.npz"
DOWNLOAD_HELP = (
    f"download {FILE_NAME} from MedMNIST+ on Zenodo (https://zenodo.org/records/10519652) or with "
    f"`pip install medmnist`, `mkdir -p data` and `python -c \"import medmnist; medmnist.DermaMNIST('train', "
    f"download=True, size=128, root='data')\"`, then pass its path as data.root"
)


def npz_file(path: Path) -> Path:
    """The npz file a ``data.root`` of ``path`` reads: the path itself, or in a folder its
    dermamnist_128.npz, else the one DermaMNIST file of another size there. A SkinclfError when
    there is none, or several to choose from."""
    if path.is_dir():
        folder, path = path, path / FILE_NAME
        # Else the one file of another size there. MedMNIST names the 64 and 224 pixel files
        # dermamnist_64.npz and dermamnist_224.npz, the 28 pixel one dermamnist.npz.
        found = (
            []
            if path.exists()
            else sorted([*folder.glob("dermamnist_*.npz"), *folder.glob("dermamnist.npz")])
        )
        if len(found) > 1:
            raise SkinclfError(
                f"data.root={folder}: holds {', '.join(f.name for f in found)} but no {FILE_NAME}; "
                "pass the file to use as data.root"
            )
        path = found[0] if found else path
    if not path.exists():
        raise SkinclfError(f"data.root={path}: no such file; {DOWNLOAD_HELP}")
    return path


def _check_keys(npz, path: Path) -> None:
    """Every split's keys are in the archive: checked before any split is read and counted, so
    that a file missing val's arrays says so without a line about train first."""
    for key in (f"{split}_{part}" for split in SPLIT_NAMES for part in ("images", "labels")):
        if key not in npz.files:
            raise SkinclfError(
                f"{path}: no key {key!r} (has {', '.join(sorted(npz.files)) or 'none'}); expected a MedMNIST "
                f"npz with {', '.join(f'{s}_images, {s}_labels' for s in SPLIT_NAMES)}"
            )


def _checked_arrays(npz, path: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """``split``'s images (N, S, S, 3) uint8 and integer labels (N,), checked against MedMNIST's
    format (its keys: :func:`_check_keys`)."""
    keys = (f"{split}_images", f"{split}_labels")
    try:  # the arrays are decompressed only now: a damaged archive fails here, not at np.load
        images, labels = npz[keys[0]], npz[keys[1]]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as err:
        raise SkinclfError(f"{path}: {split} arrays are unreadable ({err}); {DOWNLOAD_HELP}") from err
    if (
        images.dtype != np.uint8
        or images.ndim != 4
        or images.shape[3] != 3
        or images.shape[1] != images.shape[2]
        or images.shape[1] == 0
    ):
        raise SkinclfError(
            f"{path}: {keys[0]} is {images.dtype} {images.shape}; expected uint8 (N, S, S, 3) RGB images"
        )
    if labels.ndim in {1, 2} and len(labels) != len(images):
        raise SkinclfError(
            f"{path}: {keys[0]} holds {len(images)} images but {keys[1]} {len(labels)} labels; "
            "expected one label per image"
        )
    if labels.shape not in {(len(images),), (len(images), 1)} or not np.issubdtype(labels.dtype, np.integer):
        raise SkinclfError(
            f"{path}: {keys[1]} is {labels.dtype} {labels.shape}; expected integers, shape (N, 1)"
        )
    labels = labels.reshape(-1)
    if len(labels) and (labels.min() < 0 or labels.max() >= N_CLASSES):
        raise SkinclfError(
            f"{path}: {keys[1]} has values outside 0..{N_CLASSES - 1}; expected DermaMNIST labels"
        )
    return images, labels


def _resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (N, 3, S, S) -> uint8 (N, 3, size, size), antialiased bilinear like decode_image."""
    if images.shape[-1] == size:
        return images
    out = [
        F.interpolate(chunk.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        .round()
        .clamp(0, 255)
        .to(torch.uint8)
        for chunk in images.split(512)
    ]
    return torch.cat(out) if out else images.new_zeros((0, 3, size, size))


def _why_unreadable(path: Path, err: Exception) -> str:
    """NumPy takes any file that starts with neither a zip's nor a .npy's magic bytes (an HTML
    download page, a text file) for a pickle, and says so: the file is simply not NumPy's."""
    try:
        with open(path, "rb") as file:
            head = file.read(6)
    except OSError:
        return str(err)
    return str(err) if head.startswith((b"PK", b"\x93NUMPY")) else "not a NumPy file"


def load_splits(data_cfg: DictConfig) -> ImageSplits:
    """The MEL (4) / NV (5) images of each split of the DermaMNIST npz at ``data.root``, as 128x128."""
    path = npz_file(data_path(data_cfg, "root"))
    try:
        npz = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise SkinclfError(
            f"{path}: not a readable npz file ({_why_unreadable(path, err)}); {DOWNLOAD_HELP}"
        ) from err
    if not isinstance(npz, np.lib.npyio.NpzFile):  # np.load reads a .npy file as one bare array
        raise SkinclfError(f"{path}: a single array (.npy), not an npz archive of splits; {DOWNLOAD_HELP}")
    balance = bool(data_cfg.get("balance_train", False))
    splits, drawn_from = {}, None
    with npz:
        _check_keys(npz, path)
        for split in SPLIT_NAMES:
            images, labels = _checked_arrays(npz, path, split)
            keep = np.flatnonzero((labels == MEL_LABEL) | (labels == NV_LABEL))
            binary = (labels[keep] == MEL_LABEL).astype(np.float32)
            n_mel = int(binary.sum())
            log.info(
                f"dermamnist {split}: MEL {n_mel}, NV {len(keep) - n_mel} "
                f"(dropped {len(labels) - len(keep)} images of the other 5 classes)"
            )
            chw = torch.from_numpy(images[keep]).permute(0, 3, 1, 2)
            sources = [f"{split}_images[{i}]" for i in keep]
            splits[split] = Split(_resize(chw, IMAGE_SIZE), torch.from_numpy(binary), sources=sources)
            if split == "train" and balance:
                # Hashed whole, as an unbalanced run's, before the seed picks its NV images.
                drawn_from = content_hash(splits[split])
                subset = torch.from_numpy(undersample_majority(binary, int(data_cfg.get("seed", 0))))
                splits[split] = Split(
                    splits[split].images_at(subset),
                    splits[split].labels[subset],
                    sources=[sources[i] for i in subset.tolist()],
                )
                log.info(f"dermamnist train: balanced by undersampling NV to {len(subset) // 2} per class")
    return ImageSplits(name="dermamnist", **splits, train_drawn_from=drawn_from)
