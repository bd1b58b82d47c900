"""The shared training loop on real (small) synthetic data: it learns, stops early at the right
epoch, tests the best checkpoint, and is reproducible."""

import json
import logging
import time
import types
import zipfile

import numpy as np
import pandas as pd
import pytest
import torch

from skinclf import train
from skinclf.config import compose_config
from skinclf.data import ImageSplits, load_splits
from skinclf.data.pipeline import DefaultPipeline
from skinclf.data.splits import Split, content_hash
from skinclf.errors import SkinclfError
from skinclf.models import build_model
from skinclf.training import environment as environment_module
from skinclf.training import hardware, loop
from skinclf.training.checkpoint import load_checkpoint
from skinclf.training.hardware import describe_machine, resolve_device
from skinclf.training.loop import METRICS_COLUMNS, EarlyStopping, LoopSettings, evaluate, fit, place_splits

from conftest import train_in_process

SMALL = ["data.train_size=64", "data.val_size=32", "data.test_size=32"]
# lr 1e-3 instead of the paper's 1e-4, so that a few epochs on 512 images suffice to learn.
LEARNABLE = [
    "data.train_size=512",
    "data.val_size=128",
    "data.test_size=64",
    "trainer.max_epochs=6",
    "optim.lr=1e-3",
]


def test_training_learns_well_above_chance(tmp_path):
    _, metrics = train_in_process(tmp_path, *LEARNABLE)
    assert metrics["best_val_acc"] >= 0.65
    assert metrics["roc_auc"] > 0.75  # 0.82 in fp32, 0.85 in bf16 (chance: 0.5)


def test_early_stopping_stops_after_patience_and_tests_the_best_checkpoint(tmp_path):
    # With lr=0 the weights never change, so validation accuracy never improves after epoch 1:
    # the run must stop after exactly 1 + patience epochs and keep epoch 1 as the best.
    out, metrics = train_in_process(
        tmp_path, *SMALL, "trainer.max_epochs=30", "trainer.patience=3", "optim.lr=0"
    )
    history = pd.read_csv(out / "metrics.csv")
    assert list(history.columns) == METRICS_COLUMNS
    assert history["epoch"].tolist() == [1, 2, 3, 4]
    assert metrics["best_epoch"] == 1 and metrics["epochs_run"] == 4
    assert load_checkpoint(out / "best.pt")["epoch"] == 1
    assert load_checkpoint(out / "last.pt")["epoch"] == 4
    # Epoch 1 wrote one file under both names (a hard link); epoch 2 replaced last.pt's only.
    assert not (out / "best.pt").samefile(out / "last.pt")


def test_the_epoch_clock_leaves_out_the_checkpoint_writes(tmp_path, monkeypatch):
    # metrics.csv's seconds time training and validation: a checkpoint write (vgg16's 1.3 GB on a
    # slow disk) must not show in them, whichever of best.pt and last.pt it is. Each write moves
    # the loop's clock on by 1000 s (a real sleep made the test fail on a busy machine, where the
    # epoch itself took longer than the sleep).
    real_save, real_clock = loop.save_checkpoint, time.perf_counter
    skipped = []

    def slow_save(state, path):
        skipped.append(1000.0)
        real_save(state, path)

    monkeypatch.setattr(loop, "save_checkpoint", slow_save)
    monkeypatch.setattr(loop, "time", types.SimpleNamespace(perf_counter=lambda: real_clock() + sum(skipped)))
    out, _ = train_in_process(tmp_path, *SMALL, "trainer.max_epochs=2", "recipe=modern", "recipe.ema=true")
    assert len(skipped) >= 2  # both epochs wrote
    assert (pd.read_csv(out / "metrics.csv")["seconds"] < 1000).all()


def test_an_improving_epoch_writes_one_checkpoint_for_best_and_last(tmp_path):
    out, _ = train_in_process(tmp_path, *SMALL, "trainer.max_epochs=1")
    assert (out / "best.pt").samefile(out / "last.pt")
    # It serves both: what predict reads (val_acc) and what a resume reads (history).
    state = load_checkpoint(out / "best.pt")
    assert state["epoch"] == 1 and "val_acc" in state and len(state["history"]) == 1


def test_a_diverging_run_stops_with_one_error_naming_the_epoch(tmp_path):
    # lr 1e30: the first steps blow the weights up, the losses become nan.
    with pytest.raises(
        SkinclfError, match=r"^epoch 1: the (training|validation) loss is nan: training diverged"
    ):
        train_in_process(tmp_path, *SMALL, "trainer.max_epochs=3", "optim.lr=1e30")


