"""Other clustering algorithms on the same features (the paper's Sec. 3.4), scored like the K-Means protocol.

The paper clusters with K-Means and names spectral and agglomerative clustering as candidates it did not
run. :func:`clustering_protocol` runs any of :data:`itae.choices.ALGORITHMS` on the L2-normalised features,
with the K-Means protocol's sets, seeds and metrics (ACC, NMI, ARI with labels; inertia and silhouette
without), so that one table holds them all. K-Means is :func:`itae.evaluate.cluster_protocol` itself.

The others, from scikit-learn, with the settings chosen here (and why):

- ``spectral``: ``SpectralClustering(affinity="nearest_neighbors")`` (10 neighbours): on unit vectors the
  default RBF kernel with ``gamma=1`` spans only ``exp(-4)..1`` and barely separates anything; its
  K-Means label assignment takes the protocol's ``runs`` initialisations. Seeded per set.
- ``agglomerative``: Ward linkage (the paper's "agglomerative"), K clusters. Deterministic: one set.
  Memory grows with the square of the images.
- ``gmm``: ``GaussianMixture`` with K components and diagonal covariances (a full covariance has
  ``D(D+1)/2`` parameters per component, more than the images of a cluster for D = 384..1536), the best
  likelihood of ``runs`` initialisations. Seeded per set.
- ``hdbscan``: ``HDBSCAN(min_cluster_size=5)``, which chooses the number of clusters itself and leaves
  points as noise; noise counts as one more cluster in the scores. Deterministic: one set.

Set ``s`` of every algorithm is seeded by word ``s`` of ``numpy.random.SeedSequence(seed)``, as in the
K-Means protocol, so :func:`cluster_labels` gives the per-image labels of any one set again.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment
from sklearn.cluster import HDBSCAN, AgglomerativeClustering, SpectralClustering
from sklearn.mixture import GaussianMixture

from itae.choices import ALGORITHMS
from itae.evaluate import (
    ProtocolResult,
    Summary,
    _check_n_clusters,
    _check_positive_int,
    _silhouette,
    cluster_protocol,
    clustering_scores,
    kmeans,
    l2_normalize,
)

__all__ = [
    "ALGORITHMS", "DETERMINISTIC", "UNMATCHED", "ClusterMovers", "ClusteringResult", "cluster_labels", "cluster_movers",
    "clustering_protocol", "set_seed",
]

DETERMINISTIC = ("agglomerative", "hdbscan")
"""Algorithms without randomness: the protocol runs them once (one set)."""
SPECTRAL_NEIGHBOURS = 10
HDBSCAN_MIN_CLUSTER_SIZE = 5


@dataclass
class ClusteringResult:
    """One algorithm's protocol over its sets.

    Attributes
    ----------
    algorithm : one of :data:`ALGORITHMS`
    protocol : ProtocolResult
        The per-set metrics, as the K-Means protocol gives them; ``inertia`` is the within-cluster sum of
        squares of each set's partition of the L2-normalised features, whatever made it.
    clusters_found : ndarray of shape (sets,)
        Distinct clusters of each set (HDBSCAN chooses its own; noise not counted).
    noise_fraction : ndarray of shape (sets,)
        Share of the images HDBSCAN left as noise; 0 for the other algorithms.
    """

    algorithm: str
    protocol: ProtocolResult
    clusters_found: np.ndarray
    noise_fraction: np.ndarray

    def summary(self) -> dict[str, Summary]:
        """Metric name -> :class:`Summary` over the sets."""
        return self.protocol.summary()

    def to_dict(self) -> dict:
        """JSON-ready: the protocol's dict with the algorithm, the clusters found and the noise share."""
        return {**self.protocol.to_dict(), "algorithm": self.algorithm,
                "clusters_found": self.clusters_found.tolist(), "noise_fraction": self.noise_fraction.tolist()}


def set_seed(seed: int, set_index: int) -> int:
    """The seed of set ``set_index``: word ``set_index`` of ``SeedSequence(seed)``, as the K-Means protocol seeds it."""
    return int(np.random.SeedSequence(seed).generate_state(set_index + 1)[set_index])


