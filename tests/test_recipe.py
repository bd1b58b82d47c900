"""Training recipes: each piece of recipe=modern is applied when on and absent when off, and the
paper's recipe stays the paper's (Adam, constant learning rate, nothing else)."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
from torch import nn
from torchvision.transforms import RandomResizedCrop

from skinclf.config import compose_config
from skinclf.data.dermoscopy import AugmentParams, DermoscopyAugmentation, apply_augmentation, recipe_pipeline
from skinclf.data.pipeline import AugmentedPipeline, DefaultPipeline
from skinclf.data.splits import Split
from skinclf.errors import SkinclfError
from skinclf.training.checkpoint import load_checkpoint
from skinclf.training.loop import METRICS_COLUMNS, LoopSettings, fit, predict_logits
from skinclf.training.recipe import (
    FlipTTA,
    Recipe,
    WeightEMA,
    build_optimizer,
    build_scheduler,
    mixup,
)

from conftest import TINY, batches_by_warp_chunk, run_dir_from_output, train_cli, train_in_process

CPU = torch.device("cpu")
MODERN = Recipe(optimizer="adamw", schedule="cosine", warmup_epochs=1, ema=True, tta=True)


class TinyNet(nn.Module):
    """Conv + BatchNorm (so the EMA covers buffers too) + a linear layer that sees positions, so
    that flipping an image changes its logit."""

    def __init__(self, size: int = 8) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 3, padding=1)
        self.bn = nn.BatchNorm2d(2)
        self.fc = nn.Linear(2 * size * size, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


def tiny_split(n: int = 12, size: int = 8, seed: int = 0) -> Split:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
    return Split(images, (torch.arange(n) % 2).float())


def settings(recipe: Recipe = Recipe(), **kwargs: object) -> LoopSettings:
    values = dict(max_epochs=2, batch_size=4, precision="fp32", channels_last=False, progress="never")
    return LoopSettings(**{**values, **kwargs, "recipe": recipe})


class CrashingPipeline(DefaultPipeline):
    """Fails like a crash when asked for its training batch number ``batches``."""

    def __init__(self, batches: int) -> None:
        super().__init__()
        self.left = batches

    def train_batch(self, images, generator, dtype=torch.float32):
        self.left -= 1
        if self.left == 0:
            raise RuntimeError("simulated crash")
        return super().train_batch(images, generator, dtype)


def fit_tiny(
    tmp_path,
    recipe: Recipe = Recipe(),
    model: nn.Module | None = None,
    resume: bool = False,
    pipeline: DefaultPipeline | None = None,
    **kwargs: object,
):
    """``fit`` of TinyNet on 12 random 8x8 images (3 batches of 4 per epoch); settings from ``kwargs``."""
    torch.manual_seed(0)
    model = model or TinyNet()
    split, val = tiny_split(), tiny_split(seed=1)
    result = fit(
        model,
        pipeline or DefaultPipeline(),
        split,
        val,
        settings(recipe, **kwargs),
        CPU,
        tmp_path,
        resume=resume,
    )
    return model, result, pd.read_csv(tmp_path / "metrics.csv")


# --- configuration ---------------------------------------------------------------------------


def test_paper_recipe_is_the_default_and_modern_switches_every_piece_on():
    paper = Recipe.from_config(compose_config([]).recipe)
    assert paper == Recipe()
    cfg = compose_config(["recipe=modern"])
    modern = Recipe.from_config(cfg.recipe)
    assert (modern.optimizer, modern.schedule, modern.ema, modern.tta) == ("adamw", "cosine", True, True)
    assert modern.body_lr_scale < 1 and cfg.recipe.augment.enabled
    assert cfg.optim.weight_decay > 0
    assert compose_config([]).optim.weight_decay == 0  # the paper's Adam has none


@pytest.mark.parametrize(
    ("key", "off"),
    [("optimizer", "adam"), ("schedule", "constant"), ("ema", False), ("tta", False), ("mixup_alpha", 0.0)],
)
def test_each_piece_switches_off_on_its_own(key, off):
    on = Recipe.from_config(compose_config(["recipe=modern", "recipe.mixup_alpha=0.2"]).recipe)
    ablated = Recipe.from_config(
        compose_config(["recipe=modern", "recipe.mixup_alpha=0.2", f"recipe.{key}={off}"]).recipe
    )
    assert getattr(ablated, key) == off != getattr(on, key)
    assert {f for f in vars(on) if getattr(on, f) != getattr(ablated, f)} == {key}
    augment = compose_config(["recipe=modern", "recipe.augment.enabled=false"]).recipe
    assert not augment.augment.enabled and Recipe.from_config(augment) == Recipe.from_config(
        compose_config(["recipe=modern"]).recipe
    )


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("recipe.optimizer=sgd", "recipe.optimizer='sgd'"),
        ("recipe.schedule=step", "recipe.schedule='step'"),
        ("recipe.ema_decay=1.5", "recipe.ema_decay=1.5"),
        ("recipe.body_lr_scale=0", "recipe.body_lr_scale=0"),
        ("recipe.mixup_alpha=-1", "recipe.mixup_alpha=-1"),
        # Not finite: an OverflowError in the schedule, or NaN mixing weights, before.
        ("recipe.warmup_epochs=inf", "recipe.warmup_epochs=inf"),
        ("recipe.mixup_alpha=inf", "recipe.mixup_alpha=inf"),
        ("recipe.body_lr_scale=inf", "recipe.body_lr_scale=inf"),
        ("recipe.mixup_alpha=nan", "recipe.mixup_alpha=nan"),
        ("recipe.ema=off", "recipe.ema='off'"),
    ],
)
def test_bad_recipe_values_are_one_clear_error(override, named):
    with pytest.raises(SkinclfError, match=f"^{named}: expected"):
        Recipe.from_config(compose_config(["recipe=modern", override]).recipe)


# --- optimizer and parameter groups ------------------------------------------------------------


def test_optimizer_is_adam_for_the_paper_and_adamw_for_modern():
    model = TinyNet()
    paper = build_optimizer(model, 1e-4, 0.0, Recipe())
    assert type(paper) is torch.optim.Adam and len(paper.param_groups) == 1
    assert paper.param_groups[0]["lr"] == 1e-4
    modern = build_optimizer(model, 1e-3, 0.05, MODERN)
    assert type(modern) is torch.optim.AdamW and modern.param_groups[0]["weight_decay"] == 0.05


def test_pretrained_body_trains_at_a_lower_learning_rate():
    model = TinyNet()
    body = list(model.conv.parameters()) + list(model.bn.parameters())
    model.fc.weight.requires_grad_(False)  # frozen parameters are in no group
    optimizer = build_optimizer(model, 1e-3, 0.0, Recipe(body_lr_scale=0.1), pretrained=body)
    head_group, body_group = optimizer.param_groups
    assert [id(p) for p in head_group["params"]] == [id(model.fc.bias)]
    assert {id(p) for p in body_group["params"]} == {id(p) for p in body}
    assert head_group["lr"] == 1e-3 and body_group["lr"] == pytest.approx(1e-4)
    # Without pretrained parameters (random initialisation) everything trains at one rate.
    assert len(build_optimizer(model, 1e-3, 0.0, Recipe(body_lr_scale=0.1)).param_groups) == 1


# --- learning-rate schedule --------------------------------------------------------------------


def test_cosine_schedule_warms_up_then_decays_per_step():
    steps_per_epoch, epochs, lr = 4, 3, 1e-3
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler = build_scheduler(optimizer, MODERN, steps_per_epoch, epochs)
    seen = []
    for _ in range(steps_per_epoch * epochs):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    warmup = [lr * (i + 1) / 4 for i in range(4)]  # one epoch of linear warm-up
    decay = [lr * 0.5 * (1 + math.cos(math.pi * i / 8)) for i in range(8)]  # cosine over the other 8
    assert seen == pytest.approx(warmup + decay)
    assert build_scheduler(optimizer, Recipe(), steps_per_epoch, epochs) is None


def test_a_warm_up_on_the_constant_schedule_rises_then_holds():
    # recipe=paper recipe.warmup_epochs=1 was silently the paper's constant rate.
    steps_per_epoch, epochs, lr = 4, 3, 1e-3
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler = build_scheduler(optimizer, Recipe(warmup_epochs=1), steps_per_epoch, epochs)
    seen = []
    for _ in range(steps_per_epoch * epochs):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx([lr * (i + 1) / 4 for i in range(4)] + [lr] * 8)


def test_loop_steps_the_schedule_every_batch_and_keeps_the_paper_rate_constant(tmp_path):
    # 12 images, batch 4: 3 steps per epoch; the lr column is the rate of each epoch's first step.
    _, _, history = fit_tiny(
        tmp_path / "cosine", Recipe(schedule="cosine", warmup_epochs=3), lr=1e-2, max_epochs=5
    )
    # Warm-up over 9 steps, then a cosine over the last 6: epoch 1 begins at 1/9 of the rate,
    # epoch 4 at the top (cosine at 0/6), epoch 5 half-way down (3/6), never at 0.
    expected = [1e-2 * (step + 1) / 9 for step in (0, 3, 6)] + [
        1e-2 * 0.5 * (1 + math.cos(math.pi * done / 6)) for done in (0, 3)
    ]
    assert history["lr"].tolist() == pytest.approx(expected, abs=1e-12)
    _, _, paper = fit_tiny(tmp_path / "paper", lr=1e-2)
    assert paper["lr"].tolist() == [1e-2, 1e-2]
    assert list(paper.columns) == METRICS_COLUMNS


# --- exponential moving average ------------------------------------------------------------------


def test_ema_follows_the_warmed_up_decay_and_swaps_weights_in_and_out():
    model = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema = WeightEMA(model, decay=0.9)
    expected = torch.zeros(1, 2)
    for step, value in enumerate((1.0, 2.0, 3.0), start=1):
        with torch.no_grad():
            model.weight.fill_(value)
        ema.update(model)
        decay = min(0.9, (1 + step) / (10 + step))
        expected = decay * expected + (1 - decay) * value
    assert torch.allclose(ema.shadow["weight"], expected)
    assert not torch.allclose(ema.shadow["weight"], model.weight)
    with ema.applied(model):
        assert torch.equal(model.weight, ema.shadow["weight"])
    assert torch.equal(model.weight, torch.full((1, 2), 3.0))


def test_loop_with_ema_selects_and_saves_the_averaged_weights(tmp_path):
    model, result, history = fit_tiny(tmp_path, Recipe(ema=True, ema_decay=0.5), max_epochs=1, lr=1e-2)
    assert list(history.columns) == [*METRICS_COLUMNS, "val_loss_raw", "val_acc_raw"]
    best, last = load_checkpoint(tmp_path / "best.pt"), load_checkpoint(tmp_path / "last.pt")
    # last.pt: the raw weights (as the model holds them now) and the EMA; best.pt: the EMA's weights.
    for name, raw in model.state_dict().items():
        assert torch.equal(last["model"][name], raw), name
        assert torch.equal(best["model"][name], last["ema"]["shadow"][name]), name
    assert not torch.equal(best["model"]["fc.weight"], last["model"]["fc.weight"])
    # The validation accuracy the loop selected on is that of the averaged weights.
    model.load_state_dict(best["model"])
    logits = predict_logits(model, DefaultPipeline(), tiny_split(seed=1).images, settings(), CPU)
    acc = ((logits >= 0).float() == tiny_split(seed=1).labels).float().mean().item()
    assert history["val_acc"].iloc[0] == pytest.approx(acc, abs=1e-6)

    _, _, without = fit_tiny(tmp_path / "off", max_epochs=1, lr=1e-2)
    assert "ema" not in load_checkpoint(tmp_path / "off" / "last.pt")
    assert list(without.columns) == METRICS_COLUMNS


def test_resume_continues_schedule_and_ema_exactly(tmp_path):
    recipe = Recipe(optimizer="adamw", schedule="cosine", warmup_epochs=1, ema=True, mixup_alpha=0.4)
    _, _, straight = fit_tiny(tmp_path / "straight", recipe, max_epochs=3, lr=1e-2)
    with pytest.raises(RuntimeError, match="simulated crash"):  # in epoch 3, after last.pt of epoch 2
        fit_tiny(tmp_path / "resumed", recipe, pipeline=CrashingPipeline(batches=7), max_epochs=3, lr=1e-2)
    _, _, resumed = fit_tiny(tmp_path / "resumed", recipe, max_epochs=3, lr=1e-2, resume=True)
    columns = ["epoch", "train_loss", "val_loss", "val_acc", "lr", "val_loss_raw"]
    pd.testing.assert_frame_equal(resumed[columns], straight[columns])
    a, b = (load_checkpoint(tmp_path / d / "last.pt") for d in ("straight", "resumed"))
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"] == 9
    for name, tensor in a["ema"]["shadow"].items():
        assert torch.equal(tensor, b["ema"]["shadow"][name]), name


# --- test-time augmentation ------------------------------------------------------------------------


def test_tta_averages_the_probabilities_of_the_four_flips():
    torch.manual_seed(0)
    model = TinyNet().eval()
    x = torch.randn(5, 3, 8, 8)
    with torch.no_grad():
        views = [x, x.flip(-1), x.flip(-2), x.flip(-1).flip(-2)]
        probs = torch.stack([torch.sigmoid(model(v)) for v in views]).mean(0)
        assert torch.allclose(torch.sigmoid(FlipTTA(model)(x)), probs, atol=1e-6)
        assert not torch.allclose(model(x), FlipTTA(model)(x), atol=1e-3)  # flips matter to this model


def test_evaluation_uses_tta_only_when_on():
    torch.manual_seed(0)
    model, images = TinyNet().eval(), tiny_split().images
    x = DefaultPipeline().eval_batch(images)
    with torch.no_grad():
        plain, averaged = model(x).flatten(), FlipTTA(model)(x).flatten()
    off = predict_logits(model, DefaultPipeline(), images, settings(), CPU)
    on = predict_logits(model, DefaultPipeline(), images, settings(Recipe(tta=True)), CPU)
    assert torch.allclose(off, plain, atol=1e-6) and torch.allclose(on, averaged, atol=1e-5)


# --- mixup -----------------------------------------------------------------------------------------


def test_mixup_mixes_images_and_labels_with_one_weight():
    x, y = torch.randn(16, 3, 4, 4), (torch.arange(16) % 2).float()
    mixed, soft = mixup(x, y, 2.0, torch.Generator().manual_seed(0))  # Beta(2, 2): lam well inside
    # Recover the weight and partner of every row: mixed = lam * x + (1 - lam) * x[j].
    lams = set()
    for i in range(16):
        if torch.allclose(mixed[i], x[i], atol=1e-6):
            continue  # the shuffle paired this image with itself
        fits = []
        for j in set(range(16)) - {i}:
            d = x[i] - x[j]
            lam = float(((mixed[i] - x[j]) * d).sum() / (d * d).sum())
            if torch.allclose(mixed[i], lam * x[i] + (1 - lam) * x[j], atol=1e-5):
                fits.append((lam, j))
        assert len(fits) == 1, f"row {i} is no mix of two images"
        lam, j = fits[0]
        assert soft[i].item() == pytest.approx(lam * y[i].item() + (1 - lam) * y[j].item(), abs=1e-5)
        lams.add(round(lam, 4))
    assert len(lams) == 1 and 0.5 <= lams.pop() < 0.999  # one weight per batch, own image the larger part


@pytest.mark.parametrize("alpha", [0.0, 0.4])
def test_loop_feeds_mixed_batches_only_when_mixup_is_on(tmp_path, alpha):
    seen = []
    model = TinyNet()
    model.conv.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()) if m.training else None)
    fit_tiny(tmp_path, Recipe(mixup_alpha=alpha), model=model, max_epochs=1)
    split = tiny_split()
    order = torch.randperm(len(split), generator=torch.Generator().manual_seed(0))
    first = DefaultPipeline().eval_batch(split.images[order[:4]])
    assert torch.equal(seen[0], first) == (alpha == 0)


# --- dermoscopy augmentation ------------------------------------------------------------------------


def test_dermoscopy_draws_have_the_configured_probabilities_and_ranges():
    aug = DermoscopyAugmentation(DefaultPipeline())
    p = aug.draw(8000, torch.Generator().manual_seed(0))
    assert abs(p.hflip.float().mean() - 0.5) < 0.03 and abs(p.vflip.float().mean() - 0.5) < 0.03
    turns = torch.bincount(p.quarter_turns, minlength=4).float() / 8000
    assert torch.allclose(turns, torch.full((4,), 0.25), atol=0.03)
    width, height = p.crop[:, 0], p.crop[:, 1]
    area, ratio = width * height, width / height
    assert area.min() >= 0.6 - 1e-5 and area.max() <= 1 + 1e-6 and (area < 0.99).float().mean() > 0.9
    assert ratio.min() >= 0.75 - 1e-4 and ratio.max() <= 4 / 3 + 1e-4
    assert (p.crop[:, 2].abs() <= 1 - width + 1e-6).all() and (p.crop[:, 3].abs() <= 1 - height + 1e-6).all()
    # The windows are torchvision's RandomResizedCrop's: a window that does not fit is drawn
    # again, which leaves smaller windows on average than the area drawn, and no more square
    # ones. Uniform over the (area, log ratio) pairs that fit, the mean area is 0.744 (integrated
    # on a grid); clipping such a window instead gave 0.78. torchvision's own windows, drawn on
    # whole pixels (rounding lets 128.4 px fit), average about 0.747.
    fit_area = torch.linspace(0.6, 1, 801)[:, None]
    fit_log_ratio = torch.linspace(math.log(3 / 4), math.log(4 / 3), 801)[None]
    fits = fit_area * fit_log_ratio.abs().exp() <= 1
    assert abs(area.mean() - (fit_area * fits).sum() / fits.sum()) < 0.004
    with torch.random.fork_rng():  # get_params draws from torch's global generator
        torch.manual_seed(0)
        image = torch.zeros(3, 128, 128)
        windows = torch.tensor(
            [RandomResizedCrop.get_params(image, [0.6, 1.0], [3 / 4, 4 / 3])[2:] for _ in range(8000)]
        )
    windows = windows.float() / 128
    tv_area, tv_log_ratio = windows.prod(1), (windows[:, 1] / windows[:, 0]).log().abs()
    assert abs(area.mean() - tv_area.mean()) < 0.008
    assert abs(ratio.log().abs().mean() - tv_log_ratio.mean()) < 0.008
    assert p.colour.min() >= 0.9 - 1e-6 and p.colour.max() <= 1.1 + 1e-6 and p.colour.std() > 0.03

    off = DermoscopyAugmentation(
        DefaultPipeline(),
        flip_p=0,
        rot90=False,
        crop_scale=(1, 1),
        crop_ratio=(1, 1),
        brightness=0,
        contrast=0,
        saturation=0,
    ).draw(500, torch.Generator().manual_seed(0))
    assert not off.hflip.any() and not off.vflip.any() and not off.quarter_turns.any()
    assert (off.crop[:, :2] == 1).all() and (off.colour == 1).all()


def test_dermoscopy_crop_falls_back_to_torchvisions_centre_crop_when_no_window_fits():
    # Ratios 2 to 3 never fit a window of 0.6 of the area or more in a square image.
    wide = DermoscopyAugmentation(DefaultPipeline(), crop_ratio=(2, 3)).draw(50, torch.Generator())
    tall = DermoscopyAugmentation(DefaultPipeline(), crop_ratio=(0.25, 0.5)).draw(50, torch.Generator())
    image = torch.zeros(3, 128, 128)
    for params, ratio in ((wide, [2.0, 3.0]), (tall, [0.25, 0.5])):
        top, left, h, w = RandomResizedCrop.get_params(image, [0.6, 1.0], ratio)
        # (width, height, centre x, centre y): torchvision's window, in [-1, 1] coordinates.
        expected = torch.tensor([w / 128, h / 128, (2 * left + w) / 128 - 1, (2 * top + h) / 128 - 1])
        assert torch.equal(params.crop, expected.expand(50, 4))


def test_dermoscopy_pieces_do_what_they_say():
    x = torch.randint(0, 256, (4, 3, 8, 8)).float()
    n = len(x)
    neutral = dict(
        hflip=torch.zeros(n, dtype=torch.bool),
        vflip=torch.zeros(n, dtype=torch.bool),
        quarter_turns=torch.zeros(n, dtype=torch.long),
        crop=torch.tensor([[1.0, 1.0, 0.0, 0.0]] * n),
        colour=torch.ones(n, 3),
    )
    assert torch.equal(apply_augmentation(x, AugmentParams(**neutral)), x)
    pick = torch.tensor([True, False, True, False])
    out = apply_augmentation(x, AugmentParams(**{**neutral, "hflip": pick}))
    assert torch.equal(out[0], x[0].flip(-1)) and torch.equal(out[1], x[1])
    out = apply_augmentation(x, AugmentParams(**{**neutral, "vflip": pick}))
    assert torch.equal(out[2], x[2].flip(-2)) and torch.equal(out[3], x[3])
    out = apply_augmentation(x, AugmentParams(**{**neutral, "quarter_turns": torch.tensor([0, 1, 2, 3])}))
    for k in range(4):
        assert torch.equal(out[k], torch.rot90(x[k], k, dims=(-2, -1)))
    # The top-left 4x4 quarter resized back to 8x8 (bilinear). At the image's edge (row and
    # column 0) the warp repeats the edge pixels, as the resize does, instead of blending black;
    # at the window's inner edge (row and column 7) it also sees the pixels beyond the window,
    # which a crop-then-resize cannot, so those are left out.
    crop = torch.tensor([[0.5, 0.5, -0.5, -0.5]] * n)
    out = apply_augmentation(x, AugmentParams(**{**neutral, "crop": crop}))
    resized = torch.nn.functional.interpolate(x[:, :, :4, :4], size=8, mode="bilinear", align_corners=False)
    assert torch.allclose(out[:, :, :7, :7], resized[:, :, :7, :7], atol=1e-3)
    brighter = apply_augmentation(x, AugmentParams(**{**neutral, "colour": torch.tensor([[1.1, 1, 1]] * n)}))
    assert torch.allclose(brighter, (x * 1.1).clamp(0, 255))
    gray = apply_augmentation(x, AugmentParams(**{**neutral, "colour": torch.tensor([[1, 1, 0.0]] * n)}))
    assert torch.allclose(gray[:, 0], gray[:, 1]) and torch.allclose(gray[:, 1], gray[:, 2])


def sequential_augmentation(x, params):
    """The dermoscopy augmentation written plainly, one piece after the other on float NCHW
    images: crop (torch's affine_grid), flips, quarter turns (torch.rot90), colour jitter."""
    n = len(x)
    width, height, cx, cy = params.crop.unbind(1)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = width, cx, height, cy
    grid = torch.nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
    x = torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    x = torch.where(params.hflip.view(n, 1, 1, 1), x.flip(-1), x)
    x = torch.where(params.vflip.view(n, 1, 1, 1), x.flip(-2), x)
    x = torch.stack(
        [torch.rot90(image, int(k), dims=(-2, -1)) for image, k in zip(x, params.quarter_turns, strict=True)]
    )
    brightness, contrast, saturation = (f.view(n, 1, 1, 1) for f in params.colour.unbind(1))
    luma = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    x = (x * brightness).clamp(0, 255)
    mean = (x * luma).sum(1, keepdim=True).mean(dim=(2, 3), keepdim=True)
    x = ((x - mean) * contrast + mean).clamp(0, 255)
    gray = (x * luma).sum(1, keepdim=True)
    return ((x - gray) * saturation + gray).clamp(0, 255)


def test_dermoscopy_one_warp_equals_the_pieces_one_after_the_other():
    # Crop, flips and turns are composed into one map per image; with every piece drawn at
    # random, that must be the crop, then the flips, then the turn, then the colour jitter.
    images = torch.randint(
        0, 256, (64, 3, 16, 16), generator=torch.Generator().manual_seed(7), dtype=torch.uint8
    )
    params = DermoscopyAugmentation(AugmentedPipeline()).draw(64, torch.Generator().manual_seed(8))
    assert params.hflip.any() and params.vflip.any() and params.quarter_turns.ne(0).any()
    out = apply_augmentation(images, params)
    torch.testing.assert_close(out, sequential_augmentation(images.float(), params), rtol=0, atol=0.02)


def test_dermoscopy_batches_warp_in_chunks_without_changing_an_image(monkeypatch):
    # On the CPU the batch is augmented a few images at a time (for the caches): each image keeps
    # its own draws and row whatever the chunk size; 50 images, so the last chunk is partial.
    images = torch.randint(
        0, 256, (50, 3, 16, 16), generator=torch.Generator().manual_seed(7), dtype=torch.uint8
    )
    pipeline = DermoscopyAugmentation(AugmentedPipeline())
    pipeline.fit(images)
    whole, *chunked = batches_by_warp_chunk(
        monkeypatch, lambda: pipeline.train_batch(images, torch.Generator().manual_seed(8))
    )
    # The draws did turn, flip and jitter images: the chunks had something to get wrong.
    params = pipeline.draw(50, torch.Generator().manual_seed(8))
    assert params.quarter_turns.ne(0).any() and params.hflip.any() and params.colour.ne(1).any()
    for out in chunked:
        assert out.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(out, whole, rtol=0, atol=5e-4)


def test_dermoscopy_pipeline_keeps_the_base_normalisation_and_never_augments_evaluation():
    images = tiny_split(n=8).images
    base = AugmentedPipeline()
    pipeline = DermoscopyAugmentation(base)
    pipeline.fit(images)
    assert torch.equal(pipeline.state_dict()["mean"], base.mean) and base.mean.ne(0).all()
    assert torch.equal(pipeline.eval_batch(images), base.eval_batch(images))
    a = pipeline.train_batch(images, torch.Generator().manual_seed(3))
    b = pipeline.train_batch(images, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and not torch.allclose(a, base.eval_batch(images))


def test_recipe_pipeline_wraps_only_when_enabled_and_names_bad_keys():
    base = DefaultPipeline()
    augment = dict(compose_config(["recipe=modern"]).recipe.augment)
    assert recipe_pipeline(base, {**augment, "enabled": False}) is base
    assert isinstance(recipe_pipeline(base, augment), DermoscopyAugmentation)
    with pytest.raises(SkinclfError, match="recipe.augment.flip_p=2: expected"):
        recipe_pipeline(base, {**augment, "flip_p": 2})
    with pytest.raises(SkinclfError, match="recipe.augment: .*hue"):
        recipe_pipeline(base, {**augment, "hue": 0.1})


@pytest.mark.parametrize(
    ("override", "message"),
    [
        # A string counted as true: "off" switched the augmentation, or the rotations, on.
        ("enabled=off", "recipe.augment.enabled='off': expected true or false"),
        ("rot90=off", "recipe.augment.rot90='off': expected true or false"),
        ("flip_p=abc", r"recipe.augment.flip_p='abc': expected a probability in \[0, 1\]"),
        ("flip_p=inf", "recipe.augment.flip_p=inf: expected"),
        ("brightness=nan", "recipe.augment.brightness=nan: expected a number in"),
        (
            "crop_ratio=[0.5,abc]",
            r"recipe.augment.crop_ratio=\[0.5, 'abc'\]: expected \[lo, hi\] with 0 < lo",
        ),
        ("crop_scale=0.5", r"recipe.augment.crop_scale=0.5: expected \[lo, hi\] with 0 < lo <= hi <= 1"),
        ("crop_scale=[0.5,1,2]", r"recipe.augment.crop_scale=\[0.5, 1, 2\]: expected \[lo, hi\]"),
        ("crop_scale=[0.8,0.5]", r"recipe.augment.crop_scale=\[0.8, 0.5\]: expected"),
    ],
)
@pytest.mark.parametrize("recipe", ["modern", "paper"])  # paper: augmentation off, values checked
def test_bad_augment_values_are_one_clear_error(override, message, recipe):
    cfg = compose_config([f"recipe={recipe}", f"recipe.augment.{override}"])
    with pytest.raises(SkinclfError, match=f"^{message}"):
        recipe_pipeline(DefaultPipeline(), cfg.recipe.augment)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"p": -0.1}, r"model.pipeline.p=-0.1: expected a probability in \[0, 1\]"),
        ({"p": "half"}, r"model.pipeline.p='half': expected a probability"),
        ({"max_rotation_degrees": 270}, "model.pipeline.max_rotation_degrees=270: expected 0 to 180"),
        ({"crop_scale": [0.5]}, r"model.pipeline.crop_scale=\[0.5\]: expected \[lo, hi\]"),
        ({"crop_scale": [1.0, 0.75]}, r"model.pipeline.crop_scale=\[1.0, 0.75\]: expected .* of the side"),
    ],
)
def test_bad_paper_augmentation_options_are_one_clear_error(options, message):
    with pytest.raises(SkinclfError, match=f"^{message}"):
        AugmentedPipeline(**options)
    assert AugmentedPipeline(p=1, max_rotation_degrees=0, crop_scale=[1, 1]).crop_scale == (1.0, 1.0)


