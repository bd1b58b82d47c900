"""`skinclf report`: run folders with known metrics -> Table 1, confusion matrix, curves, ROC, runs.csv."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import zlib
from functools import cache
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from sklearn.metrics import roc_curve

from skinclf.cli import main as cli_main
from skinclf.config import compose_config
from skinclf.errors import SkinclfError
from skinclf.evaluation.metrics import binary_metrics
from skinclf.io import python_strings
from skinclf.report.command import build_report
from skinclf.report.figures import confusion_figure, curve_data, curves_figure, roc_data, roc_figure
from skinclf.report.groups import group_runs
from skinclf.report.runs import describe_dataset, find_runs
from skinclf.report.tables import _tex_escape, finished
from skinclf.run_files import CV_RESULT, FOLDS_RECORD, GRID_MD

from conftest import TINY, fail_if_called, run_dir_from_output, train_cli


@cache
def _config(model: str, data: str, overrides: tuple[str, ...]) -> DictConfig:
    cfg = compose_config([f"model={model}", *overrides])
    if data != "synthetic":
        cfg.data.name = data
    return cfg


def write_run(
    root: Path,
    model: str,
    val_acc: list[float],
    train_acc: list[float],
    seed: int = 0,
    data: str = "synthetic",
    overrides: tuple[str, ...] = (),
    tested: bool = True,
    n_test: int = 40,
) -> Path:
    """A run folder as `skinclf train` leaves it; test metrics computed from random predictions."""
    path = root / f"{model}_{data}_{seed}_{'_'.join(overrides)}"
    (path / ".hydra").mkdir(parents=True)
    cfg = _config(model, data, overrides).copy()
    cfg.seed = seed
    (path / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    (path / ".hydra" / "overrides.yaml").write_text(
        "".join(f"- {o}\n" for o in (f"model={model}", f"seed={seed}", *overrides))
    )
    epochs = np.arange(1, len(val_acc) + 1)
    pd.DataFrame(
        {
            "epoch": epochs,
            "train_loss": 0.5,
            "train_acc": train_acc,
            "val_loss": 0.5,
            "val_acc": val_acc,
            "lr": 1e-4,
            "seconds": 1.0,
        }
    ).to_csv(path / "metrics.csv", index=False)
    if not tested:
        return path
    rng = np.random.default_rng(zlib.crc32(path.name.encode()))
    labels = np.repeat([0, 1], n_test // 2)
    probs = np.clip(0.5 + 0.3 * (labels - 0.5) + rng.normal(0, 0.25, n_test), 0, 1)
    # Validation rows first, as a run writes them, scored the other way round: a report that
    # let them into the test ROC would show it.
    val = pd.DataFrame({"split": "val", "index": np.arange(n_test), "label": labels, "prob_mel": 1 - probs})
    test = pd.DataFrame({"split": "test", "index": np.arange(n_test), "label": labels, "prob_mel": probs})
    pd.concat([val, test]).to_csv(path / "predictions.csv", index=False)
    best = int(np.argmax(val_acc))
    metrics = {
        **binary_metrics(labels, probs),
        "best_epoch": best + 1,
        "best_val_acc": val_acc[best],
        "epochs_run": len(val_acc),
        "data": data,
        "n_test": n_test,
    }
    (path / "test_metrics.json").write_text(json.dumps(metrics))
    return path


BASELINE = {  # seed -> (val_acc, train_acc) per epoch; seed 2 stopped early
    0: ([0.60, 0.70, 0.72, 0.71, 0.70, 0.69], [0.65, 0.75, 0.80, 0.85, 0.90, 0.92]),
    1: ([0.62, 0.66, 0.74, 0.74, 0.73, 0.70], [0.60, 0.70, 0.82, 0.88, 0.91, 0.95]),
    2: ([0.58, 0.75, 0.71, 0.70], [0.61, 0.72, 0.81, 0.83]),
}
RES_AUG = ([0.55, 0.65, 0.78, 0.80, 0.79, 0.77, 0.76], [0.60, 0.66, 0.70, 0.74, 0.77, 0.78, 0.80])
RESNET = ([0.61, 0.73, 0.70], [0.70, 0.90, 0.99])


@pytest.fixture()
def sweep(tmp_path: Path) -> Path:
    """Three baseline seeds, one resnet, one res_aug (the best), one unfinished and one failed run."""
    root = tmp_path / "outputs" / "multiruns" / "sweep"
    for seed, (val, train) in BASELINE.items():
        write_run(root, "baseline", val, train, seed=seed)
    write_run(root, "res_aug", *RES_AUG)
    write_run(tmp_path / "outputs" / "runs", "resnet", *RESNET)
    write_run(root, "batch_norm", [0.99, 0.99], [0.99, 0.99], tested=False)
    failed = write_run(root, "group_norm", [0.99], [0.99])
    (failed / "test_metrics.json").write_text("{not json")
    return tmp_path / "outputs"


def _row(table: pd.DataFrame, model: str, data: str = "synthetic") -> pd.Series:
    rows = table[(table["model"] == model) & (table["data"] == data)]
    assert len(rows) == 1
    return rows.iloc[0]


def test_table1_has_every_number_of_the_runs(sweep, tmp_path):
    runs, written = build_report([sweep], tmp_path / "reports")
    table = pd.read_csv(tmp_path / "reports" / "table1.csv", keep_default_na=False, na_values=[""])
    # Paper order; the unfinished and failed runs are not in the table.
    assert list(table["model"]) == ["baseline", "resnet", "res_aug"]

    vals = [100 * max(v) for v, _ in BASELINE.values()]
    trains = [100 * max(t) for _, t in BASELINE.values()]
    best_epochs = [int(np.argmax(v)) + 1 for v, _ in BASELINE.values()]
    tests = [json.loads(p.read_text()) for p in sorted(sweep.rglob("baseline_*/test_metrics.json"))]
    base = _row(table, "baseline")
    assert base["n"] == 3 and base["n_tested"] == 3
    expected = {
        "best_val_acc_pct": vals,
        "max_train_acc_pct": trains,
        "best_epoch": best_epochs,
        "epochs_run": [len(v) for v, _ in BASELINE.values()],
        "test_acc_pct": [100 * t["accuracy"] for t in tests],
        "roc_auc": [t["roc_auc"] for t in tests],
    }
    for column, values in expected.items():
        assert base[f"{column}_mean"] == pytest.approx(np.mean(values), abs=1e-4), column
        assert base[f"{column}_std"] == pytest.approx(np.std(values, ddof=1), abs=1e-4), column

    res_aug = _row(table, "res_aug")
    assert res_aug["n"] == 1 and np.isnan(res_aug["best_val_acc_pct_std"])
    assert res_aug["best_val_acc_pct_mean"] == pytest.approx(80.0)
    assert res_aug["max_train_acc_pct_mean"] == pytest.approx(80.0)
    assert res_aug["best_epoch_mean"] == 4 and res_aug["epochs_run_mean"] == 7
    assert list(table["best"]) == [False, False, True]

    md = (tmp_path / "reports" / "table1.md").read_text()
    assert f"{np.mean(vals):.2f} ± {np.std(vals, ddof=1):.2f}" in md
    assert "| **res_aug** | **1** | **80.00** |" in md
    assert "synthetic data (procedurally generated, not real lesions)" in md
    tex = (tmp_path / "reports" / "table1.tex").read_text()
    assert "\\textbf{res\\_aug}" in tex and "$\\pm$" in tex and "synthetic" in tex

    names = {p.name for p in written}
    assert names == {f"table1.{e}" for e in ("csv", "md", "tex")} | {
        "runs.csv",
        "confusion_matrix.csv",
        "confusion_matrix.png",
        "curves.png",
        "curves.pdf",
        "roc.png",
    }
    for png in ("curves.png", "confusion_matrix.png", "roc.png"):
        with Image.open(tmp_path / "reports" / png) as image:
            image.verify()
    assert not [p for p in (tmp_path / "reports").iterdir() if p.name.startswith(".")], "staging left behind"


def test_a_report_of_the_same_runs_is_the_same_bytes_whenever_it_is_made(sweep, tmp_path, monkeypatch):
    # A reviewer diffing two reports sees only what changed in the runs: no creation date in the
    # PDF (matplotlib writes today's, or SOURCE_DATE_EPOCH's, unless told not to).
    reports = []
    for epoch in ("0", "1700000000"):
        monkeypatch.setenv("SOURCE_DATE_EPOCH", epoch)
        build_report([sweep], tmp_path / epoch)
        reports.append({p.name: p.read_bytes() for p in sorted((tmp_path / epoch).iterdir())})
    assert "curves.pdf" in reports[0] and reports[0] == reports[1]


def test_runs_csv_lists_unfinished_and_failed_runs(sweep, tmp_path):
    [res_aug] = sweep.rglob("res_aug_*/test_metrics.json")
    recorded = json.loads(res_aug.read_text())
    res_aug.write_text(
        json.dumps(
            {
                **recorded,
                "environment": {"source": "0123456789ab", "torch": "2.14.1", "machine": "a CPU, 2 threads"},
            }
        )
    )
    build_report([sweep], tmp_path / "reports")
    runs = pd.read_csv(tmp_path / "reports" / "runs.csv").set_index("model")
    # What produced each run's numbers; runs made before skinclf recorded it have none.
    environment = ["source", "torch", "machine"]
    assert tuple(runs.loc["res_aug", environment]) == ("0123456789ab", "2.14.1", "a CPU, 2 threads")
    assert runs.loc["resnet", environment].isna().all()
    assert len(runs) == 7
    assert (runs.loc["baseline", "status"] == "finished").all()
    assert runs.loc["batch_norm", "status"] == "unfinished"
    assert "test_metrics.json" in runs.loc["batch_norm", "problem"]
    assert runs.loc["batch_norm", "epochs_run"] == 2
    assert runs.loc["group_norm", "status"] == "failed"
    assert sorted(runs.loc["baseline", "seed"]) == [0, 1, 2]
    assert runs.loc["res_aug", "best_val_acc_pct"] == pytest.approx(80.0)
    # The tables name what they leave out: a row's mean is that of the seeds that finished.
    left_out = (
        "Not in the table: 1 failed run of group_norm, 1 unfinished run of batch_norm (runs.csv says why)."
    )
    assert f"\n{left_out}\n" in (tmp_path / "reports" / "table1.md").read_text()
    # At the end of the LaTeX table's caption.
    assert _tex_escape(left_out) + "}" in (tmp_path / "reports" / "table1.tex").read_text()


def test_a_dataset_with_no_finished_run_and_runs_of_no_known_dataset_are_named(tmp_path):
    # No table shows them: the tables' text must, or they vanish from everything but runs.csv.
    root = tmp_path / "runs"
    write_run(root, "baseline", [0.6, 0.7], [0.6, 0.7])
    write_run(root, "vgg16_ft", [0.6, 0.7], [0.6, 0.7], data="dermamnist", tested=False)
    broken = write_run(root, "resnet", [0.6, 0.7], [0.6, 0.7], seed=1)
    (broken / ".hydra" / "config.yaml").write_text("a: [")
    build_report([root], tmp_path / "reports")
    markdown = (tmp_path / "reports" / "table1.md").read_text()
    assert (
        "Also found: 1 failed run of no known model or dataset (a damaged record, a refused job: runs.csv)."
        in markdown
    )
    assert (
        "## Dataset: dermamnist data\n\nNo finished run. Not in the table: 1 unfinished run of vgg16_ft "
        "(runs.csv says why)." in markdown
    )
    latex = (tmp_path / "reports" / "table1.tex").read_text()
    assert "% Also found: 1 failed run of no known model or dataset" in latex
    assert "% dermamnist data: no finished run. Not in the table: 1 unfinished run of vgg16_ft" in latex


def test_runs_csv_gives_an_unfinished_runs_first_best_validation_epoch_so_far(tmp_path):
    # No test_metrics.json yet: its best checkpoint so far is at the highest validation accuracy,
    # not the latest, and of tied epochs at the first, which the trainer saved as best.pt.
    write_run(tmp_path / "runs", "resnet", *RESNET)
    write_run(tmp_path / "runs", "baseline", [0.7, 0.9, 0.9, 0.8], [0.6, 0.7, 0.8, 0.9], tested=False)
    build_report([tmp_path / "runs"], tmp_path / "reports")
    runs = pd.read_csv(tmp_path / "reports" / "runs.csv").set_index("model")
    assert runs.loc["baseline", "status"] == "unfinished"
    assert runs.loc["baseline", "best_epoch"] == 2
    assert runs.loc["baseline", "best_val_acc_pct"] == pytest.approx(90.0)


def test_a_test_metric_of_one_tested_seed_shows_no_spread(tmp_path):
    # Two seeds, only one with a test split: its test numbers are one run's, shown without a
    # std, while the validation numbers of both seeds show theirs.
    root = tmp_path / "runs"
    tested = write_run(root, "baseline", [0.6, 0.8], [0.6, 0.7], seed=0)
    untested = write_run(root, "baseline", [0.6, 0.7], [0.6, 0.7], seed=1, tested=False)
    record = {"best_epoch": 2, "best_val_acc": 0.7, "epochs_run": 2, "data": "synthetic", "n_test": 0}
    (untested / "test_metrics.json").write_text(json.dumps(record))
    build_report([root], tmp_path / "reports")
    [row] = pd.read_csv(tmp_path / "reports" / "table1.csv").to_dict("records")
    assert (row["n"], row["n_tested"]) == (2, 1)
    [line] = [
        line for line in (tmp_path / "reports" / "table1.md").read_text().splitlines() if "baseline" in line
    ]
    cells = [cell.strip().strip("*") for cell in line.strip("|").split("|")]
    test = json.loads((tested / "test_metrics.json").read_text())
    assert cells[2] == "75.00 ± 7.07"
    assert cells[-2:] == [f"{100 * test['accuracy']:.2f}", f"{test['roc_auc']:.3f}"]


def test_runs_csv_keeps_whole_numbers_beside_a_run_without_them(tmp_path):
    write_run(tmp_path / "runs", "baseline", *BASELINE[2], seed=2)
    broken = write_run(tmp_path / "runs", "resnet", *RESNET)
    (broken / ".hydra" / "config.yaml").write_text("{unclosed")  # no seed, no epochs to read
    build_report([tmp_path / "runs"], tmp_path / "reports")
    runs = pd.read_csv(tmp_path / "reports" / "runs.csv", dtype=str, keep_default_na=False)
    assert runs[["status", "seed", "epochs_run", "best_epoch", "n_test"]].values.tolist() == [
        ["finished", "2", "4", "2", "40"],
        ["failed", "", "0", "", "0"],
    ]


@pytest.mark.parametrize(
    "config",
    ["", "path,prob_mel,prediction\nlesion.png,0.53,MEL\n", "- 1\n", "{}\n"],
    ids=["empty", "CSV", "a list", "an empty mapping"],
)
def test_a_run_whose_config_was_damaged_is_listed_as_failed(tmp_path, config):
    # As a YAML error is: leaving the run out would hide it from runs.csv without a word.
    run_dir = write_run(tmp_path / "runs", "baseline", [0.5], [0.5])
    (run_dir / ".hydra" / "config.yaml").write_text(config)
    [run] = find_runs([tmp_path / "runs"])
    assert (run.path, run.status) == (run_dir, "failed")
    assert run.problem.startswith(".hydra/config.yaml: no model.name or data.name; expected")


def test_another_hydra_applications_output_is_no_run(tmp_path):
    other = tmp_path / "outputs" / "other"
    (other / ".hydra").mkdir(parents=True)
    (other / ".hydra" / "config.yaml").write_text("lr: 0.1\n")
    # Hydra's log of any train.py, and what other training tools write (Lightning's CSVLogger,
    # YOLO's checkpoints): names a skinclf run has too, so they do not make it one.
    for name in ("train.log", "metrics.csv", "last.pt", "best.pt"):
        (other / name).write_text("")
    assert find_runs([tmp_path / "outputs"]) == []


def test_a_sweep_job_that_crashed_is_listed_as_failed_with_its_error(tmp_path):
    root = tmp_path / "multiruns" / "sweep"
    write_run(root, "baseline", *BASELINE[0])
    crashed = write_run(root, "resnet", [0.6, 0.7], [0.6, 0.7], tested=False)
    (crashed / "job_status.json").write_text(
        json.dumps({"status": "failed", "error": "RuntimeError: CUDA out of memory", "log": "x"})
    )
    running = write_run(root, "res_aug", [0.6], [0.6], tested=False)
    (running / "job_status.json").write_text(json.dumps({"status": "running"}))
    build_report([tmp_path / "multiruns"], tmp_path / "reports")
    runs = pd.read_csv(tmp_path / "reports" / "runs.csv").set_index("model")
    assert runs.loc["resnet", "status"] == "failed"
    problem = runs.loc["resnet", "problem"]
    assert problem == "failed after 2 epochs: RuntimeError: CUDA out of memory"
    assert runs.loc["res_aug", "status"] == "unfinished"
    assert runs.loc["baseline", "status"] == "finished"


# `skinclf train` with its task swapped for one that crashes after an epoch, as an out-of-memory
# error would: the real CLI, Hydra and status handling around an injected failure.
CRASHING_TRAIN = """
import sys
import skinclf.train
from skinclf.cli import main

