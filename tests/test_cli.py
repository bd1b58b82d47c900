"""`skinclf` as a user runs it: from any directory, the run files, and one-line errors."""

import errno
import io
import json
import logging
import math
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import types
from importlib.resources import files
from pathlib import Path

import pandas as pd
import pytest
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf
from PIL import Image

import skinclf
from skinclf.cli import main as cli_main
from skinclf.config import compose_config, config_choices
from skinclf.data import load_splits
from skinclf.data.splits import content_hash
from skinclf.errors import SkinclfError
from skinclf.models import PAPER_MODELS, check_model_output
from skinclf.report.runs import find_runs
from skinclf.summary import model_names
from skinclf.train_arguments import (
    _check_group_choices,
    _check_launcher,
    _check_sweeps_are_launched_as_sweeps,
    check_override_keys,
    overrides_together,
    resume_command,
)
from skinclf.training import loop
from skinclf.training.environment import source_digest
from skinclf.training.loop import METRICS_COLUMNS

from conftest import MODELS_THE_META_DEVICE_CANNOT_RUN, TINY, run_dir_from_output, train_cli, users_module

TEST_METRIC_KEYS = {
    "accuracy",
    "f1",
    "sensitivity",
    "specificity",
    "roc_auc",
    "confusion",
    "best_epoch",
    "best_val_acc",
    "n_test",
}
FROM_SCRATCH = [model for model in PAPER_MODELS if model != "vgg16"]


def assert_complete_run(run_dir, n_epochs=1):
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    assert (run_dir / "best.pt").is_file() and (run_dir / "last.pt").is_file()
    history = pd.read_csv(run_dir / "metrics.csv")
    assert list(history.columns) == METRICS_COLUMNS
    assert len(history) == n_epochs
    metrics = json.loads((run_dir / "test_metrics.json").read_text())
    assert set(metrics) >= TEST_METRIC_KEYS
    assert set(metrics["confusion"]) == {"tn", "fp", "fn", "tp"}
    assert sum(metrics["confusion"].values()) == metrics["n_test"] == 32


def test_train_from_another_directory_writes_all_run_files(tmp_path):
    proc = train_cli(*TINY, cwd=tmp_path)
    run_dir = run_dir_from_output(proc.stdout)
    # Relative paths (outputs/, data/) are taken from where the user stands.
    assert run_dir.is_relative_to(tmp_path / "outputs" / "runs")
    assert list((tmp_path / "data").glob("synthetic_*.pt"))
    assert_complete_run(run_dir)
    assert json.loads((run_dir / "job_status.json").read_text())["status"] == "done"
    # Hydra names a job after its entry point's module; Slurm job names and job ids use it.
    assert OmegaConf.load(run_dir / ".hydra" / "hydra.yaml").hydra.job.name == "train"
    # What produced the numbers, recorded with them and logged.
    recorded = json.loads((run_dir / "test_metrics.json").read_text())
    environment = recorded["environment"]
    assert environment["torch"] == torch.__version__ and environment["skinclf"] == skinclf.__version__
    # And what its scores were measured on: the validation and test images and labels.
    splits = load_splits(compose_config([*TINY, f"data.cache_dir={tmp_path / 'data'}"]).data)
    assert recorded["eval_data_sha256"] == content_hash(splits.val, splits.test)
    assert recorded["train_data_sha256"] == content_hash(splits.train)
    assert environment["python"] == platform.python_version()
    assert environment["source"] == source_digest() and environment["precision"] in ("bf16", "fp32")
    # trainer.device=auto trains on the GPU where there is one (the CUDA test machine), else the CPU.
    if torch.cuda.is_available():
        assert environment["machine"].startswith(torch.cuda.get_device_name())
    else:
        threads = torch.get_num_threads()
        assert environment["machine"].endswith(f", {threads} thread{'s' if threads != 1 else ''}")
    assert (
        f"(source {source_digest()}), torch {torch.__version__}, Python {platform.python_version()}; "
        in (run_dir / "train.log").read_text()
    )


@pytest.mark.slow
@pytest.mark.parametrize("model", FROM_SCRATCH)
def test_every_from_scratch_model_runs_one_epoch(tmp_path, model):
    proc = train_cli(f"model={model}", *TINY, cwd=tmp_path)
    run_dir = run_dir_from_output(proc.stdout)
    assert run_dir.name.endswith(model)
    assert_complete_run(run_dir)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "kill"])
def test_a_stopped_run_leaves_no_temporary_files_and_resumes(tmp_path, signum):
    run_dir = tmp_path / "outputs" / "stopped"
    # Epochs of a second or so, so that the signal lands while the run is still going.
    overrides = [*TINY[:3], "data.train_size=512", "trainer.max_epochs=3", f"hydra.run.dir={run_dir}"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "skinclf", "train", *overrides, "trainer.progress=never"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # A shell's background job (as CI may run the tests) ignores SIGINT, and so would the
        # run; Ctrl-C in a terminal reaches a process that has the default handler.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    metrics = run_dir / "metrics.csv"
    while proc.poll() is None and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        time.sleep(0.02)
    assert proc.poll() is None, f"the run ended before it could be stopped:\n{proc.communicate()}"
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum
    # The folder that resume=true needs is printed (a timestamped one is otherwise hard to find).
    assert stdout.strip().splitlines()[-1] == f"output directory: {run_dir}"
    # One line saying how to go on, not a traceback: the command that resumes, to paste.
    by = "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"
    stop_line = stderr.strip().splitlines()[-1]
    assert stop_line.startswith(f"skinclf train: stopped ({by}); to go on: skinclf train ")
    command = shlex.split(stop_line.split("; to go on: ", 1)[1])
    assert command == ["skinclf", "train", *overrides[:-1], "trainer.progress=never", *command[-2:]]
    assert command[-2:] == [f"hydra.run.dir={run_dir}", "resume=true"]
    assert "Traceback" not in stderr
    assert not [p.name for p in run_dir.iterdir() if p.suffix == ".tmp"]
    assert not (run_dir / "test_metrics.json").exists()
    assert json.loads((run_dir / "job_status.json").read_text())["status"] == "stopped"
    [stopped] = find_runs([tmp_path / "outputs"])
    assert stopped.status == "unfinished" and stopped.problem.startswith("stopped after 1 epoch (Ctrl-C")

    train_cli(*command[2:], cwd=tmp_path)  # as printed
    assert len(pd.read_csv(metrics)) == 3
    assert json.loads((run_dir / "job_status.json").read_text())["status"] == "done"


def test_a_diverging_run_exits_2_keeping_a_folder_only_once_an_epoch_finished(tmp_path, monkeypatch):
    # lr 1e30 blows the weights up in the first steps: nothing to keep, so no folder.
    proc = error_run(tmp_path, *TINY, "optim.lr=1e30")
    assert proc.returncode == 2
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith("skinclf train: error: epoch 1: the ") and "training diverged" in line
    assert not (tmp_path / "outputs").exists()
    # A loss that turns nan in epoch 2 (faked: a real one is too rare to provoke on cue): epoch
    # 1's checkpoints stay, and the run is marked failed, naming the epoch.
    real, losses = loop.train_one_epoch, []

    def nan_in_epoch_2(*args, **kwargs):
        loss, acc = real(*args, **kwargs)
        losses.append(loss)
        return (math.nan if len(losses) == 2 else loss), acc

    monkeypatch.setattr(loop, "train_one_epoch", nan_in_epoch_2)
    proc = error_run(tmp_path, *TINY[:-1], "trainer.max_epochs=3")
    assert proc.returncode == 2 and len(losses) == 2
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .startswith("skinclf train: error: epoch 2: the training loss is nan")
    )
    run_dir = run_dir_from_output(proc.stdout)
    assert (run_dir / "best.pt").is_file() and (run_dir / "last.pt").is_file()
    assert len(pd.read_csv(run_dir / "metrics.csv")) == 1
    assert json.loads((run_dir / "job_status.json").read_text())["status"] == "failed"
    [failed] = find_runs([tmp_path / "outputs"])
    assert failed.status == "failed" and "epoch 2" in failed.problem


