"""Choosing the artifact threshold θ: a bimodality test, a θ suggestion and a θ sweep.

ITAE (the paper's Eq. 2-3) splits the final-block query norms ``n_i`` of the non-CLS tokens at a
threshold θ and treats the minority as artifacts. That only makes sense when the norms over a data
set are bimodal: a small group of artifact tokens apart from the normal ones. The paper set θ by eye
(3.0 for DINOv2 ViT-B/L/g, 2.0 for ViT-S with registers) and skipped ViT-S without registers, whose
distribution is unimodal. :func:`suggest_theta` makes that call reproducible.

How the test works, and why
---------------------------
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

:func:`choose_theta` is the decision both front-ends make for a run: the θ asked for, else the paper's θ for
the model, else the suggestion; it returns the θ with its origin and the verdict, so that a front-end can
warn when a θ splits a unimodal distribution.

:func:`theta_sweep` reproduces the ablation of the paper's Sec. 5.2 (Fig. 5): it scores the ITAE
features at each θ of a grid, and counts the artifacts each θ selects. It knows nothing about
models: the caller passes ``features_at(theta, rule)`` (usually reading a final-block cache) and
``score(features)`` (usually the K-Means protocol).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from numbers import Integral, Real

import numpy as np
import torch
from scipy.ndimage import gaussian_filter1d
from sklearn.mixture import GaussianMixture

from itae.choices import RULES
from itae.engine import split_artifacts

__all__ = [
    "BimodalityVerdict",
    "SweepResult",
    "ThetaChoice",
    "choose_theta",
    "parse_theta_range",
    "suggest_theta",
    "theta_sweep",
]

# Checking a given θ against the distribution only decides whether to warn; 50,000 norms keep that
# to about a second, where suggest_theta's full 200,000 take five.
CHECK_SAMPLES = 50_000

START_SPLITS = (0.02, 0.5, 0.98)
MIN_DELTA_BIC = 10.0
MIN_ASHMAN_D = 2.0
MIN_MINORITY_WEIGHT = 0.002
MIN_VALLEY_DEPTH = 0.5
VALLEY_FLOOR_TOLERANCE = 0.05
MAX_THETA_POINTS = 10_000


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


def suggest_theta(norms, max_samples: int = 200_000, seed: int = 0) -> BimodalityVerdict:
    """Test the query norms for bimodality and suggest θ at the valley between the modes.

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
    values = _validated_norms(norms)
    if not isinstance(max_samples, Integral) or max_samples < 2:
        raise ValueError(f"max_samples must be an int of at least 2, got {max_samples!r}")
    rng = np.random.default_rng(seed)
    if values.size > max_samples:
        values = rng.choice(values, size=int(max_samples), replace=False)
    if values.size < 2 or np.ptp(values) == 0:
        return _constant_verdict(values)

    means, stds, weights, delta_bic = _fit_mixtures(values, seed)
    ashman_d = math.sqrt(2.0) * (means[1] - means[0]) / math.sqrt(stds[0] ** 2 + stds[1] ** 2)
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
            minority_side=None, modes=None, **common,
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
    return BimodalityVerdict(
        bimodal=False, theta=None, strength=0.0, method="constant input",
        message=f"No bimodality (all {values.size} norms equal {value:.3g}): "
        "ITAE has nothing to remove in this model; a θ would split normal tokens.",
        minority_fraction=None, minority_side=None, modes=None, means=(value, value),
        stds=(0.0, 0.0), weights=(1.0, 0.0), ashman_d=0.0, delta_bic=0.0,
        n_samples=int(values.size),
    )