def crash(cfg, out_dir):
    (out_dir / "metrics.csv").write_text("epoch,train_acc,val_acc\\n1,0.5,0.5\\n")
    raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

skinclf.train.task = crash
main(["train", *sys.argv[1:]])
"""


def test_a_single_run_that_crashed_is_listed_as_failed_with_its_error(tmp_path):
    run_dir = tmp_path / "outputs" / "crashed"
    proc = subprocess.run(
        [sys.executable, "-c", CRASHING_TRAIN, f"hydra.run.dir={run_dir}", "trainer.progress=never"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0 and "CUDA out of memory" in proc.stderr
    status = json.loads((run_dir / "job_status.json").read_text())
    assert status["status"] == "failed"
    assert status["error"] == "CUDA out of memory. Tried to allocate 2.00 GiB"
    runs = find_runs([tmp_path / "outputs"])
    assert [(run.status, run.problem) for run in runs] == [
        ("failed", "failed after 1 epoch: CUDA out of memory. Tried to allocate 2.00 GiB")
    ]


# `skinclf train` whose task writes one epoch, then waits to be killed.
HANGING_TRAIN = CRASHING_TRAIN.replace(
    'raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")', "time.sleep(600)"
).replace("import sys", "import sys, time")


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL and process checks are POSIX")
def test_a_run_killed_outright_is_told_from_one_still_running(tmp_path):
    run_dir = tmp_path / "outputs" / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-c", HANGING_TRAIN, f"hydra.run.dir={run_dir}", "trainer.progress=never"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        metrics = run_dir / "metrics.csv"
        deadline = time.monotonic() + 120
        while proc.poll() is None and not metrics.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None, "the run ended before it could be killed"
        # While it runs, its live process says so.
        [running] = find_runs([tmp_path / "outputs"])
        assert (running.status, running.problem) == (
            "unfinished",
            f"still running: process {proc.pid} on this machine (1 epoch done)",
        )
        status = json.loads((run_dir / "job_status.json").read_text())
        assert (status["status"], status["pid"]) == ("running", proc.pid)
    finally:
        proc.kill()  # SIGKILL: no handler runs, nothing more is recorded
        proc.wait(timeout=60)
    [killed] = find_runs([tmp_path / "outputs"])
    assert killed.status == "unfinished"
    assert killed.problem.startswith(f"killed after 1 epoch: its process ({proc.pid}) ended")
    assert "resume=true" in killed.problem


def test_a_running_status_from_another_machine_is_taken_at_its_word(tmp_path):
    run_dir = write_run(tmp_path / "outputs", "resnet", [0.6], [0.6], tested=False)
    # A process id that no longer exists here, but recorded on another machine (a cluster node).
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
    status = {"status": "running", "pid": int(dead.stdout), "host": "another-node"}
    (run_dir / "job_status.json").write_text(json.dumps(status))
    [run] = find_runs([tmp_path / "outputs"])
    assert run.problem == "no test_metrics.json (1 epoch done): may still be running on another-node"
    (run_dir / "job_status.json").unlink()  # no record of how it ended
    [run] = find_runs([tmp_path / "outputs"])
    assert run.problem == "no test_metrics.json (1 epoch done)"


def test_default_group_choice_spelled_out_is_the_same_experiment(tmp_path):
    root = tmp_path / "outputs"
    write_run(root, "res_aug", *RES_AUG, seed=0)
    write_run(root, "res_aug", *RES_AUG, seed=1, overrides=("recipe=paper",))
    write_run(root, "res_aug", *RES_AUG, seed=2, overrides=("recipe=modern",))
    settings = sorted(str(run.settings) for run in find_runs([root]))
    assert settings == ["{'recipe': 'modern'}", "{}", "{}"]


# `skinclf report ARGS` in a fresh process, then whether it imported torch.
REPORT_IMPORTS = """
import sys
from skinclf.cli import main
try:
    main(["report", *sys.argv[1:]])