def test_best_checkpoint_is_the_one_evaluated_on_test(tmp_path, monkeypatch):
    # Validation accuracy (as fit sees it) peaks at epoch 1 of 3, while the weights go on moving
    # (lr 1e-3): the test predictions must be best.pt's (epoch 1), not the last epoch's weights.
    real_evaluate = loop.evaluate
    val_accs = iter([0.9, 0.5, 0.6])

    def scripted_evaluate(*args, **kwargs):
        loss, _, probs = real_evaluate(*args, **kwargs)
        return loss, next(val_accs), probs

    monkeypatch.setattr(loop, "evaluate", scripted_evaluate)
    monkeypatch.setattr(train, "evaluate", real_evaluate)  # the run's own val and test evaluation
    # On the CPU, where the re-evaluation below runs: a GPU's bf16 kernels round otherwise.
    out, metrics = train_in_process(tmp_path, *SMALL, "trainer.max_epochs=3", "optim.lr=1e-3", "device=cpu")
    monkeypatch.setattr(loop, "evaluate", real_evaluate)
    history = pd.read_csv(out / "metrics.csv")
    best_row = history.loc[history["val_acc"].idxmax()]
    assert metrics["best_epoch"] == best_row["epoch"] == 1 and metrics["epochs_run"] == 3
    assert metrics["best_val_acc"] == pytest.approx(best_row["val_acc"], abs=1e-6)

    # Re-evaluate best.pt and last.pt on the test split: the stored test predictions and metrics
    # must be best.pt's, and last.pt's weights must give other probabilities.
    cfg = compose_config([*SMALL, f"data.cache_dir={tmp_path / 'data'}"])
    test = load_splits(cfg.data).test
    predictions = pd.read_csv(out / "predictions.csv")
    stored = predictions.loc[predictions["split"] == "test", "prob_mel"].to_numpy()
    scores = {}
    for name in ("best.pt", "last.pt"):
        state = load_checkpoint(out / name)
        model = build_model(cfg.model)
        model.load_state_dict(state["model"])
        pipeline = DefaultPipeline()
        pipeline.load_state_dict(state["pipeline"])
        settings = LoopSettings(precision=state["precision"])
        scores[name] = evaluate(model, pipeline, test, settings, torch.device("cpu"))
    assert load_checkpoint(out / "last.pt")["epoch"] == 3
    _, acc, best_probs = scores["best.pt"]
    np.testing.assert_allclose(stored, best_probs, rtol=1e-5, atol=1e-7)
    assert np.abs(scores["last.pt"][2] - best_probs).max() > 1e-3
    assert acc == pytest.approx(metrics["accuracy"])
    # It holds the optimizer of that epoch too (SPEC): Adam's state after best_epoch epochs of one
    # batch each (64 training images), for every parameter, loadable into the model's optimizer.
    best = load_checkpoint(out / "best.pt")
    model = build_model(cfg.model)
    optimizer = torch.optim.Adam(model.parameters())
    optimizer.load_state_dict(best["optimizer"])
    steps = {int(state["step"]) for state in optimizer.state.values()}
    assert steps == {metrics["best_epoch"]} and len(optimizer.state) == len(list(model.parameters()))


def test_same_seed_gives_identical_metrics(tmp_path):
    runs = [
        train_in_process(tmp_path / str(i), *SMALL, "model=res_aug", "trainer.max_epochs=2") for i in range(2)
    ]
    (out_a, metrics_a), (out_b, metrics_b) = runs
    assert metrics_a == metrics_b
    drop_time = ["seconds"]
    pd.testing.assert_frame_equal(
        pd.read_csv(out_a / "metrics.csv").drop(columns=drop_time),
        pd.read_csv(out_b / "metrics.csv").drop(columns=drop_time),
    )
    other_seed = train_in_process(tmp_path / "2", *SMALL, "model=res_aug", "trainer.max_epochs=2", "seed=1")
    assert json.dumps(other_seed[1]) != json.dumps(metrics_a)


