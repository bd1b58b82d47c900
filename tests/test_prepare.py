"""`skinclf prepare`: fake ISIC 2019 and HAM10000 downloads -> the folder layout, split by lesion."""

from __future__ import annotations

import logging
import os
import shlex
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf
from PIL import Image, JpegImagePlugin

from skinclf import cli
from skinclf.config import compose_config
from skinclf.data import load_splits
from skinclf.data.folder import find_images
from skinclf.data.images import decode_image
from skinclf.data.splits import undersample_majority
from skinclf.errors import SkinclfError
from skinclf.prepare import assign_splits, parse_fractions
from skinclf.prepare import main as prepare_main
from skinclf.sweep import cross_validation

from conftest import fail_if_called

RED, BLUE, GREEN = (220, 30, 30), (30, 30, 220), (30, 200, 30)
COLOURS = {"MEL": RED, "NV": BLUE, "other": GREEN}


def _image(path, label, rng):
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = rng.integers(40, 90, 2)
    # Noise makes every file its own: byte-identical files are copies, which prepare keeps together.
    pixels = np.array(COLOURS[label]) + rng.integers(-20, 21, (int(h), int(w), 3))
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path)


def _lesions(n_mel: int, n_nv: int, n_other: int, rng) -> pd.DataFrame:
    """One row per image: image_id, label, lesion_id; lesions have 1 to 4 images of one label."""
    rows, lesion = [], 0
    for label, n in (("MEL", n_mel), ("NV", n_nv), ("other", n_other)):
        left = n
        while left:
            k = int(min(left, rng.integers(1, 5)))
            rows += [(label, f"HAM_{lesion:07d}") for _ in range(k)]
            lesion, left = lesion + 1, left - k
    order = rng.permutation(len(rows))
    return pd.DataFrame(
        {
            "image_id": [f"ISIC_{1000 + i:07d}" for i in range(len(rows))],
            "label": [rows[j][0] for j in order],
            "lesion_id": [rows[j][1] for j in order],
        }
    )


def fake_ham10000(root, n_mel=40, n_nv=70, n_other=15, seed=0):
    rng = np.random.default_rng(seed)
    table = _lesions(n_mel, n_nv, n_other, rng)
    dx = table["label"].map({"MEL": "mel", "NV": "nv", "other": "bkl"})
    root.mkdir(parents=True)
    metadata = pd.DataFrame({"lesion_id": table["lesion_id"], "image_id": table["image_id"], "dx": dx})
    metadata.to_csv(root / "HAM10000_metadata.csv", index=False)
    for i, row in table.iterrows():
        part = "HAM10000_images_part_1" if i % 2 else "HAM10000_images_part_2"
        _image(root / part / f"{row.image_id}.jpg", row.label, rng)
    return table


def fake_isic2019(root, n_mel=30, n_nv=50, n_other=10, seed=1, with_metadata=True):
    """A fake ISIC 2019 download; the returned table's lesion_id is what its metadata file tells."""
    rng = np.random.default_rng(seed)
    table = _lesions(n_mel, n_nv, n_other, rng)
    root.mkdir(parents=True)
    onehot = pd.DataFrame({"image": table["image_id"]})
    for column in ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK"]:
        onehot[column] = 0.0
    onehot.loc[table["label"] == "MEL", "MEL"] = 1.0
    onehot.loc[table["label"] == "NV", "NV"] = 1.0
    onehot.loc[table["label"] == "other", "BCC"] = 1.0
    onehot.to_csv(root / "ISIC_2019_Training_GroundTruth.csv", index=False)
    if with_metadata:
        # As in the real file: some images have no lesion id.
        table["lesion_id"] = table["lesion_id"].where(rng.random(len(table)) < 0.8, "")
        pd.DataFrame({"image": table["image_id"], "age_approx": 50, "lesion_id": table["lesion_id"]}).to_csv(
            root / "ISIC_2019_Training_Metadata.csv", index=False
        )
    else:
        table["lesion_id"] = ""
    for _, row in table.iterrows():
        _image(root / "ISIC_2019_Training_Input" / f"{row.image_id}.jpg", row.label, rng)
    return table


def check_output(out, table, fractions=(0.71, 0.14, 0.15)):
    manifest = pd.read_csv(out / "manifest.csv", keep_default_na=False)
    assert list(manifest.columns[:4]) == ["file", "label", "split", "source"]
    expected = table[table["label"] != "other"]
    assert sorted(manifest["file"].str.split("/").str[-1].str.removesuffix(".jpg")) == sorted(
        expected["image_id"]
    )
    truth = dict(zip(table["image_id"], table["label"], strict=True))
    lesion_of = dict(zip(table["image_id"], table["lesion_id"], strict=True))
    for row in manifest.itertuples():
        image_id = row.file.split("/")[-1].removesuffix(".jpg")
        assert row.label == truth[image_id] and row.file == f"{row.split}/{row.label}/{image_id}.jpg"
        with Image.open(out / row.file) as img:
            assert img.size == (128, 128)
            r, _, b = np.asarray(img, dtype=float).mean(axis=(0, 1))
            assert (r > b) == (row.label == "MEL")  # the image of that id, not another one
    # No lesion in two splits.
    lesions = manifest.assign(lesion=[lesion_of[f.split("/")[-1][:-4]] for f in manifest["file"]])
    lesions = lesions[lesions["lesion"] != ""]
    assert (lesions.groupby("lesion")["split"].nunique() == 1).all()
    # Stratified proportions, up to one lesion (at most 4 images) per split and class.
    for label, group in manifest.groupby("label"):
        counts = group["split"].value_counts().reindex(["train", "val", "test"], fill_value=0)
        assert (abs(counts.to_numpy() - np.array(fractions) * len(group)) <= 4).all(), (label, counts)
    return manifest


