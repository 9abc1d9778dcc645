"""Image sources: built-in datasets, folders, zips and uploads, as one kind of dataset.

Every source becomes an :class:`ImageDataset`: a list of images decoded one at a time
into 8-bit RGB, with optional integer labels, class names, a name per image, the files
refused while the source was opened, and a fingerprint that changes whenever the
content does. A bad file never crashes a run: files refused at opening are listed in
``ImageDataset.skipped``, and a file that only fails when decoded raises
:class:`UnreadableImage`, which the caller skips and reports.

Folders and zips are laid out either with one subfolder per class (the subfolder names
become the labels) or flat, optionally with a labels CSV of ``filename,label`` rows.
A lone top-level folder (``pets.zip`` holding ``pets/...``) is treated as a wrapper and
looked through, and ``train/`` plus ``test/`` (or ``val/``) subfolders are read as the
two splits.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
import tempfile
import warnings
import zipfile
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageOps
from torchvision.datasets import CIFAR10, CIFAR100, STL10, FashionMNIST
from torchvision.datasets.mnist import read_image_file, read_label_file
from torchvision.datasets.utils import extract_archive

__all__ = [
    "MAX_IMAGE_PIXELS",
    "MAX_ZIP_BYTES",
    "MAX_ZIP_RATIO",
    "SOURCES",
    "DataSourceError",
    "ImageDataset",
    "SkippedImage",
    "UnreadableImage",
    "balanced_subset",
    "default_root",
    "open_source",
    "open_uploads",
    "to_rgb",
]

MAX_IMAGE_PIXELS = 50_000_000
"""Images with more pixels than this are refused (Pillow's own bomb limit is higher)."""
MAX_ZIP_BYTES = 4 * 1024**3
"""Zips that would unpack to more bytes than this are refused."""
MAX_ZIP_RATIO = 100
"""Zips whose unpacked size exceeds this many times their packed size are refused."""

SOURCES = {
    "demo": "Fashion-MNIST, 1,000 test images (100 per class), embedded: works offline",
    "demo-photos": "8 natural photos from scikit-image, embedded, unlabeled",
    "fashion-mnist": "Fashion-MNIST IDX files (Debian's dataset-fashion-mnist, or in <root>)",
    "cifar10": "CIFAR-10 via torchvision (<root>/cifar-10-batches-py)",
    "cifar100": "CIFAR-100, 100 fine classes, via torchvision (<root>/cifar-100-python)",
    "stl10": "STL-10 via torchvision (<root>/stl10_binary)",
    "tiny-imagenet": "Tiny ImageNet, validation set as test (<root>/tiny-imagenet-200)",
}

_DEMO_DIR = Path(__file__).resolve().parent.parent / "assets" / "demo"
_DEMO_ARRAYS = _DEMO_DIR / "fashion_mnist_demo.npz"
_DEMO_PHOTOS = _DEMO_DIR / "photos"
_DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
_FASHION_MNIST_HOME = "https://github.com/zalandoresearch/fashion-mnist"
_TINY_IMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
_SPLITS = ("test", "train")
# Below this unpacked size a high compression ratio is harmless (a few flat images).
_ZIP_RATIO_FLOOR = 1024**2
_JUNK_NAMES = {"__MACOSX", "Thumbs.db", "desktop.ini"}
_CSV_HEADER_NAMES = {"filename", "file", "file_name", "name", "path", "image", "image_name"}


class DataSourceError(Exception):
    """A source cannot be opened; the message says what to do about it."""


class UnreadableImage(DataSourceError):
    """One image failed when decoded: skip it and report it."""


class SkippedImage(NamedTuple):
    """A file refused when its source was opened, and why."""

    name: str
    reason: str


class _Refused(Exception):
    """An image whose header is readable but which we decline to decode."""


class ImageDataset:
    """Images decoded one at a time, with optional labels.

    Built by :func:`open_source`, :func:`open_uploads`, :func:`balanced_subset` and
    :meth:`from_arrays`, not directly.

    Parameters
    ----------
    store : object
        Has ``open(key)``: a context manager yielding a lazily loaded PIL image.
    keys : sequence of length n_images
        What ``store.open`` takes for each image.
    names : sequence of str of length n_images
        Per-image names for hover text: a relative path, or "test/1234".
    labels : array-like of shape (n_images,) or None
        Class indices into `class_names`.
    class_names : list of str or None
    skipped : list of SkippedImage
        Files refused when the source was opened.
    fingerprint : str
        Short hex string that changes whenever the content does.
    description : str
        Human-readable one-liner.
    """

    def __init__(self, store, keys, names, *, labels=None, class_names=None, skipped=(),
                 fingerprint, description):
        self._store = store
        self._keys = list(keys)
        self.names = list(names)
        self.labels = None if labels is None else np.asarray(labels, dtype=np.int64)
        self.class_names = None if class_names is None else [str(c) for c in class_names]
        self.skipped = list(skipped)
        self.fingerprint = fingerprint
        self.description = description

    @classmethod
    def from_arrays(cls, images, labels=None, class_names=None, names=None, description=None):
        """Wrap images held in memory; the fingerprint hashes the content.

        Parameters
        ----------
        images : ndarray of shape (n_images, height, width) or (n_images, height, width, 3)
            uint8 pixels, greyscale or RGB.
        labels : array-like of int of shape (n_images,), optional
            Class indices into `class_names`.
        class_names : list of str, optional
            Default "0", "1", ... when there are labels.
        names : list of str, optional
            Default "0", "1", ...
        description : str, optional

        Returns
        -------
        ImageDataset
        """
        images = np.asarray(images)
        if images.dtype != np.uint8 or not (images.ndim == 3 or images.ndim == 4
                                            and images.shape[3] == 3):
            raise ValueError(f"images must be uint8 of shape (n, height, width) or "
                             f"(n, height, width, 3), got {images.dtype} {images.shape}")
        names = [str(i) for i in range(len(images))] if names is None else list(names)
        if len(names) != len(images):
            raise ValueError(f"names must have one entry per image ({len(images)}), "
                             f"got {len(names)}")
        if labels is not None:
            labels = np.asarray(labels, dtype=np.int64)
            if labels.shape != (len(images),) or (labels.size and labels.min() < 0):
                raise ValueError(f"labels must be {len(images)} non-negative class indices, "
                                 f"got shape {labels.shape}")
            n_classes = int(labels.max(initial=-1)) + 1
            class_names = range(n_classes) if class_names is None else class_names
            class_names = [str(c) for c in class_names]
            if len(class_names) < n_classes:
                raise ValueError(f"class_names has {len(class_names)} entries but labels go up "
                                 f"to {n_classes - 1}")
        fingerprint = _digest(_array_digest(images), None if labels is None else labels.tobytes(),
                              class_names, names)
        description = description or _describe("In-memory images", len(images), class_names, [])
        return cls(_ArrayStore(images), range(len(images)), names, labels=labels,
                   class_names=class_names, fingerprint=fingerprint, description=description)

    def __len__(self):
        return len(self.names)

    def __repr__(self):
        return f"ImageDataset({self.description!r}, fingerprint={self.fingerprint!r})"

    def load(self, i):
        """Decode image `i`.

        Parameters
        ----------
        i : int
            Index in ``range(len(self))``; negative indices count from the end.

        Returns
        -------
        PIL.Image.Image
            Upright, 8-bit RGB.

        Raises
        ------
        UnreadableImage
            If the file turns out to be corrupt or refused when decoded.
        """
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"image index {i} is out of range for {n} images")
        try:
            with self._store.open(self._keys[i]) as image:
                return to_rgb(image)
        except Exception as err:  # decoders raise assorted types on malformed files
            raise UnreadableImage(f"{self.names[i]}: {_reason(err)}") from err

    def _take(self, indices, fingerprint, description):
        """The images at `indices` (ndarray of shape (n_taken,)) as a new dataset."""
        return ImageDataset(
            self._store,
            [self._keys[i] for i in indices],
            [self.names[i] for i in indices],
            labels=None if self.labels is None else self.labels[indices],
            class_names=self.class_names,
            skipped=self.skipped,
            fingerprint=fingerprint,
            description=description,
        )


