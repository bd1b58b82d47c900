"""data=synthetic: generated once per data seed, cached, and regenerated when the cache is damaged."""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import time

import torch

from skinclf.config import compose_config
from skinclf.data import load_splits
from skinclf.data.synthetic import GENERATOR_VERSION, generate_split
from skinclf.io import STALE_TEMPORARY_S

TINY = ["data.train_size=4", "data.val_size=2", "data.test_size=2"]


def synthetic(cache_dir, *extra):
    return load_splits(compose_config(["data=synthetic", f"data.cache_dir={cache_dir}", *TINY, *extra]).data)


def test_images_follow_data_seed_not_the_training_seed(tmp_path):
    first = synthetic(tmp_path).train.images
    assert torch.equal(synthetic(tmp_path / "other", "seed=3").train.images, first)
    assert not torch.equal(synthetic(tmp_path, "data.seed=1").train.images, first)


def test_damaged_cache_is_generated_again(tmp_path, caplog):
    first = synthetic(tmp_path).train.images
    (cache,) = tmp_path.glob("synthetic_*.pt")
    cache.write_bytes(cache.read_bytes()[:1000])
    with caplog.at_level(logging.WARNING):
        again = synthetic(tmp_path).train.images
    assert f"ignoring unreadable cache {cache}" in caplog.text
    assert torch.equal(again, first)
    caplog.clear()
    synthetic(tmp_path)  # the rewritten cache loads without a warning
    assert "unreadable" not in caplog.text


def test_a_cache_that_cannot_be_written_is_a_warning_and_the_run_gets_its_data(tmp_path, monkeypatch, caplog):
    # It stopped the run, though the images were made and only their reuse was lost (the decode
    # cache of folder data already trained on); a read-only shared cache_dir stopped every run.
    from skinclf import io

    def full(obj, path):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(io, "atomic_torch_save", full)  # the cache save goes through skinclf.io
    with caplog.at_level(logging.WARNING):
        splits = synthetic(tmp_path)
    assert len(splits.train) == 4 and not list(tmp_path.glob("synthetic_*.pt"))
    assert "the synthetic data cache " in caplog.text and ": could not be written (" in caplog.text
    assert "; the next run generates it again" in caplog.text
    monkeypatch.undo()
    assert torch.equal(synthetic(tmp_path).train.images, splits.train.images)  # the same images


def test_a_look_at_the_cache_removes_what_a_killed_process_left_there_over_a_day_ago(tmp_path):
    # A process killed outright while it wrote a cache leaves its temporary file; another run may
    # be writing one now, so only those over a day old go; on a cache hit too.
    synthetic(tmp_path)  # generates, and caches, the images
    stale, fresh = tmp_path / ".synthetic_0123.pt.abcd1234.tmp", tmp_path / ".synthetic_4567.pt.efgh5678.tmp"
    others = [
        tmp_path / name
        for name in (".notes.abcd1234.tmp", ".my.pt.notes.abcd1234.tmp", ".best.pt.abcd1234.tmp")
    ]
    for path in (stale, fresh, *others):
        path.write_bytes(b"half a cache")
    day_and_a_bit = time.time() - STALE_TEMPORARY_S - 60
    for path in (stale, *others):
        os.utime(path, (day_and_a_bit, day_and_a_bit))
    synthetic(tmp_path)  # a cache hit
    assert not stale.exists() and fresh.exists() and all(path.exists() for path in others)


def test_the_images_of_a_generator_version_never_change():
    # Users' caches are keyed by GENERATOR_VERSION: a change to the drawing that alters the
    # images must bump it (and this digest), or old caches would pass for new images.
    split = generate_split(seed=0, split_index=0, n=6)
    digest = hashlib.sha256(split.images.contiguous().numpy().tobytes()).hexdigest()
    assert (GENERATOR_VERSION, digest) == (
        2,
        "ae786ee42062a3ea88cc5000ba54f80a9cb39ba759536b728a6820748073e1af",
    )
    assert split.labels.tolist() == [0.0, 1.0, 1.0, 0.0, 0.0, 1.0]


def test_painting_on_several_threads_gives_the_same_images():
    # 70 images: more than one chunk of drawn-ahead images.
    one = generate_split(seed=3, split_index=1, n=70, workers=1)
    three = generate_split(seed=3, split_index=1, n=70, workers=3)
    assert torch.equal(one.images, three.images)
    assert torch.equal(one.labels, three.labels)
    assert one.images.float().std() > 10  # real images, not an untouched buffer


def test_a_cache_dir_under_home_is_expanded_as_for_every_other_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    synthetic("'~/cache'")  # quoted, as Hydra's grammar wants a ~
    assert list((tmp_path / "home" / "cache").glob("synthetic_*.pt"))
    assert not (tmp_path / "~").exists()  # not a folder literally named ~
