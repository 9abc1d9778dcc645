"""Tests for itae.theta: the θ policy, the bimodality test, the θ sweep and its reports."""

import json

import numpy as np
import pytest
from PIL import Image, ImageDraw
from scipy.stats import norm

import itae
from itae.data import balanced_subset, open_source
from itae.extract import extract_cached
from itae.theta import (
    ARTIFACTS,
    NO_ARTIFACTS,
    TOO_LITTLE_DATA,
    BimodalityVerdict,
    SweepResult,
    ThetaDecision,
    decide_theta,
    examine_norms,
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


SETTINGS = {"model": "DINOv2 ViT-S/14 (demo)", "data": "shapes", "n_clusters": 3, "sets": 5, "runs": 10, "seed": 0}


def test_sweep_csv_and_png_carry_the_settings(tmp_path):
    result = theta_sweep(
        _sweep_norms(), _fake_features_at([]), _fake_score, [3.0, 1.0, 2.0],
        original_score={"acc": 0.55}, settings=SETTINGS,
    )
    assert isinstance(result, SweepResult) and result.metrics == ["acc", "nmi"]

    csv_path, png_path = tmp_path / "sweep.csv", tmp_path / "sweep.png"
    result.to_csv(csv_path)
    result.plot_png(png_path)

    frame = result.to_frame()
    assert list(frame["theta"]) == [3.0, 1.0, 2.0]
    assert csv_path.read_text().splitlines()[0].startswith("theta,artifact_fraction,")
    assert len(csv_path.read_text().splitlines()) == 4
    for column, value in {"rule": "below", **SETTINGS}.items():
        assert frame[column].tolist() == [value] * 3, column
    with Image.open(png_path) as image:
        assert image.format == "PNG" and image.width > 100 and image.height > 100
    title = result.figure().axes[0].get_title()
    assert title == ("θ sweep, rule below: DINOv2 ViT-S/14 (demo) on shapes\n"
                     "K = 3, 5 sets × 10 runs, seed 0, θ 1 to 3 (3 values)")


def test_sweep_plot_draws_the_chosen_metric_and_an_attenuated_share_from_0_to_100_percent():
    # No artifact at any θ: the share is a flat 0 %, which must not get a magnified or negative axis.
    result = theta_sweep(_sweep_norms(), _fake_features_at([]), _fake_score, [0.1, 0.2, 0.3])

    figure = result.figure("nmi")

    metric_axes, share_axes = figure.axes
    assert metric_axes.get_ylabel() == "NMI"
    assert metric_axes.lines[0].get_ydata().tolist() == [0.1, 0.2, 0.3]
    assert share_axes.get_ylim() == (-2, 102)
    figure.canvas.draw()
    assert [label.get_text() for label in share_axes.get_yticklabels()] == ["0%", "25%", "50%", "75%", "100%"]


def test_sweep_plot_on_unlabelled_data_draws_inertia(tmp_path):
    def unsupervised(features):
        return {"inertia": {"mean": 10 - float(features[0, 0]), "se": 0.1}, "silhouette": {"mean": 0.2}}

    result = theta_sweep(_sweep_norms(), _fake_features_at([]), unsupervised, [1.0, 2.0],
                         original_score={"inertia": {"mean": 9.5}})

    assert result.metrics == ["inertia", "silhouette"]
    result.plot_png(tmp_path / "sweep.png")  # no metric given: inertia, not ACC
    assert result.figure().axes[0].get_ylabel() == "inertia"


# --- parse_theta_range ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("1:8:0.25", np.arange(29) * 0.25 + 1.0),
        ("1:2:0.3", [1.0, 1.3, 1.6, 1.9]),
        ("0.1:0.3:0.1", [0.1, 0.2, 0.3]),
        ("3:3:1", [3.0]),
        (" 2 : 3 : 0.5 ", [2.0, 2.5, 3.0]),
        ("2.5,3,3.5", [2.5, 3.0, 3.5]),
        (" 4, 1.5 ", [4.0, 1.5]),  # a list keeps its order
        ("3", [3.0]),
    ],
)
def test_parse_theta_range(text, expected):
    np.testing.assert_array_equal(parse_theta_range(text), expected)


