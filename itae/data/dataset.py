"""The one kind of dataset every source becomes, and the class-balanced subset of one."""
from __future__ import annotations

import contextlib
import hashlib
import json
from typing import NamedTuple

import numpy as np
from PIL import Image

from itae.data.decoding import skip_reason, to_rgb
from itae.errors import UnreadableImage

__all__ = ["ImageDataset", "SkippedImage", "balanced_subset"]


class SkippedImage(NamedTuple):
    """A file refused when its source was opened, and why."""

    name: str
    reason: str


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
        Human-readable one-liner with the source's counts, e.g. "Folder 'pets', 120 images, 3 classes,
        2 skipped".
    title : str
        What the images are, without counts: "Folder 'pets'", or for a subset "Folder 'pets'; balanced
        subset of 20 (seed 0)". An extraction states its own counts after it (:func:`describe`) where
        images could not be decoded, so that no count it shows is one the decoding disproved.
    """

    def __init__(self, store, keys, names, *, labels=None, class_names=None, skipped=(),
                 fingerprint, description, title):
        self._store = store
        self._keys = list(keys)
        self.names = list(names)
        self.labels = None if labels is None else np.asarray(labels, dtype=np.int64)
        self.class_names = None if class_names is None else [str(c) for c in class_names]
        self.skipped = list(skipped)
        self.fingerprint = fingerprint
        self.description = description
        self.title = title

    @classmethod
    def from_arrays(cls, images, labels=None, class_names=None, names=None, title="In-memory images"):
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
        title : str, optional
            What the images are, the start of the description.

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
        fingerprint = digest(_array_digest(images), None if labels is None else labels.tobytes(),
                              class_names, names)
        return cls(_ArrayStore(images), range(len(images)), names, labels=labels,
                   class_names=class_names, fingerprint=fingerprint, title=title,
                   description=describe(title, len(images), class_names, []))

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
            raise UnreadableImage(self.names[i], skip_reason(err)) from err

    def _take(self, indices, fingerprint, description, title):
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
            title=title,
        )


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
    fingerprint = digest(ds.fingerprint, "subset", indices.astype(np.int64).tobytes())
    subset = f"balanced subset of {limit:,} (seed {seed})"
    return ds._take(indices, fingerprint, f"{ds.description}; {subset}", f"{ds.title}; {subset}")


class _ArrayStore:
    """Images in a uint8 array of shape (n_images, height, width[, 3])."""

    def __init__(self, images):
        self.images = images

    def open(self, key):
        return contextlib.nullcontext(Image.fromarray(np.ascontiguousarray(self.images[key])))


def digest(*parts):
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


def describe(title, n_images, class_names, skipped):
    """One line such as "Folder 'pets', 120 images, 3 classes, 2 skipped"."""
    text = f"{title}, {n_images:,} images, "
    text += f"{len(class_names)} classes" if class_names else "unlabeled"
    return text + (f", {len(skipped)} skipped" if skipped else "")