except SystemExit:
    pass
print("torch imported:", "torch" in sys.modules, file=sys.stderr)
"""


def test_a_report_needs_no_torch(sweep, tmp_path):
    # Reading run folders and drawing figures needs none of torch's seconds of importing.
    out = tmp_path / "reports"
    proc = subprocess.run(
        [sys.executable, "-c", REPORT_IMPORTS, str(sweep), "--out", str(out)], capture_output=True, text=True
    )
    assert proc.stderr.strip().splitlines()[-1] == "torch imported: False"
    assert (out / "table1.md").is_file() and (out / "roc.png").is_file()


def test_grid_search_points_are_not_runs(sweep):
    # A cross-validated grid point never touches the test split: it must not show up as an
    # unfinished run, nor in Table 1.
    point = write_run(sweep / "grid_search", "resnet", [0.9], [0.9], tested=False)
    config = point / ".hydra" / "config.yaml"
    assert "folds: 0" in config.read_text()
    config.write_text(config.read_text().replace("folds: 0", "folds: 5"))
    paths = {run.path for run in find_runs([sweep])}
    assert point not in paths and len(paths) == 7


@pytest.mark.parametrize("progress", ["ended", "a point done", "started"])
def test_a_report_of_only_a_grid_search_points_to_its_ranking(progress, tmp_path):
    # Its points are never tested, so there is no Table 1: the user is told where the result is,
    # also for a grid stopped before its first point was done.
    sweep = tmp_path / "grid"
    ended = progress == "ended"
    point = write_run(sweep, "resnet", [0.9], [0.9], tested=False)
    config = point / ".hydra" / "config.yaml"
    config.write_text(config.read_text().replace("folds: 0", "folds: 3"))
    (point / FOLDS_RECORD).write_text("{}")  # written as a point starts
    if progress != "started":
        (point / CV_RESULT).write_text('{"mean_val_acc": 0.9}')
    if ended:
        (sweep / GRID_MD).write_text("# Cross-validated grid search\n")
    with pytest.raises(SkinclfError) as caught:
        build_report([tmp_path], tmp_path / "reports")
    hint = f"its ranking is in {sweep / GRID_MD}" if ended else f"the sweep ranks them in {GRID_MD}"
    assert str(caught.value).startswith("no finished runs found") and hint in str(caught.value)
    assert not (tmp_path / "reports").exists()


def test_confusion_matrix_is_the_best_models_test_set_laid_out_like_table_2(sweep, tmp_path):
    build_report([sweep], tmp_path / "reports")
    confusion = pd.read_csv(tmp_path / "reports" / "confusion_matrix.csv")
    run_dir = next(sweep.rglob("res_aug_*"))
    assert set(confusion["run_dir"]) == {str(run_dir)} and set(confusion["model"]) == {"res_aug"}
    predictions = pd.read_csv(run_dir / "predictions.csv").query("split == 'test'")
    true, pred = predictions["label"].to_numpy(), (predictions["prob_mel"] >= 0.5).to_numpy()
    assert list(confusion["true"]) == ["NEV", "MEL"]
    assert confusion[["pred_NEV", "pred_MEL"]].to_numpy().tolist() == [
        [int(((true == 0) & ~pred).sum()), int(((true == 0) & pred).sum())],
        [int(((true == 1) & ~pred).sum()), int(((true == 1) & pred).sum())],
    ]
    metrics = json.loads((run_dir / "test_metrics.json").read_text())
    for key in ("accuracy", "f1", "sensitivity", "specificity"):
        assert confusion[key].iloc[0] == pytest.approx(metrics[key], abs=1e-4)


def test_curves_mark_each_models_best_validation_epoch(sweep):
    groups = group_runs(finished(find_runs([sweep])))["synthetic"]
    curves = {g.model: curve_data(g) for g in groups}
    res_aug = curves["res_aug"]
    val = 100 * np.array(RES_AUG[0])
    assert list(res_aug.epochs) == list(range(1, 8))
    assert res_aug.best_epoch == 4
    # Trailing 5-epoch rolling mean (shorter at the start).
    assert res_aug.val[0] == pytest.approx(val[0])
    assert res_aug.val[-1] == pytest.approx(val[-5:].mean())
    assert res_aug.best_val == pytest.approx(val[:4].mean())
    # Early stopping: the resnet run has 3 epochs, so its curve ends at 3.
    assert list(curves["resnet"].epochs) == [1, 2, 3] and curves["resnet"].best_epoch == 2
    # Seeds: each epoch averaged over the runs that reached it; seed 2 stopped after 4.
    base = curves["baseline"]
    raw = [np.mean([100 * v[e] for v, _ in BASELINE.values() if len(v) > e]) for e in range(6)]
    assert list(base.epochs) == list(range(1, 7))
    assert base.best_epoch == int(np.argmax(raw)) + 1
    assert base.val[-1] == pytest.approx(np.mean(raw[1:6]))
    assert base.train[0] == pytest.approx(np.mean([100 * t[0] for _, t in BASELINE.values()]))


def test_roc_is_the_runs_test_curve_with_its_auc(sweep):
    groups = group_runs(finished(find_runs([sweep])))["synthetic"]
    roc = roc_data(next(g for g in groups if g.model == "res_aug"))
    run_dir = next(sweep.rglob("res_aug_*"))
    predictions = pd.read_csv(run_dir / "predictions.csv").query("split == 'test'")
    fpr, tpr, _ = roc_curve(predictions["label"], predictions["prob_mel"])
    np.testing.assert_allclose(roc.fpr, fpr)
    np.testing.assert_allclose(roc.tpr, tpr)
    assert roc.auc_mean == pytest.approx(json.loads((run_dir / "test_metrics.json").read_text())["roc_auc"])
    averaged = roc_data(next(g for g in groups if g.model == "baseline"))
    assert averaged.n == 3 and averaged.tpr[0] == 0 and averaged.tpr[-1] == 1
    assert np.all(np.diff(averaged.tpr) >= 0)


def test_seed_averaged_roc_is_the_mean_curve_with_the_seeds_sample_std_auc(sweep):
    # Several seeds: vertical averaging, the mean true-positive rate of each seed's own test curve
    # at fixed false-positive rates, and the AUC's spread as Table 1 gives it (sample std).
    groups = group_runs(finished(find_runs([sweep])))["synthetic"]
    averaged = roc_data(next(g for g in groups if g.model == "baseline"))
    curves, aucs = [], []
    for run_dir in sorted(sweep.rglob("baseline_*")):
        predictions = pd.read_csv(run_dir / "predictions.csv").query("split == 'test'")
        fpr, tpr, _ = roc_curve(predictions["label"], predictions["prob_mel"])
        curves.append((fpr, tpr))
        aucs.append(json.loads((run_dir / "test_metrics.json").read_text())["roc_auc"])
    grid = np.linspace(0.0, 1.0, 201)
    expected = np.mean([np.interp(grid, fpr, tpr) for fpr, tpr in curves], axis=0)
    expected[0] = 0.0  # every curve starts at the origin
    np.testing.assert_allclose(averaged.fpr, grid)
    np.testing.assert_allclose(averaged.tpr, expected)
    assert averaged.n == 3
    assert averaged.auc_mean == pytest.approx(np.mean(aucs))
    assert averaged.auc_std == pytest.approx(np.std(aucs, ddof=1))


def test_datasets_and_settings_are_never_averaged_together(tmp_path):
    root = tmp_path / "outputs"
    write_run(root, "baseline", [0.70, 0.80], [0.7, 0.8], seed=0)
    write_run(root, "baseline", [0.60, 0.62], [0.7, 0.8], seed=1, overrides=("optim.lr=0.001",))
    write_run(root, "resnet", [0.75, 0.70], [0.7, 0.8], seed=0)
    derm = [
        write_run(root, "baseline", [0.5, v], [0.6, 0.7], seed=s, data="dermamnist")
        for s, v in ((0, 0.6), (1, 0.9))
    ]
    write_run(root, "resnet", [0.70, 0.72], [0.7, 0.8], seed=0, data="dermamnist")
    build_report([root], tmp_path / "reports")
    table = pd.read_csv(tmp_path / "reports" / "table1.csv", keep_default_na=False, na_values=[""])

    synthetic = table[table["data"] == "synthetic"]
    assert list(zip(synthetic["model"], synthetic["variant"].fillna(""), synthetic["n"], strict=True)) == [
        ("baseline", "", 1),
        ("baseline", "optim.lr=0.001", 1),
        ("resnet", "", 1),
    ]
    assert list(synthetic["best"]) == [True, False, False]
    assert _row(table, "baseline", "dermamnist")["best_val_acc_pct_mean"] == pytest.approx(75.0)
    assert _row(table, "baseline", "dermamnist")["n"] == 2
    assert list(table[table["data"] == "dermamnist"]["best"]) == [True, False]

    md = (tmp_path / "reports" / "table1.md").read_text()
    assert "## Dataset: dermamnist data" in md and "## Dataset: synthetic data (procedurally generated" in md
    # Confusion matrix per dataset; with seeds, the seed with the best validation accuracy.
    confusion = pd.read_csv(tmp_path / "reports" / "confusion_matrix.csv")
    assert set(confusion[confusion["data"] == "dermamnist"]["run_dir"]) == {str(derm[1])}
    assert set(confusion[confusion["data"] == "synthetic"]["model"]) == {"baseline"}
    # Which run it is, said in the CSV and the figure: one seed of the row, not Table 1's mean.
    assert confusion.groupby("data")[["seed", "of_runs"]].first().to_dict("index") == {
        "dermamnist": {"seed": 1, "of_runs": 2},
        "synthetic": {"seed": 0, "of_runs": 1},
    }
    titles = [ax.get_title() for ax in confusion_figure(confusion).axes]
    assert "baseline, test set (seed 1: best validation of 2 runs)" in titles[0].replace("\n", " ")
    assert "seed" not in titles[1]  # a model of one run: its run is the row
    # Runs whose config records no seed (an older skinclf's): no "seed nan" and no 1.0 seeds.
    for run in derm:
        config = yaml.safe_load((run / ".hydra" / "config.yaml").read_text())
        del config["seed"]
        (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    build_report([root], tmp_path / "again")
    raw = pd.read_csv(tmp_path / "again" / "confusion_matrix.csv", dtype=str, keep_default_na=False)
    assert raw.groupby("data")["seed"].first().to_dict() == {"dermamnist": "", "synthetic": "0"}  # not 0.0
    confusion = pd.read_csv(tmp_path / "again" / "confusion_matrix.csv")
    titles = [ax.get_title().replace("\n", " ") for ax in confusion_figure(confusion).axes]
    assert "baseline, test set (best validation of 2 runs)" in titles[0]


def test_runs_measured_on_other_validation_and_test_images_are_other_datasets(tmp_path):
    # One folder, changed between runs (images added, moved from test to train): the runs'
    # scores are of different images, which seeds of one row would average as one experiment.
    root = tmp_path / "outputs"
    digests = {0: "a" * 64, 1: "a" * 64, 2: "b" * 64, 3: None}  # seed 3: an older skinclf's run
    for seed, digest in digests.items():
        run = write_run(root, "baseline", [0.6, 0.7 + seed / 100], [0.6, 0.7], seed=seed)
        if digest is not None:
            metrics = json.loads((run / "test_metrics.json").read_text())
            (run / "test_metrics.json").write_text(json.dumps({**metrics, "eval_data_sha256": digest}))
    write_run(root, "resnet", [0.6, 0.7], [0.6, 0.7], tested=False)  # unfinished: content unknown
    build_report([root], tmp_path / "reports")
    table = pd.read_csv(tmp_path / "reports" / "table1.csv")
    assert dict(zip(table["data"], table["n"], strict=True)) == {
        "synthetic [eval data aaaaaaaa]": 2,
        "synthetic [eval data bbbbbbbb]": 1,
        "synthetic [eval data unknown]": 1,
    }
    # The unfinished run is named under the runs of unknown content, not as a dataset of no run.
    markdown = (tmp_path / "reports" / "table1.md").read_text()
    assert "No finished run" not in markdown
    assert "Not in the table: 1 unfinished run of resnet" in markdown.split("[eval data unknown]")[-1]
    # One content, however many runs: the plain name, older runs with it.
    shutil.rmtree(next(root.glob("baseline_synthetic_2_*")))
    build_report([root], tmp_path / "again")
    assert pd.read_csv(tmp_path / "again" / "table1.csv")["n"].tolist() == [3]


def test_a_folder_dataset_split_by_its_evaluation_data_is_titled_with_it():
    # "data" belongs after the folder's name, not after the digest; a root may hold " [" itself.
    assert describe_dataset("folder:/data/isic [eval data 1a2b3c4d]") == (
        "folder:/data/isic data [eval data 1a2b3c4d]"
    )
    assert describe_dataset("folder:/data/set [v2]") == "folder:/data/set [v2] data"


def test_seeds_trained_on_other_training_images_are_rows_of_their_own(tmp_path):
    # Images added to a folder's train/ between two seeds: the same validation and test images,
    # but the runs learned from other data, which one row would average as seeds.
    root = tmp_path / "outputs"
    digests = {0: "c" * 64, 1: "c" * 64, 2: "d" * 64}
    for seed, digest in digests.items():
        run = write_run(root, "baseline", [0.6, 0.7 + seed / 100], [0.6, 0.7], seed=seed)
        metrics = json.loads((run / "test_metrics.json").read_text())
        (run / "test_metrics.json").write_text(json.dumps({**metrics, "train_data_sha256": digest}))
    write_run(root, "baseline", [0.6, 0.7], [0.6, 0.7], seed=3)  # an older run: which data, unknown
    write_run(root, "resnet", [0.6, 0.7], [0.6, 0.7])  # an older run of a model not told apart: as before
    build_report([root], tmp_path / "reports")
    table = pd.read_csv(tmp_path / "reports" / "table1.csv", keep_default_na=False)
    assert list(zip(table["model"], table["variant"], table["n"], strict=True)) == [
        ("baseline", "training_data=cccccccc", 2),
        ("baseline", "training_data=dddddddd", 1),
        ("baseline", "training_data=unknown", 1),
        ("resnet", "", 1),
    ]


def test_synthetic_data_with_other_validation_and_test_images_is_another_dataset(tmp_path):
    # Another data.seed or val/test size: other images to validate and test on, so its runs must
    # not compete for `best` with the default data's. Another train size is a row of the same.
    root = tmp_path / "outputs"
    write_run(root, "baseline", [0.70, 0.80], [0.7, 0.8])
    write_run(root, "baseline", [0.70, 0.75], [0.7, 0.8], overrides=("data.train_size=512",))
    write_run(root, "resnet", [0.70, 0.95], [0.7, 0.8], overrides=("data.seed=1",))
    write_run(root, "resnet", [0.70, 0.90], [0.7, 0.8], overrides=("data.val_size=64", "data.test_size=64"))
    build_report([root], tmp_path / "reports")
    table = pd.read_csv(tmp_path / "reports" / "table1.csv", keep_default_na=False, na_values=[""])
    assert list(
        zip(table["data"], table["model"], table["variant"].fillna(""), table["best"], strict=True)
    ) == [
        ("synthetic", "baseline", "", True),
        ("synthetic", "baseline", "data.train_size=512", False),
        ("synthetic [data.seed=1]", "resnet", "", True),
        ("synthetic [data.val_size=64 data.test_size=64]", "resnet", "", True),
    ]
    md = (tmp_path / "reports" / "table1.md").read_text()
    assert "## Dataset: synthetic data [data.seed=1] (procedurally generated, not real lesions)" in md
    confusion = pd.read_csv(tmp_path / "reports" / "confusion_matrix.csv")
    assert set(confusion[confusion["data"] == "synthetic"]["model"]) == {"baseline"}


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda data: data.pop("seed"), "synthetic"),  # an older skinclf's config: generated with 0
        (lambda data: data.update(val_size=256.0), "synthetic"),  # 256.0 images are 256
        (lambda data: data.update(seed="${hydra:job.num}"), "synthetic [data.seed=${hydra:job.num}]"),
    ],
    ids=["no-seed-key", "float-size", "hydra-interpolation"],
)
def test_a_synthetic_dataset_is_named_by_what_it_generates(tmp_path, edit, expected):
    run = write_run(tmp_path / "outputs", "baseline", [0.70, 0.80], [0.7, 0.8])
    config = yaml.safe_load((run / ".hydra" / "config.yaml").read_text())
    edit(config["data"])
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    [found] = find_runs([tmp_path / "outputs"])
    assert (found.status, found.data) == ("finished", expected)


def test_a_dermamnist_folder_and_its_npz_file_are_one_dataset(tmp_path, monkeypatch):
    # data.root may name the folder or the file in it: the same images, so one row of two seeds.
    folder = tmp_path / "medmnist"
    folder.mkdir()
    npz = folder / "dermamnist_128.npz"
    npz.write_bytes(b"")
    (tmp_path / "link.npz").symlink_to(npz)  # one file under two names: symlinks resolved
    # A relative root with no record of the folder the run began in is kept as typed: it named
    # the file it read from there, not from wherever the report runs.
    monkeypatch.chdir(tmp_path)
    for seed, root in enumerate((folder, tmp_path / "link.npz", tmp_path / "moved", "medmnist")):
        run = write_run(
            tmp_path / "outputs", "baseline", [0.7, 0.8], [0.7, 0.8], seed=seed, data="dermamnist"
        )
        config = yaml.safe_load((run / ".hydra" / "config.yaml").read_text())
        config["data"]["root"] = str(root)
        (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    # A root that names no file now keeps its recorded name: nothing tells which images it held.
    assert sorted(run.data for run in find_runs([tmp_path / "outputs"])) == [
        f"dermamnist:{npz}",
        f"dermamnist:{npz}",
        f"dermamnist:{tmp_path / 'moved'}",
        "dermamnist:medmnist",
    ]
    build_report([tmp_path / "outputs"], tmp_path / "reports")
    table = pd.read_csv(tmp_path / "reports" / "table1.csv")
    assert sorted(table["n"]) == [1, 1, 2]


def test_a_long_model_label_stays_inside_the_confusion_figure(tmp_path):
    # The title was one line per part, cut off at both edges for a variant of several settings.
    root = tmp_path / "outputs"
    long = ("data.train_size=512", "optim.lr=0.001", "trainer.max_epochs=8", "trainer.patience=8")
    write_run(root, "baseline", [0.70, 0.80], [0.7, 0.8], overrides=long)
    write_run(root, "baseline", [0.70, 0.75], [0.7, 0.8])
    build_report([root], tmp_path / "reports")
    fig = confusion_figure(pd.read_csv(tmp_path / "reports" / "confusion_matrix.csv"))
    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.draw(renderer)
    title = fig.axes[0].title
    assert "trainer.patience=8" in title.get_text()
    extent, page = title.get_window_extent(renderer), fig.bbox
    assert page.x0 <= extent.x0 and extent.x1 <= page.x1


def test_long_dataset_names_and_legends_stay_inside_the_curves_and_roc_figures(tmp_path):
    # curves.png ran a dataset named with its settings off both edges ("synthetic" lost with it);
    # roc.png cut the last legend entries off at the bottom when the title took two more lines.
    # A dataset whose runs stopped after one epoch had ticks 0.945 ... 1.05 for its epochs.
    root = tmp_path / "outputs"
    for extra in ((), ("data.train_size=512", "optim.lr=0.001", "trainer.patience=3")):
        for model, data in (("resnet", ()), ("baseline", ("data.seed=1",))):
            overrides = (*data, "data.val_size=64", "data.test_size=64", *extra)
            write_run(root, model, *RESNET, overrides=overrides)
    write_run(root, "res_aug", [0.7], [0.7], overrides=("data.seed=2",))
    groups = group_runs(finished(find_runs([root])))
    curves, roc = curves_figure(groups), roc_figure(groups)
    titles_and_legends = {
        curves: [sub._suptitle for sub in curves.subfigs] + curves.legends[0].get_texts(),
        roc: [t for ax in roc.axes for t in (ax.title, *ax.get_legend().get_texts())],
    }
    for fig, texts in titles_and_legends.items():
        renderer = FigureCanvasAgg(fig).get_renderer()
        fig.draw(renderer)
        assert any("synthetic data [data.seed=1" in t.get_text() for t in texts)
        page = fig.bbox
        for text in texts:
            extent = text.get_window_extent(renderer)
            inside = page.x0 - 1 <= extent.x0 and extent.x1 <= page.x1 + 1
            assert inside and page.y0 - 1 <= extent.y0 and extent.y1 <= page.y1 + 1, text.get_text()
    one_epoch = [ax for ax in curves.axes if ax.get_subplotspec() and len(ax.lines) == 2]
    assert one_epoch and all(tick == int(tick) for ax in one_epoch for tick in ax.get_xticks())


def test_runs_whose_configs_differ_without_an_override_are_not_averaged_as_seeds(tmp_path):
    # A model YAML edited between two seeds (or two model configs of one name): alike overrides,
    # different architectures. The differing value names each row.
    root = tmp_path / "outputs"
    runs = [write_run(root, "baseline", [0.7, 0.8], [0.7, 0.8], seed=s) for s in (0, 1, 2)]
    for run in runs[1:]:
        config = yaml.safe_load((run / ".hydra" / "config.yaml").read_text())
        config["model"]["arch"]["norm"] = "batch"
        config["data"]["cache_dir"] = "elsewhere"  # not an experiment setting: no row of its own
        (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    build_report([root], tmp_path / "reports")
    table = pd.read_csv(tmp_path / "reports" / "table1.csv", keep_default_na=False, na_values=[""])
    assert list(zip(table["variant"], table["n"], strict=True)) == [
        ("model.arch.norm=batch", 2),
        ("model.arch.norm=none", 1),
    ]


def test_values_a_choice_sets_or_written_two_ways_do_not_label_rows(tmp_path):
    # recipe=modern sets optim.lr and optim.weight_decay: its row is `recipe=modern`, not those.
    # A value written two ways (the default 0.0 as 0) is one value: that run is another seed.
    root = tmp_path / "outputs"
    write_run(root, "baseline", [0.7, 0.8], [0.7, 0.8], seed=0)
    write_run(root, "baseline", [0.7, 0.8], [0.7, 0.8], seed=1, overrides=("recipe=modern",))
    spelt = write_run(root, "baseline", [0.7, 0.8], [0.7, 0.8], seed=2)
    config = yaml.safe_load((spelt / ".hydra" / "config.yaml").read_text())
    config["optim"]["weight_decay"] = 0
    (spelt / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    groups = group_runs(finished(find_runs([root])))["synthetic"]
    assert [(g.variant, len(g.runs)) for g in groups] == [("", 2), ("recipe=modern", 1)]


def test_tied_means_mark_the_earlier_row_best_and_its_confusion_matrix_is_shown(tmp_path):
    # 100 validation images: the trainer records float32 accuracies. Seeds at 96 % and 99 % and
    # seeds at 97 % and 98 % both average 97.5 %, but not in their last float bits.
    def accuracy(correct: int) -> float:
        return float(np.float32(correct) / np.float32(100))

    root = tmp_path / "outputs"
    for model, correct in (("baseline", (96, 99)), ("resnet", (97, 98))):
        for seed, k in enumerate(correct):
            write_run(root, model, [0.5, accuracy(k)], [0.6, 0.7], seed=seed)
    build_report([root], tmp_path / "reports")
    table = pd.read_csv(tmp_path / "reports" / "table1.csv")
    assert list(table["best_val_acc_pct_mean"]) == [97.5, 97.5]
    assert list(table["best"]) == [True, False]  # a tie: the earlier row
    confusion = pd.read_csv(tmp_path / "reports" / "confusion_matrix.csv")
    assert set(confusion["model"]) == {"baseline"}  # the row marked best


def test_a_seed_run_twice_counts_once_and_runs_csv_says_why(tmp_path, capsys):
    first = write_run(tmp_path / "outputs" / "a", "baseline", [0.6, 0.7], [0.6, 0.7], seed=0)
    again = write_run(tmp_path / "outputs" / "b", "baseline", [0.6, 0.9], [0.6, 0.7], seed=0)
    write_run(tmp_path / "outputs" / "b", "baseline", [0.6, 0.8], [0.6, 0.7], seed=1)
    cli_main(["report", str(tmp_path / "outputs"), "--out", str(tmp_path / "reports")])
    # The console's count says so too: 3 finished runs, a Table 1 of n = 2.
    assert capsys.readouterr().out.startswith(
        "3 finished (1 not counted: seeds run again), 0 unfinished, 0 failed run(s); see runs.csv"
    )
    row = pd.read_csv(tmp_path / "reports" / "table1.csv").iloc[0]
    assert row["n"] == 2 and row["best_val_acc_pct_mean"] == pytest.approx(75.0)  # seeds 0 (first) and 1
    runs = pd.read_csv(tmp_path / "reports" / "runs.csv", keep_default_na=False).set_index("run_dir")
    assert runs.loc[str(again), "problem"] == f"not counted: repeats seed 0 of {first}"
    assert runs.loc[str(first), "problem"] == ""


def test_a_relative_data_root_is_keyed_by_the_folder_it_was_typed_in(tmp_path):
    def folder_run(seed: int, root: str, started_in: Path | None) -> Path:
        run = write_run(tmp_path / "outputs", "baseline", [0.6, 0.7], [0.6, 0.7], seed=seed)
        cfg = OmegaConf.load(run / ".hydra" / "config.yaml")
        cfg.data.name, cfg.data.root = "folder", root
        (run / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
        if started_in is not None:
            hydra = OmegaConf.create({"hydra": {"runtime": {"cwd": str(started_in)}}})
            (run / ".hydra" / "hydra.yaml").write_text(OmegaConf.to_yaml(hydra))
        return run

    one, two = Path(os.path.realpath(tmp_path)) / "one", Path(os.path.realpath(tmp_path)) / "two"
    (one / "ds").mkdir(parents=True)
    (tmp_path / "link").symlink_to(one, target_is_directory=True)
    folder_run(0, "ds", one)
    folder_run(1, "./ds", one)  # the same folder spelt another way
    folder_run(2, "ds", two)  # another dataset that happens to have the same name
    folder_run(3, "../one/ds", two)
    folder_run(4, str(tmp_path / "link" / "ds"), two)  # $PWD/ds typed where $PWD goes through a link
    folder_run(5, "ds", None)  # no record of where it started: as typed
    data = {run.seed: run.data for run in find_runs([tmp_path / "outputs"])}
    assert data == {
        0: f"folder:{one / 'ds'}",
        1: f"folder:{one / 'ds'}",
        2: f"folder:{two / 'ds'}",
        3: f"folder:{one / 'ds'}",
        4: f"folder:{one / 'ds'}",
        5: "folder:ds",
    }


@pytest.mark.parametrize(
    ("overrides", "note"),
    [
        (((), ()), "All runs with the default settings."),
        ((("optim.lr=0.001",), ("optim.lr=0.001",)), "Settings of every run: optim.lr=0.001."),
        (((), ("optim.lr=0.001",)), "No setting is shared by every run: each row names its own"),
    ],
    ids=["defaults", "shared", "differing"],
)
def test_each_dataset_states_the_settings_its_runs_share(overrides, note, tmp_path):
    for seed, extra in enumerate(overrides):
        write_run(tmp_path / "outputs", "baseline", [0.6, 0.7], [0.6, 0.7], seed=seed, overrides=extra)
    build_report([tmp_path / "outputs"], tmp_path / "reports")
    assert note in (tmp_path / "reports" / "table1.md").read_text()


def test_latex_table_escapes_every_special_character_once():
    assert _tex_escape("a\\b^c~d_e&f%g$h#i{j}k ± –") == (
        "a\\textbackslash{}b\\textasciicircum{}c\\textasciitilde{}d\\_e\\&f\\%g\\$h\\#i\\{j\\}k $\\pm$ --"
    )


@pytest.mark.parametrize("setup", ["empty", "unrelated", "unfinished_only", "missing"])
def test_no_runs_is_a_clear_error_with_exit_2(setup, tmp_path):
    target = tmp_path / "outputs"
    if setup != "missing":
        target.mkdir()
    if setup == "unrelated":
        (target / "other" / ".hydra").mkdir(parents=True)
        (target / "other" / ".hydra" / "config.yaml").write_text("lr: 0.1\n")
        (target / "notes.txt").write_text("hello")
    if setup == "unfinished_only":
        write_run(target, "baseline", [0.5], [0.5], tested=False)
    with pytest.raises(SkinclfError, match="no finished runs found|no such folder"):
        build_report([target], tmp_path / "reports")
    assert not (tmp_path / "reports").exists()
    if setup == "empty":  # and through the real command line
        proc = subprocess.run(
            [sys.executable, "-m", "skinclf", "report", str(target), "--out", str(tmp_path / "reports")],
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 2
        assert proc.stderr.startswith("skinclf report: error: no finished runs found under")
        assert len(proc.stderr.strip().splitlines()) == 1


def test_a_file_given_for_a_folder_is_named_a_file(tmp_path, capsys):
    # "no such directory" would send the user looking for a typo in a path that exists.
    metrics = write_run(tmp_path / "runs", "baseline", [0.5], [0.5]) / "metrics.csv"
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["report", str(metrics), "--out", str(tmp_path / "reports")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"skinclf report: error: {metrics}: is a file; expected a run or multirun folder of `skinclf train`"
    )
    assert not (tmp_path / "reports").exists()


@pytest.mark.slow
def test_report_on_two_real_tiny_runs(tmp_path, shared_data_dir):
    run_dirs = []
    for model in ("baseline", "resnet"):
        proc = train_cli(
            *TINY,
            "trainer.max_epochs=2",
            f"model={model}",
            f"data.cache_dir={shared_data_dir}",
            "device=cpu",
            cwd=tmp_path,
        )
        run_dirs.append(run_dir_from_output(proc.stdout))
    proc = subprocess.run(
        [sys.executable, "-m", "skinclf", "report", "--out", "reports"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "2 finished" in proc.stdout
    out = tmp_path / "reports"
    for name in ("table1.csv", "table1.md", "table1.tex", "runs.csv", "confusion_matrix.csv", "curves.pdf"):
        assert (out / name).stat().st_size > 0
    for name in ("curves.png", "confusion_matrix.png", "roc.png"):
        with Image.open(out / name) as image:
            assert image.format == "PNG" and min(image.size) > 300
    table = pd.read_csv(out / "table1.csv")
    assert list(table["model"]) == ["baseline", "resnet"]
    for run_dir, row in zip(
        sorted(run_dirs, key=lambda p: "resnet" in p.name), table.itertuples(), strict=True
    ):
        metrics = json.loads((tmp_path / run_dir / "test_metrics.json").read_text())
        assert row.best_val_acc_pct_mean == pytest.approx(100 * metrics["best_val_acc"], abs=1e-3)
        assert row.test_acc_pct_mean == pytest.approx(100 * metrics["accuracy"], abs=1e-3)


def test_a_swept_boolean_reads_as_typed_and_as_the_same_setting(tmp_path):
    # Hydra's multirun writes a swept `recipe.augment.rot90=false` into overrides.yaml as `False`.
    flag = "recipe.augment.rot90"
    write_run(
        tmp_path, "resnet", [0.7, 0.8], [0.7, 0.8], seed=0, overrides=("optim.lr=0.001", f"{flag}=False")
    )
    write_run(
        tmp_path, "resnet", [0.6, 0.7], [0.7, 0.8], seed=1, overrides=("optim.lr=0.001", f"{flag}=false")
    )
    write_run(tmp_path, "baseline", [0.7, 0.8], [0.7, 0.8], seed=0)
    (group,) = [g for g in group_runs(find_runs([tmp_path]))["synthetic"] if g.model == "resnet"]
    assert group.label == f"resnet [optim.lr=0.001 {flag}=false]"
    assert len(group.runs) == 2


def test_seeds_that_differ_only_in_spelling_speed_or_a_spelled_out_default_are_one_row(tmp_path):
    root = tmp_path / "outputs"
    same_experiment = [
        (),
        ("optim.lr=1e-4",),  # the default, spelled out
        ("experiment=paper",),  # the paper's settings are the defaults
        ("trainer.num_threads=4", "trainer.checkpoint_every=5", "trainer.keep_freed_memory=false"),
    ]
    for seed, overrides in enumerate(same_experiment):
        write_run(root, "baseline", [0.6, 0.7], [0.6, 0.7], seed=seed, overrides=overrides)
    for seed, lr in enumerate(["1e-3", "0.001"]):  # one value, two spellings
        write_run(root, "baseline", [0.6, 0.8], [0.6, 0.8], seed=seed, overrides=(f"optim.lr={lr}",))
    groups = group_runs(finished(find_runs([root])))["synthetic"]
    assert [(g.label, len(g.runs)) for g in groups] == [("baseline", 4), ("baseline [optim.lr=0.001]", 2)]


def test_a_number_written_as_int_or_float_and_a_pipeline_choice_label_rows_by_their_values(tmp_path):
    root = tmp_path / "outputs"
    for seed, alpha in enumerate(["1", "1.0"]):
        write_run(
            root, "baseline", [0.6, 0.7], [0.6, 0.7], seed=seed, overrides=(f"recipe.mixup_alpha={alpha}",)
        )
    write_run(root, "res_aug", [0.6, 0.7], [0.6, 0.7], seed=0)
    # res_aug's own pipeline is the augmented one: the global default's name is a real change here.
    write_run(root, "res_aug", [0.6, 0.7], [0.6, 0.7], seed=1, overrides=("pipeline@model.pipeline=default",))
    groups = group_runs(finished(find_runs([root])))["synthetic"]
    assert sorted((g.label, len(g.runs)) for g in groups) == [
        ("baseline [recipe.mixup_alpha=1]", 2),
        ("res_aug", 1),
        ("res_aug [pipeline@model.pipeline=default]", 1),
    ]


def _set_cell(path: Path, row: int, column: str, value: str) -> None:
    frame = pd.read_csv(path, dtype=str)
    frame.loc[row, column] = value
    frame.to_csv(path, index=False)


def _cut_last_row(path: Path) -> None:
    """metrics.csv as a crash or a full disk leaves it: the last row ends after train_acc."""
    *rows, last = path.read_text().splitlines()
    path.write_text("\n".join([*rows, ",".join(last.split(",")[:3])]))


def _blank_line_then_high(path: Path) -> None:
    """A blank line after the header (an editor's), then a text accuracy in the second row."""
    _set_cell(path, 1, "val_acc", "high")
    header, *rows = path.read_text().splitlines()
    path.write_text("\n".join([header, "", *rows]) + "\n")


def _set_key(path: Path, key: str, value: object) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), key: value}))


