"""The built-in data sources: a registry of records mirroring the backbone registry, and ``open_source``.

Each :class:`SourceSpec` is the single source of truth for a source: its name, its description, how to
open it, whether it reads a folder of its own and whether it has a train split. The command line's
choices, the dashboard's list and the README's table all come from :data:`SOURCES`. torchvision is
imported only by the openers that need it, so reading the registry stays quick.
"""
from __future__ import annotations

import os
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from itae.choices import SPLITS
from itae.data.dataset import ImageDataset, SkippedImage
from itae.data.files import BytesStore, DirStore, file_dataset, open_folder, open_zip
from itae.errors import DataSourceError
from itae.resources import bundled
from itae.settings import data_root, resolve_allowed_path

__all__ = ["SOURCES", "SourceSpec", "get_source", "open_source"]

_DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
_FASHION_MNIST_HOME = "https://github.com/zalandoresearch/fashion-mnist"
_TINY_IMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
_REBUILD_DEMO = "rebuild it from a source checkout with: python assets/build_demo.py"


@dataclass(frozen=True)
class SourceSpec:
    """One built-in data source.

    Attributes
    ----------
    name : the registry name, e.g. ``"cifar10"``
    description : one line for lists and help texts
    opener : callable ``(root, split, download) -> ImageDataset``, with ``root`` None for the default
    needs_root : whether it reads a folder of its own (``root``, default :func:`itae.settings.data_root`);
        the demos are embedded and need none
    has_train_split : whether ``split="train"`` exists; k-NN then takes its memory bank from it
    """

    name: str
    description: str
    opener: Callable[[str | os.PathLike | None, str, bool], ImageDataset]
    needs_root: bool
    has_train_split: bool


def get_source(name: str) -> SourceSpec:
    """The registry record for ``name``; a clear error listing the known names otherwise."""
    try:
        return SOURCES[name]
    except KeyError:
        raise DataSourceError(f"unknown source {name!r}; built-in sources: {', '.join(SOURCES)}") from None


def open_source(spec, root=None, labels_csv=None, split="test", download=False, allowed_roots=None):
    """Open a built-in dataset, a folder of images or a zip of images.

    Parameters
    ----------
    spec : str or os.PathLike
        A key of :data:`SOURCES`, or a path to a folder or a ``.zip``.
    root : str or os.PathLike, optional
        Where the built-in datasets other than the demos live (default
        :func:`itae.settings.data_root`; Fashion-MNIST is also found where Debian installs
        it). Ignored for paths.
    labels_csv : str, os.PathLike or bytes, optional
        For folders and zips: a CSV of ``filename,label`` rows (header optional) whose
        file names are the image paths relative to the folder or zip.
    split : {"test", "train"}
        The paper evaluates on "test"; k-NN also needs "train".
    download : bool
        Let torchvision download CIFAR or STL-10 (or Fashion-MNIST) into `root`.
    allowed_roots : sequence of str or os.PathLike, optional
        For a server opening what its visitors typed: a path `spec`, a `root` and a `labels_csv`
        path must then resolve inside one of these folders (see
        :func:`itae.settings.resolve_allowed_path`; an empty sequence refuses every path), and the
        files of a folder that link to outside them are skipped. None, the default, trusts every path.

    Returns
    -------
    ImageDataset

    Raises
    ------
    DataSourceError
        If the source is unknown, missing, empty or unreadable; the message says what
        to do. ``PathNotAllowedError``, a DataSourceError, when a path leaves `allowed_roots`.
    """
    if allowed_roots is not None:
        allowed_roots = tuple(Path(folder).expanduser().resolve() for folder in allowed_roots)
        root = None if root is None else resolve_allowed_path(root, allowed_roots)
        if labels_csv is not None and not isinstance(labels_csv, bytes):
            labels_csv = resolve_allowed_path(labels_csv, allowed_roots)
    if split not in SPLITS:
        raise ValueError(f"split must be 'test' or 'train', got {split!r}")
    if isinstance(spec, str) and spec in SOURCES:
        source = SOURCES[spec]
        if labels_csv is not None:
            raise ValueError(f"labels_csv applies to folders, zips and uploads, not to the "
                             f"built-in source {spec!r}")
        if split == "train" and not source.has_train_split:
            raise DataSourceError(f"the source {spec!r} has no train split: {source.description}")
        return source.opener(root, split, download)
    if not isinstance(spec, (str, os.PathLike)):
        raise TypeError(f"spec must be a source name or a path, got {type(spec).__name__}")
    path = Path(spec).expanduser() if allowed_roots is None else resolve_allowed_path(spec, allowed_roots)
    if path.is_dir():
        return open_folder(path.resolve(), labels_csv, split, allowed_roots)
    if path.is_file() and zipfile.is_zipfile(path):
        return open_zip(path.resolve(), labels_csv, split)
    if path.is_file():
        raise DataSourceError(f"{str(path)!r} is a file but not a zip archive; pass a folder of "
                              f"images, a .zip of images, or one of: {', '.join(SOURCES)}")
    raise DataSourceError(f"unknown source {str(spec)!r}: no such folder or file, and not a "
                          f"built-in name. Pass one of {', '.join(SOURCES)}, a folder of images "
                          f"(one subfolder per class) or a .zip of images")


