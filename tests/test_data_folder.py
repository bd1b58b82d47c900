"""data=folder: the paper's ROOT/{train,val,test}/{MEL,NV} layout, the decode cache, and bad input."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from skinclf.config import compose_config
from skinclf.data import decode_cache as decode_cache_module
from skinclf.data import load_splits
from skinclf.errors import SkinclfError

from conftest import train_cli

RED, BLUE = (220, 30, 30), (30, 30, 220)  # MEL images are red, NV images blue: labels are checkable
# (mode, suffix, size): every mode the folder source must read, at varied sizes.
VARIANTS = [
    ("RGB", ".jpg", (200, 150)),
    ("RGBA", ".png", (64, 64)),
    ("L", ".png", (50, 80)),
    ("P", ".png", (128, 128)),
    ("CMYK", ".jpg", (90, 60)),
    ("I;16", ".png", (40, 40)),
]


def write_image(path: Path, colour: tuple[int, int, int], mode: str = "RGB", size=(48, 40)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "I;16":
        # 16-bit grey at the colour's mean brightness, on the 0..65535 scale.
        value = int(np.mean(colour) * 257)
        Image.fromarray(np.full(size[::-1], value, np.uint16)).save(path)
    else:
        Image.new("RGB", size, colour).convert(mode).save(path)
    return path


def make_dataset(root: Path, counts: dict[str, tuple[int, int]], nv_name: str = "NV") -> Path:
    """ROOT/<split>/{MEL,<nv_name>}/ with (n_mel, n_nv) RGB JPEGs per split."""
    for split, (n_mel, n_nv) in counts.items():
        for i in range(n_mel):
            write_image(root / split / "MEL" / f"m{i}.jpg", RED)
        for i in range(n_nv):
            write_image(root / split / nv_name / f"n{i}.jpg", BLUE)
    return root


def data_cfg(root: Path, cache: Path | None, *extra: str):
    cache_override = f"data.cache_dir={cache}" if cache is not None else "data.decode_cache=false"
    return compose_config(["data=folder", f"data.root={root}", cache_override, *extra]).data


def test_every_mode_size_and_nev_alias_in_any_case(tmp_path):
    root = tmp_path / "ds"
    for i, (mode, suffix, size) in enumerate(VARIANTS):
        write_image(root / "Train" / "mel" / f"m{i}{suffix}", RED, mode, size)
        write_image(root / "Train" / "Nev" / f"n{i}{suffix}", BLUE, mode, size)
    make_dataset(root, {"VAL": (2, 3), "test": (1, 2)}, nv_name="nev")
    (root / "manifest.csv").write_text("ignored: not a split folder\n")
    (root / "Train" / "mel" / ".DS_Store").write_text("hidden files are ignored")

    splits = load_splits(data_cfg(root, tmp_path / "cache"))
    assert splits.train.images.shape == (12, 3, 128, 128)
    assert splits.train.class_counts() == {"MEL": 6, "NV": 6}
    assert splits.val.class_counts() == {"MEL": 2, "NV": 3}
    assert splits.test.class_counts() == {"MEL": 1, "NV": 2}
    for split in (splits.train, splits.val, splits.test):
        assert split.images.dtype == torch.uint8
        mean = split.images.float().mean(dim=(2, 3))
        colour = split.labels == 1
        # RGB-like modes keep red MEL / blue NV; grey modes (L, I;16) are equal in both, so check
        # the colourful images only: red > blue exactly for the MEL ones.
        colourful = (mean.max(dim=1).values - mean.min(dim=1).values) > 50
        assert colourful.sum() >= len(split) - 4
        assert ((mean[:, 0] > mean[:, 2]) == colour)[colourful].all()


def test_files_that_windows_and_file_servers_leave_in_folders_are_passed_over(tmp_path):
    # Not images: without the rule, Thumbs.db in a class folder stopped the run ("not an image
    # file"), one in a split folder too ("file outside a class folder"), and a Synology NAS's
    # @eaDir thumbnails trained as extra MEL images.
    root = make_dataset(tmp_path / "ds", {"train": (2, 2), "val": (1, 1)})
    for folder in (root / "train", root / "train" / "MEL", root / "val" / "NV"):
        (folder / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0 not an image")
        (folder / "desktop.ini").write_text("[.ShellClassInfo]\n")
    write_image(root / "train" / "MEL" / "@eaDir" / "m0.jpg" / "SYNOPHOTO_THUMB_S.jpg", BLUE)
    splits = load_splits(data_cfg(root, None))
    assert splits.train.class_counts() == {"MEL": 2, "NV": 2}
    assert splits.val.class_counts() == {"MEL": 1, "NV": 1}


def test_a_misspelt_test_folder_is_named_in_a_warning(tmp_path, caplog):
    # tests/ is no split name: the run has no test split, and the warning says what was there.
    root = make_dataset(tmp_path / "ds", {"train": (2, 2), "val": (1, 1), "tests": (1, 1)})
    with caplog.at_level(logging.INFO, logger="skinclf"):
        assert load_splits(data_cfg(root, None)).test is None
    (warning,) = [r for r in caplog.records if "no test split folder" in r.getMessage()]
    assert warning.levelno == logging.WARNING and "its other folders: tests;" in warning.getMessage()
    shutil.rmtree(root / "tests")  # no test split meant: no warning
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="skinclf"):
        load_splits(data_cfg(root, None))
    assert [r.levelno for r in caplog.records if "no test split folder" in r.getMessage()] == [logging.INFO]


def test_second_load_is_a_cache_hit_and_a_changed_dataset_is_decoded_again(tmp_path, monkeypatch):
    root = make_dataset(tmp_path / "ds", {"train": (3, 4), "val": (2, 2)})
    cache = tmp_path / "cache"
    first = load_splits(data_cfg(root, cache))
    assert first.test is None
    assert len(list(cache.glob("*.pt"))) == 2  # one file per split

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded although the cache holds these images")

    monkeypatch.setattr(decode_cache_module, "decode_image", no_decoding)
    second = load_splits(data_cfg(root, cache))
    assert (second.train.images == first.train.images).all()
    assert (second.train.labels == first.train.labels).all()

    # A new image, a changed image: a cache miss, never the stale images.
    monkeypatch.undo()
    write_image(root / "train" / "MEL" / "new.png", RED)
    changed = root / "val" / "NV" / "n0.jpg"
    write_image(changed, RED)  # same name, different content
    os.utime(changed, ns=(changed.stat().st_atime_ns, changed.stat().st_mtime_ns + 10**9))
    third = load_splits(data_cfg(root, cache))
    assert third.train.class_counts() == {"MEL": 4, "NV": 4}
    nv_val = third.val.images[third.val.labels == 0].float().mean(dim=(2, 3))
    assert (nv_val[:, 0] > nv_val[:, 2]).sum() == 1  # the recoloured file is read anew
    assert len(list(cache.glob("*.pt"))) == 4


def test_a_file_replaced_with_its_size_and_mtime_kept_is_decoded_again(tmp_path):
    # `touch -r old new; mv new old`, `cp -p`, `rsync -t`: same size (BMP), same mtime, new pixels.
    root = make_dataset(tmp_path / "ds", {"train": (2, 2), "val": (1, 1)})
    image = write_image(root / "train" / "MEL" / "m0.bmp", RED)
    cache = tmp_path / "cache"
    assert load_splits(data_cfg(root, cache)).train.class_counts() == {"MEL": 3, "NV": 2}
    kept = image.stat()
    replacement = write_image(tmp_path / "new.bmp", BLUE)
    assert replacement.stat().st_size == kept.st_size
    os.utime(replacement, ns=(kept.st_atime_ns, kept.st_mtime_ns))
    replacement.replace(image)
    assert (image.stat().st_size, image.stat().st_mtime_ns) == (kept.st_size, kept.st_mtime_ns)
    train = load_splits(data_cfg(root, cache)).train
    red_minus_blue = train.images.float().mean(dim=(2, 3))[:, 0] - train.images.float().mean(dim=(2, 3))[:, 2]
    assert (red_minus_blue > 0).sum() == 2  # two red MEL images left: the replaced one reads blue


def test_the_cache_key_follows_permissions_owner_and_the_pillow_version(tmp_path, monkeypatch):
    # chmod and chown keep the mtime: an image skipped as unreadable, then made readable, must be decoded
    # anew; and a new Pillow may decode JPEGs a little differently.
    image = write_image(tmp_path / "a.jpg", RED)
    before = decode_cache_module.content_key([image], tmp_path)
    image.chmod(0o600)
    after_chmod = decode_cache_module.content_key([image], tmp_path)
    monkeypatch.setattr(decode_cache_module.PIL, "__version__", "0.0.1")
    after_upgrade = decode_cache_module.content_key([image], tmp_path)
    keys = {before, after_chmod, after_upgrade}
    if os.geteuid() == 0:  # only root may give a file away
        os.chown(image, image.stat().st_uid + 1, -1)
        keys.add(decode_cache_module.content_key([image], tmp_path))
    assert len(keys) == 3 + (os.geteuid() == 0)


def test_decode_cache_false_writes_no_cache(tmp_path):
    root = make_dataset(tmp_path / "ds", {"train": (2, 2), "val": (1, 1)})
    splits = load_splits(data_cfg(root, None))
    assert splits.train.class_counts() == {"MEL": 2, "NV": 2}
    assert not (tmp_path / "data").exists() and not list(tmp_path.rglob("*.pt"))


def _bad(tmp_path: Path, breaker) -> tuple[str, Path]:
    """Break a valid dataset with ``breaker(root)``; return (error message, cache dir)."""
    root = make_dataset(tmp_path / "ds", {"train": (2, 2), "val": (2, 2)})
    cache = tmp_path / "cache"
    expected_path = breaker(root)
    with pytest.raises(SkinclfError) as err:
        load_splits(data_cfg(root, cache))
    message = str(err.value)
    assert str(expected_path) in message, message
    assert "\n" not in message
    assert not list(cache.glob("*.pt")) if cache.exists() else True
    assert not list(cache.glob(".*.tmp")) if cache.exists() else True
    return message, cache


def _truncate(path: Path) -> Path:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (120, 120, 3), dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:-800])
    return path


@pytest.mark.parametrize(
    ("breaker", "expected"),
    [
        (lambda r: (r.rename(r.with_name("gone")), r)[1], "no such folder"),
        (
            lambda r: (r.rename(r.with_name("moved")), r.symlink_to(r.with_name("moved_away")), r)[2],
            "is a symlink to nothing (",
        ),
        (lambda r: (os.rename(r / "val", r / "valid"), r / "val")[1], "missing split folder"),
        (
            lambda r: (os.rename(r / "train" / "NV", r / "train" / "benign"), r / "train" / "benign")[1],
            "unknown class",
        ),
        (lambda r: (os.rename(r / "val" / "MEL", r / ".MEL"), r / "val" / "MEL")[1], "missing class folder"),
        (
            lambda r: ([p.unlink() for p in (r / "val" / "MEL").iterdir()], r / "val" / "MEL")[1],
            "empty class folder",
        ),
        (lambda r: _truncate(r / "train" / "MEL" / "m0.jpg"), "corrupt or truncated"),
        (
            lambda r: (
                (r / "val" / "NV" / "n1.jpg").write_bytes(b"\xff\xd8\xff\xe0 garbage"),
                r / "val" / "NV" / "n1.jpg",
            )[1],
            "corrupt or truncated",
        ),
        (
            lambda r: ((r / "train" / "NV" / "notes.txt").write_text("hello"), r / "train/NV/notes.txt")[1],
            "not an image",
        ),
        (
            lambda r: ((r / "train" / "stray.jpg").write_text("x"), r / "train" / "stray.jpg")[1],
            "outside a class",
        ),
        (
            lambda r: (
                (r / "train" / "MEL" / "gone.jpg").symlink_to(r / "nowhere.jpg"),
                r / "train" / "MEL" / "gone.jpg",
            )[1],
            "no such image file",
        ),
        (
            lambda r: write_image(r / "train" / "MEL" / "more" / "nv" / "n9.jpg", BLUE).parent,
            "a class folder inside the class folder MEL; expected it beside MEL",
        ),
        (lambda r: ((r / "test").write_text("x"), r / "test")[1], "test: is a file; expected ROOT/"),
        (
            lambda r: ((r / "test").symlink_to(r / "gone"), r / "test")[1],
            f"test: is a symlink to nothing ({os.sep}",
        ),
        (
            lambda r: (
                shutil.rmtree(r / "val" / "NV"),
                (r / "val" / "NV").symlink_to("gone"),
                r / "val" / "NV",
            )[2],
            "NV: is a symlink to nothing (gone); expected a class folder",
        ),
        (
            lambda r: (
                shutil.rmtree(r / "val"),
                (r / "val").symlink_to(r / "train"),
                r / "val" / "MEL" / "m0.jpg",
            )[2],
            f"the same file as {os.sep}",
        ),
    ],
    ids=[
        "missing-root",
        "root-dangling-symlink",
        "missing-split",
        "misnamed-class",
        "missing-class",
        "empty-class",
        "truncated",
        "corrupt",
        "non-image",
        "stray-file",
        "dangling-symlink",
        "class-in-other-class",
        "test-is-a-file",
        "test-is-a-dangling-symlink",
        "class-is-a-dangling-symlink",
        "val-linked-to-train",
    ],
)
def test_bad_input_names_the_path(tmp_path, breaker, expected):
    message, _ = _bad(tmp_path, breaker)
    assert expected in message


def test_a_raw_download_or_one_split_as_data_root_says_what_to_give_instead(tmp_path):
    # Two mistakes a user makes: data.root at the unpacked download, or at the prepared train/.
    download = tmp_path / "downloads" / "isic 2019"
    write_image(download / "ISIC_2019_Training_Input" / "ISIC_0000000.jpg", RED)
    (download / "ISIC_2019_Training_GroundTruth.csv").write_text("image,MEL,NV\nISIC_0000000,1,0\n")
    with pytest.raises(SkinclfError) as err:
        load_splits(data_cfg(download, None))
    assert str(err.value).endswith(
        f"(a raw download? `skinclf prepare '{download}' OUT` builds that layout in OUT)"
    )
    with pytest.raises(SkinclfError) as err:  # the folder that holds downloads
        load_splits(data_cfg(download.parent, None))
    assert str(err.value).endswith(f"`skinclf prepare '{download}' OUT` builds that layout in OUT)")
    root = make_dataset(tmp_path / "prepared", {"train": (2, 2), "val": (1, 1)})
    with pytest.raises(SkinclfError) as err:
        load_splits(data_cfg(root / "train", None))
    assert str(err.value).endswith(f"(train/ is one split: data.root={root} holds them all)")
    # Any other folder without splits: the layout only.
    with pytest.raises(SkinclfError) as err:
        load_splits(data_cfg(root / "train" / "MEL", None))
    assert str(err.value).endswith("NEV accepted for NV)")


def test_root_not_set(tmp_path):
    with pytest.raises(SkinclfError, match=r"data.root is not set"):
        load_splits(compose_config(["data=folder"]).data)


def test_skip_bad_images_lists_and_leaves_them_out(tmp_path, caplog):
    root = make_dataset(tmp_path / "ds", {"train": (3, 3), "val": (2, 2)})
    bad = root / "train" / "NV" / "broken.jpg"
    bad.write_text("not a jpeg")
    cfg = data_cfg(root, tmp_path / "cache", "data.skip_bad_images=true")
    with caplog.at_level(logging.WARNING):
        splits = load_splits(cfg)
    assert splits.train.class_counts() == {"MEL": 3, "NV": 3}
    assert str(bad) in caplog.text
    assert "train/NV/broken.jpg" not in splits.train.sources and len(splits.train.sources) == 6
    # The cache remembers the bad file: without the option it is an error again, not silently skipped.
    with pytest.raises(SkinclfError, match="broken.jpg"):
        load_splits(data_cfg(root, tmp_path / "cache"))


def test_images_in_a_symlinked_subfolder_of_a_class_folder_count(tmp_path):
    root = make_dataset(tmp_path / "ds", {"train": (2, 2), "val": (1, 1), "test": (1, 1)})
    for i in range(3):
        write_image(tmp_path / "more_mel" / f"extra{i}.jpg", RED)
    (root / "train" / "MEL" / "more").symlink_to(tmp_path / "more_mel", target_is_directory=True)
    splits = load_splits(data_cfg(root, None))
    assert splits.train.class_counts() == {"MEL": 5, "NV": 2}


def test_skip_bad_images_skips_a_dangling_symlink(tmp_path, caplog):
    root = make_dataset(tmp_path / "ds", {"train": (2, 2), "val": (2, 2)})
    dangling = root / "train" / "MEL" / "gone.jpg"
    dangling.symlink_to(tmp_path / "nowhere.jpg")
    with caplog.at_level(logging.WARNING):
        splits = load_splits(data_cfg(root, tmp_path / "cache", "data.skip_bad_images=true"))
    assert splits.train.class_counts() == {"MEL": 2, "NV": 2}
    assert f"skipped bad image {dangling}: no such image file" in caplog.text


def test_skip_bad_images_never_leaves_a_class_empty(tmp_path):
    root = make_dataset(tmp_path / "ds", {"train": (2, 3), "val": (2, 2)})
    for image in (root / "train" / "MEL").iterdir():
        image.write_text("not a jpeg")
    with pytest.raises(SkinclfError, match=r"train/MEL: every image of this class was skipped as bad"):
        load_splits(data_cfg(root, None, "data.skip_bad_images=true"))


def test_trainer_progress_reaches_the_decoding_bar(tmp_path):
    # Decoding a folder dataset took minutes without a bar under trainer.progress=always: the
    # data loader, which sees data.* only, always used auto (silent outside a terminal).
    make_dataset(tmp_path / "ds", {"train": (3, 3), "val": (2, 2)})
    for mode, shown in (("always", True), ("never", False)):
        args = ("data=folder", "data.root=ds", "trainer.max_epochs=1", "data.decode_cache=false")
        proc = train_cli(*args, f"trainer.progress={mode}", f"hydra.run.dir=run_{mode}", cwd=tmp_path)
        assert ("decoding folder-ds-train" in proc.stderr) is shown, proc.stderr


def test_train_cli_end_to_end_with_relative_root(tmp_path):
    make_dataset(tmp_path / "ds", {"train": (6, 6), "val": (3, 3), "test": (3, 3)})
    proc = train_cli(
        "data=folder", "data.root=ds", "trainer.max_epochs=1", "trainer.progress=never", cwd=tmp_path
    )
    run_dir = Path(proc.stdout.strip().splitlines()[-1].removeprefix("output directory: "))
    metrics = json.loads((run_dir / "test_metrics.json").read_text())
    assert metrics["n_test"] == 6 and metrics["data"] == "folder"
    # Each prediction names its image under data.root, in the order the splits hold them.
    predictions = pd.read_csv(run_dir / "predictions.csv")
    assert list(predictions.columns) == ["split", "index", "source", "label", "prob_mel"]
    for split, rows in predictions.groupby("split"):
        expected = [f"{split}/MEL/m{i}.jpg" for i in range(3)] + [f"{split}/NV/n{i}.jpg" for i in range(3)]
        assert sorted(rows["source"]) == sorted(expected)
        assert all(rows["label"] == [int("/MEL/" in source) for source in rows["source"]])
    assert len(list((tmp_path / "data").glob("folder-ds-*.pt"))) == 3  # default cache_dir, per split


def test_train_cli_bad_root_one_line_exit_2_no_run_left(tmp_path):
    proc = train_cli("data=folder", "data.root=missing_dir", cwd=tmp_path, check=False)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert errors == [
        f"skinclf train: error: data.root={tmp_path / 'missing_dir'}: no such folder; "
        "expected ROOT/{train,val,test}/{MEL,NV}/* (test optional, NEV accepted for NV)"
    ]
    runs = tmp_path / "outputs" / "runs"
    assert not runs.exists() or not any(runs.iterdir())


def test_copies_of_an_image_in_two_splits_are_named_in_a_warning(tmp_path, caplog):
    # The same photo under another name in val and in test: scored on images the model saw.
    root, rng = tmp_path / "ds", np.random.default_rng(0)
    for split in ("train", "val", "test"):
        for label in ("MEL", "NV"):
            (root / split / label).mkdir(parents=True)
            for i in range(2):  # every other image unique
                pixels = rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / label / f"{i}.png")
    photo = rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)
    Image.fromarray(photo).save(root / "train" / "MEL" / "isic_1.png")
    Image.fromarray(photo).save(root / "val" / "MEL" / "isic_1_copy.png")
    Image.fromarray(photo).save(root / "test" / "NV" / "isic_1_again.png")
    with caplog.at_level(logging.WARNING):
        load_splits(data_cfg(root, None))
    warnings = [r.getMessage() for r in caplog.records if "same pixels" in r.getMessage()]
    assert warnings == [
        f"val: 1 image(s) with the same pixels as train images (first: {root / 'val/MEL/isic_1_copy.png'} = "
        f"{root / 'train/MEL/isic_1.png'}); the val scores then count images the model trained on: remove "
        "the copies from one split",
        f"test: 1 image(s) with the same pixels as train images (first: {root / 'test/NV/isic_1_again.png'} "
        f"= {root / 'train/MEL/isic_1.png'}); the test scores then count images the model trained on: "
        "remove the copies from one split",
    ]
