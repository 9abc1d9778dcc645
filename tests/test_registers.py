"""Test-time registers: the calibration finds a planted register neuron, and the batched forward pass moves it."""
import numpy as np
import pytest
import torch

from itae import registers
from itae.backbones import Backbone, make_preprocess
from itae.data import ImageDataset
from itae.planted import fired_tokens, planted_mask
from itae.registers import (
    RegisterNeurons,
    calibrated_register_neurons,
    find_register_neurons,
    mlp_readout,
    neuron_activations,
    tokens_with_test_time_register,
)
from itae.registry import BackboneSpec
from test_planted import half_flat_images, planted_tiny, tiny_vit

NO_NEURONS = RegisterNeurons((), (), 1, 1.0, 0, 0)


def batch(preprocess, n=8, seed=0):
    return torch.stack([preprocess(image) for image in half_flat_images(n, seed)])


@pytest.fixture(scope="module", params=[{}, {"swiglu": True}, {"registers": 2}], ids=["gelu", "swiglu", "registers"])
def planted(request):
    model, preprocess, planting = planted_tiny(**request.param)
    batches = [batch(preprocess, 8, seed) for seed in range(3)]
    return model, preprocess, planting, find_register_neurons(model, batches, top_k=5)


def test_the_calibration_finds_the_planted_neuron(planted):
    model, _, planting, neurons = planted
    planted_unit = model.blocks[planting.block].mlp.fc2.in_features - 1  # plant_artifacts adds the LAST hidden unit
    assert neurons.units == ((planting.block, planted_unit),), neurons
    assert neurons.outlier_block == len(model.blocks) - 2 and neurons.outlier_tokens > 0
    assert neurons.scores[0] == pytest.approx(planting.magnitude, rel=1e-3), "its activation where it fires"


def test_the_batched_forward_equals_one_image_at_a_time(planted):
    model, preprocess, _, neurons = planted
    x = batch(preprocess, 6, seed=5)
    together = tokens_with_test_time_register(model, x, neurons)
    one_by_one = torch.cat([tokens_with_test_time_register(model, x[i : i + 1], neurons) for i in range(len(x))])
    assert together.shape == (6, model.num_prefix_tokens + 64 + 1, model.embed_dim)
    torch.testing.assert_close(together, one_by_one, atol=1e-5, rtol=0)


def test_the_outliers_move_to_the_register_token(planted):
    model, preprocess, planting, neurons = planted
    x = batch(preprocess, 6, seed=7)
    truth = planted_mask(model, x)
    outputs = {}
    assert list(neurons.by_block()) == [planting.block]
    # The planted block runs with its register units moved; the next block runs as timm's and sees its output.
    hook = model.blocks[planting.block + 1].register_forward_pre_hook(lambda module, args: outputs.setdefault("x", args[0]))
    entering = {}
    first = model.blocks[0].register_forward_pre_hook(lambda module, args: entering.setdefault("x", args[0]))
    try:
        tokens_with_test_time_register(model, x, neurons)
    finally:
        hook.remove()
        first.remove()
    prefix = model.num_prefix_tokens
    torch.testing.assert_close(entering["x"][:, -1], entering["x"][:, prefix:-1].mean(1), atol=1e-6, rtol=0)
    norms = outputs["x"].norm(dim=-1)  # B, T + 1: the residual stream leaving the planted block
    assert truth.any() and norms[:, :-1][truth].max() < 0.2 * planting.magnitude, "no patch carries the outlier"
    fired = truth.any(1)  # where the neuron fires nowhere, its largest activation is 0 and nothing moves
    assert norms[fired, -1].min() > 0.9 * planting.magnitude, "the test-time register does"
    # The planted neuron still fires on the same patches, never on the appended register.
    latest = fired_tokens(model)
    assert latest.shape == (6, truth.shape[1] + 1) and torch.equal(latest[:, :-1], truth) and not latest[:, -1].any()


def test_the_calibration_ranks_units_by_the_size_of_their_activation():
    model, preprocess, planting = planted_tiny(swiglu=True)
    mlp = model.blocks[planting.block].mlp
    with torch.no_grad():  # the same write into the residual stream, by a negative activation: act(gate) * -1
        mlp.fc1.bias[-1] = -1.0
        mlp.fc2.weight[:, -1] *= -1
    neurons = find_register_neurons(model, [batch(preprocess, 8, seed) for seed in range(3)], top_k=5)
    assert neurons.units == ((planting.block, mlp.fc2.in_features - 1),)


def test_without_register_neurons_the_model_runs_unmodified_bit_for_bit():
    model = tiny_vit(registers=2)
    x = batch(make_preprocess(model, 56), 3)
    assert torch.equal(tokens_with_test_time_register(model, x, NO_NEURONS), model.forward_features(x))


def test_a_model_without_outliers_has_no_register_neurons():
    model = tiny_vit()
    preprocess = make_preprocess(model, 56)
    neurons = find_register_neurons(model, [batch(preprocess, 8, seed) for seed in range(2)])
    assert neurons.units == () and neurons.outlier_tokens == 0
    assert "no register neurons" in neurons.describe()


@pytest.mark.parametrize("kwargs", [{}, {"swiglu": True}])
def test_the_hidden_units_and_the_readout_are_the_mlp(kwargs):
    block = tiny_vit(**kwargs).blocks[1]
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        assert torch.equal(mlp_readout(block.mlp, neuron_activations(block.mlp, x)), block.mlp(x))
    with pytest.raises(TypeError, match="Mlp, GluMlp or SwiGLU"):
        neuron_activations(torch.nn.Linear(2, 2), x)


def test_the_calibration_is_cached_per_model_weights_and_calibration_set(tmp_path, monkeypatch):
    model, preprocess, _ = planted_tiny()
    spec = BackboneSpec("tiny", "vit_tiny_test", "tiny test ViT", 0, None, img_size=56)
    backbone = Backbone(spec, model, preprocess, "random", spec.label, torch.device("cpu"))
    calibration = ImageDataset.from_arrays(np.stack([np.asarray(image) for image in half_flat_images(12)]))
    first = calibrated_register_neurons(backbone, tmp_path, calibration, batch_size=5)
    assert first.calibration_images == 12 and first.units
    monkeypatch.setattr(registers, "find_register_neurons", lambda *a, **k: pytest.fail("calibrated twice"))
    assert calibrated_register_neurons(backbone, tmp_path, calibration, batch_size=5) == first
    assert len(list((tmp_path / "registers").glob("*.json"))) == 1


def test_calibration_arguments_are_checked():
    model = tiny_vit()
    with pytest.raises(ValueError, match="outlier_block"):
        find_register_neurons(model, [], outlier_block=3)
    with pytest.raises(ValueError, match="top_k"):
        find_register_neurons(model, [], top_k=0)