def _set_config(path: Path, key: str, value: object) -> None:
    cfg = OmegaConf.load(path)
    OmegaConf.update(cfg, key, value)
    path.write_text(OmegaConf.to_yaml(cfg))  # an interpolation stays as typed


# (file, how it is damaged, what the run's problem must say)
DAMAGED_FILES = [
    ("metrics.csv", lambda p: _set_cell(p, 1, "val_acc", "nan"), "line 3: val_acc is empty or NaN"),
    ("metrics.csv", lambda p: _set_cell(p, 1, "val_acc", "high"), "line 3: val_acc is 'high'"),
    ("metrics.csv", lambda p: _set_cell(p, 2, "epoch", "3x"), "line 4: epoch is '3x'"),
    ("metrics.csv", _cut_last_row, "line 7: val_acc is empty or NaN"),
    ("metrics.csv", _blank_line_then_high, "line 4: val_acc is 'high'"),  # the file's own line
    ("test_metrics.json", lambda p: _set_key(p, "confusion", {}), "confusion is {}"),
    ("test_metrics.json", lambda p: _set_key(p, "roc_auc", None), "roc_auc is None"),
    ("test_metrics.json", lambda p: _set_key(p, "n_test", "64 images"), "n_test is '64 images'"),
    ("test_metrics.json", lambda p: _set_key(p, "accuracy", "0.71875"), "accuracy is '0.71875'"),
    (
        "test_metrics.json",
        lambda p: _set_key(p, "environment", {"torch": 2}),
        "environment is {'torch': 2}; expected an object of strings (channels_last: true or false)",
    ),
    (
        "test_metrics.json",
        lambda p: _set_key(p, "environment", {"source": True}),
        "environment is {'source': True}; expected an object of strings",
    ),
    ("test_metrics.json", lambda p: _set_key(p, "best_epoch", 0), "best_epoch=0, best_val_acc="),
    ("test_metrics.json", lambda p: _set_key(p, "best_val_acc", 87.5), "best_val_acc=87.5; expected"),
    (".hydra/config.yaml", lambda p: _set_config(p, "seed", "abc"), "seed=abc: expected an integer"),
    (
        ".hydra/config.yaml",
        lambda p: _set_config(p, "model.name", "${oops}"),
        "model.name: Interpolation key 'oops' not found",
    ),
]