@pytest.mark.skipif(sys.platform != "linux", reason="file names of any bytes are Linux's")
def test_a_source_folder_named_in_bytes_that_are_no_utf8_is_named_escaped_in_the_manifest(tmp_path):
    # Linux allows any bytes in a name (Python keeps them as "\udcff"); prepare ended in a
    # traceback after writing every image, and data=folder reads manifest.csv as UTF-8.
    table = fake_ham10000(tmp_path / "ham")
    (tmp_path / "ham" / "HAM10000_images_part_1").rename(tmp_path / "ham" / os.fsdecode(b"part_\xff"))
    cli.main(["prepare", str(tmp_path / "ham"), str(tmp_path / "out")])
    manifest = check_output(tmp_path / "out", table)  # read as UTF-8
    assert set(manifest["source"].str.split("/").str[0]) == {"part_\\xff", "HAM10000_images_part_2"}
    splits = load_splits(compose_config(["data=folder", f"data.root={tmp_path / 'out'}"]).data)
    assert sum(len(split) for _, split in splits.items()) == len(manifest)


def test_ham10000_split_by_lesion_in_the_paper_proportions(tmp_path, capsys):
    table = fake_ham10000(tmp_path / "ham")
    # The Kaggle copy of HAM10000 holds each image folder twice: duplicates are harmless.
    (tmp_path / "ham" / "ham10000_images_part_1").mkdir()
    for p in list((tmp_path / "ham" / "HAM10000_images_part_1").iterdir())[:5]:
        (tmp_path / "ham" / "ham10000_images_part_1" / p.name).write_bytes(p.read_bytes())
    cli.main(["prepare", str(tmp_path / "ham"), str(tmp_path / "out")])
    manifest = check_output(tmp_path / "out", table)
    printed = capsys.readouterr().out
    assert "HAM10000: 110 MEL/NV images" in printed
    train = manifest[manifest["split"] == "train"]
    n_train_mel, n_train_nv = int((train["label"] == "MEL").sum()), int((train["label"] == "NV").sum())
    train_line = next(line.split() for line in printed.splitlines() if line.startswith("train"))
    assert train_line == ["train", str(n_train_mel), str(n_train_nv), str(len(train))]
    # The result is exactly what data=folder reads.
    splits = load_splits(
        compose_config(["data=folder", f"data.root={tmp_path / 'out'}", "data.decode_cache=false"]).data
    )
    assert len(splits.train) + len(splits.val) + len(splits.test) == 110
    assert splits.train.class_counts()["MEL"] == n_train_mel


def test_copies_of_a_file_under_other_ids_land_in_its_split(tmp_path, capsys):
    # ISIC's archive holds some photos twice, under other image and lesion ids: split apart, a
    # model is tested on an image it trained on.
    table = fake_ham10000(tmp_path / "ham")
    metadata = pd.read_csv(tmp_path / "ham" / "HAM10000_metadata.csv")
    originals = table[table["label"] != "other"].iloc[:10]
    copies = pd.DataFrame(
        {
            "lesion_id": [f"HAM_copy_{i}" for i in range(10)],
            "image_id": [f"ISIC_9{i:06d}" for i in range(10)],
            "dx": originals["label"].str.lower().to_numpy(),
        }
    )
    for original, copy in zip(originals["image_id"], copies["image_id"], strict=True):
        [path] = (tmp_path / "ham").rglob(f"{original}.jpg")
        (path.parent / f"{copy}.jpg").write_bytes(path.read_bytes())
    pd.concat([metadata, copies]).to_csv(tmp_path / "ham" / "HAM10000_metadata.csv", index=False)
    cli.main(["prepare", str(tmp_path / "ham"), str(tmp_path / "out")])
    manifest = pd.read_csv(tmp_path / "out" / "manifest.csv", keep_default_na=False)
    split_of = dict(
        zip(manifest["file"].str.split("/").str[-1].str.removesuffix(".jpg"), manifest["split"], strict=True)
    )
    assert len(manifest) == 120
    for original, copy in zip(originals["image_id"], copies["image_id"], strict=True):
        assert split_of[original] == split_of[copy], (original, copy)
    err = capsys.readouterr().err
    assert "10 images of the download repeat another's file byte for byte under another id (first: " in err
    # Their lesions went along: no lesion in two splits.
    lesion_of = dict(zip(metadata["image_id"], metadata["lesion_id"], strict=True))
    lesions = manifest.assign(lesion=[lesion_of.get(f.split("/")[-1][:-4], "") for f in manifest["file"]])
    assert (lesions[lesions["lesion"] != ""].groupby("lesion")["split"].nunique() == 1).all()
    # What data=folder reads finds no copy across splits.
    splits = load_splits(compose_config(["data=folder", f"data.root={tmp_path / 'out'}"]).data)
    assert sum(len(split) for _, split in splits.items()) == 120


