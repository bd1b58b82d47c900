"""`skinclf predict`: a finished run's model and preprocessing applied to image files."""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import shutil
import socket
import struct
import subprocess
import sys
import zlib
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
import torch
from PIL import Image

from skinclf.arguments import SYNTHETIC_MODEL_NOTE
from skinclf.cli import main as cli_main
from skinclf.config import compose_config
from skinclf.data import load_splits
from skinclf.errors import SkinclfError
from skinclf.io import python_strings
from skinclf.predict import predict_files
from skinclf.trained_run import load_trained_run

from conftest import TINY, another_run, fail_if_called, files_of, image_and_kept_file, train_in_process

N_IMAGES = 10


@pytest.fixture(scope="module")
def run_and_images(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, pd.DataFrame]:
    """A tiny `augmented` run (its pipeline has fitted mean/std, so a wrong preprocessing shows)
    and a folder with some of its test images saved as PNG, plus a corrupt file and a non-image."""
    tmp = tmp_path_factory.mktemp("predict")
    # fp32: bf16 results may depend on the batch size, and the batches here differ from the run's.
    overrides = [*TINY, "model=augmented", "trainer.precision=fp32"]
    run_dir, _ = train_in_process(tmp, *overrides)
    test = load_splits(compose_config([f"data.cache_dir={tmp / 'data'}", *overrides]).data).test
    folder = tmp / "images"
    folder.mkdir()
    for i in range(N_IMAGES):
        Image.fromarray(test.images[i].permute(1, 2, 0).numpy()).save(folder / f"test_{i:03d}.png")
    (folder / "corrupt.png").write_bytes((folder / "test_000.png").read_bytes()[:300])
    (folder / "notes.txt").write_text("not an image\n")
    expected = pd.read_csv(run_dir / "predictions.csv").query("split == 'test'").set_index("index")
    return run_dir, folder, expected


def _predict(*args: str | Path) -> None:
    cli_main(["predict", *map(str, args)])


def test_predict_matches_the_runs_own_test_predictions(run_and_images, tmp_path, capsys):
    run_dir, folder, expected = run_and_images
    out = tmp_path / "pred.csv"
    _predict(run_dir, folder, "--out", out)
    table = pd.read_csv(out, keep_default_na=False)
    assert list(table.columns) == ["path", "prob_mel", "prediction", "threshold", "error"]
    assert len(table) == N_IMAGES + 2

    scored = table[table["error"] == ""]
    assert len(scored) == N_IMAGES
    index = scored["path"].map(lambda p: int(Path(p).stem.split("_")[1]))
    probs = scored["prob_mel"].astype(float).to_numpy()
    assert probs == pytest.approx(expected.loc[index, "prob_mel"].to_numpy(), abs=1e-5)

    threshold = load_trained_run(run_dir).threshold
    assert threshold != 0.5  # the stored operating point, not the default
    # Within float parsing: some pandas versions' CSV reader is one ulp off.
    assert scored["threshold"].astype(float).tolist() == pytest.approx([threshold] * N_IMAGES, rel=1e-12)
    assert (scored["prediction"] == ["MEL" if p >= threshold else "NV" for p in probs]).all()
    err = capsys.readouterr().err
    assert "research tool, not a diagnosis" in err
    assert f"note: {SYNTHETIC_MODEL_NOTE}" in err  # the run learned from the built-in data
    assert f"{N_IMAGES} images scored, 2 unreadable -> {out}" in err
    # The rule printed is the one the CSV follows, to the last digit (a rounded 0.5 was printed
    # for 0.49998915, beside a MEL call at 0.49999).
    assert f"MEL when prob_mel >= {threshold!r}, from the run's operating point" in err
    assert len(repr(threshold)) > 6  # this run's threshold has more digits than 4 significant ones


def test_unreadable_files_are_reported_and_the_rest_scored(run_and_images, tmp_path):
    run_dir, folder, _ = run_and_images
    out = tmp_path / "pred.csv"
    _predict(run_dir, folder, "--out", out)
    table = pd.read_csv(out, keep_default_na=False).set_index("path")
    corrupt, text = table.loc[str(folder / "corrupt.png")], table.loc[str(folder / "notes.txt")]
    assert "corrupt or truncated" in corrupt["error"] and str(folder / "corrupt.png") in corrupt["error"]
    assert "not an image" in text["error"]
    assert corrupt["prob_mel"] == "" and text["prediction"] == ""
    assert (table.drop(index=[str(folder / "corrupt.png"), str(folder / "notes.txt")])["error"] == "").all()


