"""Methods side by side: one extraction, the same seeds, the variants computed the way the engine computes them."""
import json

import numpy as np
import pytest
import torch

import itae
from itae import compare as compare_module
from itae.clustering import clustering_protocol
from itae.compare import compare, trained_registers_model
from itae.data import balanced_subset, open_source
from itae.engine import cls_features
from itae.evaluate import clustering_accuracy
from itae.extract import extract
from itae.methods import DEFAULT_METHODS, METHODS, Variant, parse_method
from itae.theta import decide_theta
from test_extract import ListDataset, batch_of, tiny_backbone

TINY_METHODS = ["original", "itae", "itae-eq5", "itae-remove", "key-norm", "value-norm", "output-norm", "itae-last2",
                "test-time-registers", "trained-registers"]
PROTOCOL = dict(sets=2, runs=2, seed=3, backend="sklearn")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    backbone, dataset = tiny_backbone(), ListDataset(12)
    # float32 on any CPU: the variants are held against float32 forward passes of the engine
    extraction = extract(backbone, dataset, batch_size=5, precision="fp32")
    theta = float(np.median(extraction.query_norms[:, 1:]))
    cache = tmp_path_factory.mktemp("cache")
    comparison = compare(backbone, dataset, extraction, [METHODS[name] for name in TINY_METHODS], cache, theta=theta,
                         batch_size=5, **PROTOCOL)
    return backbone, dataset, extraction, theta, cache, comparison


def test_every_method_gets_a_row_in_order_with_the_same_protocol(tiny):
    backbone, dataset, extraction, theta, _, comparison = tiny
    assert [result.method.name for result in comparison.results] == TINY_METHODS
    original = comparison.result("original")
    reference = clustering_protocol(extraction.features_original, extraction.labels, **PROTOCOL)
    np.testing.assert_array_equal(original.clustering.protocol.acc, reference.protocol.acc)
    itae = comparison.result("itae")
    assert itae.theta.value == theta and itae.theta.origin == "given"
    np.testing.assert_array_equal(itae.features, extraction.itae(theta).features)
    assert itae.tokens_per_image == pytest.approx(extraction.artifact_mask(theta)[:, 1:].sum(1).mean())
    json.dumps(comparison.to_dict())  # strict JSON


def test_eq5_on_the_final_block_is_eq6_and_is_not_clustered_twice(tiny):
    comparison = tiny[-1]
    eq5 = comparison.result("itae-eq5")
    assert eq5.same_as == "itae" and eq5.clustering is comparison.result("itae").clustering
    assert "Eq. 5 = Eq. 6" in eq5.note


def test_the_last_blocks_variant_is_the_engines_full_forward_and_is_cached(tiny, monkeypatch):
    backbone, dataset, extraction, theta, cache, comparison = tiny
    last2 = comparison.result("itae-last2")
    x = batch_of(backbone, dataset, extraction.indices)
    expected = cls_features(backbone.model, x, theta, "minority", blocks=2)
    torch.testing.assert_close(torch.from_numpy(last2.features), expected, atol=1e-5, rtol=0)
    assert last2.seconds_per_image > 0 and list((cache / "variants").glob("*.npz"))

    def forbidden(*args, **kwargs):
        raise AssertionError("the backbone ran")

    monkeypatch.setattr(backbone.model.patch_embed, "forward", forbidden)
    again = compare(backbone, dataset, extraction, [METHODS["itae-last2"]], cache, theta=theta, **PROTOCOL)
    np.testing.assert_array_equal(again.results[0].features, last2.features)
    assert again.results[0].seconds_per_image == last2.seconds_per_image, "the time measured when it was computed"


def test_a_new_theta_is_a_new_pass_not_the_cached_one(tiny):
    backbone, dataset, extraction, theta, cache, comparison = tiny
    other = float(np.quantile(extraction.query_norms[:, 1:], 0.8))
    again = compare(backbone, dataset, extraction, [METHODS["itae-last2"]], cache, theta=other, **PROTOCOL).results[0]
    x = batch_of(backbone, dataset, extraction.indices)
    expected = cls_features(backbone.model, x, other, "minority", blocks=2)
    torch.testing.assert_close(torch.from_numpy(again.features), expected, atol=1e-5, rtol=0)
    assert not np.array_equal(again.features, comparison.result("itae-last2").features)


