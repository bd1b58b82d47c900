"""`data=folder`: images in the paper's layout ROOT/{train,val,test}/{MEL,NV}/*, decoded once.

Split and class folder names are matched case-insensitively; the class folder ``NEV`` is
accepted for NV; ``test`` may be absent. Files and folders whose name starts with a dot
(.DS_Store, .ipynb_checkpoints), and those Windows and file servers leave (Thumbs.db, desktop.ini,
a Synology NAS's @eaDir) are ignored; anything else out of place is an error, so that
nothing silently trains on the wrong data. Other entries directly in ROOT (a README) are not
looked at, except ``manifest.csv`` as ``skinclf prepare`` writes it: its ``lesion_id`` column
tells which images show one lesion (see :attr:`Split.lesions`).
"""

from __future__ import annotations

import logging
import os
import re
import shlex
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig

from skinclf.arguments import HAM10000_CSV, ISIC_2019_CSV
from skinclf.config import data_path
from skinclf.data.decode_cache import load_or_decode, store
from skinclf.data.images import IMAGE_SIZE
from skinclf.data.splits import SPLIT_NAMES, ImageSplits, Split
from skinclf.errors import SkinclfError, first_line, not_a_folder
from skinclf.io import files_under, is_system_file, readable

log = logging.getLogger(__name__)

# Class folder name (lower case) -> label; MEL is the positive class.
CLASS_FOLDERS = {"mel": 1.0, "nv": 0.0, "nev": 0.0}
LAYOUT = "ROOT/{train,val,test}/{MEL,NV}/* (test optional, NEV accepted for NV)"
# Written by `skinclf prepare`: one row per image, its path relative to ROOT and its lesion.
MANIFEST = "manifest.csv"


def _visible(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if not is_system_file(p.name))


def _by_lower_name(parent: Path, entries: list[Path]) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for entry in entries:
        key = entry.name.lower()
        if key in found:
            raise SkinclfError(f"{parent}: both {found[key].name!r} and {entry.name!r}; expected one of them")
        found[key] = entry
    return found


def _class_files(class_dir: Path) -> list[Path]:
    """Every non-hidden file under ``class_dir`` (subfolders, symlinked ones too), sorted; a
    dangling symlink is kept, so that decoding names it as missing. A subfolder named after the
    other class (MEL/NV/) is refused: its images would quietly take this folder's label."""
    files = files_under(class_dir)
    if not files:
        raise SkinclfError(f"{class_dir}: empty class folder; expected images of this class")
    label = CLASS_FOLDERS[class_dir.name.lower()]
    for file in files:
        parts = file.relative_to(class_dir).parts[:-1]
        for depth, part in enumerate(parts, start=1):
            if CLASS_FOLDERS.get(part.lower(), label) != label:
                raise SkinclfError(
                    f"{class_dir.joinpath(*parts[:depth])}: a class folder inside the class folder "
                    f"{class_dir.name}; expected it beside {class_dir.name}, in {class_dir.parent}"
                )
    return files


def _split_files(split_dir: Path) -> tuple[list[Path], list[float]]:
    entries = _visible(split_dir)
    for entry in entries:
        if not entry.is_dir():
            if entry.name.lower() in CLASS_FOLDERS:
                raise SkinclfError(f"{entry}: {not_a_folder(entry)}; expected a class folder of images")
            raise SkinclfError(
                f"{entry}: file outside a class folder; expected it under {split_dir}/MEL or NV"
            )
        if entry.name.lower() not in CLASS_FOLDERS:
            raise SkinclfError(
                f"{entry}: unknown class folder; expected only MEL and NV (or NEV) in {split_dir}"
            )
    classes = _by_lower_name(split_dir, entries)
    if "nv" in classes and "nev" in classes:
        raise SkinclfError(f"{split_dir}: both NV and NEV folders; expected one folder for nevi")
    files: list[Path] = []
    labels: list[float] = []
    for wanted in ("mel", "nv"):
        names = [wanted] if wanted == "mel" else ["nv", "nev"]
        class_dir = next((classes[n] for n in names if n in classes), None)
        if class_dir is None:
            raise SkinclfError(f"{split_dir / wanted.upper()}: missing class folder; expected {LAYOUT}")
        class_files = _class_files(class_dir)
        files += class_files
        labels += [CLASS_FOLDERS[class_dir.name.lower()]] * len(class_files)
    return files, labels