@pytest.mark.parametrize(
    "text, match",
    [
        ("1:8", "start:stop:step"),
        ("1:8:0.25:1", "or a list"),
        ("a:8:1", "not a number"),
        ("1,,2", "not a number"),
        ("1,inf", "finite"),
        ("", "not a number"),
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


# --- the θ policy: synthetic query norms with a per-image layout ---------------------------------------------

GRID = (16, 16)  # ViT-S/14 and ViT-B/14 at 224 px: 256 patches
N_PATCHES = GRID[0] * GRID[1]


def _isolated_positions(rng, k):
    """``k`` patch indices (row-major) of which no two touch, diagonals included: scattered single tokens.

    They are drawn from the cells of one of the four every-other-row-and-column sublattices (64 cells), so
    that any ``k`` up to 64 fits.
    """
    row_offset, col_offset = rng.integers(2, size=2)
    rows, cols = np.meshgrid(np.arange(row_offset, GRID[0], 2), np.arange(col_offset, GRID[1], 2), indexing="ij")
    cells = (rows * GRID[1] + cols).ravel()
    return rng.choice(cells, size=k, replace=False)


def _layout_norms(counts, artifact, majority, seed, registers=0, low_registers=0, positions=None):
    """Query norms of shape (n_images, 1 + registers + 256) and the planted artifact mask of the same shape.

    Image ``i`` has ``counts[i]`` artifact patches drawn from the Gaussian ``artifact = (mean, std)``, at
    ``positions(rng, k)`` (default: isolated), and ``low_registers`` of its registers are artifacts too;
    every other token comes from ``majority``. CLS (column 0) is far away: it must never count.
    """
    rng = np.random.default_rng(seed)
    prefix = 1 + registers
    norms = rng.normal(*majority, size=(len(counts), prefix + N_PATCHES))
    planted = np.zeros(norms.shape, dtype=bool)
    for image, k in enumerate(counts):
        columns = prefix + np.asarray((positions or _isolated_positions)(rng, int(k)), dtype=int)
        planted[image, columns] = True
        planted[image, 1:1 + low_registers] = True
    planted_count = int(planted.sum())
    norms[planted] = rng.normal(*artifact, size=planted_count)
    norms[:, 0] = 50.0
    return norms, planted


def _decide(requested, norms, registers=0, **kwargs):
    return decide_theta(requested, norms, num_prefix_tokens=1 + registers, grid_size=GRID, **kwargs)


# The paper's Fig. 2 (DINOv2 ViT-B/14 distilled, CIFAR-100): a clear low minority mode, a few tokens per
# image, and a unimodal majority around 3.5-4; the paper read θ = 3.0 off it.
FIG2_ARTIFACT, FIG2_MAJORITY = (2.2, 0.25), (3.8, 0.3)


@pytest.mark.parametrize("registers, low_registers", [(0, 0), (4, 2)])
def test_the_papers_fig2_case_is_accepted_with_theta_in_the_valley(registers, low_registers):
    counts = np.random.default_rng(0).integers(5, 14, size=300)  # 2-5 % of the 256 patches
    norms, planted = _layout_norms(counts, FIG2_ARTIFACT, FIG2_MAJORITY, seed=1, registers=registers,
                                   low_registers=low_registers)

    decision = _decide("auto", norms, registers)

    assert isinstance(decision, ThetaDecision)
    assert (decision.origin, decision.verdict) == ("auto", ARTIFACTS) and decision.warning is None
    fraction = planted[:, 1:].mean()
    valley, _ = _density_minimum(FIG2_ARTIFACT, FIG2_MAJORITY, fraction)
    assert abs(decision.value - valley) < 0.2
    assert FIG2_ARTIFACT[0] + 2 * FIG2_ARTIFACT[1] < decision.value < FIG2_MAJORITY[0] - 2 * FIG2_MAJORITY[1]
    evidence = decision.evidence
    assert evidence.side == "below" and evidence.pooled_fraction == pytest.approx(fraction, abs=0.002)
    assert evidence.typical_share == 1.0 and evidence.region_share == 0.0
    # θ = value under Eq. 3 attenuates the planted tokens, and hardly anything else.
    attenuated = norms[:, 1:] <= decision.value
    assert (attenuated == planted[:, 1:]).mean() > 0.999
    assert decision.attenuated_per_image == pytest.approx(planted.sum(1).mean(), rel=0.02)
    assert decision.reason.startswith("Artifacts:") and f"θ = {decision.value:.2f}" in decision.reason


def test_the_planted_teaching_models_artifacts_are_accepted():
    # The planted-artifacts teaching model: 5 tokens per image (2 % of the patches), no two adjacent, at a
    # low query norm, in a backbone whose own norms are unimodal around 3.0 (the demo ViT-S/14).
    norms, planted = _layout_norms(np.full(40, 5), (1.5, 0.15), (3.0, 0.2), seed=2)

    decision = _decide(None, norms)  # None is "auto"

    assert (decision.origin, decision.verdict) == ("auto", ARTIFACTS)
    assert 1.5 < decision.value < 3.0
    np.testing.assert_array_equal(norms[:, 1:] <= decision.value, planted[:, 1:])
    assert decision.attenuated_per_image == 5.0


@pytest.mark.parametrize("n_images", [1, 3])
def test_artifacts_on_too_few_images_are_not_applied_and_the_reason_says_so(n_images):
    norms, _ = _layout_norms(np.full(n_images, 5), (1.5, 0.15), (3.0, 0.2), seed=3)

    decision = _decide("auto", norms)

    assert decision.value is None and decision.verdict == TOO_LITTLE_DATA
    assert decision.evidence.theta is not None  # the candidate is there, and named
    assert "too few" in decision.reason and f"{n_images} image" in decision.reason
    assert f"give θ = {decision.evidence.theta:.2f} explicitly" in decision.reason


def test_artifacts_are_found_where_image_content_splits_the_other_tokens_in_two():
    # Three modes: 5 isolated low-norm artifacts per image, a plain background, and an object of 12
    # contiguous high-norm patches. The object split must be refused and the artifacts found all the same.
    rng = np.random.default_rng(11)
    norms, planted = _layout_norms(np.full(30, 5), (1.5, 0.15), (3.0, 0.1), seed=11)
    for image in range(len(norms)):
        block = 1 + np.array(_block(rng, 12))
        block = block[~planted[image, block]]
        norms[image, block] = rng.normal(3.8, 0.1, size=len(block))

    decision = _decide("auto", norms)

    assert decision.verdict == ARTIFACTS and 1.5 < decision.value < 3.0
    np.testing.assert_array_equal(norms[:, 1:] <= decision.value, planted[:, 1:])


@pytest.mark.parametrize("tail", [
    lambda rng, size: 3.0 + 0.2 * rng.standard_t(2, size),  # heavier tails than any ViT's
    lambda rng, size: 2.4 + rng.gamma(2.0, 0.358, size),  # skewed, median 3.0
], ids=["student-t-2-dof", "gamma"])
def test_gaps_between_outliers_in_a_tail_are_not_a_mode(tail):
    # Among 50,000 heavy-tailed norms the smoothed density has deep valleys between a few outliers; a
    # mixture started there wanders off, so they are no candidate split, however isolated the outliers.
    norms = tail(np.random.default_rng(12), (200, 1 + N_PATCHES))

    decision = _decide("auto", norms)

    assert (decision.value, decision.verdict) == (None, NO_ARTIFACTS)
    assert "no second mode" in decision.reason


def _failures(norms):
    evidence = examine_norms(norms, num_prefix_tokens=1, grid_size=GRID)
    assert evidence.bimodality.bimodal  # each case passes the first criterion; the others must refuse it
    assert evidence.verdict == NO_ARTIFACTS and evidence.reason.startswith("No artifacts")
    assert _decide("auto", norms, evidence=evidence).value is None
    return evidence


def test_a_minority_of_more_than_a_tenth_of_the_tokens_is_not_artifacts():
    # Isolated and in every image alike, but 12 % of the tokens: more than artifacts ever make up.
    norms, _ = _layout_norms(np.full(100, 31), (1.5, 0.15), (3.0, 0.2), seed=4)

    evidence = _failures(norms)

    assert evidence.pooled_fraction == pytest.approx(31 / 256)
    assert len(evidence.failures) == 1 and "10 %" in evidence.failures[0]


def test_a_minority_that_takes_over_some_images_is_not_artifacts():
    # 6.8 % of the tokens overall, isolated, but 18 % of the tokens in 30 % of the images.
    counts = np.where(np.arange(200) % 10 < 3, 46, 5)
    norms, _ = _layout_norms(counts, (1.5, 0.15), (3.0, 0.2), seed=5)

    evidence = _failures(norms)

    assert evidence.pooled_fraction < 0.10 and evidence.typical_share == pytest.approx(0.7)
    assert len(evidence.failures) == 1 and "in 60 of 200 images" in evidence.failures[0]


def _block(rng, k):
    """A 2×(k/2) block of patches at a random place: one contiguous region, like an object."""
    top, left = rng.integers(GRID[0] - 1), rng.integers(GRID[1] - k // 2 + 1)
    return [(top + r) * GRID[1] + left + c for r in range(2) for c in range(k // 2)]


def test_a_minority_in_contiguous_regions_is_not_artifacts():
    # 3 % of the tokens in every image, as artifacts are, but as one 2×4 block: an object, not artifacts.
    norms, _ = _layout_norms(np.full(100, 8), (1.5, 0.15), (3.0, 0.2), seed=6, positions=_block)

    evidence = _failures(norms)

    assert evidence.typical_share == 1.0 and evidence.region_share > 0.99 and evidence.largest_region >= 8
    assert len(evidence.failures) == 1 and "connected regions" in evidence.failures[0]


def test_an_explicit_theta_is_always_honoured_with_a_warning_where_it_splits_normal_tokens():
    unimodal = np.random.default_rng(7).normal(3.0, 0.2, size=(30, 1 + N_PATCHES))

    given = _decide(3.0, unimodal, rule="below")

    assert (given.value, given.origin, given.verdict) == (3.0, "given", NO_ARTIFACTS)
    assert given.attenuated_fraction == np.mean(unimodal[:, 1:] <= 3.0)
    assert given.reason.startswith("θ = 3 as given, rule below: attenuates")
    assert "not show as artifacts" in given.warning and "no second mode" in given.warning
    # Above every norm the minority rule finds nothing to attenuate: nothing to warn about either.
    above = _decide(9.0, unimodal)
    assert above.value == 9.0 and above.attenuated_fraction == 0 and above.warning is None


def test_paper_none_and_beyond_the_artifacts():
    counts = np.random.default_rng(8).integers(5, 14, size=100)
    norms, _ = _layout_norms(counts, FIG2_ARTIFACT, FIG2_MAJORITY, seed=8)

    paper = _decide("paper", norms, paper_theta=3.0)
    assert (paper.value, paper.origin, paper.verdict, paper.warning) == (3.0, "paper", ARTIFACTS, None)
    assert "the paper's θ" in paper.reason
    none = _decide("none", norms)
    assert (none.value, none.origin, none.verdict, none.attenuated_fraction) == (None, "none", ARTIFACTS, 0.0)
    beyond = _decide(4.5, norms, rule="below")
    assert beyond.attenuated_fraction > 0.9 and "far more than" in beyond.warning
    with pytest.raises(ValueError, match="the paper gives no θ"):
        _decide("paper", norms)
    for bad in ("high", float("nan"), True, "3.0"):
        with pytest.raises(ValueError, match="θ must be a finite number"):
            _decide(bad, norms)
    with pytest.raises(ValueError, match="rule"):
        _decide("auto", norms, rule="sideways")


def test_a_precomputed_evidence_gives_the_same_decision_and_must_fit():
    norms, _ = _layout_norms(np.full(20, 5), (1.5, 0.15), (3.0, 0.2), seed=9)
    evidence = examine_norms(norms, num_prefix_tokens=1, grid_size=GRID)

    for requested in ("auto", 2.0, 2.9, "none"):
        assert _decide(requested, norms, evidence=evidence) == _decide(requested, norms)
    with pytest.raises(ValueError, match="examined on 20 images"):
        _decide("auto", norms[:10], evidence=evidence)
    as_dict = _decide("auto", norms).to_dict()
    assert json.loads(json.dumps(as_dict)) == as_dict
    assert as_dict["evidence"]["image_fraction"]["median"] == pytest.approx(5 / 256)


def test_the_layout_must_fit_the_norms():
    norms = np.random.default_rng(10).normal(3.0, 0.2, size=(4, 1 + N_PATCHES))
    with pytest.raises(ValueError, match="16×15 patch grid"):
        decide_theta("auto", norms, num_prefix_tokens=1, grid_size=(16, 15))
    with pytest.raises(ValueError, match="num_prefix_tokens"):
        decide_theta("auto", norms, num_prefix_tokens=0, grid_size=GRID)


# --- the θ policy on real query norms: the demo weights have no artifacts --------------------------------------


@pytest.fixture(scope="module")
def demo_backbone():
    return itae.load_backbone("dinov2_vits14", weights="demo", device="cpu")


@pytest.fixture(scope="module")
def feature_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("itae-cache")


@pytest.fixture(scope="module")
def fashion_mnist_200(demo_backbone, feature_cache):
    return extract_cached(demo_backbone, balanced_subset(open_source("demo"), 200, seed=0), feature_cache)


def _decide_on(extraction, requested="auto"):
    info = extraction.info
    return decide_theta(requested, extraction.query_norms, num_prefix_tokens=info.num_prefix_tokens,
                        grid_size=info.grid_size, paper_theta=info.default_theta)


def test_no_artifacts_in_the_demo_photos(demo_backbone, feature_cache):
    decision = _decide_on(extract_cached(demo_backbone, open_source("demo-photos"), feature_cache))

    assert (decision.value, decision.verdict) == (None, NO_ARTIFACTS)
    assert decision.reason.startswith("No artifacts") and "ITAE = original" in decision.reason


def test_no_artifacts_in_the_demo_fashion_mnist(fashion_mnist_200):
    decision = _decide_on(fashion_mnist_200)

    assert (decision.value, decision.verdict) == (None, NO_ARTIFACTS)


def test_no_artifacts_in_one_image_whose_norms_split_in_half(fashion_mnist_200):
    # One garment's tokens split into the garment and its background: bimodal, with a ~45 % "minority".
    norms = fashion_mnist_200.query_norms
    halves = [i for i in range(40) if (verdict := suggest_theta(norms[i, 1:])).bimodal
              and verdict.minority_fraction > 0.3]
    assert halves, "the first 40 images were expected to hold one such image"
    one = fashion_mnist_200.query_norms[halves[0]:halves[0] + 1]

    decision = decide_theta("auto", one, num_prefix_tokens=1, grid_size=fashion_mnist_200.info.grid_size)

    assert (decision.value, decision.verdict) == (None, NO_ARTIFACTS)
    assert "from only 1 image" in decision.reason and "10 %" in decision.reason


def _draw_shapes(folder, n=12, seed=0):
    """``n`` images of one dark circle, square or triangle on a plain light background."""
    rng = np.random.default_rng(seed)
    folder.mkdir()
    for i in range(n):
        image = Image.new("RGB", (224, 224), tuple(int(c) for c in rng.integers(150, 256, 3)))
        draw, fill = ImageDraw.Draw(image), tuple(int(c) for c in rng.integers(0, 120, 3))
        x, y, r = (int(v) for v in (*rng.integers(70, 154, 2), rng.integers(35, 65)))
        shape = ("circle", "square", "triangle")[i % 3]
        if shape == "circle":
            draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)
        elif shape == "square":
            draw.rectangle([x - r, y - r, x + r, y + r], fill=fill)
        else:
            draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=fill)
        image.save(folder / f"{shape}{i:02d}.png")
    return folder


def test_no_artifacts_in_a_folder_of_drawn_shapes(demo_backbone, feature_cache, tmp_path):
    extraction = extract_cached(demo_backbone, open_source(str(_draw_shapes(tmp_path / "shapes"))), feature_cache)

    decision = _decide_on(extraction)

    assert decision.evidence.bimodality.bimodal  # the pooled norms alone would have called the shapes artifacts
    assert (decision.value, decision.verdict) == (None, NO_ARTIFACTS)
    assert decision.evidence.region_share > 0.9 and "connected regions" in decision.reason


@pytest.fixture(scope="module")
def planted_backbone():
    return itae.load_backbone("dinov2_vits14", weights="demo", device="cpu", planted=True)


@pytest.mark.parametrize("source", ["demo-photos", "demo", "shapes"])
def test_the_planted_teaching_model_is_found(planted_backbone, feature_cache, tmp_path, source):
    # The same demo weights with planted artifacts (itae.planted): a few isolated tokens per image at a low
    # query norm. On drawn shapes the norms have three modes, the shapes being one of them.
    data = {"demo-photos": lambda: open_source("demo-photos"),
            "demo": lambda: balanced_subset(open_source("demo"), 40, seed=0),
            "shapes": lambda: open_source(str(_draw_shapes(tmp_path / "shapes")))}[source]()
    extraction = extract_cached(planted_backbone, data, feature_cache)

    decision = _decide_on(extraction)

    assert (decision.origin, decision.verdict) == ("auto", ARTIFACTS)
    scores = extraction.detection_scores(extraction.artifact_mask(decision.value, decision.rule))
    assert (scores.precision, scores.recall) == (1.0, 1.0)
