"""Grad-CAM and `skinclf explain`: where a finished run's model looked."""

from __future__ import annotations

import os
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from PIL import Image
from torch import nn

from skinclf import IMAGE_SIZE, explain
from skinclf.arguments import SYNTHETIC_MODEL_NOTE
from skinclf.cli import main as cli_main
from skinclf.config import compose_config
from skinclf.data.synthetic import draw_lesion
from skinclf.errors import SkinclfError
from skinclf.evaluation.gradcam import grad_cam, grad_cam_over_flips
from skinclf.models import PAPER_MODELS, build_model
from skinclf.models.vgg16 import VGG16Transfer
from skinclf.trained_run import load_trained_run, quiet_logs
from skinclf.training.recipe import FlipTTA

from conftest import TINY, another_run, fail_if_called, files_of, image_and_kept_file, train_in_process


def _off_centre_mel_images(n: int, offset: float, seed: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    """MEL images whose lesion centre is ``offset`` px from the image centre on both axes (training
    lesions are within 14 px of it), with their lesion masks."""
    rng = np.random.default_rng(seed)
    images, masks = [], []
    for _ in range(n):
        dy, dx = rng.choice([-offset, offset], 2)
        image, mask = draw_lesion(rng, 1, center=(IMAGE_SIZE / 2 + dy, IMAGE_SIZE / 2 + dx))
        images.append(torch.from_numpy(image).permute(2, 0, 1))
        masks.append(torch.from_numpy(mask))
    return torch.stack(images), torch.stack(masks)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # fp32, so that Grad-CAM's fp32 forward gives exactly the logits of `skinclf predict`.
    return train_in_process(
        tmp_path_factory.mktemp("explain"), *TINY, "model=resnet", "trainer.precision=fp32"
    )[0]


def test_heat_maps_have_the_image_size_and_are_not_constant(tiny_run):
    run = load_trained_run(tiny_run)
    images, _ = _off_centre_mel_images(4, 20)
    batch = run.pipeline.eval_batch(images.to(run.device))
    cam = grad_cam(run.model, batch, torch.tensor([True, True, False, False]))
    assert cam.heatmaps.shape == (4, IMAGE_SIZE, IMAGE_SIZE)
    assert cam.layer.startswith("block2")  # the last residual block, not its 1x1 shortcut conv
    maps = cam.heatmaps.flatten(1)
    assert (maps.min(1).values >= 0).all() and (maps.max(1).values <= 1).all()
    assert (maps.std(1) > 0.01).sum() >= 2
    # The logits are the model's: Grad-CAM does not change what it explains.
    assert cam.logits == pytest.approx(torch.logit(run.predict_probs(images)), abs=1e-4)
    # Evidence for NV is the mirror image of evidence for MEL, not the same map.
    nv_batch = run.pipeline.eval_batch(images[:1].to(run.device))
    nv_map = grad_cam(run.model, nv_batch, torch.tensor([False])).heatmaps
    assert not torch.allclose(nv_map.flatten(1), maps[:1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_grad_cam_takes_cpu_inputs_for_a_model_on_the_gpu(tiny_run):
    run = load_trained_run(tiny_run, device="cuda")
    images, _ = _off_centre_mel_images(2, 20)
    cam = grad_cam(run.model, run.pipeline.eval_batch(images))
    assert cam.heatmaps.shape == (2, IMAGE_SIZE, IMAGE_SIZE) and cam.heatmaps.device.type == "cpu"
    assert cam.logits == pytest.approx(torch.logit(run.predict_probs(images)), abs=1e-4)


def test_grad_cam_of_a_centre_crop_preset_lies_where_the_evidence_is():
    # VGG-16 with its weights' own preset (resize 256, centre crop 224) sees the centre 112x112 of
    # a 128x128 image. An extractor whose every channel is the image's brightness and a head that
    # sums them make the heat map the (cropped) image itself: its centre of mass must be the bright
    # square's, not stretched outwards as the crop's map spread over the whole image would be.
    model = VGG16Transfer(pretrained=False, input_preset="full")
    model.features = nn.Sequential(nn.Conv2d(3, 512, 1, bias=False))
    model.classifier = nn.Linear(512 * 7 * 7, 1, bias=False)
    nn.init.constant_(model.features[0].weight, 1 / 3)
    nn.init.constant_(model.classifier.weight, 1.0)
    image = torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE)
    image[..., 20:30, 90:100] = 1.0  # centre (24.5, 94.5), pixel centres at integers

    cam = grad_cam(model, image)
    assert cam.window == (8, 8, 112, 112)
    heatmap = cam.heatmaps[0]
    outside = torch.ones_like(heatmap, dtype=torch.bool)
    outside[8:120, 8:120] = False
    assert (heatmap[outside] == 0).all()  # the network never sees the frame
    yy, xx = torch.meshgrid(torch.arange(IMAGE_SIZE), torch.arange(IMAGE_SIZE), indexing="ij")
    centre = [float((heatmap * axis).sum() / heatmap.sum()) for axis in (yy, xx)]
    assert centre == pytest.approx([24.5, 94.5], abs=0.5)


def test_grad_cam_over_flips_maps_every_view_back_onto_the_image():
    # Every channel is the image's brightness and the head sums them: each view's map is its
    # (flipped) image, so the averaged map keeps the bright square where it is only if every
    # view's map is flipped back (unflipped, the four would spread it over the four corners).
    # The head weighs the four quadrants differently (all positively), so the views' logits differ.
    class Brightness(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Conv2d(3, 8, 1, bias=False)
            self.head = nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 1, bias=False))
            nn.init.constant_(self.features.weight, 1 / 3)
            with torch.no_grad():
                self.head[2].weight.copy_(torch.linspace(0.2, 2.0, 32))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.features(x)) - 0.05

    model = Brightness()
    images = torch.zeros(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    images[0, :, 20:30, 90:100] = 1.0
    images[1, :, 100:110, 10:30] = 1.0
    cam = grad_cam_over_flips(model, images)
    yy, xx = torch.meshgrid(torch.arange(IMAGE_SIZE), torch.arange(IMAGE_SIZE), indexing="ij")
    for heatmap, centre in zip(cam.heatmaps, ([24.5, 94.5], [104.5, 19.5]), strict=True):
        assert heatmap.max() == pytest.approx(1.0)
        assert [float((heatmap * axis).sum() / heatmap.sum()) for axis in (yy, xx)] == pytest.approx(
            centre, abs=0.5
        )
    # The logit is that of the mean probability over the views, as FlipTTA gives it.
    assert cam.logits == pytest.approx(FlipTTA(model)(images).detach().flatten(), abs=1e-5)
    assert cam.logits != pytest.approx(model(images).detach().flatten(), abs=1e-3)  # not one view's


@pytest.mark.parametrize(
    ("model", "layer"),
    [
        ("baseline", "5 (ReLU)"),  # the second block's output: conv 3, max-pool 4, ReLU 5
        ("layer_norm", "7 (ReLU)"),  # conv 4, LayerNorm 5, max-pool 6, ReLU 7
        ("batch_norm", "7 (ReLU)"),  # after the norm, not the conv's raw output
        ("vgg16", "features (Sequential)"),  # the whole frozen extractor, as its features are cached
    ],
)
def test_grad_cam_maps_the_last_convolutional_block(model, layer):
    no_weights = ["model.pretrained=false"] if model == "vgg16" else []  # no download, no network
    with quiet_logs():  # vgg16 without ImageNet weights says so
        net = build_model(compose_config([f"model={model}", *no_weights]).model)
    assert grad_cam(net, torch.rand(1, 3, IMAGE_SIZE, IMAGE_SIZE)).layer == layer


def test_a_plain_cnns_map_ignores_what_its_relu_discards():
    # The map was of the second conv's raw output: doubling its negative values (which the
    # max-pool and ReLU after it discard, so the logits stay bit for bit the same) changed the map
    # by up to 0.26. (With a norm layer, the map also followed offsets the norm removes.)
    torch.manual_seed(0)
    net = build_model(compose_config(["model=baseline"]).model).eval()
    images = torch.rand(4, 3, IMAGE_SIZE, IMAGE_SIZE)
    plain = grad_cam(net, images, toward_mel=torch.tensor([True, False, True, False]))
    second_pool = [i for i, m in enumerate(net) if isinstance(m, nn.MaxPool2d)][1]
    handle = net[second_pool - 1].register_forward_hook(
        lambda _m, _i, out: torch.where(out < 0, 2 * out, out)
    )
    try:
        doubled = grad_cam(net, images, toward_mel=torch.tensor([True, False, True, False]))
    finally:
        handle.remove()
    assert torch.equal(doubled.logits, plain.logits)
    torch.testing.assert_close(doubled.heatmaps, plain.heatmaps, atol=1e-6, rtol=0)


class GloballyPooledCNN(nn.Module):
    """A common shape of a user's own model: the feature block ends in global pooling."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.AdaptiveAvgPool2d(1)
        )
        self.head = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


def test_a_users_grad_cam_layer_is_used_or_refused_in_one_line():
    class Named(GloballyPooledCNN):
        def grad_cam_layer(self) -> nn.Module:
            return self.features[1]  # the ReLU after the first conv

    torch.manual_seed(0)
    assert grad_cam(Named(), torch.rand(1, 3, IMAGE_SIZE, IMAGE_SIZE)).layer == "features.1 (ReLU)"
    Named.grad_cam_layer = lambda self: nn.ReLU()  # a module the model does not hold
    with pytest.raises(SkinclfError, match=r"^Named.grad_cam_layer\(\): returned a ReLU, not one of"):
        grad_cam(Named(), torch.rand(1, 3, IMAGE_SIZE, IMAGE_SIZE))
    Named.grad_cam_layer = lambda self: "features.1"  # its name, not the module
    with pytest.raises(SkinclfError, match=r"returned 'features.1', not one of .*; expected the module"):
        grad_cam(Named(), torch.rand(1, 3, IMAGE_SIZE, IMAGE_SIZE))
    Named.grad_cam_layer = lambda self: self.features[3]  # pools to 1x1
    with pytest.raises(SkinclfError, match=r"its grad_cam_layer\(\) returns no feature map larger than 1x1"):
        grad_cam(Named(), torch.rand(1, 3, IMAGE_SIZE, IMAGE_SIZE))


def test_grad_cam_skips_a_block_that_pools_to_1x1():
    # The block holding the convs returns a 1x1 map, which says nothing about where.
    torch.manual_seed(0)
    cam = grad_cam(GloballyPooledCNN(), torch.rand(2, 3, IMAGE_SIZE, IMAGE_SIZE))
    assert cam.layer == "features.2 (Conv2d)"
    assert cam.heatmaps.shape == (2, IMAGE_SIZE, IMAGE_SIZE)
    assert float(cam.heatmaps.flatten(1).std(dim=1).min()) > 0.01  # a map, not a constant


def test_explain_draws_the_map_of_the_runs_own_prediction(tiny_run, tmp_path, monkeypatch):
    images, _ = _off_centre_mel_images(1, 20)
    Image.fromarray(images[0].permute(1, 2, 0).numpy()).save(tmp_path / "lesion.png")
    drawn, shown = [], []

    def record(image, heatmap, prob_mel, threshold, title, evidence, window=None, synthetic=False):
        drawn.append((heatmap, evidence, window))
        shown.append((prob_mel, threshold))  # the figure's title: P(MEL) and the call's threshold
        return Figure()

    monkeypatch.setattr(explain, "render", record)
    run = load_trained_run(tiny_run)
    batch = run.pipeline.eval_batch(images)
    assert run.threshold != 0.5  # the run's operating point, which a default would not be

    # A run with test-time augmentation: the map averaged over the flips, and the figure says so.
    run.settings = replace(run.settings, recipe=replace(run.settings.recipe, tta=True))
    explain.explain_files(run, [tmp_path / "lesion.png"], tmp_path / "tta")
    heatmap, evidence, _ = drawn.pop()
    assert torch.allclose(heatmap, grad_cam_over_flips(run.model, batch).heatmaps[0], atol=1e-6)
    assert not torch.allclose(heatmap, grad_cam(run.model, batch).heatmaps[0], atol=1e-3)
    assert evidence == "MEL, mean of image + 3 flips"
    # The figure says what `skinclf predict` says: the run's probability (over the flips) and threshold.
    prob, threshold = shown.pop()
    assert threshold == run.threshold
    assert prob == pytest.approx(float(run.predict_probs(images)[0]), abs=1e-6)

    # --class nv: the map of the evidence toward NV; --class predicted: toward the run's call at
    # its threshold (NV above every probability, MEL at 0 and at the image's own probability:
    # MEL when prob_mel >= threshold, as `skinclf predict` calls it).
    run.settings = replace(run.settings, recipe=replace(run.settings.recipe, tta=False))
    explain.explain_files(run, [tmp_path / "lesion.png"], tmp_path / "nv", target="nv")
    nv_map, evidence, _ = drawn.pop()
    assert evidence == "NV"
    assert torch.allclose(nv_map, grad_cam(run.model, batch, torch.tensor([False])).heatmaps[0], atol=1e-6)
    assert not torch.allclose(nv_map, grad_cam(run.model, batch).heatmaps[0], atol=1e-3)
    own_prob = float(run.predict_probs(images)[0])
    for threshold, call in ((1.0, "NV"), (0.0, "MEL"), (own_prob, "MEL")):
        run.threshold = threshold
        explain.explain_files(run, [tmp_path / "lesion.png"], tmp_path / call, target="predicted")
        heatmap, evidence, _ = drawn.pop()
        toward_mel = torch.tensor([call == "MEL"])
        assert evidence == call
        assert shown.pop() == (pytest.approx(own_prob, abs=1e-6), threshold)
        assert torch.allclose(heatmap, grad_cam(run.model, batch, toward_mel).heatmaps[0], atol=1e-6)

    # A model that sees only part of the image (VGG-16's full preset): the figure gets its window.
    monkeypatch.setattr(run.model, "input_window", lambda height, width: (8, 8, 112, 112), raising=False)
    explain.explain_files(run, [tmp_path / "lesion.png"], tmp_path / "window")
    heatmap, evidence, window = drawn.pop()
    assert window == (8, 8, 112, 112) and evidence == "MEL"
    assert heatmap[:8].abs().sum() == 0 and heatmap[8:120, 8:120].max() == 1.0


def test_explain_writes_one_png_per_readable_image(tiny_run, tmp_path, capsys):
    images, _ = _off_centre_mel_images(2, 20)
    folder = tmp_path / "in"
    folder.mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"lesion_{i}.jpg", quality=95)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    out = tmp_path / "out"
    cli_main(["explain", str(tiny_run), str(folder), "--out", str(out)])
    written = sorted(p.name for p in out.iterdir())
    assert written == ["lesion_0_gradcam.png", "lesion_1_gradcam.png"]
    with Image.open(out / written[0]) as png:
        assert png.size[0] > 2 * IMAGE_SIZE and png.getextrema()[0][0] != png.getextrema()[0][1]
    err = capsys.readouterr().err
    assert "broken.jpg" in err and "not a diagnosis" in err
    assert f"2 Grad-CAM images in {out}/, 1 file unreadable" in err
    assert f"note: {SYNTHETIC_MODEL_NOTE}" in err  # the run learned from the built-in data

    # Nothing readable: one error naming the file (as `skinclf predict` gives it), exit 2, no
    # summary that claims a folder, and the --out made for it removed again.
    empty_out = tmp_path / "none"
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["explain", str(tiny_run), str(folder / "broken.jpg"), "--out", str(empty_out)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"skinclf explain: error: no image to explain: {folder / 'broken.jpg'}: ")
    assert len(err.splitlines()) == 1 and not empty_out.exists()


@pytest.mark.slow
def test_a_trained_model_looks_at_the_off_centre_lesion(tmp_path):
    # A learning rate above the paper's 1e-4, so that a few CPU epochs learn something.
    run_dir, metrics = train_in_process(
        tmp_path,
        "model=baseline",
        "data.train_size=512",
        "data.val_size=64",
        "data.test_size=64",
        "trainer.max_epochs=4",
        "optim.lr=1e-3",
        "trainer.precision=fp32",
    )
    assert metrics["roc_auc"] > 0.65, "the model did not learn: its heat maps would say nothing"
    run = load_trained_run(run_dir)
    images, masks = _off_centre_mel_images(30, 22)
    heatmaps = grad_cam(run.model, run.pipeline.eval_batch(images)).heatmaps
    # Inside the dermoscope's field of view: the synthetic images darken outside a disc, and that
    # dark rim is MEL-coloured evidence to the model too (see README), but it is not skin.
    yy, xx = torch.meshgrid(torch.arange(IMAGE_SIZE) + 0.5, torch.arange(IMAGE_SIZE) + 0.5, indexing="ij")
    field = torch.hypot(yy - IMAGE_SIZE / 2, xx - IMAGE_SIZE / 2) <= 56
    peaks = (heatmaps * field).flatten(1).argmax(1)
    inside = masks.flatten(1)[torch.arange(len(images)), peaks].float().mean().item()
    lesion_share = (masks & field).float().sum().item() / (field.sum().item() * len(images))
    assert inside > 0.5
    assert inside > 2 * lesion_share  # far above where random peaks would land


@pytest.mark.slow
@pytest.mark.parametrize("model", PAPER_MODELS)
def test_explain_works_for_every_model(model, tmp_path, shared_data_dir):
    overrides = ["data.train_size=8", "data.val_size=4", "data.test_size=4", "trainer.max_epochs=1"]
    if model == "vgg16":
        overrides.append("model.pretrained=false")  # no ImageNet download in tests
    run_dir, _ = train_in_process(tmp_path, f"model={model}", f"data.cache_dir={shared_data_dir}", *overrides)
    image, _ = draw_lesion(np.random.default_rng(0), 1)
    Image.fromarray(image).save(tmp_path / "lesion.png")
    out = tmp_path / "out"
    cli_main(
        ["explain", str(run_dir), str(tmp_path / "lesion.png"), "--out", str(out), "--class", "predicted"]
    )
    with Image.open(out / "lesion_gradcam.png") as png:
        assert png.format == "PNG" and png.size[0] > 2 * IMAGE_SIZE


@pytest.mark.parametrize("where", ["a file", "under a file"])
def test_an_unwritable_out_is_refused_before_the_model_is_loaded(where, tmp_path, monkeypatch, capsys):
    image, notes = image_and_kept_file(tmp_path)
    out = {"a file": notes, "under a file": notes / "explanations"}[where]
    monkeypatch.setattr("skinclf.explain.load_trained_run", fail_if_called("loading the model"))
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["explain", str(tmp_path / "run"), str(image), "--out", str(out)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"error: {out}: " in err
    assert notes.read_text() == "keep me"


def test_an_out_named_like_an_image_file_is_refused(tmp_path, monkeypatch, capsys):
    # `--out heatmap.png` made a folder heatmap.png/ holding the figure.
    image, _ = image_and_kept_file(tmp_path)
    monkeypatch.setattr("skinclf.explain.load_trained_run", fail_if_called("loading the model"))
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["explain", str(tmp_path / "run"), str(image), "--out", str(tmp_path / "heatmap.PNG")])
    assert exit_info.value.code == 2
    assert (
        "heatmap.PNG: names a file; expected a folder, to hold one figure per image"
        in capsys.readouterr().err
    )
    assert not (tmp_path / "heatmap.PNG").exists()


@pytest.mark.parametrize(
    ("where", "message"),
    [
        ("the run folder", "is the run folder {run}; expected a folder outside it"),
        ("inside the run folder", "is inside the run folder {run}; expected a folder outside it"),
        ("another run's .hydra", "is {other}/.hydra, which the skinclf run in {other} writes; expected a"),
        ("another run's fold_3", "is {other}/fold_3, which the skinclf run in {other} writes; expected a"),
        ("another run's file", "is {other}/predictions.csv, which the skinclf run in {other} writes; "),
    ],
    ids=["run folder", "inside it", "other .hydra", "other fold_3", "other predictions.csv"],
)
def test_an_out_in_the_run_or_over_another_runs_files_is_refused(
    tiny_run, tmp_path, monkeypatch, capsys, where, message
):
    # The rule of `skinclf predict`: nothing into the run used, nothing over any run's own files.
    image, _ = image_and_kept_file(tmp_path)
    other = another_run(tiny_run, tmp_path)
    out = {
        "the run folder": tiny_run,
        "inside the run folder": tiny_run / "explanations",
        "another run's .hydra": other / ".hydra",
        "another run's fold_3": other / "fold_3",  # a fold folder the grid point writes later
        "another run's file": other / "predictions.csv",
    }[where]
    runs_before = {**files_of(tiny_run), **files_of(other)}
    monkeypatch.setattr("skinclf.explain.load_trained_run", fail_if_called("loading the model"))
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["explain", str(tiny_run), str(image), "--out", str(out)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    expected = message.format(run=tiny_run, other=other)
    assert err.startswith(f"skinclf explain: error: --out {out}: {expected}") and len(err.splitlines()) == 1
    assert {**files_of(tiny_run), **files_of(other)} == runs_before
    assert not (tiny_run / "explanations").exists() and not (other / "fold_3").exists()


def test_an_out_that_is_another_runs_folder_gets_new_files_only(tiny_run, tmp_path):
    # Grad-CAM images are named after the images, never as a run's files: nothing of it is at stake.
    image, _ = image_and_kept_file(tmp_path)
    other = another_run(tiny_run, tmp_path)
    before = files_of(other)
    cli_main(["explain", str(tiny_run), str(image), "--out", str(other)])
    assert set(files_of(other)) - set(before) == {other / "lesion_gradcam.png"}
    assert {path: data for path, data in files_of(other).items() if path in before} == before


def test_an_input_image_named_like_an_output_is_never_overwritten(tiny_run, tmp_path):
    # --out is the images' own folder, which holds lesion.png and lesion_gradcam.png (an image).
    image, _ = image_and_kept_file(tmp_path)
    lookalike = tmp_path / "lesion_gradcam.png"
    Image.new("RGB", (16, 16), (200, 0, 0)).save(lookalike)
    kept = lookalike.read_bytes()
    cli_main(["explain", str(tiny_run), str(image), str(lookalike), "--out", str(tmp_path)])
    assert lookalike.read_bytes() == kept
    assert (tmp_path / "lesion_2_gradcam.png").is_file()  # lesion.png's figure
    assert (tmp_path / "lesion_gradcam_gradcam.png").is_file()


def test_an_out_inside_an_explained_folder_is_not_explained_again(tiny_run, tmp_path):
    # The default --out, explanations/, lies inside `.`: a second `skinclf explain RUN .` explained
    # the first one's figures (lesion_gradcam_gradcam.png).
    image, _ = image_and_kept_file(tmp_path)
    for _ in range(2):
        cli_main(["explain", str(tiny_run), str(tmp_path), "--out", str(tmp_path / "explanations")])
    assert sorted(p.name for p in (tmp_path / "explanations").iterdir()) == ["lesion_gradcam.png"]
    # An --out that is the folder being explained, or holds it, leaves every image in: its figures
    # join the images, as before (and are named so as not to overwrite one).
    outer = tmp_path / "outer"
    (outer / "in").mkdir(parents=True)
    image_and_kept_file(outer / "in")
    cli_main(["explain", str(tiny_run), str(outer / "in"), "--out", str(outer / "in")])
    cli_main(["explain", str(tiny_run), str(outer / "in"), "--out", str(outer)])
    assert (outer / "in" / "lesion_gradcam.png").is_file() and (outer / "lesion_gradcam.png").is_file()


def test_an_empty_map_is_said_in_the_figure_and_on_the_console(tiny_run, tmp_path, monkeypatch, capsys):
    # Grad-CAM keeps only positive evidence: a briefly trained norm model's maps were often all
    # zero, drawn as a plain blue overlay without a word.
    image, _ = image_and_kept_file(tmp_path)
    real_cam, real_render, notes = explain.grad_cam, explain.render, []

    def empty_cam(*args, **kwargs):
        cam = real_cam(*args, **kwargs)
        return replace(cam, heatmaps=torch.zeros_like(cam.heatmaps))

    def render(*args):
        fig = real_render(*args)
        notes.extend(text.get_text() for ax in fig.axes for text in ax.texts)
        return fig

    monkeypatch.setattr(explain, "render", render)
    cli_main(["explain", str(tiny_run), str(image), "--out", str(tmp_path / "full")])
    assert not notes  # a map with evidence says nothing
    monkeypatch.setattr(explain, "grad_cam", empty_cam)
    cli_main(["explain", str(tiny_run), str(image), "--out", str(tmp_path / "empty")])
    assert notes == ["no positive evidence for MEL\nat this layer"]
    assert "note: 1/1 maps show no positive evidence for the class explained" in capsys.readouterr().err


@pytest.mark.skipif(sys.platform != "linux", reason="file names of any bytes are Linux's")
def test_a_file_name_that_is_no_utf8_is_titled_with_escapes_and_named_as_it_is(
    tiny_run, tmp_path, monkeypatch
):
    # Linux allows any bytes in a name; Python keeps those that are no UTF-8 as "\udcff", which
    # matplotlib refuses: the whole batch would end half-written, an earlier image's figure on disk.
    image, _ = image_and_kept_file(tmp_path)
    named = tmp_path / os.fsdecode(b"\xff\xfe.png")
    named.write_bytes(image.read_bytes())
    titles, real_render = [], explain.render

    def render(*args):
        titles.append(args[4])
        return real_render(*args)

    monkeypatch.setattr(explain, "render", render)
    out = tmp_path / "out"
    cli_main(["explain", str(tiny_run), str(image), str(named), "--out", str(out)])
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["lesion_gradcam.png", f"{named.stem}_gradcam.png"]
    )
    assert sorted(title.split(" - ")[0] for title in titles) == ["\\xff\\xfe.png", "lesion.png"]


def test_images_of_one_name_from_several_folders_are_titled_by_their_paths(
    tiny_run, tmp_path, monkeypatch, capsys
):
    # Their figures are x_gradcam.png, x_2_gradcam.png, ...: titled "x.png" alone, which was which?
    # And each its own file: a name handed out but not kept as taken was given again, and the
    # figure of b/x.png overwrote that of a/x.png.
    image, _ = image_and_kept_file(tmp_path)
    for folder in ("a", "b", "b/deeper"):
        (tmp_path / "in" / folder).mkdir(parents=True, exist_ok=True)
        (tmp_path / "in" / folder / "x.png").write_bytes(image.read_bytes())
    titles, real_render = [], explain.render

    def render(*args):
        titles.append(args[4].split(" - ")[0])
        return real_render(*args)

    monkeypatch.setattr(explain, "render", render)
    out = tmp_path / "out"
    cli_main(["explain", str(tiny_run), str(tmp_path / "in"), str(image), "--out", str(out)])
    assert sorted(titles) == ["a/x.png", "b/deeper/x.png", "b/x.png", "lesion.png"]
    figures = ["x_gradcam.png", "x_2_gradcam.png", "x_3_gradcam.png", "lesion_gradcam.png"]
    assert sorted(p.name for p in out.iterdir()) == sorted(figures)
    printed, err = capsys.readouterr()
    assert printed.splitlines() == [str(out / name) for name in figures]  # in the order of the images
    assert f"4 Grad-CAM images in {out}/, 0 files unreadable" in err


@pytest.mark.parametrize(
    ("prob", "threshold", "shown"),
    [
        (0.7, 0.5, "P(MEL) = 0.700: MEL at threshold 0.500"),
        # Rounded to 3 decimals, 0.399 "NV at threshold 0.39864066" read as a contradiction.
        (0.39864060282707214, 0.39864066, "P(MEL) = 0.3986406: NV at threshold 0.3986407"),
        (0.45, 0.45, "P(MEL) = 0.45: MEL at threshold 0.45"),
    ],
)
def test_the_figure_shows_probability_and_threshold_told_apart(prob, threshold, shown):
    fig = explain.render(
        torch.zeros(3, 8, 8, dtype=torch.uint8), torch.rand(8, 8), prob, threshold, "x.png", "MEL"
    )
    assert fig._suptitle.get_text().splitlines()[1] == shown


@pytest.mark.parametrize("synthetic", [False, True])
def test_each_figure_says_research_aid_and_whether_the_model_learned_from_synthetic_data(synthetic):
    image = torch.zeros(3, 8, 8, dtype=torch.uint8)
    fig = explain.render(image, torch.rand(8, 8), 0.7, 0.5, "x.png", "MEL", synthetic=synthetic)
    [footer] = [text.get_text() for text in fig.texts if text.get_text().startswith("Research aid")]
    assert footer.startswith("Research aid, not a diagnosis.")
    assert ("trained on synthetic data" in footer) == synthetic
