"""Beyond the paper: resnet18, efficientnet_b0, convnext_tiny and vgg16_ft (torchvision backbones
with one logit, ImageNet weights from the torch hub cache, first stages optionally frozen)."""

from __future__ import annotations

import logging

import pytest
import torch
from test_vgg16 import offline_hub, tiny_splits  # noqa: F401 (a fixture)
from torch import nn
from torchvision import models as tv

from skinclf.config import compose_config
from skinclf.data.dermoscopy import DermoscopyAugmentation
from skinclf.data.features import training_stage
from skinclf.data.pipeline import ImageNetPipeline
from skinclf.errors import SkinclfError
from skinclf.models import build_model
from skinclf.models.pretrained import weights_path
from skinclf.summary import model_names
from skinclf.training.loop import LoopSettings
from skinclf.training.recipe import Recipe, pretrained_parameters

from conftest import TINY, run_dir_from_output, train_cli

SETTINGS = LoopSettings(precision="fp32", progress="never")
CPU = torch.device("cpu")

# Each backbone's torchvision builder, weights, and its stages as torchvision module names
# (written from torchvision's structure, independently of skinclf.models.backbones).
BACKBONES = {
    "resnet18": (
        tv.resnet18,
        tv.ResNet18_Weights.IMAGENET1K_V1,
        [["conv1", "bn1"], ["layer1"], ["layer2"], ["layer3"], ["layer4"]],
    ),
    "efficientnet_b0": (
        tv.efficientnet_b0,
        tv.EfficientNet_B0_Weights.IMAGENET1K_V1,
        [[f"features.{i}"] for i in range(9)],
    ),
    "convnext_tiny": (
        tv.convnext_tiny,
        tv.ConvNeXt_Tiny_Weights.IMAGENET1K_V1,
        [
            ["features.0"],
            ["features.1"],
            ["features.2", "features.3"],
            ["features.4", "features.5"],
            ["features.6", "features.7"],
        ],
    ),
}
# VGG-16's five convolutional blocks in torchvision's ``features``: conv layers up to each max-pool.
VGG_BLOCKS = [range(0, 5), range(5, 10), range(10, 17), range(17, 24), range(24, 31)]


def build(name: str, *overrides: str, device: str = "cpu") -> nn.Module:
    """The model as its config builds it, random weights; ``device="meta"``: shapes only (fast)."""
    torch.manual_seed(0)
    with torch.device(device):
        return build_model(compose_config([f"model={name}", "model.pretrained=false", *overrides]).model)


def trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def expected_backbone_trainable(name: str, frozen: int) -> int:
    """Parameters outside the first ``frozen`` stages of torchvision's own single-logit network."""
    build_fn, _, stages = BACKBONES[name]
    with torch.device("meta"):
        reference = build_fn(weights=None, num_classes=1)
    prefixes = tuple(f"{module}." for stage in stages[:frozen] for module in stage)
    return sum(p.numel() for n, p in reference.named_parameters() if not n.startswith(prefixes))


@pytest.mark.parametrize("name", [*BACKBONES, "vgg16_ft"])
def test_one_logit_per_image(name):
    model = build(name).eval()
    with torch.no_grad():
        out = model(torch.rand(2, 3, 128, 128))
    assert out.shape == (2, 1) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", BACKBONES)
def test_trainable_parameters_under_each_freeze_setting(name):
    stages = len(BACKBONES[name][2])
    assert len(build(name, device="meta").stages()) == stages
    total = expected_backbone_trainable(name, 0)
    for freeze, frozen in [("none", 0), *((str(k), k) for k in range(stages + 1)), ("all", stages)]:
        model = build(name, f"model.freeze={freeze}", device="meta")
        assert sum(p.numel() for p in model.parameters()) == total
        assert trainable(model) == expected_backbone_trainable(name, frozen), (name, freeze)


def test_vgg16_ft_trains_its_last_block_with_the_head():
    with torch.device("meta"):
        reference = tv.vgg16(weights=None)
    head = sum(p.numel() for p in build("vgg16", device="meta").classifier.parameters())
    assert head == 104_928_001  # paper C.7's head
    for freeze, frozen in [("4", 4), ("none", 0), ("2", 2), ("all", 5)]:
        open_blocks = [i for block in VGG_BLOCKS[frozen:] for i in block]
        expected = head + sum(p.numel() for i in open_blocks for p in reference.features[i].parameters())
        assert trainable(build("vgg16_ft", f"model.freeze={freeze}", device="meta")) == expected, freeze
    default = build("vgg16_ft", device="meta")  # block 5: three 3x3 convolutions of 512 channels
    assert trainable(default) == head + 3 * (512 * 512 * 9 + 512)


@pytest.mark.parametrize(
    ("name", "freeze"), [("resnet18", "6"), ("convnext_tiny", "some"), ("vgg16_ft", "-1")]
)
def test_bad_freeze_is_one_clear_error(name, freeze):
    with pytest.raises(SkinclfError, match=rf"^model.freeze='{freeze}': expected none, all or a number"):
        build(name, f"model.freeze='{freeze}'", device="meta")


def test_frozen_stages_keep_their_batchnorm_statistics():
    model = build("resnet18", "model.freeze=2").train()
    assert not model.net.bn1.training and not model.net.layer1.training and model.net.layer2.training
    before = model.net.layer1[0].bn1.running_mean.clone(), model.net.layer2[0].bn1.running_mean.clone()
    model(torch.rand(4, 3, 64, 64))
    assert torch.equal(model.net.layer1[0].bn1.running_mean, before[0])
    assert not torch.equal(model.net.layer2[0].bn1.running_mean, before[1])