def test_a_run_with_a_damaged_file_is_failed_and_the_rest_is_reported(tmp_path):
    root = tmp_path / "outputs"
    write_run(root, "resnet", *RESNET)
    expected = {}
    for seed, (name, damage, problem) in enumerate(DAMAGED_FILES):
        run_dir = write_run(root, "baseline", *BASELINE[0], seed=seed)
        damage(run_dir / name)
        expected[str(run_dir)] = (name, problem)
    build_report([root], tmp_path / "reports")
    runs = pd.read_csv(tmp_path / "reports" / "runs.csv").set_index("run_dir")
    for run_dir, (name, problem) in expected.items():
        status, found = runs.loc[run_dir, ["status", "problem"]]
        assert status == "failed" and found.startswith(name) and problem in found, (run_dir, found)
    table = pd.read_csv(tmp_path / "reports" / "table1.csv")
    assert list(zip(table["model"], table["n"], strict=True)) == [("resnet", 1)]


def test_table1_reports_the_checkpoint_the_run_tested(tmp_path):
    # A GPU resume whose redone epochs did not reproduce the interrupted attempt's best.pt tests
    # that checkpoint (epoch 2 at 0.9 here): metrics.csv holds only the redone epochs' numbers.
    run_dir = write_run(tmp_path / "outputs", "resnet", [0.6, 0.7, 0.8], [0.7, 0.8, 0.9])
    _set_key(run_dir / "test_metrics.json", "best_epoch", 2)
    _set_key(run_dir / "test_metrics.json", "best_val_acc", 0.9)
    build_report([tmp_path / "outputs"], tmp_path / "reports")
    [row] = pd.read_csv(tmp_path / "reports" / "runs.csv").to_dict("records")
    assert (row["best_epoch"], row["best_val_acc_pct"]) == (2, 90.0)
    [row] = pd.read_csv(tmp_path / "reports" / "table1.csv").to_dict("records")
    assert row["best_val_acc_pct_mean"] == 90.0 and row["max_train_acc_pct_mean"] == 90.0


