"""One device resolver for the whole library: the best device by default, a clear error otherwise."""
import pytest
import torch

from itae.devices import DEVICE_TYPES, available_devices, kmeans_device, native_bf16_flags, resolve_device
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


def test_kmeans_follows_the_backbone_where_the_backend_can_run_there():
    cuda, mps, cpu = torch.device("cuda"), torch.device("mps"), torch.device("cpu")
    assert kmeans_device("torch", cuda) == kmeans_device("auto", cuda) == cuda
    assert kmeans_device("sklearn", cuda) == cpu  # scikit-learn runs on the CPU only
    assert kmeans_device("torch", mps) == kmeans_device("auto", mps) == cpu  # float64 sums: no MPS
    assert kmeans_device("sklearn", cpu) == kmeans_device("torch", cpu, "auto") == cpu
    assert kmeans_device("sklearn", cuda, "cpu") == cpu


def test_an_explicit_kmeans_device_the_backend_cannot_use_is_refused():
    with pytest.raises(DeviceError, match="scikit-learn's K-Means runs on 'cpu', got device='cuda'"):
        kmeans_device("sklearn", torch.device("cpu"), "cuda")
    with pytest.raises(DeviceError, match=r"the torch K-Means \(its sums are float64\) runs on 'cuda' or 'cpu'"):
        kmeans_device("torch", torch.device("mps"), "mps")


@pytest.mark.parametrize(
    ("capabilities", "expected"),
    [
        ({"avx512_f": True, "avx2": True, "avx512_bf16": False, "amx_bf16": False}, ()),  # Zen 3, Skylake-SP
        ({"avx512_bf16": True, "amx_bf16": False}, ("avx512_bf16",)),  # Zen 4-5, Cooper Lake
        ({"avx512_bf16": True, "amx_bf16": True, "amx_tile": True}, ("amx_bf16", "avx512_bf16")),  # Sapphire Rapids
        ({"neon": True, "bf16": True, "sve_bf16": False}, ("bf16",)),  # Arm v8.6+ (Graviton 3, Apple M2)
        ({"architecture": "x86_64"}, ()),
    ],
)
def test_native_bf16_is_read_from_the_cpu_capabilities(monkeypatch, capabilities, expected):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: capabilities)
    assert native_bf16_flags() == expected
