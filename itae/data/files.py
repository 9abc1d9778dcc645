"""Folders, zips and uploads of image files: their layout (class subfolders, splits, a labels CSV), the
stores that read their files one at a time, and the refusal of zip bombs and escaping members."""
from __future__ import annotations

import contextlib
import hashlib
import io
import os
import zipfile
from pathlib import Path, PurePosixPath, PureWindowsPath

from PIL import Image

from itae.data.dataset import ImageDataset, SkippedImage, describe, digest
from itae.data.decoding import open_image, skip_reason
from itae.data.labels import apply_labels, read_labels_csv
from itae.errors import DataSourceError

__all__ = ["MAX_ZIP_BYTES", "MAX_ZIP_RATIO", "open_uploads"]

MAX_ZIP_BYTES = 4 * 1024**3
"""Zips that would unpack to more bytes than this are refused."""
MAX_ZIP_RATIO = 100
"""Zips whose unpacked size exceeds this many times their packed size are refused."""
# Below this unpacked size a high compression ratio is harmless (a few flat images).
_ZIP_RATIO_FLOOR = 1024**2
_JUNK_NAMES = {"__MACOSX", "Thumbs.db", "desktop.ini"}


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
    store, duplicates = BytesStore({}), []
    for name, data in files:
        base = name.replace("\\", "/").rsplit("/", 1)[-1]
        if base in store.files:
            duplicates.append(SkippedImage(name, "another upload has the same file name"))
        else:
            store.files[base] = data
    entries, skipped, _ = _layout(list(store.files), "test", "the uploaded files")
    return file_dataset(store, entries, skipped=duplicates + skipped, labels_csv=labels_csv,
                         identity=["uploads"], title="Uploaded images")


class DirStore:
    """Files under a folder, keyed by their relative POSIX path."""

    def __init__(self, root):
        self.root = Path(root)

    @contextlib.contextmanager
    def open(self, key):
        with open(self.root / key, "rb") as fh:
            yield open_image(fh)

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
            yield open_image(fh)

    def signature(self, key):
        info = self.archive().getinfo(key)
        return [info.CRC, info.file_size]


class BytesStore:
    """Files held in memory, keyed by name."""

    def __init__(self, files):
        self.files = files

    def open(self, key):
        return contextlib.nullcontext(open_image(io.BytesIO(self.files[key])))

    def signature(self, key):
        return hashlib.sha256(self.files[key]).hexdigest()


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


def _readable(store, entries):
    """Keep the entries whose header opens; refuse the rest with a reason."""
    kept, refused = [], []
    for entry in entries:
        try:
            with store.open(entry[0]):
                pass
        except Exception as err:  # decoders raise assorted types on malformed files
            refused.append(SkippedImage(entry[1], skip_reason(err)))
        else:
            kept.append(entry)
    return kept, refused


def _natural_order(classes):
    """Sort class names, numerically when they are all integers ("2" before "10")."""
    if all(c.lstrip("-").isdigit() for c in classes):
        return sorted(classes, key=int)
    return sorted(classes)


def file_dataset(store, entries, *, skipped, identity, title, labels_csv=None,
                  class_order=None, class_titles=None):
    """Validate file entries and build the dataset.

    Parameters
    ----------
    store : DirStore, _ZipStore or BytesStore
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
        entries, unmatched = apply_labels(entries, read_labels_csv(labels_csv))
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
                        skipped=skipped, fingerprint=digest(identity, signatures), title=title,
                        description=describe(title, len(entries), class_names, skipped))


def _list_folder(root, allowed_roots=None):
    """The files under ``root`` (relative POSIX paths), and the links refused for leading outside.

    ``os.walk`` does not descend into linked folders; a linked file is kept only when it resolves
    inside one of ``allowed_roots`` (every linked file is kept when that is None).
    """
    paths, refused = [], []
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = [d for d in subfolders if not d.startswith(".") and d not in _JUNK_NAMES]
        relative = Path(folder).relative_to(root)
        for name in files:
            if allowed_roots is not None and not _stays_inside(Path(folder) / name, allowed_roots):
                # The target is not named: where a link points is what a visitor should not learn.
                refused.append(SkippedImage((relative / name).as_posix(),
                                            "refused: a link to a file outside the allowed folders"))
            else:
                paths.append((relative / name).as_posix())
    return paths, refused


def _stays_inside(path, roots):
    if not path.is_symlink():
        return True
    target = path.resolve()
    return any(target.is_relative_to(root) for root in roots)


def open_folder(root, labels_csv, split, allowed_roots=None):
    """A folder of images; with ``allowed_roots``, files linked from outside them are skipped."""
    where = f"folder {str(root)!r}"
    paths, refused = _list_folder(root, allowed_roots)
    entries, skipped, split_dir = _layout(paths, split, where)
    skipped = refused + skipped
    title = f"Folder '{root.name}'" + (f" {split_dir}/" if split_dir else "")
    return file_dataset(DirStore(root), entries, skipped=skipped, labels_csv=labels_csv,
                         identity=["folder", str(root), split], title=title)


def open_zip(path, labels_csv, split):
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
    return file_dataset(store, entries, skipped=escaping + skipped, labels_csv=labels_csv,
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
