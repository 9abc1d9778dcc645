"""The files shipped with itae besides its code: the demo data (``assets/``) and the dashboard (``app/``)."""
from __future__ import annotations

from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path

__all__ = ["bundled"]


def bundled(name: str) -> Traversable:
    """A folder shipped with itae, read with :mod:`importlib.resources`.

    Parameters
    ----------
    name : {"assets", "app"}

    Returns
    -------
    importlib.resources.abc.Traversable
        The folder inside the installed package; in a source checkout, where these folders sit beside
        ``itae/`` (the wheel maps them into the package), the folder there.
    """
    installed = files("itae") / name
    return installed if installed.is_dir() else Path(__file__).resolve().parent.parent / name
