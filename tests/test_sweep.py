"""Sweeps: thread division, GPU spread, launcher and experiment configs, skip / resume / failure of
sweep jobs, the end-of-sweep summary, and whole sweeps through the joblib and submitit launchers."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from importlib.resources import files
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
from hydra.types import RunMode
from omegaconf import OmegaConf

from skinclf import train_arguments, train_command
from skinclf.config import compose_config
from skinclf.errors import SkinclfError
from skinclf.models import PAPER_MODELS
from skinclf.run_files import REFUSED_PREFIX, RUN_CONFIG, STATUS_FILE, SWEEP_SUMMARY
from skinclf.run_folder import read_status, write_status
from skinclf.sweep import resources
from skinclf.sweep.jobs import current_launch, record_stopped_jobs, run_sweep_job, start_launch
from skinclf.sweep.summary import JobsSummary, SweepSummary, collect_jobs

from conftest import TINY, train_cli

CONF = Path(__file__).resolve().parents[1] / "conf"


@pytest.mark.parametrize(
    ("setting", "launcher", "cores", "expected"),
    [
        (None, None, 8, None),  # a single run: torch's own default
        (None, {"_target_": "BasicLauncher"}, 8, None),  # jobs one after another
        (None, {"n_jobs": 2}, 2, 1),  # two jobs on two cores: one thread each
        (None, {"n_jobs": 2}, 16, 8),
        (None, {"n_jobs": 3}, 16, 5),
        (None, {"n_jobs": -1}, 16, 1),  # joblib: one job per core
        (None, {"n_jobs": -2}, 16, 1),  # 15 jobs on 16 cores
        (None, {"n_jobs": 32}, 16, 1),  # more jobs than cores: never 0 threads
        (None, {"cpus_per_task": 4, "gpus_per_node": 1}, 64, 4),  # submitit: the job's own cores
        (3, {"n_jobs": 2}, 16, 3),  # trainer.num_threads wins
    ],
)
def test_threads_are_divided_between_parallel_jobs(setting, launcher, cores, expected) -> None:
    assert resources.threads_per_job(setting, launcher, cores) == expected


# joblib itself raised on 0 with a traceback; +0 is 0 too
@pytest.mark.parametrize(("launcher", "zero"), [("local", "0"), ("joblib", "0"), ("joblib", "+0")])
def test_a_launcher_with_no_jobs_is_refused(tmp_path: Path, launcher: str, zero: str) -> None:
    with pytest.raises(SkinclfError, match="n_jobs"):
        resources.threads_per_job(None, {"n_jobs": 0}, 4)
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    sweep = tmp_path / "sweep"
    args = [
        "-m",
        "seed=0,1",
        f"hydra/launcher={launcher}",
        f"hydra.launcher.n_jobs={zero}",
        f"hydra.sweep.dir={sweep}",
    ]
    proc = train_cli(*args, cwd=tmp_path, check=False)
    assert proc.returncode == 2
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith("skinclf train: error: hydra.launcher.n_jobs=0: expected a positive number")
    assert not sweep.exists()


def test_parallel_jobs_spread_over_gpus() -> None:
    assert [resources.spread_device("auto", job, 4) for job in range(6)] == [
        "cuda:0",
        "cuda:1",
        "cuda:2",
        "cuda:3",
        "cuda:0",
        "cuda:1",
    ]
    assert resources.spread_device("auto", 3, 1) == "auto"  # one GPU (or Slurm's own): unchanged
    assert resources.spread_device("auto", None, 4) == "auto"  # a single run
    assert resources.spread_device("cpu", 3, 4) == "cpu"  # an explicit device is kept
    assert resources.spread_device("cuda:1", 3, 4) == "cuda:1"
    assert resources.default_parallel_jobs(cores=64, gpus=4) == 4
    assert resources.default_parallel_jobs(cores=16, gpus=0) == 4
    assert resources.default_parallel_jobs(cores=2, gpus=0) == 1


def test_paper_experiment_sweeps_all_eight_combinations() -> None:
    cfg = compose_config(["experiment=paper"], return_hydra_config=True)
    models = str(cfg.hydra.sweeper.params.model).split(",")
    assert models == list(PAPER_MODELS)
    assert all((CONF / "model" / f"{m}.yaml").exists() for m in models)
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"
    assert (cfg.optim.lr, cfg.data.batch_size, cfg.trainer.max_epochs, cfg.trainer.patience) == (
        1e-4,
        64,
        30,
        10,
    )
    assert str(cfg.recipe.optimizer) == "adam"


def test_paper_experiment_with_the_modern_recipe_takes_the_recipes_optimiser_settings() -> None:
    # The experiment pins the study's schedule (batch, epochs, patience), not the optimiser: the
    # recipe chosen on the command line brings its own, as it does without experiment=paper.
    modern = compose_config(["recipe=modern"])
    cfg = compose_config(["experiment=paper", "recipe=modern"])
    assert (cfg.recipe.optimizer, cfg.optim.lr, cfg.optim.weight_decay) == (
        "adamw",
        modern.optim.lr,
        modern.optim.weight_decay,
    )
    assert cfg.optim.lr != 1e-4 and (cfg.data.batch_size, cfg.trainer.max_epochs) == (64, 30)
    assert compose_config(["experiment=paper", "recipe=modern", "optim.lr=3e-4"]).optim.lr == 3e-4


def test_grid_search_config_turns_on_cross_validation() -> None:
    cfg = compose_config(["hparams_search=grid"], return_hydra_config=True)
    assert cfg.cv.folds == 5
    assert set(cfg.hydra.sweeper.params) == {"data.batch_size", "optim.lr"}
    assert compose_config([]).cv.folds == 0


def test_launcher_configs_compose() -> None:
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    local = compose_config(["hydra/launcher=local"], return_hydra_config=True).hydra.launcher
    assert local._target_ == "hydra_plugins.skinclf_launcher.LocalLauncher"
    # One job per GPU where there are GPUs, else per 4 cores.
    gpus = torch.cuda.device_count()
    assert local.n_jobs == resources.default_parallel_jobs(resources.available_cores(), gpus) >= 1
    slurm = compose_config(["hydra/launcher=slurm"], return_hydra_config=True).hydra.launcher
    assert slurm._target_ == "hydra_plugins.skinclf_launcher.SlurmLauncher"  # a killed job fails alone
    slurm_local = compose_config(["hydra/launcher=slurm_local"], return_hydra_config=True).hydra.launcher
    assert slurm_local._target_ == "hydra_plugins.skinclf_launcher.SlurmLocalLauncher"
    assert (slurm.gpus_per_node, slurm.timeout_min) == (1, 240)
    assert slurm.max_num_timeout > 0  # requeued jobs resume, so retrying a timeout is safe


def _job(tmp_path: Path, sweep: Path, num: int, task, *overrides: str) -> str:
    out = sweep / f"{num}_job"
    out.mkdir(parents=True, exist_ok=True)
    cfg = compose_config([f"data.cache_dir={tmp_path / 'data'}", *overrides])
    return run_sweep_job(cfg, out, task, num, sweep, list(overrides))


@contextlib.contextmanager
def caplog_to(path: Path):
    """skinclf's log lines appended to ``path`` inside, as Hydra's file handler does for a job."""
    handler = logging.FileHandler(path)
    logger = logging.getLogger("skinclf")
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        handler.close()


@pytest.mark.skipif(os.name != "posix", reason="flock is POSIX")
def test_a_sweep_job_whose_folder_another_process_holds_is_refused_not_run(tmp_path: Path, capsys) -> None:
    import fcntl

    sweep = tmp_path / "sweep"
    start_launch(sweep)
    calls: list[int] = []

    def finishing(cfg, out_dir):
        calls.append(int(cfg.seed))
        (out_dir / "test_metrics.json").write_text("{}")

    (sweep / "0_job").mkdir()
    (sweep / "0_job" / "train.log").write_text("the other launch's log\n")
    fd = os.open(sweep / "0_job", os.O_RDONLY)  # another launch's job, not yet recorded as running
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with caplog_to(sweep / "0_job" / "train.log"):  # where Hydra sends the job's log lines
            assert _job(tmp_path, sweep, 0, finishing, "seed=0") == "failed"
        assert calls == []
        assert "job 0 failed: " in capsys.readouterr().err
        assert not (sweep / "0_job" / RUN_CONFIG).exists()  # not claimed: its holder's to write
        assert (sweep / "0_job" / "train.log").read_text() == "the other launch's log\n"
        assert "log:" not in collect_jobs(sweep, current_launch(sweep)).format(sweep)
    finally:
        os.close(fd)
    assert _job(tmp_path, sweep, 0, finishing, "seed=0") == "done" and calls == [0]


def test_sweep_jobs_skip_finished_resume_unfinished_and_record_failures(tmp_path: Path, capsys) -> None:
    sweep = tmp_path / "sweep"
    calls: list[tuple[int, bool]] = []

    def finishing(cfg, out_dir):
        calls.append((int(cfg.seed), bool(cfg.resume)))
        (out_dir / "test_metrics.json").write_text("{}")

    def interrupted(cfg, out_dir):
        calls.append((int(cfg.seed), bool(cfg.resume)))
        (out_dir / "last.pt").write_bytes(b"")  # it got as far as a checkpoint: resumable
        raise RuntimeError("killed mid-epoch\nsecond line")

    def bad_input(cfg, out_dir):
        raise SkinclfError("trainer.precision=bogus: expected one of auto, fp32, bf16, fp16")

    first = start_launch(sweep)
    # As Hydra's job logging: the crash's traceback goes to the job's log file, not the console.
    log_file, console = logging.FileHandler(tmp_path / "job.log"), logging.StreamHandler(sys.stdout)
    logging.getLogger().addHandler(log_file)
    logging.getLogger().addHandler(console)
    try:
        assert _job(tmp_path, sweep, 0, finishing, "seed=0") == "done"
        assert _job(tmp_path, sweep, 1, interrupted, "seed=1") == "failed"
        assert _job(tmp_path, sweep, 2, bad_input, "trainer.precision=bogus") == "failed"
    finally:
        for handler in (log_file, console):
            logging.getLogger().removeHandler(handler)
            handler.close()
    assert calls == [(0, False), (1, False)]
    printed = capsys.readouterr()
    assert "job 2 failed: trainer.precision=bogus" in printed.err
    assert "job 1 failed: killed mid-epoch" in printed.err and "Traceback" not in printed.out + printed.err
    logged = (tmp_path / "job.log").read_text()
    assert (
        "job 1 failed: RuntimeError: killed mid-epoch" in logged
        and "Traceback (most recent call last)" in logged
    )

    jobs = collect_jobs(sweep, first)
    assert [Path(d).name for d in jobs.done] == ["0_job"]
    assert [Path(f["dir"]).name for f in jobs.failed] == ["1_job", "2_job"]
    assert jobs.failed[0]["error"] == "killed mid-epoch"
    assert jobs.failed[1]["log"] == str(sweep / "2_job" / "train.log")
    text = jobs.format(sweep)
    assert "3 jobs: 1 done, 0 skipped (finished before), 2 failed" in text
    assert f"log: {sweep / '1_job' / 'train.log'}" in text

    # Re-launch: the finished job is skipped, the interrupted one resumes.
    second = start_launch(sweep)
    calls.clear()
    assert _job(tmp_path, sweep, 0, finishing, "seed=0") == "skipped"
    assert _job(tmp_path, sweep, 1, finishing, "seed=1") == "done"
    assert calls == [(1, True)]
    jobs = collect_jobs(sweep, second)
    assert (len(jobs.done), len(jobs.skipped), len(jobs.failed)) == (1, 1, 0)  # job 2 not re-launched

    # A job killed outright never reports: still "running" at the end, it counts as failed.
    status = json.loads((sweep / "0_job" / STATUS_FILE).read_text())
    (sweep / "0_job" / STATUS_FILE).write_text(json.dumps({**status, "status": "running"}))
    assert "killed" in collect_jobs(sweep, second).failed[0]["error"]

    # A job folder holding another config's results is refused, not overwritten: its status
    # stays as it was, and the refusal is recorded beside it for this launch's summary.
    third = start_launch(sweep)
    before = (sweep / "0_job" / STATUS_FILE).read_text()
    assert _job(tmp_path, sweep, 0, finishing, "seed=5") == "failed"
    assert calls == [(1, True)]
    assert (sweep / "0_job" / STATUS_FILE).read_text() == before
    (refused,) = collect_jobs(sweep, third).failed
    assert refused["dir"] == str(sweep / "0_job") and "different config" in refused["error"]
    assert collect_jobs(sweep, second).failed[0]["dir"] == str(sweep / "0_job")  # its own record

    # A torn or hand-edited record (of any launch) is passed over: the summary still comes.
    (sweep / "5_job").mkdir()
    (sweep / "5_job" / STATUS_FILE).write_text('{"status": "done", "launch": ')
    (sweep / "6_job").mkdir()
    (sweep / "6_job" / STATUS_FILE).write_text(json.dumps({"launch": third}))
    (sweep / f"{REFUSED_PREFIX}7_job.json").write_text("[]")
    jobs = collect_jobs(sweep, third)
    assert [Path(f["dir"]).name for f in jobs.failed] == ["0_job", "6_job"] and not jobs.done


def _report(sweep: Path, tmp_path: Path) -> pd.DataFrame:
    out = tmp_path / "report"
    subprocess.run(
        [sys.executable, "-m", "skinclf", "report", str(sweep), "--out", str(out)],
        check=True,
        capture_output=True,
        text=True,
        timeout=600,
    )
    return pd.read_csv(out / "table1.csv")


def _check_sweep_and_report(sweep: Path, models: list[str], tmp_path: Path) -> None:
    """Each model in its own numbered job folder, finished; Table 1 has each model's numbers."""
    job_dirs = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name[0].isdigit())
    assert [p.name for p in job_dirs] == [f"{i}_{m}" for i, m in enumerate(models)]
    summary = json.loads((sweep / SWEEP_SUMMARY).read_text())
    assert len(summary["done"]) == len(models) and not summary["failed"]
    table = _report(sweep, tmp_path).set_index("model")
    assert sorted(table.index) == sorted(models)
    for job in job_dirs:
        metrics = json.loads((job / "test_metrics.json").read_text())
        model = job.name.split("_", 1)[1]
        assert table.loc[model, "best_val_acc_pct_mean"] == pytest.approx(
            100 * metrics["best_val_acc"], abs=0.01
        )


