"""Batch pipelines and the fast path: augmentation probabilities, train-only augmentation and
statistics, and precision / memory-format choices applied as configured."""

import math

import pytest
import torch

from skinclf.config import compose_config
from skinclf.data.pipeline import AugmentedPipeline, DefaultPipeline, ImageNetPipeline, channel_stats
from skinclf.data.splits import ImageSplits, Split
from skinclf.data.synthetic import generate_split
from skinclf.errors import SkinclfError
from skinclf.models.resnet import ShallowResNet
from skinclf.models.simple_cnn import SimpleCNN
from skinclf.train import prepare_training
from skinclf.training.hardware import autocast, resolve_precision
from skinclf.training.loop import LoopSettings, fit

from conftest import batches_by_warp_chunk

N = 2000


def changed_fraction(pipeline: AugmentedPipeline, images: torch.Tensor, seed: int = 0) -> float:
    generator = torch.Generator().manual_seed(seed)
    out = pipeline.train_batch(images, generator)
    plain = pipeline.eval_batch(images)
    return ((out - plain).abs().amax(dim=(1, 2, 3)) > 1e-3).float().mean().item()


def patterned_images(n: int, symmetric: bool) -> torch.Tensor:
    """16x16 images with structure everywhere; left-right symmetric ones are unchanged by a flip."""
    base = torch.randint(0, 256, (3, 16, 16), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    if symmetric:
        base = torch.maximum(base, base.flip(-1))
    return base.expand(n, 3, 16, 16).contiguous()


@pytest.mark.parametrize(
    ("transform", "settings", "symmetric"),
    [
        ("flip", {"max_rotation_degrees": 0.0, "crop_scale": (1.0, 1.0)}, False),
        ("rotation", {"max_rotation_degrees": 30.0, "crop_scale": (1.0, 1.0)}, True),
        ("crop", {"max_rotation_degrees": 0.0, "crop_scale": (0.5, 0.8)}, True),
    ],
)
def test_each_transform_hits_about_half_the_images(transform, settings, symmetric):
    pipeline = AugmentedPipeline(p=0.5, **settings)
    fraction = changed_fraction(pipeline, patterned_images(N, symmetric))
    assert 0.45 < fraction < 0.55, f"{transform} applied to {fraction:.3f} of the images"


def test_transforms_are_independent():
    # All three on: an image stays untouched only if none fires, probability 0.5^3 (symmetric
    # images hide flips, so there: 0.5^2).
    pipeline = AugmentedPipeline(p=0.5, max_rotation_degrees=30.0, crop_scale=(0.5, 0.8))
    assert 1 - changed_fraction(pipeline, patterned_images(N, symmetric=False)) == pytest.approx(
        0.125, abs=0.03
    )
    assert 1 - changed_fraction(pipeline, patterned_images(N, symmetric=True)) == pytest.approx(
        0.25, abs=0.035
    )


def test_draws_rotate_both_ways_and_crop_within_the_scale_range_independently():
    # The other tests warp with pipeline.draw's own choices, so they cannot see a bug inside it:
    # here the draws themselves, over many images. Rotation: uniform in [-max, +max] where it
    # fires (about half clockwise), 0 elsewhere; crop: a scale in crop_scale where it fires, 1
    # elsewhere; angle and scale from separate random numbers.
    pipeline = AugmentedPipeline(p=0.5, max_rotation_degrees=30.0, crop_scale=(0.5, 0.8))
    n, max_angle = 20000, math.radians(30.0)
    flip, warp, angle, scale, offset = pipeline.draw(n, torch.Generator().manual_seed(0))
    rotated, cropped = angle != 0, scale != 1
    assert rotated.float().mean().item() == pytest.approx(0.5, abs=0.02)
    assert cropped.float().mean().item() == pytest.approx(0.5, abs=0.02)
    assert (rotated & cropped).float().mean().item() == pytest.approx(0.25, abs=0.02)
    assert torch.equal(warp, rotated | cropped)
    turns = angle[rotated]
    assert (turns < 0).float().mean().item() == pytest.approx(0.5, abs=0.03)
    assert (
        turns.abs().max() <= max_angle and turns.min() < -0.95 * max_angle and turns.max() > 0.95 * max_angle
    )
    assert turns.mean().item() == pytest.approx(0.0, abs=0.03 * max_angle)
    crops = scale[cropped]
    assert crops.min() >= 0.5 and crops.max() <= 0.8
    assert crops.mean().item() == pytest.approx(0.65, abs=0.01)
    # The crop window stays inside the image; an uncropped image is not moved.
    assert (offset.abs() <= (1 - scale).unsqueeze(1) + 1e-6).all()
    assert (offset[~cropped] == 0).all()
    both = rotated & cropped
    correlation = torch.corrcoef(torch.stack([angle[both], scale[both]]))[0, 1].item()
    assert abs(correlation) < 0.05, f"angle and scale correlate: {correlation:.3f}"


def test_imagenet_pipeline_normalises_with_the_imagenet_statistics():
    # The constants pretrained backbones were trained with, channel by channel (R, G, B).
    pipeline = ImageNetPipeline()
    assert pipeline.mean.tolist() == pytest.approx([0.485, 0.456, 0.406])
    assert pipeline.std.tolist() == pytest.approx([0.229, 0.224, 0.225])
    # A mid-grey pixel of 0.5 comes out as (0.5 - mean) / std in each channel.
    out = pipeline.eval_batch(torch.full((1, 3, 2, 2), 0.5 * 255))
    expected = [(0.5 - m) / s for m, s in zip((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), strict=True)]
    assert out[0, :, 0, 0].tolist() == pytest.approx(expected, abs=1e-5)


def test_a_crop_scale_whose_low_end_is_above_its_high_end_is_refused():
    # [0.9, 0.5] would sample scales from an inverted range without complaint.
    with pytest.raises(
        SkinclfError, match=r"^model\.pipeline\.crop_scale=\[0\.9, 0\.5\]: expected \[lo, hi\]"
    ):
        AugmentedPipeline(crop_scale=[0.9, 0.5])
    assert AugmentedPipeline(crop_scale=[0.7, 0.7]).crop_scale == (0.7, 0.7)


def test_each_output_row_is_its_own_image_plain_or_flipped():
    # Every image goes through the warp; with rotation and crop off, its map is the identity or
    # the flip, which land on pixel centres: each row must be its own image, plain or mirrored.
    pipeline = AugmentedPipeline(p=0.5, max_rotation_degrees=0.0, crop_scale=(1.0, 1.0))
    images = torch.randint(
        0, 256, (64, 3, 16, 16), generator=torch.Generator().manual_seed(2), dtype=torch.uint8
    )
    out = pipeline.train_batch(images, torch.Generator().manual_seed(0))
    plain, flipped = pipeline.eval_batch(images), pipeline.eval_batch(images.flip(-1))
    # Float rounding only: the warp is exact here, the normalisation rounds twice instead of once.
    same = ((out - plain).abs() < 1e-5).flatten(1).all(1)
    mirrored = ((out - flipped).abs() < 1e-5).flatten(1).all(1)
    assert (same | mirrored).all()
    assert 16 < int(mirrored.sum()) < 48
    assert out.is_contiguous(memory_format=torch.channels_last)


def textbook_augmented_batch(pipeline, images, generator):
    """The augmentation written plainly, in float32: flips and warps of just the chosen images,
    one after the other, with torch's affine_grid and a broadcast normalisation. The same draws."""
    x = images.to(torch.float32, memory_format=torch.contiguous_format)
    flip, warp, angle, scale, offset = pipeline.draw(len(x), generator)
    x[flip] = x[flip].flip(-1)
    a, s = angle[warp], scale[warp]
    theta = torch.stack(
        [
            torch.stack([s * a.cos(), -s * a.sin(), offset[warp, 0]], dim=1),
            torch.stack([s * a.sin(), s * a.cos(), offset[warp, 1]], dim=1),
        ],
        dim=1,
    )
    grid = torch.nn.functional.affine_grid(theta, list(x[warp].shape), align_corners=False)
    x[warp] = torch.nn.functional.grid_sample(x[warp], grid, mode="bilinear", align_corners=False)
    return (x / 255 - pipeline.mean.view(1, 3, 1, 1)) / pipeline.std.view(1, 3, 1, 1)


@pytest.mark.parametrize(
    ("dtype", "tolerance"),
    [
        # float32: the grids differ in the last bit (affine_grid's base points come from linspace).
        (torch.float32, {"rtol": 0, "atol": 5e-4}),
        # bfloat16: at most one unit in the last place (2^-7 relative) from rounding.
        (torch.bfloat16, {"rtol": 2**-7, "atol": 5e-4}),
    ],
)
def test_batch_augmentation_equals_the_textbook_one(dtype, tolerance):
    # The pipeline composes flip, rotation and crop into one map per image and warps the whole
    # batch at once; image by image, that must be the plain flip-then-warp of the chosen images.
    split = generate_split(seed=0, split_index=0, n=64)
    pipeline = AugmentedPipeline()
    pipeline.fit(split.images)
    fast = pipeline.train_batch(split.images, torch.Generator().manual_seed(5), dtype)
    plain = textbook_augmented_batch(pipeline, split.images, torch.Generator().manual_seed(5))
    assert fast.dtype == dtype
    torch.testing.assert_close(fast.float(), plain.to(dtype).float(), **tolerance)


def test_batch_augmentation_on_non_square_images_of_any_size():
    # 24 x 40: width and height must not be swapped in the grid, and sizes that are not powers
    # of two (pixel centres no longer exact in float32) still match within float rounding.
    images = torch.randint(
        0, 256, (32, 3, 24, 40), generator=torch.Generator().manual_seed(4), dtype=torch.uint8
    )
    pipeline = AugmentedPipeline()
    pipeline.fit(images)
    fast = pipeline.train_batch(images, torch.Generator().manual_seed(6))
    plain = textbook_augmented_batch(pipeline, images, torch.Generator().manual_seed(6))
    assert fast.shape == (32, 3, 24, 40)
    torch.testing.assert_close(fast, plain, rtol=0, atol=5e-4)


def test_augmentation_is_deterministic_from_the_generator():
    pipeline = AugmentedPipeline()
    images = patterned_images(64, symmetric=False)
    a = pipeline.train_batch(images, torch.Generator().manual_seed(3))
    b = pipeline.train_batch(images, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("dtype", "tolerance"),
    [(torch.float32, {"rtol": 0, "atol": 5e-4}), (torch.bfloat16, {"rtol": 2**-7, "atol": 5e-4})],
)
def test_warping_in_chunks_changes_no_image(monkeypatch, dtype, tolerance):
    # On the CPU the batch warps a few images at a time, for the caches' sake: each image must
    # still get its own draws and land in its own row, whatever the chunk size. 50 images: the
    # last chunk is a partial one. Values may differ in the last bits only (the sampling grid's
    # matrix product rounds differently for different row counts).
    split = generate_split(seed=0, split_index=0, n=50)
    pipeline = AugmentedPipeline()
    pipeline.fit(split.images)
    whole, *chunked = batches_by_warp_chunk(
        monkeypatch, lambda: pipeline.train_batch(split.images, torch.Generator().manual_seed(7), dtype)
    )
    for out in chunked:
        assert out.dtype == dtype and out.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(out.float(), whole.float(), **tolerance)


def test_statistics_come_from_the_training_split_and_eval_is_never_augmented():
    train = torch.randint(0, 128, (50, 3, 16, 16), dtype=torch.uint8)
    val = torch.randint(128, 256, (20, 3, 16, 16), dtype=torch.uint8)
    pipeline = AugmentedPipeline()
    pipeline.fit(train)
    as_float = train.double() / 255
    assert torch.allclose(pipeline.mean.double(), as_float.mean(dim=(0, 2, 3)), atol=1e-5)
    assert torch.allclose(pipeline.std.double(), as_float.std(dim=(0, 2, 3), unbiased=False), atol=1e-5)
    # Evaluation batches: normalisation only, identical every time.
    expected = (val.float() / 255 - pipeline.mean.view(1, 3, 1, 1)) / pipeline.std.view(1, 3, 1, 1)
    assert torch.allclose(pipeline.eval_batch(val), expected, atol=1e-5)
    assert torch.equal(pipeline.eval_batch(val), pipeline.eval_batch(val))


@pytest.mark.parametrize("overrides", [["model=augmented"], ["model=res_aug", "recipe=modern"]])
def test_a_run_normalises_with_the_training_splits_statistics(tmp_path, overrides):
    # What a run (and a grid-search fold) fits its pipeline on: the training split, whose pixels
    # are darker here than the validation split's, also under the modern recipe's augmentation.
    g = torch.Generator().manual_seed(0)
    train = torch.randint(0, 128, (16, 3, 8, 8), dtype=torch.uint8, generator=g)
    val = torch.randint(128, 256, (8, 3, 8, 8), dtype=torch.uint8, generator=g)
    splits = ImageSplits("x", Split(train, torch.arange(16.0) % 2), Split(val, torch.arange(8.0) % 2))
    cfg = compose_config([*overrides, f"data.cache_dir={tmp_path}"])
    _, stage = prepare_training(cfg, splits, LoopSettings(), torch.device("cpu"))
    mean, std = channel_stats(train)
    assert torch.equal(stage.pipeline.state_dict()["mean"], mean)
    assert torch.equal(stage.pipeline.state_dict()["std"], std)


def test_default_pipeline_scales_to_unit_range():
    images = torch.tensor([0, 255], dtype=torch.uint8).view(2, 1, 1, 1).expand(2, 3, 4, 4)
    out = DefaultPipeline().eval_batch(images)
    assert out[0].max() == 0 and out[1].min() == 1


def test_channel_stats_of_constant_images():
    mean, std = channel_stats(torch.full((4, 3, 8, 8), 51, dtype=torch.uint8))
    assert torch.allclose(mean, torch.full((3,), 0.2)) and torch.all(std < 1e-3)


def test_precision_auto_uses_bf16_only_where_native(monkeypatch):
    import skinclf.training.hardware as hardware

    cpu = torch.device("cpu")
    for native, expected in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda native=native: native)
        assert resolve_precision("auto", cpu) == expected
    assert resolve_precision("fp32", cpu) == "fp32"

    # On CUDA: by the compute capability of the GPU the run uses, not of the current one; a T4 (7.5)
    # would only emulate bf16, which torch.cuda.is_bf16_supported() counts as supported.
    asked = []
    capabilities = {0: (9, 0), 1: (7, 5), 2: (8, 0)}
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(
        torch.cuda, "get_device_capability", lambda d: asked.append(d) or capabilities[d.index]
    )
    picked = [resolve_precision("auto", torch.device(f"cuda:{i}")) for i in (1, 2, 0)]
    assert picked == ["fp32", "bf16", "bf16"] and [d.index for d in asked] == [1, 2, 0]


