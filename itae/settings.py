"""Paths and defaults: the one place that reads itae's environment variables.

``ITAE_CACHE_DIR``
    Features and the converted demo weights; default ``~/.cache/itae``.
``ITAE_DATA_ROOT``
    The built-in datasets (CIFAR, STL-10, ...); default ``<cache dir>/datasets``.
``ITAE_ALLOWED_ROOTS``
    Folders a server may open for its visitors, separated by ``os.pathsep``; default none: a server opens
    no folder of its own for a visitor.
``ITAE_KEEP_UPLOAD_FEATURES``
    ``1`` (or ``true``, ``yes``, ``on``) keeps the features of uploaded images in the shared cache; by
    default they belong to the visitor's session only.
``ITAE_APP_WEIGHTS``, ``ITAE_APP_LIMIT``
    The weights and the subset size a fresh dashboard session starts with; default the default model's
    :func:`default_weights` and 200 images.
``ITAE_APP_PLANTED``
    ``0`` (or ``false``, ``no``, ``off``) opens a fresh dashboard session on the model as loaded; by
    default it opens on the teaching model, the same model with planted artifacts (:mod:`itae.planted`).

Every function reads the environment when it is called, so a test or a server's start script can set a
variable at any time before the call. Nothing heavy is imported here.
"""
from __future__ import annotations

import os
from pathlib import Path

from itae.errors import PathNotAllowedError
from itae.registry import get_spec

__all__ = [
    "ALLOWED_ROOTS_VARIABLE",
    "APP_PLANTED_VARIABLE",
    "APP_SUBSET_SIZE_VARIABLE",
    "APP_WEIGHTS_VARIABLE",
    "CACHE_DIR_VARIABLE",
    "DATA_ROOT_VARIABLE",
    "DEFAULT_MODEL",
    "KEEP_UPLOAD_FEATURES_VARIABLE",
    "allowed_roots",
    "app_planted",
    "app_subset_size",
    "app_weights",
    "cache_dir",
    "data_root",
    "default_weights",
    "keep_upload_features",
    "resolve_allowed_path",
]

CACHE_DIR_VARIABLE = "ITAE_CACHE_DIR"
DATA_ROOT_VARIABLE = "ITAE_DATA_ROOT"
ALLOWED_ROOTS_VARIABLE = "ITAE_ALLOWED_ROOTS"
KEEP_UPLOAD_FEATURES_VARIABLE = "ITAE_KEEP_UPLOAD_FEATURES"
APP_WEIGHTS_VARIABLE = "ITAE_APP_WEIGHTS"
APP_SUBSET_SIZE_VARIABLE = "ITAE_APP_LIMIT"
APP_PLANTED_VARIABLE = "ITAE_APP_PLANTED"

DEFAULT_MODEL = "dinov2_vits14"
"""The model both front-ends start with: the only one with offline demo weights."""
DEFAULT_APP_SUBSET_SIZE = 200
"""Images a fresh dashboard session extracts: enough for the histograms, quick on a CPU."""

_TRUE_WORDS = {"1", "true", "yes", "on"}
_FALSE_WORDS = {"0", "false", "no", "off"}


def cache_dir(override: str | os.PathLike | None = None) -> Path:
    """Root of the on-disk caches: ``features/`` (extractions) and ``weights/`` (converted demo weights).

    Parameters
    ----------
    override : str or os.PathLike, optional
        A folder given explicitly (``--cache-dir``); it wins over the environment.

    Returns
    -------
    pathlib.Path
        ``override``, else ``$ITAE_CACHE_DIR``, else ``~/.cache/itae``; ``~`` expanded.
    """
    chosen = override if override is not None else os.environ.get(CACHE_DIR_VARIABLE) or Path.home() / ".cache" / "itae"
    return Path(chosen).expanduser()


def data_root(override: str | os.PathLike | None = None) -> Path:
    """Folder where the built-in datasets are looked for, and downloaded to.

    Parameters
    ----------
    override : str or os.PathLike, optional
        A folder given explicitly (``--root``); it wins over the environment.

    Returns
    -------
    pathlib.Path
        ``override``, else ``$ITAE_DATA_ROOT``, else ``<cache_dir()>/datasets``; ``~`` expanded.
    """
    chosen = override if override is not None else os.environ.get(DATA_ROOT_VARIABLE) or cache_dir() / "datasets"
    return Path(chosen).expanduser()


def default_weights(model: str) -> str:
    """The weights a model loads with when none are named: its offline demo where it has one, else the hub.

    Parameters
    ----------
    model : str
        A registry name.

    Returns
    -------
    {"demo", "hub"}

    Raises
    ------
    BackboneError
        If ``model`` is not in the registry.
    """
    return "demo" if get_spec(model).demo_weights else "hub"