MODELS = ["baseline", "batch_norm", "resnet"]


@pytest.mark.slow
def test_joblib_sweep_over_three_models_then_report(tmp_path: Path, shared_data_dir: Path) -> None:
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    sweep = tmp_path / "sweep"
    proc = train_cli(
        "-m",
        f"model={','.join(MODELS)}",
        *TINY,
        f"data.cache_dir={shared_data_dir}",
        "hydra/launcher=local",
        "hydra.launcher.n_jobs=2",
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
    )
    assert "3 jobs: 3 done, 0 skipped (finished before), 0 failed" in proc.stdout
    _check_sweep_and_report(sweep, MODELS, tmp_path)


def _local_sweep_where_job_1_is_hit(tmp_path: Path, data_dir: Path, *hit: str) -> tuple[Path, str]:
    """Run seeds 0, 1, 2 two at a time with the local launcher, with the overrides ``hit`` that
    signal job 1; check that only job 1 failed. Returns the sweep folder and the printed output."""
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    sweep = tmp_path / "sweep"
    proc = train_cli(
        "-m",
        "seed=0,1,2",
        *TINY,
        f"data.cache_dir={data_dir}",
        *hit,
        "hydra/launcher=local",
        "hydra.launcher.n_jobs=2",
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "3 jobs: 2 done, 0 skipped (finished before), 1 failed" in proc.stdout, proc.stdout + proc.stderr
    for job in ("0_baseline", "2_baseline"):
        assert (sweep / job / "test_metrics.json").exists()
        # Each job knew how many ran beside it.
        assert OmegaConf.load(sweep / job / ".hydra" / "hydra.yaml").hydra.launcher.n_jobs == 2
    return sweep, proc.stdout


def _signal_while_training(signum: int) -> list[str]:
    """Overrides that send ``signum`` to job 1's process as it builds its model."""
    return [
        "model.arch._target_=conftest.SimpleCNNKilledAtSeed",
        "+model.arch.kill_seed=1",
        "+model.arch.seed=${seed}",
        f"+model.arch.signum={int(signum)}",
    ]


@pytest.mark.parametrize("when", ["training", "starting"])
def test_a_job_killed_outright_fails_alone_and_the_jobs_beside_it_go_on(
    tmp_path: Path, shared_data_dir: Path, when: str
) -> None:
    """Joblib's pool breaks when one of its processes dies, ending the jobs beside it; Hydra's
    joblib launcher then aborts the whole sweep. The local launcher gives each job its own
    process, and records a killed one as failed: once it runs ("running" in its status file), or
    before it has recorded anything."""
    if when == "training":
        hit = _signal_while_training(signal.SIGKILL)
    else:
        hit = ["+hydra.callbacks.killer._target_=conftest.KilledAtJobStart", "+hydra.callbacks.killer.seed=1"]
    sweep, stdout = _local_sweep_where_job_1_is_hit(tmp_path, shared_data_dir, *hit)
    killed = "its process was killed (exit code SIGKILL(-9); out of memory?); a re-launch resumes it"
    assert f"FAILED {sweep / '1_baseline'}: {killed}" in stdout
    assert f"job #1: {killed}" in stdout


def test_a_new_job_takes_the_gpu_slot_that_a_finished_job_left(tmp_path: Path, shared_data_dir: Path) -> None:
    """With device=auto on several GPUs, a local sweep job trains on GPU (its slot mod GPUs). Job 2
    starts when job 1 ends, while job 0 still runs (it waits for job 2's folder): it takes job
    1's slot, and so job 1's GPU, not GPU (2 mod 2) = job 0's, busy, while job 1's idles."""
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    sweep = tmp_path / "sweep"
    train_cli(
        "-m",
        "seed=0,1,2",
        *TINY,
        f"data.cache_dir={shared_data_dir}",
        "model.arch._target_=conftest.SimpleCNNWaitingAtSeed",
        "+model.arch.wait_seed=0",
        "+model.arch.seed=${seed}",
        f"+model.arch.wait_for={sweep / '2_baseline'}",
        "hydra/launcher=local",
        "hydra.launcher.n_jobs=2",
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
    )
    slots = [
        OmegaConf.load(sweep / f"{job}_baseline" / ".hydra" / "hydra.yaml").hydra.launcher.slot
        for job in range(3)
    ]
    assert slots == [0, 1, 1]  # the lowest free slot: job 2 got 1, so job 0 still held 0
    assert [resources.spread_device("auto", slot, 2) for slot in slots] == ["cuda:0", "cuda:1", "cuda:1"]


def test_a_job_stopped_by_a_signal_of_its_own_fails_alone(tmp_path: Path, shared_data_dir: Path) -> None:
    """An out-of-memory daemon (earlyoom) sends SIGTERM to the biggest process: one job, not the
    sweep. That job stops and the others go on."""
    hit = _signal_while_training(signal.SIGTERM)
    sweep, _ = _local_sweep_where_job_1_is_hit(tmp_path, shared_data_dir, *hit)
    assert json.loads((sweep / "1_baseline" / STATUS_FILE).read_text())["status"] == "stopped"


def _local_sweep_process(
    tmp_path: Path, shared_data_dir: Path, seeds: str, max_epochs: int, **output: Any
) -> tuple[subprocess.Popen, Path]:
    """`skinclf train -m seed=SEEDS` of baseline jobs on 256 images, two at a time under the local
    launcher, in a process of its own (to be signalled); and its sweep folder."""
    sweep = tmp_path / "sweep"
    args = [*TINY[1:3], "data.train_size=256", f"trainer.max_epochs={max_epochs}", "trainer.progress=never"]
    args += [f"data.cache_dir={shared_data_dir}", "hydra/launcher=local", "hydra.launcher.n_jobs=2"]
    command = [sys.executable, "-m", "skinclf", "train", "-m", f"seed={seeds}", *args]
    return subprocess.Popen([*command, f"hydra.sweep.dir={sweep}"], cwd=tmp_path, **output), sweep


def test_kill_stops_a_local_sweep_and_the_jobs_it_runs(tmp_path: Path, shared_data_dir: Path) -> None:
    """`kill` of the sweep stops its running jobs as it stops a run (resumable), instead of
    waiting for them to finish; the jobs not begun are not begun."""
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    proc, sweep = _local_sweep_process(
        tmp_path, shared_data_dir, "0,1,2", 5, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    logs = [sweep / f"{job}_baseline" / "train.log" for job in (0, 1)]
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        if all(log.exists() and "data=synthetic: train" in log.read_text() for log in logs):
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM
    for log in logs:
        job = log.parent
        assert json.loads((job / STATUS_FILE).read_text())["status"] == "stopped"
        assert "stopped by SIGTERM (resumable)" in log.read_text()
        assert not (job / "test_metrics.json").exists()
        assert not [p.name for p in job.iterdir() if p.suffix == ".tmp"]
    assert not (sweep / "2_baseline").exists()


@pytest.mark.slow
def test_the_job_processes_of_a_sweep_killed_outright_end_on_their_own(tmp_path, shared_data_dir) -> None:
    """A launcher killed with SIGKILL cannot shut its job processes down: they finish their jobs,
    then end once idle (loky's worker timeout), instead of waiting forever with their memory."""
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    from skinclf.sweep.launcher import WORKER_IDLE_TIMEOUT_S

    proc, sweep = _local_sweep_process(
        tmp_path, shared_data_dir, "0,1", 3, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    statuses = [sweep / f"{job}_baseline" / STATUS_FILE for job in (0, 1)]
    deadline = time.monotonic() + 300
    while not all(status.exists() for status in statuses) and time.monotonic() < deadline:
        time.sleep(0.05)
    records = [json.loads(status.read_text()) for status in statuses]
    workers = [record["pid"] for record in records]
    proc.kill()
    # Killed while its jobs ran: the launcher had no chance to shut their processes down.
    assert [record["status"] for record in records] == ["running", "running"]
    proc.wait()
    deadline = time.monotonic() + WORKER_IDLE_TIMEOUT_S + 150  # jobs to finish, idle, loky's 30 s exit
    while _alive(workers) and time.monotonic() < deadline:
        time.sleep(0.5)
    left = _alive(workers)
    for pid in left:  # not to leave them behind the test
        os.kill(pid, signal.SIGKILL)
    assert not left
    assert all(json.loads(status.read_text())["status"] == "done" for status in statuses)


def _alive(pids: list[int]) -> list[int]:
    """Those of ``pids`` whose process still runs (not a zombie awaiting its parent)."""
    running = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            running.append(pid)
    return running


def test_jobs_divide_the_cores_between_the_jobs_the_sweep_has(tmp_path: Path, shared_data_dir: Path) -> None:
    """n_jobs=-1 is one job per core; a sweep of two jobs still gets all the cores, half each."""
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    sweep = tmp_path / "sweep"
    train_cli(
        "-m",
        "seed=0,1",
        *TINY,
        f"data.cache_dir={shared_data_dir}",
        "hydra/launcher=local",
        "hydra.launcher.n_jobs=-1",
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
    )
    for job in ("0_baseline", "1_baseline"):
        launcher = OmegaConf.load(sweep / job / ".hydra" / "hydra.yaml").hydra.launcher
        assert launcher.n_jobs == min(2, resources.available_cores())


@pytest.mark.slow
def test_submitit_local_sweep_over_three_models_then_report(tmp_path: Path, shared_data_dir: Path) -> None:
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    sweep = tmp_path / "sweep"
    proc = train_cli(
        "-m",
        f"model={','.join(MODELS)}",
        *TINY,
        f"data.cache_dir={shared_data_dir}",
        "hydra/launcher=submitit_local",
        "hydra.launcher.timeout_min=20",
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
    )
    assert "3 jobs: 3 done" in proc.stdout
    _check_sweep_and_report(sweep, MODELS, tmp_path)


def test_the_slurm_launchers_change_to_submitit_is_undone_however_the_launch_ends() -> None:
    submitit = pytest.importorskip("submitit")
    from skinclf.sweep import cluster

    before = dict(vars(submitit.AutoExecutor))
    with pytest.raises(KeyboardInterrupt), cluster._lost_jobs_recorded(None, [], 0):
        assert "map_array" in vars(submitit.AutoExecutor)  # wrapped for this launch
        raise KeyboardInterrupt  # Ctrl-C while the launch waits for its jobs
    assert dict(vars(submitit.AutoExecutor)) == before


KILLER_MODEL = """
import os, signal
from torch import nn

class Killer(nn.Module):  # dies as the out-of-memory killer kills: SIGKILL, nothing recorded
    def __init__(self, **kwargs):
        super().__init__()
        os.kill(os.getpid(), signal.SIGKILL)
"""

STOPPER_MODEL = """
from torch import nn

class Stopper(nn.Module):  # stopped in training, as by Ctrl-C or a time limit's requeue
    def __init__(self, **kwargs):
        super().__init__()
        self.layer = nn.Linear(1, 1)

    def forward(self, images):
        if images.device.type != "meta":  # skinclf's check of the model's output runs on meta
            raise KeyboardInterrupt
        return self.layer(images[:, 0, 0, :1])
"""


def _slurm_local_sweep_beside_baseline(
    tmp_path: Path, shared_data_dir: Path, monkeypatch: pytest.MonkeyPatch, name: str, module: str
) -> tuple[subprocess.CompletedProcess, Path]:
    """A slurm_local sweep of model=NAME (class ``NAME.capitalize()`` in ``module``'s text, a
    model of the user's own) and baseline, on the shared built-in data; (its process, its folder)."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    code, configs = tmp_path / "code", tmp_path / "my_conf" / "model"
    code.mkdir()
    configs.mkdir(parents=True)
    (code / f"my_{name}.py").write_text(module)
    baseline = files("skinclf.conf").joinpath("model", "baseline.yaml").read_text()
    own = baseline.replace("name: baseline", f"name: {name}")
    (configs / f"{name}.yaml").write_text(
        own.replace("skinclf.models.simple_cnn.SimpleCNN", f"my_{name}.{name.capitalize()}")
    )
    monkeypatch.setenv("PYTHONPATH", f"{code}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    sweep = tmp_path / "sweep"
    proc = train_cli(
        "-m",
        f"model={name},baseline",
        f"hydra.searchpath=[file://{tmp_path / 'my_conf'}]",
        *TINY,
        f"data.cache_dir={shared_data_dir}",
        "hydra/launcher=slurm_local",
        "hydra.launcher.timeout_min=20",
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "2 jobs: 1 done, 0 skipped (finished before), 1 failed" in proc.stdout
    return proc, sweep


@pytest.mark.slow
def test_a_slurm_local_job_killed_outright_fails_alone(
    tmp_path: Path, shared_data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Hydra's submitit launchers raised the killed job's UncompletedJobError as the launch's own:
    # a traceback, no summary, the other jobs no longer waited for.
    _, sweep = _slurm_local_sweep_beside_baseline(
        tmp_path, shared_data_dir, monkeypatch, "killer", KILLER_MODEL
    )
    failed = json.loads((sweep / SWEEP_SUMMARY).read_text())["failed"]
    assert [job["dir"] for job in failed] == [str(sweep / "0_killer")]
    assert "ended without a result (out of memory, scancel, a lost node?" in failed[0]["error"]


@pytest.mark.slow
def test_a_slurm_local_job_that_recorded_its_stop_is_not_called_lost(
    tmp_path: Path, shared_data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A stopped job leaves submitit no result, as a killed one does: the launch said it "ended
    # without a result (out of memory, scancel, a lost node?)" though its folder said stopped.
    proc, sweep = _slurm_local_sweep_beside_baseline(
        tmp_path, shared_data_dir, monkeypatch, "stopper", STOPPER_MODEL
    )
    assert read_status(sweep / "0_stopper")["status"] == "stopped"
    assert "ended without a result" not in proc.stdout + proc.stderr
    assert f"FAILED {sweep / '0_stopper'}: stopped; re-launch to resume it" in proc.stdout


@pytest.mark.slow
def test_failed_job_does_not_stop_the_sweep_and_relaunch_retrains_nothing(
    tmp_path: Path, shared_data_dir: Path
) -> None:
    sweep = tmp_path / "sweep"
    args = [
        "-m",
        "model=baseline,resnet",
        "trainer.precision=fp32,bogus",  # a bad value for one point of the grid
        *TINY,
        f"data.cache_dir={shared_data_dir}",
        f"hydra.sweep.dir={sweep}",
    ]
    proc = train_cli(*args, cwd=tmp_path, check=False)
    assert proc.returncode == 1, proc.stderr
    assert "4 jobs: 2 done, 0 skipped (finished before), 2 failed" in proc.stdout
    for failed in ("1_baseline", "3_resnet"):
        assert f"FAILED {sweep / failed}: trainer.precision=bogus" in proc.stdout
        assert f"log: {sweep / failed / 'train.log'}" in proc.stdout
    # Each failure said once as it happens (the log line that was printed too stays in the log).
    assert (proc.stdout + proc.stderr).count("job 1 failed: trainer.precision=bogus") == 1
    assert "job 1 failed: trainer.precision=bogus" in (sweep / "1_baseline" / "train.log").read_text()
    finished = [sweep / "0_baseline", sweep / "2_resnet"]
    assert all((d / "test_metrics.json").exists() for d in finished)
    before = {
        p: p.stat().st_mtime_ns
        for d in finished
        for p in d.iterdir()
        if p.suffix in {".pt", ".csv", ".json"} and p.name != STATUS_FILE
    }

    again = train_cli(*args, cwd=tmp_path, check=False)
    assert "4 jobs: 0 done, 2 skipped (finished before), 2 failed" in again.stdout
    assert "epoch  1/1" not in again.stdout  # nothing was trained again
    after = {p: p.stat().st_mtime_ns for p in before}
    assert after == before


def test_a_failed_sweep_in_an_earlier_call_does_not_fail_the_next(monkeypatch) -> None:
    # SweepSummary keeps the last summary on the class (Hydra makes the callback instance).
    SweepSummary.last = JobsSummary(failed=[{"dir": "old", "error": "boom", "log": None}])
    monkeypatch.setattr(train_command, "hydra_main", lambda: None)  # a single run that went well
    train_command.main([])  # no SystemExit(1) for the earlier sweep's failure
    assert SweepSummary.last is None


def test_a_new_launch_removes_the_summary_of_the_last(tmp_path: Path) -> None:
    """An interrupted launch must not leave the previous launch's summary as if it were its own;
    one refused before its first job (a typo) must not remove a finished sweep's."""
    sweep = tmp_path / "sweep"
    args = ["-m", *TINY, f"hydra.sweep.dir={sweep}"]
    train_cli(*args, "seed=0", cwd=tmp_path)
    summary = (sweep / SWEEP_SUMMARY).read_text()
    refused = train_cli(*args, "model=baseline,resnt", cwd=tmp_path, check=False)
    assert refused.returncode != 0 and "resnt" in refused.stderr
    assert (sweep / SWEEP_SUMMARY).read_text() == summary
    job = OmegaConf.create({"hydra": {"mode": RunMode.MULTIRUN, "sweep": {"dir": str(sweep)}}})
    SweepSummary().on_job_start(job)  # a launch whose jobs start
    assert not (sweep / SWEEP_SUMMARY).exists()


def test_jobs_are_summarised_in_job_number_order(tmp_path: Path, capsys) -> None:
    # Job 10 after job 2, as Hydra numbered them: sorted as text, 10_ would come before 2_.
    sweep = tmp_path / "sweep"
    summary = SweepSummary()
    summary.on_multirun_start(OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}}))
    for num, status in ((10, "done"), (2, "done"), (1, "failed"), (11, "failed")):
        (sweep / f"{num}_job").mkdir()
        write_status(sweep / f"{num}_job", status, summary.launch, error=f"job {num} broke")
    jobs = collect_jobs(sweep, summary.launch)
    assert [Path(d).name for d in jobs.done] == ["2_job", "10_job"]
    assert [Path(f["dir"]).name for f in jobs.failed] == ["1_job", "11_job"]
    summary.on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}}))
    written = json.loads((sweep / SWEEP_SUMMARY).read_text())
    assert written["done"] == [str(sweep / "2_job"), str(sweep / "10_job")]
    assert [f["dir"] for f in written["failed"]] == [str(sweep / "1_job"), str(sweep / "11_job")]
    printed = capsys.readouterr().out
    assert printed.index(f"FAILED {sweep / '1_job'}:") < printed.index(f"FAILED {sweep / '11_job'}:")