@pytest.mark.parametrize(
    ("precision", "channels_last"), [("fp32", False), ("bf16", True), ("fp32", True), ("fp16", True)]
)
def test_loop_feeds_the_configured_dtype_and_memory_format(tmp_path, precision, channels_last, monkeypatch):
    seen, modes = [], []
    model = SimpleCNN()
    model[0].register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    # Evaluation batches (model in eval mode) run under inference_mode, training batches do not.
    model[0].register_forward_pre_hook(
        lambda m, _: modes.append((m.training, torch.is_inference_mode_enabled()))
    )
    scalers = []
    real_scaler = torch.amp.GradScaler
    monkeypatch.setattr(
        torch.amp, "GradScaler", lambda *a, **k: scalers.append(real_scaler(*a, **k)) or scalers[-1]
    )
    images = torch.randint(0, 256, (8, 3, 128, 128), dtype=torch.uint8)
    split = Split(images, torch.tensor([0.0, 1.0] * 4))
    settings = LoopSettings(max_epochs=1, batch_size=4, precision=precision, channels_last=channels_last)
    settings.progress = "never"
    fit(model, DefaultPipeline(), split, split, settings, torch.device("cpu"), tmp_path)
    expected_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    assert all(x.dtype == expected_dtype for x in seen)
    assert {True, False} == {training for training, _ in modes}
    assert all(inference == (not training) for training, inference in modes)
    # fp16 gradients are scaled against underflow; the other precisions need no scaler.
    assert [scaler.is_enabled() for scaler in scalers] == [precision == "fp16"]
    # Training and evaluation batches alike, in the configured layout (plain NCHW when off).
    layout = torch.channels_last if channels_last else torch.contiguous_format
    assert len(seen) > 2 and all(x.is_contiguous(memory_format=layout) for x in seen)
    assert model[0].weight.is_contiguous(memory_format=torch.channels_last) == channels_last