def _fit_mixtures(values: np.ndarray, seed: int):
    """Fit 1- and 2-component mixtures; return the 2-component one sorted by mean, and ΔBIC.

    EM can stop in a local optimum, so the 2-component fit keeps the best of three starts: the
    sorted norms split at the 2nd percentile, the median and the 98th percentile. A k-means start
    alone tends to split the majority mode in two when the minority holds only a few percent of the
    tokens; the tail starts find that minority.
    """
    column = values.reshape(-1, 1)
    one = GaussianMixture(n_components=1, random_state=seed).fit(column)
    ordered = np.sort(values)
    fits = [
        GaussianMixture(
            n_components=2, covariance_type="spherical", random_state=seed,
            **_split_start(ordered, fraction),
        ).fit(column)
        for fraction in START_SPLITS
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
    density = gaussian_filter1d(counts.astype(np.float64), sigma=bandwidth / width, mode="constant")
    return (edges[:-1] + edges[1:]) / 2, density / (values.size * width)


def _find_valley(values: np.ndarray, means: tuple[float, float]) -> _Valley | None:
    """Locate the density minimum between the two means and measure its depth."""
    grid, density = _smoothed_density(values)
    inside = np.flatnonzero((grid > means[0]) & (grid < means[1]))
    if inside.size == 0:
        return None
    lowest = inside[np.argmin(density[inside])]
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


@dataclass(frozen=True)
class ThetaChoice:
    """The θ a run uses, and why: the outcome of :func:`choose_theta`.

    Attributes
    ----------
    value : float or None
        None means no attenuation: the ITAE features are the original features.
    origin : {"given", "paper", "auto"}
        The caller gave θ, the paper's θ for the model was taken, or the norms' bimodality test chose it.
    verdict : BimodalityVerdict
        The bimodality test of the query norms, also for a given θ: it says whether that θ splits a
        unimodal distribution.
    """

    value: float | None
    origin: str
    verdict: BimodalityVerdict


def choose_theta(norms, requested: float | str | None = None, default: float | None = None) -> ThetaChoice:
    """Decide the θ of a run from what was asked for, the model's θ from the paper and the query norms.

    ``"auto"``, or nothing asked for where the paper gives no θ: the suggestion of :func:`suggest_theta`
    (None, no attenuation, when the norms are not bimodal). A number: that θ. Nothing asked for: the
    paper's θ. A θ that was not suggested is still tested (on up to 50,000 norms), so that a caller can
    warn when it splits a unimodal distribution.

    Parameters
    ----------
    norms : array-like of shape (n_images, n_tokens)
        Final-block query norms (Eq. 4), CLS in column 0.
    requested : float, "auto" or None
        What the user asked for.
    default : float or None
        The paper's θ for the model (``BackboneSpec.default_theta``).

    Returns
    -------
    ThetaChoice
    """
    candidates = np.asarray(norms)[:, 1:]
    if requested == "auto" or (requested is None and default is None):
        verdict = suggest_theta(candidates)
        return ThetaChoice(verdict.theta, "auto", verdict)
    value, origin = (default, "paper") if requested is None else (requested, "given")
    return ThetaChoice(float(value), origin, suggest_theta(candidates, max_samples=CHECK_SAMPLES))


def parse_theta_range(text: str) -> np.ndarray:
    """Parse ``"start:stop:step"`` into a θ grid, including ``stop`` when it lands on the grid.

    Parameters
    ----------
    text : str
        For example ``"1:8:0.25"`` (the range of the paper's Fig. 5) gives 1.0, 1.25, ..., 8.0.

    Returns
    -------
    ndarray of shape (n_thetas,)

    Raises
    ------
    ValueError
        If ``text`` is not three finite numbers with ``step > 0`` and ``stop >= start``, or the grid
        would hold more than 10,000 points.
    """
    parts = str(text).split(":")
    if len(parts) != 3:
        raise ValueError(
            f"θ range must look like 'start:stop:step' (e.g. '1:8:0.25'), got {text!r}"
        )
    try:
        start, stop, step = (float(part) for part in parts)
    except ValueError:
        raise ValueError(f"θ range {text!r} holds something that is not a number") from None
    if not all(math.isfinite(v) for v in (start, stop, step)):
        raise ValueError(f"θ range {text!r} must hold finite numbers")
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
    """

    thetas: np.ndarray
    rule: str
    rows: list[dict] = field(default_factory=list)
    original: dict | None = None

    def to_frame(self):
        """Return the rows as a :class:`pandas.DataFrame`, one row per θ."""
        # Imported here: only the report paths need pandas.
        import pandas as pd

        return pd.DataFrame(self.rows)

    def to_csv(self, path) -> None:
        """Write the rows to ``path`` as CSV, one row per θ."""
        self.to_frame().to_csv(path, index=False)

    def plot_png(self, path, metric: str = "acc") -> None:
        """Draw ``metric`` against θ (with standard-error bars when known) and save it as PNG.

        The unmodified model's score is a horizontal line and the artifact fraction a dashed line on
        the right axis.

        Raises
        ------
        ValueError
            If the rows hold neither ``metric`` nor ``metric + "_mean"``.
        """
        # Imported here: only the report paths need matplotlib. Figure() draws with Agg and leaves
        # pyplot's global backend alone.
        from matplotlib.figure import Figure

        column = _metric_column(self.rows, metric)
        order = np.argsort(self.thetas, kind="stable")
        rows = [self.rows[i] for i in order]
        x = [row["theta"] for row in rows]
        y = [row[column] for row in rows]
        error_column = f"{metric}_se"
        errors = [row[error_column] for row in rows] if error_column in rows[0] else None

        figure = Figure(figsize=(6.4, 4.0), layout="constrained")
        axes = figure.add_subplot()
        axes.errorbar(
            x, y, yerr=errors, marker="o", markersize=3, capsize=2, label=f"ITAE ({self.rule})"
        )
        if self.original is not None:
            for original_column in (f"{metric}_mean", metric):
                if original_column in self.original:
                    axes.axhline(
                        self.original[original_column], color="black", linestyle=":",
                        label="original",
                    )
                    break
        axes.set_xlabel("θ")
        axes.set_ylabel(metric.upper())
        fraction_axes = axes.twinx()
        fraction_axes.plot(
            x, [100 * row["artifact_fraction"] for row in rows],
            color="grey", linestyle="--", linewidth=1, label="attenuated tokens",
        )
        fraction_axes.set_ylabel("attenuated tokens (%)")
        figure.legend(loc="outside lower center", ncols=3, fontsize="small")
        figure.savefig(path, format="png", dpi=120)


def theta_sweep(
    norms,
    features_at: Callable[[float, str], np.ndarray],
    score: Callable[[np.ndarray], Mapping],
    thetas,
    rule: str = "below",
    num_prefix_tokens: int = 1,
    original_score: Mapping | None = None,
    progress: Callable[[int, int], None] | None = None,
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
    return SweepResult(thetas=grid, rule=rule, rows=rows, original=original)


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
    with_cls = torch.from_numpy(np.pad(candidates, ((0, 0), (1, 0))))  # split_artifacts expects CLS in column 0
    mask = split_artifacts(with_cls, theta, rule)[:, 1:].numpy()
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


def _metric_column(rows: list[dict], metric: str) -> str:
    if not rows:
        raise ValueError("the sweep has no rows to plot")
    for column in (f"{metric}_mean", metric):
        if column in rows[0]:
            return column
    raise ValueError(f"metric {metric!r} is not in the sweep; its columns are {sorted(rows[0])}")