def test_augment_switches_take_booleans():
    cfg = compose_config(["recipe=modern", "recipe.augment.rot90=false"])
    pipeline = recipe_pipeline(DefaultPipeline(), cfg.recipe.augment)
    assert pipeline.rot90 is False and pipeline.crop_scale == (0.6, 1.0)
    off = compose_config(["recipe=modern", "recipe.augment.enabled=false"]).recipe.augment
    assert isinstance(recipe_pipeline(DefaultPipeline(), off), DefaultPipeline)


# --- whole runs --------------------------------------------------------------------------------------


def test_modern_run_in_process_writes_ema_scores_and_recipe_state(tmp_path, shared_data_dir):
    out, metrics = train_in_process(
        tmp_path, "model=res_aug", "recipe=modern", *TINY, f"data.cache_dir={shared_data_dir}"
    )
    history = pd.read_csv(out / "metrics.csv")
    assert list(history.columns) == [*METRICS_COLUMNS, "val_loss_raw", "val_acc_raw"]
    last = load_checkpoint(out / "last.pt")
    assert {"scheduler", "ema"} <= set(last) and last["config"]["recipe"]["name"] == "modern"
    test = pd.read_csv(out / "predictions.csv").query("split == 'test'")
    assert metrics["n_test"] == len(test) == 32
    assert metrics["accuracy"] == pytest.approx(((test["prob_mel"] >= 0.5) == test["label"]).mean())


@pytest.mark.slow
def test_modern_recipe_cli_one_epoch(tmp_path):
    proc = train_cli(
        "model=res_aug", "recipe=modern", *TINY, f"data.cache_dir={tmp_path / 'data'}", cwd=tmp_path
    )
    run = run_dir_from_output(proc.stdout)
    assert (run / "test_metrics.json").is_file()
    assert "raw-weights val_acc" in (run / "train.log").read_text()