@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        (("accuracy", 0.99), "test_metrics.json: accuracy is 0.99, but its confusion counts"),
        (("f1", 0.0), "test_metrics.json: f1 is 0.0, but its confusion counts"),
        ([1, 3, 7], "metrics.csv: epochs 1, 3, 7; expected one row per epoch, 1, 2, 3, ..."),
        ([1, 1, 2], "metrics.csv: epochs 1, 1, 2; expected one row per epoch"),
        (None, "test_metrics.json exists but metrics.csv is missing"),  # said "has no epochs"
    ],
)
def test_run_files_that_contradict_each_other_fail_the_run(tmp_path, damage, problem):
    # A hand-edited or mixed-up run (a test accuracy its own counts cannot give, epochs missing)
    # was counted as finished and went into Table 1 as it stood. (A best_epoch past metrics.csv's
    # last row is not one: a GPU resume with checkpoint_every > 1 may test the interrupted
    # attempt's later best.pt after its redone epochs stopped earlier.)
    good = write_run(tmp_path / "outputs", "baseline", [0.5, 0.6, 0.7], [0.5, 0.6, 0.7])
    run_dir = write_run(tmp_path / "outputs", "resnet", [0.5, 0.6, 0.7], [0.5, 0.6, 0.7])
    if isinstance(damage, tuple):
        _set_key(run_dir / "test_metrics.json", *damage)
    elif damage is None:
        (run_dir / "metrics.csv").unlink()
    else:
        history = pd.read_csv(run_dir / "metrics.csv")
        history["epoch"] = damage
        history.to_csv(run_dir / "metrics.csv", index=False)
    build_report([tmp_path / "outputs"], tmp_path / "reports")
    runs = pd.read_csv(tmp_path / "reports" / "runs.csv").set_index("run_dir")
    assert runs.loc[str(good), "status"] == "finished"
    assert runs.loc[str(run_dir), "status"] == "failed"
    assert problem in runs.loc[str(run_dir), "problem"]
    assert list(pd.read_csv(tmp_path / "reports" / "table1.csv")["model"]) == ["baseline"]