@pytest.mark.parametrize(
    "out", ["out", "out dir ü", "a,b", "it's", 'say "hi"', "back\\slash", "end\\", "a${b}"], ids=repr
)
def test_the_next_command_pastes_into_a_shell_and_names_the_output(tmp_path, capsys, out):
    # An OUT with a space was printed bare: pasted, the shell split it and Hydra refused the rest.
    fake_ham10000(tmp_path / "ham")
    cli.main(["prepare", str(tmp_path / "ham"), str(tmp_path / out)])
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("next: "))
    words = shlex.split(line.removeprefix("next: "))
    assert words[:3] == ["skinclf", "train", "data=folder"] and len(words) == 4
    override = OverridesParser.create().parse_overrides([words[3]])[0]
    root = OmegaConf.create({"root": override.value()}).root  # as the run's config resolves it
    assert (override.key_or_group, root) == ("data.root", str(tmp_path / out))


def test_isic2019_with_and_without_lesion_metadata_seeded(tmp_path):
    table = fake_isic2019(tmp_path / "isic")
    prepare_main([str(tmp_path / "isic"), str(tmp_path / "a"), "--seed", "3", "--split", "60,20,20"])
    first = check_output(tmp_path / "a", table, (0.6, 0.2, 0.2))
    prepare_main([str(tmp_path / "isic"), str(tmp_path / "b"), "--seed", "3", "--split", "60,20,20"])
    assert pd.read_csv(tmp_path / "b" / "manifest.csv", keep_default_na=False).equals(first)
    prepare_main([str(tmp_path / "isic"), str(tmp_path / "c"), "--seed", "4", "--split", "60,20,20"])
    assert not pd.read_csv(tmp_path / "c" / "manifest.csv", keep_default_na=False)["split"].equals(
        first["split"]
    )


def test_isic2019_images_missing_from_the_metadata_are_named(tmp_path, caplog):
    # An empty lesion_id is common in the real file; an image not listed at all is a damaged or
    # mismatched metadata file, whose lesions would otherwise be lost without a word.
    table = fake_isic2019(tmp_path / "isic")
    metadata = tmp_path / "isic" / "ISIC_2019_Training_Metadata.csv"
    rows = pd.read_csv(metadata, dtype=str)
    # Two MEL/NV images and one of another class, which prepare leaves out anyway: not counted.
    mel_nv = sorted(table[table["label"] != "other"]["image_id"])[:2]
    gone = [*mel_nv, table[table["label"] == "other"]["image_id"].iloc[0]]
    rows[~rows["image"].isin(gone)].to_csv(metadata, index=False)
    with caplog.at_level(logging.WARNING):
        prepare_main([str(tmp_path / "isic"), str(tmp_path / "out")])
    assert (
        f"{metadata}: 2 MEL/NV images of ISIC_2019_Training_GroundTruth.csv not listed (first: {mel_nv[0]})"
        in caplog.text
    )
    assert len(pd.read_csv(tmp_path / "out" / "manifest.csv")) == int((table["label"] != "other").sum())


def test_lesions_of_every_size_reach_every_split_in_the_proportions():
    # HAM10000-like: most lesions have one image, some up to 6. Val and test must hold lesions like
    # train's; handing out the largest lesions first gave every lesion of 3 or more images to train
    # (the split furthest behind while they came), whatever the seed.
    rng = np.random.default_rng(0)
    sizes = rng.choice([1] * 12 + [2] * 3 + [3, 4, 5, 6], size=600)
    labels = np.repeat(np.arange(600) % 2, sizes)
    groups = np.repeat([f"HAM_{i}" for i in range(600)], sizes)
    fractions = np.array([0.71, 0.14, 0.15])
    of_big_lesions = np.repeat(sizes, sizes) >= 3
    splits = {seed: assign_splits(labels, groups, fractions, seed) for seed in (0, 1)}
    for split in splits.values():
        assert (pd.Series(split).groupby(groups).nunique() == 1).all()  # no lesion in two splits
        for label in (0, 1):
            counts = np.bincount(split[labels == label], minlength=3)
            assert (abs(counts - fractions * (labels == label).sum()) <= sizes.max()).all()
        big = pd.Series(split[sizes.cumsum() - 1])[sizes >= 3]  # the split of each lesion of 3+
        assert set(big) == {0, 1, 2} and 0.2 < (big > 0).mean() < 0.4  # val + test: 29 %
    assert not np.array_equal(splits[0][of_big_lesions], splits[1][of_big_lesions])


def test_a_small_dataset_gets_each_class_into_every_split_whatever_the_seed():
    # MEL: one lesion of 10 images and two single images. Dealt out in random order, the large
    # lesion often came first, filled train's share, and left val or test without MEL.
    labels = np.array([1] * 12 + [0] * 40)
    groups = np.array(["big"] * 10 + ["one", "two"] + [f"nv{i}" for i in range(40)])
    for seed in range(30):
        split = assign_splits(labels, groups, np.array([0.71, 0.14, 0.15]), seed)
        assert set(split[labels == 1]) == {0, 1, 2} and set(split[groups == "big"]) == {0}, seed


