"""Decode time vs cached-load time of a folder of 128x128 JPEGs (the numbers in the README).

    python scripts/benchmark_decode.py [--images 3000] [--repeats 3]

Writes a temporary folder of JPEGs (synthetic lesion images), then times, for the same files:
decoding every JPEG (what a run without the cache does), the first run (decode + write the
cache) and a later run (stat the files for the key + load the cache file). Prints a Markdown
table and the machine it ran on.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _args import positive_int
from PIL import Image

from skinclf.data.decode_cache import decode_files, decode_threads, load_or_decode, store
from skinclf.data.synthetic import draw_lesion
from skinclf.training.hardware import cpu_model


def write_jpegs(folder: Path, n: int, seed: int = 0) -> list[Path]:
    """n JPEGs (quality 95) from a pool of 64 synthetic lesions, each with its own noise."""
    rng = np.random.default_rng(seed)
    pool = [draw_lesion(rng, i % 2)[0] for i in range(64)]
    files = []
    for i in range(n):
        noisy = np.clip(pool[i % 64] + rng.normal(0, 3, pool[0].shape), 0, 255).astype(np.uint8)
        path = folder / f"img_{i:05d}.jpg"
        Image.fromarray(noisy).save(path, quality=95)
        files.append(path)
    return files


def best_of(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=positive_int, default=3000)
    parser.add_argument("--repeats", type=positive_int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root, cache = Path(tmp) / "images", Path(tmp) / "cache"
        root.mkdir()
        files = write_jpegs(root, args.images)
        mb = sum(p.stat().st_size for p in files) / 1e6

        decode = best_of(args.repeats, lambda: decode_files(files, desc="decode"))
        t0 = time.perf_counter()
        first = load_or_decode(files, root, "bench", cache)
        store(first)
        first_run = time.perf_counter() - t0
        cached = best_of(args.repeats, lambda: load_or_decode(files, root, "bench", cache))
        again = load_or_decode(files, root, "bench", cache)
        assert again.from_cache and torch.equal(again.images, first.images)
        cache_mb = sum(p.stat().st_size for p in cache.glob("*.pt")) / 1e6

    print(
        f"machine: {cpu_model()}, {os.cpu_count()} logical CPUs, load average {os.getloadavg()[0]:.1f}; "
        f"decoding on {decode_threads()} threads"
    )
    print(
        f"torch {torch.__version__}, {args.images} JPEGs 128x128 ({mb:.0f} MB), cache file {cache_mb:.0f} MB"
    )
    print()
    print("| step | seconds | images/s |")
    print("|---|---:|---:|")
    for name, seconds in [
        (f"decode every JPEG (best of {args.repeats})", decode),
        ("first run: decode + write cache", first_run),
        (f"later run: key + load cache (best of {args.repeats})", cached),
    ]:
        print(f"| {name} | {seconds:.3f} | {args.images / seconds:,.0f} |")
    print(f"\ncached load is {decode / cached:.1f}x faster than decoding")


if __name__ == "__main__":
    main()