def _open_demo(root, split, download):
    arrays = bundled("assets") / "demo" / "fashion_mnist_demo.npz"
    if not arrays.is_file():
        raise DataSourceError(f"the embedded demo data {str(arrays)!r} is missing; {_REBUILD_DEMO}")
    with arrays.open("rb") as file, np.load(file) as demo:
        images, labels = demo["images"], demo["labels"]
        class_names, source_indices = demo["class_names"].tolist(), demo["source_indices"]
    return ImageDataset.from_arrays(
        images, labels, class_names, [f"test/{i}" for i in source_indices], title="Fashion-MNIST demo (test)")


def _open_demo_photos(root, split, download):
    folder = bundled("assets") / "demo" / "photos"
    photos = sorted((p for p in folder.iterdir() if p.name.endswith(".jpg")), key=lambda p: p.name) if folder.is_dir() else []
    if not photos:
        raise DataSourceError(f"the embedded demo photos in {str(folder)!r} are missing; {_REBUILD_DEMO}")
    store = BytesStore({photo.name: photo.read_bytes() for photo in photos})
    entries = [(photo.name, photo.name.removesuffix(".jpg"), None) for photo in photos]
    return file_dataset(store, entries, skipped=[], identity=["demo-photos"],
                        title="Demo photos (scikit-image)")


def _open_fashion_mnist(root, split, download):
    from torchvision.datasets import FashionMNIST
    from torchvision.datasets.mnist import read_image_file, read_label_file

    prefix = "train" if split == "train" else "t10k"
    files = _find_fashion_mnist(root, prefix)
    if files is None and download:
        advice = (f"Put the IDX files from {_FASHION_MNIST_HOME} there, or install Debian's "
                  f"dataset-fashion-mnist")
        _torchvision_call(FashionMNIST, "Fashion-MNIST", advice, data_root(root),
                          train=split == "train", download=True)
        files = _find_fashion_mnist(root, prefix)
    if files is None:
        folders = ", ".join(str(f) for f in _fashion_mnist_folders(root))
        raise DataSourceError(
            f"Fashion-MNIST {split} files not found (looked in {folders}). Install Debian's "
            f"dataset-fashion-mnist, or put {prefix}-images-idx3-ubyte.gz and "
            f"{prefix}-labels-idx1-ubyte.gz from {_FASHION_MNIST_HOME} in <root>, or allow "
            f"downloading (download=True)")
    images, labels = _read_idx(files[0], read_image_file), _read_idx(files[1], read_label_file)
    if len(images) != len(labels):
        raise DataSourceError(f"{files[0]} holds {len(images)} images but {files[1]} holds "
                              f"{len(labels)} labels")
    return ImageDataset.from_arrays(
        images, labels, FashionMNIST.classes, [f"{split}/{i}" for i in range(len(images))],
        title=f"Fashion-MNIST {split}")


def _fashion_mnist_folders(root):
    if root is None:
        return [_DEBIAN_FASHION_MNIST, data_root() / "FashionMNIST" / "raw"]
    root = Path(root).expanduser()
    return [root, root / "FashionMNIST" / "raw", root / "fashion-mnist"]


def _find_fashion_mnist(root, prefix):
    """The (images, labels) IDX files of one split, plain or gzipped, or None."""
    for folder in _fashion_mnist_folders(root):
        files = [_plain_or_gz(folder / f"{prefix}-{kind}") for kind in
                 ("images-idx3-ubyte", "labels-idx1-ubyte")]
        if all(files):
            return files
    return None


def _plain_or_gz(path):
    gz = path.with_name(path.name + ".gz")
    return path if path.is_file() else gz if gz.is_file() else None


def _read_idx(path, reader):
    """Read an IDX file with torchvision's `reader`, unzipping a .gz copy first."""
    from torchvision.datasets.utils import extract_archive

    try:
        if path.suffix != ".gz":
            return reader(str(path)).numpy()
        with tempfile.TemporaryDirectory() as tmp:
            return reader(str(extract_archive(path, tmp))).numpy()
    except (AssertionError, OSError, RuntimeError, TypeError, ValueError, EOFError) as err:
        raise DataSourceError(f"{str(path)!r} is not a valid IDX file ({err})") from err


def _torchvision_call(cls, title, advice, base, **kwargs):
    """Construct a torchvision dataset in `base`, turning its failures into DataSourceError."""
    try:
        return cls(str(base), **kwargs)
    except (RuntimeError, OSError, ValueError) as err:
        raise DataSourceError(f"{title} could not be loaded from {str(base)!r} ({err}). "
                              f"{advice}") from err