def test_the_recorded_machine_counts_its_threads(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert describe_machine(torch.device("cpu")).endswith(", 1 thread")  # was "1 threads"
    monkeypatch.setattr(torch, "get_num_threads", lambda: 8)
    assert describe_machine(torch.device("cpu")).endswith(", 8 threads")


def _package(root, conf_inside: bool):
    """skinclf's files as pip installs them (conf/ inside the package) or as an editable checkout
    has them (conf/ beside src/); returns the folders of skinclf and skinclf.conf."""
    code, conf = root / "skinclf", (root / "skinclf" / "conf" if conf_inside else root / "conf")
    for path, text in [(code / "train.py", "x = 1\n"), (conf / "train.yaml", "seed: 0\n")]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return {"skinclf": code, "skinclf.conf": conf}


def test_the_source_digest_tells_code_apart_however_it_is_installed(tmp_path, monkeypatch, request):
    def digest(folders):
        monkeypatch.setattr(environment_module, "files", folders.get)
        environment_module.source_digest.cache_clear()
        return environment_module.source_digest()

    request.addfinalizer(environment_module.source_digest.cache_clear)  # the real package's digest again
    installed = _package(tmp_path / "site", conf_inside=True)
    editable = _package(tmp_path / "checkout", conf_inside=False)
    first = digest(installed)
    assert len(first) == 12 and digest(editable) == first
    # Imported from a zip (zipimport): the same files, read through importlib.resources.
    with zipfile.ZipFile(tmp_path / "skinclf.zip", "w") as archive:
        for path in sorted((tmp_path / "site").rglob("*.*")):
            archive.write(path, path.relative_to(tmp_path / "site").as_posix())
    zipped = zipfile.Path(tmp_path / "skinclf.zip")
    assert digest({"skinclf": zipped / "skinclf/", "skinclf.conf": zipped / "skinclf/conf/"}) == first
    (installed["skinclf"] / "__pycache__").mkdir()
    (installed["skinclf"] / "__pycache__" / "train.cpython-311.pyc").write_bytes(b"compiled")
    (installed["skinclf"] / ".#train.py").symlink_to("user@host.1234:1")  # an editor's lock: dangling
    (installed["skinclf"] / "loop").symlink_to(".")  # followed, a link up the tree never ends
    assert digest(installed) == first  # compiled, hidden and linked files are no source
    (installed["skinclf.conf"] / "train.yaml").write_text("seed: 1\n")
    assert digest(installed) != first  # a config changed: other code


ARM_CPUINFO = "processor\t: 0\nBogoMIPS\t: 50.00\nCPU implementer\t: 0x41\nCPU part\t: 0xd0c\n"


def test_the_cpu_model_of_an_arm_machine_names_its_implementer_and_part(monkeypatch):
    # ARM's /proc/cpuinfo has no model name: every aarch64 CPU (Graviton2, Graviton3) read as one,
    # in the recorded machine and in the vgg16 feature cache's key.
    monkeypatch.setattr(hardware, "_cpuinfo", lambda: ARM_CPUINFO)
    monkeypatch.setattr(hardware.platform, "processor", lambda: "")
    monkeypatch.setattr(hardware.platform, "machine", lambda: "aarch64")
    assert hardware.cpu_model() == "aarch64 (implementer 0x41, part 0xd0c)"
    monkeypatch.setattr(hardware, "_cpuinfo", lambda: "processor\t: 0\nmodel name\t: AMD EPYC 9B45\n")
    assert hardware.cpu_model() == "AMD EPYC 9B45"


def test_early_stopping_rule():
    stopper = EarlyStopping(patience=2)
    accs = [0.5, 0.6, 0.6, 0.55, 0.7]
    flags = [stopper.update(epoch, acc) for epoch, acc in enumerate(accs, start=1) if not stopper.should_stop]
    # Epoch 2 is the best; epochs 3 and 4 are no better (ties do not count), so epoch 5 never runs.
    assert flags == [True, True, False, False]
    assert (stopper.best_epoch, stopper.best_val_acc, stopper.should_stop) == (2, 0.6, True)


def test_evaluate_probabilities_match_accuracy(tmp_path):
    cfg = compose_config([*SMALL, f"data.cache_dir={tmp_path}"])
    splits = load_splits(cfg.data)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    loss, acc, probs = evaluate(model, DefaultPipeline(), splits.val, LoopSettings(), torch.device("cpu"))
    assert probs.shape == (32,) and np.all((probs >= 0) & (probs <= 1))
    assert acc == pytest.approx(np.mean((probs >= 0.5) == splits.val.labels.numpy().astype(bool)))
    assert loss > 0


def test_validation_accuracy_counts_mel_as_the_test_metrics_do(monkeypatch):
    # float32's sigmoid rounds logits in about (-1.2e-7, 0) to exactly 0.5: MEL for the test
    # metrics and the report (p >= 0.5), so for the validation accuracy too.
    logits = torch.tensor([-1e-8, -1e-3, 2.0, -2.0])
    monkeypatch.setattr(loop, "predict_logits", lambda *args: logits)
    split = type("Split", (), {"images": None, "labels": torch.tensor([1.0, 0.0, 1.0, 0.0])})()
    _, acc, probs = evaluate(None, None, split, LoopSettings(), torch.device("cpu"))
    assert probs[0] == 0.5 and acc == 1.0


def test_training_accuracy_counts_mel_as_the_validation_accuracy_does():
    # A model whose every logit is -1e-8: float32's sigmoid makes that p = 0.5, MEL, as the
    # validation and test metrics count it; "logit >= 0" counted it NV.
    class Constant(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.logit = torch.nn.Parameter(torch.tensor(-1e-8))

        def forward(self, x):
            return self.logit.expand(len(x), 1)

    model = Constant()
    images = torch.zeros(8, 3, 4, 4, dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
    split = Split(images, torch.ones(8))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    settings = LoopSettings(batch_size=4, progress="never")
    _, acc = loop.train_one_epoch(
        model,
        DefaultPipeline(),
        split,
        optimizer,
        scaler,
        torch.Generator(),
        settings,
        torch.device("cpu"),
        "",
    )
    assert acc == 1.0


def test_the_training_loss_is_the_mean_over_images_not_over_batches(tmp_path):
    # 10 images in batches of 4: two full batches and one of 2. With lr=0 the weights never move,
    # so metrics.csv's train_loss must be the mean BCE of the 10 images, counted by hand; a mean
    # of the batch means would weigh the last batch's 2 images like the others' 4.
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 1))
    images = torch.randint(
        0, 256, (10, 3, 4, 4), generator=torch.Generator().manual_seed(1), dtype=torch.uint8
    )
    labels = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0])
    split = Split(images, labels)
    settings = LoopSettings(max_epochs=1, batch_size=4, lr=0.0, progress="never")
    fit(model, DefaultPipeline(), split, split, settings, torch.device("cpu"), tmp_path)
    with torch.no_grad():
        p = torch.sigmoid(model(images.float() / 255).flatten()).double()
    losses = -(labels * p.log() + (1 - labels) * (1 - p).log())
    by_hand = losses.mean().item()
    assert losses.std() > 0.05  # the images' losses differ: how they are weighed matters
    row = pd.read_csv(tmp_path / "metrics.csv").iloc[0]
    assert row["train_loss"] == pytest.approx(by_hand, abs=2e-6)
    assert row["val_loss"] == pytest.approx(by_hand, abs=2e-6)  # the same images, the same weights