@pytest.mark.parametrize("record", ["x: [", "{a: 1}", None])
def test_a_run_whose_overrides_cannot_be_read_fails_instead_of_joining_the_defaults(tmp_path, record):
    # Read as "no overrides": an optim.lr=1e-3 run was reported in the default settings' row.
    run_dir = write_run(tmp_path / "outputs", "resnet", [0.5, 0.6], [0.5, 0.6], overrides=("optim.lr=0.001",))
    write_run(tmp_path / "outputs", "resnet", [0.5, 0.7], [0.5, 0.7])
    overrides = run_dir / ".hydra" / "overrides.yaml"
    if record is None:
        overrides.unlink()
    else:
        overrides.write_text(record)
    build_report([tmp_path / "outputs"], tmp_path / "reports")
    runs = pd.read_csv(tmp_path / "reports" / "runs.csv").set_index("run_dir")
    assert runs.loc[str(run_dir), "status"] == "failed"
    assert runs.loc[str(run_dir), "problem"].startswith(".hydra/overrides.yaml: missing or not a list")
    [row] = pd.read_csv(tmp_path / "reports" / "table1.csv").to_dict("records")
    assert row["n"] == 1 and row["best_val_acc_pct_mean"] == 70.0


def test_no_finished_runs_error_names_the_problem_of_a_failed_run(tmp_path):
    run_dir = write_run(tmp_path / "outputs", "baseline", [0.5], [0.5])
    (run_dir / "test_metrics.json").write_text("")
    with pytest.raises(SkinclfError) as err:
        build_report([tmp_path / "outputs"], tmp_path / "reports")
    message = str(err.value)
    assert "1 run folder found (1 failed)" in message
    assert f"{run_dir}: test_metrics.json is not valid JSON" in message
    assert "no test_metrics.json" not in message
    assert not (tmp_path / "reports").exists()