@pytest.mark.parametrize("folder", ["a misspelt hydra.run.dir", "no hydra.run.dir"])
def test_resume_of_a_folder_without_a_run_is_refused(tmp_path, folder):
    # Training anew there would exit 0 and leave the user thinking the old run went on.
    run_dir = ["hydra.run.dir=outputs/runs/2026-01-01_00-00-00-000000_basline"] if folder[0] == "a" else []
    proc = error_run(tmp_path, *TINY, *run_dir, "resume=true")
    assert proc.returncode == 2
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith("skinclf train: error: resume=true: ") and "holds no run to resume" in line
    assert not (tmp_path / "outputs").exists()  # nothing made, nothing trained


class _CtrlCOnImport(types.ModuleType):
    """Stands in for skinclf.train: Ctrl-C lands while `skinclf train` imports the run's code
    (torch: seconds), after Hydra has made the run or job folder, before skinclf claims it."""

    def __getattr__(self, name):
        if name.startswith("__"):  # what repr() and pytest's reports look up
            raise AttributeError(name)
        raise KeyboardInterrupt


@pytest.mark.parametrize("sweep", [False, True], ids=["run", "sweep"])
def test_a_run_stopped_before_it_began_leaves_no_folder(tmp_path, monkeypatch, sweep):
    monkeypatch.setitem(sys.modules, "skinclf.train", _CtrlCOnImport("skinclf.train"))
    proc = train_cli(*(["-m", "seed=0,1"] if sweep else []), *TINY, cwd=tmp_path, check=False)
    assert proc.returncode == 130, proc.stdout + proc.stderr
    assert not (tmp_path / "outputs").exists()
    assert "output directory" not in proc.stdout  # no folder to name


def test_torch_logs_nothing_at_info_while_its_import_is_unfinished():
    # Ctrl-C while a run imports torch: torch's loggers are not set to WARNING yet (its import does
    # that last), so its exit hooks' INFO lines (FakeTensor cache stats) followed the stop line.
    # A fresh interpreter, Hydra's job logging applied as Hydra does, torch not yet imported.
    code = """
import logging.config, sys
from omegaconf import OmegaConf
from skinclf.config import compose_config
conf = OmegaConf.to_container(compose_config(return_hydra_config=True).hydra.job_logging)
conf["handlers"].pop("file")  # its file name needs a run folder
conf["root"]["handlers"] = ["console"]
logging.config.dictConfig(conf)
assert "torch" not in sys.modules
print(logging.getLogger("skinclf").isEnabledFor(logging.INFO))
print(logging.getLogger("torch._subclasses.fake_tensor").isEnabledFor(logging.INFO))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["True", "False"]  # skinclf's lines stay, torch's INFO goes


def _stop_after_it_began(error: BaseException):
    def run_in_hydra(cfg, out_dir):
        (out_dir / "metrics.csv").write_text("epoch\n1\n")  # as if an epoch was done
        raise error

    return run_in_hydra


@pytest.mark.parametrize(
    ("sweep", "error", "returncode"),
    [
        (False, RuntimeError("a crash"), 1),
        (True, KeyboardInterrupt(), 130),
        (False, KeyboardInterrupt(), 130),
    ],
    ids=["run-crash", "sweep-ctrl-c", "run-ctrl-c"],
)
def test_a_stopped_or_crashed_launch_names_its_folder(tmp_path, monkeypatch, sweep, error, returncode):
    import skinclf.train

    monkeypatch.setattr(skinclf.train, "run_in_hydra", _stop_after_it_began(error))
    folder = tmp_path / "out"
    where = ["-m", f"hydra.sweep.dir={folder}"] if sweep else [f"hydra.run.dir={folder}"]
    proc = train_cli(*where, *TINY, cwd=tmp_path, check=False)
    assert proc.returncode == returncode, proc.stderr
    # The folder to resume (the run's, or the sweep's to re-launch into), or to read the log of.
    assert f"output directory: {folder}" in proc.stdout.splitlines()
    if returncode == 130:  # and the command that does it: a sweep's stopped jobs resume on a re-launch
        again = (
            ["-m", *TINY, f"hydra.sweep.dir={folder}"]
            if sweep
            else [*TINY, f"hydra.run.dir={folder}", "resume=true"]
        )
        assert (
            proc.stderr.strip()
            .splitlines()[-1]
            .endswith(f"; to go on: {shlex.join(['skinclf', 'train', *again])}")
        )


def test_the_resume_command_replaces_the_folder_and_resume_given_and_pastes_into_a_shell():
    folder = Path("/runs/a b,c")
    # An option's value is no override, whatever it looks like.
    args = ["--config-dir", "resume=dir", "model=res_aug", "resume=false", "hydra.run.dir=x", "seed=1"]
    command = resume_command(args, folder, sweep=False)
    words = shlex.split(command)
    assert words == ["skinclf", "train", "--config-dir", "resume=dir", "model=res_aug", "seed=1", *words[-2:]]
    assert words[-1] == "resume=true"
    # The folder, quoted for Hydra's grammar (its space and comma), reads back as itself.
    override = OverridesParser.create().parse_overrides([words[-2]])[0]
    assert (override.key_or_group, override.value()) == ("hydra.run.dir", str(folder))
    sweep = shlex.split(resume_command(["-m", "seed=0,1", "hydra.sweep.dir=old"], Path("/s"), sweep=True))
    assert sweep == ["skinclf", "train", "-m", "seed=0,1", "hydra.sweep.dir=/s"]


def test_kill_says_how_to_go_on_as_ctrl_c_does(tmp_path, monkeypatch):
    import skinclf.train

    def killed(cfg, out_dir):
        (out_dir / "metrics.csv").write_text("epoch\n1\n")  # as if an epoch was done
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(60)  # the signal's handler raises in here

    monkeypatch.setattr(skinclf.train, "run_in_hydra", killed)
    folder = tmp_path / "out"
    proc = train_cli(f"hydra.run.dir={folder}", *TINY, cwd=tmp_path, check=False)
    assert proc.returncode == 143, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == f"output directory: {folder}"
    assert proc.stderr.strip().splitlines()[-1] == (
        f"skinclf train: stopped (SIGTERM); to go on: skinclf train {' '.join(TINY)} "
        f"hydra.run.dir={folder} resume=true"
    )
    # The run's log, read when the console is gone, says so too (and only the log).
    assert (folder / "train.log").read_text().strip().endswith("stopped by SIGTERM (resumable)")
    assert "stopped by" not in proc.stdout + proc.stderr


def test_a_stop_before_the_run_has_a_folder_gives_no_resume_hint(tmp_path, monkeypatch):
    from skinclf import train_command

    def interrupted(args):  # Ctrl-C while the command line is still being checked
        raise KeyboardInterrupt

    monkeypatch.setattr(train_command, "checked_for_hydra", interrupted)
    proc = train_cli(*TINY, cwd=tmp_path, check=False)
    assert proc.returncode == 130
    assert proc.stderr.strip() == "skinclf train: stopped (Ctrl-C)"  # nothing to resume
    assert not (tmp_path / "outputs").exists()


@pytest.mark.parametrize(
    ("stop", "code", "by"), [(KeyboardInterrupt(), 130, "Ctrl-C"), (None, 143, "SIGTERM")]
)
def test_a_stop_while_the_command_imports_is_one_line(monkeypatch, capsys, stop, code, by):
    # The command's module (torch) takes seconds to import: a Ctrl-C then was a traceback, a
    # `kill` a silent exit 143.
    from skinclf import cli

    def importing(name):
        if stop is None:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(60)  # the handler raises in here
        raise stop

    monkeypatch.setattr(cli.importlib, "import_module", importing)
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["report"])
    assert exit_info.value.code == code
    assert capsys.readouterr().err.strip() == f"skinclf report: stopped ({by})"


def test_a_config_error_in_a_relaunched_sweep_names_no_folder(tmp_path):
    folder = tmp_path / "sweep"
    folder.mkdir()
    # A key no config has, in a swept override: refused before Hydra makes the sweep.
    proc = error_run(tmp_path, "-m", "trainer.max_epoch=3,4", f"hydra.sweep.dir={folder}", *TINY)
    assert proc.returncode == 2 and "trainer.max_epoch: no skinclf config has this key" in proc.stderr
    assert "output directory" not in proc.stdout


def test_a_stop_before_the_run_began_keeps_a_folder_the_user_named(tmp_path, monkeypatch):
    # It held nothing but a log before this launch too, but it is the user's: only a folder the
    # launch made is removed.
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "train.log").write_text("")
    monkeypatch.setitem(sys.modules, "skinclf.train", _CtrlCOnImport("skinclf.train"))
    assert train_cli(*TINY, f"hydra.run.dir={mine}", cwd=tmp_path, check=False).returncode == 130
    assert mine.is_dir()


def error_run(tmp_path, *overrides):
    proc = train_cli(*overrides, cwd=tmp_path, check=False)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr + proc.stdout
    return proc


@pytest.mark.parametrize("deletion", ["~model", "~trainer.num_threads", "~resume", "~cv"])
def test_removing_a_key_every_run_reads_is_refused_up_front(tmp_path, deletion):
    # ~model, ~resume, ~trainer.num_threads ended in a traceback (ConfigAttributeError); ~cv in
    # "cv.folds=None: expected an integer", a value the user never typed.
    proc = error_run(tmp_path, deletion, *TINY)
    assert proc.returncode == 2
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith(f"skinclf train: error: {deletion}: removes a key of skinclf's configs, which")
    assert not (tmp_path / "outputs").exists()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "model=alexnet",
            f"model=alexnet: unknown model; expected one of {', '.join(sorted(model_names()))} "
            "(or a model config of your own: add its folder with hydra.searchpath)",
        ),
        ("recipe=moden", "recipe=moden: unknown recipe; expected one of modern, paper"),
        ("data=Folder", "data=Folder: unknown data; expected one of dermamnist, folder, synthetic"),
        (
            "pipeline@model.pipeline=plain",
            "pipeline@model.pipeline=plain: unknown pipeline; expected one of augmented, default, imagenet",
        ),
        (  # Hydra's own group, with its plugins' choices and skinclf's (was Hydra's 15-line error, exit 1)
            "hydra/launcher=slurmm",
            "hydra/launcher=slurmm: unknown hydra/launcher; expected one of "
            + ", ".join(config_choices("hydra/launcher")),
        ),
    ],
)
def test_an_unknown_config_choice_is_one_line_naming_the_choices(tmp_path, override, message):
    proc = error_run(tmp_path, override)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"skinclf train: error: {message}"


def test_a_sweep_with_an_unknown_model_runs_nothing_and_leaves_no_folder(tmp_path):
    proc = error_run(tmp_path, "-m", "model=baseline,alexnet", *TINY)
    assert proc.returncode == 2 and "model=alexnet: unknown model; expected one of" in proc.stderr
    # Caught before Hydra starts: baseline did not train either.
    assert not (tmp_path / "outputs").exists()  # nor the folders made for the sweep's


def test_hydra_groups_offer_hydras_and_skinclfs_choices():
    # The launchers whatever extras are installed (joblib and submitit come with [launchers]).
    assert {"basic", "local", "slurm", "slurm_local"} <= set(config_choices("hydra/launcher"))


@pytest.mark.parametrize(
    "swept",
    [
        "data.train_size=${data.val_size},32",
        "seed='1','2'",
        "optim.lr=1e-3,.5",
    ],
)
def test_swept_numbers_quoted_numbers_and_interpolations_pass_the_number_check(swept):
    # Sweeps give their values as Hydra's escaped text ($\{data.val_size\}, '1' with its quotes).
    assert check_override_keys([swept]) == []


@pytest.mark.parametrize(
    ("swept", "message"),
    [
        (
            "trainer.max_epochs=abc,2",
            "abc is no finite number; expected numbers for trainer.max_epochs (default: 30)",
        ),
        ("optim.lr=inf,1e-3", "inf is no finite number; expected numbers for optim.lr (default: 0.0001)"),
        ("seed=\"'1'\",2", "\"'1'\" is no finite number; expected numbers for seed (default: 0)"),
        (
            "optim.lr=interval(1e-4,1e-3)",
            "Hydra's basic sweeper cannot sweep an interval; expected a list, range() or choice() of "
            "values (an interval needs a sampling sweeper: pip install hydra-optuna-sweeper, then "
            "hydra/sweeper=optuna)",
        ),
        (  # text beside its interpolations: never a number
            "optim.lr=${seed}-${seed},1e-3",
            "$\\{seed\\}-$\\{seed\\} is no finite number; expected numbers for optim.lr (default: 0.0001)",
        ),
        ("optim.lr=1e-3,fast", "fast is no finite number; expected numbers for optim.lr (default: 0.0001)"),
    ],
)
def test_a_sweep_value_that_is_no_number_runs_nothing(tmp_path, swept, message):
    # Found only by the job that got it, after the sweep's other jobs had trained.
    proc = error_run(tmp_path, "-m", swept, *TINY[:-1])
    assert proc.returncode == 2 and proc.stderr.strip() == f"skinclf train: error: {swept}: {message}"
    assert not (tmp_path / "outputs").exists()
    if "interval" in swept:  # naming the basic sweeper is no way past the check
        proc = error_run(tmp_path, "-m", "hydra/sweeper=basic", swept, *TINY[:-1])
        assert proc.stderr.strip() == f"skinclf train: error: {swept}: {message}"


BASELINE_CONFIG = files("skinclf.conf").joinpath("model", "baseline.yaml").read_text()

# A user's own model, as the README's example: its feature block ends in global pooling.
USERS_MODULE = """
import torch.nn as nn