def test_the_class_weighted_loss_steps_with_mel_weighted_and_reports_the_plain_loss():
    # One batch of 8 (3 MEL) through a linear model with SGD at lr=1: the step taken must be the
    # gradient of the BCE with MEL weighted by pos_weight=3, computed here by hand; the reported
    # loss is the plain BCE of the weights before the step.
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 1))
    images = torch.randint(
        0, 256, (8, 3, 4, 4), generator=torch.Generator().manual_seed(1), dtype=torch.uint8
    )
    labels = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0])
    x = images.float().flatten(1) / 255
    w, b = (p.detach().clone().requires_grad_() for p in model[1].parameters())

    def bce(weight):
        return torch.nn.functional.binary_cross_entropy_with_logits(
            (x @ w.T + b).flatten(), labels, pos_weight=weight
        )

    bce(torch.tensor(3.0)).backward()
    by_hand = (w - w.grad, b - b.grad)
    plain_loss = bce(None).item()
    settings = LoopSettings(
        batch_size=8, pos_weight=3.0, precision="fp32", channels_last=False, progress="never"
    )
    loss, _ = loop.train_one_epoch(
        model,
        DefaultPipeline(),
        Split(images, labels),
        torch.optim.SGD(model.parameters(), lr=1.0),
        torch.amp.GradScaler("cpu", enabled=False),
        torch.Generator(),
        settings,
        torch.device("cpu"),
        "",
    )
    for stepped, expected in zip(model[1].parameters(), by_hand, strict=True):
        torch.testing.assert_close(stepped.detach(), expected.detach(), rtol=0, atol=1e-6)
    assert loss == pytest.approx(plain_loss, abs=1e-6)
    assert (w.grad.abs().max() > 0.01) and plain_loss != pytest.approx(
        bce(torch.tensor(3.0)).item(), abs=0.01
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("recipe", ["paper", "modern"])
def test_a_cuda_run_augments_on_the_gpu_learns_and_tests_the_best_checkpoint(tmp_path, recipe):
    # On CUDA the splits move to the GPU once and the batches are augmented there; validation
    # (with the modern recipe: raw and EMA weights, flip TTA) compares CPU logits with labels.
    out, metrics = train_in_process(tmp_path, "device=cuda", "model=res_aug", f"recipe={recipe}", *LEARNABLE)
    assert metrics["best_val_acc"] >= 0.65
    assert load_checkpoint(out / "best.pt")["epoch"] == metrics["best_epoch"]


def test_a_cuda_device_past_the_last_gpu_or_misspelt_is_refused_up_front(monkeypatch):
    # One GPU, faked: the check runs without one (torch.device itself needs no GPU).
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    assert resolve_device("cuda") == torch.device("cuda")
    with pytest.raises(SkinclfError, match=r"^device=cuda:1: this machine has 1 GPU\(s\), cuda:0 to cuda:0$"):
        resolve_device("cuda:1")
    with pytest.raises(SkinclfError, match=r"^device=cuda:x: expected cuda or cuda:N$"):
        resolve_device("cuda:x")
    # Not a device at all, spelt as the command takes it (predict and explain: --device).
    with pytest.raises(SkinclfError, match=r"^--device gpu: expected auto, cpu, cuda or cuda:N$"):
        resolve_device("gpu", option="--device ")


@pytest.mark.parametrize(("free_mb", "resident"), [(100, True), (8, False)])
def test_splits_live_on_the_gpu_only_when_they_fit(tmp_path, monkeypatch, caplog, free_mb, resident):
    # train + val here: 72 uint8 images of 3x128x128, 3.4 MB, against a quarter of the GPU's
    # free memory, faked so that the decision runs without a GPU (the move itself is Split.to's).
    cfg = compose_config(["data.train_size=40", "data.val_size=32", f"data.cache_dir={tmp_path}"])
    splits = load_splits(cfg.data)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (free_mb * 2**20, 2**40))
    moved = []
    monkeypatch.setattr(type(splits.train), "to", lambda split, device: moved.append(split) or split)
    with caplog.at_level(logging.INFO, logger="skinclf"):
        place_splits(splits.train, splits.val, torch.device("cuda"))
    assert len(moved) == (2 if resident else 0)
    assert ("moved to cuda once" in caplog.text) == resident
    assert ("stay in CPU memory" in caplog.text) != resident


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_cuda_run_with_the_data_in_cpu_memory_copies_batches_over(tmp_path, monkeypatch, caplog):
    # Data too large for the GPU (faked: 1 MB free) stays in CPU memory.
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (2**20, 2**40))
    with caplog.at_level(logging.INFO, logger="skinclf"):
        _, metrics = train_in_process(
            tmp_path, "device=cuda", "model=res_aug", *SMALL, "trainer.max_epochs=3", "optim.lr=1e-3"
        )
    assert "stay in CPU memory" in caplog.text
    assert metrics["epochs_run"] == 3


