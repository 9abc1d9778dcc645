import os
import socket
import subprocess
import sys
import time

import pytest
import timm
import torch
from huggingface_hub import constants as hf_constants
from PIL import Image
from safetensors.torch import save_file
from timm.models import get_pretrained_cfg

from itae.backbones import load_backbone
from itae.errors import BackboneError
from itae.registry import REGISTRY, get_spec


def test_registry_holds_the_papers_models_and_thetas():
    pretrained = set(timm.list_pretrained())
    for spec in REGISTRY.values():
        assert spec.timm_id in pretrained, spec.timm_id
    thetas = {name: spec.default_theta for name, spec in REGISTRY.items()}
    assert thetas["dinov2_vits14"] is None  # the paper found no bimodality there
    assert thetas["dinov2_vits14_reg"] == 2.0
    for size in "blg":
        assert thetas[f"dinov2_vit{size}14"] == 3.0 and thetas[f"dinov2_vit{size}14_reg"] == 3.0
    assert {spec.num_registers for name, spec in REGISTRY.items() if name.endswith("_reg")} == {4}
    assert {"clip_vitb16", "deit3_vitb16"} <= set(REGISTRY)


def test_random_backbone_and_preprocessing():
    backbone = load_backbone("dinov2_vits14_reg", weights="random", device="cpu")
    assert not backbone.model.training and backbone.num_prefix_tokens == 5 and backbone.grid_size == (16, 16)
    image = Image.new("RGB", (50, 30), (255, 0, 0))
    tensor = backbone.preprocess(image)
    assert tensor.shape == (3, 224, 224) and tensor.dtype == torch.float32
    # ImageNet normalisation of pure red: (1 - 0.485) / 0.229 on the red channel.
    assert tensor[0].mean().item() == pytest.approx((1 - 0.485) / 0.229, abs=1e-3)
    assert "random" in backbone.label


def test_clear_errors():
    with pytest.raises(BackboneError, match="known models: dinov2_vits14"):
        load_backbone("resnet50", weights="random")
    with pytest.raises(BackboneError, match="does not exist"):
        load_backbone("dinov2_vits14", weights="/nonexistent/weights.pth")
    with pytest.raises(BackboneError, match="only for dinov2_vits14"):
        load_backbone("dinov2_vitb14", weights="demo")


@pytest.fixture
def no_network(monkeypatch):
    """Every attempt to resolve a name or open a connection is recorded and refused."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access is forbidden in this test")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    return attempts


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty huggingface_hub cache (read at call time, as HF_HUB_CACHE sets it at import)."""
    folder = tmp_path / "hub"
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(folder))
    return folder


def test_unreachable_hub_fails_fast_and_names_the_alternatives(no_network, hub_cache):
    start = time.monotonic()
    with pytest.raises(BackboneError) as error:
        load_backbone("dinov2_vits14", weights=None, device="cpu")
    # One attempt: huggingface_hub's retries of a refused connection would wait 1 + 2 + 4 + 8 + 8 s per file.
    assert time.monotonic() - start < 10 and no_network
    message = str(error.value)
    assert "unreachable" in message and "weights=PATH" in message and "weights='demo'" in message


def test_hf_hub_offline_gives_the_offline_message_without_touching_the_network(tmp_path):
    probe = (
        "import socket\n"
        "def refuse(*args, **kwargs):\n"
        "    raise AssertionError('the network was touched')\n"
        "socket.getaddrinfo = socket.create_connection = socket.socket.connect = refuse\n"
        "from itae.backbones import load_backbone\n"
        "from itae.errors import BackboneError\n"
        "try:\n"
        "    load_backbone('dinov2_vitb14', weights='hub', device='cpu')\n"
        "except BackboneError as error:\n"
        "    print(error)\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "hub"))
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    message = done.stdout.strip()
    assert message.startswith("the Hugging Face hub is switched off (HF_HUB_OFFLINE)"), message
    assert "dinov2_vitb14" in message and "weights=PATH" in message and "AssertionError" not in done.stderr


def test_offline_hub_weights_load_from_the_hub_cache(no_network, hub_cache, monkeypatch):
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    spec = get_spec("dinov2_vits14")
    snapshot = hub_cache / f"models--{spec_repo(spec).replace('/', '--')}" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)
    reference = load_backbone("dinov2_vits14", weights="random", device="cpu")
    save_file(reference.model.state_dict(), snapshot / "model.safetensors")
    loaded = load_backbone("dinov2_vits14", weights="hub", device="cpu")
    assert loaded.weights == "hub" and not no_network
    for name, tensor in reference.model.state_dict().items():
        torch.testing.assert_close(loaded.model.state_dict()[name], tensor, atol=0, rtol=0)


def spec_repo(spec):
    return get_pretrained_cfg(spec.timm_id).hf_hub_id


def test_a_mismatched_file_says_so(tmp_path):
    small = load_backbone("dinov2_vits14", weights="random")
    path = tmp_path / "vits14.pth"
    torch.save(small.model.state_dict(), path)
    with pytest.raises(BackboneError, match="does not fit dinov2_vitb14"):
        load_backbone("dinov2_vitb14", weights=str(path))
    loaded = load_backbone("dinov2_vits14", weights=str(path))
    for name, tensor in small.model.state_dict().items():
        torch.testing.assert_close(loaded.model.state_dict()[name], tensor, atol=0, rtol=0)
