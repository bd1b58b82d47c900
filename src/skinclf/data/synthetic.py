"""Built-in synthetic dermoscopy-like images, so that skinclf runs with no download.

NOT real patients and not a benchmark: each image is drawn from a latent "malignancy" score z
(MEL: z ~ N(+SEPARATION, 1), NV: z ~ N(-SEPARATION, 1)) that drives size, border irregularity,
asymmetry and colour variegation, each with its own noise. The two score distributions overlap,
so the classes are separable only up to a Bayes accuracy well below 100%, like real MEL vs NV.
Nuisances unrelated to the label: skin tone, lesion position, lighting, vignetting, hair, noise.
"""

from __future__ import annotations

import hashlib
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from skinclf import IMAGE_SIZE
from skinclf.config import data_path, number_setting
from skinclf.data.splits import SPLIT_NAMES, ImageSplits, Split
from skinclf.errors import SkinclfError
from skinclf.io import remove_stale_cache_temporaries, save_cache

log = logging.getLogger(__name__)

# Bump when the drawing code changes, so that cached images are regenerated.
GENERATOR_VERSION = 2
SEPARATION = 1.2

_SKIN_LIGHT = np.array([236.0, 200.0, 178.0])
_SKIN_DARK = np.array([150.0, 105.0, 80.0])
_NEVUS_BROWN = np.array([[165.0, 112.0, 75.0], [105.0, 65.0, 42.0]])
_MEL_COLOURS = np.array(
    [
        [45.0, 30.0, 28.0],  # black-brown
        [95.0, 100.0, 120.0],  # blue-grey veil
        [170.0, 80.0, 75.0],  # red / pink
    ]
)


# Images drawn ahead of their painting at most: bounds the memory their drawn noise takes.
_CHUNK = 64

Waves = list[tuple[float, float, float]]


@dataclass
class LesionDraws:
    """Everything random about one image, drawn from the generator in a fixed order; painting
    the image (:func:`paint_lesion`) then draws nothing, so images can be painted in parallel."""

    skin: np.ndarray  # (3,) RGB of the background skin
    light_waves: Waves  # uneven lighting
    center: tuple[float, float]
    radius: float
    elong: float
    rot: float
    border_terms: list[tuple[float, float]]  # (amplitude, phase) of the border's harmonics 2..7
    asymmetry: tuple[float, float]  # (amplitude, phase) of the one-sided bulge
    edge_width: float
    lesion: np.ndarray  # (3,) RGB of the nevus brown
    lesion_waves: Waves  # texture of the lesion's colour
    variegation: float
    colour_waves: list[Waves]  # where each of _MEL_COLOURS shows
    hairs: list[tuple[float, float, float, float, float]]  # (angle, y, x, curvature, width)
    rim: float  # radius scale of the dermoscope's field of view
    noise: np.ndarray  # (size, size, 3) sensor noise


def _draw_waves(rng: np.random.Generator, n: int = 4) -> Waves:
    """(frequency, direction, phase) of each of a smooth field's ``n`` plane waves."""
    return [(rng.uniform(1.5, 6.0), rng.uniform(0, 2 * np.pi), rng.uniform(0, 2 * np.pi)) for _ in range(n)]