def default_root():
    """Folder where built-in datasets are looked for, and downloaded to, by default.

    Returns
    -------
    pathlib.Path
        ``$ITAE_DATA_ROOT`` when set, else ``~/.cache/itae/datasets``.
    """
    default = Path.home() / ".cache" / "itae" / "datasets"
    return Path(os.environ.get("ITAE_DATA_ROOT", default)).expanduser()


def open_source(spec, root=None, labels_csv=None, split="test", download=False):
    """Open a built-in dataset, a folder of images or a zip of images.

    Parameters
    ----------
    spec : str or os.PathLike
        A key of :data:`SOURCES`, or a path to a folder or a ``.zip``.
    root : str or os.PathLike, optional
        Where the built-in datasets other than the demos live (default
        :func:`default_root`; Fashion-MNIST is also found where Debian installs it).
        Ignored for paths.
    labels_csv : str, os.PathLike or bytes, optional
        For folders and zips: a CSV of ``filename,label`` rows (header optional) whose
        file names are the image paths relative to the folder or zip.
    split : {"test", "train"}
        The paper evaluates on "test"; k-NN also needs "train".
    download : bool
        Let torchvision download CIFAR or STL-10 (or Fashion-MNIST) into `root`.

    Returns
    -------
    ImageDataset

    Raises
    ------
    DataSourceError
        If the source is unknown, missing, empty or unreadable; the message says what
        to do.
    """
    if split not in _SPLITS:
        raise ValueError(f"split must be 'test' or 'train', got {split!r}")
    if isinstance(spec, str) and spec in _BUILTINS:
        if labels_csv is not None:
            raise ValueError(f"labels_csv applies to folders, zips and uploads, not to the "
                             f"built-in source {spec!r}")
        return _BUILTINS[spec](root, split, download)
    if not isinstance(spec, (str, os.PathLike)):
        raise TypeError(f"spec must be a source name or a path, got {type(spec).__name__}")
    path = Path(spec).expanduser()
    if path.is_dir():
        return _open_folder(path.resolve(), labels_csv, split)
    if path.is_file() and zipfile.is_zipfile(path):
        return _open_zip(path.resolve(), labels_csv, split)
    if path.is_file():
        raise DataSourceError(f"{str(path)!r} is a file but not a zip archive; pass a folder of "
                              f"images, a .zip of images, or one of: {', '.join(SOURCES)}")
    raise DataSourceError(f"unknown source {str(spec)!r}: no such folder or file, and not a "
                          f"built-in name. Pass one of {', '.join(SOURCES)}, a folder of images "
                          f"(one subfolder per class) or a .zip of images")