def _fit_predict(X: np.ndarray, algorithm: str, n_clusters: int, runs: int, seed: int) -> np.ndarray:
    """Labels ``(n_samples,)`` of one run of a scikit-learn ``algorithm`` on the L2-normalised ``X``."""
    if algorithm == "spectral":
        model = SpectralClustering(n_clusters, affinity="nearest_neighbors", n_neighbors=SPECTRAL_NEIGHBOURS,
                                   n_init=runs, random_state=seed)
    elif algorithm == "agglomerative":
        model = AgglomerativeClustering(n_clusters, linkage="ward")
    elif algorithm == "gmm":
        model = GaussianMixture(n_clusters, covariance_type="diag", n_init=runs, random_state=seed)
    else:
        model = HDBSCAN(min_cluster_size=HDBSCAN_MIN_CLUSTER_SIZE, copy=True)  # X is scored after the fit
    return np.asarray(model.fit_predict(X), dtype=np.int64)


def _within_cluster_ss(X: np.ndarray, labels: np.ndarray) -> float:
    """Sum of squared distances of the samples to their cluster's mean (K-Means' inertia of any partition)."""
    return float(sum(np.square(X[labels == c] - X[labels == c].mean(0)).sum() for c in np.unique(labels)))


def cluster_labels(
    X, n_clusters: int, algorithm: str = "kmeans", seed: int = 0, set_index: int = 0, runs: int = 25,
    backend: str = "auto", device=None,
) -> np.ndarray:
    """The per-image cluster labels of one set of :func:`clustering_protocol`, computed again.

    Parameters
    ----------
    X : array-like of shape (n_samples, n_features)
        L2-normalised here, as the protocol does.
    n_clusters, algorithm, seed, runs, backend, device
        As given to :func:`clustering_protocol`.
    set_index : int
        Which set (0-based); deterministic algorithms have only set 0.

    Returns
    -------
    ndarray of int64, shape (n_samples,); HDBSCAN's noise is -1
    """
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
    if not isinstance(set_index, int) or set_index < 0 or (algorithm in DETERMINISTIC and set_index > 0):
        sets = "only set 0" if algorithm in DETERMINISTIC else "sets 0, 1, ..."
        raise ValueError(f"set_index must name a set of the protocol ({algorithm} has {sets}), got {set_index!r}")
    X = l2_normalize(X)
    if algorithm == "kmeans":
        return kmeans(X, n_clusters, n_init=runs, seed=set_seed(seed, set_index), backend=backend, device=device).labels_
    return _fit_predict(X, algorithm, n_clusters, runs, set_seed(seed, set_index))


def clustering_protocol(
    X, labels=None, n_clusters: int | None = None, algorithm: str = "kmeans", sets: int = 20, runs: int = 25,
    seed: int = 0, backend: str = "auto", device=None, progress: Callable[[int, int], None] | None = None,
) -> ClusteringResult:
    """The paper's clustering evaluation with any of :data:`ALGORITHMS` (K-Means: the paper's protocol).

    Parameters
    ----------
    X : array-like of shape (n_samples, n_features)
        L2-normalised here.
    labels : array-like of shape (n_samples,), optional
        With them each set is scored by ACC, NMI and ARI; without, by inertia and silhouette.
    n_clusters : int, optional
        K; default the number of distinct labels. HDBSCAN ignores it.
    algorithm : {"kmeans", "spectral", "agglomerative", "gmm", "hdbscan"}
    sets : int
        Independent runs; the deterministic algorithms run once whatever ``sets`` says.
    runs : int
        Initialisations per set (K-Means, the spectral embedding's K-Means, the Gaussian mixture).
    seed : int
    backend, device
        K-Means only (:func:`itae.evaluate.kmeans`).
    progress : callable, optional
        ``progress(done_sets, total_sets)`` after each set.

    Returns
    -------
    ClusteringResult
    """
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
    if algorithm == "kmeans":
        protocol = cluster_protocol(X, labels, n_clusters, sets, runs, seed, backend, device, progress)
        return ClusteringResult(algorithm, protocol, np.full(protocol.sets, protocol.n_clusters), np.zeros(protocol.sets))
    X = l2_normalize(X)
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != (len(X),):
            raise ValueError(f"labels must have one entry per row of X ({len(X)}), got shape {labels.shape}")
        n_clusters = len(np.unique(labels)) if n_clusters is None else n_clusters
    elif n_clusters is None:
        raise ValueError("n_clusters is required when no labels are given")
    _check_n_clusters(n_clusters, len(X))
    _check_positive_int("sets", sets)
    _check_positive_int("runs", runs)
    sets = 1 if algorithm in DETERMINISTIC else sets
    per_set: dict[str, list[float]] = {}
    found, noise = [], []
    for s in range(sets):
        predicted = _fit_predict(X, algorithm, n_clusters, runs, set_seed(seed, s))
        scores = {"inertia": _within_cluster_ss(X, predicted)}
        if labels is not None:
            scores.update(clustering_scores(labels, predicted))
        else:
            scores["silhouette"] = _silhouette(X, predicted, set_seed(seed, s))
        for name, value in scores.items():
            per_set.setdefault(name, []).append(value)
        found.append(len(np.unique(predicted[predicted >= 0])))
        noise.append(float(np.mean(predicted < 0)))
        if progress is not None:
            progress(s + 1, sets)
    arrays = {name: np.asarray(values) for name, values in per_set.items()}
    protocol = ProtocolResult(len(X), int(n_clusters), sets, runs, int(seed), **arrays)
    return ClusteringResult(algorithm, protocol, np.asarray(found), np.asarray(noise))