def _torchvision_source(class_name, title):
    """The opener of a torchvision dataset class with the CIFAR or STL-10 layout."""
    def open_it(root, split, download):
        from torchvision import datasets

        cls, base = getattr(datasets, class_name), data_root(root)
        kwargs = {"split": split} if cls is datasets.STL10 else {"train": split == "train"}
        advice = (f"Extract {cls.url} into {str(base)!r} so that {cls.base_folder}/ there holds "
                  f"its files, or allow downloading (download=True) on a machine with internet "
                  f"access")
        dataset = _torchvision_call(cls, title, advice, base, download=download, **kwargs)
        # STL-10 keeps channels first; CIFAR keeps (n, 32, 32, 3).
        images = dataset.data.transpose(0, 2, 3, 1) if cls is datasets.STL10 else dataset.data
        labels = np.asarray(dataset.labels if cls is datasets.STL10 else dataset.targets)
        # STL-10 has class names only where its class_names.txt was kept.
        class_names = getattr(dataset, "classes", None) or [str(k) for k in range(10)]
        return ImageDataset.from_arrays(
            images, labels, class_names, [f"{split}/{i}" for i in range(len(images))], title=f"{title} {split}")
    return open_it


def _open_tiny_imagenet(root, split, download):
    base = data_root(root)
    if not (base / "val" / "val_annotations.txt").is_file():
        base = base / "tiny-imagenet-200"
    if not (base / "val" / "val_annotations.txt").is_file():
        raise DataSourceError(
            f"Tiny ImageNet not found: {str(base / 'val' / 'val_annotations.txt')!r} is "
            f"missing. torchvision cannot download it: download {_TINY_IMAGENET_URL} and unzip "
            f"it into {str(base.parent)!r} so that tiny-imagenet-200/val/images/*.JPEG and "
            f"tiny-imagenet-200/val/val_annotations.txt exist there")
    entries, skipped = _tiny_train_entries(base) if split == "train" else _tiny_val_entries(base)
    wnids = base / "wnids.txt"
    return file_dataset(
        DirStore(base), entries, skipped=skipped, identity=["tiny-imagenet", str(base), split],
        title=f"Tiny ImageNet {'train' if split == 'train' else 'val'}",
        class_order=wnids.read_text().split() if wnids.is_file() else None,
        class_titles=_tiny_imagenet_words(base / "words.txt"))


def _tiny_val_entries(base):
    """Entries of val/images, classes from val_annotations.txt (file, wnid, box)."""
    annotations = (base / "val" / "val_annotations.txt").read_text().splitlines()
    wnid_of = dict(line.split("\t")[:2] for line in annotations if "\t" in line)
    folder = base / "val" / "images"
    present = sorted(p.name for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []
    entries = [(f"val/images/{name}", name, wnid_of[name]) for name in present
               if name in wnid_of]
    skipped = [SkippedImage(name, "no entry in val_annotations.txt") for name in present
               if name not in wnid_of and not name.startswith(".")]
    missing = set(wnid_of) - set(present)
    skipped += [SkippedImage(name, "listed in val_annotations.txt but missing from val/images")
                for name in sorted(missing)]
    return entries, skipped


def _tiny_train_entries(base):
    """Entries of train/<wnid>/images/*."""
    images = sorted((base / "train").glob("*/images/*"))
    if not images:
        raise DataSourceError(f"Tiny ImageNet train split not found: no files match "
                              f"{str(base / 'train' / '<wnid>' / 'images' / '*')!r}")
    return [(p.relative_to(base).as_posix(), f"{p.parent.parent.name}/{p.name}",
             p.parent.parent.name) for p in images], []


def _tiny_imagenet_words(path):
    """{wnid: first synonym} from words.txt ("n01443537<TAB>goldfish, Carassius auratus")."""
    if not path.is_file():
        return None
    pairs = (line.split("\t", 1) for line in path.read_text().splitlines() if "\t" in line)
    return {wnid: words.split(",")[0].strip() for wnid, words in pairs}


SOURCES: dict[str, SourceSpec] = {
    spec.name: spec
    for spec in [
        SourceSpec("demo", "Fashion-MNIST, 1,000 test images (100 per class), embedded: works offline",
                   _open_demo, needs_root=False, has_train_split=False),
        SourceSpec("demo-photos", "8 natural photos from scikit-image, embedded, unlabeled",
                   _open_demo_photos, needs_root=False, has_train_split=False),
        SourceSpec("fashion-mnist", "Fashion-MNIST IDX files (Debian's dataset-fashion-mnist, or in <root>)",
                   _open_fashion_mnist, needs_root=True, has_train_split=True),
        SourceSpec("cifar10", "CIFAR-10 via torchvision (<root>/cifar-10-batches-py)",
                   _torchvision_source("CIFAR10", "CIFAR-10"), needs_root=True, has_train_split=True),
        SourceSpec("cifar100", "CIFAR-100, 100 fine classes, via torchvision (<root>/cifar-100-python)",
                   _torchvision_source("CIFAR100", "CIFAR-100"), needs_root=True, has_train_split=True),
        SourceSpec("stl10", "STL-10 via torchvision (<root>/stl10_binary)",
                   _torchvision_source("STL10", "STL-10"), needs_root=True, has_train_split=True),
        SourceSpec("tiny-imagenet", "Tiny ImageNet, validation set as test (<root>/tiny-imagenet-200)",
                   _open_tiny_imagenet, needs_root=True, has_train_split=True),
    ]
}
"""The built-in sources by name, in the order front-ends list them."""