def test_runs_record_their_data_digests_and_a_seeded_subset_the_split_it_is_drawn_from():
    # data.balance_train draws its NV subset with the run's seed: recorded, each seed's digest
    # would make the report tell the seeds apart as runs trained on other data. The split it is
    # drawn from is recorded instead, where the loader says it.
    images = torch.randint(
        0, 256, (6, 3, 4, 4), generator=torch.Generator().manual_seed(0), dtype=torch.uint8
    )
    labels = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 1.0])
    splits = ImageSplits("dermamnist", Split(images[:2], labels[:2]), Split(images[2:4], labels[2:4]))
    splits.test = Split(images[4:], labels[4:])
    plain = train.data_digests(compose_config(["data=dermamnist"]), splits)
    assert plain == {
        "eval_data_sha256": content_hash(splits.val, splits.test),
        "train_data_sha256": content_hash(splits.train),
    }
    balanced = compose_config(["data=dermamnist", "data.balance_train=true"])
    assert train.data_digests(balanced, splits) == {"eval_data_sha256": plain["eval_data_sha256"]}
    splits.train_drawn_from = "ab" * 32
    assert train.data_digests(balanced, splits) == {
        "eval_data_sha256": plain["eval_data_sha256"],
        "train_data_sha256": "ab" * 32,
    }
    assert train.data_digests(compose_config(["data=dermamnist"]), splits) == plain  # the split's own