@pytest.mark.parametrize("name", BACKBONES)
def test_imagenet_weights_come_from_the_torch_hub_cache(name, offline_hub, caplog):  # noqa: F811
    build_fn, weights, _ = BACKBONES[name]
    reference = build_fn(weights=None).state_dict()
    first = next(iter(reference))  # the stem's first weight: stored for real, the rest as one value
    stored = {
        k: v if k == first else torch.zeros((1,) * v.ndim, dtype=v.dtype).expand(v.shape)
        for k, v in reference.items()
    }
    offline_hub.mkdir(parents=True)
    torch.save(stored, weights_path(weights))
    assert weights_path(weights).parent == offline_hub

    with caplog.at_level(logging.INFO, logger="skinclf"):
        model = build_model(compose_config([f"model={name}"]).model)
    assert torch.equal(model.net.state_dict()[first], reference[first])
    assert weights.name in caplog.text and "random initialisation" not in caplog.text
    # The new head is the only part that did not come from the file; it gets the higher learning rate.
    head = model.head()
    assert head.out_features == 1 and head.weight.abs().sum() > 0
    body = {id(p) for p in pretrained_parameters(model)}
    assert body == {id(p) for p in model.parameters()} - {id(p) for p in head.parameters()}
    assert pretrained_parameters(build(name)) == []  # random initialisation: one learning rate


@pytest.mark.parametrize("name", ["resnet18", "vgg16", "vgg16_ft"])
@pytest.mark.parametrize("value", ["off", "no", "0", "'false'"])
def test_pretrained_accepts_only_true_or_false(name, value, offline_hub):  # noqa: F811
    # Any string used to count as true and load (or try to download) the ImageNet weights.
    shown = value.strip("'")
    shown = repr(int(shown)) if shown.isdigit() else repr(shown)
    with pytest.raises(SkinclfError, match=f"^model.pretrained={shown}: expected true or false$"):
        build_model(compose_config([f"model={name}", f"model.pretrained={value}"]).model)


def test_bad_freeze_fails_before_any_weight_loading(offline_hub):  # noqa: F811
    with pytest.raises(SkinclfError, match="^model.freeze=6: expected"):
        build_model(compose_config(["model=resnet18", "model.freeze=6"]).model)


def test_missing_weights_offline_is_the_vgg16_message(offline_hub):  # noqa: F811
    with pytest.raises(SkinclfError) as err:
        build_model(compose_config(["model=resnet18"]).model)
    message = str(err.value)
    assert str(offline_hub / "resnet18-f37072fd.pth") in message
    assert "torchvision.models.resnet18(weights='IMAGENET1K_V1')" in message
    assert "model.pretrained=false" in message and "\n" not in message


def test_vgg16_ft_caches_only_its_frozen_blocks(tmp_path):
    model, pipeline, splits = build("vgg16_ft").eval(), ImageNetPipeline(), tiny_splits(size=64)
    stage = training_stage(model, pipeline, splits, tmp_path, SETTINGS, CPU)
    assert stage.module is not model
    # Blocks 1-4 halve 64 four times: the cache holds 512x4x4 maps, block 5 runs in the loop.
    assert stage.splits.train.images.shape == (4, 512, 4, 4)
    with torch.no_grad():
        expected = model(pipeline.eval_batch(splits.val.images))
        got = stage.module.eval()(stage.pipeline.eval_batch(stage.splits.val.images))
    torch.testing.assert_close(got, expected, atol=1e-3, rtol=1e-2)
    assert {id(p) for p in stage.module.parameters() if p.requires_grad} == {
        id(p) for p in model.parameters() if p.requires_grad
    }


@pytest.mark.parametrize("modern", ["augment", "tta", "mixup"])
def test_frozen_front_end_trains_whole_when_the_recipe_needs_images(tmp_path, modern, caplog):
    model, splits = build("vgg16_ft"), tiny_splits()
    pipeline = DermoscopyAugmentation(ImageNetPipeline()) if modern == "augment" else ImageNetPipeline()
    # Mixup mixes images: mixing cached feature maps instead would be another method.
    recipe = Recipe(tta=modern == "tta", mixup_alpha=0.2 if modern == "mixup" else 0.0)
    settings = LoopSettings(progress="never", recipe=recipe)
    with caplog.at_level(logging.INFO, logger="skinclf"):
        stage = training_stage(model, pipeline, splits, tmp_path, settings, CPU)
    assert stage.module is model and stage.pipeline is pipeline and stage.splits is splits
    assert not (tmp_path / "features").exists() and "feature cache off" in caplog.text


def test_new_models_follow_the_papers_eight_in_summary_and_report():
    names = model_names()
    assert names[:8] == [
        "baseline",
        "batch_norm",
        "group_norm",
        "layer_norm",
        "augmented",
        "resnet",
        "vgg16",
        "res_aug",
    ]
    assert set(names[8:]) >= {"resnet18", "efficientnet_b0", "convnext_tiny", "vgg16_ft"}


@pytest.mark.slow
@pytest.mark.parametrize("name", [*BACKBONES, "vgg16_ft"])
@pytest.mark.parametrize("recipe", ["paper", "modern"])
def test_one_epoch_cli_run(tmp_path, name, recipe):
    overrides = [f"model={name}", "model.pretrained=false", f"recipe={recipe}", *TINY]
    proc = train_cli(*overrides, f"data.cache_dir={tmp_path / 'data'}", cwd=tmp_path)
    run = run_dir_from_output(proc.stdout)
    assert (run / "test_metrics.json").is_file()
    for checkpoint in ("best.pt", "last.pt"):  # up to ~1.7 GB for vgg16_ft
        (run / checkpoint).unlink()