class _FoldsMade(Exception):
    pass


@pytest.mark.parametrize("download", [fake_ham10000, fake_isic2019])
def test_cross_validation_on_a_prepared_folder_keeps_each_lesion_whole(tmp_path, monkeypatch, download):
    # The grid search's folds split the training split, where a lesion's images all are: without
    # the manifest's lesion ids, its images would land on both sides of a fold.
    download(tmp_path / "download")
    root = tmp_path / "out"
    prepare_main([str(tmp_path / "download"), str(root)])
    manifest = pd.read_csv(root / "manifest.csv", keep_default_na=False)
    lesion_of = dict(zip(manifest["file"], manifest["lesion_id"], strict=True))
    cfg = compose_config(["data=folder", f"data.root={root}", "data.decode_cache=false", "cv.folds=3"])
    train = load_splits(cfg.data).train
    relative = [f.relative_to(root).as_posix() for f in find_images(root)["train"][0]]
    # An image without a lesion id (some of ISIC 2019's) is a lesion of its own.
    assert train.lesions.tolist() == [lesion_of[name] or f"file:{name}" for name in relative]
    assert len(set(train.lesions)) < len(train)  # some lesions have several images

    def folds(labels, k, seed, lesions=None):
        assert lesions.tolist() == train.lesions.tolist()
        raise _FoldsMade

    monkeypatch.setattr(cross_validation, "stratified_folds", folds)
    with pytest.raises(_FoldsMade):
        cross_validation.cross_validate(cfg, tmp_path / "point")


def test_lesion_ids_follow_the_images_kept_and_cached(tmp_path, caplog):
    fake_ham10000(tmp_path / "download")
    root = tmp_path / "out"
    prepare_main([str(tmp_path / "download"), str(root)])
    manifest = pd.read_csv(root / "manifest.csv", keep_default_na=False)
    files = find_images(root)["train"][0]
    files[0].write_bytes(b"not an image")  # skipped: the lesion ids of the others must not shift
    lesion_of = dict(zip(manifest["file"], manifest["lesion_id"], strict=True))
    expected = [lesion_of[f.relative_to(root).as_posix()] for f in files[1:]]
    cfg = compose_config(
        [
            "data=folder",
            f"data.root={root}",
            f"data.cache_dir={tmp_path / 'cache'}",
            "data.skip_bad_images=true",
        ]
    )
    decoded, cached = load_splits(cfg.data).train, load_splits(cfg.data).train
    assert decoded.lesions.tolist() == expected and cached.lesions.tolist() == expected
    # A manifest that lists none of the images (folders renamed since prepare): said, not silent.
    manifest.assign(file="renamed/" + manifest["file"]).to_csv(root / "manifest.csv", index=False)
    with caplog.at_level(logging.WARNING):
        train = load_splits(cfg.data).train
    assert f"{root / 'manifest.csv'}: lists none of the {len(expected)} images of train/" in caplog.text
    assert len(set(train.lesions)) == len(train)


@pytest.mark.parametrize("fmt", ["jpg", "png"])
def test_output_images_keep_the_colours_predict_would_see_in_the_download(tmp_path, fmt):
    """png: the very pixels decode_image gives of the download, as predict sees them; jpg: lossy,
    but without chroma subsampling, which would halve the colour resolution of 128x128 lesions."""
    rng = np.random.default_rng(0)
    table = fake_ham10000(tmp_path / "ham", n_other=0)
    for image_id in table["image_id"]:  # fine colour detail, which subsampling would blur
        path = next((tmp_path / "ham").rglob(f"{image_id}.jpg"))
        Image.fromarray(rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)).save(path, format="PNG")
    prepare_main([str(tmp_path / "ham"), str(tmp_path / "out"), "--format", fmt])
    manifest = pd.read_csv(tmp_path / "out" / "manifest.csv")
    assert len(manifest) == 110
    for row in manifest.head(10).itertuples():
        source = next((tmp_path / "ham").rglob(row.file.split("/")[-1][:-4] + ".jpg"))
        if fmt == "png":
            assert torch.equal(decode_image(tmp_path / "out" / row.file), decode_image(source))
        else:
            with Image.open(tmp_path / "out" / row.file) as img:
                assert JpegImagePlugin.get_sampling(img) == 0  # 4:4:4


def test_balance_and_no_test_split(tmp_path, capsys):
    table = fake_isic2019(tmp_path / "isic", with_metadata=False)
    prepare_main([str(tmp_path / "isic"), str(tmp_path / "out"), "--balance", "--split", "80,20,0"])
    manifest = pd.read_csv(tmp_path / "out" / "manifest.csv")
    assert manifest["label"].value_counts().to_dict() == {"MEL": 30, "NV": 30}
    assert "ISIC 2019: 60 MEL/NV images (--balance left out 20 of the 50 NV) from " in capsys.readouterr().out
    assert set(manifest["split"]) == {"train", "val"} and not (tmp_path / "out" / "test").exists()
    assert set(manifest["file"].str.split("/").str[-1].str[:-4]) <= set(table["image_id"])