class WideCNN(nn.Module):
    def __init__(self, channels=8, outputs=1):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, channels, 3, padding=1), nn.ReLU(), nn.MaxPool2d(4),
            nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        )
        self.head = nn.Linear(channels, outputs)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


class FixedHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(1000, 1)

    def forward(self, x):
        return self.head(self.conv(x).flatten(1))


class NotAModule:
    pass
"""


# The README's example of a model config of one's own.
OWN_CONFIG = """
defaults:
  - /pipeline@pipeline: default
  - _self_
name: {name}
arch:
  {arch}
"""


def _own_model_config(tmp_path, name: str, text: str) -> str:
    """A model config of the user's own, ``name``.yaml, in a folder beside skinclf's configs;
    returns the override that adds the folder."""
    mine = tmp_path / "my_conf" / "model"
    mine.mkdir(parents=True, exist_ok=True)
    (mine / f"{name}.yaml").write_text(text)
    return f"hydra.searchpath=[file://{tmp_path / 'my_conf'}]"


def test_a_model_of_the_users_own_trains_reports_predicts_and_explains(tmp_path, monkeypatch, capsys):
    code = users_module(tmp_path, monkeypatch, "my_models", USERS_MODULE)
    config = OWN_CONFIG.format(name="wide_cnn", arch="_target_: my_models.WideCNN")
    searchpath = _own_model_config(tmp_path, "wide_cnn", config)
    proc = train_cli("-m", searchpath, "model=wide_cnn,baseline", *TINY, cwd=tmp_path)
    assert "2 jobs: 2 done" in proc.stdout
    [run_dir] = (tmp_path / "outputs" / "multiruns").glob("*/0_wide_cnn")
    assert json.loads((run_dir / "test_metrics.json").read_text())["n_test"] == 32

    cli_main(["report", str(tmp_path / "outputs"), "--out", str(tmp_path / "report")])
    assert set(pd.read_csv(tmp_path / "report" / "runs.csv")["model"]) == {"wide_cnn", "baseline"}
    cli_main(["summary", "model=wide_cnn", searchpath])
    table = capsys.readouterr().out
    assert "model=wide_cnn: my_models.WideCNN" in table
    assert "Total params: 817" in table  # (3*9*8 + 8) + (8*9*8 + 8) + (8 + 1)

    image = tmp_path / "lesion.png"
    Image.new("RGB", (128, 128), (150, 90, 60)).save(image)
    cli_main(["predict", str(run_dir), str(image), "--out", str(tmp_path / "pred.csv")])
    assert 0 <= pd.read_csv(tmp_path / "pred.csv")["prob_mel"][0] <= 1
    cli_main(["explain", str(run_dir), str(image), "--out", str(tmp_path / "cams")])
    assert (tmp_path / "cams" / "lesion_gradcam.png").is_file()

    # The class changed since the run: one line naming the checkpoint and the constructor's error.
    monkeypatch.delitem(sys.modules, "my_models")
    (code / "my_models.py").write_text(
        USERS_MODULE.replace("channels=8, outputs=1", "depth, channels=8, outputs=1")
    )
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["predict", str(run_dir), str(image)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"skinclf predict: error: {run_dir / 'best.pt'}: does not match model=wide_cnn (")
    assert "missing 1 required positional argument: 'depth'" in err and len(err.splitlines()) == 1

    # On a machine without the user's module: one line naming the checkpoint and the class.
    monkeypatch.delitem(sys.modules, "my_models")
    monkeypatch.setattr(sys, "path", [entry for entry in sys.path if entry != str(code)])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["predict", str(run_dir), str(image)])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == (
        f"skinclf predict: error: {run_dir / 'best.pt'}: model.arch._target_=my_models.WideCNN: "
        "no module my_models; it must be installed or on PYTHONPATH"
    )


@pytest.mark.parametrize(
    ("edit", "missing"),
    [
        (lambda text: text.replace("name: baseline\n", ""), "model.name"),
        (lambda text: text.replace("  - /pipeline@pipeline: default\n", ""), "model.pipeline._target_"),
        (
            lambda text: text.replace("  _target_: skinclf.models.simple_cnn.SimpleCNN\n", ""),
            "model.arch._target_",
        ),
    ],
)
def test_a_model_config_of_the_users_own_lacking_a_key_is_one_clear_error(tmp_path, edit, missing):
    edited = edit(BASELINE_CONFIG)
    assert edited != BASELINE_CONFIG
    proc = error_run(tmp_path, _own_model_config(tmp_path, "partial", edited), "model=partial", *TINY)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith(f"skinclf train: error: model=partial: {missing} is not set; ")
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "outputs").exists()  # nothing half-written


def test_a_grid_search_of_a_users_model_without_a_name_fails_its_jobs_in_one_line_each(tmp_path):
    # The grid's job folders are named after the model: without oc.select, Hydra stopped on the
    # missing key with a traceback before any job.
    unnamed = _own_model_config(tmp_path, "partial", BASELINE_CONFIG.replace("name: baseline\n", ""))
    proc = train_cli("hparams_search=grid", unnamed, "model=partial", *TINY, cwd=tmp_path, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.count("model=partial: model.name is not set; ") == 9  # each of the 9 points


def test_a_key_that_a_shipped_models_constructor_refuses_is_one_line_and_no_run(tmp_path):
    # A key beside a _target_ is let through to the constructor; when the constructor refuses it,
    # the run ended with Hydra's multi-line "Error executing job", exit 1, and a run folder.
    proc = error_run(tmp_path, "+model.arch.bogus=1", *TINY)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith("skinclf train: error: model=baseline: Error in call to target ")
    assert "unexpected keyword argument 'bogus'" in line
    assert "output directory" not in proc.stdout
    assert not (tmp_path / "outputs").exists()  # nothing half-written


def test_a_key_added_beside_the_target_of_a_model_of_the_users_own_reaches_its_constructor(tmp_path):
    # The + check composed the config again without hydra.searchpath, so that it could not find
    # the user's model: Hydra's "Could not find 'model/mine'", exit 1, whatever the key.
    own = _own_model_config(tmp_path, "mine", BASELINE_CONFIG.replace("name: baseline", "name: mine"))
    proc = error_run(tmp_path, own, "model=mine", "+model.arch.bogus=1", *TINY)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith("skinclf train: error: model=mine: Error in call to target ")
    assert "unexpected keyword argument 'bogus'" in line
    assert not (tmp_path / "outputs").exists()


def test_a_config_that_keeps_an_escaped_interpolation_is_refused_before_training(tmp_path):
    # It trained, and its run could never be predicted: stored resolved as '${x}', the config
    # reads back as an interpolation (and predict refuses a checkpoint config holding one).
    own = BASELINE_CONFIG.replace("name: baseline", "name: mine\nlabel: cost \\${x}")
    proc = error_run(tmp_path, _own_model_config(tmp_path, "mine", own), "model=mine", *TINY)
    assert proc.returncode == 2
    [line] = proc.stderr.strip().splitlines()
    assert line == (
        "skinclf train: error: model.label: holds '${' after resolving (an escaped interpolation); "
        "expected none"
    )
    assert not (tmp_path / "outputs").exists()


@pytest.mark.parametrize(
    ("arch", "message"),
    [
        (
            "_target_: not_a_package.Net",
            "model.arch._target_=not_a_package.Net: no module not_a_package; "
            "it must be installed or on PYTHONPATH",
        ),
        (
            "_target_: skinclf.models.simple_cnn.NoSuchNet",
            "model.arch._target_=skinclf.models.simple_cnn.NoSuchNet: "
            "skinclf.models.simple_cnn has no 'NoSuchNet'",
        ),
        ("_target_: WideCNN", "model.arch._target_=WideCNN: expected package.module.Class"),
        (
            "_target_: needs_a_package.Net",  # the module is there; what it imports is not
            "model.arch._target_=needs_a_package.Net: importing needs_a_package needs not_installed_xyz, "
            "which is not installed",
        ),
        (
            "_target_: my_models.WideCNN\n  width: 64",
            "Error in call to target 'my_models.WideCNN': "
            "TypeError(\"WideCNN.__init__() got an unexpected keyword argument 'width'\")",
        ),
        (
            "_target_: my_models.WideCNN\n  outputs: 2",
            "the model returns (2, 2) for a batch of 2 images; expected one logit per image, (2, 1) or (2,)",
        ),
        (
            "_target_: my_models.WideCNN\n  channels: 0",  # a layer that cannot run, on any device
            "the model fails on a batch of 2 images of 128x128: RuntimeError: ",
        ),
        (
            "_target_: my_models.FixedHead",  # sized for other images: shapes do not fit
            "the model fails on a batch of 2 images of 128x128: RuntimeError: mat1 and mat2 shapes ",
        ),
        (
            "_target_: my_models.NotAModule",
            "model.arch._target_=my_models.NotAModule: is a class, not a torch.nn.Module class",
        ),
        (
            # predict and explain build the model again from the checkpoint's config, where only
            # classes may be called: a factory's run would train, then never predict.
            "_target_: torchvision.models.resnet18\n  num_classes: 1",
            "model.arch._target_=torchvision.models.resnet18: is a function, not a torch.nn.Module "
            "class; every _target_ of a model config names one (a factory function goes in a class",
        ),
        ("_target_: my_models.WideCNN\n  _partial_: true", "model.arch._target_ builds a "),  # no module
        (
            "_target_: my_models.WideCNN\n  channels: ${oc.env:SKINCLF_NO_SUCH_VARIABLE}",  # a traceback
            "model.arch does not resolve: KeyError raised while resolving interpolation: ",
        ),
    ],
)
def test_a_model_of_the_users_own_that_cannot_be_built_is_one_clear_error(
    tmp_path, monkeypatch, arch, message
):
    users_module(tmp_path, monkeypatch, "my_models", USERS_MODULE)
    users_module(tmp_path, monkeypatch, "needs_a_package", "import not_installed_xyz\n")
    config = OWN_CONFIG.format(name="mine", arch=arch)
    proc = error_run(tmp_path, _own_model_config(tmp_path, "mine", config), "model=mine", *TINY)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith(f"skinclf train: error: model=mine: {message}")
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "outputs").exists()  # before the run folder was made


@pytest.mark.parametrize("target", ["CropsToTheLesion", "NoCpuKernel"])
def test_a_model_the_meta_device_cannot_run_is_left_to_the_run(tmp_path, monkeypatch, target):
    # Refusing them would stop models that train (on real images, on a GPU) from training at all.
    users_module(tmp_path, monkeypatch, "meta_free", MODELS_THE_META_DEVICE_CANNOT_RUN)
    check_model_output(OmegaConf.create({"arch": {"_target_": f"meta_free.{target}"}}), "model=mine")


@pytest.mark.parametrize(
    "override",
    ["data.batch_size=0", "trainer.max_epochs=-1", "trainer.eval_batch_size=0", "trainer.checkpoint_every=0"],
)
def test_a_size_below_one_is_one_clear_error_naming_it(tmp_path, override):
    proc = error_run(tmp_path, *TINY, override)
    assert f"{override}: must be at least 1" in proc.stderr
    assert not (tmp_path / "outputs").exists()  # nor the folders made for its run folder


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("trainer.max_epochs=abc", "trainer.max_epochs=abc: expected an integer"),
        ("seed=1.5", "seed=1.5: expected an integer"),
        ("optim.lr=abc", "optim.lr=abc: expected a number"),
        ("optim.lr=-1", "optim.lr=-1.0: must be 0 or more"),
        ("optim.lr=inf", "optim.lr=inf: expected a finite number"),
        ("optim.weight_decay=nan", "optim.weight_decay=nan: expected a finite number"),
        ("optim.weight_decay=-1", "optim.weight_decay=-1.0: must be 0 or more"),
        ("trainer.patience=0", "trainer.patience=0: must be at least 1"),
        ("seed=-1", "seed=-1: expected 0 to 2**32 - 1 (what NumPy and scikit-learn take)"),
        ("trainer.num_threads=abc", "trainer.num_threads=abc: expected an integer"),
        ("trainer.num_threads=0", "trainer.num_threads=0: expected at least 1, or null (auto)"),
        ("data.train_size=abc", "data.train_size=abc: expected an integer"),
        ("data.val_size=8.9", "data.val_size=8.9: expected an integer"),
        ("data.seed=-1", "data.seed=-1: must be 0 or more"),
        ("cv.folds=-1", "cv.folds=-1: expected 0 (no cross-validation) or at least 2 folds"),
        ("cv.folds=1", "cv.folds=1: expected 0 (no cross-validation) or at least 2 folds"),
        ("data.train_size=1", "data.train_size=1: the synthetic data needs at least 2 images per split"),
        # Switches: Hydra reads `no` and `off` as strings, which bool() would take for true.
        ("resume=no", "resume='no': expected true or false"),
        ("trainer.channels_last=off", "trainer.channels_last='off': expected true or false"),
        ("trainer.keep_freed_memory=0", "trainer.keep_freed_memory=0: expected true or false"),
        ("trainer.progress=nevr", "trainer.progress=nevr: expected one of auto, always, never"),
        (
            "eval.target_sensitivity=95",
            "eval.target_sensitivity=95.0: expected a fraction above 0, at most 1",
        ),
        # Augmentation options, which trained quietly on p=1.5 or a nan angle (nan batches).
        ("model=res_aug model.pipeline.p=1.5", "model.pipeline.p=1.5: expected a probability in [0, 1]"),
        (
            "model=augmented model.pipeline.crop_scale=[0,1]",
            "model.pipeline.crop_scale=[0, 1]: expected [lo, hi] with 0 < lo <= hi <= 1 "
            "(fractions of the side)",
        ),
        (
            "model=augmented model.pipeline.max_rotation_degrees=nan",
            "model.pipeline.max_rotation_degrees=nan: expected 0 to 180",
        ),
        ("recipe.augment.flip_p=3", "recipe.augment.flip_p=3: expected a probability in [0, 1]"),
        # Keys Hydra lets in with + (its own hint for a misspelt key), which nothing would read.
        (
            "+optim.lrr=0.001",
            "optim.lrr: not a key of this run's configs (model=baseline, data=synthetic, recipe=paper; "
            "given as +optim.lrr=0.001), so nothing would read it; check its spelling, or leave it out "
            "where the config lacks it (`skinclf train --help` lists the keys; a pipeline goes in as "
            "pipeline@model.pipeline=NAME)",
        ),
        (
            "+pipeline=augmented",  # Hydra's own hint for pipeline=augmented
            "+pipeline=augmented: a pipeline goes in model.pipeline; "
            "expected pipeline@model.pipeline=augmented",
        ),
        (
            "pipeline=augmented",
            "pipeline=augmented: a pipeline goes in model.pipeline; "
            "expected pipeline@model.pipeline=augmented",
        ),
    ],
)
def test_a_bad_setting_is_one_clear_error_before_training(tmp_path, override, expected):
    proc = error_run(tmp_path, *TINY, *override.split())
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"skinclf train: error: {expected}"
    assert "epoch" not in proc.stdout + proc.stderr.replace("max_epochs", "")
    assert not (tmp_path / "outputs").exists()  # nor the folders made for its run folder


def test_a_sweep_with_a_bad_setting_can_be_relaunched_corrected(tmp_path):
    sweep = tmp_path / "sweep"
    proc = train_cli("-m", *TINY, "optim.lr=-1", f"hydra.sweep.dir={sweep}", cwd=tmp_path, check=False)
    assert proc.returncode == 1 and "optim.lr=-1.0: must be 0 or more" in proc.stderr
    assert not list(sweep.glob("*/run_config.json"))  # the job's folder holds no config to be held to
    # `skinclf report` lists the refused job as a failed run, with its error and settings, once
    # even when the folders it is given overlap.
    [refused] = find_runs([sweep, tmp_path])
    assert (refused.path, refused.status, refused.model, refused.seed) == (
        sweep / "0_baseline",
        "failed",
        "baseline",
        0,
    )
    assert refused.problem == "refused before it ran: optim.lr=-1.0: must be 0 or more"
    assert refused.settings["optim.lr"] == "-1"  # as a run's settings are shown
    train_cli("-m", *TINY, f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert list(sweep.glob("*/test_metrics.json"))
    # The corrected job's folder is a run now: listed as that run only.
    assert [run.status for run in find_runs([sweep])] == ["finished"]


def test_refused_jobs_in_nested_folders_of_a_relative_sweep_folder_are_each_recorded(tmp_path):
    # Hydra makes the job folders absolute, the sweep folder stays as typed: each job's record
    # must still name its own folder, not the last part of it (s0 for both jobs).
    proc = train_cli(
        "-m",
        *TINY,
        "optim.lr=-1",
        "model=baseline,resnet",
        "hydra.sweep.dir=sw",
        "hydra.sweep.subdir=${model.name}/s${seed}",
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 1 and "2 failed" in proc.stdout
    refused = find_runs([tmp_path / "sw"])
    assert [(run.path, run.model, run.status) for run in refused] == [
        (tmp_path / "sw" / "baseline" / "s0", "baseline", "failed"),
        (tmp_path / "sw" / "resnet" / "s0", "resnet", "failed"),
    ]


def test_a_sweep_job_that_fails_on_its_data_can_be_relaunched_corrected(tmp_path):
    # A missing data.root passes the up-front checks and fails once the data loads, after the job
    # took its folder: the folder must not keep that config to hold the re-launch to.
    sweep = tmp_path / "sweep"
    bad = train_cli(
        "-m", "data=folder", "data.root=missing", f"hydra.sweep.dir={sweep}", cwd=tmp_path, check=False
    )
    assert bad.returncode == 1 and f"data.root={tmp_path / 'missing'}: no such folder" in bad.stderr
    assert not list(sweep.glob("*/run_config.json"))
    assert list(sweep.glob(".refused_*.json"))  # the failure is recorded beside the folder
    # Its dataset named as a run's is, by the absolute root: from where the sweep was launched.
    [refused] = find_runs([sweep])
    assert refused.data == f"folder:{tmp_path / 'missing'}"
    train_cli("-m", *TINY, f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert list(sweep.glob("*/test_metrics.json"))


def test_a_seed_too_big_for_a_float_is_kept_exactly():
    from skinclf.config import compose_config, number_setting

    assert number_setting(compose_config(["seed=12345678901234567"]), "seed", int) == 12345678901234567


@pytest.mark.parametrize("key", ["hydra.run.dir", "hydra.sweep.dir"])
def test_an_output_folder_that_cannot_be_written_is_one_clear_error(tmp_path, key, monkeypatch):
    # os.access says no, as it would for a read-only folder (CI runs as root, which may write anywhere).
    monkeypatch.setattr(os, "access", lambda *args, **kwargs: False)
    multirun = ["-m"] if key == "hydra.sweep.dir" else []
    proc = error_run(tmp_path, *multirun, *TINY, f"{key}=locked/run")
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"skinclf train: error: {key}=locked/run: {tmp_path} is not writable"
    assert not (tmp_path / "locked").exists()


@pytest.mark.parametrize("folder", ["afile/run", "afile/${model.name}"])  # with an interpolation too
@pytest.mark.parametrize("key", ["hydra.run.dir", "hydra.sweep.dir"])
def test_an_output_folder_under_a_file_is_one_clear_error(tmp_path, key, folder):
    (tmp_path / "afile").write_text("a file, not a folder")
    multirun = ["-m"] if key == "hydra.sweep.dir" else []
    proc = error_run(tmp_path, *multirun, *TINY, f"{key}={folder}")
    assert proc.returncode == 2
    assert (
        proc.stderr.strip()
        == f"skinclf train: error: {key}={folder}: {tmp_path / 'afile'} is a file; expected a folder"
    )


@pytest.mark.parametrize("key", ["hydra.run.dir", "hydra.sweep.dir"])
def test_an_output_folder_where_none_can_be_made_is_one_clear_error(tmp_path, key, monkeypatch):
    # What access() cannot tell (a read-only disk, /proc, root's rights): the probe folder fails.
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(tempfile, "mkdtemp", read_only)
    multirun = ["-m"] if key == "hydra.sweep.dir" else []
    proc = error_run(tmp_path, *multirun, *TINY, f"{key}=new/run")
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        f"skinclf train: error: {key}=new/run: cannot make {tmp_path / 'new'} (Read-only file system)"
    )
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize(
    ("launcher", "sweep"),
    [
        ("slurm", "-m"),
        ("submitit_slurm", "-m"),
        ("slurm", "hparams_search=grid"),
        ("slurm", "experiment=paper"),
    ],
)
def test_a_slurm_sweep_without_slurm_is_one_clear_error(tmp_path, monkeypatch, launcher, sweep):
    # hparams_search=grid and experiment=paper are sweeps without -m: their configs set MULTIRUN.
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch on it
    proc = error_run(tmp_path, sweep, f"hydra/launcher={launcher}", *TINY)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        f"skinclf train: error: hydra/launcher={launcher}: no sbatch command on this machine; launch the "
        "sweep from a node of the Slurm cluster, or run it here with hydra/launcher=local or the "
        "default launcher"
    )
    assert not (tmp_path / "outputs").exists()


def test_no_experiment_is_no_sweep_for_the_slurm_check(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch on it
    _check_launcher(["experiment=null", "hydra/launcher=slurm"])  # a single run: the launcher is unused
    with pytest.raises(SkinclfError, match="no sbatch command"):
        _check_launcher(["experiment=paper", "hydra/launcher=slurm"])


@pytest.mark.parametrize("folds", ["cv.folds=0", "cv.folds=3,0", "cv.folds=00", "cv.folds=3,0.0"])
def test_a_grid_search_without_folds_is_refused_rather_than_tested(tmp_path, folds):
    # cv.folds=0 made each grid point a plain run: trained, tested, and ranked by nothing but
    # the report, which would pick the best point on the test split. Refused before the launch:
    # it was refused job by job, as many failed jobs in a new sweep folder.
    sweep = tmp_path / "grid"
    proc = error_run(tmp_path, "hparams_search=grid", folds, *TINY, f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "skinclf train: error: cv.folds=0: hparams_search=grid ranks its points by cross-validation on "
        "the training split; expected at least 2 folds"
    ]
    assert not sweep.exists()


def test_a_grid_search_refuses_a_size_below_one_before_it_trains(tmp_path):
    proc = error_run(tmp_path, *TINY, "cv.folds=2", "data.batch_size=0")
    assert "data.batch_size=0: must be at least 1" in proc.stderr
    assert "fold" not in proc.stdout


def test_misspelled_key_is_one_clear_error(tmp_path):
    proc = error_run(tmp_path, "trainer.max_epoch=3")
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "skinclf train: error: trainer.max_epoch: no skinclf config has this key; did you mean "
        "trainer.max_epochs? (`skinclf train --help` lists them)"
    )
    assert not (tmp_path / "outputs").exists()


def test_a_key_of_other_configs_names_them(tmp_path):
    proc = error_run(tmp_path, "data.root=ds")  # the default data=synthetic has no root
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "skinclf train: error: data.root: the configs chosen (the defaults) have no such key; "
        "data=dermamnist, data=folder have it"
    )
    with pytest.raises(SkinclfError, match=r"\(model=resnet\) have no such key; .*model=vgg16"):
        check_override_keys(["model=resnet", "model.pretrained=false"])
    # A choice put in another package is composed as given: the augmented pipeline has p, no q.
    with pytest.raises(SkinclfError, match=r"model.pipeline.q: no skinclf config has this key; did you mean"):
        check_override_keys(["pipeline@model.pipeline=augmented", "model.pipeline.q=0.3"])


@pytest.mark.parametrize(
    "args",
    [
        ["model=vgg16", "model.pretrained=false"],
        ["model=res_aug", "model.pipeline.p=0.3", "trainer.max_epochs=2"],
        ["pipeline@model.pipeline=augmented", "model.pipeline.p=0.3"],
        ["-m", "model=baseline,vgg16", "model.pretrained=false"],  # one of the sweep's configs has it
        ["experiment=paper", "seed=1"],
        ["+optim.lrr=1"],  # appended keys have their own check, once the run's config is composed
        ["++optim.lrr=1"],
        ["data=folder", "data.root=ds", "hydra.run.dir=x"],
        ["-m", "model=glob(vgg*)", "model.input_preset=full"],  # a glob only Hydra expands
        ["--config-path", "/my/configs", "extra=2"],  # a primary config of the user's own
    ],
)
def test_keys_that_the_chosen_configs_have_pass_the_key_check(args):
    check_override_keys(args)


@pytest.mark.parametrize(
    "args",
    [
        ["-cd", "/my/configs", "model=mine"],
        ["--cfg", "job"],
        ["--info", "config"],
        ["-cp", "/my/configs", "-cn", "mine"],
        ["-p", "model", "--cfg", "job", "~data.seed"],
        ["--cfg", "job", "--config-n", "train"],  # abbreviated, as argparse takes it
        ["--multi", "seed=1,2"],
        ["--info", "model=resnet"],  # not a topic of --info: Hydra's parser refuses it, itself
        ["--version"],
    ],
)
def test_a_hydra_option_with_a_separate_value_passes_the_checks(args):
    # The value (a word without "=") is no override: Hydra's argument parser takes it.
    _check_launcher(args)
    _check_group_choices(args)
    check_override_keys(args)
    _check_sweeps_are_launched_as_sweeps(args)


def test_a_key_only_the_sweeps_choices_have_goes_to_hydra_as_a_forced_add():
    # Hydra composes model=baseline (the default) before a sweep's jobs: no model.pretrained there.
    for sweep in (["model=vgg16,vgg16_ft"], ["model=baseline,vgg16"]):
        assert check_override_keys(["-m", *sweep, "model.pretrained=false"]) == ["model.pretrained=false"]
    assert check_override_keys(["model=vgg16", "model.pretrained=false"]) == []  # composed as given
    assert check_override_keys(["-m", "model=vgg16,vgg16_ft", "seed=1,2"]) == []


@pytest.mark.parametrize(
    ("arg", "message"),
    [
        ("trainer=null", "trainer=null: trainer is a group of settings (max_epochs, patience, "),
        ("recipe.augment=null", "; expected its keys set one by one (recipe.augment.enabled=...)"),
        ("trainer=[1]", "trainer=[1]: trainer is a group of settings"),
        (
            "data.cache_dir=[a,b]",
            "data.cache_dir=[a,b]: expected one value for data.cache_dir (default: data), not a list",
        ),
        ("model=null", "model=null: expected one of augmented, baseline, "),
        ("experiment=null", "experiment=null: expected one of paper (leave experiment out for its default)"),
        (
            "data.root=[a",
            "data.root=[a: no viable alternative at input '[a'; expected Hydra's override grammar",
        ),
        ("trainer.max_epochs", "trainer.max_epochs: no value; expected key=value (trainer.max_epochs=2, "),
        ("optim.lr=1e-3,1e-4", "optim.lr=1e-3,1e-4: several values make a sweep; add -m to train one run "),
        ("seed=range(3)", "seed=range(3): several values make a sweep; add -m "),
        ("--info -m seed=1,2", "--multirun and --info: expected only one of --run, --multirun, --cfg, "),
        ("-i --resolve", "--resolve: expected it with --cfg (or --help), whose config it resolves"),
    ],
)
def test_a_value_of_the_wrong_shape_is_one_line_before_hydra(tmp_path, arg, message):
    # Before: tracebacks (trainer=null, recipe.augment=null, model=null), Hydra's multi-line
    # errors, or a cache folder named "['a', 'b']".
    proc = error_run(tmp_path, *arg.split())
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith("skinclf train: error: ") and message in proc.stderr
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "['a', 'b']").exists()


@pytest.mark.parametrize("users_files", [[], ["notes.txt"]], ids=["empty", "with-a-file"])
def test_a_refused_run_keeps_a_folder_the_user_made_and_removes_one_its_launch_made(tmp_path, users_files):
    mine = tmp_path / "mine"
    mine.mkdir()
    for name in users_files:  # the user's own, not a run's: the folder is no earlier run's
        (mine / name).write_text("keep me")
    kept = sorted([*users_files, "train.log"])
    error_run(tmp_path, *TINY, "data.batch_size=0", f"hydra.run.dir={mine}")
    assert sorted(p.name for p in mine.iterdir()) == kept  # empty before, but the user's
    # Its log says why nothing ran (once: the console has the same line).
    log = (mine / "train.log").read_text()
    assert log.count("skinclf train: error: data.batch_size=0") == 1
    # Refused once the run had claimed the folder: the claim is undone too, so that the corrected
    # launch is not held to the refused config.
    proc = error_run(tmp_path, "data=folder", "data.root=missing", f"hydra.run.dir={mine}")
    assert sorted(p.name for p in mine.iterdir()) == kept
    assert (mine / "train.log").read_text().count("missing: no such folder") == 1
    assert "error" not in proc.stdout  # the console's log stream: the error went to stderr only
    train_cli(*TINY, f"hydra.run.dir={mine}", cwd=tmp_path)
    assert (mine / "test_metrics.json").is_file()
    # A launch-made folder named through `..` is the one Hydra made (it normalises the path).
    (tmp_path / "sub").mkdir()
    # Refused once it has claimed the folder (.hydra/ and its status record written).
    error_run(tmp_path, "data=folder", "data.root=missing", "hydra.run.dir=sub/../made/run")
    assert not (tmp_path / "made").exists()


def _file_size_limit(limit: int):
    """For subprocess's preexec_fn: files of at most ``limit`` bytes, a longer write failing with
    EFBIG (SIGXFSZ ignored), as a full disk fails it."""

    def apply() -> None:
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

    return apply


@pytest.mark.skipif(sys.platform != "linux", reason="file size limits as Linux sets them")
def test_a_checkpoint_that_cannot_be_written_is_one_line_naming_it(tmp_path):
    # A full disk: torch.save's "[enforce fail at inline_container.cc] unexpected pos ..." came as
    # Hydra's traceback, naming neither the file nor the reason.
    command = [sys.executable, "-m", "skinclf", "train", *TINY, "hydra.run.dir=run"]
    subprocess.run([*command[:4], *TINY, "hydra.run.dir=warm"], cwd=tmp_path, check=True, capture_output=True)
    proc = subprocess.run(  # the data cached by the first run; baseline's checkpoint is ~100 MB
        command, cwd=tmp_path, capture_output=True, text=True, preexec_fn=_file_size_limit(20_000_000)
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    last_line = proc.stderr.strip().splitlines()[-1]
    assert last_line.startswith(
        f"skinclf train: error: {tmp_path / 'run' / 'best.pt'}: could not be written ("
    )
    assert last_line.endswith(" GB free on its file system")
    assert not list((tmp_path / "run").glob(".best.pt.*"))  # no temporary file left behind


@pytest.mark.skipif(sys.platform != "linux", reason="file size limits as Linux sets them")
def test_a_full_disk_in_any_command_is_one_line(tmp_path):
    # PIL's PNG writer (report, explain) met a full disk as a traceback, exit 1.
    subprocess.run(
        [sys.executable, "-m", "skinclf", "train", *TINY, "hydra.run.dir=run"], cwd=tmp_path, check=True
    )
    command = [sys.executable, "-m", "skinclf", "report", "run", "--out", "rep"]
    proc = subprocess.run(  # the figures are larger than 10 kB, table1.csv is not
        command, cwd=tmp_path, capture_output=True, text=True, preexec_fn=_file_size_limit(10_000)
    )
    assert proc.returncode == 2, proc.stderr
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith(
        "skinclf report: error: File too large (while writing): no result file is left half-written"
    )


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("where", ["claiming the folder", "writing a figure", "a sweep job's figure"])
def test_a_full_disk_while_training_is_one_line(tmp_path, monkeypatch, where):
    # Only run_in_hydra's errors were turned into a line: a full disk while the folder was claimed
    # (run_config.json, .hydra/) was Hydra's traceback; a sweep job logged a library's traceback.
    from skinclf import train, train_command

    if where == "claiming the folder":
        monkeypatch.setattr(train_command, "_write_hydra_record", _disk_full)
    else:
        monkeypatch.setattr(train, "write_run_curves", _disk_full)
    sweep = ("-m", "hydra.sweep.dir=sweep") if where == "a sweep job's figure" else ("hydra.run.dir=run",)
    proc = error_run(tmp_path, *TINY, *sweep)
    full = "No space left on device (while writing): no result file is left half-written"
    if sweep[0] == "-m":
        assert proc.returncode == 1
        assert f"skinclf train: job 0 failed: {full}" in proc.stderr
    else:
        assert proc.returncode == 2
        [line] = proc.stderr.strip().splitlines()
        assert line.startswith(f"skinclf train: error: {tmp_path / 'run'}: {full}")  # the error names no file
        # A run stopped mid-way names its folder, to resume or read its log.
        assert ("output directory: " in proc.stdout) is (where == "writing a figure")


def test_a_sweep_job_whose_first_checkpoint_meets_a_full_disk_fails_alone(tmp_path, monkeypatch):
    # The checkpoint's SkinclfError left the folder with bookkeeping only, so the job recorded a
    # refusal beside it: on the full disk that write raised, and the sweep ended in a traceback.
    from skinclf.sweep import jobs
    from skinclf.training import loop

    def checkpoint_not_written(state, path):
        raise SkinclfError(f"{path}: could not be written (torch.save stopped short); 0.0 GB free")

    monkeypatch.setattr(loop, "save_checkpoint", checkpoint_not_written)
    monkeypatch.setattr(jobs, "record_refusal", _disk_full)
    proc = error_run(tmp_path, "-m", "seed=0,1", *TINY, "hydra.sweep.dir=sweep")
    assert proc.returncode == 1
    assert proc.stderr.count("best.pt: could not be written (torch.save stopped short)") == 2
    assert "sweep " in proc.stdout and "2 jobs" in proc.stdout


def test_train_log_lines_a_full_disk_refuses_are_dropped_without_a_traceback(tmp_path, capsys):
    # logging printed a 45-line "--- Logging error ---" for each line, burying the run's error.
    from skinclf.run_folder import TrainLogHandler

    handler = TrainLogHandler(tmp_path / "train.log")

    class FullDisk(io.StringIO):
        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

    handler.stream = FullDisk()
    record = logging.LogRecord("skinclf", logging.INFO, __file__, 0, "epoch 1", None, None)
    handler.handle(record)
    assert capsys.readouterr().err == ""
    handler.stream = io.StringIO()
    handler.stream.write = lambda text: 1 / 0  # any other failure is still reported
    handler.handle(record)
    assert "--- Logging error ---" in capsys.readouterr().err


def test_a_run_whose_error_leaves_no_room_for_its_status_reports_that_error(tmp_path, monkeypatch):
    # A full disk: writing "failed" into job_status.json failed too, and its OSError (with the
    # run's own error chained under it) was what the user saw.
    from skinclf import run_folder

    real_write_status = run_folder.write_status

    def no_room_after_running(out_dir, status, *args, **kwargs):
        if status != "running":
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write_status(out_dir, status, *args, **kwargs)

    monkeypatch.setattr(run_folder, "write_status", no_room_after_running)
    with pytest.raises(ValueError, match="the run's own error"), run_folder.recorded_status(tmp_path, None):
        raise ValueError("the run's own error")
    assert run_folder.read_status(tmp_path)["status"] == "running"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_gpu_is_one_line_and_leaves_no_run(tmp_path):
    proc = error_run(tmp_path, "device=cuda", *TINY)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0
    assert "device=cuda" in proc.stderr and "no CUDA GPU" in proc.stderr
    assert not (tmp_path / "outputs").exists()  # nor the folders made for its run folder


def test_top_level_help_and_unknown_command(tmp_path):
    run = [sys.executable, "-m", "skinclf"]
    helped = subprocess.run([*run, "--help"], capture_output=True, text=True, check=True)
    assert "train" in helped.stdout and "not a diagnostic device" in helped.stdout
    bad = subprocess.run([*run, "trian"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown command 'trian'" in bad.stderr
    # No command did nothing: the usage, as an error (a script must not go on as if it had run).
    bare = subprocess.run(run, capture_output=True, text=True)
    assert bare.returncode == 2 and bare.stderr.strip() == helped.stdout.strip() and not bare.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["predict", "run", "x.png", "--threshold", "1.5"],
            "argument --threshold: '1.5': expected a probability",
        ),
        (["explain", "run", "x.png", "--class", "foo"], "argument --class: invalid choice: 'foo'"),
        (["report", "--bogus"], "unrecognized arguments: --bogus"),
        (["prepare", "a", "b", "--seed", "-1"], "argument --seed: '-1': expected a non-negative integer"),
        (["summary", "--x"], "unrecognized arguments: --x"),
        # --out "$DIR" with DIR unset: report and explain wrote into the current folder.
        (["report", "--out", ""], "argument --out: '': empty; expected a path (. for the current folder)"),
        (["explain", "run", "x.png", "--out", " "], "argument --out: ' ': empty; expected a path"),
        (["predict", "run", "x.png", "--out="], "argument --out: '': empty; expected a path"),
        (["prepare", "a", ""], "argument OUT: '': empty; expected a path"),
    ],
)
def test_a_bad_argument_of_any_command_is_one_error_line(args, message, capsys):
    # argparse printed its usage block above the error: three lines where skinclf says one.
    with pytest.raises(SystemExit) as exit_info:
        cli_main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err == f"skinclf {args[0]}: error: {message}" + err.split(message, 1)[1]
    assert len(err.strip().splitlines()) == 1 and err.strip().endswith(
        f"(`skinclf {args[0]} --help` shows the usage)"
    )


def test_an_unknown_train_option_is_one_line_and_version_names_skinclf(tmp_path, capsys, monkeypatch):
    # Hydra printed its 9-line usage before the option; its --version named only Hydra.
    monkeypatch.chdir(tmp_path)
    for args in (["--bogus"], ["-m", "model=baseline", "-x"]):
        with pytest.raises(SystemExit) as exit_info:
            cli_main(["train", *args])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"skinclf train: error: {args[-1]}: unknown option; expected Hydra's (")
        assert "\n" not in err
    assert not (tmp_path / "outputs").exists()
    for args in (["--version"], ["train", "--version"]):
        cli_main(args)
        assert capsys.readouterr().out.startswith(f"skinclf {skinclf.__version__}")


def test_overrides_on_both_sides_of_an_option_are_all_read(capsys, monkeypatch, tmp_path):
    # Hydra 1.3's parser stopped at the first option: `model=resnet --cfg job seed=3` (or
    # `model=res_aug -m seed=0,1`) printed its usage and "unrecognized arguments: seed=3".
    monkeypatch.chdir(tmp_path)
    hydra_config = HydraConfig.instance()  # --cfg leaves Hydra's config of this folder set: put back
    monkeypatch.setattr(hydra_config, "cfg", hydra_config.cfg)
    cli_main(["train", "model=resnet", "--cfg", "job", "seed=3"])
    printed = OmegaConf.create(capsys.readouterr().out)
    assert (printed.model.name, printed.seed) == ("resnet", 3)
    assert overrides_together(["model=res_aug", "-m", "seed=0,1", "-cn", "train"]) == [
        "model=res_aug",
        "seed=0,1",
        "-m",
        "-cn",
        "train",
    ]
    # As typed: lines Hydra reads (a bare --info after the overrides), lines it refuses anyway,
    # and lines another order would change (an option's value that reads like an override).
    for args in (["model=resnet", "-i"], ["--info", "a=1"], ["-p", "seed=1", "--cfg", "job", "seed=1"]):
        assert overrides_together(args) == args


def test_train_help_lists_the_models(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "skinclf", "train", "--help"], capture_output=True, text=True, check=True
    )
    assert "skinclf train model=res_aug" in proc.stdout  # the examples
    # The config groups, listed by Hydra: every shipped model config.
    [models] = [line for line in proc.stdout.splitlines() if line.startswith("model: ")]
    assert models.removeprefix("model: ").split(", ") == sorted(model_names())


# `skinclf train ARGS` in a fresh process, then which of the heavy modules it imported.
IMPORTED_BY_COMMAND = """
import sys
from skinclf.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
print("imported:", [m for m in ("torch", "pandas", "skinclf.train") if m in sys.modules], file=sys.stderr)
"""


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["train", "--help"], None),
        (["train", "model=resnt"], "resnt"),  # Hydra's config errors
        (["train", "-m", "model=baseline,resnt"], "resnt"),
        # The other commands parse their arguments before importing their modules.
        (["predict", "--help"], None),
        (["predict", "run", "img.png", "--threshold", "2"], "'2': expected a probability threshold"),
        (["explain", "--help"], None),
        (["explain", "run", "img.png", "--class", "bcc"], "argument --class: invalid choice: 'bcc'"),
        (["prepare", "--help"], None),
        (["prepare", "src"], "the following arguments are required: OUT"),
        (["summary", "--help"], None),
        # report's module imports pandas and matplotlib (a second).
        (["report", "--help"], None),
        (["report", "--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_help_and_argument_errors_answer_without_importing_torch(tmp_path, args, error):
    # Importing torch takes seconds; --help and a wrong argument need none of it.
    proc = subprocess.run(
        [sys.executable, "-c", IMPORTED_BY_COMMAND, *args], cwd=tmp_path, capture_output=True, text=True
    )
    assert proc.stderr.strip().splitlines()[-1] == "imported: []"
    if error is None:
        assert proc.stdout.startswith("usage: skinclf") or "skinclf train" in proc.stdout
    else:
        assert error in proc.stderr  # the error itself came


def test_an_error_line_keeps_the_reason_an_announcing_first_line_points_to():
    from skinclf.errors import first_line

    hydra_style = RuntimeError(
        "Error in call to target 'skinclf.models.simple_cnn.SimpleCNN':\n"
        "TypeError(\"SimpleCNN.__init__() got an unexpected keyword argument 'foo'\")\nfull_key: model.arch"
    )
    assert first_line(hydra_style) == (
        "Error in call to target 'skinclf.models.simple_cnn.SimpleCNN': "
        "TypeError(\"SimpleCNN.__init__() got an unexpected keyword argument 'foo'\")"
    )
    assert first_line(ValueError("one line\nmore detail")) == "one line"
    assert first_line(KeyError()) == "KeyError"
