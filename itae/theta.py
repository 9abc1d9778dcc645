"""Choosing the artifact threshold θ: one decision for every front-end, a bimodality test, a θ sweep.

ITAE (the paper's Eq. 2-3) splits the final-block query norms ``n_i`` of the non-CLS tokens at a
threshold θ and treats the minority as artifacts. That only makes sense when the split isolates
artifacts: a few tokens per image, apart from the others in their norm. The paper set θ by eye (3.0
for DINOv2 ViT-B/L/g, 2.0 for ViT-S with registers) and skipped ViT-S without registers, whose
distribution is unimodal.

:func:`decide_theta` is the one θ policy: it turns what the user asked for (``"auto"``, a number,
``"paper"``, ``"none"``) and the query norms with their per-image layout into a :class:`ThetaDecision`
(value, origin, verdict, a one-sentence reason, a warning). Its rule, and the reason for each criterion,
is in its docstring; :func:`examine_norms` is the analysis behind it.

The bimodality test (:func:`suggest_theta`), the first criterion
-----------------------------------------------------------------
1. A 1- and a 2-component :class:`sklearn.mixture.GaussianMixture` are fitted to the norms. The two
   components give the candidate modes; ``ΔBIC = BIC(1) - BIC(2)`` must exceed 10 ("very strong"
   evidence on Kass & Raftery's scale). ΔBIC alone is not enough: with 10^5 tokens any skewed or
   heavy-tailed unimodal shape is also fitted better by two Gaussians.
2. Ashman's D, ``sqrt(2) |μ1 - μ2| / sqrt(σ1² + σ2²)``, must be at least 2 (D > 2 is the usual mark
   of a clean separation). This refuses heavy tails, which a mixture fits as two components with
   nearly the same mean.
3. The smaller component must weigh at least 0.2 % of the tokens, so that a few outliers are not
   called a mode (DINOv2 artifacts are a few per image, i.e. roughly 0.5-5 % of tokens).
4. The decisive check is on the data, not on the model: a smoothed histogram (a binned Gaussian KDE
   with Silverman's bandwidth) must have a valley between the two fitted means whose density is at
   most half the lower of the two peaks around it. A uniform distribution passes 1-3 (two
   Gaussians split it cleanly) but has no valley, and a skewed unimodal one has its density falling
   monotonically between the two means.

θ is the centre of the valley floor: the run of grid points around the density minimum whose density
stays within 5 % (of the lower peak) of that minimum. When the valley is an empty gap, as it is for
well separated artifacts, every θ in the gap selects the same tokens, and the centre is the choice
that is least sensitive to new images. Otsu's threshold (``skimage.filters.threshold_otsu``) is not
used: it returns a θ for any input, so it cannot refuse, and by maximising between-class variance it
cuts into the majority when a small minority lies close (a 5 % minority 1.3 apart: Otsu puts a
quarter of the tokens below its θ).

``strength`` is the valley depth ``1 - valley / lower peak`` in [0, 1]: 0 means no valley at all
between the fitted means, 0.5 is the acceptance threshold, 1 means an empty gap between two modes.
It grows with the separation of the modes until the gap is empty.

Bimodal pooled norms are not enough: twelve drawn shapes on plain backgrounds are bimodal too, the
minority being the shapes themselves. :func:`decide_theta` adds the per-image and the spatial criteria.

:func:`theta_sweep` reproduces the ablation of the paper's Sec. 5.2 (Fig. 5): it scores the ITAE
features at each θ of a grid, and counts the artifacts each θ selects. It knows nothing about
models: the caller passes ``features_at(theta, rule)`` (usually reading a final-block cache) and
``score(features)`` (usually the K-Means protocol).
"""

from __future__ import annotations

import dataclasses
import math
import textwrap
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from numbers import Integral, Real

import numpy as np
import torch
from scipy import ndimage
from sklearn.mixture import GaussianMixture

from itae.choices import METRICS, RULES, THETA_WORDS, metric_label
from itae.engine import split_artifacts

__all__ = [
    "ARTIFACTS",
    "NO_ARTIFACTS",
    "TOO_LITTLE_DATA",
    "VERDICTS",
    "ArtifactEvidence",
    "BimodalityVerdict",
    "SweepResult",
    "ThetaDecision",
    "decide_theta",
    "examine_norms",
    "parse_theta_range",
    "resolve_theta_request",
    "suggest_theta",
    "theta_sweep",
]

ARTIFACTS, NO_ARTIFACTS, TOO_LITTLE_DATA = "artifacts", "no artifacts", "too little data"
VERDICTS = (ARTIFACTS, NO_ARTIFACTS, TOO_LITTLE_DATA)
"""What :func:`examine_norms` can conclude; only "artifacts" lets ``θ = "auto"`` attenuate."""

# The criteria of decide_theta; its docstring gives the reason for each.
MAX_MINORITY_FRACTION = 0.10
MAX_IMAGE_FRACTION = 0.15
MIN_TYPICAL_SHARE = 0.80
REGION_PATCHES = 4
MAX_REGION_SHARE = 0.25
MIN_IMAGES = 5
MIN_CANDIDATES = 20

START_SPLITS = (0.02, 0.5, 0.98)
MIN_DELTA_BIC = 10.0
MIN_ASHMAN_D = 2.0
MIN_MINORITY_WEIGHT = 0.002
MIN_VALLEY_DEPTH = 0.5
VALLEY_FLOOR_TOLERANCE = 0.05
MAX_THETA_POINTS = 10_000
MAX_SAMPLES = 200_000


@dataclass
class BimodalityVerdict:
    """The outcome of :func:`suggest_theta`.

    Attributes
    ----------
    bimodal : bool
        Whether the norms show two separated modes, i.e. whether ITAE has artifacts to remove.
    theta : float or None
        The suggested threshold (the centre of the density valley); None when not bimodal.
    strength : float
        Valley depth ``1 - valley density / lower peak density`` in [0, 1]; 0 when there is no
        valley between the fitted means, 1 for an empty gap. At least 0.5 is needed to be bimodal.
    method : str
        A short name of the test.
    message : str
        One plain sentence for users.
    minority_fraction : float or None
        Fraction of the (sub-sampled) tokens on the minority side of ``theta``.
    minority_side : {"below", "above"} or None
        Where the minority lies relative to ``theta``: "below" means ``n <= theta``.
    modes : tuple of float or None
        The two density peaks ``(low, high)`` on either side of the valley.
    means, stds, weights : tuple of float
        The two-component Gaussian mixture, sorted by mean.
    ashman_d : float
        Ashman's D of the two components.
    delta_bic : float
        ``BIC(1 component) - BIC(2 components)``; positive favours two components.
    n_samples : int
        Number of norms the test used (after sub-sampling).
    failures : tuple of str
        The criteria that failed, in words; empty when bimodal.
    """

    bimodal: bool
    theta: float | None
    strength: float
    method: str
    message: str
    minority_fraction: float | None
    minority_side: str | None
    modes: tuple[float, float] | None
    means: tuple[float, float]
    stds: tuple[float, float]
    weights: tuple[float, float]
    ashman_d: float
    delta_bic: float
    n_samples: int
    failures: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        """Return the verdict as a JSON-ready dict (tuples become lists)."""
        return {
            key: list(value) if isinstance(value, tuple) else value
            for key, value in dataclasses.asdict(self).items()
        }


