"""Resume: a run interrupted after any epoch finishes with exactly the metrics of an uninterrupted one."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from skinclf import train
from skinclf.config import compose_config
from skinclf.errors import SkinclfError
from skinclf.run_files import RUN_CONFIG, STATUS_FILE
from skinclf.run_folder import claim_run_dir, comparable_config, remove_leftover_temporaries
from skinclf.train import run
from skinclf.training import loop
from skinclf.training.checkpoint import load_checkpoint, save_checkpoint
from skinclf.training.environment import environment_history

from conftest import TINY, run_dir_from_output, train_cli

SMALL = [
    "data.train_size=32",
    "data.val_size=8",
    "data.test_size=8",
    "trainer.max_epochs=3",
    "data.batch_size=16",
]


def in_process(shared_data_dir: Path, *extra: str) -> list[str]:
    """Overrides for a small in-process run on the shared built-in data."""
    return [f"data.cache_dir={shared_data_dir}", "trainer.progress=never", *SMALL, *extra]


def _same_results(a: Path, b: Path) -> None:
    """metrics.csv equal but for the wall-clock column; test_metrics.json equal."""
    metrics_a = pd.read_csv(a / "metrics.csv").drop(columns="seconds")
    metrics_b = pd.read_csv(b / "metrics.csv").drop(columns="seconds")
    pd.testing.assert_frame_equal(metrics_a, metrics_b)
    assert json.loads((a / "test_metrics.json").read_text()) == json.loads(
        (b / "test_metrics.json").read_text()
    )


class _Crash(Exception):
    pass


def _crash_once_metrics_have(epochs: int, write_metrics=loop._write_metrics):
    """A stand-in for the loop's metrics.csv writer that writes, then crashes the run when the
    file holds ``epochs`` epochs: killed between epochs, wherever the last checkpoint was."""

    def write(path, history):
        write_metrics(path, history)
        if len(history) == epochs:
            raise _Crash

    return write


def test_resume_after_a_crash_between_epochs_matches_an_uninterrupted_run(
    tmp_path: Path, shared_data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # augmented: the resumed run must also continue the augmentation random stream exactly.
    overrides = in_process(shared_data_dir, "model=augmented")
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    run(compose_config(overrides), straight)

    real_save = loop.save_checkpoint

    def crash_after_second_epoch(state, path):
        real_save(state, path)
        if Path(path).name == "last.pt" and state["epoch"] == 2:
            raise _Crash  # killed after last.pt, before metrics.csv got its row

    monkeypatch.setattr(loop, "save_checkpoint", crash_after_second_epoch)
    with pytest.raises(_Crash):
        run(compose_config(overrides), interrupted)
    assert not (interrupted / "test_metrics.json").exists()
    assert len(pd.read_csv(interrupted / "metrics.csv")) == 1
    monkeypatch.setattr(loop, "save_checkpoint", real_save)

    run(compose_config([*overrides, "resume=true"]), interrupted)
    _same_results(straight, interrupted)


def test_resume_continues_the_dropout_random_stream_as_an_uninterrupted_run(
    tmp_path: Path, shared_data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # resnet: its dropout draws its masks from torch's global random stream (not the loop's own
    # generator), which the resume must restore too. In this process a resume re-seeds it and
    # builds the model anew, so without the restore the redone epochs would reuse epoch 1's masks.
    overrides = in_process(shared_data_dir, "model=resnet", "trainer.max_epochs=2")
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    run(compose_config(overrides), straight)

    monkeypatch.setattr(loop, "_write_metrics", _crash_once_metrics_have(1))
    with pytest.raises(_Crash):
        run(compose_config(overrides), interrupted)
    monkeypatch.undo()
    assert load_checkpoint(interrupted / "last.pt")["epoch"] == 1

    run(compose_config([*overrides, "resume=true"]), interrupted)
    _same_results(straight, interrupted)


def test_a_resume_in_another_environment_is_said_and_recorded(
    tmp_path: Path, shared_data_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Epochs 1-2 on this machine, the rest on "a CPU, 1 thread" (its recorded machine scripted):
    # test_metrics.json lists both environments (it recorded only the last one).
    overrides = in_process(shared_data_dir)
    real_environment = train.run_environment
    monkeypatch.setattr(loop, "_write_metrics", _crash_once_metrics_have(2))
    with pytest.raises(_Crash):
        run(compose_config(overrides), tmp_path)
    monkeypatch.undo()
    one_thread = {**real_environment(torch.device("cpu")), "machine": "a CPU, 1 thread"}
    monkeypatch.setattr(train, "run_environment", lambda device: one_thread)
    with caplog.at_level(logging.WARNING, logger="skinclf"):
        run(compose_config([*overrides, "resume=true"]), tmp_path)
    assert "epochs 1-2 were trained in another environment (machine " in caplog.text
    recorded = json.loads((tmp_path / "test_metrics.json").read_text())
    began, resumed = recorded["environments"]
    assert (began["from_epoch"], resumed["from_epoch"]) == (1, 3)
    assert began["machine"] == real_environment(torch.device("cpu"))["machine"] != resumed["machine"]
    assert recorded["environment"] == {key: value for key, value in resumed.items() if key != "from_epoch"}
    assert resumed["machine"] == "a CPU, 1 thread" and resumed["precision"] == began["precision"]


def _interrupted_after(epochs: int, out: Path, overrides: list[str], monkeypatch, environments) -> None:
    """A run stopped after ``epochs``, its last.pt's record of environments replaced (``...``:
    removed, as an older skinclf wrote it)."""
    monkeypatch.setattr(loop, "_write_metrics", _crash_once_metrics_have(epochs))
    with pytest.raises(_Crash):
        run(compose_config(overrides), out)
    monkeypatch.undo()
    state = load_checkpoint(out / "last.pt")
    state.pop("environments")
    if environments is not ...:
        state["environments"] = environments
    torch.save(state, out / "last.pt")


def test_epochs_an_older_skinclf_trained_are_recorded_as_of_an_unknown_environment(
    tmp_path: Path, shared_data_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    overrides = in_process(shared_data_dir)
    _interrupted_after(1, tmp_path, overrides, monkeypatch, ...)
    with caplog.at_level(logging.WARNING, logger="skinclf"):
        run(compose_config([*overrides, "resume=true"]), tmp_path)
    assert (
        "epoch 1 was trained by a skinclf that did not record where; the rest train in this one"
        in caplog.text
    )
    recorded = json.loads((tmp_path / "test_metrics.json").read_text())
    unknown, resumed = recorded["environments"]
    assert unknown == {"from_epoch": 1, "unknown": True}
    assert resumed == {"from_epoch": 2, **recorded["environment"]}


def test_a_resume_elsewhere_with_no_epoch_left_says_that_only_the_test_runs_there(
    tmp_path: Path, shared_data_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    overrides = in_process(shared_data_dir)  # 3 epochs: stopped after the last, before the test
    real_environment = train.run_environment
    monkeypatch.setattr(loop, "_write_metrics", _crash_once_metrics_have(3))
    with pytest.raises(_Crash):
        run(compose_config(overrides), tmp_path)
    monkeypatch.undo()
    monkeypatch.setattr(
        train, "run_environment", lambda device: {**real_environment(device), "machine": "a CPU, 1 thread"}
    )
    with caplog.at_level(logging.WARNING, logger="skinclf"):
        run(compose_config([*overrides, "resume=true"]), tmp_path)
    assert "epochs 1-3 were trained in another environment (machine " in caplog.text
    assert "only the test runs in this one" in caplog.text and "uninterrupted" not in caplog.text
    recorded = json.loads((tmp_path / "test_metrics.json").read_text())
    assert [entry["from_epoch"] for entry in recorded["environments"]] == [1, 4]  # 4: tested only


def test_a_fold_with_no_epoch_left_says_so_and_names_its_own_record(tmp_path: Path, caplog) -> None:
    # A grid-search fold is never tested: its last.pt at the last epoch has nothing left to train.
    last = tmp_path / "last.pt"
    save_checkpoint({"epoch": 3, "environments": [{"from_epoch": 1, "machine": "A"}]}, last)
    with caplog.at_level(logging.WARNING, logger="skinclf"):
        history = environment_history(last, {"machine": "B"}, True, 3, "fold_result.json", tested=False)
    assert history == [{"from_epoch": 1, "machine": "A"}, {"from_epoch": 4, "machine": "B"}]
    assert (
        "epochs 1-3 were trained in another environment (machine 'A' -> 'B'); no epoch is left to "
        "train in this one (fold_result.json lists each)"
    ) in caplog.text


@pytest.mark.parametrize("environments", ["abc", [1], [{"machine": "a CPU"}], [{"from_epoch": 1, "x": [1]}]])
def test_a_damaged_record_of_environments_is_one_error_naming_the_checkpoint(
    tmp_path: Path, shared_data_dir: Path, monkeypatch: pytest.MonkeyPatch, environments
) -> None:
    overrides = in_process(shared_data_dir)
    _interrupted_after(2, tmp_path, overrides, monkeypatch, environments)
    with pytest.raises(SkinclfError, match="last.pt: its epoch or record of environments is damaged"):
        run(compose_config([*overrides, "resume=true"]), tmp_path)


def test_a_last_checkpoint_without_the_schedule_this_recipe_needs_is_one_error(
    tmp_path: Path, shared_data_dir: Path
) -> None:
    # An older skinclf trained recipe.warmup_epochs with the constant schedule as no schedule at
    # all: its last.pt holds no scheduler state, though its config is this one.
    overrides = in_process(shared_data_dir, "recipe.warmup_epochs=1")
    run(compose_config(overrides), tmp_path)
    last = tmp_path / "last.pt"
    state = torch.load(last, weights_only=True)
    del state["scheduler"]
    torch.save(state, last)
    (tmp_path / "test_metrics.json").unlink()  # unfinished, as it was
    with pytest.raises(SkinclfError) as err:
        run(compose_config([*overrides, "resume=true"]), tmp_path)
    assert str(err.value).startswith(f"{last}: holds no scheduler state, which this recipe needs (")


@pytest.mark.parametrize(
    ("other", "message"),
    [
        ("seed=1", "its config differs in seed"),
        ("model=resnet", "its config differs in model.arch._target_"),
        (
            "model=resnet stored-without-config",
            "does not fit this run's model (Error(s) in loading state_dict",
        ),
    ],
)
def test_a_last_checkpoint_of_another_run_is_refused(tmp_path: Path, shared_data_dir: Path, other, message):
    # Only the data's hash was compared: another seed's last.pt (copied in by hand) resumed without
    # a word, and another model's ended in load_state_dict's traceback, naming no file.
    override, _, variant = other.partition(" ")
    overrides = in_process(shared_data_dir)
    run(compose_config(overrides), tmp_path / "mine")
    run(compose_config([*overrides, override]), tmp_path / "other")
    last = tmp_path / "mine" / "last.pt"
    state = torch.load(tmp_path / "other" / "last.pt", weights_only=True)
    if variant:
        del state["config"]  # as skinclf versions before configs were stored wrote it
    last.unlink()  # a hard link to best.pt
    torch.save(state, last)
    (tmp_path / "mine" / "test_metrics.json").unlink()  # unfinished, as it was
    with pytest.raises(SkinclfError) as err:
        run(compose_config([*overrides, "resume=true"]), tmp_path / "mine")
    assert str(err.value).startswith(f"{last}: ")
    assert message in str(err.value)


def test_sparser_checkpoints_resume_by_redoing_the_epochs_since(
    tmp_path: Path, shared_data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    overrides = in_process(
        shared_data_dir, "model=augmented", "trainer.max_epochs=5", "trainer.checkpoint_every=2"
    )
    real_save, real_link, real_write_metrics = loop.save_checkpoint, loop.link_checkpoint, loop._write_metrics
    last_saves = []

    def recording_save(state, path):
        real_save(state, path)
        if Path(path).name == "last.pt":
            last_saves.append(state["epoch"])

    def recording_link(source, path):  # an improving epoch's last.pt: a second name of best.pt
        real_link(source, path)
        last_saves.append(load_checkpoint(path, mmap=True)["epoch"])

    monkeypatch.setattr(loop, "save_checkpoint", recording_save)
    monkeypatch.setattr(loop, "link_checkpoint", recording_link)
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    run(compose_config(overrides), straight)
    assert last_saves == [2, 4, 5]  # every second epoch, and after the last

    # Three epochs in metrics.csv, the checkpoint after the second.
    monkeypatch.setattr(loop, "_write_metrics", _crash_once_metrics_have(3))
    with pytest.raises(_Crash):
        run(compose_config(overrides), interrupted)
    assert len(pd.read_csv(interrupted / "metrics.csv")) == 3
    monkeypatch.setattr(loop, "_write_metrics", real_write_metrics)

    last_saves.clear()
    run(compose_config([*overrides, "resume=true"]), interrupted)
    assert last_saves == [4, 5]  # resumed after epoch 2: epoch 3 redone, then on as before
    _same_results(straight, interrupted)


def test_a_best_checkpoint_the_redone_epochs_do_not_reproduce_is_the_one_reported(
    tmp_path: Path,
    shared_data_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Redone epochs differ only where kernels do not repeat exactly (GPU): scripted here through
    # the validation accuracy that fit() sees.
    overrides = in_process(shared_data_dir, "trainer.max_epochs=4", "trainer.checkpoint_every=2")
    real_evaluate, real_write_metrics = loop.evaluate, loop._write_metrics
    # Epochs 1-3; after the resume (from epoch 2's last.pt) epochs 3 and 4.
    val_accs = iter([0.5, 0.6, 0.9, 0.1, 0.2])

    def scripted_evaluate(*args, **kwargs):
        loss, _, probs = real_evaluate(*args, **kwargs)
        return loss, next(val_accs), probs

    monkeypatch.setattr(loop, "evaluate", scripted_evaluate)
    monkeypatch.setattr(loop, "_write_metrics", _crash_once_metrics_have(3))
    with pytest.raises(_Crash):
        run(compose_config(overrides), tmp_path / "run")
    monkeypatch.setattr(loop, "_write_metrics", real_write_metrics)
    with caplog.at_level(logging.WARNING, logger="skinclf"):
        metrics = run(compose_config([*overrides, "resume=true"]), tmp_path / "run")
    # best.pt still holds the first attempt's epoch 3 (0.9), the run's own record says epoch 2.
    assert (metrics["best_epoch"], metrics["best_val_acc"]) == (3, pytest.approx(0.9))
    assert "best.pt is from epoch 3 of the interrupted attempt" in caplog.text


def test_a_resume_keeps_the_precision_auto_picked_when_the_run_began(
    tmp_path: Path,
    shared_data_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # trainer.precision=auto picks by hardware: fp32 where the run began, bf16 on the machine that
    # resumes it (scripted, so that the test means the same on every CPU).
    real_resolve, real_write_metrics = train.resolve_precision, loop._write_metrics

    def auto_picks(precision: str):
        monkeypatch.setattr(
            train,
            "resolve_precision",
            lambda name, device: precision if name == "auto" else real_resolve(name, device),
        )

    overrides = in_process(shared_data_dir, "trainer.precision=auto")
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    auto_picks("fp32")
    run(compose_config(overrides), straight)
    monkeypatch.setattr(loop, "_write_metrics", _crash_once_metrics_have(2))
    with pytest.raises(_Crash):
        run(compose_config(overrides), interrupted)
    monkeypatch.setattr(loop, "_write_metrics", real_write_metrics)

    auto_picks("bf16")
    with caplog.at_level(logging.WARNING, logger="skinclf"):
        run(compose_config([*overrides, "resume=true"]), interrupted)
    assert "was trained in fp32: the resume goes on in fp32, not in the bf16" in caplog.text
    _same_results(straight, interrupted)  # bf16 epochs would have given other numbers


def test_a_run_folder_is_never_resumed_under_another_config(tmp_path: Path) -> None:
    cfg = compose_config(["model=resnet", "seed=1"])
    assert claim_run_dir(tmp_path, cfg) == "new"
    assert (tmp_path / RUN_CONFIG).exists()
    # What may change on resume (resume itself, device, threads, checkpoint interval) still matches.
    same = compose_config(
        [
            "model=resnet",
            "seed=1",
            "resume=true",
            "device=cpu",
            "trainer.num_threads=1",
            "trainer.checkpoint_every=5",
        ]
    )
    assert claim_run_dir(tmp_path, same) == "unfinished"
    (tmp_path / "test_metrics.json").write_text("{}")
    assert claim_run_dir(tmp_path, same) == "finished"
    with pytest.raises(SkinclfError, match=r"different config \(changed: optim.lr, seed\)"):
        claim_run_dir(tmp_path, compose_config(["model=resnet", "seed=2", "optim.lr=0.01"]))


def test_a_relative_data_root_typed_in_another_folder_is_another_config(tmp_path, monkeypatch) -> None:
    run_dir, one, two = tmp_path / "run", tmp_path / "one", tmp_path / "two"
    for folder in (run_dir, one / "ds", two / "ds"):
        folder.mkdir(parents=True)
    cfg = compose_config(["data=folder", "data.root=ds"])
    monkeypatch.chdir(one)
    assert claim_run_dir(run_dir, cfg) == "new"
    assert json.loads((run_dir / RUN_CONFIG).read_text())["data"]["root"] == os.path.realpath(one / "ds")
    assert claim_run_dir(run_dir, compose_config(["data=folder", "data.root=./ds"])) == "unfinished"
    monkeypatch.chdir(two)  # the same command in another folder: another dataset
    with pytest.raises(SkinclfError, match=r"different config \(changed: data.root\)"):
        claim_run_dir(run_dir, cfg)

    # A folder from before roots were stored absolute: its root is taken from its launch's folder.
    stored = json.loads((run_dir / RUN_CONFIG).read_text())
    stored["data"]["root"] = "ds"
    (run_dir / RUN_CONFIG).write_text(json.dumps(stored))
    (run_dir / ".hydra").mkdir()
    (run_dir / ".hydra" / "hydra.yaml").write_text(f"hydra:\n  runtime:\n    cwd: {one}\n")
    with pytest.raises(SkinclfError, match=r"changed: data.root"):
        claim_run_dir(run_dir, cfg)
    monkeypatch.chdir(one)
    assert claim_run_dir(run_dir, cfg) == "unfinished"


def test_an_unreadable_run_config_is_one_error_naming_it(tmp_path: Path) -> None:
    (tmp_path / RUN_CONFIG).write_text("")
    with pytest.raises(SkinclfError, match=rf"{tmp_path / RUN_CONFIG}: unreadable"):
        claim_run_dir(tmp_path, compose_config([]))


def test_a_refused_resume_or_a_rerun_leaves_a_finished_folder_as_it_was(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    train_cli(*TINY, f"hydra.run.dir={run_dir}", "trainer.progress=never", cwd=tmp_path)
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    refused = train_cli(
        *TINY, f"hydra.run.dir={run_dir}", "resume=true", "optim.lr=1e-3", cwd=tmp_path, check=False
    )
    assert refused.returncode == 2 and "different config (changed: optim.lr)" in refused.stderr
    # The same config again, without resume=true: nothing is retrained over the results.
    again = train_cli(*TINY, f"hydra.run.dir={run_dir}", "trainer.progress=never", cwd=tmp_path)
    assert f"{run_dir}: holds a finished run of this config; nothing to do" in again.stdout
    assert run_dir_from_output(again.stdout) == run_dir
    # Its .hydra/ record (which the report reads the settings from) and status are untouched.
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before


def test_a_folder_another_process_is_training_in_is_refused_until_it_ends(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    train_cli(*TINY, f"hydra.run.dir={run_dir}", "trainer.progress=never", cwd=tmp_path)
    (run_dir / "test_metrics.json").unlink()  # unfinished, as while it trains
    trainer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        status = {"status": "running", "launch": None, "pid": trainer.pid, "host": socket.gethostname()}
        (run_dir / STATUS_FILE).write_text(json.dumps(status))
        before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
        refused = train_cli(*TINY, f"hydra.run.dir={run_dir}", "resume=true", cwd=tmp_path, check=False)
        assert refused.returncode == 2
        assert f"{run_dir}: is being trained now by process {trainer.pid} on this machine" in refused.stderr
        assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before
        # The same status naming another machine, or this process (a sweep's earlier job), is no
        # reason to refuse: only a live process here is known to be training.
        for other in ({"host": "another-node"}, {"pid": os.getpid()}):
            (run_dir / STATUS_FILE).write_text(json.dumps({**status, **other}))
            assert (
                claim_run_dir(run_dir, compose_config([*TINY, "resume=true"]), single_run=True)
                == "unfinished"
            )
        (run_dir / STATUS_FILE).write_text(json.dumps(status))
    finally:
        trainer.kill()
        trainer.wait()
    # Once it has ended (killed here, so its status still says running) the resume goes ahead.
    resumed = train_cli(*TINY, f"hydra.run.dir={run_dir}", "resume=true", cwd=tmp_path)
    assert (run_dir / "test_metrics.json").exists() and "resuming" in resumed.stdout + resumed.stderr


@pytest.mark.skipif(os.name != "posix", reason="flock is POSIX")
def test_a_folder_locked_by_a_process_that_has_not_yet_recorded_itself_is_refused(tmp_path: Path) -> None:
    # Two resumes started in the same instant: the first holds the folder's lock before its
    # job_status.json says running, so the status check alone would let the second in.
    import fcntl

    run_dir = tmp_path / "run"
    train_cli(*TINY, f"hydra.run.dir={run_dir}", "trainer.progress=never", cwd=tmp_path)
    (run_dir / "test_metrics.json").unlink()  # unfinished: resumable
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    fd = os.open(run_dir, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        refused = train_cli(*TINY, f"hydra.run.dir={run_dir}", "resume=true", cwd=tmp_path, check=False)
        assert refused.returncode == 2
        assert f"{run_dir}: is being trained now by another process on this machine" in refused.stderr
        after = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
        assert after == before
    finally:
        os.close(fd)
    resumed = train_cli(*TINY, f"hydra.run.dir={run_dir}", "resume=true", cwd=tmp_path)
    assert (run_dir / "test_metrics.json").exists() and "resuming" in resumed.stdout + resumed.stderr


def test_a_launch_refused_because_another_holds_its_new_folder_leaves_that_folder(tmp_path, monkeypatch):
    # Two launches into one new folder: both see it missing, so each counts it as made by itself.
    # The one refused at the lock must not then remove it as a folder nothing ran in: the other
    # holds it and may not have written its records yet.
    from skinclf import train_command
    from skinclf.run_folder import FolderBusy

    run_dir = tmp_path / "run"

    @contextlib.contextmanager
    def held_by_another(out_dir):
        (out_dir / RUN_CONFIG).write_text("{}")  # the other's claim, nothing trained yet
        raise FolderBusy(f"{out_dir}: is being trained now by another process on this machine")
        yield

    monkeypatch.setattr(train_command, "run_dir_lock", held_by_another)
    refused = train_cli(*TINY, f"hydra.run.dir={run_dir}", cwd=tmp_path, check=False)
    assert refused.returncode == 2 and "being trained now by another process" in refused.stderr
    assert (run_dir / RUN_CONFIG).read_text() == "{}"


def test_a_resume_refused_for_a_bad_setting_leaves_an_unfinished_folder_as_it_was(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    train_cli(*TINY, f"hydra.run.dir={run_dir}", "trainer.progress=never", cwd=tmp_path)
    (run_dir / "test_metrics.json").unlink()  # as if stopped before testing: resumable
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    # checkpoint_every may change on resume, so the folder's config accepts it; its value may not.
    refused = train_cli(
        *TINY,
        f"hydra.run.dir={run_dir}",
        "resume=true",
        "trainer.checkpoint_every=0",
        cwd=tmp_path,
        check=False,
    )
    assert refused.returncode == 2 and "trainer.checkpoint_every=0: must be at least 1" in refused.stderr
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before
    # The same command without resume=true would train it anew over its checkpoint: refused, and
    # nothing rewritten: not its .hydra/ record (num_threads may differ from the run's), nor a
    # run_config.json that an older skinclf wrote (which a resume would bring up to date).
    _as_an_older_skinclf_wrote_it(run_dir, "eval.target_sensitivity")
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    again = train_cli(
        *TINY,
        f"hydra.run.dir={run_dir}",
        "trainer.progress=never",
        "trainer.num_threads=1",
        cwd=tmp_path,
        check=False,
    )
    assert again.returncode == 2
    assert f"{run_dir}: holds an unfinished run of this config; add resume=true" in again.stderr
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("result", ["metrics.csv", "last.pt", "test_metrics.json"])
def test_a_runs_results_without_their_config_record_are_never_trained_over(tmp_path, result):
    # A folder from a skinclf before run_config.json, or with the file removed: its config is
    # unknown, so resuming or overwriting it could mix two experiments (it counted as new).
    (tmp_path / result).write_text("kept")
    for resume in ("false", "true"):
        with pytest.raises(SkinclfError, match=rf"{tmp_path}: holds a run's {result} but no {RUN_CONFIG}"):
            claim_run_dir(tmp_path, compose_config([f"resume={resume}"]), single_run=True)
    assert [p.name for p in tmp_path.iterdir()] == [result]


def test_a_refused_resume_keeps_a_run_stopped_before_its_first_epoch(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    train_cli(*TINY, f"hydra.run.dir={run_dir}", "trainer.progress=never", cwd=tmp_path)
    for path in run_dir.iterdir():  # as if stopped while the data loaded: its records only
        if path.name not in {".hydra", "run_config.json", "job_status.json", "train.log"}:
            path.unlink()
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    for bad in ("optim.lr=1e-3", "seed=-1"):  # another config; a bad setting
        refused = train_cli(*TINY, f"hydra.run.dir={run_dir}", "resume=true", bad, cwd=tmp_path, check=False)
        assert refused.returncode == 2, refused.stderr
        assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before


def test_a_resume_that_fails_on_its_data_records_it_and_resumes_once_fixed(tmp_path: Path) -> None:
    # Accepted, then failed (not refused): the folder says so, and stays resumable.
    from test_data_folder import make_dataset

    root = make_dataset(tmp_path / "ds", {"train": (8, 8), "val": (4, 4), "test": (4, 4)})
    run_dir = tmp_path / "run"
    args = ["data=folder", f"data.root={root}", "data.decode_cache=false", "trainer.max_epochs=2"]
    train_cli(*args, f"hydra.run.dir={run_dir}", "trainer.progress=never", cwd=tmp_path)
    (run_dir / "test_metrics.json").unlink()  # as if stopped before testing: resumable
    root.rename(tmp_path / "moved")
    failed = train_cli(*args, f"hydra.run.dir={run_dir}", "resume=true", cwd=tmp_path, check=False)
    assert failed.returncode == 2 and str(root) in failed.stderr
    status = json.loads((run_dir / "job_status.json").read_text())
    assert status["status"] == "failed" and str(root) in status["error"]
    assert (run_dir / "last.pt").exists() and (run_dir / "metrics.csv").exists()
    (tmp_path / "moved").rename(root)
    train_cli(*args, f"hydra.run.dir={run_dir}", "resume=true", "trainer.progress=never", cwd=tmp_path)
    assert json.loads((run_dir / "job_status.json").read_text())["status"] == "done"
    assert json.loads((run_dir / "test_metrics.json").read_text())["n_test"] == 8


# A training process killed outright (SIGKILL) while it writes its first best.pt, half written.
_KILLED_WHILE_SAVING = """
import os, signal, sys
from skinclf import cli, io