# No dropout here: its random mask is drawn differently for bf16 and fp32 activations.
@pytest.mark.parametrize(
    "make_model",
    [
        SimpleCNN,
        lambda: SimpleCNN(norm="group"),
        lambda: SimpleCNN(norm="layer"),
        lambda: ShallowResNet(dropout=0.0),
    ],
    ids=["baseline", "group_norm", "layer_norm", "resnet"],
)
def test_fast_path_matches_fp32_within_bf16_tolerance(make_model):
    torch.manual_seed(0)
    reference = make_model().train()
    fast = make_model().train()
    fast.load_state_dict(reference.state_dict())
    fast.to(memory_format=torch.channels_last)
    # Real lesion-like images: random noise images give near-identical logits whose gradients
    # cancel across the batch, which would measure the cancellation, not the precision.
    split = generate_split(seed=0, split_index=0, n=16)
    x, y = DefaultPipeline().eval_batch(split.images).contiguous(), split.labels
    results = []
    for model, inputs, precision in (
        (reference, x, "fp32"),
        (fast, x.to(torch.bfloat16).contiguous(memory_format=torch.channels_last), "bf16"),
    ):
        with autocast(precision, torch.device("cpu"))():
            logits = model(inputs).flatten()
        torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), y).backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters()])
        results.append((logits.float().detach(), grads))
    (ref_logits, ref_grads), (fast_logits, fast_grads) = results
    assert torch.allclose(fast_logits, ref_logits, atol=0.05, rtol=0.05)
    cosine = torch.nn.functional.cosine_similarity(ref_grads, fast_grads, dim=0)
    assert cosine > 0.99
    assert (fast_grads - ref_grads).norm() / ref_grads.norm() < 0.15


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_augmentation_on_the_gpu_equals_the_cpus():
    # The draws come from the CPU generator either way; only the warp runs on the device.
    split = generate_split(seed=0, split_index=0, n=64)
    pipeline = AugmentedPipeline()
    pipeline.fit(split.images)
    cpu = pipeline.train_batch(split.images, torch.Generator().manual_seed(5))
    gpu = pipeline.train_batch(split.images.cuda(), torch.Generator().manual_seed(5))
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=0, atol=5e-4)
