"""Realistic test images made offline, for the benchmarks: real encoded JPEGs and PNGs cut from
scikit-learn's two sample photos, in ImageFolder layout, and their shards.

    from sample_data import make_images, to_shards
    make_images("/tmp/jpeg-src", "jpeg", 3000)      # ImageNet-like: ~500x375 JPEGs (quality 90), 10 classes
    make_images("/tmp/png-src", "png", 30000)       # CIFAR-like: 32x32 PNGs, 10 learnable classes
    root = to_shards("/tmp/png-src", "/tmp/png", holdout=3000)   # densenet_ray.data's convert; a dataset folder

    python benchmarks/sample_data.py png 2000 /tmp/png-src [/tmp/png]   # the same from a shell

Make the images before any ray.init in the process: they are made in a multiprocessing.Pool, and
the signal handlers Ray installs break its children. to_shards starts (or joins) Ray itself.

"jpeg": random crops (213..427 x 320..640) of a photo, rescaled to one of ImageNet's typical sizes
(500x375, 375x500, 500x333, ...), quality 90; class = image index mod 10 (not learnable: for
throughput). "png": a random square (24..119 px) of one photo scaled to 32x32; the class is (photo,
which fifth of its width the square comes from), so a model can learn it.
"""

from __future__ import annotations

import os
import sys
from multiprocessing import Pool

import numpy as np

KINDS = ("jpeg", "png")
CLASSES = 10
SIZES = [(500, 375), (375, 500), (500, 333), (500, 400), (400, 300), (640, 480), (333, 500)]
_photos = None


def _photo(i: int) -> np.ndarray:
    """scikit-learn's sample photo i (0: china, 1: flower; 427x640x3 uint8), loaded once per process."""
    global _photos
    if _photos is None:
        from sklearn.datasets import load_sample_images

        _photos = load_sample_images().images
    return _photos[i]


def _jpeg(path: str, seed: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    src = _photo(seed % 2)
    h, w = int(rng.integers(213, 428)), int(rng.integers(320, 641))
    y, x = int(rng.integers(0, 428 - h)), int(rng.integers(0, 641 - w))
    img = Image.fromarray(src[y:y + h, x:x + w]).resize(SIZES[seed % len(SIZES)], Image.BICUBIC)
    img.save(path, quality=90)


def _png(path: str, seed: int, label: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    photo = _photo(label // 5)
    h, w = photo.shape[:2]
    side = int(rng.integers(24, 120))
    x0 = int(np.clip((label % 5) * (w - side) / 4 + rng.integers(-10, 10), 0, w - side))
    y0 = int(rng.integers(0, h - side))
    Image.fromarray(photo[y0:y0 + side, x0:x0 + side]).resize((32, 32), Image.BILINEAR).save(path)


def _make(job: tuple) -> None:
    kind, path, seed, label = job
    _jpeg(path, seed) if kind == "jpeg" else _png(path, seed, label)


def make_images(folder: str, kind: str, n: int, seed: int = 0) -> str:
    """Write n images of `kind` ("jpeg" or "png") as folder/train/cNN/*.ext, in a process pool;
    returns `folder`. Image i is a function of (seed, i) alone."""
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r}: expected one of {', '.join(KINDS)}")
    ext = {"jpeg": "JPEG", "png": "png"}[kind]
    jobs = []
    for c in range(CLASSES):
        os.makedirs(os.path.join(folder, "train", f"c{c:02d}"), exist_ok=True)
    for i in range(n):
        label = i % CLASSES
        jobs.append((kind, os.path.join(folder, "train", f"c{label:02d}", f"{i:07d}.{ext}"), seed * 10**7 + i, label))
    with Pool() as pool:
        pool.map(_make, jobs, chunksize=64 if kind == "jpeg" else 256)
    return folder


def to_shards(folder: str, root: str, holdout: int = 0) -> str:
    """folder (make_images') converted to a dataset at `root` with densenet_ray.data's convert
    (Ray tasks: starts or joins Ray), `holdout` train images moved to "val"; returns root. An
    existing dataset at root is kept as it is."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from densenet_ray.data import MANIFEST, sources, write

    if not os.path.exists(os.path.join(root, MANIFEST)):
        write.convert(sources.imagefolder(folder), root, holdout=holdout, progress=False)
    return root


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("kind", choices=KINDS)
    p.add_argument("n", type=int)
    p.add_argument("folder")
    p.add_argument("root", nargs="?", help="also convert to shards here")
    p.add_argument("--holdout", type=int, default=0)
    a = p.parse_args()
    make_images(a.folder, a.kind, a.n)
    if a.root:
        print(to_shards(a.folder, a.root, a.holdout))