@dataclass
class _Valley:
    """The density valley between two means on a smoothed histogram."""

    theta: float
    depth: float
    modes: tuple[float, float]


def suggest_theta(norms, max_samples: int = MAX_SAMPLES, seed: int = 0) -> BimodalityVerdict:
    """Test the pooled query norms for bimodality and suggest θ at the valley between the modes.

    This is the first criterion of the θ policy, not the policy: bimodal norms can also separate image
    content (an object from its background). Decide a run's θ with :func:`decide_theta`.

    Parameters
    ----------
    norms : array-like of shape (n_images, n_tokens - 1) or (n_norms,)
        Final-block query norms (Eq. 4) of the non-CLS tokens; the caller drops the CLS column.
        Register tokens stay in: they can be artifacts too. Any shape is flattened.
    max_samples : int, default 200_000
        Larger inputs are sub-sampled to this many norms, without replacement.
    seed : int, default 0
        Seeds the sub-sampling and the mixture fits.

    Returns
    -------
    BimodalityVerdict
        ``theta`` is None unless ``bimodal``.

    Raises
    ------
    ValueError
        If ``norms`` is empty or holds NaN or infinity, or ``max_samples`` is not a positive int.
    """
    if not isinstance(max_samples, Integral) or max_samples < 2:
        raise ValueError(f"max_samples must be an int of at least 2, got {max_samples!r}")
    values = _subsample(_validated_norms(norms), max_samples, seed)
    if values.size < 2 or np.ptp(values) == 0:
        return _constant_verdict(values)

    means, stds, weights, delta_bic = _fit_mixtures(values, seed)
    ashman_d = _ashman_d(means[0], stds[0], means[1], stds[1])
    valley = _find_valley(values, means)
    common = dict(
        method="GMM (ΔBIC, Ashman's D) + KDE valley",
        means=means,
        stds=stds,
        weights=weights,
        ashman_d=ashman_d,
        delta_bic=delta_bic,
        n_samples=int(values.size),
        strength=0.0 if valley is None else valley.depth,
    )
    failures = _failed_criteria(delta_bic, ashman_d, min(weights), valley)
    if failures:
        message = (
            f"No bimodality ({'; '.join(failures)}): ITAE has nothing to remove in this model; "
            "a θ would split normal tokens."
        )
        return BimodalityVerdict(
            bimodal=False, theta=None, message=message, minority_fraction=None,
            minority_side=None, modes=None, failures=tuple(failures), **common,
        )

    below = float(np.mean(values <= valley.theta))
    side = "below" if below <= 0.5 else "above"
    fraction = below if side == "below" else 1.0 - below
    message = (
        f"Bimodal (Ashman's D = {ashman_d:.1f}, {100 * fraction:.1f} % of tokens {side} "
        f"θ = {valley.theta:.2f}): the minority are artifact candidates."
    )
    return BimodalityVerdict(
        bimodal=True, theta=valley.theta, message=message, minority_fraction=fraction,
        minority_side=side, modes=valley.modes, **common,
    )


def _ashman_d(mean_a: float, std_a: float, mean_b: float, std_b: float) -> float:
    """Ashman's D, ``sqrt(2) |μa - μb| / sqrt(σa² + σb²)``: above 2, two modes are cleanly apart."""
    spread = math.hypot(std_a, std_b)
    return math.inf if spread == 0 else math.sqrt(2.0) * abs(mean_a - mean_b) / spread


def _subsample(values: np.ndarray, max_samples: int, seed: int) -> np.ndarray:
    """At most ``max_samples`` of ``values``, drawn without replacement by a generator seeded with ``seed``."""
    if values.size <= max_samples:
        return values
    return np.random.default_rng(seed).choice(values, size=int(max_samples), replace=False)


def _validated_norms(norms) -> np.ndarray:
    values = np.asarray(norms, dtype=np.float64).ravel()
    if values.size == 0:
        raise ValueError("norms is empty; pass the query norms of at least two tokens")
    bad = int(np.count_nonzero(~np.isfinite(values)))
    if bad:
        raise ValueError(f"norms holds {bad} NaN or infinite value(s); query norms must be finite")
    return values


def _constant_verdict(values: np.ndarray) -> BimodalityVerdict:
    value = float(values[0])
    failure = f"all {values.size} norms equal {value:.3g}"
    return BimodalityVerdict(
        bimodal=False, theta=None, strength=0.0, method="constant input",
        message=f"No bimodality ({failure}): ITAE has nothing to remove in this model; a θ would split normal tokens.",
        minority_fraction=None, minority_side=None, modes=None, means=(value, value),
        stds=(0.0, 0.0), weights=(1.0, 0.0), ashman_d=0.0, delta_bic=0.0,
        n_samples=int(values.size), failures=(failure,),
    )


def _fit_mixtures(values: np.ndarray, seed: int, starts: tuple[float, ...] = START_SPLITS):
    """Fit 1- and 2-component mixtures; return the 2-component one sorted by mean, and ΔBIC.

    EM can stop in a local optimum, so the 2-component fit keeps the best of several starts, by default
    the sorted norms split at the 2nd percentile, the median and the 98th percentile. A k-means start
    alone tends to split the majority mode in two when the minority holds only a few percent of the
    tokens; the tail starts find that minority. ``starts`` are the fractions of the sorted norms below
    each start's split.
    """
    column = values.reshape(-1, 1)
    one = GaussianMixture(n_components=1, random_state=seed).fit(column)
    ordered = np.sort(values)
    fits = [
        GaussianMixture(
            n_components=2, covariance_type="spherical", random_state=seed,
            **_split_start(ordered, fraction),
        ).fit(column)
        for fraction in starts
    ]
    two = max(fits, key=lambda fit: fit.score(column))
    order = np.argsort(two.means_.ravel())
    means = tuple(float(m) for m in two.means_.ravel()[order])
    stds = tuple(float(math.sqrt(v)) for v in two.covariances_[order])
    weights = tuple(float(w) for w in two.weights_[order])
    return means, stds, weights, float(one.bic(column) - two.bic(column))


def _split_start(ordered: np.ndarray, fraction: float) -> dict:
    """EM start parameters from splitting the sorted norms after ``fraction`` of them."""
    cut = int(np.clip(round(fraction * ordered.size), 1, ordered.size - 1))
    groups = (ordered[:cut], ordered[cut:])
    return {
        "weights_init": [group.size / ordered.size for group in groups],
        "means_init": [[group.mean()] for group in groups],
        # A constant group would give an infinite precision; sklearn's reg_covar guards EM alike.
        "precisions_init": [1.0 / (group.var() + 1e-6) for group in groups],
    }


