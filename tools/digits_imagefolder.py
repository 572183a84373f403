"""Write scikit-learn's handwritten digits (1,797 scans, 8x8, 10 classes) as an `imagefolder` dataset.

A small real-image task that needs no download: the scans ship inside scikit-learn. Each image is
upscaled to 16x16 (nearest neighbour) and saved as PNG under train/<digit>/ and test/<digit>/; a
seeded shuffle puts --test_size images in the test split.

    uv run --with scikit-learn tools/digits_imagefolder.py data/digits
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image


def write_digits(root: Path, test_size: int = 500, seed: int = 0, side: int = 16) -> None:
    """Save every digit scan as a PNG in root/{train,test}/<label>/."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(seed).permutation(len(digits.target))
    scale = side // 8
    for rank, index in enumerate(order):
        split = "test" if rank < test_size else "train"
        folder = root / split / str(digits.target[index])
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (digits.images[index] * (255 / 16)).astype(np.uint8).repeat(scale, 0).repeat(scale, 1)
        Image.fromarray(pixels, mode="L").convert("RGB").save(folder / f"{index:04d}.png")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="output folder (becomes --data_dir)")
    parser.add_argument("--test_size", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    write_digits(args.root, args.test_size, args.seed)