def test_other_detectors_take_the_policys_automatic_theta_on_their_own_norms(tiny):
    _, _, extraction, _, _, comparison = tiny
    info = extraction.info
    for name, detector in (("key-norm", "key"), ("value-norm", "value"), ("output-norm", "output")):
        result = comparison.result(name)
        policy = decide_theta("auto", extraction.detector_norms(detector), num_prefix_tokens=info.num_prefix_tokens,
                              grid_size=info.grid_size)
        assert result.theta.origin == "auto" and result.theta.value == policy.value
        assert comparison.thetas[detector] is result.theta
        if result.theta.value is None:
            assert not result.artifact_mask.any() and "θ = none" in result.note
            np.testing.assert_array_equal(result.features, extraction.features_original)
        else:
            np.testing.assert_array_equal(result.artifact_mask,
                                          extraction.artifact_mask(result.theta.value, "minority", detector))
    assert comparison.to_dict()["theta_decisions"]["query"]["origin"] == "given"


def test_theta_none_attenuates_nothing_with_any_detector(tiny):
    backbone, dataset, extraction, _, cache, _ = tiny
    methods = [METHODS[name] for name in ("itae", "key-norm", "output-norm", "itae-remove")]
    comparison = compare(backbone, dataset, extraction, methods, cache, theta="none", **PROTOCOL)
    for result in comparison.results:
        assert result.theta.origin == "none" and result.theta.value is None
        np.testing.assert_array_equal(result.features, extraction.features_original)


def test_rows_that_cannot_run_say_why(tiny):
    comparison = tiny[-1]
    registers = comparison.result("test-time-registers")
    assert "no register neurons" in registers.note and comparison.register_neurons.units == ()
    trained = comparison.result("trained-registers")
    assert not trained.available and "no model with trained registers" in trained.note
    assert trained.to_dict()["clustering"] is None


def test_cluster_labels_of_a_set_are_the_ones_it_was_scored_on(tiny):
    _, _, extraction, _, _, comparison = tiny
    for name in ("original", "itae", "itae-last2"):
        for s in range(2):
            predicted = comparison.cluster_labels(name, s)
            assert clustering_accuracy(extraction.labels, predicted) == comparison.result(name).clustering.protocol.acc[s]


def test_detector_agreement_is_the_jaccard_of_their_artifact_sets(tiny):
    comparison = tiny[-1]
    agreement = comparison.agreement
    assert agreement.names == ["query", "key", "value", "output"]
    masks = {"query": comparison.result("itae").artifact_mask, "key": comparison.result("key-norm").artifact_mask}
    both, either = (masks["query"] & masks["key"]).sum(), (masks["query"] | masks["key"]).sum()
    expected = both / either if either else np.nan
    np.testing.assert_equal(agreement.jaccard[0, 1], expected)
    np.testing.assert_equal(agreement.jaccard, agreement.jaccard.T)


def test_trained_registers_are_looked_for_in_the_registry():
    assert trained_registers_model("dinov2_vitb14") == "dinov2_vitb14_reg"
    assert trained_registers_model("dinov2_vitb14_reg") is None
    assert trained_registers_model("clip_vitb16") is None


def test_unloadable_trained_register_weights_give_a_row_not_an_error(tiny, monkeypatch):
    backbone, dataset, extraction, _, cache, _ = tiny
    monkeypatch.setattr(compare_module, "trained_registers_model", lambda name: "dinov2_vits14_reg")

    def offline(name, weights=None, device=None, planted=False):
        raise itae.backbones.BackboneError("the model hub is unreachable")

    monkeypatch.setattr(compare_module, "load_backbone", offline)
    result = compare(backbone, dataset, extraction, [METHODS["trained-registers"]], cache, **PROTOCOL).results[0]
    assert not result.available and "could not be loaded: the model hub is unreachable" in result.note


