"""Labels from a CSV of ``filename,label`` rows, for folders, zips and uploads without class subfolders."""
from __future__ import annotations

import contextlib
import csv
import io
from pathlib import Path

from itae.data.dataset import SkippedImage
from itae.errors import DataSourceError

_CSV_HEADER_NAMES = {"filename", "file", "file_name", "name", "path", "image", "image_name"}
_LABEL_HEADER_NAMES = {"label", "class", "class_name", "category", "target"}
_OTHER_SEPARATORS = {";": "semicolons", "\t": "tabs", "|": "bars"}


def read_labels_csv(labels_csv):
    """Parse ``filename,label`` rows (header optional) into {filename: label}.

    Parameters
    ----------
    labels_csv : str, os.PathLike or bytes
        A CSV file, or its content as uploaded.

    Returns
    -------
    dict of str to str

    Raises
    ------
    DataSourceError
        If it is not a file, not text (a spreadsheet, an image, an archive), not comma-separated, or a row
        lacks a file name or a label; the message says which and how to fix it.
    """
    if isinstance(labels_csv, bytes):
        data, where = labels_csv, "the labels CSV"
    else:
        path = Path(labels_csv).expanduser()
        if not path.is_file():
            problem = "is a folder, not a file" if path.is_dir() else "does not exist"
            raise DataSourceError(f"labels_csv {str(path)!r} {problem}; pass a CSV file of filename,label rows")
        data, where = path.read_bytes(), f"labels_csv {str(path)!r}"
    text = _csv_text(data, where)
    rows = [(n, [c.strip() for c in row]) for n, row in enumerate(csv.reader(io.StringIO(text)), 1)]
    rows = [(n, cells) for n, cells in rows if any(cells)]
    if rows and _is_header(rows[0][1]):
        rows = rows[1:]
    mapping = {}
    for line, cells in rows:
        if len(cells) < 2 or not cells[0] or not cells[1]:
            raise DataSourceError(f"{where}, line {line}: expected filename,label (two comma-separated "
                                  f"columns), got {','.join(cells)!r}{_separator_hint(cells)}")
        name, label = cells[0].replace("\\", "/"), cells[1]
        if mapping.setdefault(name, label) != label:
            raise DataSourceError(f"{where} gives {name!r} two labels: {mapping[name]!r} and "
                                  f"{label!r}")
    if not mapping:
        raise DataSourceError(f"{where} has no filename,label rows")
    return mapping


def _csv_text(data, where):
    """The text of a CSV file, refusing binary files (spreadsheets, images, archives) in plain words."""
    if b"\x00" not in data:
        with contextlib.suppress(UnicodeDecodeError):
            return data.decode("utf-8-sig")
    raise DataSourceError(f"{where} is not a text CSV file (it looks binary: a spreadsheet, an image or an "
                          f"archive?); save it as CSV, UTF-8, with filename,label rows")


def _is_header(cells):
    return cells[0].lower() in _CSV_HEADER_NAMES or (len(cells) > 1 and cells[1].lower() in _LABEL_HEADER_NAMES)


def _separator_hint(cells):
    found = [words for separator, words in _OTHER_SEPARATORS.items() if separator in cells[0]]
    return f"; the columns seem separated by {found[0]}, use commas instead" if len(cells) == 1 and found else ""


def apply_labels(entries, mapping):
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
