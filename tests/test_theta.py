"""Tests for itae.theta: the bimodality verdict, the θ suggestion, the θ sweep and its reports."""

import json

import numpy as np
import pytest
from PIL import Image
from scipy.stats import norm

from itae.theta import (
    BimodalityVerdict,
    SweepResult,
    ThetaChoice,
    choose_theta,
    parse_theta_range,
    suggest_theta,
    theta_sweep,
)

N_NORMS = 20_000


def _mixture(minority, majority, fraction, seed):
    """Norms from two Gaussians ``(mean, std)``; ``fraction`` of them from ``minority``."""
    rng = np.random.default_rng(seed)
    n_minority = int(round(fraction * N_NORMS))
    return np.concatenate([
        rng.normal(*minority, size=n_minority),
        rng.normal(*majority, size=N_NORMS - n_minority),
    ])


def _density_minimum(minority, majority, fraction):
    """The exact location of the mixture's density minimum between the two means."""
    low, high = sorted([minority[0], majority[0]])
    grid = np.linspace(low, high, 20_001)
    density = fraction * norm.pdf(grid, *minority) + (1 - fraction) * norm.pdf(grid, *majority)
    return grid[np.argmin(density)], density


@pytest.mark.parametrize(
    "minority, majority, side",
    [((1.2, 0.2), (3.5, 0.3), "below"), ((5.5, 0.25), (3.0, 0.3), "above")],
)
def test_bimodal_minority_gets_theta_in_the_valley(minority, majority, side):
    fraction = 0.03
    norms = _mixture(minority, majority, fraction, seed=1)

    verdict = suggest_theta(norms)

    assert verdict.bimodal
    low, high = sorted([minority[0], majority[0]])
    assert low < verdict.theta < high
    valley, _ = _density_minimum(minority, majority, fraction)
    assert abs(verdict.theta - valley) < 0.15
    minority_peak = fraction * norm.pdf(minority[0], *minority)
    true_density = fraction * norm.pdf(verdict.theta, *minority)
    true_density += (1 - fraction) * norm.pdf(verdict.theta, *majority)
    assert true_density < 0.01 * minority_peak
    assert verdict.minority_side == side
    assert verdict.minority_fraction == pytest.approx(fraction, abs=0.005)
    assert verdict.modes[0] < verdict.theta < verdict.modes[1]
    assert 0.5 <= verdict.strength <= 1.0
    assert "Bimodal" in verdict.message and side in verdict.message


def test_theta_sits_in_the_middle_of_an_empty_gap():
    # Every θ in the gap selects the same tokens; the middle is the least sensitive to new images.
    rng = np.random.default_rng(9)
    norms = np.concatenate([rng.uniform(1.0, 1.5, 600), rng.uniform(3.0, 4.0, 19_400)])

    verdict = suggest_theta(norms)

    assert verdict.bimodal and verdict.strength == pytest.approx(1.0)
    assert verdict.theta == pytest.approx(2.25, abs=0.1)


def test_bimodal_with_two_percent_minority_on_a_small_sample():
    norms = _mixture((1.2, 0.2), (3.5, 0.3), 0.02, seed=2)[::4]

    verdict = suggest_theta(norms)

    assert verdict.bimodal
    assert 1.2 < verdict.theta < 3.5


def test_close_modes_found_where_k_means_alone_splits_the_majority():
    # A 5 % minority only 1.3 apart: sklearn's default k-means start ends with a 16 % component
    # cut out of the majority.
    verdict = suggest_theta(_mixture((1.9, 0.2), (3.2, 0.3), 0.05, seed=3))

    assert verdict.bimodal
    assert verdict.weights[0] == pytest.approx(0.05, abs=0.02)
    assert 1.9 < verdict.theta < 3.2
    assert verdict.minority_fraction == pytest.approx(0.05, abs=0.01)


UNIMODAL = {
    "normal": lambda rng: rng.normal(3.0, 0.22, N_NORMS),
    "log-normal like the demo ViT-S": lambda rng: 3.0 * np.exp(rng.normal(0.0, 0.07, N_NORMS)),
    "skewed log-normal": lambda rng: 2.2 + 0.8 * np.exp(rng.normal(0.0, 0.5, N_NORMS)),
    "skewed gamma, median 3.0": lambda rng: 2.4 + rng.gamma(2.0, 0.358, N_NORMS),
    "heavy tails (Student t, 3 dof)": lambda rng: 3.0 + 0.2 * rng.standard_t(3, N_NORMS),
    "uniform 2.4-3.7": lambda rng: rng.uniform(2.4, 3.7, N_NORMS),
}


@pytest.mark.parametrize("name", list(UNIMODAL))
def test_unimodal_sets_are_refused(name):
    norms = UNIMODAL[name](np.random.default_rng(4))

    verdict = suggest_theta(norms)

    assert not verdict.bimodal
    assert verdict.theta is None
    assert verdict.minority_side is None and verdict.minority_fraction is None
    assert verdict.message.startswith("No bimodality")
    assert 0.0 <= verdict.strength < 0.5