def test_a_failed_job_line_names_its_folder_once(tmp_path: Path) -> None:
    folder = str(tmp_path / "0_baseline")
    jobs = JobsSummary(
        failed=[
            {"dir": folder, "error": f"{folder}: holds a run of a different config", "log": "a.log"},
            {"dir": folder, "error": "optim.lr=-1.0: must be 0 or more", "log": "b.log"},
        ]
    )
    lines = jobs.format(tmp_path).splitlines()
    assert lines[1] == f"  FAILED {folder}: holds a run of a different config"
    assert lines[3] == f"  FAILED {folder}: optim.lr=-1.0: must be 0 or more"


def test_a_sweep_with_nested_job_folders_is_summarised_in_full(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    proc = train_cli(
        "-m",
        *TINY,
        "seed=0,-1",  # the second job is refused
        "hydra.sweep.subdir=${model.name}/seed${seed}",
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 1
    assert f"sweep {sweep}: 2 jobs: 1 done, 0 skipped (finished before), 1 failed" in proc.stdout
    assert f"FAILED {sweep / 'baseline' / 'seed-1'}: seed=-1: expected 0 to 2**32 - 1" in proc.stdout
    summary = json.loads((sweep / SWEEP_SUMMARY).read_text())
    assert summary["done"] == [str(sweep / "baseline" / "seed0")]


def test_a_sweep_named_by_its_values_grows_by_a_seed_without_training_a_job_again(tmp_path, shared_data_dir):
    # Numbered folders would shift: resnet seed 0, job 1 at first, is job 2 of the larger sweep.
    sweep = tmp_path / "sweep"
    args = [*TINY, f"data.cache_dir={shared_data_dir}", "hydra.sweep.subdir=${model.name}/seed${seed}"]
    args += [f"hydra.sweep.dir={sweep}", "trainer.progress=never"]
    train_cli("-m", "model=baseline,resnet", "seed=0", *args, cwd=tmp_path)
    first = {job: (job / "best.pt").stat().st_mtime_ns for job in sweep.glob("*/seed0")}
    proc = train_cli("-m", "model=baseline,resnet", "seed=0,1", *args, cwd=tmp_path)
    assert f"sweep {sweep}: 4 jobs: 2 done, 2 skipped (finished before), 0 failed" in proc.stdout
    assert {job: (job / "best.pt").stat().st_mtime_ns for job in sweep.glob("*/seed0")} == first
    tested = sweep.glob("*/seed*/test_metrics.json")
    assert sorted(path.parent.relative_to(sweep).as_posix() for path in tested) == [
        "baseline/seed0",
        "baseline/seed1",
        "resnet/seed0",
        "resnet/seed1",
    ]


# A job process's stop handlers, then SIGTERM and SIGINT arriving together: both blocked before
# any import can start a thread (threads inherit the mask, so none takes them), both sent, then
# unblocked in the main thread, which gets both at once.
TWO_STOP_SIGNALS = """
import os, signal, time
stops = {signal.SIGINT, signal.SIGTERM}
signal.pthread_sigmask(signal.SIG_BLOCK, stops)
from skinclf.sweep import launcher
for signum in stops:
    signal.signal(signum, launcher._stop_once)
os.kill(os.getpid(), signal.SIGTERM)
os.kill(os.getpid(), signal.SIGINT)
try:
    signal.pthread_sigmask(signal.SIG_UNBLOCK, stops)
    time.sleep(1)
except (KeyboardInterrupt, SystemExit) as stop:
    print("stopped by", type(stop).__name__)
time.sleep(0.2)  # the second signal, still pending after the first one's exception, runs here
print("recorded the stop")
"""


def test_a_stop_signal_arriving_with_the_first_is_ignored_without_a_traceback():
    # A terminal's Ctrl-C (SIGINT) and the launcher's SIGTERM often reach a job together. The
    # second must be ignored quietly: under SIG_IGN, CPython found it pending and printed
    # "OSError: Signal 15 ignored due to race condition" with a traceback.
    proc = subprocess.run(
        [sys.executable, "-c", TWO_STOP_SIGNALS], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "recorded the stop"
    assert proc.stdout.startswith("stopped by ")
    assert "race condition" not in proc.stderr and "Traceback" not in proc.stderr


def _ended_process_id() -> int:
    process = subprocess.Popen([sys.executable, "-c", ""])
    process.wait()
    return process.pid


def _process_ending_in(seconds: float, then: str = "") -> int:
    """The id of a process that runs ``then`` (Python) after ``seconds`` and ends; reaped as it
    ends, as a launcher reaps its jobs (an unreaped process still exists)."""
    process = subprocess.Popen([sys.executable, "-c", f"import time; time.sleep({seconds}); {then}"])
    threading.Thread(target=process.wait, daemon=True).start()
    return process.pid


def test_jobs_that_a_stopped_sweeps_launcher_killed_unrecorded_are_recorded_as_stopped(
    tmp_path: Path,
) -> None:
    # submitit's local executor SIGKILLs a job 1 s after passing it the Ctrl-C, which a job inside
    # a long torch op never sees: its job_status.json kept "running", which `skinclf report` then
    # called "killed (SIGKILL, out of memory?)".
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    earlier = start_launch(sweep)
    launch = start_launch(sweep)
    host = socket.gethostname()
    done = sweep / "5_vgg16" / STATUS_FILE
    payload = json.dumps({"status": "done", "launch": launch})
    records_done = f"open({str(done)!r}, 'w').write({payload!r})"
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        jobs = {
            "0_baseline": (launch, _process_ending_in(0.3), host),  # killed unrecorded: stopped
            "1_resnet": (launch, alive.pid, host),  # still running: left to record itself
            "2_batch_norm": (earlier, _process_ending_in(0.3), host),  # an earlier launch's: untouched
            "3_res_aug": (launch, _process_ending_in(0.3), "another-machine"),  # cannot tell: untouched
            # Dead before the stop came (the out-of-memory killer): the report's "killed" stays.
            "4_layer_norm": (launch, _ended_process_id(), host),
            "5_vgg16": (launch, _process_ending_in(0.3, records_done), host),  # ended as it should
        }
        for name, (tag, pid, machine) in jobs.items():
            (sweep / name).mkdir()
            write_status(sweep / name, "running", tag, pid=pid, host=machine, job=int(name[0]), log="x.log")
        start = time.monotonic()
        assert record_stopped_jobs(sweep, wait_s=2) == [sweep / "0_baseline"]
        assert time.monotonic() - start < 4
    finally:
        alive.kill()
        alive.wait()
    assert read_status(sweep / "0_baseline") == {
        "status": "stopped",
        "launch": launch,
        "job": 0,
        "log": "x.log",
    }
    assert [read_status(sweep / name)["status"] for name in jobs] == [
        "stopped",
        "running",
        "running",
        "running",
        "running",
        "done",
    ]


def test_a_stopped_sweep_records_its_jobs_killed_unrecorded_as_stopped(tmp_path: Path, monkeypatch) -> None:
    # The same, through `skinclf train -m`'s stop path: a launcher that ends on Ctrl-C while the
    # process of one of its jobs is killed before that job can record the stop.
    sweep = tmp_path / "sweep"

    def sweep_stopped_by_ctrl_c() -> None:
        sweep.mkdir()
        SweepSummary.sweep_dir = sweep
        launch = start_launch(sweep)
        (sweep / "0_baseline").mkdir()
        write_status(
            sweep / "0_baseline", "running", launch, pid=_process_ending_in(0.3), host=socket.gethostname()
        )
        raise KeyboardInterrupt

    monkeypatch.setattr(train_command, "hydra_main", sweep_stopped_by_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        train_command.main(["-m", f"hydra.sweep.dir={sweep}"])
    assert read_status(sweep / "0_baseline")["status"] == "stopped"


def test_a_sweep_is_not_launched_again_while_a_launch_of_it_trains(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    args = ["-m", "seed=0,1", f"hydra.sweep.dir={sweep}", *TINY]
    train_cli(*args, cwd=tmp_path)
    (sweep / "1_baseline" / "test_metrics.json").unlink()  # unfinished, as while it trains
    trainer = _process_ending_in(60)
    try:
        status = {"status": "running", "launch": "earlier", "pid": trainer, "host": socket.gethostname()}
        (sweep / "1_baseline" / STATUS_FILE).write_text(json.dumps(status))
        before = {p: p.read_bytes() for p in sweep.rglob("*") if p.is_file()}
        proc = train_cli(*args, cwd=tmp_path, check=False)
        assert proc.returncode == 2
        assert proc.stderr.strip() == (
            f"skinclf train: error: {sweep}: job 1_baseline is being trained now by process {trainer} on "
            "this machine (another launch of this sweep); wait for that launch to end, then launch again "
            "to continue the sweep (if that process is not skinclf, its id reused after a crash, delete "
            f"{sweep / '1_baseline' / STATUS_FILE})"
        )
        # Nothing of the earlier launch is touched: its tag, its summary, its jobs' files.
        assert {p: p.read_bytes() for p in sweep.rglob("*") if p.is_file()} == before
    finally:
        os.kill(trainer, signal.SIGKILL)
    # Once that process has gone (killed: its status still says running), the launch continues it.
    proc = train_cli(*args, cwd=tmp_path)
    assert (sweep / "1_baseline" / "test_metrics.json").exists()


def test_a_glob_over_configs_of_the_users_own_is_left_to_hydra() -> None:
    # skinclf's configs have no model my_*; the folder added may.
    train_arguments._check_sweeps_have_values(
        ["-m", "model=glob(my_*)", "hydra.searchpath=[file:///my/conf]"]
    )
    with pytest.raises(SkinclfError, match=r"^model=glob\(my_\*\): expands to no value"):
        train_arguments._check_sweeps_have_values(["-m", "model=glob(my_*)"])


@pytest.mark.parametrize("swept", ["model=glob(zzz*)", "seed=range(0)"])
@pytest.mark.parametrize("existing", [False, True], ids=["new", "relaunch"])
def test_a_sweep_that_expands_to_no_job_is_an_error_and_leaves_no_folder(
    tmp_path: Path, swept: str, existing: bool
) -> None:
    sweep = tmp_path / "sweep"
    if existing:  # a re-launch into a sweep's folder read "0 jobs", exit 0
        (sweep / "0_baseline").mkdir(parents=True)
    proc = train_cli("-m", swept, f"hydra.sweep.dir={sweep}", *TINY, cwd=tmp_path, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        f"skinclf train: error: {swept}: expands to no value (a glob that matches no config, an "
        "empty range); expected at least one job"
    )
    assert sorted(p.name for p in sweep.iterdir()) == ["0_baseline"] if existing else not sweep.exists()
