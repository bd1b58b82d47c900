"""data=dermamnist: MedMNIST+ npz -> MEL (4) / NV (5) splits; resizing, balancing, bad files."""

from __future__ import annotations

import csv
import logging

import numpy as np
import pytest
import torch

from skinclf.config import compose_config
from skinclf.data import load_splits
from skinclf.data.splits import content_hash
from skinclf.errors import SkinclfError

from conftest import train_in_process

# Labels per split: every DermaMNIST class appears; 4 = melanoma, 5 = nevus.
LABELS = {
    "train": [0, 1, 2, 3, 4, 4, 5, 5, 5, 5, 5, 5, 6],
    "val": [4, 5, 5, 2, 6],
    "test": [5, 4, 0, 4],
}


def write_npz(path, size=128, labels=LABELS, drop_key=None, **override):
    """A DermaMNIST-format npz whose image i has every pixel = 10 * label + i (so images are traceable)."""
    arrays = {}
    for split, ys in labels.items():
        values = np.array([10 * y + i for i, y in enumerate(ys)], np.uint8)
        arrays[f"{split}_images"] = np.broadcast_to(
            values[:, None, None, None], (len(ys), size, size, 3)
        ).copy()
        arrays[f"{split}_labels"] = np.array(ys, np.uint8)[:, None]
    arrays.update(override)
    arrays.pop(drop_key, None)
    np.savez_compressed(path, **arrays)
    return path


def splits_of(path, *extra):
    return load_splits(compose_config(["data=dermamnist", f"data.root={path}", *extra]).data)


def test_keeps_melanoma_and_nevi_as_mel_and_nv(tmp_path):
    splits = splits_of(write_npz(tmp_path / "dermamnist_128.npz"))
    assert splits.name == "dermamnist"
    for name, split in splits.items():
        ys = np.array(LABELS[name])
        kept = np.flatnonzero((ys == 4) | (ys == 5))
        assert split.images.shape == (len(kept), 3, 128, 128) and split.images.dtype == torch.uint8
        assert split.class_counts() == {"MEL": int((ys == 4).sum()), "NV": int((ys == 5).sum())}
        # Each kept image is the one of its label, in order: pixel value 10 * label + index.
        pixel = split.images[:, 0, 0, 0].numpy()
        assert pixel.tolist() == [10 * ys[i] + i for i in kept]
        assert (split.labels.numpy() == (ys[kept] == 4)).all()
        # predictions.csv names each image by its place in the npz, the other classes counted.
        assert split.sources == [f"{name}_images[{i}]" for i in kept]


def test_folder_holding_the_file_and_other_sizes_are_resized(tmp_path):
    write_npz(tmp_path / "dermamnist_128.npz")
    assert len(splits_of(tmp_path).train) == 8
    small = splits_of(write_npz(tmp_path / "dermamnist.npz", size=28))  # MedMNIST's name for 28
    assert small.train.images.shape == (8, 3, 128, 128)
    # Constant images stay the same constant after antialiased resizing.
    assert small.train.images[:, 0, 0, 0].tolist() == small.train.images[:, 2, 77, 5].tolist()
    assert small.train.images[:, 0, 0, 0].tolist() == [44, 45, 56, 57, 58, 59, 60, 61]


@pytest.mark.parametrize(("name", "size"), [("dermamnist_64.npz", 64), ("dermamnist.npz", 28)])
def test_a_folder_holding_one_file_of_another_size_takes_it(tmp_path, name, size):
    write_npz(tmp_path / name, size=size)
    assert splits_of(tmp_path).train.images.shape == (8, 3, 128, 128)


def test_a_folder_holding_two_other_sizes_names_them(tmp_path):
    write_npz(tmp_path / "dermamnist_64.npz", size=64)
    write_npz(tmp_path / "dermamnist.npz", size=28)
    with pytest.raises(SkinclfError) as err:
        splits_of(tmp_path)
    assert str(err.value) == (
        f"data.root={tmp_path}: holds dermamnist.npz, dermamnist_64.npz but no dermamnist_128.npz; "
        "pass the file to use as data.root"
    )
    # With the 128 pixel file there too, that one is taken (3 training images, not 8).
    write_npz(tmp_path / "dermamnist_128.npz", labels={"train": [4, 5, 5], "val": [4, 5], "test": [4, 5]})
    assert len(splits_of(tmp_path).train) == 3


