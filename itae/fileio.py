"""Writing a file so that no reader ever sees half of it, and no failure leaves a piece of it behind."""
from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_path"]


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside ``target`` that replaces ``target`` when the block ends without error.

    The temporary file lives in ``target``'s folder, so the final ``os.replace`` is atomic: a reader sees
    the old file or the whole new one, and two writers at once each leave a complete file. On any failure,
    an interrupt included, the temporary file is removed and ``target`` is left as it was: features of a
    large data set make a multi-GB file, which must not linger after a full disk or a Ctrl-C.

    Parameters
    ----------
    target : str or os.PathLike
        The file to write; its folder is created if missing.

    Yields
    ------
    pathlib.Path
        An empty file to write to (by its name, or opened in binary mode).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    os.close(handle)
    temporary = Path(name)
    try:
        yield temporary
        temporary.chmod(0o644)  # mkstemp makes it private to its user; the cache is shared like any file
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