def open_uploads(files, labels_csv=None):
    """Open uploaded files: several images, or a single zip of images.

    Parameters
    ----------
    files : list of (str, bytes)
        File names and contents, as a browser uploads them.
    labels_csv : str, os.PathLike or bytes, optional
        CSV of ``filename,label`` rows (header optional).

    Returns
    -------
    ImageDataset

    Raises
    ------
    DataSourceError
        If nothing usable was uploaded; the message says what to do.
    """
    files = list(files)
    for item in files:
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)
                and isinstance(item[1], bytes)):
            raise TypeError(f"files must be (filename, bytes) pairs, got {item!r:.80}")
    if not files:
        raise DataSourceError("no files were uploaded; upload images, or one .zip of images")
    zips = [name for name, _ in files if name.lower().endswith(".zip")]
    if zips and len(files) > 1:
        raise DataSourceError(f"upload either images or a single .zip, not both; got "
                              f"{len(files)} files including {', '.join(zips)}")
    if zips:
        name, data = files[0]
        return _open_zip_data(data, f"uploaded zip {name!r}", f"Uploaded zip '{name}'",
                              ["upload-zip", hashlib.sha256(data).hexdigest()], labels_csv,
                              "test")
    store, duplicates = _BytesStore({}), []
    for name, data in files:
        base = name.replace("\\", "/").rsplit("/", 1)[-1]
        if base in store.files:
            duplicates.append(SkippedImage(name, "another upload has the same file name"))
        else:
            store.files[base] = data
    entries, skipped, _ = _layout(list(store.files), "test", "the uploaded files")
    return _file_dataset(store, entries, skipped=duplicates + skipped, labels_csv=labels_csv,
                         identity=["uploads"], title="Uploaded images")


