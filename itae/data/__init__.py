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

Modules: :mod:`~itae.data.sources` (the registry of built-in sources and ``open_source``),
:mod:`~itae.data.files` (folders, zips, uploads), :mod:`~itae.data.labels` (the labels
CSV), :mod:`~itae.data.decoding` (one image, safely) and :mod:`~itae.data.dataset`
(``ImageDataset`` and ``balanced_subset``).
"""
from itae.data.dataset import ImageDataset, SkippedImage, balanced_subset
from itae.data.decoding import MAX_IMAGE_PIXELS, to_rgb
from itae.data.files import MAX_ZIP_BYTES, MAX_ZIP_RATIO, open_uploads
from itae.data.sources import SOURCES, SourceSpec, get_source, open_source
from itae.errors import DataSourceError, UnreadableImage

__all__ = [
    "MAX_IMAGE_PIXELS",
    "MAX_ZIP_BYTES",
    "MAX_ZIP_RATIO",
    "SOURCES",
    "DataSourceError",
    "ImageDataset",
    "SkippedImage",
    "SourceSpec",
    "UnreadableImage",
    "balanced_subset",
    "get_source",
    "open_source",
    "open_uploads",
    "to_rgb",
]
