"""The cross-validated grid search: stratified disjoint folds, the training split only, ranking."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from skinclf import train
from skinclf.config import compose_config
from skinclf.errors import SkinclfError
from skinclf.io import python_strings
from skinclf.run_files import CV_RESULT, FOLD_RESULT, FOLDS_RECORD, GRID_CSV, GRID_MD
from skinclf.sweep import cross_validation
from skinclf.sweep.cross_validation import cross_validate, stratified_folds
from skinclf.sweep.grid import format_grid, rank_grid, write_grid
from skinclf.training import loop
from skinclf.training.environment import source_digest

from conftest import train_cli


def test_folds_are_stratified_disjoint_and_cover_the_training_split() -> None:
    labels = np.array([1] * 30 + [0] * 50)
    np.random.default_rng(0).shuffle(labels)
    folds = stratified_folds(labels, k=5, seed=3)
    assert len(folds) == 5
    val_sets = [set(va.tolist()) for _, va in folds]
    for i, (tr, va) in enumerate(folds):
        assert set(tr.tolist()).isdisjoint(va.tolist())
        assert len(tr) + len(va) == len(labels)
        # Stratified: each validation fold has the split's 30:50 MEL:NV ratio (6 MEL, 10 NV).
        assert int(labels[va].sum()) == 6 and len(va) == 16
        for j in range(i):
            assert val_sets[i].isdisjoint(val_sets[j])
    assert set().union(*val_sets) == set(range(len(labels)))


def test_folds_are_deterministic_from_the_seed() -> None:
    labels = np.array([0, 1] * 20)
    same = [va.tolist() for _, va in stratified_folds(labels, 4, seed=7)]
    again = [va.tolist() for _, va in stratified_folds(labels, 4, seed=7)]
    other = [va.tolist() for _, va in stratified_folds(labels, 4, seed=8)]
    assert same == again
    assert same != other


@pytest.mark.parametrize("k", [1, 6])
def test_impossible_fold_counts_are_refused(k: int) -> None:
    labels = np.array([1] * 5 + [0] * 9)  # the smaller class has 5 images: 2 <= k <= 5
    with pytest.raises(SkinclfError, match=f"cv.folds={k}"):
        stratified_folds(labels, k, seed=0)


def test_folds_keep_each_lesion_whole() -> None:
    # 60 lesions of 1 to 4 images; a lesion's images must never be split between a fold's
    # training and validation parts.
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 5, size=60)
    lesions = np.repeat([f"HAM_{i}" for i in range(60)], sizes).astype(object)
    labels = np.repeat(np.arange(60) % 3 == 0, sizes).astype(int)
    folds = stratified_folds(labels, k=4, seed=3, lesions=lesions)
    assert [va.tolist() for _, va in folds] == [
        va.tolist() for _, va in stratified_folds(labels, 4, 3, lesions)
    ]
    fold_of = {}
    for i, (tr, va) in enumerate(folds):
        assert set(lesions[tr]).isdisjoint(lesions[va])
        assert 0 < labels[va].sum() < len(va)  # both classes in every validation fold
        fold_of.update(dict.fromkeys(va.tolist(), i))
    assert sorted(fold_of) == list(range(len(labels)))  # every image validated once
    # Without the lesions, images of one lesion land in different folds.
    plain = stratified_folds(labels, k=4, seed=3)
    fold_of_plain = {j: i for i, (_, va) in enumerate(plain) for j in va.tolist()}
    assert any(
        len({fold_of_plain[j] for j in np.flatnonzero(lesions == lesion)}) > 1 for lesion in set(lesions)
    )
    # The fold count is bounded by the smaller class's lesions, not its images.
    n_mel_lesions = len(set(lesions[labels == 1]))
    with pytest.raises(SkinclfError, match=f"has {n_mel_lesions} lesions"):
        stratified_folds(labels, n_mel_lesions + 1, seed=0, lesions=lesions)


def test_a_grouped_fold_without_a_class_is_refused(monkeypatch) -> None:
    # StratifiedGroupKFold spreads lesions greedily: with lesions of mixed labels a fold can get
    # no MEL, and its accuracy would then say nothing about melanoma.
    import sklearn.model_selection

    class AllMelInFoldZero:
        def __init__(self, **kwargs):
            pass

        def split(self, x, labels, groups):
            mel = np.flatnonzero(labels == 1)
            nv = np.flatnonzero(labels == 0)
            yield nv[1:], np.concatenate([mel, nv[:1]])
            yield np.concatenate([mel, nv[:1]]), nv[1:]

    monkeypatch.setattr(sklearn.model_selection, "StratifiedGroupKFold", AllMelInFoldZero)
    labels = np.array([1, 1, 0, 0, 0, 0])
    lesions = np.array(["a", "b", "c", "d", "e", "f"], dtype=object)
    with pytest.raises(SkinclfError, match="cv.folds=2: fold 1 gets no MEL image .* expected fewer folds"):
        stratified_folds(labels, 2, seed=0, lesions=lesions)


def test_a_grid_point_resumes_only_on_the_folds_it_began_with(tmp_path: Path) -> None:
    folds = stratified_folds(np.array([0, 1] * 10), 2, seed=0)
    point = tmp_path / "point"
    (point / "fold_0").mkdir(parents=True)
    cross_validation._check_same_folds(point, folds, grouped=True)  # the first start records them
    (point / "fold_0" / FOLD_RESULT).write_text('{"best_val_acc": 0.9}')
    cross_validation._check_same_folds(point, folds, grouped=True)  # the same folds: resumes
    other = stratified_folds(np.array([0, 1] * 10), 2, seed=1)  # e.g. the manifest changed
    with pytest.raises(SkinclfError, match=f"{point}: its folds were drawn from other images"):
        cross_validation._check_same_folds(point, other, grouped=True)
    # Begun by a skinclf that kept no record: accepted where folds were never grouped by lesion
    # (they were drawn as now), refused where they now are.
    (point / FOLDS_RECORD).unlink()
    with pytest.raises(SkinclfError, match="began before skinclf kept each lesion's images in one fold"):
        cross_validation._check_same_folds(point, folds, grouped=True)
    cross_validation._check_same_folds(point, folds, grouped=False)
    assert (point / FOLDS_RECORD).is_file()


class _NeverRead:
    """Stands in for the test split: any use of it fails the test."""

    def __getattr__(self, name: str):
        raise AssertionError(f"the grid search read the test split ({name})")

    def __len__(self) -> int:
        raise AssertionError("the grid search read the test split (len)")


def test_cross_validation_trains_on_training_folds_only(
    tmp_path: Path, shared_data_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    real_load = cross_validation.load_splits
    loaded = {}

    def load_without_test(data_cfg):
        splits = real_load(data_cfg)
        loaded["train"] = splits.train
        splits.test = _NeverRead()
        return splits

    real_fit = cross_validation.fit
    calls = []

    def spy_fit(model, pipeline, train, val, *args, **kwargs):
        calls.append((train, val))
        return real_fit(model, pipeline, train, val, *args, **kwargs)

    monkeypatch.setattr(cross_validation, "load_splits", load_without_test)
    monkeypatch.setattr(cross_validation, "fit", spy_fit)
    cfg = compose_config(
        [
            f"data.cache_dir={shared_data_dir}",
            "data.train_size=24",
            "data.val_size=8",
            "data.test_size=8",
            "trainer.max_epochs=1",
            "trainer.progress=never",
            "data.batch_size=8",
            "cv.folds=3",
        ]
    )
    out = tmp_path / "point"
    with caplog.at_level(logging.INFO):
        result = cross_validate(cfg, out)
    # Its first lines say what it trains in which precision and layout, on what, as a run's do.
    messages = [record.getMessage() for record in caplog.records]
    assert any(m.startswith("model=baseline data=synthetic") and "channels_last=" in m for m in messages)
    assert any(m.startswith("skinclf ") and ", torch " in m for m in messages)

    train = loaded["train"]
    rows = {bytes(img.numpy().tobytes()): i for i, img in enumerate(train.images)}
    assert len(calls) == 3
    seen_val: list[int] = []
    for fold_train, fold_val in calls:
        # Every image a fold trains or validates on is a training-split image ...
        tr = [rows[bytes(img.numpy().tobytes())] for img in fold_train.images]
        va = [rows[bytes(img.numpy().tobytes())] for img in fold_val.images]
        assert set(tr).isdisjoint(va) and len(tr) + len(va) == len(train)
        # ... with the split's class balance.
        assert fold_val.labels.sum().item() == len(fold_val) / 2
        seen_val += va
    assert sorted(seen_val) == list(range(len(train)))

    fold_accs = [json.loads((out / f"fold_{i}" / FOLD_RESULT).read_text())["best_val_acc"] for i in range(3)]
    assert result == json.loads((out / CV_RESULT).read_text())
    assert result["fold_val_acc"] == fold_accs
    assert result["mean_val_acc"] == pytest.approx(np.mean(fold_accs))
    assert result["std_val_acc"] == pytest.approx(np.std(fold_accs))
    assert not list(out.glob("fold_*/*.pt")), "fold checkpoints are dropped once the fold is done"
    # What produced the numbers, recorded as a run's test_metrics.json records it.
    assert result["environment"]["source"] == source_digest() and "precision" in result["environment"]
    for fold_result in sorted(out.glob(f"fold_*/{FOLD_RESULT}")):
        assert json.loads(fold_result.read_text())["environment"] == result["environment"]
    assert (out / "fold_0" / "metrics.csv").exists()

    # A resumed grid point reuses its finished folds instead of training them again.
    calls.clear()
    cfg.resume = True
    assert cross_validate(cfg, out) == result
    assert calls == []
    # ... and says so where a fold it reuses trained in another environment than this launch's.
    fold_1 = out / "fold_1" / FOLD_RESULT
    elsewhere = {**result["environment"], "machine": "a CPU, 1 thread"}
    fold_1.write_text(json.dumps({**json.loads(fold_1.read_text()), "environment": elsewhere}))
    with caplog.at_level(logging.WARNING):
        mixed = cross_validate(cfg, out)
    assert "fold 1 trained in another environment than this launch's" in caplog.text
    here = result["environment"]
    assert mixed == {**result, "fold_environments": [here, elsewhere, here]}
    # A fold an older skinclf finished, which recorded none, counts as of an unknown environment.
    fold_2 = out / "fold_2" / FOLD_RESULT
    recorded = json.loads(fold_2.read_text())
    fold_2.write_text(json.dumps({key: value for key, value in recorded.items() if key != "environment"}))
    assert cross_validate(cfg, out)["fold_environments"] == [here, elsewhere, {"unknown": True}]
    assert "folds 1, 2 trained in another environment" in caplog.text
    # Every fold in one environment, an earlier launch's: the mean mixes nothing, which is said.
    for fold_result in out.glob(f"fold_*/{FOLD_RESULT}"):
        fold_result.write_text(json.dumps({**json.loads(fold_result.read_text()), "environment": elsewhere}))
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert cross_validate(cfg, out)["fold_environments"] == [elsewhere] * 3
    assert "every fold trained in an earlier launch's environment" in caplog.text
    assert not [record for record in caplog.records if record.levelno >= logging.WARNING]


def test_a_resumed_grid_point_keeps_the_precision_auto_picked_when_it_began(
    tmp_path: Path, shared_data_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # trainer.precision=auto picks fp32 where the job began and bf16 where it resumes (scripted).
    real_resolve, real_write_metrics = train.resolve_precision, loop._write_metrics

    def auto_picks(precision: str) -> None:
        monkeypatch.setattr(
            train,
            "resolve_precision",
            lambda name, device: precision if name == "auto" else real_resolve(name, device),
        )

    cfg = compose_config(
        [
            f"data.cache_dir={shared_data_dir}",
            "data.train_size=24",
            "data.val_size=8",
            "data.test_size=8",
            "trainer.max_epochs=2",
            "trainer.progress=never",
            "data.batch_size=8",
            "cv.folds=2",
            "trainer.precision=auto",
        ]
    )
    auto_picks("fp32")
    straight = cross_validate(cfg, tmp_path / "straight")
    writes = []

    def crash_in_the_second_fold(path, history):
        real_write_metrics(path, history)
        writes.append(path)
        if len(writes) == 3:  # fold 0's two epochs, then fold 1's first
            raise KeyboardInterrupt

    monkeypatch.setattr(loop, "_write_metrics", crash_in_the_second_fold)
    with pytest.raises(KeyboardInterrupt):
        cross_validate(cfg, tmp_path / "interrupted")
    monkeypatch.setattr(loop, "_write_metrics", real_write_metrics)

    auto_picks("bf16")
    cfg.resume = True
    with caplog.at_level(logging.WARNING, logger="skinclf"):
        assert cross_validate(cfg, tmp_path / "interrupted") == straight
    assert f"fold_0/{FOLD_RESULT} was trained in fp32: the resume goes on in fp32" in caplog.text
    # Fold 1's losses: epochs redone in bf16 would differ.
    metrics = [
        pd.read_csv(tmp_path / name / "fold_1" / "metrics.csv").drop(columns="seconds")
        for name in ("straight", "interrupted")
    ]
    pd.testing.assert_frame_equal(*metrics)


def _fake_point(sweep: Path, name: str, overrides: list[str], accs: list[float], bs: int, lr: float) -> None:
    job = sweep / name
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    result = {
        "folds": len(accs),
        "fold_val_acc": accs,
        "mean_val_acc": float(np.mean(accs)),
        "std_val_acc": float(np.std(accs)),
        "model": "baseline",
        "batch_size": bs,
        "lr": lr,
        "seed": 0,
        "n_train": 100,
        "environment": {"source": "0123456789ab", "machine": "a CPU, 2 threads", "channels_last": True},
        "fold_environments": [{"unknown": True}] * len(accs),
    }
    (job / CV_RESULT).write_text(json.dumps(result))


def test_grid_summary_ranks_points_by_mean_then_std(tmp_path: Path) -> None:
    shared = ["cv.folds=3", "data.train_size=64"]
    _fake_point(tmp_path, "0_baseline_bs32", ["data.batch_size=32", *shared], [0.6, 0.7, 0.8], 32, 1e-4)
    _fake_point(tmp_path, "1_baseline_bs64", ["data.batch_size=64", *shared], [0.8, 0.8, 0.8], 64, 1e-4)
    _fake_point(tmp_path, "2_baseline_bs128", ["data.batch_size=128", *shared], [0.7, 0.8, 0.9], 128, 1e-4)
    table = rank_grid(tmp_path)
    # 64 and 128 tie on the mean (0.8); 64 varies less across folds and wins.
    assert table["batch_size"].tolist() == [64, 128, 32]
    assert table["rank"].tolist() == [1, 2, 3]
    assert table["point"].tolist() == ["data.batch_size=64", "data.batch_size=128", "data.batch_size=32"]
    text = format_grid(table)
    assert "Best point: data.batch_size=64: validation accuracy 80.00" in text
    assert "Train it: `skinclf train data.batch_size=64 data.train_size=64`" in text  # not cv.folds
    assert "| 1 | 64 | 0.0001 | data.batch_size=64 | 80.00 ± 0.00 % | 3 |" in text

    write_grid(tmp_path)
    assert (tmp_path / GRID_MD).read_text().count("\n| ") == 4  # separator + 3 points
    grid = pd.read_csv(tmp_path / GRID_CSV)
    # Each point's own record keeps its environments.
    assert len(grid) == 3 and "environment" not in grid and "fold_environments" not in grid


@pytest.mark.skipif(sys.platform != "linux", reason="file names of any bytes are Linux's")
def test_a_path_that_is_no_utf8_keeps_its_bytes_in_the_csv_and_shows_escaped_in_text(tmp_path: Path) -> None:
    # A data folder so named (Linux allows any bytes; Python keeps them as "\udcff"): the summary
    # was lost (pandas' pyarrow strings, then the CSV writer, refused the name; Hydra only warns).
    not_utf8 = os.fsdecode(b"\xff")
    root = f"data.root=/data/ds_{not_utf8}"
    _fake_point(tmp_path, "0_baseline_bs32", ["data.batch_size=32", root], [0.6, 0.7], 32, 1e-4)
    _fake_point(tmp_path, "1_baseline_bs64", ["data.batch_size=64", root], [0.8, 0.8], 64, 1e-4)
    write_grid(tmp_path)
    with python_strings():
        table = pd.read_csv(tmp_path / GRID_CSV, encoding_errors="surrogateescape")
    assert table["train_command"][0] == f"skinclf train data.batch_size=64 '{root}'"
    assert "Train it: `skinclf train data.batch_size=64 'data.root=/data/ds_\\xff'`" in (
        (tmp_path / GRID_MD).read_text(encoding="utf-8")
    )


def test_the_best_point_comes_with_the_command_that_trains_it(tmp_path: Path) -> None:
    # The line named the batch size and lr alone (a copy trained baseline on the default data),
    # or repeated the point in parentheses; a single point's column listed hparams_search=grid.
    shared = [
        "hparams_search=grid",
        "model=resnet",
        "data=folder",
        "data.root=/data/my lesions",
        "cv.folds=3",
    ]
    for name, bs, accs in (("0_resnet_bs32", 32, [0.6, 0.7, 0.8]), ("1_resnet_bs64", 64, [0.8] * 3)):
        _fake_point(
            tmp_path / "a", name, [*shared, f"data.batch_size={bs}", "optim.lr=0.001"], accs, bs, 1e-3
        )
    table = rank_grid(tmp_path / "a")
    assert table["point"].tolist() == ["data.batch_size=64", "data.batch_size=32"]
    text = format_grid(table)
    assert "Best point: data.batch_size=64: validation accuracy 80.00 ± 0.00 % over 3 folds" in text
    train = (
        "skinclf train model=resnet data=folder 'data.root=/data/my lesions' "
        "data.batch_size=64 optim.lr=0.001"
    )
    assert f"Train it: `{train}`" in text
    assert table["train_command"].tolist()[0] == train
    # One point: nothing tells it from others, and hparams_search=grid is no part of it.
    _fake_point(tmp_path / "b", "0_resnet", ["hparams_search=grid", "model=resnet"], [0.8] * 3, 64, 1e-4)
    assert rank_grid(tmp_path / "b")["point"].tolist() == ["model=resnet"]


@pytest.mark.parametrize(
    ("damage", "file"),
    [
        ('{"folds": 3, "mean_val', CV_RESULT),  # torn
        ('{"folds": 3, "mean_val_acc": 0.8, "std_val_acc": 0, "batch_size": 64, "lr": 1e-4}', CV_RESULT),
        ("- [broken", ".hydra/overrides.yaml"),  # its command would have been a bare `skinclf train`
        ("hydra: [torn", ".hydra/hydra.yaml"),  # its command would have lost hydra.searchpath
    ],
    ids=["torn-result", "no-fold-accuracies", "torn-overrides", "torn-hydra-record"],
)
def test_a_damaged_grid_record_leaves_its_point_out_not_the_ranking(
    tmp_path: Path, caplog, damage, file
) -> None:
    # A torn or hand-edited record ended the sweep's summary (Hydra only warns of a callback's
    # error: no summary, exit 0); a failed record's overrides of another type, in a TypeError.
    _fake_point(tmp_path, "0_baseline_bs32", ["data.batch_size=32"], [0.6, 0.7, 0.8], 32, 1e-4)
    _fake_point(tmp_path, "1_baseline_bs64", ["data.batch_size=64"], [0.8] * 3, 64, 1e-4)
    (tmp_path / "1_baseline_bs64" / file).write_text(damage)
    failed = [
        {"dir": str(tmp_path / "2_x"), "overrides": 5},
        {"dir": str(tmp_path / "3_x"), "overrides": [["a"]]},
    ]
    write_grid(tmp_path, failed)
    assert pd.read_csv(tmp_path / GRID_CSV)["dir"].tolist() == ["0_baseline_bs32"]
    assert "Not ranked: 2 of the 4 points failed" in (tmp_path / GRID_MD).read_text()  # 1 ran, 1 left out
    assert (
        f"{tmp_path / '1_baseline_bs64'}: a record of its run (cv_result.json, .hydra/) cannot be read"
        in caplog.text
    )
    assert (
        "Left out: 1_baseline_bs64 (a record of its run, cv_result.json or .hydra/, cannot be read)."
        in (tmp_path / GRID_MD).read_text()
    )


def test_the_train_command_keeps_the_users_config_folders_and_drops_what_made_it_a_grid_job(tmp_path: Path):
    # A model of the user's own came from hydra.searchpath (or --config-dir), which overrides.yaml
    # does not hold: the pasted command failed with "unknown model". resume=true, cv={folds:2} and
    # ~cv would have resumed nothing or cross-validated again.
    overrides = [
        "model=wide_cnn",
        "data.batch_size=32",
        "optim.lr=0.001",
        "resume=true",
        "cv={folds:2}",
        "~cv",
    ]
    _fake_point(tmp_path, "0_wide_cnn", ["hparams_search=grid", *overrides], [0.8] * 3, 32, 1e-3)
    hydra = {
        "hydra": {
            "overrides": {"hydra": ["hydra.sweep.dir=/x", "hydra.searchpath=[file:///home/me/my conf]"]},
            "runtime": {"config_sources": [{"path": "file:///home/me/cd", "provider": "command-line"}]},
        }
    }
    (tmp_path / "0_wide_cnn" / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump(hydra))
    assert rank_grid(tmp_path)["train_command"].tolist() == [
        "skinclf train 'hydra.searchpath=[file:///home/me/my conf]' --config-dir=/home/me/cd "
        "model=wide_cnn data.batch_size=32 optim.lr=0.001"
    ]


def test_a_grid_with_failed_points_says_so_beside_its_best(tmp_path: Path) -> None:
    # The best of the points that ran is no best of the grid: a failed point may have been better.
    shared = ["cv.folds=3", "optim.lr=1e-4"]
    _fake_point(tmp_path, "0_baseline_bs32", ["data.batch_size=32", *shared], [0.6, 0.7, 0.8], 32, 1e-4)
    failed = [{"dir": str(tmp_path / "1_baseline_bs0"), "overrides": ["data.batch_size=0", *shared]}]
    write_grid(tmp_path, failed)
    text = (tmp_path / GRID_MD).read_text()
    assert "| 1 | 32 | 0.0001 | data.batch_size=32 | 70.00 ± 8.16 % | 3 |" in text  # the point, alone
    assert "Not ranked: 1 of the 2 points failed (1_baseline_bs0; the sweep's summary says why)" in text
    # A point that failed now but holds an earlier launch's result is ranked by it, not counted twice.
    _fake_point(tmp_path, "1_baseline_bs0", ["data.batch_size=0", *shared], [0.5, 0.5, 0.5], 0, 1e-4)
    write_grid(tmp_path, failed)
    text = (tmp_path / GRID_MD).read_text()
    assert "Not ranked" not in text
    assert "From an earlier launch: 1_baseline_bs0 failed in this one (the sweep's summary says why)" in text


@pytest.mark.slow
def test_grid_search_sweep_end_to_end(tmp_path: Path, shared_data_dir: Path) -> None:
    proc = train_cli(
        "-m",
        "hparams_search=grid",
        "data.batch_size=8,16",
        "optim.lr=1e-3,1e-4",
        "cv.folds=2",
        "data.train_size=24",
        "data.val_size=8",
        "data.test_size=8",
        "trainer.max_epochs=1",
        f"data.cache_dir={shared_data_dir}",
        f"hydra.sweep.dir={tmp_path / 'grid'}",
        cwd=tmp_path,
    )
    sweep = tmp_path / "grid"
    assert "4 jobs: 4 done" in proc.stdout
    assert "Best point: data.batch_size=" in proc.stdout
    table = rank_grid(sweep)
    assert len(table) == 4
    assert sorted(zip(table["batch_size"], table["lr"], strict=True)) == [
        (8, 1e-4),
        (8, 1e-3),
        (16, 1e-4),
        (16, 1e-3),
    ]
    means = table["mean_val_acc"].tolist()
    assert means == sorted(means, reverse=True)
    # The grid search never tests: no test metrics anywhere in the sweep.
    assert not list(sweep.rglob("test_metrics.json"))