def balanced_subset(ds, limit, seed=0):
    """A seeded random subset with classes as equally represented as possible.

    Each class gets ``limit // n_classes`` images, classes too small for that give all
    they have, and what is left over goes to classes drawn at random. Without labels
    the subset is a plain seeded random sample. The images keep their order in `ds`.

    Parameters
    ----------
    ds : ImageDataset
    limit : int
        Number of images wanted; ``limit >= len(ds)`` returns `ds` itself.
    seed : int
        Seed of the random choice; the same seed gives the same subset.

    Returns
    -------
    ImageDataset
        Its fingerprint covers `ds`'s and the chosen indices.
    """
    if not isinstance(ds, ImageDataset):
        raise TypeError(f"ds must be an ImageDataset, got {type(ds).__name__}")
    if isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit < 1:
        raise ValueError(f"limit must be a positive integer, got {limit!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    if limit >= len(ds):
        return ds
    rng = np.random.default_rng(seed)
    if ds.labels is None:
        indices = np.sort(rng.choice(len(ds), size=limit, replace=False))
    else:
        counts = np.bincount(ds.labels)
        quota = _balanced_quota(counts, limit, rng)
        chosen = [rng.permutation(np.flatnonzero(ds.labels == k))[:quota[k]]
                  for k in range(len(counts))]
        indices = np.sort(np.concatenate(chosen))
    fingerprint = _digest(ds.fingerprint, "subset", indices.astype(np.int64).tobytes())
    description = f"{ds.description}; balanced subset of {limit:,} (seed {seed})"
    return ds._take(indices, fingerprint, description)


def to_rgb(image):
    """Turn any PIL image upright and into 8-bit RGB.

    EXIF orientation is applied, 16-bit greyscale is scaled (not clipped) to 8 bits and
    transparent pixels are composited onto white.

    Parameters
    ----------
    image : PIL.Image.Image

    Returns
    -------
    PIL.Image.Image
        Mode "RGB".
    """
    image = ImageOps.exif_transpose(image)
    if image.mode == "I" or image.mode.startswith("I;16"):
        image = _sixteen_to_eight_bits(image)
    if image.has_transparency_data:
        image = _flatten_on_white(image)
    return image.convert("RGB")


def _sixteen_to_eight_bits(image):
    """Scale a 16-bit greyscale image (mode I;16* or I) to mode L; convert() would clip."""
    values = np.clip(np.asarray(image.convert("I")), 0, 65535)
    return Image.fromarray(np.rint(values / 257).astype(np.uint8))


def _flatten_on_white(image):
    rgba = image.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba)


def _open_image(fp):
    """Open an image lazily (header only), refusing decompression bombs and huge sizes."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        image = Image.open(fp)
    if image.width * image.height > MAX_IMAGE_PIXELS:
        raise _Refused(f"refused: {image.width}x{image.height} is "
                       f"{image.width * image.height / 1e6:.1f} megapixels, over the "
                       f"{MAX_IMAGE_PIXELS / 1e6:g} megapixel limit")
    return image


def _reason(err):
    if isinstance(err, _Refused):
        return str(err)
    if isinstance(err, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return f"refused as a possible decompression bomb ({err})"
    return f"not a readable image ({type(err).__name__}: {err})"


class _ArrayStore:
    """Images in a uint8 array of shape (n_images, height, width[, 3])."""

    def __init__(self, images):
        self.images = images

    def open(self, key):
        return contextlib.nullcontext(Image.fromarray(np.ascontiguousarray(self.images[key])))


class _DirStore:
    """Files under a folder, keyed by their relative POSIX path."""

    def __init__(self, root):
        self.root = Path(root)

    @contextlib.contextmanager
    def open(self, key):
        with open(self.root / key, "rb") as fh:
            yield _open_image(fh)

    def signature(self, key):
        stat = (self.root / key).stat()
        return [stat.st_size, stat.st_mtime_ns]


class _ZipStore:
    """Members of a zip (a path, or its bytes), read one at a time."""

    def __init__(self, source):
        self.source = source
        self._archive = None

    def __getstate__(self):
        return {"source": self.source, "_archive": None}

    def archive(self):
        if self._archive is None:
            is_data = isinstance(self.source, bytes)
            self._archive = zipfile.ZipFile(io.BytesIO(self.source) if is_data else self.source)
        return self._archive

    @contextlib.contextmanager
    def open(self, key):
        with self.archive().open(key) as fh:
            yield _open_image(fh)

    def signature(self, key):
        info = self.archive().getinfo(key)
        return [info.CRC, info.file_size]


class _BytesStore:
    """Files held in memory, keyed by name."""

    def __init__(self, files):
        self.files = files

    def open(self, key):
        return contextlib.nullcontext(_open_image(io.BytesIO(self.files[key])))

    def signature(self, key):
        return hashlib.sha256(self.files[key]).hexdigest()


def _digest(*parts):
    """16 hex digits of SHA-256 over `parts` (bytes, or anything JSON can write)."""
    hasher = hashlib.sha256()
    for part in parts:
        hasher.update(part if isinstance(part, bytes) else json.dumps(part).encode())
        hasher.update(b"\x00")
    return hasher.hexdigest()[:16]


def _array_digest(images, chunk=1024):
    """SHA-256 of an array's shape and pixels, in chunks so that views are not copied whole."""
    hasher = hashlib.sha256(str(images.shape).encode())
    for start in range(0, len(images), chunk):
        hasher.update(np.ascontiguousarray(images[start:start + chunk]))
    return hasher.hexdigest()


