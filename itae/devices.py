"""Which device a computation runs on: the one place that asks torch what this machine has."""
from __future__ import annotations

import torch

from itae.errors import DeviceError

__all__ = [
    "DEVICE_TYPES",
    "KMEANS_DEVICE_TYPES",
    "NATIVE_BF16_FLAGS",
    "available_devices",
    "kmeans_device",
    "native_bf16_flags",
    "resolve_device",
]

DEVICE_TYPES = ("cuda", "mps", "cpu")
"""Every device type itae runs on, best first."""

KMEANS_DEVICE_TYPES = ("cuda", "cpu")
"""Where the torch K-Means runs: it sums in float64, which MPS lacks."""

NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16", "bf16", "sve_bf16")
"""CPU capabilities (names of ``torch.cpu.get_capabilities()``) that compute bfloat16 in hardware: Intel AMX and
AVX512-BF16 (Intel Cooper Lake and later, AMD Zen 4 and later) on x86, the BF16 extension on Arm."""


def available_devices() -> list[str]:
    """The device types this machine offers, best first.

    Returns
    -------
    list of str
        A sublist of :data:`DEVICE_TYPES`; always ends with ``"cpu"``.
    """
    offered = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    return [kind for kind in DEVICE_TYPES if offered[kind]]


def native_bf16_flags() -> tuple[str, ...]:
    """The capabilities of :data:`NATIVE_BF16_FLAGS` this CPU has; empty where bfloat16 is emulated.

    Without them oneDNN emulates bfloat16 matrix products in float32 with conversions around them, slower
    than float32 alone; with them a bf16 matrix product runs at about twice the float32 rate (AVX512-BF16)
    or more (AMX).
    """
    capabilities = torch.cpu.get_capabilities()
    return tuple(flag for flag in NATIVE_BF16_FLAGS if capabilities.get(flag) is True)


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


def kmeans_device(backend: str, backbone_device: torch.device, device: str | torch.device | None = None) -> torch.device:
    """Where K-Means runs, decided with the backbone's device before any feature is extracted.

    By default K-Means follows the backbone where it can: onto CUDA with the torch backend, and onto
    the CPU when the backbone is on MPS (float64 sums) or the backend is scikit-learn (CPU only).

    Parameters
    ----------
    backend : {"auto", "sklearn", "torch"}
        The K-Means backend (:func:`itae.evaluate.kmeans`).
    backbone_device : torch.device
        Where the backbone runs, as :func:`resolve_device` resolved it.
    device : str or torch.device, optional
        An explicit K-Means device; None or ``"auto"`` follows the backbone as above.

    Returns
    -------
    torch.device

    Raises
    ------
    DeviceError
        If ``device`` cannot run ``backend`` (MPS; CUDA with scikit-learn) or is missing from this machine.
    """
    supported = ("cpu",) if backend == "sklearn" else KMEANS_DEVICE_TYPES
    purpose = "scikit-learn's K-Means" if backend == "sklearn" else "the torch K-Means (its sums are float64)"
    if device is not None and device != "auto":
        return resolve_device(device, supported=supported, purpose=purpose)
    return backbone_device if backbone_device.type in supported else torch.device("cpu")