def test_a_folder_without_the_file_names_the_file_it_looked_for(tmp_path):
    with pytest.raises(
        SkinclfError, match=f"data.root={tmp_path}/dermamnist_128.npz: no such file; download"
    ):
        splits_of(tmp_path)


def test_balance_train_undersamples_nv_in_train_only(tmp_path):
    path = write_npz(tmp_path / "d.npz")
    a = splits_of(path, "data.balance_train=true", "seed=1")
    assert a.train.class_counts() == {"MEL": 2, "NV": 2}
    assert a.val.class_counts() == {"MEL": 1, "NV": 2}
    b = splits_of(path, "data.balance_train=true", "seed=1")
    assert torch.equal(a.train.images, b.train.images)  # seeded
    # The subset keeps each image's place in the npz: image i has pixel value 10 * label + i.
    for source, pixel in zip(a.train.sources, a.train.images[:, 0, 0, 0].tolist(), strict=True):
        i = int(source.removeprefix("train_images[").removesuffix("]"))
        assert pixel == 10 * LABELS["train"][i] + i
    draws = {
        tuple(splits_of(path, "data.balance_train=true", f"seed={s}").train.images[:, 0, 0, 0].tolist())
        for s in range(6)
    }
    assert len(draws) > 1  # the NV kept depend on the seed


def test_balanced_runs_name_the_training_split_their_subset_is_drawn_from(tmp_path):
    # Each seed keeps other NV images by design; what they are drawn from is one split, hashed as
    # an unbalanced run hashes its training split, so the report keeps the seeds one experiment.
    path = write_npz(tmp_path / "d.npz")
    whole = content_hash(splits_of(path).train)
    assert splits_of(path).train_drawn_from is None  # nothing drawn: the split is its own record
    drawn = [splits_of(path, "data.balance_train=true", f"seed={s}") for s in range(4)]
    assert {splits.train_drawn_from for splits in drawn} == {whole}
    assert len({content_hash(splits.train) for splits in drawn}) > 1
    # Another training split (its first NV image relabelled MEL) is another source.
    write_npz(path, labels={**LABELS, "train": [0, 1, 2, 3, 4, 4, 4, 5, 5, 5, 5, 5, 6]})
    assert splits_of(path, "data.balance_train=true", "seed=0").train_drawn_from != whole


def test_class_weighted_loss_weights_mel_by_nv_over_mel_and_reports_the_plain_loss(tmp_path):
    path = write_npz(tmp_path / "d.npz")
    assert splits_of(path).train.pos_weight() == 6 / 2
    base = ["data=dermamnist", f"data.root={path}", "trainer.max_epochs=1", "model=resnet"]

    def train(name, *overrides):
        run, _ = train_in_process(tmp_path / name, *base, *overrides)
        with open(run / "metrics.csv") as f:
            row = next(csv.DictReader(f))
        weights = torch.load(run / "last.pt", weights_only=True)["model"]
        return float(row["train_loss"]), float(row["val_loss"]), weights

    # lr=0: the same weights see the same batches, so the reported (unweighted) losses agree.
    frozen = train("frozen", "optim.lr=0")
    frozen_weighted = train("frozen_weighted", "optim.lr=0", "data.class_weighted_loss=true")
    assert frozen_weighted[:2] == pytest.approx(frozen[:2], abs=2e-6)  # metrics.csv keeps 6 decimals
    # Training on it: the MEL weight changes the steps taken.
    plain, weighted = train("plain"), train("weighted", "data.class_weighted_loss=true")
    assert any(not torch.equal(plain[2][k], weighted[2][k]) for k in plain[2])