def _balanced_quota(counts, limit, rng):
    """Images to take per class: as equal as the class sizes allow, summing to `limit`.

    Parameters
    ----------
    counts : ndarray of shape (n_classes,)
        Images available per class; their sum exceeds `limit`.
    limit : int
    rng : numpy.random.Generator
        Breaks the tie of which classes get one image more.

    Returns
    -------
    ndarray of shape (n_classes,)
    """
    take = np.zeros_like(counts)
    remaining = limit
    while remaining > 0:
        open_classes = np.flatnonzero(take < counts)
        share = remaining // len(open_classes)
        if share == 0:
            take[rng.choice(open_classes, size=remaining, replace=False)] += 1
            break
        added = np.minimum(share, counts[open_classes] - take[open_classes])
        take[open_classes] += added
        remaining -= int(added.sum())
    return take


def _describe(title, n_images, class_names, skipped):
    """One line such as "Folder 'pets', 120 images, 3 classes, 2 skipped"."""
    text = f"{title}, {n_images:,} images, "
    text += f"{len(class_names)} classes" if class_names else "unlabeled"
    return text + (f", {len(skipped)} skipped" if skipped else "")


# Files: layout, labels, validation --------------------------------------------------


def _layout(paths, split, where):
    """Sort relative file paths into labelled image entries.

    Parameters
    ----------
    paths : list of str
        POSIX-style paths relative to the folder or zip; these are the store keys.
    split : {"test", "train"}
    where : str
        The source, as error messages name it.

    Returns
    -------
    entries : list of (key, name, class name or None)
    skipped : list of SkippedImage
    split_dir : str or None
        The split folder read ("train", "test" or "val"), if the source has splits.
    """
    skipped, images = [], []
    suffixes = set(Image.registered_extensions())
    for key in sorted(paths):
        parts = PurePosixPath(key.replace("\\", "/")).parts
        if any(part.startswith(".") or part in _JUNK_NAMES for part in parts):
            continue
        suffix = PurePosixPath(parts[-1]).suffix.lower()
        if suffix not in suffixes:
            reason = f"not an image file type ({suffix or 'no extension'})"
            skipped.append(SkippedImage(key, reason))
            continue
        images.append((key, parts))
    images = _strip_wrappers(images)
    images, split_dir = _select_split(images, split, where)
    if not images:
        raise DataSourceError(f"{where} holds no image files ({len(skipped)} other files); put "
                              f"images in it, one subfolder per class, or all in one folder "
                              f"with a labels CSV of filename,label rows")
    entries, skipped = _assign_classes(images, skipped)
    return entries, skipped, split_dir


def _strip_wrappers(images):
    """Look through lone top-level folders, as in pets.zip holding pets/cat/1.png."""
    while (images and all(len(parts) > 1 for _, parts in images)
           and len({parts[0] for _, parts in images}) == 1):
        images = [(key, parts[1:]) for key, parts in images]
    return images


def _select_split(images, split, where):
    tops = {parts[0] for _, parts in images if len(parts) > 1}
    test_dir = next((name for name in ("test", "val") if name in tops), None)
    if "train" in tops and test_dir:
        wanted = "train" if split == "train" else test_dir
        return [(key, parts[1:]) for key, parts in images
                if len(parts) > 1 and parts[0] == wanted], wanted
    if split == "train":
        raise DataSourceError(f"{where} has no train split: put the training images in train/ "
                              f"and the test images in test/, each with one subfolder per class")
    return images, None


