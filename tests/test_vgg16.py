"""vgg16 (paper C.7): frozen ImageNet features loaded through torchvision, cached once, and an MLP head."""

from __future__ import annotations

import errno
import json
import logging
import os
import subprocess
import sys
import urllib.error
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch import nn
from torchinfo import summary
from torchvision.models import vgg16

from skinclf.config import compose_config
from skinclf.data import ImageSplits, Split, features, load_splits
from skinclf.data.features import FeatureSplit, extractor_key, training_stage
from skinclf.data.pipeline import AugmentedPipeline, ImageNetPipeline
from skinclf.data.splits import content_hash
from skinclf.errors import SkinclfError
from skinclf.models import build_model
from skinclf.models.vgg16 import WEIGHTS, VGG16Transfer, weights_file
from skinclf.training.checkpoint import load_checkpoint
from skinclf.training.loop import LoopSettings

from conftest import TINY, run_dir_from_output, train_cli

RANDOM = ["model=vgg16", "model.pretrained=false"]
SETTINGS = LoopSettings(precision="fp32", progress="never", eval_batch_size=256)
CPU = torch.device("cpu")
# The fewest images a run accepts: for tests that end before training.
TWO_EACH = ["data.train_size=2", "data.val_size=2", "data.test_size=2"]


@pytest.fixture(scope="module")
def random_vgg() -> nn.Module:
    """The vgg16 model as the config builds it, with random features (no weight file needed)."""
    torch.manual_seed(0)
    return build_model(compose_config(RANDOM).model)


@pytest.fixture
def offline_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty torch hub cache, and a network that refuses every download."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)  # in case anything called torch.hub.set_dir

    def no_network(url: str, *args: object, **kwargs: object) -> None:
        raise urllib.error.URLError(f"offline test: no download of {url}")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    return tmp_path / "torch" / "hub" / "checkpoints"