def test_images_scored_in_several_chunks_get_one_row_each_with_their_own_probability(
    run_and_images, tmp_path, monkeypatch
):
    # Past CHUNK images a folder is scored chunk by chunk: a chunk left pending after it was
    # scored came out again with the next one, as extra rows. Chunks of 3 here: 10 images, 4 chunks.
    run_dir, folder, _ = run_and_images
    monkeypatch.setattr("skinclf.predict.CHUNK", 3)
    files = sorted(folder.iterdir())
    out = tmp_path / "pred.csv"
    _predict(run_dir, *files, "--out", out)
    table = pd.read_csv(out, keep_default_na=False)
    assert table["path"].tolist() == [str(f) for f in files]  # one row each, in the order given
    run = load_trained_run(run_dir)
    scored = table[table["error"] == ""]
    assert len(scored) == N_IMAGES
    # Each image's probability is its own, as scored alone (fp32 run: batching changes no digit).
    alone = [float(predict_files(run, [Path(p)], 0.5)["prob_mel"].iloc[0]) for p in scored["path"]]
    assert scored["prob_mel"].astype(float).tolist() == pytest.approx(alone, abs=1e-6)


def test_rows_come_in_the_order_the_files_were_given(run_and_images, tmp_path):
    # Unreadable files get their row at once, readable ones when their chunk is scored: without
    # putting the rows back in order the error rows came first, and rows no longer matched files.
    run_dir, folder, _ = run_and_images
    files = [folder / name for name in ("test_003.png", "corrupt.png", "test_001.png", "test_000.png")]
    out = tmp_path / "pred.csv"
    _predict(run_dir, *files, "--out", out)
    table = pd.read_csv(out, keep_default_na=False)
    assert table["path"].tolist() == [str(f) for f in files]
    assert table["error"].iloc[1].startswith(f"{files[1]}: corrupt or truncated")
    assert (table["error"].drop(index=1) == "").all() and table["prob_mel"].iloc[1] == ""
    run = load_trained_run(run_dir)
    for row in (0, 2, 3):
        own = float(predict_files(run, [files[row]], 0.5)["prob_mel"].iloc[0])
        assert float(table["prob_mel"].iloc[row]) == pytest.approx(own, abs=1e-6)


@pytest.mark.parametrize("which", ["one", "both"])
def test_no_readable_image_is_an_error_naming_the_file_and_writes_nothing(
    which, run_and_images, tmp_path, capsys
):
    run_dir, folder, _ = run_and_images
    files = [folder / "corrupt.png"] + ([folder / "notes.txt"] if which == "both" else [])
    out = tmp_path / "new" / "pred.csv"
    with pytest.raises(SystemExit) as exit_info:
        _predict(run_dir, *files, "--out", out)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    first = {
        "one": "no image to score: ",
        "both": "none of the 2 files could be read as an image; the first: ",
    }
    assert (
        len(err.splitlines()) == 1 and f"{first[which]}{folder / 'corrupt.png'}: corrupt or truncated" in err
    )
    assert not (tmp_path / "new").exists()