def _layout_hint(root: Path) -> str:
    """What a ``root`` without split folders likely is, where it can be told: a raw download (its
    metadata CSV in it or one folder down, as in downloads/isic2019/), or one split of a prepared
    folder."""
    try:
        folders = [root, *(entry for entry in root.iterdir() if entry.is_dir())]
    except OSError:
        folders = [root]
    download = next(
        (
            folder
            for folder in folders
            if any((folder / csv).is_file() for csv in (ISIC_2019_CSV, HAM10000_CSV))
        ),
        None,
    )
    if download is not None:
        return (
            f" (a raw download? `skinclf prepare {shlex.quote(str(download))} OUT` builds that layout in OUT)"
        )
    if root.name.lower() in SPLIT_NAMES and (root.parent / "train").is_dir():
        return f" ({root.name}/ is one split: data.root={root.parent} holds them all)"
    return ""


def find_images(root: Path) -> dict[str, tuple[list[Path], list[float]]]:
    """The image files and labels (MEL = 1) of each split present under ``root``; checks the layout."""
    if not root.is_dir():
        raise SkinclfError(f"data.root={root}: {not_a_folder(root)}; expected {LAYOUT}")
    splits = _by_lower_name(root, [p for p in _visible(root) if p.name.lower() in SPLIT_NAMES])
    found = {}
    for name in SPLIT_NAMES:
        if name not in splits:
            if name == "test":
                continue
            raise SkinclfError(f"{root / name}: missing split folder; expected {LAYOUT}{_layout_hint(root)}")
        if not splits[name].is_dir():  # a test that is not a folder is a mistake, not "no test"
            raise SkinclfError(f"{splits[name]}: {not_a_folder(splits[name])}; expected {LAYOUT}")
        found[name] = _split_files(splits[name])
    _check_each_image_once(found)
    return found


def _check_each_image_once(found: dict[str, tuple[list[Path], list[float]]]) -> None:
    """Refuse a file that two splits, or both classes, reach through symlinks (``val`` linked to
    ``train``): it would be validated or tested on the images it trained on, or carry two labels."""
    first_route: dict[str, tuple[Path, str, float]] = {}
    for split, (files, labels) in found.items():
        for file, label in zip(files, labels, strict=True):
            other, other_split, other_label = first_route.setdefault(
                os.path.realpath(file), (file, split, label)
            )
            if (other_split, other_label) != (split, label):
                raise SkinclfError(
                    f"{file}: the same file as {other} (through a symlink); expected each image "
                    "in one split and class only"
                )


def _check_classes_kept(
    root: Path, files: list[Path], labels: list[float], kept_labels: torch.Tensor
) -> None:
    """Refuse a split that skipping bad images left without one of its classes."""
    for label in (1.0, 0.0):
        if not (kept_labels == label).any():
            class_dir = root.joinpath(*files[labels.index(label)].relative_to(root).parts[:2])
            raise SkinclfError(
                f"{class_dir}: every image of this class was skipped as bad (data.skip_bad_images=true); "
                "expected at least one readable image per class in each split"
            )


def _lesions_by_file(root: Path) -> dict[str, str] | None:
    """The lesion id ("" where the download gave none) of each image ROOT/manifest.csv lists, by
    its path relative to ROOT; None without a manifest with ``file`` and ``lesion_id`` columns
    (any other manifest is the user's own and not read further)."""
    path = root / MANIFEST
    if not path.is_file():
        return None
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False, usecols=["file", "lesion_id"])
    except (OSError, ValueError) as err:  # pandas' parser errors are ValueErrors too
        log.info(f"{path}: no lesion ids read ({first_line(err)}); images count as lesions of their own")
        return None
    return dict(zip(table["file"], table["lesion_id"], strict=True))


