"""One device resolver for the whole library: the best device by default, a clear error otherwise."""
import pytest
import torch

from itae.devices import DEVICE_TYPES, available_devices, resolve_device
from itae.errors import DeviceError, ItaeError


def test_the_best_available_device_by_default():
    devices = available_devices()
    assert devices[-1] == "cpu" and set(devices) <= set(DEVICE_TYPES)
    assert resolve_device() == resolve_device("auto") == torch.device(devices[0])
    assert resolve_device(None, supported=("cpu",)) == torch.device("cpu")


def test_a_device_is_checked_against_the_machine_and_the_computation():
    assert resolve_device("cpu") == torch.device("cpu")
    missing = next((kind for kind in ("cuda", "mps") if kind not in available_devices()), None)
    if missing is not None:
        with pytest.raises(DeviceError, match=f"this machine has no {missing.upper()}"):
            resolve_device(missing)
    with pytest.raises(DeviceError, match="the K-Means runs on 'cpu' or 'cuda', got device='mps'"):
        resolve_device("mps", supported=("cpu", "cuda"), purpose="the K-Means")
    with pytest.raises(DeviceError, match="'gpu' is not a device"):
        resolve_device("gpu")
    assert issubclass(DeviceError, ItaeError) and issubclass(DeviceError, ValueError)