def _assign_classes(images, skipped):
    """Class = first folder when any image sits in a subfolder; else no classes."""
    if not any(len(parts) > 1 for _, parts in images):
        return [(key, parts[0], None) for key, parts in images], skipped
    entries = []
    for key, parts in images:
        name = "/".join(parts)
        if len(parts) == 1:
            skipped.append(SkippedImage(name, "outside the class subfolders"))
        else:
            entries.append((key, name, parts[0]))
    return entries, skipped


def _read_labels_csv(labels_csv):
    """Parse ``filename,label`` rows (header optional) into {filename: label}."""
    if isinstance(labels_csv, bytes):
        data, where = labels_csv, "the labels CSV"
    else:
        path = Path(labels_csv).expanduser()
        if not path.is_file():
            raise DataSourceError(f"labels_csv {str(path)!r} does not exist; pass a CSV file "
                                  f"of filename,label rows")
        data, where = path.read_bytes(), f"labels_csv {str(path)!r}"
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataSourceError(f"{where} is not UTF-8 text ({err})") from err
    mapping = {}
    rows = [(n, [c.strip() for c in row]) for n, row in enumerate(csv.reader(io.StringIO(text)), 1)]
    rows = [(n, cells) for n, cells in rows if any(cells)]
    if rows and rows[0][1][0].lower() in _CSV_HEADER_NAMES:
        rows = rows[1:]
    for line, cells in rows:
        if len(cells) < 2 or not cells[0] or not cells[1]:
            raise DataSourceError(f"{where}, line {line}: expected filename,label, got "
                                  f"{','.join(cells)!r}")
        name, label = cells[0].replace("\\", "/"), cells[1]
        if mapping.setdefault(name, label) != label:
            raise DataSourceError(f"{where} gives {name!r} two labels: {mapping[name]!r} and "
                                  f"{label!r}")
    if not mapping:
        raise DataSourceError(f"{where} has no filename,label rows")
    return mapping


def _apply_labels(entries, mapping):
    """Label `entries` from the CSV `mapping`; report images and rows that do not match."""
    names = {name for _, name, _ in entries}
    labelled = [(key, name, mapping[name]) for key, name, _ in entries if name in mapping]
    if not labelled:
        raise DataSourceError(f"the labels CSV names none of the {len(entries)} images; its file "
                              f"names must be the image paths relative to the folder or zip, "
                              f"such as {entries[0][1]!r}, but it has names such as "
                              f"{next(iter(mapping))!r}")
    skipped = [SkippedImage(name, "no row for it in the labels CSV")
               for _, name, _ in entries if name not in mapping]
    skipped += [SkippedImage(name, "listed in the labels CSV but no such image")
                for name in mapping if name not in names]
    return labelled, skipped


def _readable(store, entries):
    """Keep the entries whose header opens; refuse the rest with a reason."""
    kept, refused = [], []
    for entry in entries:
        try:
            with store.open(entry[0]):
                pass
        except Exception as err:  # decoders raise assorted types on malformed files
            refused.append(SkippedImage(entry[1], _reason(err)))
        else:
            kept.append(entry)
    return kept, refused


def _natural_order(classes):
    """Sort class names, numerically when they are all integers ("2" before "10")."""
    if all(c.lstrip("-").isdigit() for c in classes):
        return sorted(classes, key=int)
    return sorted(classes)


def _file_dataset(store, entries, *, skipped, identity, title, labels_csv=None,
                  class_order=None, class_titles=None):
    """Validate file entries and build the dataset.

    Parameters
    ----------
    store : _DirStore, _ZipStore or _BytesStore
    entries : list of (key, name, class name or None)
    skipped : list of SkippedImage
        Files already refused.
    identity : list
        What identifies the source in the fingerprint.
    title : str
        Start of the description.
    labels_csv : str, os.PathLike or bytes, optional
    class_order : list of str, optional
        Order of the class indices; classes it lacks follow in natural order.
    class_titles : dict of str to str, optional
        Display name of a class where it differs from the class name.
    """
    skipped = list(skipped)
    if labels_csv is not None:
        entries, unmatched = _apply_labels(entries, _read_labels_csv(labels_csv))
        skipped += unmatched
    entries, refused = _readable(store, entries)
    skipped += refused
    if not entries:
        examples = "; ".join(f"{s.name}: {s.reason}" for s in skipped[:3])
        raise DataSourceError(f"{title}: none of the {len(skipped)} files is a readable image "
                              f"({examples})")
    keys, names, classes = zip(*entries)
    labels = class_names = None
    if classes[0] is not None:
        present = set(classes)
        listed = [c for c in class_order or () if c in present]
        order = listed + _natural_order(present - set(listed))
        index = {c: i for i, c in enumerate(order)}
        labels = [index[c] for c in classes]
        class_names = [(class_titles or {}).get(c, c) for c in order]
    signatures = [[name, cls, store.signature(key)] for key, name, cls in entries]
    return ImageDataset(store, keys, names, labels=labels, class_names=class_names,
                        skipped=skipped, fingerprint=_digest(identity, signatures),
                        description=_describe(title, len(entries), class_names, skipped))