def _lesions_of(files: list[Path], root: Path, lesion_of: dict[str, str]) -> np.ndarray:
    """The lesion of each of ``files``; an image the manifest gives none for is one of its own."""
    relative = [file.relative_to(root).as_posix() for file in files]
    if files and not any(name in lesion_of for name in relative):
        # Folders renamed or images moved since prepare wrote it: say so, rather than let
        # cross-validation count every image as a lesion of its own without a word.
        log.warning(
            f"{root / MANIFEST}: lists none of the {len(files)} images of "
            f"{files[0].relative_to(root).parts[0]}/; each counts as a lesion of its own"
        )
    return np.array([lesion_of.get(name) or f"file:{name}" for name in relative], dtype=object)


def _warn_of_copies_across_splits(splits: dict[str, Split], files_of: dict[str, list[Path]]) -> None:
    """Warn of images whose decoded pixels repeat in an earlier split: the same photo under two
    names (ISIC's archive holds such copies) is scored on an image the model trained on, and
    inflates the validation or test figures."""
    first_seen: dict[bytes, tuple[str, Path]] = {}
    copies: dict[tuple[str, str], list[tuple[Path, Path]]] = {}
    for name, split in splits.items():
        for file, digest in zip(files_of[name], split.image_digests, strict=True):
            seen_in, seen_file = first_seen.setdefault(digest, (name, file))
            if seen_in != name:
                copies.setdefault((seen_in, name), []).append((seen_file, file))
    for (earlier, later), pairs in copies.items():
        log.warning(
            f"{later}: {len(pairs)} image(s) with the same pixels as {earlier} images (first: "
            f"{pairs[0][1]} = {pairs[0][0]}); the {later} scores then count images the model "
            f"{'trained on' if earlier == 'train' else 'was selected on'}: remove the copies from one split"
        )


def load_splits(data_cfg: DictConfig) -> ImageSplits:
    """Decode (first use) or load from the decode cache the splits of ``data.root``."""
    root = data_path(data_cfg, "root")
    layout = find_images(root)
    cache_dir = data_path(data_cfg, "cache_dir") if data_cfg.get("decode_cache", True) else None
    skip_bad = bool(data_cfg.get("skip_bad_images", False))
    stem = "folder-" + re.sub(r"[^A-Za-z0-9_.-]+", "_", root.name or "root")
    lesion_of = _lesions_by_file(root)
    splits = {}
    files_of: dict[str, list[Path]] = {}
    decoded_splits = []
    for name, (files, labels) in layout.items():
        decoded = load_or_decode(files, root, f"{stem}-{name}", cache_dir, IMAGE_SIZE, skip_bad)
        decoded_splits.append(decoded)
        for path, reason in decoded.bad:
            log.warning(f"skipped bad image {path}: {reason.removeprefix(path + ': ')}")
        if decoded.bad:
            log.warning(
                f"{name}: skipped {len(decoded.bad)} bad image(s) of {len(files)} (data.skip_bad_images)"
            )
        kept_labels = torch.tensor([labels[i] for i in decoded.kept], dtype=torch.float32)
        _check_classes_kept(root, files, labels, kept_labels)
        kept_files = [files[i] for i in decoded.kept]
        lesions = None if lesion_of is None else _lesions_of(kept_files, root, lesion_of)
        sources = [readable(str(file.relative_to(root))) for file in kept_files]
        splits[name] = Split(decoded.images, kept_labels, lesions, sources)
        files_of[name] = kept_files
    _warn_of_copies_across_splits(splits, files_of)
    # Only once every split decoded: a bad file in val leaves no train cache behind either.
    for decoded in decoded_splits:
        store(decoded)
    if "test" not in splits:
        # A misspelt test folder (tests/, Test_set/) would otherwise go unnoticed: name what is there.
        others = [p.name for p in _visible(root) if p.is_dir() and p.name.lower() not in SPLIT_NAMES]
        if others:
            log.warning(
                f"{root}: no test split folder (its other folders: {', '.join(others)}; a split "
                "must be named test); the run will end after validation"
            )
        else:
            log.info(f"{root}: no test split folder; the run will end after validation")
    return ImageSplits(name="folder", **splits)