def test_threshold_option_overrides_the_operating_point(run_and_images, tmp_path):
    run_dir, folder, _ = run_and_images
    out = tmp_path / "pred.csv"
    _predict(run_dir, folder / "test_000.png", folder / "test_001.png", "--out", out, "--threshold", "1")
    table = pd.read_csv(out)
    assert (table["threshold"] == 1.0).all()
    assert (table["prediction"] == "NV").all()  # a sigmoid below 1 is never >= 1
    _predict(run_dir, folder / "test_000.png", "--out", out, "--threshold", "-0")
    assert pd.read_csv(out, dtype=str)["threshold"].tolist() == ["0.0"]  # not -0.0

    # At a threshold equal to an image's own probability, the call is MEL (prob_mel >= threshold).
    run = load_trained_run(run_dir)
    image = folder / "test_000.png"
    own_prob = float(predict_files(run, [image], threshold=0.5)["prob_mel"].iloc[0])
    assert predict_files(run, [image], threshold=own_prob)["prediction"].tolist() == ["MEL"]


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` pixels and holds no pixel data: the shape of a
    decompression bomb, without allocating it."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def test_decompression_bomb_is_refused_with_a_clear_message(run_and_images, tmp_path):
    run_dir, folder, _ = run_and_images
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_header_only(50_000, 50_000))
    out = tmp_path / "pred.csv"
    _predict(run_dir, bomb, folder / "test_000.png", "--out", out)
    table = pd.read_csv(out, keep_default_na=False).set_index("path")
    assert "decompression bomb" in table.loc[str(bomb), "error"]
    assert table.loc[str(folder / "test_000.png"), "error"] == ""


def test_a_folder_scan_leaves_out_explains_figures(run_and_images, tmp_path, capsys):
    # `skinclf explain RUN .` leaves its heat maps in ./explanations; a later `skinclf predict RUN .`
    # scored each figure as a lesion (and called some MEL).
    run_dir, folder, _ = run_and_images
    for name in ("test_000.png", "test_001.png"):
        shutil.copy(folder / name, tmp_path / name)
    cli_main(["explain", str(run_dir), str(tmp_path), "--out", str(tmp_path / "explanations")])
    figures = sorted((tmp_path / "explanations").iterdir())
    assert [f.name for f in figures] == ["test_000_gradcam.png", "test_001_gradcam.png"]
    capsys.readouterr()
    _predict(run_dir, tmp_path, "--out", tmp_path / "pred.csv")
    table = pd.read_csv(tmp_path / "pred.csv", keep_default_na=False)
    assert sorted(Path(p).name for p in table["path"]) == ["test_000.png", "test_001.png"]
    assert (
        f"{tmp_path}: left out 2 figures of skinclf explain (*_gradcam.png, such as "
        in capsys.readouterr().err
    )
    # A figure named on the command line is scored: the user asked for it.
    _predict(run_dir, figures[0], "--out", tmp_path / "figure.csv")
    assert pd.read_csv(tmp_path / "figure.csv", keep_default_na=False)["error"].tolist() == [""]
    # A folder of figures only holds nothing to score.
    with pytest.raises(SystemExit):
        _predict(run_dir, tmp_path / "explanations")
    assert "explanations: folder holds no files besides skinclf explain's figures" in capsys.readouterr().err


def test_a_folder_that_is_not_a_finished_run_is_refused(run_and_images, tmp_path, capsys):
    _, folder, _ = run_and_images
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "best.pt").write_bytes(b"")
    with pytest.raises(SystemExit) as exit_info:
        _predict(unfinished, folder)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert str(unfinished) in err and "test_metrics.json is missing" in err
    assert "sweep" not in err
    # A best.pt that is there but no file was called missing.
    (unfinished / "best.pt").unlink()
    (unfinished / "best.pt").mkdir()
    with pytest.raises(SystemExit):
        _predict(unfinished, folder)
    assert "(best.pt is no file)" in capsys.readouterr().err


def test_a_stopped_run_or_swapped_arguments_say_what_to_do(run_and_images, tmp_path, capsys):
    run_dir, folder, _ = run_and_images
    # A run stopped before its end (Ctrl-C): the command that resumes it, from its overrides.
    stopped = tmp_path / "stopped run"
    shutil.copytree(run_dir, stopped)
    (stopped / "test_metrics.json").unlink()
    (stopped / ".hydra").mkdir(exist_ok=True)
    (stopped / ".hydra" / "overrides.yaml").write_text("- model=augmented\n- seed=1\n")

    def hint(status):
        (stopped / "job_status.json").write_text(json.dumps({"launch": None, **status}))
        with pytest.raises(SystemExit):
            _predict(stopped, folder)
        err = capsys.readouterr().err
        assert "(test_metrics.json is missing)" in err
        return err.strip().split("; ")[-1]

    resume = f"skinclf train model=augmented seed=1 'hydra.run.dir=\"{stopped}\"' resume=true"
    assert hint({"status": "stopped"}) == f"its run ended unfinished: {resume}"
    # Killed outright: "running", but its process is gone.
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead = {"status": "running", "pid": int(gone.stdout), "host": socket.gethostname()}
    assert hint(dead) == f"its run ended unfinished: {resume}"
    assert hint({"status": "running", "pid": 1, "host": "node7"}).startswith(
        "its run is recorded as running on node7"
    )
    assert hint({"status": "failed"}) == "its run failed (its train.log says why)"
    # A sweep's job: re-launching the sweep resumes it with the others.
    (tmp_path / "multirun.yaml").write_text("hydra: {}\n")
    assert hint({"status": "stopped"}) == (
        "its run ended unfinished: the same `skinclf train -m` command with "
        f"hydra.sweep.dir={tmp_path} resumes it"
    )
    # The images first, the run second: the folder of images is named as such.
    with pytest.raises(SystemExit):
        _predict(folder, run_dir)
    assert f"{folder}: not a finished skinclf run (best.pt is missing)" in (err := capsys.readouterr().err)
    assert err.strip().endswith("; it holds images: the run folder comes first, then the images")


def test_a_sweep_folder_given_as_the_run_points_to_its_job_folders(run_and_images, tmp_path, capsys):
    _, folder, _ = run_and_images
    (tmp_path / "multirun.yaml").write_text("hydra: {}\n")  # what a sweep's folder holds
    with pytest.raises(SystemExit) as exit_info:
        _predict(tmp_path, folder)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("; a sweep's folder: give one of its job folders") and len(err.splitlines()) == 1


@pytest.mark.parametrize("given", ["sweep", "point", "running sweep", "running point"])
def test_a_grid_search_given_as_the_run_says_it_keeps_no_model(run_and_images, tmp_path, capsys, given):
    # Its folder and its points' folders: "a sweep's folder: give one of its job folders", and
    # then a job folder's "best.pt is missing", sent the user round in a circle. While it runs
    # (or where every point failed) there is no grid_search.md nor cv_result.json yet: Hydra's
    # record of the choice tells.
    _, folder, _ = run_and_images
    choices = "hydra:\n  runtime:\n    choices:\n      hparams_search: grid\n"
    (tmp_path / "multirun.yaml").write_text(choices)
    point = tmp_path / "0_baseline_bs32_lr0.001"
    (point / ".hydra").mkdir(parents=True)
    (point / ".hydra" / "hydra.yaml").write_text(choices)
    if not given.startswith("running"):
        (tmp_path / "grid_search.md").write_text("# Grid search\n")
        (point / "cv_result.json").write_text("{}")
    with pytest.raises(SystemExit) as exit_info:
        _predict(tmp_path if given.endswith("sweep") else point, folder)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.endswith(
        "; a grid search's points are cross-validated and keep no model: train the best point of its "
        "grid_search.md with `skinclf train` and give that run"
    )


def test_a_file_given_as_the_run_folder_is_named_a_file(tmp_path, capsys):
    image, _ = image_and_kept_file(tmp_path)
    best = tmp_path / "run" / "best.pt"  # the run's checkpoint, given for its folder
    best.parent.mkdir()
    best.write_bytes(b"")
    with pytest.raises(SystemExit) as exit_info:
        _predict(best, image)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"skinclf predict: error: {best}: is a file; expected the output directory of `skinclf train`"
    )


class _Payload:
    """Unpickling this object (unsafely) writes a marker file: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "code executed"))


@pytest.mark.parametrize(
    "which", ["an image", "the run's predictions.csv", "the run's config", "a new file deep in the run"]
)
def test_an_out_over_an_input_or_inside_the_run_is_refused(run_and_images, tmp_path, capsys, which):
    run_dir, folder, _ = run_and_images
    copy = tmp_path / "images"
    shutil.copytree(folder, copy)
    out = {
        "an image": copy / "test_000.png",
        "the run's predictions.csv": run_dir / "predictions.csv",
        "the run's config": run_dir / ".hydra" / "config.yaml",
        "a new file deep in the run": run_dir / "mine" / "pred.csv",
    }[which]
    before = out.read_bytes() if out.exists() else None
    with pytest.raises(SystemExit) as exit_info:
        _predict(run_dir, copy, "--out", out)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"skinclf predict: error: --out {out}: ") and len(err.splitlines()) == 1
    assert (out.read_bytes() if out.exists() else None) == before
    assert not (run_dir / "mine").exists()  # nor the folder made for it


@pytest.mark.parametrize(
    "name",
    [
        "predictions.csv",
        "metrics.csv",
        "test_metrics.json",
        "job_status.json",  # not there yet: a running sweep job writes it later
        ".hydra/config.yaml",
        "fold_0/metrics.csv",
        "fold_1/new.csv",  # a fold folder is the run's alone
    ],
)
def test_an_out_over_another_runs_own_file_is_refused(run_and_images, tmp_path, capsys, name):
    run_dir, folder, _ = run_and_images
    other = another_run(run_dir, tmp_path)
    before = files_of(other)
    out = other / name
    with pytest.raises(SystemExit) as exit_info:
        _predict(run_dir, folder / "test_000.png", "--out", out)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    own = other / name.split("/")[0]
    where = "is" if own == out else "lies in"
    assert err == (
        f"skinclf predict: error: --out {out}: {where} {own}, which the skinclf run in {other} "
        "writes; expected a CSV path that is none of a run's own files"
    )
    assert files_of(other) == before
    assert sorted(p.name for p in other.iterdir()) == sorted({p.relative_to(other).parts[0] for p in before})


def test_a_new_file_in_another_run_folder_is_written(run_and_images, tmp_path):
    # The smallest rule: only a run's own files are refused, not the user's folder around them.
    run_dir, folder, _ = run_and_images
    other = another_run(run_dir, tmp_path)
    before = files_of(other)
    _predict(run_dir, folder / "test_000.png", "--out", other / "mine" / "pred.csv")
    assert len(pd.read_csv(other / "mine" / "pred.csv")) == 1
    assert {path: data for path, data in files_of(other).items() if "mine" not in path.parts} == before


@pytest.mark.parametrize("writer", ["torch", "pickle"])
def test_a_malicious_checkpoint_is_refused_without_running_its_code(run_and_images, tmp_path, writer):
    run_dir, folder, _ = run_and_images
    evil = tmp_path / "evil_run"
    evil.mkdir()
    (evil / "test_metrics.json").write_text((run_dir / "test_metrics.json").read_text())
    marker = tmp_path / "marker"
    payload = {"format": "skinclf-checkpoint-v1", "model": _Payload(marker)}
    if writer == "torch":
        torch.save(payload, evil / "best.pt")
    else:
        (evil / "best.pt").write_bytes(pickle.dumps(payload, protocol=2))

    with pytest.raises(SkinclfError, match="not a readable skinclf checkpoint") as err:
        load_trained_run(evil)
    assert str(evil / "best.pt") in str(err.value)
    assert not marker.exists()

    # The payload is live: an unsafe load runs it (and then fails on the legacy file's magic number).
    with contextlib.suppress(RuntimeError):
        torch.load(evil / "best.pt", weights_only=False)
    assert marker.read_text() == "code executed"


def _open_for_writing(victim: Path) -> dict:
    return {"_target_": "builtins.open", "file": str(victim), "mode": "w"}


def _popen_touch(victim: Path) -> dict:
    return {"_target_": "subprocess.Popen", "args": ["touch", str(victim)]}


def _by_oc_create(victim: Path) -> str:
    return f"${{oc.create:'{{_target_: builtins.open, file: {victim}, mode: w}}'}}"


FUNCTION_NOT_CLASS = r"_target_=builtins\.open: is a builtin_function_or_method, not a"
INTERPOLATED = r"its config holds an interpolation at model\.arch\.norm"


@pytest.mark.parametrize(
    ("node", "value", "refused"),
    [
        ("arch", _open_for_writing, FUNCTION_NOT_CLASS),  # opening the file for writing emptied it
        ("pipeline", _open_for_writing, FUNCTION_NOT_CLASS),
        ("arch.inner", _open_for_writing, FUNCTION_NOT_CLASS),  # nested targets are instantiated too
        ("arch", _popen_touch, r"_target_=subprocess\.Popen: is a class, not a torch\.nn\.Module class"),
        # Put in by interpolation, where a walk of the stored tree does not see it (a review).
        ("arch.norm", lambda victim: "${evil}", INTERPOLATED),
        ("arch.norm", _by_oc_create, INTERPOLATED),
    ],
)
def test_a_checkpoints_config_cannot_call_anything_but_model_classes(
    run_and_images, tmp_path, node, value, refused
):
    # weights_only=True keeps a checkpoint's pickle from running code; its config was still
    # instantiated as it stood, so any importable callable ran with the file's arguments.
    run_dir, _, _ = run_and_images
    crafted = tmp_path / "crafted_run"
    shutil.copytree(run_dir, crafted)
    (crafted / "run_config.json").unlink(missing_ok=True)  # nothing to compare the config with
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    state = torch.load(crafted / "best.pt", weights_only=True)
    state["config"]["evil"] = _open_for_writing(victim)
    section, _, inner = node.partition(".")
    if inner:
        state["config"]["model"][section][inner] = value(victim)
    else:
        state["config"]["model"][section] = value(victim)
    torch.save(state, crafted / "best.pt")
    with pytest.raises(SkinclfError, match=refused):
        load_trained_run(crafted)
    assert victim.read_text() == "precious"


@pytest.mark.parametrize("config", ["model: x", ["model"], {"trainer": {}}, {"model": "baseline"}])
def test_a_checkpoint_whose_config_is_no_training_config_is_refused(run_and_images, tmp_path, config):
    run_dir, _, _ = run_and_images
    bad = tmp_path / "bad_run"
    shutil.copytree(run_dir, bad)
    state = torch.load(bad / "best.pt", weights_only=True)
    torch.save({**state, "config": config}, bad / "best.pt")
    with pytest.raises(SkinclfError, match="its 'config' entry is no training config with a model"):
        load_trained_run(bad)


@pytest.mark.parametrize("where", ["a folder", "under a file"])
def test_an_unwritable_out_is_refused_before_any_image_is_scored(where, tmp_path, monkeypatch, capsys):
    image, notes = image_and_kept_file(tmp_path)
    out, named = {"a folder": (tmp_path, tmp_path), "under a file": (notes / "pred.csv", notes)}[where]
    monkeypatch.setattr("skinclf.predict.load_trained_run", fail_if_called("loading the model"))
    with pytest.raises(SystemExit) as exit_info:
        _predict(tmp_path / "run", image, "--out", out)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{named}: is a f" in err
    assert notes.read_text() == "keep me"


@pytest.mark.parametrize(
    "content",
    [
        lambda good: b"hello\n",  # `echo hello > best.pt`: torch's legacy reader fails with KeyError
        lambda good: b"",
        lambda good: good[: len(good) // 2],  # a copy cut short
    ],
    ids=["text", "empty", "truncated"],
)
def test_a_best_pt_that_is_not_a_checkpoint_is_one_error(content, run_and_images, tmp_path, capsys):
    run_dir, folder, _ = run_and_images
    broken = tmp_path / "broken_run"
    broken.mkdir()
    (broken / "test_metrics.json").write_text((run_dir / "test_metrics.json").read_text())
    (broken / "best.pt").write_bytes(content((run_dir / "best.pt").read_bytes()))
    with pytest.raises(SystemExit) as exit_info:
        _predict(broken, folder / "test_000.png")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"error: {broken / 'best.pt'}: not a readable skinclf checkpoint (" in err


@pytest.mark.parametrize(
    ("point", "message"),
    [
        ({"threshold": "high"}, "operating_point.threshold='high'; expected a number in [0, 1]"),
        # Was scored at 0.5 as "no operating point stored in the run", though the run stored one.
        ([1], "operating_point=[1]; expected an object with a threshold, as skinclf train writes it"),
        ({"target_sensitivity": 0.95}, "operating_point={'target_sensitivity': 0.95}; expected an object"),
    ],
)
def test_a_damaged_operating_point_is_one_error(run_and_images, tmp_path, capsys, point, message):
    run_dir, folder, _ = run_and_images
    edited = tmp_path / "edited_run"
    shutil.copytree(run_dir, edited)
    metrics = json.loads((edited / "test_metrics.json").read_text())
    metrics["operating_point"] = point
    (edited / "test_metrics.json").write_text(json.dumps(metrics))
    with pytest.raises(SystemExit) as exit_info:
        _predict(edited, folder / "test_000.png")
    assert exit_info.value.code == 2
    [err] = capsys.readouterr().err.strip().splitlines()
    assert f"{edited / 'test_metrics.json'}: {message}" in err


@pytest.mark.parametrize("record", ["{", "", "[]"])
def test_an_unreadable_run_config_is_one_error_not_a_skipped_check(run_and_images, tmp_path, capsys, record):
    # A damaged run_config.json read as "no record": another run's best.pt copied in was scored.
    run_dir, folder, _ = run_and_images
    damaged = tmp_path / "damaged_run"
    shutil.copytree(run_dir, damaged)
    (damaged / "run_config.json").write_text(record)
    with pytest.raises(SystemExit) as exit_info:
        _predict(damaged, folder / "test_000.png")
    assert exit_info.value.code == 2
    [err] = capsys.readouterr().err.strip().splitlines()
    assert f"{damaged / 'run_config.json'}: unreadable (" in err
    assert "so the run's checkpoint cannot be checked against it" in err


def test_a_run_from_an_older_skinclf_still_predicts(run_and_images, tmp_path):
    # Its best.pt lacks the settings added since (the loop's checkpoint_every, eval_batch_size,
    # channels_last, progress, the recipe, the recorded precision): scoring takes their defaults.
    run_dir, folder, _ = run_and_images
    old = tmp_path / "old_run"
    shutil.copytree(run_dir, old)
    state = torch.load(old / "best.pt", weights_only=True)
    for key in ("checkpoint_every", "eval_batch_size", "channels_last", "progress"):
        del state["config"]["trainer"][key]
    del state["config"]["recipe"], state["precision"]
    torch.save(state, old / "best.pt")
    images = sorted(folder.glob("test_*.png"))
    _predict(run_dir, *images, "--out", tmp_path / "new.csv")
    _predict(old, *images, "--out", tmp_path / "old.csv")
    new, older = pd.read_csv(tmp_path / "new.csv"), pd.read_csv(tmp_path / "old.csv")
    assert older["prob_mel"].tolist() == pytest.approx(new["prob_mel"].tolist(), abs=1e-6)
    assert (older["prediction"] == new["prediction"]).all()


def test_a_precision_this_machine_only_emulates_is_noted(run_and_images, tmp_path, capsys, monkeypatch):
    # A bf16 run scored on a CPU without AVX-512 BF16 or AMX (or a T4): its probabilities are
    # reproduced, but emulated bf16 is far slower than fp32, which nothing said.
    run_dir, folder, _ = run_and_images
    bf16_run = tmp_path / "bf16_run"
    shutil.copytree(run_dir, bf16_run)
    state = torch.load(bf16_run / "best.pt", weights_only=True)
    torch.save({**state, "precision": "bf16"}, bf16_run / "best.pt")
    image = folder / "test_000.png"
    for native in (True, False):
        monkeypatch.setattr("skinclf.training.hardware.cpu_has_native_bf16", lambda native=native: native)
        _predict(bf16_run, image, "--out", tmp_path / f"native_{native}.csv", "--device", "cpu")
        noted = "note: the run was evaluated in bf16, which cpu here only emulates" in capsys.readouterr().err
        assert noted is not native
    _predict(run_dir, image, "--out", tmp_path / "fp32.csv", "--device", "cpu")  # fp32 runs natively anywhere
    assert "only emulates" not in capsys.readouterr().err


def test_a_run_with_test_time_augmentation_predicts_with_it(tmp_path):
    # recipe.tta=true: the run's test probabilities are the mean over flips; scoring new images
    # without the flips gave other probabilities (and calls) than the run reported.
    overrides = [
        "data.train_size=8",
        "data.val_size=4",
        "data.test_size=4",
        "trainer.max_epochs=1",
        "model=resnet",
        "recipe.tta=true",
        "trainer.precision=fp32",
    ]
    run_dir, _ = train_in_process(tmp_path, *overrides)
    test = load_splits(compose_config([f"data.cache_dir={tmp_path / 'data'}", *overrides]).data).test
    images = []
    for i, image in enumerate(test.images):
        images.append(tmp_path / f"test_{i}.png")
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(images[-1])
    out = tmp_path / "pred.csv"
    _predict(run_dir, *images, "--out", out)
    probs = pd.read_csv(out)["prob_mel"].to_numpy()
    recorded = pd.read_csv(run_dir / "predictions.csv").query("split == 'test'").sort_values("index")
    assert probs == pytest.approx(recorded["prob_mel"].to_numpy(), abs=1e-6)
    # Proof that the flips count here: the model alone gives other probabilities.
    run = load_trained_run(run_dir)
    run.settings = replace(run.settings, recipe=replace(run.settings.recipe, tta=False))
    plain = run.predict_probs(test.images).numpy()
    assert abs(probs - plain).max() > 1e-4


@pytest.mark.parametrize("change", ["a missing weight", "a renamed weight"])
def test_a_best_pt_whose_weights_do_not_fit_the_model_is_refused(run_and_images, tmp_path, capsys, change):
    # A state dict short of a weight (or with one under another name) left that weight at its
    # random initialisation, and the run's name and threshold went on scoring with it.
    run_dir, folder, _ = run_and_images
    bad = tmp_path / "bad_run"
    shutil.copytree(run_dir, bad)
    state = torch.load(bad / "best.pt", weights_only=True)
    weight = state["model"].pop("9.bias")
    if change == "a renamed weight":
        state["model"]["9.offset"] = weight
    torch.save(state, bad / "best.pt")
    out = tmp_path / "new" / "pred.csv"
    with pytest.raises(SystemExit) as exit_info:
        _predict(bad, folder / "test_000.png", "--out", out)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"error: {bad / 'best.pt'}: does not match model=augmented (Error(s) in loading state_dict" in err
    assert 'Missing key(s) in state_dict: "9.bias"' in err
    assert not (tmp_path / "new").exists()


def test_a_best_pt_copied_in_from_another_run_is_refused(run_and_images, tmp_path, capsys):
    # Another seed's (or model's) best.pt in this folder would be scored with this run's
    # threshold and named after this run, without a word.
    run_dir, folder, _ = run_and_images
    mixed = tmp_path / "mixed_run"
    shutil.copytree(run_dir, mixed)
    state = torch.load(mixed / "best.pt", weights_only=True)
    # The run's record, as `skinclf train` writes it (this in-process run has none).
    (mixed / "run_config.json").write_text(json.dumps(state["config"]))
    _predict(mixed, folder / "test_000.png")  # its own checkpoint: scored
    state["config"]["seed"] += 1
    state["config"]["optim"]["lr"] *= 10
    state["config"]["device"] = "cuda"  # a setting a resume may change: no difference
    torch.save(state, mixed / "best.pt")
    with pytest.raises(SystemExit) as exit_info:
        _predict(mixed, folder / "test_000.png")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith(
        f"{mixed / 'best.pt'}: is not this run's checkpoint: its config differs from the folder's "
        "run_config.json in optim.lr, seed; expected the best.pt the run wrote"
    )
    # The same config on other data (another data.root, which is not compared): another accuracy.
    state["config"] = json.loads((mixed / "run_config.json").read_text())
    state["val_acc"] = 0.123
    torch.save(state, mixed / "best.pt")
    with pytest.raises(SystemExit):
        _predict(mixed, folder / "test_000.png")
    err = capsys.readouterr().err.strip()
    assert f"{mixed / 'best.pt'}: is not this run's checkpoint: its epoch " in err
    assert " and validation accuracy 0.123 are not the best_epoch " in err
    # The run's own last.pt (a later epoch, no validation accuracy) copied over its best.pt: it
    # was let through, and scored the last epoch's model with the best epoch's threshold.
    last = {key: value for key, value in state.items() if key != "val_acc"}
    recorded = json.loads((mixed / "test_metrics.json").read_text())
    for epoch in (recorded["best_epoch"] + 1, recorded["best_epoch"]):
        torch.save({**last, "epoch": epoch}, mixed / "best.pt")
        with pytest.raises(SystemExit):
            _predict(mixed, folder / "test_000.png")
        err = capsys.readouterr().err.strip()
        assert err.endswith(
            f"{mixed / 'best.pt'}: is not this run's checkpoint: its epoch {epoch} and no validation "
            f"accuracy (a last.pt?) are not the best_epoch {recorded['best_epoch']} and best_val_acc "
            f"{recorded['best_val_acc']} of test_metrics.json; expected the best.pt the run wrote"
        )


def test_without_out_the_table_goes_to_standard_output_alone(run_and_images, capsys):
    # `skinclf predict RUN img > table.csv` must give a clean CSV: the reminder and the summary
    # go to standard error.
    run_dir, folder, _ = run_and_images
    _predict(run_dir, folder / "test_000.png", folder / "test_001.png")
    out, err = capsys.readouterr()
    table = pd.read_csv(io.StringIO(out), keep_default_na=False)
    assert list(table.columns) == ["path", "prob_mel", "prediction", "threshold", "error"]
    assert [Path(p).name for p in table["path"]] == ["test_000.png", "test_001.png"]
    assert "not a diagnosis" in err and "not a diagnosis" not in out


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are POSIX")
def test_a_path_that_exists_but_is_no_file_or_folder_says_so(run_and_images, tmp_path, capsys):
    run_dir, _, _ = run_and_images
    pipe, missing = tmp_path / "camera.png", tmp_path / "gone.png"
    os.mkfifo(pipe)  # reading it would wait for a writer forever
    for path, what in ((pipe, "not a regular file or folder"), (missing, "no such file or folder")):
        with pytest.raises(SystemExit) as exit_info:
            _predict(run_dir, path)
        assert exit_info.value.code == 2
        assert (
            capsys.readouterr()
            .err.strip()
            .endswith(f"error: {path}: {what}; expected an image or a folder of images")
        )


@pytest.mark.parametrize("device", ["gpu", "cuda"])
def test_a_bad_device_is_named_as_the_option_was_typed(device, run_and_images, capsys):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("needs a machine without a GPU")
    run_dir, folder, _ = run_and_images
    with pytest.raises(SystemExit) as exit_info:
        _predict(run_dir, folder / "test_000.png", "--device", device)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"skinclf predict: error: --device {device}: ")  # not train's device=...
    assert "device=" not in err


@pytest.mark.skipif(sys.platform != "linux", reason="file names of any bytes are Linux's")
def test_file_names_that_are_no_utf8_are_written_as_their_bytes(run_and_images, tmp_path):
    # Linux allows any bytes in a name; Python keeps those that are no UTF-8 as "\udcff".
    run_dir, folder, _ = run_and_images
    images = tmp_path / "images"
    images.mkdir()
    good, bad = images / os.fsdecode(b"\xff\xfe.png"), images / os.fsdecode(b"bad\xff.png")
    shutil.copy(folder / "test_000.png", good)
    shutil.copy(folder / "corrupt.png", bad)
    out = tmp_path / "pred.csv"
    _predict(run_dir, images, "--out", out)
    # Read back, each name finds its file again; the error names the unreadable one as it is.
    with python_strings():  # pandas' pyarrow strings, where installed, refuse such names
        table = pd.read_csv(out, keep_default_na=False, encoding_errors="surrogateescape").set_index("path")
    assert sorted(table.index) == sorted([str(good), str(bad)])
    assert table.loc[str(good), "error"] == "" and table.loc[str(good), "prediction"] in ("MEL", "NV")
    assert table.loc[str(bad), "error"].startswith(f"{bad}: corrupt or truncated")


@pytest.mark.skipif(sys.platform != "linux", reason="file names of any bytes are Linux's")
def test_a_name_that_is_no_utf8_prints_as_its_bytes_on_a_strict_stdout(run_and_images, tmp_path):
    # A locale such as en_US.UTF-8 gives Python a strict stdout (forced here): printing such a
    # name failed with UnicodeEncodeError; the CSV on stdout now carries the name's bytes.
    run_dir, folder, _ = run_and_images
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(folder / "test_000.png", images / os.fsdecode(b"\xff\xfe.png"))
    done = subprocess.run(
        [sys.executable, "-m", "skinclf", "predict", str(run_dir), str(images)],
        capture_output=True,
        env={**os.environ, "PYTHONIOENCODING": "utf-8:strict"},
        timeout=300,
    )
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    assert os.fsencode(images) + b"/\xff\xfe.png," in done.stdout
    # So do the names in messages on stderr (a stop line's command to paste among them).
    missing = tmp_path / os.fsdecode(b"run_\xff")
    refused = subprocess.run(
        [sys.executable, "-m", "skinclf", "predict", str(missing), str(images)],
        capture_output=True,
        env={**os.environ, "PYTHONIOENCODING": "utf-8:backslashreplace"},
        timeout=300,
    )
    assert refused.returncode == 2 and os.fsencode(missing) + b": no such folder" in refused.stderr
