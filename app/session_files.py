"""A folder for one browser session's own files, the features of its uploads, removed when the session ends.

Streamlit releases a session-scoped resource when its browser disconnects or the session shuts down
(``st.cache_resource(scope="session", on_release=...)``); the folder's finalizer also runs when the
object is garbage-collected or the server exits normally. A server that was killed leaves its folders
behind: the first session of the next server removes those whose process is gone.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from pathlib import Path

import streamlit as st

__all__ = ["SessionFolder", "remove_orphans", "session_folder"]


class SessionFolder:
    """A private temporary folder under ``parent``, named after the server process that made it.

    Attributes
    ----------
    path : the folder (mode 0700, as ``tempfile.mkdtemp`` makes it)
    """

    def __init__(self, parent: Path):
        parent.mkdir(parents=True, exist_ok=True)
        # The process id leads the name, so that a later server can tell which folders lost their owner.
        self.path = Path(tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=parent))
        self._finalizer = weakref.finalize(self, shutil.rmtree, self.path, ignore_errors=True)

    def remove(self) -> None:
        """Delete the folder and everything in it; later calls do nothing."""
        self._finalizer()


def remove_orphans(parent: Path) -> list[Path]:
    """Delete the session folders under ``parent`` whose server process is no longer running; returns them."""
    if os.name != "posix" or not parent.is_dir():
        # os.kill(pid, 0) only asks about a process on POSIX; on Windows it would signal it.
        return []
    orphans = [folder for folder in parent.iterdir() if folder.is_dir() and not _owner_running(folder)]
    for folder in orphans:
        shutil.rmtree(folder, ignore_errors=True)
    return orphans


def _owner_running(folder: Path) -> bool:
    pid = folder.name.split("-", 1)[0]
    if not pid.isdigit():
        return True  # not one of ours: leave it alone
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


@st.cache_resource(show_spinner=False)
def _orphans_removed(parent: str) -> bool:
    """Once per server process and folder."""
    remove_orphans(Path(parent))
    return True


@st.cache_resource(scope="session", on_release=SessionFolder.remove, show_spinner=False)
def session_folder(parent: str) -> SessionFolder:
    """This browser session's folder under ``parent``, made on first use and removed when the session ends."""
    _orphans_removed(parent)
    return SessionFolder(Path(parent))