def app_weights() -> str:
    """The weights a fresh dashboard session loads the default model with.

    Returns
    -------
    str
        ``$ITAE_APP_WEIGHTS`` ("demo", "hub", "random" or a checkpoint file), else
        ``default_weights(DEFAULT_MODEL)``.
    """
    return os.environ.get(APP_WEIGHTS_VARIABLE) or default_weights(DEFAULT_MODEL)


def app_subset_size() -> int:
    """The number of images a fresh dashboard session extracts.

    Returns
    -------
    int
        ``$ITAE_APP_LIMIT``, else :data:`DEFAULT_APP_SUBSET_SIZE`.

    Raises
    ------
    ValueError
        If the variable is not a positive whole number.
    """
    text = os.environ.get(APP_SUBSET_SIZE_VARIABLE) or str(DEFAULT_APP_SUBSET_SIZE)
    if not text.strip().isdigit() or int(text) < 1:
        raise ValueError(f"{APP_SUBSET_SIZE_VARIABLE} must be a positive whole number, got {text!r}")
    return int(text)


def app_planted() -> bool:
    """Whether a fresh dashboard session opens on the teaching model, with planted artifacts.

    A newcomer's first screen then shows what ITAE finds and removes; the model as loaded (the demo
    weights have no artifacts) is one click away.

    Returns
    -------
    bool
        False when ``$ITAE_APP_PLANTED`` is ``0``, ``false``, ``no`` or ``off``; True when it is unset,
        empty, ``1``, ``true``, ``yes`` or ``on``.

    Raises
    ------
    ValueError
        If the variable holds any other word.
    """
    text = os.environ.get(APP_PLANTED_VARIABLE, "").strip().lower()
    if text in _FALSE_WORDS:
        return False
    if not text or text in _TRUE_WORDS:
        return True
    raise ValueError(f"{APP_PLANTED_VARIABLE} must be 1 or 0 (true/false, yes/no, on/off), got {text!r}")


def allowed_roots() -> tuple[Path, ...]:
    """The folders a server lets its visitors open, from ``$ITAE_ALLOWED_ROOTS``.

    Returns
    -------
    tuple of pathlib.Path
        Resolved (symlinks followed), in the order given; empty, the default, when the variable is unset
        or empty, which means no server folder may be opened.
    """
    text = os.environ.get(ALLOWED_ROOTS_VARIABLE, "")
    return tuple(Path(part).expanduser().resolve() for part in text.split(os.pathsep) if part.strip())


def resolve_allowed_path(path: str | os.PathLike, roots: tuple[str | os.PathLike, ...] | None = None) -> Path:
    """Resolve a path a visitor typed, and refuse it unless it stays inside an allowed root.

    The path is resolved the way the operating system would open it: ``~`` expanded, ``..`` and every
    symlink followed. A relative path is taken relative to the first allowed root.

    Parameters
    ----------
    path : str or os.PathLike
        What the visitor typed: a folder, a zip or a labels CSV on the server.
    roots : tuple of str or os.PathLike, optional
        The allowed roots; default :func:`allowed_roots`.

    Returns
    -------
    pathlib.Path
        The resolved path, inside one of the roots. It need not exist: opening it reports that.

    Raises
    ------
    PathNotAllowedError
        If no root is allowed, the path is empty, or it resolves outside every root.
    """
    roots = allowed_roots() if roots is None else tuple(Path(root).expanduser().resolve() for root in roots)
    if not roots:
        raise PathNotAllowedError(
            f"folders on this server are switched off; the operator can allow some by setting "
            f"{ALLOWED_ROOTS_VARIABLE} to folders separated by {os.pathsep!r}"
        )
    text = os.fspath(path).strip()
    if not text:
        raise PathNotAllowedError("no path was given; type a folder, a .zip or a CSV inside " + _listing(roots))
    resolved = (roots[0] / Path(text).expanduser()).resolve()  # an absolute path replaces roots[0]
    if any(resolved.is_relative_to(root) for root in roots):
        return resolved
    # The resolved target is not named: it may be where a symlink points, which the visitor should not learn.
    raise PathNotAllowedError(
        f"{text!r} is outside the folders this server allows (symlinks and '..' are followed); "
        f"use a path inside {_listing(roots)}"
    )


def keep_upload_features() -> bool:
    """Whether the features of uploaded images may stay in the shared cache after the visitor leaves.

    Returns
    -------
    bool
        True when ``$ITAE_KEEP_UPLOAD_FEATURES`` is ``1``, ``true``, ``yes`` or ``on``; False by default.
    """
    return os.environ.get(KEEP_UPLOAD_FEATURES_VARIABLE, "").strip().lower() in _TRUE_WORDS


def _listing(roots: tuple[Path, ...]) -> str:
    return " or ".join(str(root) for root in roots)