save = io._save_without_crc32

def save_half_and_die(obj, path):
    if not path.name.startswith(".best.pt."):
        return save(obj, path)  # the data cache
    path.write_bytes(b"half a checkpoint")
    os.kill(os.getpid(), signal.SIGKILL)

io._save_without_crc32 = save_half_and_die
cli.main(["train", *sys.argv[1:]])
"""


def test_a_resume_removes_what_a_killed_process_left_half_written(tmp_path, shared_data_dir) -> None:
    run_dir = tmp_path / "run"
    overrides = [*in_process(shared_data_dir), f"hydra.run.dir={run_dir}"]
    killed = subprocess.run(
        [sys.executable, "-c", _KILLED_WHILE_SAVING, *overrides], cwd=tmp_path, capture_output=True, text=True
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    left = [path.name for path in run_dir.glob(".*.tmp")]
    assert len(left) == 1 and left[0].startswith(".best.pt."), left  # what the resume must remove

    train_cli(*overrides, "resume=true", cwd=tmp_path)
    assert not list(run_dir.glob(".*.tmp"))
    assert (run_dir / "test_metrics.json").exists()
    log = (run_dir / "train.log").read_text()
    assert f"removed what an interrupted process left half-written: {left[0]}" in log


def test_only_skinclfs_own_temporaries_are_removed_grid_folds_included(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    for folder in (run_dir / "fold_1", run_dir / "notes", run_dir / ".hydra"):
        folder.mkdir(parents=True)
    ours = []
    written = [(run_dir, "last.pt"), (run_dir / "fold_1", "best.pt"), (run_dir / ".hydra", "config.yaml")]
    for folder, name in written:
        fd, path = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)  # as atomic_write
        os.close(fd)
        ours.append(Path(path))
    others = [
        run_dir / ".draft.tmp",
        run_dir / ".notes.abcd1234.tmp",  # shaped as atomic_write's, of a file no run writes
        run_dir / "notes" / ".best.pt.abcd1234.tmp",
        run_dir / "best.pt",
    ]
    for path in others:
        path.write_text("a user's")
    remove_leftover_temporaries(run_dir)
    assert not any(path.exists() for path in ours) and all(path.exists() for path in others)


def _as_an_older_skinclf_wrote_it(run_dir: Path, *dotted_keys: str) -> None:
    """Drop keys from run_config.json, as if the folder came from a version without them."""
    stored = json.loads((run_dir / RUN_CONFIG).read_text())
    for dotted in dotted_keys:
        *parents, leaf = dotted.split(".")
        node = stored
        for key in parents:
            node = node[key]
        del node[leaf]
    (run_dir / RUN_CONFIG).write_text(json.dumps(stored))


def test_a_folder_from_an_older_skinclf_resumes_unless_a_new_key_is_overridden(tmp_path, caplog):
    overrides = ["model=resnet", "seed=1"]
    assert claim_run_dir(tmp_path, compose_config(overrides), overrides) == "new"
    _as_an_older_skinclf_wrote_it(tmp_path, "eval.target_sensitivity", "recipe.augment")
    # The new keys at their configured values, no override naming them: the same run, recorded anew.
    with caplog.at_level(logging.WARNING, logger="skinclf"):
        assert claim_run_dir(tmp_path, compose_config(overrides), overrides) == "unfinished"
    assert "predates the config keys eval.target_sensitivity, recipe.augment" in caplog.text
    assert json.loads((tmp_path / RUN_CONFIG).read_text()) == comparable_config(compose_config(overrides))
    # A new key the command line sets (itself or inside it) is a change the old run never had.
    _as_an_older_skinclf_wrote_it(tmp_path, "eval.target_sensitivity", "recipe.augment")
    for extra, key in [
        ("eval.target_sensitivity=0.95", "eval.target_sensitivity"),
        ("recipe.augment.enabled=false", "recipe.augment"),
    ]:
        with pytest.raises(SkinclfError, match=rf"\(changed: {key}\)"):
            claim_run_dir(tmp_path, compose_config([*overrides, extra]), [*overrides, extra])
    # A key the old version had and this one lacks is a difference too.
    stored = json.loads((tmp_path / RUN_CONFIG).read_text())
    (tmp_path / RUN_CONFIG).write_text(json.dumps({**stored, "retired_key": 1}))
    with pytest.raises(SkinclfError, match=r"changed: .*retired_key"):
        claim_run_dir(tmp_path, compose_config(overrides), overrides)


@pytest.mark.slow
def test_sigkill_after_epoch_k_then_resume_matches_an_uninterrupted_run(
    tmp_path: Path, shared_data_dir: Path
) -> None:
    overrides = [f"data.cache_dir={shared_data_dir}", "model=resnet", *SMALL, "trainer.max_epochs=5"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    train_cli(*overrides, f"hydra.run.dir={straight}", cwd=tmp_path)

    k = 2
    proc = subprocess.Popen(
        [sys.executable, "-m", "skinclf", "train", *overrides, f"hydra.run.dir={killed}"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            metrics = killed / "metrics.csv"
            if metrics.exists() and len(metrics.read_text().strip().splitlines()) - 1 >= k:
                os.kill(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.02)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (killed / "test_metrics.json").exists()

    resumed = train_cli(*overrides, f"hydra.run.dir={killed}", "resume=true", cwd=tmp_path)
    assert "resuming from" in (killed / "train.log").read_text()
    assert str(killed) in resumed.stdout
    _same_results(straight, killed)


def test_a_resume_on_changed_data_is_refused_and_the_run_resumes_once_it_is_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "ds"
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for label in ("MEL", "NV"):
            (root / split / label).mkdir(parents=True)
            for i in range(4):
                pixels = rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / label / f"{i}.png")
    overrides = [
        "data=folder",
        f"data.root={root}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "data.batch_size=4",
        "trainer.max_epochs=3",
        "trainer.progress=never",
    ]
    out = tmp_path / "run"
    monkeypatch.setattr(loop, "_write_metrics", _crash_once_metrics_have(1))
    with pytest.raises(_Crash):
        run(compose_config(overrides), out)
    monkeypatch.undo()

    def swap_classes() -> None:  # the same files, config and paths; MEL and NV trade labels
        train = root / "train"
        os.rename(train / "MEL", train / "was_mel")
        os.rename(train / "NV", train / "MEL")
        os.rename(train / "was_mel", train / "NV")

    swap_classes()
    with pytest.raises(
        SkinclfError, match=r"last\.pt: trained on other images or labels than the data gives now"
    ):
        run(compose_config([*overrides, "resume=true"]), out)
    swap_classes()
    run(compose_config([*overrides, "resume=true"]), out)
    assert len(pd.read_csv(out / "metrics.csv")) == 3
