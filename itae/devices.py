"""Which device a computation runs on: the one place that asks torch what this machine has."""
from __future__ import annotations

import torch

from itae.errors import DeviceError

__all__ = ["DEVICE_TYPES", "available_devices", "resolve_device"]

DEVICE_TYPES = ("cuda", "mps", "cpu")
"""Every device type itae runs on, best first."""


def available_devices() -> list[str]:
    """The device types this machine offers, best first.

    Returns
    -------
    list of str
        A sublist of :data:`DEVICE_TYPES`; always ends with ``"cpu"``.
    """
    offered = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    return [kind for kind in DEVICE_TYPES if offered[kind]]


def resolve_device(
    device: str | torch.device | None = None, supported: tuple[str, ...] = DEVICE_TYPES, purpose: str = "itae"
) -> torch.device:
    """The device to run on: the one asked for after checking it, or the best available.

    Parameters
    ----------
    device : str or torch.device, optional
        ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``; None or ``"auto"`` picks the best available
        among ``supported``.
    supported : tuple of str
        The device types the computation can use, e.g. ``("cuda", "cpu")`` where it needs float64.
    purpose : str
        What runs, for the message of an unsupported device.

    Returns
    -------
    torch.device

    Raises
    ------
    DeviceError
        If ``device`` is not a device name, is not supported, or is missing from this machine.
    """
    available = available_devices()
    if device is None or device == "auto":
        return torch.device(next(kind for kind in available if kind in supported))
    try:
        chosen = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise DeviceError(f"{str(device)!r} is not a device; use one of {', '.join(DEVICE_TYPES)} ({error})") from None
    if chosen.type not in supported:
        names = " or ".join(repr(kind) for kind in supported)
        raise DeviceError(f"{purpose} runs on {names}, got device={str(device)!r}")
    if chosen.type not in available:
        raise DeviceError(f"device {chosen} was asked for but this machine has no {chosen.type.upper()}; "
                          f"use one of {', '.join(available)}")
    return chosen