# Folders and zips -------------------------------------------------------------------


def _list_folder(root):
    paths = []
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = [d for d in subfolders if not d.startswith(".") and d not in _JUNK_NAMES]
        relative = Path(folder).relative_to(root)
        paths += [(relative / name).as_posix() for name in files]
    return paths


def _open_folder(root, labels_csv, split):
    where = f"folder {str(root)!r}"
    entries, skipped, split_dir = _layout(_list_folder(root), split, where)
    title = f"Folder '{root.name}'" + (f" {split_dir}/" if split_dir else "")
    return _file_dataset(_DirStore(root), entries, skipped=skipped, labels_csv=labels_csv,
                         identity=["folder", str(root), split], title=title)


def _open_zip(path, labels_csv, split):
    stat = path.stat()
    return _open_zip_data(path, f"zip {str(path)!r}", f"Zip '{path.name}'",
                          ["zip", str(path), stat.st_size, stat.st_mtime_ns], labels_csv, split)


def _open_zip_data(source, where, title, identity, labels_csv, split):
    """Open a zip given as a path or as bytes, refusing bombs and escaping members."""
    store = _ZipStore(source)
    try:
        members = [info for info in store.archive().infolist() if not info.is_dir()]
    except (zipfile.BadZipFile, OSError) as err:
        raise DataSourceError(f"{where} is not a readable zip archive ({err})") from err
    _check_zip_sizes(members, where)
    safe, escaping = [], []
    for info in members:
        if _escapes(info.filename):
            escaping.append(SkippedImage(info.filename, "refused: its path escapes the archive "
                                                        "(absolute, or with '..')"))
        else:
            safe.append(info.filename)
    if escaping and not safe:
        raise DataSourceError(f"{where} was refused: every member's path escapes the archive "
                              f"(absolute, or with '..'), e.g. {escaping[0].name!r}")
    entries, skipped, split_dir = _layout(safe, split, where)
    return _file_dataset(store, entries, skipped=escaping + skipped, labels_csv=labels_csv,
                         identity=identity + [split],
                         title=title + (f" {split_dir}/" if split_dir else ""))


def _check_zip_sizes(members, where):
    unpacked = sum(info.file_size for info in members)
    packed = max(sum(info.compress_size for info in members), 1)
    if unpacked > MAX_ZIP_BYTES:
        raise DataSourceError(f"{where} would unpack to {unpacked / 1024**3:.1f} GiB, over the "
                              f"{MAX_ZIP_BYTES / 1024**3:g} GiB limit; unpack it yourself and "
                              f"pass the folder, or split it into smaller zips")
    if unpacked > _ZIP_RATIO_FLOOR and unpacked > MAX_ZIP_RATIO * packed:
        raise DataSourceError(f"{where} is compressed {unpacked / packed:.0f}:1, beyond "
                              f"{MAX_ZIP_RATIO}:1, and is refused as a possible zip bomb; if you "
                              f"trust it, unpack it yourself and pass the folder")


def _escapes(member):
    """Whether a zip member name would land outside the folder it is unpacked into."""
    posix = member.replace("\\", "/")
    return (posix.startswith("/") or ".." in PurePosixPath(posix).parts
            or bool(PureWindowsPath(member).drive))


# Built-in sources -------------------------------------------------------------------


def _open_demo(root, split, download):
    if split != "test":
        raise DataSourceError("the demo holds only 1,000 Fashion-MNIST test images; for a "
                              "train split use 'fashion-mnist'")
    if not _DEMO_ARRAYS.is_file():
        raise DataSourceError(f"the embedded demo data {str(_DEMO_ARRAYS)!r} is missing; "
                              f"rebuild it with: python assets/build_demo.py")
    with np.load(_DEMO_ARRAYS) as demo:
        images, labels = demo["images"], demo["labels"]
        class_names, source_indices = demo["class_names"].tolist(), demo["source_indices"]
    return ImageDataset.from_arrays(
        images, labels, class_names, [f"test/{i}" for i in source_indices],
        _describe("Fashion-MNIST demo (test)", len(images), class_names, []))