def test_strength_grows_with_separation():
    strengths = [
        suggest_theta(_mixture((mean, 0.2), (3.5, 0.3), 0.05, seed=5)).strength
        for mean in (2.6, 2.3, 2.0, 1.2)
    ]

    assert strengths == sorted(strengths)
    assert strengths[0] < 0.5 < strengths[-1]


def test_uniform_is_refused_for_its_missing_valley_not_for_its_separation():
    verdict = suggest_theta(UNIMODAL["uniform 2.4-3.7"](np.random.default_rng(6)))

    # Two Gaussians split a uniform cleanly, so only the valley check can refuse it.
    assert verdict.ashman_d > 2
    assert "valley" in verdict.message


def test_subsampling_is_seeded_and_to_dict_is_json_ready():
    norms = _mixture((1.2, 0.2), (3.5, 0.3), 0.03, seed=7)

    first = suggest_theta(norms, max_samples=5_000, seed=11)
    again = suggest_theta(norms, max_samples=5_000, seed=11)

    assert first.n_samples == 5_000
    assert first == again
    as_dict = first.to_dict()
    assert json.loads(json.dumps(as_dict)) == as_dict
    assert as_dict["bimodal"] is True and isinstance(as_dict["modes"], list)


def test_two_dimensional_input_is_flattened():
    norms = _mixture((1.2, 0.2), (3.5, 0.3), 0.03, seed=8)[::2]

    flat = suggest_theta(norms)
    grid = suggest_theta(norms.reshape(100, -1))

    assert grid.theta == flat.theta


def test_constant_input_is_refused():
    verdict = suggest_theta(np.full(100, 3.0))

    assert not verdict.bimodal and verdict.theta is None


@pytest.mark.parametrize("bad", [[1.0, np.nan, 3.0], [1.0, np.inf], [], np.zeros((3, 0))])
def test_bad_norms_raise(bad):
    with pytest.raises(ValueError, match="norms"):
        suggest_theta(bad)


def test_bad_max_samples_raises():
    with pytest.raises(ValueError, match="max_samples"):
        suggest_theta([1.0, 2.0, 3.0], max_samples=0)


# --- the sweep ---------------------------------------------------------------------------------


def _sweep_norms():
    """4 images of CLS + 2 registers + 5 patches; the CLS norm 0.0 would count if not excluded."""
    return np.array([
        [0.0, 1.0, 4.0, 1.5, 4.0, 4.0, 4.0, 4.0],
        [0.0, 4.0, 4.0, 4.0, 4.0, 2.5, 4.0, 4.0],
        [0.0, 4.0, 1.0, 4.0, 4.0, 4.0, 4.0, 4.0],
        [0.0, 4.0, 4.0, 4.0, 4.0, 4.0, 4.0, 4.0],
    ])


def _fake_features_at(calls):
    def features_at(theta, rule):
        calls.append((theta, rule))
        return np.full((4, 3), theta)
    return features_at


def _fake_score(features):
    theta = float(features[0, 0])
    return {"acc": {"mean": 0.5 + theta / 10, "se": 0.01, "values": [0.1, 0.2]}, "nmi": theta}


def test_sweep_rows_counts_and_metrics():
    calls, progress = [], []
    thetas = np.array([0.5, 1.0, 2.0, 3.0])

    result = theta_sweep(
        _sweep_norms(), _fake_features_at(calls), _fake_score, thetas, rule="below",
        num_prefix_tokens=3, original_score={"acc": {"mean": 0.55, "se": 0.02}, "nmi": 0.4},
        progress=lambda done, total: progress.append((done, total)),
    )

    assert calls == [(0.5, "below"), (1.0, "below"), (2.0, "below"), (3.0, "below")]
    assert progress == [(1, 4), (2, 4), (3, 4), (4, 4)]
    np.testing.assert_array_equal(result.thetas, thetas)
    assert [row["theta"] for row in result.rows] == [0.5, 1.0, 2.0, 3.0]
    # 28 candidate tokens (CLS excluded); at or below θ: 0, 2, 3 and 4 of them.
    assert [row["mean_artifacts_per_image"] for row in result.rows] == [0, 0.5, 0.75, 1.0]
    assert [row["artifact_fraction"] for row in result.rows] == pytest.approx(
        [0, 2 / 28, 3 / 28, 4 / 28]
    )
    assert [row["mean_register_artifacts_per_image"] for row in result.rows] == [0, 0.5, 0.5, 0.5]
    assert [row["acc_mean"] for row in result.rows] == pytest.approx([0.55, 0.6, 0.7, 0.8])
    assert result.rows[0]["acc_se"] == 0.01 and "acc_values" not in result.rows[0]
    assert [row["nmi"] for row in result.rows] == thetas.tolist()
    assert result.original == {"acc_mean": 0.55, "acc_se": 0.02, "nmi": 0.4}