def tiny_splits(n: int = 4, size: int = 32, seed: int = 0) -> ImageSplits:
    """Random uint8 images: small, so the real VGG-16 features run in well under a second."""
    g = torch.Generator().manual_seed(seed)

    def split(k: int) -> Split:
        images = torch.randint(0, 256, (k, 3, size, size), dtype=torch.uint8, generator=g)
        return Split(images, (torch.arange(k) % 2).float())

    return ImageSplits(name="tiny", train=split(n), val=split(n // 2), test=split(n // 2))


@pytest.fixture
def extractor_calls(random_vgg: nn.Module) -> Iterator[list[int]]:
    """A list that grows by one element per forward call of the model's frozen features."""
    calls: list[int] = []
    handle = random_vgg.features.register_forward_hook(lambda *_: calls.append(1))
    yield calls
    handle.remove()


def test_parameters_and_mult_adds_match_appendix_c7(random_vgg):
    assert sum(p.numel() for p in random_vgg.parameters()) == 119_642_689
    trainable = [n for n, p in random_vgg.named_parameters() if p.requires_grad]
    assert sum(random_vgg.get_parameter(n).numel() for n in trainable) == 104_928_001
    assert all(n.startswith("classifier.") for n in trainable)
    # torchinfo's mult-adds grow linearly with the batch: batch 1 x 64 is the appendix's (64, 3, 128, 128)
    # figure, without a 330 G mult-add forward pass on the CPU.
    stats = summary(random_vgg, input_size=(1, 3, 128, 128), verbose=0, device="cpu")
    assert round(stats.total_mult_adds * 64 / 1e9, 2) == 327.71
    # Grad-CAM takes the last convolution of the model: it must be the features' last one.
    last_conv = [name for name, m in random_vgg.named_modules() if isinstance(m, nn.Conv2d)][-1]
    assert last_conv == "features.28"


def test_weights_come_from_the_torch_hub_cache(offline_hub, caplog):
    # A VGG-16 state dict under torchvision's own file name. Only the features matter here; the
    # ImageNet classifier (which skinclf drops) is stored as one broadcast value to keep the file small.
    reference = vgg16(weights=None).state_dict()
    stored = {
        k: v if k.startswith("features.") else torch.zeros(1).expand(v.shape) for k, v in reference.items()
    }
    offline_hub.mkdir(parents=True)
    torch.save(stored, offline_hub / Path(WEIGHTS.url).name)
    assert weights_file() == offline_hub / "vgg16-397923af.pth"

    with caplog.at_level(logging.INFO, logger="skinclf"):
        model = build_model(compose_config(["model=vgg16"]).model)
    for name, tensor in model.features.state_dict().items():
        assert torch.equal(tensor, reference[f"features.{name}"]), name
    assert not any(p.requires_grad for p in model.features.parameters())
    assert "IMAGENET1K_V1" in caplog.text and "NOT the paper" not in caplog.text


@pytest.mark.parametrize(
    "content", [b"", b"<html><body>Access denied</body></html>", b"PK\x03\x04 truncated zip"]
)
def test_unloadable_weight_file_says_delete_it_and_get_it_again(offline_hub, content):
    # A 0-byte file (EOFError), an HTML page under the weight's name (UnpicklingError), a cut-off archive.
    offline_hub.mkdir(parents=True)
    weights_file().write_bytes(content)
    with pytest.raises(SkinclfError) as err:
        build_model(compose_config(["model=vgg16"]).model)
    message = str(err.value)
    assert message.startswith(f"{weights_file()}: cannot load the VGG-16 IMAGENET1K_V1 weights (")
    assert "delete the file and get it again" in message and "\n" not in message


def test_missing_weights_offline_is_one_clear_error(offline_hub):
    with pytest.raises(SkinclfError) as err:
        VGG16Transfer(pretrained=True)
    message = str(err.value)
    assert str(offline_hub / "vgg16-397923af.pth") in message  # the file, in the folder it must be in
    assert WEIGHTS.url in message and "weights='IMAGENET1K_V1'" in message  # how to get it
    # The offline alternative, and how to take it where experiment=paper refuses the key.
    assert "model.pretrained=false (random features, not the paper's setup; where" in message
    assert "experiment=paper" in message
    assert "launch this one on its own" in message
    assert "\n" not in message


def test_cli_without_network_or_weight_file_exits_with_the_message(tmp_path):
    # A proxy on a closed port makes torchvision's download fail at once, as on an offline machine.
    proxy = "http://127.0.0.1:9"
    env = {"TORCH_HOME": str(tmp_path / "torch"), "HTTPS_PROXY": proxy, "https_proxy": proxy}
    env.update(NO_PROXY="", no_proxy="", HYDRA_FULL_ERROR="0")
    proc = subprocess.run(
        [sys.executable, "-m", "skinclf", "train", "model=vgg16", *TWO_EACH, f"data.cache_dir={tmp_path}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, proc.stderr
    assert str(tmp_path / "torch" / "hub" / "checkpoints" / "vgg16-397923af.pth") in errors[0]
    assert not list((tmp_path / "outputs").glob("runs/*")), "a failed run left its folder behind"


def test_features_run_once_per_split_and_a_changed_dataset_is_recomputed(
    random_vgg, extractor_calls, tmp_path, caplog
):
    pipeline, splits, calls = ImageNetPipeline(), tiny_splits(), extractor_calls

    with caplog.at_level(logging.INFO, logger="skinclf"):
        first = training_stage(random_vgg, pipeline, splits, tmp_path, SETTINGS, CPU)
    assert len(calls) == 3  # one batch per split
    assert caplog.text.count("cache miss") == 3
    assert isinstance(first.splits.train, FeatureSplit)
    assert first.splits.train.images.shape == (4, 512, 1, 1)  # the map before pooling (32x32 input)
    # The head on cached features computes what the whole model computes on images.
    with torch.no_grad():
        expected = random_vgg.eval()(pipeline.eval_batch(splits.val.images))
        got = first.module.eval()(first.pipeline.eval_batch(first.splits.val.images))
    torch.testing.assert_close(got, expected, atol=1e-3, rtol=1e-2)
    calls.clear()
    assert set(n for n, p in first.module.named_parameters() if p.requires_grad) == {
        n for n, _ in first.module.named_parameters()
    }

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="skinclf"):
        second = training_stage(random_vgg, pipeline, splits, tmp_path, SETTINGS, CPU)
    assert not calls, "a second run on the same data ran the extractor again"
    assert caplog.text.count("cache hit") == 3 and "cache miss" not in caplog.text
    assert torch.equal(second.splits.train.images, first.splits.train.images)

    changed = splits.train.images.clone()
    changed[0, 0, 0, 0] ^= 1  # one pixel of one training image
    splits.train = Split(changed, splits.train.labels)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="skinclf"):
        training_stage(random_vgg, pipeline, splits, tmp_path, SETTINGS, CPU)
    assert len(calls) == 1  # the training split only
    assert "train features: cache miss" in caplog.text and caplog.text.count("cache hit") == 2

    # Other weights (another random initialisation) never reuse these features either.
    weight = random_vgg.features[0].weight
    saved = weight.detach().clone()
    with torch.no_grad():
        weight.add_(1.0)
    try:
        training_stage(random_vgg, pipeline, splits, tmp_path, SETTINGS, CPU)
    finally:
        with torch.no_grad():
            weight.copy_(saved)
    assert len(calls) == 4


def test_a_feature_cache_that_cannot_be_written_is_a_warning(random_vgg, tmp_path, monkeypatch, caplog):
    # It stopped the run after the features were computed: only their reuse was lost.
    from skinclf import io

    def full(obj, path):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(io, "atomic_torch_save", full)  # the cache save goes through skinclf.io
    with caplog.at_level(logging.WARNING, logger="skinclf"):
        stage = training_stage(random_vgg, ImageNetPipeline(), tiny_splits(), tmp_path, SETTINGS, CPU)
    assert stage.splits.train.images.shape == (4, 512, 1, 1)
    assert caplog.text.count("; the next run extracts them again") == 3  # train, val, test


def test_augmenting_pipeline_trains_the_whole_model_on_images(random_vgg, tmp_path, caplog):
    # Features computed once cannot be augmented: no cache then, the frozen features run every batch.
    pipeline, splits = AugmentedPipeline(), tiny_splits()
    with caplog.at_level(logging.INFO, logger="skinclf"):
        stage = training_stage(random_vgg, pipeline, splits, tmp_path, SETTINGS, CPU)
    assert stage.module is random_vgg and stage.pipeline is pipeline and stage.splits is splits
    assert "feature cache off: the pipeline AugmentedPipeline augments" in caplog.text
    assert not (tmp_path / "features").exists()


def test_other_models_train_whole_on_images(tmp_path):
    model, pipeline, splits = build_model(compose_config([]).model), ImageNetPipeline(), tiny_splits()
    stage = training_stage(model, pipeline, splits, tmp_path, SETTINGS, CPU)
    assert stage.module is model and stage.pipeline is pipeline and stage.splits is splits
    assert not (tmp_path / "features").exists()


@pytest.mark.slow
def test_one_epoch_cli_run_writes_the_usual_run_files_and_reuses_the_cache(tmp_path):
    data = f"data.cache_dir={tmp_path / 'data'}"
    baseline = run_dir_from_output(train_cli(*TINY, data, cwd=tmp_path).stdout)
    run = run_dir_from_output(train_cli(*RANDOM, *TINY, data, cwd=tmp_path).stdout)
    files = {p.relative_to(run) for p in run.rglob("*") if p.is_file()}
    assert files == {p.relative_to(baseline) for p in baseline.rglob("*") if p.is_file()}
    log_text = (run / "train.log").read_text()
    assert log_text.count("cache miss") == 3 and "NOT the paper's setup" in log_text
    metrics = json.loads((run / "test_metrics.json").read_text())
    assert metrics["n_test"] == 32 and 0 <= metrics["accuracy"] <= 1

    # best.pt holds the whole image -> logit model: it loads into build_model as it is, and
    # reproduces the validation probabilities the run computed from cached features.
    best = load_checkpoint(run / "best.pt")
    cfg = compose_config([*RANDOM, *TINY, data])
    model = build_model(cfg.model)
    model.load_state_dict(best["model"])
    pipeline = ImageNetPipeline()
    pipeline.load_state_dict(best["pipeline"])
    val = load_splits(cfg.data).val
    with torch.no_grad():
        probs = torch.sigmoid(model.eval()(pipeline.eval_batch(val.images))).flatten()
    recorded = pd.read_csv(run / "predictions.csv").query("split == 'val'")["prob_mel"].to_numpy()
    torch.testing.assert_close(probs, torch.tensor(recorded, dtype=torch.float32), atol=0.02, rtol=0)
    for checkpoint in ("best.pt", "last.pt"):  # ~1.7 GB together: do not keep them in pytest's tmp
        (run / checkpoint).unlink()

    second = run_dir_from_output(train_cli(*RANDOM, *TINY, data, cwd=tmp_path).stdout)
    log_text = (second / "train.log").read_text()
    assert log_text.count("cache hit") == 3 and "cache miss" not in log_text
    for checkpoint in ("best.pt", "last.pt"):
        (second / checkpoint).unlink()


def test_full_preset_feeds_224_crops_and_keys_its_own_cache(random_vgg):
    full = VGG16Transfer(pretrained=False, input_preset="full")
    full.load_state_dict(random_vgg.state_dict())
    extractor, _ = full.frozen_split()
    # bf16 input under autocast, as the loop feeds it: the resize must cope with it too.
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        maps = extractor(torch.rand(2, 3, 128, 128, dtype=torch.bfloat16))
    assert maps.shape == (2, 512, 7, 7)  # 224 / 32
    pipeline = ImageNetPipeline()
    # Same weights, other input preset: other features, so never the same cache file.
    assert extractor_key(extractor, pipeline, "fp32", CPU) != extractor_key(
        random_vgg.frozen_split()[0], pipeline, "fp32", CPU
    )
    with pytest.raises(SkinclfError, match="model.input_preset='224'"):
        VGG16Transfer(pretrained=False, input_preset="224")


def test_feature_cache_key_names_the_memory_layout(random_vgg):
    # Channels-last and NCHW convolutions round differently (hundreds of fp16 features differ on
    # CPU): a trainer.channels_last=false run must not read a channels-last run's features.
    extractor, pipeline = random_vgg.frozen_split()[0], ImageNetPipeline()
    channels_last = extractor_key(extractor, pipeline, "fp32", CPU, channels_last=True)
    assert extractor_key(extractor, pipeline, "fp32", CPU, channels_last=False) != channels_last


def test_feature_cache_key_names_the_device_and_cuda_tf32(random_vgg, monkeypatch):
    # CPU and CUDA kernels give features up to ~1e-3 apart: a CPU run must never read a GPU run's
    # file. The key is computed from torch's flags and the GPU's name, so no GPU is needed here:
    # a machine with two H100s and an A100 is faked (on a real GPU machine too, which may have one).
    gpus = {0: "NVIDIA H100 80GB HBM3", 1: "NVIDIA H100 80GB HBM3", 2: "NVIDIA A100-SXM4-40GB"}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: gpus[device.index or 0])
    extractor, pipeline = random_vgg.frozen_split()[0], ImageNetPipeline()
    cpu = extractor_key(extractor, pipeline, "fp32", CPU)
    cuda = extractor_key(extractor, pipeline, "fp32", torch.device("cuda"))
    assert cpu != cuda
    assert extractor_key(extractor, pipeline, "fp32", torch.device("cuda", 1)) == cuda  # same kernels
    assert extractor_key(extractor, pipeline, "fp32", torch.device("cuda", 2)) != cuda  # another GPU
    tf32 = torch.backends.cuda.matmul.allow_tf32  # a torch flag, not a plain attribute: no monkeypatch
    try:
        torch.backends.cuda.matmul.allow_tf32 = not tf32
        assert extractor_key(extractor, pipeline, "fp32", torch.device("cuda")) != cuda
        assert extractor_key(extractor, pipeline, "fp32", CPU) == cpu  # TF32 is no CPU setting
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32


def test_feature_cache_key_names_the_machines_processor_and_torch_version(random_vgg, monkeypatch):
    # Another CPU (AVX2 vs AVX-512 kernels) or torch version rounds differently: a data.cache_dir
    # shared between machines must not serve one machine's features as the other's.
    extractor, pipeline = random_vgg.frozen_split()[0], ImageNetPipeline()
    here = extractor_key(extractor, pipeline, "fp32", CPU)
    monkeypatch.setattr(features, "cpu_model", lambda: "Another CPU")
    elsewhere = extractor_key(extractor, pipeline, "fp32", CPU)
    monkeypatch.setattr(torch, "__version__", "0.0.1")
    assert len({here, elsewhere, extractor_key(extractor, pipeline, "fp32", CPU)}) == 3


def test_a_sweep_with_a_key_only_vgg16_has_runs_vgg16_and_refuses_it_for_the_others(tmp_path):
    # Hydra composes the default model (baseline, no model.pretrained) before the jobs: without
    # skinclf passing the key on as ++model.pretrained, it refused the whole launch.
    small = ["data.train_size=16", "data.val_size=8", "data.test_size=8", "trainer.max_epochs=1"]
    proc = train_cli(
        "-m", "model=vgg16,baseline", "model.pretrained=false", *small, cwd=tmp_path, check=False
    )
    assert proc.returncode == 1  # one job failed
    sweep = next((tmp_path / "outputs" / "multiruns").iterdir())
    vgg = sweep / "0_vgg16"
    assert json.loads((vgg / "job_status.json").read_text())["status"] == "done"
    status = json.loads((sweep / ".refused_1_baseline.json").read_text())  # refused before it ran
    assert status["status"] == "failed" and status["error"].startswith(
        "model.pretrained: not a key of this run's configs (model=baseline, data=synthetic, "
        "recipe=paper; given as model.pretrained=False)"
    )
    # A resume compares the images the features came from, not the features: those differ with
    # the machine (and a deleted feature cache is recomputed on whatever machine resumes).
    splits = load_splits(compose_config([*small, f"data.cache_dir={tmp_path / 'data'}"]).data)
    recorded = load_checkpoint(vgg / "last.pt", mmap=True)["data_sha256"]
    assert recorded == content_hash(splits.train, splits.val)
    for checkpoint in ("best.pt", "last.pt"):  # 1.3 GB: do not keep it in pytest's tmp
        (vgg / checkpoint).unlink()