def _open_demo_photos(root, split, download):
    if split != "test":
        raise DataSourceError("the demo photos have no train split")
    photos = sorted(_DEMO_PHOTOS.glob("*.jpg"))
    if not photos:
        raise DataSourceError(f"the embedded demo photos in {str(_DEMO_PHOTOS)!r} are missing; "
                              f"rebuild them with: python assets/build_demo.py")
    store = _BytesStore({photo.name: photo.read_bytes() for photo in photos})
    entries = [(photo.name, photo.stem, None) for photo in photos]
    return _file_dataset(store, entries, skipped=[], identity=["demo-photos"],
                         title="Demo photos (scikit-image)")


def _open_fashion_mnist(root, split, download):
    prefix = "train" if split == "train" else "t10k"
    files = _find_fashion_mnist(root, prefix)
    if files is None and download:
        advice = (f"Put the IDX files from {_FASHION_MNIST_HOME} there, or install Debian's "
                  f"dataset-fashion-mnist")
        _torchvision_call(FashionMNIST, "Fashion-MNIST", advice, _root(root),
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
        _describe(f"Fashion-MNIST {split}", len(images), FashionMNIST.classes, []))


def _fashion_mnist_folders(root):
    if root is None:
        return [_DEBIAN_FASHION_MNIST, default_root() / "FashionMNIST" / "raw"]
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
    try:
        if path.suffix != ".gz":
            return reader(str(path)).numpy()
        with tempfile.TemporaryDirectory() as tmp:
            return reader(str(extract_archive(path, tmp))).numpy()
    except (AssertionError, OSError, RuntimeError, TypeError, ValueError, EOFError) as err:
        raise DataSourceError(f"{str(path)!r} is not a valid IDX file ({err})") from err


def _root(root):
    return Path(root).expanduser() if root is not None else default_root()


def _torchvision_call(cls, title, advice, base, **kwargs):
    """Construct a torchvision dataset in `base`, turning its failures into DataSourceError."""
    try:
        return cls(str(base), **kwargs)
    except (RuntimeError, OSError, ValueError) as err:
        raise DataSourceError(f"{title} could not be loaded from {str(base)!r} ({err}). "
                              f"{advice}") from err


def _torchvision_source(cls, title):
    """The opener of a torchvision dataset class with the CIFAR or STL-10 layout."""
    def open_it(root, split, download):
        base = _root(root)
        kwargs = {"split": split} if cls is STL10 else {"train": split == "train"}
        advice = (f"Extract {cls.url} into {str(base)!r} so that {cls.base_folder}/ there holds "
                  f"its files, or allow downloading (download=True) on a machine with internet "
                  f"access")
        dataset = _torchvision_call(cls, title, advice, base, download=download, **kwargs)
        # STL-10 keeps channels first; CIFAR keeps (n, 32, 32, 3).
        images = dataset.data.transpose(0, 2, 3, 1) if cls is STL10 else dataset.data
        labels = np.asarray(dataset.labels if cls is STL10 else dataset.targets)
        # STL-10 has class names only where its class_names.txt was kept.
        class_names = getattr(dataset, "classes", None) or [str(k) for k in range(10)]
        return ImageDataset.from_arrays(
            images, labels, class_names, [f"{split}/{i}" for i in range(len(images))],
            _describe(f"{title} {split}", len(images), class_names, []))
    return open_it


def _open_tiny_imagenet(root, split, download):
    base = _root(root)
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
    return _file_dataset(
        _DirStore(base), entries, skipped=skipped, identity=["tiny-imagenet", str(base), split],
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


_BUILTINS = {
    "demo": _open_demo,
    "demo-photos": _open_demo_photos,
    "fashion-mnist": _open_fashion_mnist,
    "cifar10": _torchvision_source(CIFAR10, "CIFAR-10"),
    "cifar100": _torchvision_source(CIFAR100, "CIFAR-100"),
    "stl10": _torchvision_source(STL10, "STL-10"),
    "tiny-imagenet": _open_tiny_imagenet,
}