def test_methods_parse_by_name_or_written_out():
    assert parse_method("itae-remove") is METHODS["itae-remove"]
    custom = parse_method("itae:detector=key,attenuation=scale,factor=0.5,rows=all,blocks=2")
    assert custom.variant == Variant("key", "scale", 0.5, "all", 2) and custom.variant.needs_earlier_blocks
    assert "key norm, weight ×0.5, Eq. 5, last 2 blocks" in custom.label
    assert set(DEFAULT_METHODS) <= set(METHODS)
    for bad, message in (("itae:detector=attention", "detector must be one of"), ("itae:blocks=two", "number"),
                         ("itae:depth=2", "SWITCH=VALUE"), ("registers", "unknown method")):
        with pytest.raises(ValueError, match=message):
            parse_method(bad)
    with pytest.raises(ValueError, match="give each method once"):
        compare(None, None, None, [METHODS["itae"], METHODS["itae"]], ".")


@pytest.fixture(scope="module")
def planted_demo(tmp_path_factory):
    """The planted teaching model (demo weights) on 32 demo Fashion-MNIST images."""
    backbone = itae.load_backbone("dinov2_vits14", weights="demo", device="cpu", planted=True)
    dataset = balanced_subset(open_source("demo"), 32, seed=2)
    return backbone, dataset, extract(backbone, dataset, batch_size=16), tmp_path_factory.mktemp("cache")


def test_the_query_norm_detector_finds_the_planted_artifacts(planted_demo):
    backbone, dataset, extraction, cache = planted_demo
    methods = [METHODS[name] for name in ("original", "itae", "key-norm", "output-norm", "itae-remove")]
    methods.append(parse_method("itae:detector=output,blocks=2"))
    comparison = compare(backbone, dataset, extraction, methods, cache, **PROTOCOL)
    itae_result = comparison.result("itae")
    assert itae_result.theta.origin == "auto"  # the demo ViT-S has no θ from the paper
    assert itae_result.detection.precision >= 0.95 and itae_result.detection.recall >= 0.95
    assert itae_result.detection.planted == int(extraction.planted_mask.sum()) > 0
    output = comparison.result("output-norm")
    assert output.detection.recall >= 0.95  # 10x the others' residual norm
    last2 = comparison.result("itae:detector=output,blocks=2")  # the same detector, another place to attenuate
    np.testing.assert_array_equal(last2.artifact_mask, output.artifact_mask)
    assert not np.array_equal(last2.features, output.features)
    assert comparison.agreement.names[-1] == "planted"
    assert comparison.agreement.jaccard[0, -1] == itae_result.detection.jaccard


def test_progress_counts_the_methods_done(tiny):
    backbone, dataset, extraction, theta, cache, _ = tiny
    calls = []
    compare(backbone, dataset, extraction, [METHODS["original"], METHODS["itae"]], cache, theta=theta,
            progress=lambda done, total, message: calls.append((done, total, message)), **PROTOCOL)
    assert calls[0] == (0, 2, "features: original") and calls[-1] == (2, 2, "done")
    assert [done for done, _, _ in calls] == sorted(done for done, _, _ in calls)


def test_movers_are_the_images_a_method_puts_in_another_cluster(tiny):
    _, _, extraction, _, _, comparison = tiny
    movers = comparison.movers("itae", 1)
    np.testing.assert_array_equal(movers.before, comparison.cluster_labels("original", 1))
    np.testing.assert_array_equal(movers.after, comparison.cluster_labels("itae", 1))
    assert movers.contingency.sum() == len(extraction) and len(movers.majority) == len(movers.before_clusters)
    assert comparison.movers("original", 1).n_moved == 0


def test_the_methods_that_run_a_model_again_say_so():
    slow = {name for name, method in METHODS.items() if method.runs_the_backbone}
    assert slow == {"itae-last2", "itae-last2-eq5", "test-time-registers", "trained-registers"}
