"""data=synthetic: generated once per data seed, cached, and regenerated when the cache is damaged."""

from __future__ import annotations

import logging

import torch

from skinclf.config import compose_config
from skinclf.data import load_splits

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
