"""Writing a file so that no reader ever sees half of it, and no failure leaves a piece of it behind."""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_directory", "atomic_path"]


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


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike) -> Iterator[Path]:
    """A temporary folder beside ``target`` that replaces the folder ``target`` when the block ends without error.

    As :func:`atomic_path`, for a folder of files: the new folder is renamed into place, so a reader finds
    the old folder or the whole new one, never a half-written one; on any failure the temporary folder is
    removed and ``target`` is left as it was. An old ``target`` is first renamed aside, then deleted: files a
    reader has open or memory-mapped stay readable until it closes them (POSIX).

    Parameters
    ----------
    target : str or os.PathLike
        The folder to write; its parent is created if missing.

    Yields
    ------
    pathlib.Path
        An empty folder to write the files into.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part"))
    aside = None
    try:
        yield temporary
        temporary.chmod(0o755)  # mkdtemp makes it private to its user; the cache is shared like any folder
        while True:  # a loop: another writer may put its own folder in place between our two renames
            try:
                os.replace(temporary, target)
                break
            except OSError as error:
                if error.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
                aside = aside or Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".old"))
                with contextlib.suppress(FileNotFoundError):
                    os.replace(target, aside / str(len(os.listdir(aside))))
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    finally:
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