def test_sweep_minority_rule_counts_per_image():
    norms = _sweep_norms()
    norms[3, 1:] = [1.0, 1.0, 1.0, 1.0, 4.0, 4.0, 4.0]  # a 4-3 split: the 3 high tokens win

    result = theta_sweep(norms, _fake_features_at([]), _fake_score, [3.0], rule="minority")

    assert result.rows[0]["mean_artifacts_per_image"] == pytest.approx((2 + 1 + 1 + 3) / 4)
    assert "mean_register_artifacts_per_image" not in result.rows[0]


def test_sweep_rejects_bad_arguments():
    features_at, norms = _fake_features_at([]), _sweep_norms()

    with pytest.raises(ValueError, match="rule"):
        theta_sweep(norms, features_at, _fake_score, [1.0], rule="sideways")
    with pytest.raises(ValueError, match="num_prefix_tokens"):
        theta_sweep(norms, features_at, _fake_score, [1.0], num_prefix_tokens=0)
    with pytest.raises(ValueError, match="thetas"):
        theta_sweep(norms, features_at, _fake_score, [])
    with pytest.raises(ValueError, match="norms"):
        theta_sweep(norms[:, :1], features_at, _fake_score, [1.0])
    with pytest.raises(ValueError, match="expected"):
        theta_sweep(norms, lambda theta, rule: np.zeros((3, 2)), _fake_score, [1.0])
    with pytest.raises(ValueError, match="score"):
        theta_sweep(norms, features_at, lambda features: 0.7, [1.0])


def test_sweep_csv_and_png(tmp_path):
    result = theta_sweep(
        _sweep_norms(), _fake_features_at([]), _fake_score, [3.0, 1.0, 2.0],
        original_score={"acc": 0.55},
    )
    assert isinstance(result, SweepResult)

    csv_path, png_path = tmp_path / "sweep.csv", tmp_path / "sweep.png"
    result.to_csv(csv_path)
    result.plot_png(png_path)

    frame = result.to_frame()
    assert list(frame["theta"]) == [3.0, 1.0, 2.0]
    assert csv_path.read_text().splitlines()[0].startswith("theta,artifact_fraction,")
    assert len(csv_path.read_text().splitlines()) == 4
    assert png_path.stat().st_size > 0
    with Image.open(png_path) as image:
        assert image.format == "PNG" and image.width > 100 and image.height > 100


def test_plot_of_an_unknown_metric_raises(tmp_path):
    result = theta_sweep(_sweep_norms(), _fake_features_at([]), _fake_score, [1.0])

    with pytest.raises(ValueError, match="ari"):
        result.plot_png(tmp_path / "sweep.png", metric="ari")


# --- parse_theta_range ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("1:8:0.25", np.arange(29) * 0.25 + 1.0),
        ("1:2:0.3", [1.0, 1.3, 1.6, 1.9]),
        ("0.1:0.3:0.1", [0.1, 0.2, 0.3]),
        ("3:3:1", [3.0]),
        (" 2 : 3 : 0.5 ", [2.0, 2.5, 3.0]),
    ],
)
def test_parse_theta_range(text, expected):
    np.testing.assert_array_equal(parse_theta_range(text), expected)


@pytest.mark.parametrize(
    "text, match",
    [
        ("1:8", "start:stop:step"),
        ("1:8:0.25:1", "start:stop:step"),
        ("a:8:1", "not a number"),
        ("1:8:0", "step must be positive"),
        ("1:8:-1", "step must be positive"),
        ("8:1:1", "stop must be at least start"),
        ("1:nan:1", "finite"),
        ("0:100:1e-6", "at most"),
    ],
)
def test_parse_theta_range_errors(text, match):
    with pytest.raises(ValueError, match=match):
        parse_theta_range(text)


def test_verdict_type_is_public():
    assert isinstance(suggest_theta(np.full(10, 2.0)), BimodalityVerdict)


def _token_norms(values, n_images=100):
    """Query norms of shape (n_images, tokens) with a CLS column in front, from a flat sample."""
    tokens = np.asarray(values).reshape(n_images, -1)
    return np.concatenate([np.full((n_images, 1), 50.0), tokens], axis=1)  # CLS: far away, and ignored


def test_choose_theta_follows_the_request_then_the_paper_then_the_norms():
    bimodal = _token_norms(_mixture((1.0, 0.1), (3.0, 0.2), 0.05, seed=0))
    unimodal = _token_norms(np.random.default_rng(0).normal(3.0, 0.3, N_NORMS))
    auto = choose_theta(bimodal)  # no request, no paper θ: the norms decide
    assert isinstance(auto, ThetaChoice) and auto.origin == "auto" and auto.verdict.bimodal
    assert auto.value == auto.verdict.theta and 1.0 < auto.value < 3.0
    assert choose_theta(bimodal, "auto", default=3.0).origin == "auto"
    paper = choose_theta(bimodal, default=2.5)
    assert (paper.value, paper.origin, paper.verdict.bimodal) == (2.5, "paper", True)
    given = choose_theta(unimodal, 1.5, default=2.5)
    assert (given.value, given.origin, given.verdict.bimodal) == (1.5, "given", False)  # tested, to warn about
    nothing = choose_theta(unimodal)
    assert (nothing.value, nothing.origin, nothing.verdict.bimodal) == (None, "auto", False)  # no attenuation
