import time

import pytest
import timm
import torch
from PIL import Image

from itae import backbones
from itae.backbones import REGISTRY, BackboneError, load_backbone


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


def test_unreachable_hub_fails_fast_and_names_the_alternatives(monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "https://127.0.0.1:9")  # nothing listens there
    monkeypatch.setattr(backbones, "_cached_hub_file", lambda repo: None)
    start = time.monotonic()
    with pytest.raises(BackboneError) as error:
        load_backbone("dinov2_vits14", weights=None, device="cpu")
    assert time.monotonic() - start < 30
    message = str(error.value)
    assert "unreachable" in message and "weights=PATH" in message and "demo" in message


def test_a_mismatched_file_says_so(tmp_path):
    small = load_backbone("dinov2_vits14", weights="random")
    path = tmp_path / "vits14.pth"
    torch.save(small.model.state_dict(), path)
    with pytest.raises(BackboneError, match="does not fit dinov2_vitb14"):
        load_backbone("dinov2_vitb14", weights=str(path))
    loaded = load_backbone("dinov2_vits14", weights=str(path))
    for name, tensor in small.model.state_dict().items():
        torch.testing.assert_close(loaded.model.state_dict()[name], tensor, atol=0, rtol=0)