def _smoothed_density(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A binned Gaussian KDE with Silverman's bandwidth; returns ``(grid, density)``."""
    spread = min(np.std(values), np.subtract(*np.percentile(values, [75, 25])) / 1.34)
    if spread <= 0:
        spread = np.std(values)
    bandwidth = 0.9 * spread * values.size ** -0.2
    low, high = values.min() - 3 * bandwidth, values.max() + 3 * bandwidth
    n_bins = int(np.clip(math.ceil(4 * (high - low) / bandwidth), 64, 20_000))
    counts, edges = np.histogram(values, bins=n_bins, range=(low, high))
    width = edges[1] - edges[0]
    density = ndimage.gaussian_filter1d(counts.astype(np.float64), sigma=bandwidth / width, mode="constant")
    return (edges[:-1] + edges[1:]) / 2, density / (values.size * width)


def _find_valley(values: np.ndarray, means: tuple[float, float]) -> _Valley | None:
    """Locate the density minimum between the two means and measure its depth."""
    grid, density = _smoothed_density(values)
    inside = np.flatnonzero((grid > means[0]) & (grid < means[1]))
    if inside.size == 0:
        return None
    return _valley_at(grid, density, inside[np.argmin(density[inside])])


def _deep_valleys(values: np.ndarray) -> list[_Valley]:
    """Every valley of the smoothed density at least ``MIN_VALLEY_DEPTH`` deep, the deepest first."""
    grid, density = _smoothed_density(values)
    minima = np.flatnonzero((density[1:-1] < density[:-2]) & (density[1:-1] <= density[2:])) + 1
    valleys = [valley for valley in (_valley_at(grid, density, i) for i in minima)
               if valley is not None and valley.depth >= MIN_VALLEY_DEPTH]
    return sorted(valleys, key=lambda valley: -valley.depth)


def _valley_at(grid: np.ndarray, density: np.ndarray, lowest: int) -> _Valley | None:
    """The valley around grid point ``lowest``: its depth below the lower of the highest peaks on either side,
    its modes, and θ at the centre of its floor."""
    left_peak = int(np.argmax(density[: lowest + 1]))
    right_peak = lowest + int(np.argmax(density[lowest:]))
    lower_peak = min(density[left_peak], density[right_peak])
    if lower_peak <= density[lowest]:
        return None
    floor = density <= density[lowest] + VALLEY_FLOOR_TOLERANCE * lower_peak
    start, stop = lowest, lowest
    while start > left_peak and floor[start - 1]:
        start -= 1
    while stop < right_peak and floor[stop + 1]:
        stop += 1
    return _Valley(
        theta=float((grid[start] + grid[stop]) / 2),
        depth=float(1.0 - density[lowest] / lower_peak),
        modes=(float(grid[left_peak]), float(grid[right_peak])),
    )


def _failed_criteria(delta_bic, ashman_d, minority_weight, valley) -> list[str]:
    """Name each bimodality criterion that fails, in words for the user message."""
    failures = []
    if delta_bic <= MIN_DELTA_BIC:
        failures.append(f"ΔBIC = {delta_bic:.1f} ≤ {MIN_DELTA_BIC:g}")
    if ashman_d < MIN_ASHMAN_D:
        failures.append(f"Ashman's D = {ashman_d:.2f} < {MIN_ASHMAN_D:g}")
    if minority_weight < MIN_MINORITY_WEIGHT:
        failures.append(f"smaller mode holds {100 * minority_weight:.2f} % of tokens")
    if valley is None:
        failures.append("no density valley between the modes")
    elif valley.depth < MIN_VALLEY_DEPTH:
        failures.append(f"valley depth {valley.depth:.2f} < {MIN_VALLEY_DEPTH:g}")
    return failures


# ---------------------------------------------------------------------------------------------------
# The θ policy: one decision for every front-end


@dataclass(frozen=True)
class ArtifactEvidence:
    """What the query norms of a data set say about artifacts: the analysis behind ``θ = "auto"``.

    Attributes
    ----------
    verdict : {"artifacts", "no artifacts", "too little data"}
        See :func:`decide_theta` for the rule.
    reason : str
        One sentence saying why, with the deciding numbers.
    theta : float or None
        The centre of the floor of the density valley that splits the tokens (the candidate θ); None
        without a second mode.
    side : {"below", "above"} or None
        Where the candidate minority lies relative to ``theta``; "below" means ``n <= theta`` (Eq. 2).
    n_images, n_tokens : int
        Images, and non-CLS tokens per image (registers included).
    n_candidates : int
        Tokens on the minority side of ``theta``, over all images; 0 without two modes.
    pooled_fraction : float or None
        ``n_candidates`` over all non-CLS tokens.
    image_fractions : ndarray of shape (n_images,) or None
        Each image's share of its non-CLS tokens on the minority side.
    typical_share : float or None
        Share of the images whose ``image_fractions`` is at most ``MAX_IMAGE_FRACTION``.
    region_share : float or None
        Share of the candidate patch tokens that lie in 8-connected regions of at least ``REGION_PATCHES``
        patches of their image's grid (register tokens have no place on the grid and are not counted).
    largest_region : int or None
        The largest such region, in patches.
    delta_bic, ashman_d : float or None
        ΔBIC and Ashman's D of the two-component mixture around ``theta`` (see :func:`suggest_theta`).
    valley_depth : float or None
        ``1 - density at the valley / lower peak`` of the smoothed density, in [0, 1].
    failures : tuple of str
        The criteria that failed, in words; empty unless the verdict is "no artifacts".
    bimodality : BimodalityVerdict
        The test of the pooled norms for two modes (:func:`suggest_theta`).
    """

    verdict: str
    reason: str
    theta: float | None
    side: str | None
    n_images: int
    n_tokens: int
    n_candidates: int
    pooled_fraction: float | None
    image_fractions: np.ndarray | None = field(repr=False, compare=False)
    typical_share: float | None
    region_share: float | None
    largest_region: int | None
    delta_bic: float | None
    ashman_d: float | None
    valley_depth: float | None
    failures: tuple[str, ...]
    bimodality: BimodalityVerdict

    def to_dict(self) -> dict:
        """JSON-ready; the per-image fractions are summarised (min, median, 90th percentile, max)."""
        fields = {
            name: getattr(self, name)
            for name in ("verdict", "reason", "theta", "side", "n_images", "n_tokens", "n_candidates",
                         "pooled_fraction", "typical_share", "region_share", "largest_region", "delta_bic",
                         "ashman_d", "valley_depth")
        }
        fractions = self.image_fractions
        fields["image_fraction"] = None if fractions is None else dict(
            zip(("min", "median", "p90", "max"), (float(v) for v in np.percentile(fractions, [0, 50, 90, 100])))
        )
        fields["failures"] = list(self.failures)
        fields["bimodality"] = self.bimodality.to_dict()
        return fields


@dataclass(frozen=True)
class ThetaDecision:
    """The θ a run uses, where it came from, and why: the outcome of :func:`decide_theta`.

    Attributes
    ----------
    value : float or None
        None means no attenuation: the ITAE features are the original features, bit for bit.
    origin : {"auto", "given", "paper", "none"}
        What was asked for: the policy's choice, a number, the paper's θ for the model, or no θ.
    verdict : {"artifacts", "no artifacts", "too little data"}
        What the query norms show, whatever was asked for (``evidence.verdict``).
    reason : str
        One sentence for the user: what θ is used, why, and what it attenuates.
    warning : str or None
        Set when a θ that was asked for attenuates tokens the norms do not show as artifacts, or when the
        rule attenuates the side opposite to the artifacts.
    rule : {"minority", "below", "above"}
    attenuated_fraction : float
        Share of all non-CLS tokens that ``value`` and ``rule`` attenuate (Eq. 2-3); 0 when ``value`` is None.
    attenuated_per_image : float
        Mean number of attenuated tokens per image.
    evidence : ArtifactEvidence
    """

    value: float | None
    origin: str
    verdict: str
    reason: str
    warning: str | None
    rule: str
    attenuated_fraction: float
    attenuated_per_image: float
    evidence: ArtifactEvidence

    def to_dict(self) -> dict:
        """JSON-ready, the evidence included."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "evidence"}
        fields["evidence"] = self.evidence.to_dict()
        return fields


def decide_theta(
    requested,
    norms,
    *,
    num_prefix_tokens: int,
    grid_size: tuple[int, int],
    paper_theta: float | None = None,
    rule: str = "minority",
    evidence: ArtifactEvidence | None = None,
) -> ThetaDecision:
    """Decide the θ of a run from what the user asked for and what the query norms show.

    What is asked for decides the value: ``"auto"`` (the default everywhere) the policy below, a number
    that number, ``"paper"`` the paper's θ for the model, ``"none"`` no attenuation. An explicit number or
    the paper's θ is always honoured; it gets a ``warning`` when it attenuates tokens that the norms do
    not show as artifacts. Whatever was asked for, the norms are examined, so the verdict is the same.

    The rule of ``"auto"``: attenuate only when the verdict is "artifacts", at the valley θ. Real
    artifacts (Darcet et al. 2024; the paper's Fig. 2) are a few isolated tokens per image, about 2 % of
    them, apart from the rest in their query norm. Each criterion below turns one way that a split can
    look like artifacts without being them into a refusal:

    1. **A second mode.** The split must sit in a valley between two modes of the pooled non-CLS norms:
       the valley of the bimodality test (:func:`suggest_theta`: ΔBIC > 10, Ashman's D >= 2, a density
       valley at most half as high as the lower peak, the smaller mode at least 0.2 % of the tokens), or
       any other valley of the smoothed density at least half as deep around which a two-component
       mixture, started from its split, passes the same criteria with the valley between its means (a gap
       among a few outliers in a tail does not: the fit wanders off it). Without a second mode any θ cuts
       through one population of normal tokens, which is what the paper saw for ViT-S/14 and why it did
       not apply ITAE there. The other valleys matter where the norms have three modes, artifacts plus
       image content that splits in two (drawn shapes on a plain background seen through a model with
       artifacts): there a two-component test picks the wrong pair. θ is the centre of the valley's
       floor; the candidate valleys are judged in turn (the test's first, then the deepest) and the first
       that passes 2-4 is taken.
    2. **A small minority overall.** The minority side of θ may hold at most ``MAX_MINORITY_FRACTION``
       (10 %) of the tokens. Artifacts are a few per cent; a split near half of the tokens (a single
       Fashion-MNIST image: 45 %) separates the image's content, e.g. a garment from its background.
    3. **A small minority in most images.** In at least ``MIN_TYPICAL_SHARE`` (80 %) of the images the
       minority holds at most ``MAX_IMAGE_FRACTION`` (15 %) of the tokens. A pooled few per cent can hide
       a split that takes over some images; artifacts are a few tokens in every image they occur in.
    4. **Isolated tokens.** At most ``MAX_REGION_SHARE`` (25 %) of the minority's patch tokens may lie in
       8-connected regions of ``REGION_PATCHES`` (4, a 2×2 block) or more patches of their image's grid
       (``scipy.ndimage.label``). Artifacts sit in single, scattered background patches; a drawn shape or
       an object is a contiguous region of tokens whose norms differ because their content does.

    When all four hold, the verdict is "artifacts" if the sample is large enough, else "too little
    data": at least ``MIN_IMAGES`` (5) images, since criteria 3-4 speak about what most images show,
    and ``MIN_CANDIDATES`` (20) minority tokens, since fewer could be chance outliers rather than a mode.
    "too little data" attenuates nothing; its reason names the candidate θ, which can be given explicitly.

    Parameters
    ----------
    requested : float, {"auto", "paper", "none"} or None
        What the user asked for; None means ``"auto"``.
    norms : array-like of shape (n_images, n_tokens)
        Final-block query norms (Eq. 4) of every token, CLS in column 0, then the registers, then the
        patches row by row.
    num_prefix_tokens : int
        CLS plus register tokens.
    grid_size : (int, int)
        Rows and columns of the patch grid; ``rows * cols == n_tokens - num_prefix_tokens``.
    paper_theta : float, optional
        The paper's θ for the model (``BackboneSpec.default_theta``); needed for ``"paper"``.
    rule : {"minority", "below", "above"}, default "minority"
        The artifact rule the run uses (Eq. 3, or one side of θ); it decides what ``value`` attenuates.
    evidence : ArtifactEvidence, optional
        :func:`examine_norms` of these same norms, to skip re-examining them (a front-end that decides
        again for every position of a θ slider).

    Returns
    -------
    ThetaDecision

    Raises
    ------
    ValueError
        If ``requested`` is not a finite number or one of the words, ``"paper"`` is asked for a model
        without a paper θ, or the norms, layout or rule are invalid.
    """
    origin, value = resolve_theta_request(requested, paper_theta)
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    if evidence is None:
        evidence = examine_norms(norms, num_prefix_tokens=num_prefix_tokens, grid_size=grid_size)
    candidates = _validated_token_norms(norms)
    if candidates.shape != (evidence.n_images, evidence.n_tokens):
        raise ValueError(
            f"the evidence was examined on {evidence.n_images} images × {evidence.n_tokens} tokens, "
            f"not on these norms ({candidates.shape[0]} × {candidates.shape[1]})"
        )
    if origin == "auto":
        value = evidence.theta if evidence.verdict == ARTIFACTS else None
    fraction, per_image = (0.0, 0.0) if value is None else _attenuation(candidates, value, rule)
    reason = _decision_reason(origin, value, rule, evidence, fraction, per_image)
    warning = _decision_warning(value, rule, evidence, fraction)
    return ThetaDecision(value, origin, evidence.verdict, reason, warning, rule, fraction, per_image, evidence)


def resolve_theta_request(requested, paper_theta: float | None = None) -> tuple[str, float | None]:
    """Check what the user asked for θ, and return ``(origin, value)`` before any norm is computed.

    The value is None for ``"auto"`` (the norms decide it later) and ``"none"``. Front-ends call this
    before extracting features so that a bad request fails at once.

    Parameters
    ----------
    requested : float, {"auto", "paper", "none"} or None
        None means ``"auto"``.
    paper_theta : float, optional
        The paper's θ for the model.

    Returns
    -------
    origin : {"auto", "given", "paper", "none"}
    value : float or None

    Raises
    ------
    ValueError
        If ``requested`` is neither a finite number nor one of the words, or ``"paper"`` is asked for
        where ``paper_theta`` is None.
    """
    if requested is None or requested == "auto":
        return "auto", None
    if requested == "none":
        return "none", None
    if requested == "paper":
        if paper_theta is None:
            raise ValueError(
                "the paper gives no θ for this model (it applied ITAE only where the query norms were "
                "bimodal); ask for θ = auto or a number"
            )
        return "paper", float(paper_theta)
    if isinstance(requested, Real) and not isinstance(requested, bool) and math.isfinite(requested):
        return "given", float(requested)
    raise ValueError(f"θ must be a finite number or one of {THETA_WORDS}, got {requested!r}")


def examine_norms(
    norms, *, num_prefix_tokens: int, grid_size: tuple[int, int], seed: int = 0, norms_name: str = "query norms"
) -> ArtifactEvidence:
    """Judge whether the query norms show artifacts, by the rule stated in :func:`decide_theta`.

    Other per-token norms (the key, value or output norms of :func:`itae.engine.detector_norms`) are judged
    by the same rule; ``norms_name`` names them in the reason.

    Parameters
    ----------
    norms : array-like of shape (n_images, n_tokens)
        Final-block query norms (Eq. 4), CLS in column 0, then the registers, then the patches row by row.
    num_prefix_tokens : int
        CLS plus register tokens.
    grid_size : (int, int)
        Rows and columns of the patch grid.
    seed : int, default 0
        Seeds the sub-sampling and the mixture fits of :func:`suggest_theta`.
    norms_name : str, default "query norms"
        What the norms are, for the reason ("the query norms have no second mode").

    Returns
    -------
    ArtifactEvidence

    Raises
    ------
    ValueError
        If the norms are not finite, or do not fit ``num_prefix_tokens`` and ``grid_size``.
    """
    candidates = _validated_token_norms(norms)
    n_images, n_tokens = candidates.shape
    rows, cols = _validated_layout(n_tokens, num_prefix_tokens, grid_size)
    bimodality = suggest_theta(candidates, seed=seed)
    modes = _separating_modes(candidates, bimodality, seed)
    if not modes:
        failure = f"the {norms_name} have no second mode ({'; '.join(bimodality.failures)})"
        return ArtifactEvidence(
            verdict=NO_ARTIFACTS, reason=_no_artifacts_reason(failure, n_images), theta=None, side=None,
            n_images=n_images, n_tokens=n_tokens, n_candidates=0, pooled_fraction=None, image_fractions=None,
            typical_share=None, region_share=None, largest_region=None, delta_bic=None, ashman_d=None,
            valley_depth=None, failures=(failure,), bimodality=bimodality,
        )

    # The first split that passes criteria 2-4 is taken; if none does, the first (most prominent) is reported.
    splits = []
    for mode in modes:
        splits.append(_judge_split(candidates, mode, num_prefix_tokens, rows, cols))
        if not splits[-1].failures:
            break
    split = splits[-1] if not splits[-1].failures else splits[0]
    mode, n_candidates = split.mode, int(split.minority.sum())
    described = (
        f"{100 * split.pooled:.1f} % of the tokens ({n_candidates / n_images:.1f} per image) lie {split.side} "
        f"θ = {mode.valley.theta:.2f}"
    )
    if split.failures:
        verdict = NO_ARTIFACTS
        reason = _no_artifacts_reason(f"{described}, but {'; '.join(split.failures)}", n_images)
    elif n_images < MIN_IMAGES or n_candidates < MIN_CANDIDATES:
        verdict = TOO_LITTLE_DATA
        reason = (
            f"Too little data: {described}, isolated and apart from the rest, but {_images(n_images)} and "
            f"{n_candidates} such tokens are too few to call them artifacts (at least {MIN_IMAGES} images "
            f"and {MIN_CANDIDATES} tokens)"
        )
    else:
        verdict = ARTIFACTS
        reason = (
            f"Artifacts: {described}, isolated ({100 * (1 - split.region_share):.0f} % outside regions of "
            f"{REGION_PATCHES}+ patches) and apart from the rest (ΔBIC = {mode.delta_bic:.0f}, "
            f"Ashman's D = {mode.ashman_d:.1f}, valley depth {mode.valley.depth:.2f})"
        )
    return ArtifactEvidence(
        verdict=verdict, reason=reason, theta=mode.valley.theta, side=split.side, n_images=n_images,
        n_tokens=n_tokens, n_candidates=n_candidates, pooled_fraction=split.pooled,
        image_fractions=split.image_fractions, typical_share=split.typical, region_share=split.region_share,
        largest_region=split.largest, delta_bic=mode.delta_bic, ashman_d=mode.ashman_d,
        valley_depth=mode.valley.depth,
        failures=split.failures, bimodality=bimodality,
    )


@dataclass(frozen=True)
class _Mode:
    """A valley of the density with a mode on either side: the two-component mixture fitted around it."""

    valley: _Valley
    ashman_d: float
    delta_bic: float


@dataclass(frozen=True)
class _Split:
    """The tokens on the minority side of a mode's valley, and the criteria 2-4 they fail."""

    mode: _Mode
    side: str
    minority: np.ndarray  # bool, (n_images, n_tokens - 1)
    pooled: float
    image_fractions: np.ndarray
    typical: float
    region_share: float
    largest: int
    failures: tuple[str, ...]


def _separating_modes(candidates: np.ndarray, bimodality: BimodalityVerdict, seed: int) -> list[_Mode]:
    """The valleys between two modes: the bimodality test's, then every other deep one, deepest first.

    Another valley counts where the two-component mixture started from its split passes the bimodality
    test's own criteria (ΔBIC, Ashman's D, the smaller mode's weight) with the valley between its means: a
    third mode, not a gap between a few outliers in a tail, where the fit wanders off the valley.
    """
    modes = [_Mode(_Valley(bimodality.theta, bimodality.strength, bimodality.modes), bimodality.ashman_d,
                   bimodality.delta_bic)] if bimodality.bimodal else []
    sample = _subsample(candidates.ravel(), MAX_SAMPLES, seed)
    seen = {int(np.sum(sample <= mode.valley.theta)) for mode in modes}  # a split is the tokens below it
    for valley in _deep_valleys(sample):
        n_below = int(np.sum(sample <= valley.theta))
        if n_below in seen or not 0 < n_below < sample.size:
            continue
        seen.add(n_below)
        means, stds, weights, delta_bic = _fit_mixtures(sample, seed, starts=(n_below / sample.size,))
        ashman_d = _ashman_d(means[0], stds[0], means[1], stds[1])
        if means[0] < valley.theta < means[1] and not _failed_criteria(delta_bic, ashman_d, min(weights), valley):
            modes.append(_Mode(valley, ashman_d, delta_bic))
    return modes


def _judge_split(candidates: np.ndarray, mode: _Mode, num_prefix_tokens: int, rows: int, cols: int) -> _Split:
    """Criteria 2-4 of :func:`decide_theta` on the tokens of the minority side of ``mode``'s valley."""
    below = candidates <= mode.valley.theta  # L_a of Eq. 2
    side = "below" if below.mean() <= 0.5 else "above"
    minority = below if side == "below" else ~below
    image_fractions = minority.mean(axis=1)
    pooled = float(minority.mean())
    typical = float(np.mean(image_fractions <= MAX_IMAGE_FRACTION))
    n_images = len(candidates)
    region_share, largest = _regions(minority[:, num_prefix_tokens - 1:].reshape(n_images, rows, cols))
    failures = []
    if pooled > MAX_MINORITY_FRACTION:
        failures.append(f"that is more than the {100 * MAX_MINORITY_FRACTION:.0f} % of the tokens artifacts make up")
    if typical < MIN_TYPICAL_SHARE:
        n_over = int(np.sum(image_fractions > MAX_IMAGE_FRACTION))
        failures.append(f"more than {100 * MAX_IMAGE_FRACTION:.0f} % in {n_over} of {n_images} images")
    if region_share > MAX_REGION_SHARE:
        failures.append(
            f"{100 * region_share:.0f} % of them form connected regions of {REGION_PATCHES} or more patches "
            f"(the largest {largest}): image content, not isolated artifacts"
        )
    return _Split(mode, side, minority, pooled, image_fractions, typical, region_share, largest, tuple(failures))


def _validated_layout(n_tokens: int, num_prefix_tokens, grid_size) -> tuple[int, int]:
    """Check that ``n_tokens`` non-CLS tokens are the registers plus a ``grid_size`` grid of patches."""
    if not isinstance(num_prefix_tokens, Integral) or not 1 <= num_prefix_tokens <= n_tokens:
        raise ValueError(
            f"num_prefix_tokens must be an int from 1 to {n_tokens} (CLS plus registers), got {num_prefix_tokens!r}"
        )
    rows, cols = (int(n) for n in grid_size)
    if rows * cols != n_tokens + 1 - num_prefix_tokens:
        raise ValueError(
            f"a {rows}×{cols} patch grid and {num_prefix_tokens} prefix tokens make {rows * cols + num_prefix_tokens} "
            f"tokens per image, but the norms hold {n_tokens + 1}"
        )
    return rows, cols


def _regions(patches: np.ndarray) -> tuple[float, int]:
    """(share of the True patches in 8-connected regions of REGION_PATCHES or more, largest region).

    ``patches`` is a bool array of shape (n_images, rows, cols); regions never join across images.
    """
    within_image = np.zeros((3, 3, 3), dtype=bool)
    within_image[1] = True  # 8-connectivity on each image's grid, none along the image axis
    labels, n_regions = ndimage.label(patches, structure=within_image)
    if n_regions == 0:
        return 0.0, 0
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0  # label 0 is the background
    in_large = sizes[labels] >= REGION_PATCHES
    return float(in_large.sum() / patches.sum()), int(sizes.max())


def _no_artifacts_reason(why: str, n_images: int) -> str:
    few = f" (from only {_images(n_images)})" if n_images < MIN_IMAGES else ""
    return f"No artifacts{few}: {why}"


def _images(n: int) -> str:
    return f"{n} image" if n == 1 else f"{n} images"


def _attenuation(candidates: np.ndarray, theta: float, rule: str) -> tuple[float, float]:
    """(share of the non-CLS tokens, mean tokens per image) that ``theta`` and ``rule`` attenuate."""
    mask = _artifact_mask(candidates, theta, rule)
    return float(mask.mean()), float(mask.sum(axis=1).mean())


def _artifact_mask(candidates: np.ndarray, theta: float, rule: str) -> np.ndarray:
    """Eq. 2-3 (the engine's) on non-CLS norms of shape (n_images, n_tokens - 1); bool, same shape."""
    with_cls = torch.from_numpy(np.pad(candidates, ((0, 0), (1, 0))))  # split_artifacts expects CLS in column 0
    return split_artifacts(with_cls, theta, rule)[:, 1:].numpy()


def _decision_reason(origin, value, rule, evidence, fraction, per_image) -> str:
    if origin == "none":
        return "θ = none as asked: nothing is attenuated, ITAE = original."
    if origin == "auto":
        if value is None:
            hint = f"; give θ = {evidence.theta:.2f} explicitly to apply it" if evidence.verdict == TOO_LITTLE_DATA else ""
            return f"{evidence.reason} — θ = none, ITAE = original{hint}."
        return f"{evidence.reason} — θ = {value:.2f} (auto), rule {rule}, attenuates {per_image:.1f} tokens per image."
    asked = "as given" if origin == "given" else "(the paper's θ for this model)"
    return (
        f"θ = {value:g} {asked}, rule {rule}: attenuates {100 * fraction:.2f} % of the non-CLS tokens, "
        f"{per_image:.1f} per image."
    )


def _decision_warning(value, rule, evidence, fraction) -> str | None:
    """A θ that was asked for and attenuates normal tokens: where there are no artifacts, or beyond them."""
    if value is None or fraction == 0:
        return None
    if evidence.verdict != ARTIFACTS:
        return (
            f"θ = {value:g} attenuates {100 * fraction:.1f} % of the non-CLS tokens, which the query norms do "
            f"not show as artifacts. {evidence.reason}."
        )
    if fraction > MAX_MINORITY_FRACTION:
        return (
            f"θ = {value:g}, rule {rule}, attenuates {100 * fraction:.1f} % of the non-CLS tokens, far more than "
            f"the {100 * evidence.pooled_fraction:.1f} % artifacts {evidence.side} θ = {evidence.theta:.2f}."
        )
    return None
def parse_theta_range(text: str) -> np.ndarray:
    """Parse a θ grid: ``"start:stop:step"`` (``stop`` included when it lands on the grid) or a list ``"a,b,c"``.

    Parameters
    ----------
    text : str
        For example ``"1:8:0.25"`` (the range of the paper's Fig. 5) gives 1.0, 1.25, ..., 8.0;
        ``"2.5, 3, 3.5"`` gives those three values in that order; a single number gives itself.

    Returns
    -------
    ndarray of shape (n_thetas,)

    Raises
    ------
    ValueError
        If ``text`` is neither three finite numbers with ``step > 0`` and ``stop >= start`` nor a list of
        finite numbers, or the grid would hold more than 10,000 points.
    """
    text = str(text)
    if ":" not in text:
        return _parse_theta_list(text)
    parts = text.split(":")
    if len(parts) != 3:
        raise ValueError(
            f"θ range must look like 'start:stop:step' (e.g. '1:8:0.25') or a list 'a,b,c', got {text!r}"
        )
    start, stop, step = _theta_numbers(parts, text)
    if step <= 0:
        raise ValueError(f"θ range step must be positive, got {step:g} in {text!r}")
    if stop < start:
        raise ValueError(f"θ range stop must be at least start, got {text!r}")
    # The small slack lets a stop that is a whole number of steps away survive float rounding.
    n_steps = math.floor((stop - start) / step + 1e-9)
    if n_steps + 1 > MAX_THETA_POINTS:
        raise ValueError(
            f"θ range {text!r} gives {n_steps + 1} points; at most {MAX_THETA_POINTS} are allowed"
        )
    return np.round(start + step * np.arange(n_steps + 1), 10)


def _parse_theta_list(text: str) -> np.ndarray:
    parts = text.split(",")
    if len(parts) > MAX_THETA_POINTS:
        raise ValueError(f"the θ list holds {len(parts)} values; at most {MAX_THETA_POINTS} are allowed")
    return np.array(_theta_numbers(parts, text))


def _theta_numbers(parts: list[str], text: str) -> list[float]:
    try:
        numbers = [float(part) for part in parts]
    except ValueError:
        raise ValueError(
            f"θ values {text!r} hold something that is not a number; give 'start:stop:step' or a list 'a,b,c'"
        ) from None
    if not all(math.isfinite(v) for v in numbers):
        raise ValueError(f"θ values {text!r} must be finite numbers")
    return numbers


@dataclass
class SweepResult:
    """Scores and artifact counts over a θ grid, as in the paper's Fig. 5.

    Attributes
    ----------
    thetas : ndarray of shape (n_thetas,)
        The θ values, in the order they were swept.
    rule : {"below", "above", "minority"}
        The artifact selection rule used at every θ.
    rows : list of dict
        One row per θ: ``theta``, ``artifact_fraction`` (of all non-CLS tokens),
        ``mean_artifacts_per_image``, ``mean_register_artifacts_per_image`` when the model has
        registers, then the metrics ``score`` returned, flattened (``{"acc": {"mean": m}}`` becomes
        ``acc_mean``).
    original : dict or None
        The flattened metrics of the unmodified model, drawn as a horizontal line.
    settings : dict
        What the sweep ran on, written into every CSV row and the figure's title; the keys known to the
        title are ``model``, ``data``, ``n_clusters``, ``sets``, ``runs`` and ``seed``.
    """

    thetas: np.ndarray
    rule: str
    rows: list[dict] = field(default_factory=list)
    original: dict | None = None
    settings: dict = field(default_factory=dict)

    @property
    def metrics(self) -> list[str]:
        """The metrics of :data:`itae.choices.METRICS` the rows hold, in that order (ACC first with labels)."""
        return [name for name in METRICS if self.rows and _metric_column(self.rows[0], name)]

    def to_frame(self):
        """Return the rows as a :class:`pandas.DataFrame`, one row per θ, the rule and settings as columns."""
        # Imported here: only the report paths need pandas.
        import pandas as pd

        return pd.DataFrame([{**row, "rule": self.rule, **self.settings} for row in self.rows])

    def to_csv(self, path) -> None:
        """Write :meth:`to_frame` to ``path`` as CSV, one row per θ."""
        self.to_frame().to_csv(path, index=False)

    def title(self) -> str:
        """Two lines naming the rule, model, data, K, sets, runs, seed and θ grid, from what ``settings`` holds."""
        known = self.settings
        subject = " on ".join(str(known[key]) for key in ("model", "data") if key in known)
        protocol = []
        if "n_clusters" in known:
            protocol.append(f"K = {known['n_clusters']}")
        if "sets" in known and "runs" in known:
            protocol.append(f"{known['sets']} sets × {known['runs']} runs")
        if "seed" in known:
            protocol.append(f"seed {known['seed']}")
        protocol.append(f"θ {self.thetas.min():g} to {self.thetas.max():g} ({self.thetas.size} values)")
        first = f"θ sweep, rule {self.rule}" + (f": {subject}" if subject else "")
        return f"{first}\n{', '.join(protocol)}"

    def figure(self, metric: str | None = None):
        """Draw ``metric`` against θ (with standard-error bars when known) on a matplotlib Figure.

        The unmodified model's score is a horizontal line, and the share of attenuated tokens a dashed line
        on the right axis, from 0 to 100 %. The title carries :meth:`title`.

        Parameters
        ----------
        metric : str, optional
            One of :attr:`metrics`; default the first of them (ACC with labels, inertia without).

        Returns
        -------
        matplotlib.figure.Figure

        Raises
        ------
        ValueError
            If the rows hold neither ``metric`` nor ``metric + "_mean"``.
        """
        # Imported here: only the report paths need matplotlib. Figure() draws with Agg and leaves
        # pyplot's global backend alone.
        from matplotlib.figure import Figure
        from matplotlib.ticker import PercentFormatter

        if not self.rows:
            raise ValueError("the sweep has no rows to plot")
        metric = metric or self.metrics[0]
        column = _metric_column(self.rows[0], metric)
        if column is None:
            raise ValueError(f"metric {metric!r} is not in the sweep; its columns are {sorted(self.rows[0])}")
        order = np.argsort(self.thetas, kind="stable")
        rows = [self.rows[i] for i in order]
        x = [row["theta"] for row in rows]
        y = [row[column] for row in rows]
        error_column = f"{metric}_se"
        errors = [row[error_column] for row in rows] if error_column in rows[0] else None

        figure = Figure(figsize=(6.4, 4.4), layout="constrained")
        axes = figure.add_subplot()
        axes.errorbar(
            x, y, yerr=errors, marker="o", markersize=3, capsize=2, label=f"ITAE ({self.rule})"
        )
        if self.original is not None:
            original_column = _metric_column(self.original, metric)
            if original_column is not None:
                axes.axhline(self.original[original_column], color="black", linestyle=":", label="original")
        axes.set_xlabel("θ")
        axes.set_ylabel(metric_label(metric))
        # Wrapped to the figure's width: data descriptions run long.
        axes.set_title("\n".join(textwrap.fill(line, 80, break_on_hyphens=False) for line in self.title().splitlines()), fontsize="small")
        fraction_axes = axes.twinx()
        fraction_axes.plot(
            x, [100 * row["artifact_fraction"] for row in rows],
            color="grey", linestyle="--", linewidth=1, label="attenuated tokens",
        )
        # A share of all tokens: a fixed 0-100 % axis, so that a flat 0 % neither gets negative ticks nor a
        # magnified scale, and two sweeps read alike.
        fraction_axes.set_ylim(-2, 102)
        fraction_axes.set_yticks([0, 25, 50, 75, 100])
        fraction_axes.yaxis.set_major_formatter(PercentFormatter(decimals=0))
        fraction_axes.set_ylabel("attenuated tokens")
        figure.legend(loc="outside lower center", ncols=3, fontsize="small")
        return figure

    def plot_png(self, path, metric: str | None = None) -> None:
        """Save :meth:`figure` of ``metric`` as PNG to ``path`` (a path or a binary file)."""
        self.figure(metric).savefig(path, format="png", dpi=120)


def theta_sweep(
    norms,
    features_at: Callable[[float, str], np.ndarray],
    score: Callable[[np.ndarray], Mapping],
    thetas,
    rule: str = "below",
    num_prefix_tokens: int = 1,
    original_score: Mapping | None = None,
    progress: Callable[[int, int], None] | None = None,
    settings: Mapping | None = None,
) -> SweepResult:
    """Score the ITAE features at every θ of a grid and count the artifacts each θ selects.

    Parameters
    ----------
    norms : array-like of shape (n_images, n_tokens)
        Final-block query norms (Eq. 4) of every token, the CLS token in column 0 included.
    features_at : callable ``(theta, rule) -> ndarray of shape (n_images, dim)``
        The ITAE features at that θ, usually computed from a final-block cache.
    score : callable ``(features) -> dict``
        Metrics of the features, e.g. ``{"acc": 0.71}`` or ``{"acc": {"mean": .., "se": ..}}``;
        non-scalar entries of a nested metric (a list of per-run values) are left out of the rows.
    thetas : array-like of shape (n_thetas,)
        The θ grid, swept in the given order (see :func:`parse_theta_range`).
    rule : {"below", "above", "minority"}, default "below"
        The artifact rule; "below" is the paper's Sec. 5.2 sweep, "minority" is Eq. 3.
    num_prefix_tokens : int, default 1
        CLS plus register tokens. Only the CLS column is excluded from the counts, since registers
        can be artifacts too; with registers, their own artifact count gets a column.
    original_score : dict, optional
        Metrics of the unmodified model, in the same format as ``score`` returns.
    progress : callable ``(done, total)``, optional
        Called after each θ.
    settings : dict, optional
        What the sweep runs on (model, data, n_clusters, sets, runs, seed): see ``SweepResult.settings``.

    Returns
    -------
    SweepResult

    Raises
    ------
    ValueError
        On a bad ``norms``, ``thetas``, ``rule`` or ``num_prefix_tokens``, or when ``features_at``
        returns features for a different number of images.
    """
    candidates = _validated_token_norms(norms)
    grid = _validated_thetas(thetas)
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    n_candidates = candidates.shape[1]
    if not isinstance(num_prefix_tokens, Integral) or not 1 <= num_prefix_tokens <= n_candidates:
        raise ValueError(
            f"num_prefix_tokens must be an int from 1 to {n_candidates} "
            f"(CLS plus registers), got {num_prefix_tokens!r}"
        )
    n_registers = int(num_prefix_tokens) - 1
    rows = []
    for done, theta in enumerate(grid, start=1):
        row = _artifact_counts(candidates, float(theta), rule, n_registers)
        features = np.asarray(features_at(float(theta), rule))
        if features.ndim != 2 or features.shape[0] != candidates.shape[0]:
            raise ValueError(
                f"features_at({float(theta):g}, {rule!r}) returned shape {features.shape}; "
                f"expected ({candidates.shape[0]}, dim)"
            )
        metrics = _flatten_metrics(score(features))
        row.update((key, value) for key, value in metrics.items() if key not in row)
        rows.append(row)
        if progress is not None:
            progress(done, grid.size)
    original = None if original_score is None else _flatten_metrics(original_score)
    return SweepResult(thetas=grid, rule=rule, rows=rows, original=original, settings=dict(settings or {}))


def _validated_token_norms(norms) -> np.ndarray:
    """Check ``norms`` of shape (n_images, n_tokens) and return the non-CLS columns."""
    array = np.asarray(norms, dtype=np.float64)
    if array.ndim != 2 or array.shape[0] == 0 or array.shape[1] < 2:
        raise ValueError(
            f"norms must have shape (n_images, n_tokens) with the CLS token in column 0 and at "
            f"least one more token, got shape {array.shape}"
        )
    if not np.isfinite(array).all():
        raise ValueError("norms holds NaN or infinite values; query norms must be finite")
    return array[:, 1:]


def _validated_thetas(thetas) -> np.ndarray:
    grid = np.asarray(thetas, dtype=np.float64)
    if grid.ndim != 1 or grid.size == 0 or not np.isfinite(grid).all():
        raise ValueError(f"thetas must be a non-empty 1-D array of finite numbers, got {thetas!r}")
    return grid


def _artifact_counts(candidates: np.ndarray, theta: float, rule: str, n_registers: int) -> dict:
    mask = _artifact_mask(candidates, theta, rule)
    row = {
        "theta": theta,
        "artifact_fraction": float(mask.mean()),
        "mean_artifacts_per_image": float(mask.sum(axis=1).mean()),
    }
    if n_registers:
        row["mean_register_artifacts_per_image"] = float(mask[:, :n_registers].sum(axis=1).mean())
    return row


def _flatten_metrics(metrics) -> dict[str, float]:
    """Flatten ``{"acc": 0.7}`` or ``{"acc": {"mean": .., "se": ..}}`` into ``{"acc_mean": ..}``.

    A nested metric may be a mapping, a dataclass or an object with ``to_dict()``; its non-scalar
    entries are left out.
    """
    if not isinstance(metrics, Mapping):
        raise ValueError(f"score must return a dict of metrics, got {type(metrics).__name__}")
    flat = {}
    for name, value in metrics.items():
        if hasattr(value, "to_dict"):
            value = value.to_dict()
        elif dataclasses.is_dataclass(value):
            value = dataclasses.asdict(value)
        if isinstance(value, Mapping):
            flat.update(
                (f"{name}_{key}", float(sub)) for key, sub in value.items() if _is_scalar(sub)
            )
        elif _is_scalar(value):
            flat[name] = float(value)
        else:
            raise ValueError(
                f"metric {name!r} must be a number or a dict of numbers, got {value!r}"
            )
    return flat


def _is_scalar(value) -> bool:
    return isinstance(value, (Real, np.number)) and not isinstance(value, bool)


def _metric_column(row: Mapping, metric: str) -> str | None:
    """The column of ``metric`` in ``row``: ``acc_mean`` (a protocol summary) or ``acc``; None if absent."""
    return next((column for column in (f"{metric}_mean", metric) if column in row), None)
