"""Rebuild the embedded demo data in assets/demo/ (see assets/README.md).

Needs Fashion-MNIST's IDX files (Debian's dataset-fashion-mnist installs them in
/usr/share/datasets/fashion-mnist/, or pass --root) and scikit-image. Run it from the
repository root::

    python assets/build_demo.py

It writes

- ``demo/fashion_mnist_demo.npz``: 100 test images per class of Fashion-MNIST, chosen by
  ``itae.data.balanced_subset(..., seed=0)``: ``images`` (1000, 28, 28) uint8, ``labels``
  (1000,) int64, ``class_names`` (10,) str, ``source_indices`` (1000,) int64, the index
  of each image in the official test split;
- ``demo/photos/<name>.jpg``: scikit-image sample photos, resized to 256 px on the short
  side, JPEG quality 90.
"""

import argparse
import sys
from pathlib import Path

import numpy as np
import skimage.data
from PIL import Image, ImageOps

# Run as a script, the repository root is not on the import path.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from itae.data import balanced_subset, open_source  # noqa: E402

DEMO_DIR = Path(__file__).resolve().parent / "demo"
PER_CLASS = 100
SEED = 0
SHORT_SIDE = 256
JPEG_QUALITY = 90
PHOTOS = ("astronaut", "camera", "chelsea", "coffee", "coins", "hubble_deep_field", "retina",
          "rocket")


def build_fashion_mnist(path, root=None):
    """Write the balanced Fashion-MNIST test subset to `path` (.npz); return its counts."""
    test = open_source("fashion-mnist", root=root, split="test")
    subset = balanced_subset(test, PER_CLASS * len(test.class_names), seed=SEED)
    # Grey images come back as RGB with three equal channels; keep one.
    images = np.stack([np.asarray(subset.load(i))[..., 0] for i in range(len(subset))])
    source_indices = np.array([int(name.split("/")[1]) for name in subset.names])
    np.savez_compressed(path, images=images, labels=subset.labels,
                        class_names=np.array(subset.class_names), source_indices=source_indices)
    return np.bincount(subset.labels)


def build_photos(folder):
    """Write each of PHOTOS, `SHORT_SIDE` px on its short side, to `folder`/<name>.jpg."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in PHOTOS:
        photo = Image.fromarray(getattr(skimage.data, name)())
        photo = ImageOps.cover(photo, (SHORT_SIDE, SHORT_SIDE), Image.Resampling.LANCZOS)
        photo.save(folder / f"{name}.jpg", quality=JPEG_QUALITY, optimize=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", help="folder holding Fashion-MNIST's IDX files "
                                       "(default: where Debian installs them)")
    args = parser.parse_args()
    DEMO_DIR.mkdir(exist_ok=True)
    counts = build_fashion_mnist(DEMO_DIR / "fashion_mnist_demo.npz", args.root)
    print(f"Fashion-MNIST demo: {counts.sum()} images, per class {counts.tolist()}")
    build_photos(DEMO_DIR / "photos")
    total = sum(f.stat().st_size for f in DEMO_DIR.rglob("*") if f.is_file())
    print(f"photos: {', '.join(PHOTOS)}; assets/demo holds {total / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
