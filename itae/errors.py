"""The errors itae raises for what a user gave it: one base class that every front-end catches.

Every error here says in its message what to do instead; a front-end shows that message and never a
traceback. Importing this module loads nothing heavy, so the command line can catch these errors before
it has imported torch.
"""
from __future__ import annotations

__all__ = [
    "USER_ERRORS",
    "BackboneError",
    "CheckpointError",
    "DataSourceError",
    "DeviceError",
    "ItaeError",
    "PathNotAllowedError",
    "StaleCacheError",
    "UnreadableImage",
]


class ItaeError(Exception):
    """Base class of every error itae raises for a user's input, files, weights or machine."""


class DataSourceError(ItaeError):
    """A source cannot be opened; the message says what to do about it."""


class UnreadableImage(DataSourceError):
    """One image failed when decoded: skip it and report it.

    Parameters
    ----------
    name : str
        The image's name in its source.
    reason : str
        Why it cannot be used, in plain words.
    """

    def __init__(self, name: str, reason: str):
        super().__init__(f"{name}: {reason}")
        self.name, self.reason = name, reason


class PathNotAllowedError(DataSourceError):
    """A path on the server lies outside the folders the operator allowed (or none are allowed)."""


class BackboneError(ItaeError):
    """A backbone could not be loaded; the message says what to do instead."""


class CheckpointError(ItaeError):
    """A checkpoint file cannot be read or does not fit the requested model."""


class StaleCacheError(ItaeError):
    """A saved extraction belongs to another model, weights, dataset or preprocessing."""


class DeviceError(ItaeError, ValueError):
    """A device was asked for that this machine lacks or that the computation cannot use."""


USER_ERRORS = (ItaeError, ValueError, OSError)
"""What a front-end reports as a message: itae's own errors, the argument checks of its functions
(``ValueError``, scikit-learn style, with a message naming the argument) and files that cannot be read
or written (``OSError``)."""