def test_missing_file_says_where_to_get_it(tmp_path):
    with pytest.raises(SkinclfError) as err:
        splits_of(tmp_path / "nowhere" / "dermamnist_128.npz")
    message = str(err.value)
    assert str(tmp_path / "nowhere" / "dermamnist_128.npz") in message
    assert "zenodo" in message and "dermamnist_128.npz" in message and "data.root" in message


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"drop_key": "val_labels"}, "val_labels"),
        ({"test_images": np.zeros((4, 128, 128), np.uint8)}, "test_images"),
        ({"train_images": np.zeros((13, 128, 128, 3), np.float32)}, "train_images"),
        ({"train_labels": np.zeros((12, 1), np.uint8)}, "train_labels"),
        ({"val_labels": np.full((5, 1), 9, np.uint8)}, "val_labels"),
        ({"train_images": np.zeros((13, 0, 0, 3), np.uint8)}, "train_images"),
    ],
    ids=["missing-key", "grayscale-shape", "float-images", "label-count", "label-range", "zero-size-images"],
)
def test_wrong_keys_or_shapes_name_the_key(tmp_path, kwargs, key):
    path = write_npz(tmp_path / "bad.npz", **kwargs)
    with pytest.raises(SkinclfError) as err:
        splits_of(path)
    assert key in str(err.value) and str(path) in str(err.value)


def test_a_missing_key_is_named_before_any_split_is_counted(tmp_path, caplog):
    # val's labels missing: the train split's count line came first, as if training had begun.
    path = write_npz(tmp_path / "bad.npz", drop_key="val_labels")
    with caplog.at_level(logging.INFO, logger="skinclf"), pytest.raises(SkinclfError, match="val_labels"):
        splits_of(path)
    assert "dermamnist train" not in caplog.text


def test_images_and_labels_of_different_counts_say_so(tmp_path):
    path = write_npz(tmp_path / "bad.npz", test_labels=np.full((14, 1), 5, np.uint8))
    with pytest.raises(SkinclfError) as err:
        splits_of(path)
    assert str(err.value) == (
        f"{path}: test_images holds 4 images but test_labels 14 labels; expected one label per image"
    )


def test_not_an_npz(tmp_path):
    path = tmp_path / "dermamnist_128.npz"
    path.write_text("<html>download page</html>")
    with pytest.raises(SkinclfError, match=f"^{path}: not a readable npz file \\(not a NumPy file\\); "):
        splits_of(path)


def test_a_single_npy_array_is_one_clear_error_naming_it(tmp_path):
    path = tmp_path / "dermamnist_128.npy"
    np.save(path, np.zeros(3))
    with pytest.raises(SkinclfError, match=f"^{path}: a single array \\(.npy\\), not an npz archive"):
        splits_of(path)


@pytest.mark.parametrize("damage", ["flipped-byte", "object-array"])
def test_damaged_arrays_are_one_clear_error(tmp_path, damage):
    path = tmp_path / "dermamnist_128.npz"
    if damage == "flipped-byte":
        data = bytearray(write_npz(path).read_bytes())
        data[len(data) // 2] ^= 0xFF  # inside a compressed member: np.load still opens the archive
        path.write_bytes(bytes(data))
    else:
        write_npz(path)
        arrays = dict(np.load(path))
        arrays["val_images"] = np.array([None] * 5, dtype=object)
        np.savez(path, **arrays)
    with pytest.raises(SkinclfError, match="arrays are unreadable") as err:
        splits_of(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize(
    ("val", "missing"),
    [([0, 2, 6], "MEL or NV"), ([5, 5, 2], "MEL"), ([4, 0], "NV")],
    ids=["none", "no-mel", "no-nv"],
)
def test_a_split_without_both_classes_is_an_error_naming_the_file(tmp_path, val, missing):
    path = write_npz(tmp_path / "dermamnist_128.npz", labels={**LABELS, "val": val})
    with pytest.raises(SkinclfError) as err:
        splits_of(path)
    assert str(err.value) == (
        f"{path}: the val split of data=dermamnist has no {missing} image; "
        "expected both MEL and NV in every split"
    )