def _smooth_field(waves: Waves, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """A smooth random field in about [-1, 1]: a sum of a few low-frequency plane waves."""
    field = np.zeros_like(xx)
    for frequency, angle, phase in waves:
        freq = frequency * 2 * np.pi / IMAGE_SIZE
        field += np.cos(freq * (np.cos(angle) * xx + np.sin(angle) * yy) + phase)
    return field / np.sqrt(len(waves))


def draw_lesion_randomness(
    rng: np.random.Generator,
    label: int,
    size: int = IMAGE_SIZE,
    center: tuple[float, float] | None = None,
) -> LesionDraws:
    """The random choices of one image of class ``label`` (1 = MEL), driven by its latent score z."""
    z = rng.normal(SEPARATION if label == 1 else -SEPARATION, 1.0)
    # Background skin: tone, smooth lighting, dermoscope vignetting.
    tone = rng.uniform(0, 1) ** 1.5
    skin = _SKIN_LIGHT * (1 - tone) + _SKIN_DARK * tone
    light_waves = _draw_waves(rng, 2)
    if center is None:
        center = (size / 2 + rng.uniform(-14, 14), size / 2 + rng.uniform(-14, 14))
    # Shape: radius, elongation and a wavy border, larger and more irregular with z.
    radius = np.clip(25 + 5.5 * z + rng.normal(0, 3.5), 9, 52)
    elong = np.clip(1.12 + 0.08 * z + rng.normal(0, 0.08), 1.0, 1.7)
    wobble = np.clip(0.07 + 0.045 * z + rng.normal(0, 0.025), 0.0, 0.3)
    rot = rng.uniform(0, np.pi)
    border_terms = [
        (wobble * rng.normal(0, 1) / np.sqrt(k - 1), rng.uniform(0, 2 * np.pi)) for k in range(2, 8)
    ]
    # Asymmetry: one side of the lesion reaches further out than the other.
    asymmetry = (np.clip(0.08 * z + rng.normal(0, 0.05), 0, 0.35), rng.uniform(0, 2 * np.pi))
    edge_width = np.clip(1.5 + 0.8 * z + rng.normal(0, 0.6), 0.6, 5.0)
    # Colour: nevi are an even brown; with z, patches of black, blue-grey and red appear.
    lesion = _NEVUS_BROWN[0] + (_NEVUS_BROWN[1] - _NEVUS_BROWN[0]) * rng.uniform(0, 1)
    lesion_waves = _draw_waves(rng)
    variegation = 1 / (1 + np.exp(-(1.6 * z + rng.normal(0, 0.9) - 0.8)))
    colour_waves = [_draw_waves(rng) for _ in _MEL_COLOURS]
    # Hair: a few thin dark curved strokes across the image.
    hairs = []
    for _ in range(rng.poisson(1.2)):
        angle = rng.uniform(0, np.pi)
        py, px = rng.uniform(0, size, 2)
        hairs.append((angle, py, px, rng.normal(0, 0.004), rng.uniform(0.5, 1.1)))
    rim = size * rng.uniform(0.62, 0.85)
    noise = rng.normal(0, 4.0, (size, size, 3))
    return LesionDraws(
        skin, light_waves, center, radius, elong, rot, border_terms, asymmetry, edge_width,
        lesion, lesion_waves, variegation, colour_waves, hairs, rim, noise,
    )  # fmt: skip


def paint_lesion(d: LesionDraws, size: int = IMAGE_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """The image those choices describe. Returns (uint8 HxWx3 image, bool lesion mask)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    img = np.broadcast_to(d.skin, (size, size, 3)).copy()
    img *= (1 + 0.06 * _smooth_field(d.light_waves, yy, xx))[..., None]
    cy, cx = d.center
    dy, dx = yy - cy, xx - cx
    u = np.cos(d.rot) * dx + np.sin(d.rot) * dy
    v = (-np.sin(d.rot) * dx + np.cos(d.rot) * dy) * d.elong
    theta = np.arctan2(v, u)
    dist = np.hypot(u, v)
    border = np.ones_like(theta)
    for k, (amplitude, phase) in enumerate(d.border_terms, start=2):
        border += amplitude * np.cos(k * theta + phase)
    amplitude, phase = d.asymmetry
    border += amplitude * np.cos(theta - phase)
    alpha = 1 / (1 + np.exp((dist - d.radius * border) / d.edge_width))

    lesion_img = np.broadcast_to(d.lesion, (size, size, 3)).copy()
    lesion_img *= (1 + 0.05 * _smooth_field(d.lesion_waves, yy, xx))[..., None]
    for colour, waves in zip(_MEL_COLOURS, d.colour_waves, strict=True):
        weight = (
            np.clip(_smooth_field(waves, yy, xx) + 1.3 * d.variegation - 1.1, 0, 1)[..., None] * d.variegation
        )
        lesion_img = lesion_img * (1 - weight) + colour * weight
    # Darker centre, as in most pigmented lesions.
    lesion_img *= (1 - 0.15 * np.exp(-((dist / max(d.radius, 1)) ** 2)))[..., None]
    img = img * (1 - alpha[..., None]) + lesion_img * alpha[..., None]

    for angle, py, px, curvature, width in d.hairs:
        normal = -np.sin(angle) * (xx - px) + np.cos(angle) * (yy - py)
        along = np.cos(angle) * (xx - px) + np.sin(angle) * (yy - py)
        normal += curvature * along**2
        hair = np.exp(-((normal / width) ** 2))[..., None]
        img = img * (1 - 0.7 * hair) + np.array([40.0, 30.0, 25.0]) * 0.7 * hair

    # Dermoscope field of view: dark corners outside a circle.
    rim = np.hypot(yy - size / 2, xx - size / 2) / d.rim
    img *= np.clip(1.15 - rim**4, 0.05, 1)[..., None]
    img += d.noise
    return np.clip(img, 0, 255).astype(np.uint8), alpha > 0.5


def draw_lesion(
    rng: np.random.Generator,
    label: int,
    size: int = IMAGE_SIZE,
    center: tuple[float, float] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Draw one image of class ``label`` (1 = MEL). Returns (uint8 HxWx3 image, bool lesion mask)."""
    return paint_lesion(draw_lesion_randomness(rng, label, size, center), size)


def generate_split(
    seed: int, split_index: int, n: int, size: int = IMAGE_SIZE, workers: int | None = None
) -> Split:
    """``n`` images (n // 2 MEL, the rest NV, in random order), deterministic from the seeds.

    The random choices are drawn in order from one generator; the images are painted on
    ``workers`` threads (default: torch's thread count, this job's share of the cores). NumPy
    lets go of the GIL inside its array operations, so threads paint in parallel, and the
    images are the same whatever the number of threads."""
    rng = np.random.default_rng([seed, split_index, GENERATOR_VERSION])
    labels = np.zeros(n, dtype=np.int64)
    labels[: n // 2] = 1
    rng.shuffle(labels)
    images = np.zeros((n, size, size, 3), np.uint8)
    with ThreadPoolExecutor(workers or torch.get_num_threads()) as pool:
        for start in range(0, n, _CHUNK):
            # Each image is painted as soon as its randomness is drawn.
            painted = [
                pool.submit(paint_lesion, draw_lesion_randomness(rng, int(y), size), size)
                for y in labels[start : start + _CHUNK]
            ]
            for i, image in enumerate(painted, start=start):
                images[i] = image.result()[0]
    # NHWC storage seen as NCHW: channels-last, the layout the fast training path wants.
    return Split(torch.from_numpy(images).permute(0, 3, 1, 2), torch.from_numpy(labels).float())


def _read_cache(cache: Path) -> dict | None:
    """The stored splits, or None to generate them: a damaged cache is a miss, never a failed run."""
    if not cache.exists():
        return None
    try:
        stored = torch.load(cache, weights_only=True)
        splits = [stored[name] for name in SPLIT_NAMES]
        if any(len(s["images"]) != len(s["labels"]) for s in splits):
            raise ValueError("images and labels differ in number")
    except Exception as err:
        log.warning(f"synthetic data: ignoring unreadable cache {cache} ({err}); generating it again")
        return None
    log.info(f"synthetic data: loaded from cache {cache}")
    return stored


def synthetic_settings(data_cfg: DictConfig) -> tuple[dict[str, int], int]:
    """Images per split and the generator's seed, checked (skinclf train checks them before it
    claims a run folder): a SkinclfError names a value that is not a whole number, a split of
    fewer than 2 images, or a negative seed."""
    sizes = {split: number_setting(data_cfg, f"{split}_size", int, "data.") for split in SPLIT_NAMES}
    for split, n in sizes.items():
        if n < 2:
            raise SkinclfError(f"data.{split}_size={n}: the synthetic data needs at least 2 images per split")
    seed = number_setting(data_cfg, "seed", int, "data.") if "seed" in data_cfg else 0
    if seed < 0:
        raise SkinclfError(f"data.seed={seed}: must be 0 or more")
    return sizes, seed


def load_splits(data_cfg: DictConfig) -> ImageSplits:
    """Generate (first use) or load from ``data_cfg.cache_dir`` the synthetic train/val/test splits."""
    sizes, seed = synthetic_settings(data_cfg)
    key = json.dumps({"version": GENERATOR_VERSION, "seed": seed, "sizes": sizes}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    cache = data_path(data_cfg, "cache_dir") / f"synthetic_{digest}.pt"  # ~ expanded, as for every cache
    remove_stale_cache_temporaries(cache)
    stored = _read_cache(cache)
    if stored is None:
        log.info(f"synthetic data: generating {sum(sizes.values())} images (seed {seed}) into {cache}")
        stored = {}
        for index, (name, n) in enumerate(sizes.items()):
            split = generate_split(seed, index, n)
            stored[name] = {"images": split.images, "labels": split.labels}
        save_cache(stored, cache, "the synthetic data cache", "the next run generates it again")
    splits = {name: Split(d["images"], d["labels"]) for name, d in stored.items()}
    return ImageSplits(name="synthetic", **splits)