@pytest.mark.parametrize("where", ["a file", "under a file"])
def test_an_unwritable_out_is_one_error_before_any_work(where, tmp_path, monkeypatch, capsys):
    file = tmp_path / "notes.txt"
    file.write_text("keep me")
    out = file if where == "a file" else file / "reports"
    monkeypatch.setattr("skinclf.report.command.find_runs", fail_if_called("reading the runs"))
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["report", str(tmp_path), "--out", str(out)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"error: {out}: " in err
    assert file.read_text() == "keep me"


@pytest.mark.parametrize("where", ["a run folder", "inside a run folder"])
def test_an_out_in_a_run_folder_is_refused_before_any_work(where, tmp_path, monkeypatch, capsys):
    run_dir = write_run(tmp_path / "runs", "baseline", [0.5], [0.5])
    (run_dir / "roc.png").write_bytes(b"the run's own ROC curve")  # which the report's would replace
    before = {path: path.read_bytes() for path in run_dir.rglob("*") if path.is_file()}
    out = run_dir if where == "a run folder" else run_dir / "reports"
    monkeypatch.setattr("skinclf.report.command.find_runs", fail_if_called("reading the runs"))
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["report", str(tmp_path / "runs"), "--out", str(out)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"skinclf report: error: --out {out}: ") and len(err.splitlines()) == 1
    assert f"the run folder {run_dir}; expected" in err
    assert {path: path.read_bytes() for path in run_dir.rglob("*") if path.is_file()} == before
    assert not (run_dir / "reports").exists()


def test_an_out_inside_another_hydra_applications_folder_is_accepted(tmp_path):
    # A project folder that another Hydra application ran in (hydra.run.dir=.) is no skinclf run.
    project = tmp_path / "project"
    (project / ".hydra").mkdir(parents=True)
    (project / ".hydra" / "config.yaml").write_text("lr: 0.1\n")
    write_run(project / "runs", "baseline", [0.5], [0.5])
    build_report([project / "runs"], project / "reports")
    assert (project / "reports" / "table1.md").is_file()


def _fail_drawing_the_roc(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the report fail while writing its files, after the tables were made (a full disk)."""

    def fail(groups):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("skinclf.report.command.roc_figure", fail)


def test_a_report_that_fails_leaves_no_out_folder_behind(sweep, tmp_path, monkeypatch):
    _fail_drawing_the_roc(monkeypatch)
    with pytest.raises(OSError, match="No space left"):
        build_report([sweep], tmp_path / "new" / "reports")
    assert not (tmp_path / "new").exists()


def test_a_failed_report_leaves_an_earlier_report_as_it_was(sweep, tmp_path, monkeypatch):
    out = tmp_path / "reports"
    build_report([sweep], out)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    # The next report would change every table (a new run), but fails drawing its ROC.
    write_run(sweep / "more", "resnet", [0.5, 0.6], [0.6, 0.7], seed=1)
    _fail_drawing_the_roc(monkeypatch)
    with pytest.raises(OSError, match="No space left"):
        build_report([sweep], out)
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before  # no file of the failed report, and no staging folder, is left
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []


def _report_with_damaged_predictions(sweep: Path, out: Path, capsys) -> tuple[Path, str, pd.DataFrame]:
    """`skinclf report` of ``sweep``, whose res_aug run's predictions.csv the caller damaged:
    (that file, the report's stderr, runs.csv), after checking that everything else was written."""
    predictions = next(sweep.rglob("res_aug_*")) / "predictions.csv"
    cli_main(["report", str(sweep), "--out", str(out)])  # exit status 0, as for other damaged runs
    err = capsys.readouterr().err.strip()
    written = {p.name for p in out.iterdir()}
    assert written >= {"runs.csv", "table1.csv", "table1.md", "table1.tex", "curves.png", "curves.pdf"}
    assert {"confusion_matrix.csv", "roc.png"} <= written  # from the other runs
    # The run still counts in Table 1: only its ROC curve came from the damaged file.
    assert _row(pd.read_csv(out / "table1.csv"), "res_aug")["n"] == 1
    from skinclf.report.runs import check_test_predictions  # new with this behaviour

    groups = group_runs(finished(find_runs([sweep])))
    [res_aug] = [g for g in groups["synthetic"] if g.model == "res_aug"]
    check_test_predictions(res_aug.runs)
    assert roc_data(res_aug) is None
    return predictions, err, pd.read_csv(out / "runs.csv").set_index("model")


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("truncated", "predictions.csv line {n}: prob_mel is empty or NaN; expected a probability in [0, 1]"),
        ("no columns", "predictions.csv lacks columns ['label', 'prob_mel']; expected columns"),
        ("not CSV", "predictions.csv unreadable ("),
        ("empty", "predictions.csv unreadable (No columns to parse from file); expected columns"),
        ("missing", "predictions.csv missing; expected the file a tested run writes"),
    ],
    ids=["truncated", "no columns", "not CSV", "empty", "missing"],
)
def test_a_damaged_predictions_csv_costs_its_run_the_roc_curve_only(damage, message, sweep, tmp_path, capsys):
    predictions = next(sweep.rglob("res_aug_*")) / "predictions.csv"
    text = predictions.read_text()
    {
        "truncated": lambda: predictions.write_text(text[: text.rindex(",") + 1]),  # cut mid-row
        "no columns": lambda: pd.read_csv(predictions).iloc[:, :2].to_csv(predictions, index=False),
        "not CSV": lambda: predictions.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe" * 40),
        "empty": lambda: predictions.write_text(""),
        "missing": predictions.unlink,
    }[damage]()
    n = len(text.splitlines())  # the last line, cut short
    path, err, runs = _report_with_damaged_predictions(sweep, tmp_path / "reports", capsys)
    expected = message.format(n=n)
    assert err.startswith(f"skinclf report: warning: {path.parent}/{expected}") and len(err.splitlines()) == 1
    assert err.endswith("its run is left out of roc.png")
    assert runs.loc["res_aug", "status"] == "finished"
    assert runs.loc["res_aug", "problem"].startswith(expected)
    assert runs.loc["res_aug", "problem"].endswith("; left out of roc.png")


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("text probability", "line {n}: prob_mel is 'abc'; expected a probability in [0, 1]"),
        ("row cut short", "line {n}: prob_mel is empty or NaN; expected a probability in [0, 1]"),
        ("label 2", "line {n}: label is '2'; expected 0 (NV) or 1 (MEL)"),
        ("after a blank line", "line {n_after_blank}: prob_mel is 'abc'; expected a probability in [0, 1]"),
    ],
    ids=["text probability", "row cut short", "label 2", "after a blank line"],
)
def test_a_damaged_prediction_is_named_by_file_and_line(damage, message, sweep, tmp_path, capsys):
    predictions = next(sweep.rglob("res_aug_*")) / "predictions.csv"
    lines = predictions.read_text().splitlines()
    row = [line.split(",")[0] for line in lines].index("test") + 1  # the second test row
    split, index, label, prob = lines[row].split(",")
    lines[row] = {
        "text probability": f"{split},{index},{label},abc",
        "row cut short": f"{split},{index},{label}",
        "label 2": f"{split},{index},2,{prob}",
        "after a blank line": f"\n{split},{index},{label},abc",  # a line further down the file
    }[damage]
    predictions.write_text("\n".join(lines) + "\n")
    _, err, runs = _report_with_damaged_predictions(sweep, tmp_path / "reports", capsys)
    expected = message.format(n=row + 1, n_after_blank=row + 2)
    assert err == f"skinclf report: warning: {predictions} {expected}; its run is left out of roc.png"
    assert runs.loc["res_aug", "problem"] == f"predictions.csv {expected}; left out of roc.png"


def test_a_report_without_test_data_leaves_no_figure_of_an_earlier_report(sweep, tmp_path):
    out = tmp_path / "reports"
    build_report([sweep], out)
    assert (out / "confusion_matrix.png").exists() and (out / "roc.png").exists()
    untested = write_run(tmp_path / "untested", "baseline", *BASELINE[0])  # a split with no test images
    pd.read_csv(untested / "predictions.csv").iloc[:0].to_csv(untested / "predictions.csv", index=False)
    _set_key(untested / "test_metrics.json", "n_test", 0)
    _, written = build_report([tmp_path / "untested"], out)
    assert {p.name for p in written} >= {"table1.md", "curves.png"}
    for name in ("confusion_matrix.csv", "confusion_matrix.png", "roc.png"):
        assert not (out / name).exists(), name  # the first report's, of other runs


# A file name's byte that is no UTF-8 (Linux allows any), as Python keeps it in a str: "\udcff".
NOT_UTF8 = os.fsdecode(b"\xff")


@pytest.mark.skipif(sys.platform != "linux", reason="file names of any bytes are Linux's")
def test_file_names_that_are_no_utf8_keep_their_bytes_in_csv_files_and_show_escaped_in_text(tmp_path):
    # A run folder and a folder dataset's root so named: the report must not die writing them.
    root = tmp_path / "outputs"
    named = write_run(root, "baseline", *BASELINE[0]).rename(root / f"run_{NOT_UTF8}")
    folder_run = write_run(root, "resnet", *RESNET)
    data_root = tmp_path.resolve() / f"ds_{NOT_UTF8}"  # as the report keys it
    _set_config(folder_run / ".hydra" / "config.yaml", "data.name", "folder")
    _set_config(folder_run / ".hydra" / "config.yaml", "data.root", str(data_root))
    out = tmp_path / "reports"
    cli_main(["report", str(root), "--out", str(out)])
    # CSV files hold the names' own bytes: what they name can be found again (read back as
    # Python strings: pandas' pyarrow strings, where installed, refuse such names).
    with python_strings():
        runs = pd.read_csv(out / "runs.csv", encoding_errors="surrogateescape")
        table = pd.read_csv(out / "table1.csv", encoding_errors="surrogateescape")
        confusion = pd.read_csv(out / "confusion_matrix.csv", encoding_errors="surrogateescape")
    assert sorted(runs["run_dir"]) == sorted([str(named), str(folder_run)])
    assert all(Path(run_dir).is_dir() for run_dir in runs["run_dir"])
    assert f"folder:{data_root}" in set(runs["data"])
    assert set(table["data"]) == {"synthetic", f"folder:{data_root}"}
    assert str(named) in set(confusion["run_dir"])
    # Markdown, LaTeX and the figures' titles show the byte escaped, as UTF-8 text.
    shown = f"folder:{tmp_path.resolve()}/ds_\\xff data"
    assert f"## Dataset: {shown}" in (out / "table1.md").read_text()
    assert "ds\\_\\textbackslash{}xff data" in (out / "table1.tex").read_text()
    assert {"curves.png", "curves.pdf", "roc.png"} <= {p.name for p in out.iterdir()}


def test_tables_are_utf8_under_an_ascii_locale(tmp_path):
    # A model named beyond ASCII, reported under the C locale without UTF-8 mode (the locale's
    # encoding is then ASCII, as cp1252 is narrower than UTF-8 on Windows): table1.md and .tex
    # were written in the locale's encoding, and the report died.
    root = tmp_path / "outputs"
    run = write_run(root, "resnet", *RESNET)
    _set_config(run / ".hydra" / "config.yaml", "model.name", "résnet")
    env = {**os.environ, "LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
    out = tmp_path / "reports"
    proc = subprocess.run(
        [sys.executable, "-m", "skinclf", "report", str(root), "--out", str(out)],
        capture_output=True,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    assert "| **résnet** |" in (out / "table1.md").read_text(encoding="utf-8")
    assert "résnet" in (out / "table1.tex").read_text(encoding="utf-8")


@pytest.mark.skipif(sys.platform != "linux", reason="file names of any bytes are Linux's")
def test_a_skipped_image_whose_name_is_no_utf8_is_logged_in_train_log(tmp_path):
    # (Here beside the report's own test of such names: a run's train.log is what its row in
    # runs.csv sends the user to.) A strict log file loses the line to `--- Logging error ---`.
    root = tmp_path / "ds"
    for split in ("train", "val", "test"):
        for label in ("MEL", "NV"):
            (root / split / label).mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (32, 32), (40 * i, 90, 0)).save(root / split / label / f"{label}_{i}.png")
    bad = root / "train" / "MEL" / f"bad{NOT_UTF8}.png"
    bad.write_text("not an image")
    proc = train_cli(
        "data=folder",
        f"data.root={root}",
        "data.skip_bad_images=true",
        f"data.cache_dir={tmp_path / 'cache'}",
        "trainer.max_epochs=1",
        "trainer.progress=never",
        cwd=tmp_path,
    )
    assert "Logging error" not in proc.stderr
    log = (run_dir_from_output(proc.stdout) / "train.log").read_text()
    assert f"skipped bad image {root}/train/MEL/bad\\udcff.png: not an image file" in log