def _missing_mel_image(source):
    table = fake_ham10000(source)
    next(source.rglob(f"{table[table['label'] == 'MEL']['image_id'].iloc[0]}.jpg")).unlink()


def _missing_nv_image_balance_leaves_out(source):
    """A missing NV image that --balance (seed 0) would not draw: still a download in part."""
    table = fake_ham10000(source).sort_values("image_id", ignore_index=True)
    table = table[table["label"] != "other"].reset_index(drop=True)
    drawn = set(undersample_majority((table["label"] == "MEL").to_numpy(), 0).tolist())
    left_out = next(i for i in range(len(table)) if i not in drawn)
    next(source.rglob(f"{table['image_id'][left_out]}.jpg")).unlink()


def _mel_image_converted_to_webp(source):
    table = fake_ham10000(source)
    jpg = next(source.rglob(f"{table[table['label'] == 'MEL']['image_id'].iloc[0]}.jpg"))
    Image.open(jpg).save(jpg.with_suffix(".webp"))
    jpg.unlink()


def _relabelled_twice(source):
    """A HAM10000 metadata file that lists one NV image a second time, as MEL of another lesion."""
    table = fake_ham10000(source)
    csv = source / "HAM10000_metadata.csv"
    nv = table[table["label"] == "NV"]["image_id"].iloc[0]
    header, rest = csv.read_text().split("\n", 1)
    csv.write_text(f"{header}\nHAM_9999999,{nv},mel\n{rest}")


def _mel_listed_again_as_bkl(source):
    """A HAM10000 metadata file that lists one MEL image a second time, as a keratosis (bkl)."""
    table = fake_ham10000(source)
    mel = table[table["label"] == "MEL"].iloc[0]
    with (source / "HAM10000_metadata.csv").open("a") as csv:
        csv.write(f"{mel.lesion_id},{mel.image_id},bkl\n")


def _nv_listed_again_as_bcc(source):
    """An ISIC ground truth that lists one NV image in a second row, as a basal cell carcinoma."""
    table = fake_isic2019(source)
    csv = source / "ISIC_2019_Training_GroundTruth.csv"
    rows = pd.read_csv(csv, dtype=str)
    again = rows[rows["image"] == table[table["label"] == "NV"]["image_id"].iloc[0]].copy()
    again[["NV", "BCC"]] = ["0.0", "1.0"]
    table = pd.concat([rows, again])
    table.insert(1, "age_approx", "1")  # a number beside the diagnoses, no diagnosis itself
    table.to_csv(csv, index=False)


def _both_labels_in_isic_row(source):
    fake_isic2019(source)
    csv = source / "ISIC_2019_Training_GroundTruth.csv"
    table = pd.read_csv(csv, dtype=str)
    table.loc[3, ["MEL", "NV"]] = "1.0"
    table.to_csv(csv, index=False)


def _tab_separated_ham10000(source):
    fake_ham10000(source)
    csv = source / "HAM10000_metadata.csv"
    pd.read_csv(csv, dtype=str).to_csv(csv, index=False, sep="\t")


def _semicolon_separated_ham10000(source):
    # Excel's CSV in locales with a decimal comma.
    fake_ham10000(source)
    csv = source / "HAM10000_metadata.csv"
    pd.read_csv(csv, dtype=str).to_csv(csv, index=False, sep=";")


def _ham10000_metadata_as_tab(source):
    # The Harvard Dataverse serves HAM10000_metadata as a .tab file unless asked for the original.
    fake_ham10000(source)
    csv = source / "HAM10000_metadata.csv"
    pd.read_csv(csv, dtype=str).to_csv(source / "HAM10000_metadata.tab", index=False, sep="\t")
    csv.unlink()


def _isic_mel_cell(value):
    """The setup of an ISIC 2019 download whose fourth row has ``value`` in its MEL column."""

    def setup(source):
        fake_isic2019(source)
        csv = source / "ISIC_2019_Training_GroundTruth.csv"
        table = pd.read_csv(csv, dtype=str)
        table.loc[3, "MEL"] = value
        table.to_csv(csv, index=False)

    return setup