@dataclass
class ClusterMovers:
    """Which images change cluster between two partitions of the same images (before and after a method).

    Cluster numbers are arbitrary in each partition, so the ``after`` clusters are first matched to the
    ``before`` clusters (the matching that keeps the most images together, Hungarian algorithm on the
    contingency matrix); an image moves when its ``after`` cluster is matched to another ``before`` cluster
    than its own, or to none.

    Attributes
    ----------
    before, after : ndarray of int, shape (N,)
        The two partitions' labels as given (HDBSCAN's noise is -1, a cluster of its own here).
    before_clusters, after_clusters : ndarray of int
        The distinct labels of each partition, sorted; the rows and columns of ``contingency``.
    contingency : ndarray of int, shape (len(before_clusters), len(after_clusters))
        Images in before cluster i and after cluster j, the columns in the matched order (``after_clusters``
        is in that order): the matched ones in the order of their before clusters, unmatched ones last.
    column_match : ndarray of int, shape (len(after_clusters),)
        The before cluster each column is matched to, or ``UNMATCHED``.
    matched : ndarray of int, shape (N,)
        Each image's after cluster, named by the before cluster it is matched to; -2 where it matches none.
    moved : ndarray of bool, shape (N,)
    majority : list of str or None
        For each before cluster, its most common true class name (None without labels).
    """

    before: np.ndarray
    after: np.ndarray
    before_clusters: np.ndarray
    after_clusters: np.ndarray
    contingency: np.ndarray
    column_match: np.ndarray
    matched: np.ndarray
    moved: np.ndarray
    majority: list[str] | None = None

    @property
    def n_moved(self) -> int:
        return int(self.moved.sum())


UNMATCHED = -2
"""``ClusterMovers.matched`` of an image whose after cluster matches no before cluster."""


def cluster_movers(before, after, labels=None, class_names=None) -> ClusterMovers:
    """Match the clusters of ``after`` to those of ``before`` and find the images that changed cluster.

    Parameters
    ----------
    before, after : array-like of int, shape (N,)
        Cluster labels of the same images, e.g. :func:`cluster_labels` of the original and of ITAE's features.
    labels : array-like of int, shape (N,), optional
        True classes, to name each before cluster by its most common class.
    class_names : sequence of str, optional
        Names of the classes in ``labels``.

    Returns
    -------
    ClusterMovers
    """
    before, after = np.asarray(before), np.asarray(after)
    if before.shape != after.shape or before.ndim != 1:
        raise ValueError(f"before and after must label the same images, got shapes {before.shape} and {after.shape}")
    rows, row_of = np.unique(before, return_inverse=True)
    columns, column_of = np.unique(after, return_inverse=True)
    counts = np.zeros((len(rows), len(columns)), dtype=np.int64)
    np.add.at(counts, (row_of, column_of), 1)
    matched_rows, matched_columns = linear_sum_assignment(counts, maximize=True)
    order = [*matched_columns[np.argsort(matched_rows)], *sorted(set(range(len(columns))) - set(matched_columns))]
    match = np.full(len(columns), UNMATCHED, dtype=np.int64)
    match[matched_columns] = rows[matched_rows]
    matched = match[column_of]
    majority = None
    if labels is not None:
        labels = np.asarray(labels)
        majority = []
        for cluster in rows:
            common = int(np.bincount(labels[before == cluster]).argmax())
            majority.append(str(class_names[common]) if class_names is not None else str(common))
    return ClusterMovers(before, after, rows, columns[order], counts[:, order], match[order], matched,
                         matched != before, majority)