@pytest.mark.parametrize(
    ("setup", "args", "expected"),
    [
        (lambda s: s.mkdir(), [], "neither ISIC_2019_Training_GroundTruth.csv"),
        (lambda s: None, [], "no such folder"),
        (lambda s: s.symlink_to(s.with_name("unpacked_elsewhere")), [], "is a symlink to nothing ("),
        (_missing_mel_image, [], "not under it"),
        (_missing_nv_image_balance_leaves_out, ["--balance"], "1 of the 110 MEL/NV images listed"),
        (_missing_mel_image, ["--skip-bad-images"], "unpacked (--skip-bad-images leaves out unreadable"),
        (_mel_image_converted_to_webp, [], ".webp is there: only .jpg/.jpeg/.png files are read)"),
        (
            lambda s: (fake_ham10000(s), (s / "HAM10000_metadata.csv").write_text("image_id,dx\nx,mel\n")),
            [],
            "no column 'lesion_id'; expected columns image_id, dx, lesion_id, found image_id, dx",
        ),
        (_tab_separated_ham10000, [], "found lesion_id\timage_id\tdx (tab-separated? expected commas)"),
        (
            _semicolon_separated_ham10000,
            [],
            "found lesion_id;image_id;dx (semicolon-separated? expected commas)",
        ),
        (
            _ham10000_metadata_as_tab,
            [],
            "HAM10000_metadata.tab is there: expected it as CSV, named HAM10000_metadata.csv; expected",
        ),
        (
            lambda s: (s.parent.mkdir(exist_ok=True), s.write_bytes(b"PK\x03\x04")),
            [],
            "is a file (an archive?",
        ),
        (lambda s: fake_ham10000(s, n_mel=3, n_nv=6, n_other=0), [], "no MEL image left"),
        (lambda s: fake_ham10000(s, n_mel=0, n_nv=20, n_other=3), [], "no MEL image listed; expected"),
        (lambda s: fake_ham10000(s), ["--split", "70,30"], "--split 70,30"),
        (_relabelled_twice, [], "is listed 2 times, as MEL lesion HAM_9999999; NV lesion"),
        (_mel_listed_again_as_bkl, [], "; bkl lesion HAM_"),
        (_nv_listed_again_as_bcc, [], "; BCC lesion "),
        # The edited row is the table's fourth: line 5 of the file, after the header.
        (_isic_mel_cell("x"), [], "row 5 (ISIC_0001003), column MEL: 'x'; expected 0 or 1"),
        (_isic_mel_cell(""), [], "row 5 (ISIC_0001003), column MEL: empty; expected 0 or 1"),
        (
            _both_labels_in_isic_row,
            [],
            "row 5 (ISIC_0001003) has both MEL and NV set to 1; expected one diagnosis per image",
        ),
    ],
    ids=[
        "no-metadata",
        "no-source",
        "source-dangling-symlink",
        "missing-image",
        "missing-image-balance-would-leave-out",
        "missing-image-not-skipped",
        "image-of-another-kind",
        "missing-column",
        "tab-separated",
        "semicolon-separated",
        "dataverse-tab",
        "archive",
        "too-few",
        "no-mel",
        "bad-split",
        "conflicting-duplicate",
        "mel-also-listed-as-bkl",
        "nv-also-listed-as-bcc",
        "non-numeric-label",
        "empty-label",
        "mel-and-nv",
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, setup, args, expected):
    source, out = tmp_path / "src", tmp_path / "out"
    setup(source)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["prepare", str(source), str(out), *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("skinclf prepare: error: ") and "\n" not in err and expected in err, err
    if expected != "--split 70,30":
        assert str(source) in err
    assert not out.exists() and not list(tmp_path.glob(".out.partial*"))


def test_images_of_other_classes_listed_twice_do_not_matter(tmp_path):
    # Only MEL and NV images are prepared: a keratosis listed under two lesions is not refused,
    # nor a melanoma listed again without a diagnosis.
    source, out = tmp_path / "ham10000", tmp_path / "out"
    table = fake_ham10000(source)
    other, mel = table[table["label"] == "other"].iloc[0], table[table["label"] == "MEL"].iloc[0]
    with (source / "HAM10000_metadata.csv").open("a") as csv:
        csv.write(f"HAM_9999999,{other.image_id},bkl\n")
        csv.write(f"HAM_9999998,{mel.image_id},\n")  # a row without a diagnosis says nothing
    cli.main(["prepare", str(source), str(out)])
    check_output(out, table)


def test_an_isic_row_without_a_diagnosis_beside_a_melanomas_is_passed_over(tmp_path):
    source, out = tmp_path / "isic2019", tmp_path / "out"
    table = fake_isic2019(source)
    csv = source / "ISIC_2019_Training_GroundTruth.csv"
    rows = pd.read_csv(csv, dtype=str)
    again = rows[rows["image"] == table[table["label"] == "MEL"]["image_id"].iloc[0]].copy()
    again[["MEL"]] = "0.0"  # every diagnosis 0
    pd.concat([rows, again]).to_csv(csv, index=False)
    cli.main(["prepare", str(source), str(out)])
    check_output(out, table)


def test_an_output_folder_inside_the_download_is_refused(tmp_path, capsys):
    # The next prepare of that download would take its 128x128 copies for originals.
    source = tmp_path / "ham10000"
    fake_ham10000(source)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["prepare", str(source), str(source / "prepared")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == (
        f"skinclf prepare: error: {source / 'prepared'}: inside the download {source}; "
        "expected an output folder outside it"
    )
    assert not (source / "prepared").exists()


def test_spaces_around_the_metadata_column_names_are_ignored(tmp_path):
    source = tmp_path / "ham10000"
    table = fake_ham10000(source)
    csv = source / "HAM10000_metadata.csv"
    header, rest = csv.read_text().split("\n", 1)
    csv.write_text(" , ".join(header.split(",")) + " \n" + rest)  # "lesion_id , image_id , dx "
    cli.main(["prepare", str(source), str(tmp_path / "out")])
    assert len(pd.read_csv(tmp_path / "out" / "manifest.csv")) == (table["label"] != "other").sum()


@pytest.mark.parametrize(
    "text",
    [
        "70,20,20",  # sums to 110: a typo, not rescaled to 64/18/18
        "inf,1,1",
        "nan,1,1",
        "100,0,0",  # no validation images
        "0,50,50",
        "80,30,-10",
        "70,30",
        "a,b,c",
    ],
)
def test_a_split_that_is_not_three_percentages_summing_to_100_is_refused(text):
    with pytest.raises(SkinclfError, match=rf"^--split {text}: expected three percentages .* summing to 100"):
        parse_fractions(text)


def test_split_percentages_become_fractions():
    assert parse_fractions("71,14,15").tolist() == pytest.approx([0.71, 0.14, 0.15])
    assert parse_fractions("80,20,0").tolist() == pytest.approx([0.8, 0.2, 0.0])
    assert parse_fractions("33.3,33.3,33.4").tolist() == pytest.approx([0.333, 0.333, 0.334])


def test_existing_output_is_never_overwritten(tmp_path):
    fake_ham10000(tmp_path / "ham", n_mel=10, n_nv=10, n_other=0)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("keep me")
    with pytest.raises(SkinclfError, match="already exists"):
        prepare_main([str(tmp_path / "ham"), str(tmp_path / "out")])
    assert (tmp_path / "out" / "mine.txt").read_text() == "keep me"


def test_output_that_cannot_be_created_is_one_error_before_any_decoding(tmp_path, monkeypatch):
    fake_ham10000(tmp_path / "ham", n_mel=12, n_nv=12, n_other=0)
    monkeypatch.setattr("skinclf.prepare.decode_image", fail_if_called("decoding an image"))
    (tmp_path / "afile").write_text("a file, not a folder")
    out = tmp_path / "afile" / "out"
    with pytest.raises(SkinclfError, match=r"afile/out: cannot write the output \(Not a directory") as err:
        prepare_main([str(tmp_path / "ham"), str(out)])
    # The folder it is in, not the hidden temporary folder prepare writes into first.
    assert str(err.value).endswith(f"(Not a directory: {tmp_path / 'afile'})")


def test_a_failure_while_writing_removes_the_folders_made_for_out(tmp_path):
    table = fake_ham10000(tmp_path / "ham", n_mel=12, n_nv=12, n_other=0)
    broken = next((tmp_path / "ham").rglob(f"{table['image_id'].iloc[0]}.jpg"))
    broken.write_bytes(broken.read_bytes()[:200])  # found, but cut short: fails while writing
    (tmp_path / "data").mkdir()
    with pytest.raises(SkinclfError, match=str(broken)):
        prepare_main([str(tmp_path / "ham"), str(tmp_path / "data" / "new" / "deeper" / "out")])
    assert list((tmp_path / "data").iterdir()) == []  # new/deeper made for OUT, removed again


def test_skip_bad_images_leaves_out_unreadable_images_and_keeps_the_others_splits(tmp_path, capsys):
    table = fake_ham10000(tmp_path / "ham")
    prepare_main([str(tmp_path / "ham"), str(tmp_path / "whole")])
    whole = pd.read_csv(tmp_path / "whole" / "manifest.csv")
    bad_ids = [
        table[table["label"] == label]["image_id"].iloc[i] for label, i in (("MEL", 0), ("NV", 0), ("MEL", 1))
    ]
    bad = [next((tmp_path / "ham").rglob(f"{image_id}.jpg")) for image_id in bad_ids]
    bad[0].write_bytes(bad[0].read_bytes()[:200])  # cut short
    bad[1].write_bytes(b"")
    bad[2].unlink()
    bad[2].symlink_to(tmp_path / "gone.jpg")  # a link to nothing
    with pytest.raises(SkinclfError) as err:  # without the option: the first named, with the way out
        prepare_main([str(tmp_path / "ham"), str(tmp_path / "out")])
    assert str(err.value).endswith("(--skip-bad-images leaves such files out)")
    assert not (tmp_path / "out").exists()
    capsys.readouterr()

    prepare_main([str(tmp_path / "ham"), str(tmp_path / "out"), "--skip-bad-images"])
    captured = capsys.readouterr()
    assert [line.split(": ")[1] for line in captured.err.splitlines() if line.startswith("skipped: ")] == [
        str(path) for path in sorted(bad, key=lambda path: path.stem)
    ]
    assert "HAM10000: 107 MEL/NV images" in captured.out and "3 unreadable left out" in captured.out
    manifest = pd.read_csv(tmp_path / "out" / "manifest.csv")
    expected = whole[~whole["file"].str.contains("|".join(bad_ids))].reset_index(drop=True)
    pd.testing.assert_frame_equal(manifest, expected)  # the other images' splits as they were
    files = sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*.jpg"))
    assert files == sorted(manifest["file"])


def test_skipping_every_mel_image_of_a_split_is_an_error_that_writes_nothing(tmp_path):
    fake_ham10000(tmp_path / "ham")
    prepare_main([str(tmp_path / "ham"), str(tmp_path / "whole")])
    whole = pd.read_csv(tmp_path / "whole" / "manifest.csv")
    for source in whole[(whole["split"] == "val") & (whole["label"] == "MEL")]["source"]:
        (tmp_path / "ham" / source).write_bytes(b"")
    with pytest.raises(SkinclfError, match="no MEL image left for the val split .* after leaving out"):
        prepare_main([str(tmp_path / "ham"), str(tmp_path / "out"), "--skip-bad-images"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ham", "whole"]


def test_balance_with_skipped_images_leaves_out_as_many_of_the_other_class_per_split(tmp_path, capsys):
    fake_ham10000(tmp_path / "ham")
    prepare_main([str(tmp_path / "ham"), str(tmp_path / "whole"), "--balance"])
    whole = pd.read_csv(tmp_path / "whole" / "manifest.csv")
    bad = pd.concat(
        [
            whole[(whole["split"] == "train") & (whole["label"] == "MEL")].head(2),
            whole[(whole["split"] == "val") & (whole["label"] == "NV")].head(1),
        ]
    )
    for source in bad["source"]:
        (tmp_path / "ham" / source).write_bytes(b"")
    capsys.readouterr()
    prepare_main([str(tmp_path / "ham"), str(tmp_path / "out"), "--balance", "--skip-bad-images"])
    assert "--balance: 3 images of the other class left out too" in capsys.readouterr().err
    manifest = pd.read_csv(tmp_path / "out" / "manifest.csv")

    def mel_minus_nv(table):
        return table.groupby("split")["label"].agg(
            lambda labels: (labels == "MEL").sum() - (labels == "NV").sum()
        )

    pd.testing.assert_series_equal(mel_minus_nv(manifest), mel_minus_nv(whole))  # balanced as before
    assert len(manifest) == len(whole) - 6 and set(manifest["file"]) < set(whole["file"])
    files = sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*.jpg"))
    assert files == sorted(manifest["file"])


def test_a_split_emptied_by_balancing_after_a_skip_says_so(tmp_path):
    # Every val NV image unreadable: --balance then leaves out val's MEL images too, which were
    # readable; the error must not blame them on unreadable files alone.
    fake_ham10000(tmp_path / "ham")
    prepare_main([str(tmp_path / "ham"), str(tmp_path / "whole"), "--balance"])
    whole = pd.read_csv(tmp_path / "whole" / "manifest.csv")
    val = whole[whole["split"] == "val"]
    assert (val["label"] == "MEL").sum() <= (val["label"] == "NV").sum()  # balancing can empty MEL
    for source in val[val["label"] == "NV"]["source"]:
        (tmp_path / "ham" / source).write_bytes(b"")
    with pytest.raises(SkinclfError, match=r"no MEL image left for the val split \(.* to keep --balance\)"):
        prepare_main([str(tmp_path / "ham"), str(tmp_path / "out"), "--balance", "--skip-bad-images"])


def test_images_in_a_symlinked_folder_of_the_download_are_found(tmp_path):
    table = fake_ham10000(tmp_path / "ham", n_mel=12, n_nv=12, n_other=0)
    part = tmp_path / "ham" / "HAM10000_images_part_2"
    part.rename(tmp_path / "elsewhere")
    part.symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    prepare_main([str(tmp_path / "ham"), str(tmp_path / "out")])
    manifest = pd.read_csv(tmp_path / "out" / "manifest.csv")
    assert len(manifest) == len(table) == len(list((tmp_path / "out").rglob("*.jpg")))
    assert manifest["source"].str.startswith("HAM10000_images_part_2/").sum() == len(table) // 2


def test_output_dot_is_the_empty_current_folder(tmp_path, monkeypatch):
    table = fake_ham10000(tmp_path / "ham", n_mel=12, n_nv=12, n_other=0)
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    before = os.stat(".").st_ino
    prepare_main([str(tmp_path / "ham"), "."])
    assert os.stat(".").st_ino == before  # filled, not replaced: the shell's folder stays valid
    manifest = pd.read_csv("manifest.csv")
    assert len(manifest) == len(table)
    assert not list(tmp_path.glob(".here.partial*"))


def test_negative_seed_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        prepare_main([str(tmp_path), str(tmp_path / "out"), "--seed", "-1"])
    assert exit_info.value.code == 2
    assert "--seed: '-1': expected a non-negative integer" in capsys.readouterr().err


def test_an_empty_out_that_a_failure_interrupts_while_filling_it_is_left_empty(tmp_path, monkeypatch):
    fake_ham10000(tmp_path / "ham", n_mel=12, n_nv=12, n_other=0)
    (tmp_path / "out").mkdir()
    real_replace, calls = os.replace, []

    def replace_then_fail(source, target):  # the disk fills up after the first folder moved in
        calls.append(target)
        if len(calls) == 2:
            raise OSError(28, "No space left on device", str(target))
        real_replace(source, target)

    monkeypatch.setattr("skinclf.prepare.os.replace", replace_then_fail)
    with pytest.raises(SkinclfError, match="No space left on device"):
        prepare_main([str(tmp_path / "ham"), str(tmp_path / "out")])
    assert list((tmp_path / "out").iterdir()) == []  # not a train/ without its manifest.csv
    assert calls[-1].name != "manifest.csv"  # which goes in last
