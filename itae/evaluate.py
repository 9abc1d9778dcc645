"""Evaluation of CLS features: the paper's K-Means protocol (Sec. 4.1), ACC/NMI/ARI, and k-NN (Sec. 5.3).

The protocol
------------
The paper L2-normalises the final CLS features and runs K-Means with K = number of classes, "20 sets of
25 clustering runs". We read a set as one K-Means with 25 k-means++ initialisations whose best inertia
is kept, and report, over the sets, the mean, the standard deviation (``ddof=1``) and the standard
error (``std / sqrt(sets)``) of ACC, NMI and ARI: the paper calls its ± a standard error, but it may be
the standard deviation, so both are given under their own names. Set ``s`` uses the ``s``-th word of
``numpy.random.SeedSequence(seed)``, so a base seed fixes every set, whatever the number of sets.

The batched K-Means
-------------------
``backend="torch"`` runs all ``n_init`` initialisations of one K-Means as one batched computation:
k-means++ seeding with scikit-learn's greedy trials (``2 + log K`` candidates per step, the one that
lowers the potential most is kept) for every initialisation at once, then Lloyd iterations whose
E-step is one float32 GEMM ``-2 x·c + ||c||²`` against the centres of every initialisation, taken in
row blocks so that only a block of the distance matrix exists at a time. The M-step keeps per-cluster
sums and moves only the samples that changed cluster. Each initialisation stops on its own
(scikit-learn's rules: labels unchanged, or a centre shift below ``tol`` times the mean feature
variance) and leaves the batch. The best initialisation's inertia is recomputed from the
differences ``x - c`` in float64, not from the expanded GEMM form. On a CPU the GEMMs go to oneDNN
rather than MKL (see :func:`_linear`): the same float32 arithmetic, 2-3x faster on an AMD Zen 5 core.
Against ``sklearn.cluster.KMeans`` the batch wins in the seeding, where scikit-learn spends most of
its time on small per-step operations for one initialisation at a time, and in the GEMMs; on CUDA
the same code keeps the GPU busy.

Threads
-------
A K-Means is thousands of small torch operations, each an OpenMP parallel region that ends in a
barrier. On a busy CPU (a shared 2-core server, a dashboard serving several visitors) one of the
threads is often descheduled, and every barrier then waits for it: the dashboard's θ change took
0.12 s on a quiet machine and up to 4.6 s with two busy processes beside it. A K-Means whose E-step
is small (``ONE_THREAD_WORK``) therefore runs on one torch thread, which costs a few per cent on a
quiet machine (0.124 s against 0.115 s) and does not collapse on a busy one; a large one keeps
every thread (bench/README.md, section 3c).

Hopeless initialisations
------------------------
Most of the Lloyd work of a best-of-25 K-Means can go to runs that have no chance to be the best:
on well-separated clusters, a run that seeded two centres in one cluster creeps for tens of
iterations towards a local optimum several per cent worse than the others. From the second
iteration on (the first moves every centre from a sample to a mean, so the inertias only become
comparable after it), a run leaves the batch when its inertia ``I`` is more than ``PRUNE_GAP``
(2 %) above the lowest inertia of any run so far, ``I*``, and would still be after
``PRUNE_HORIZON`` (20) more iterations at its last decrease ``Δ``::

    I - 20 Δ > 1.02 I*

``I*`` only falls, so the kept best is always a run that was never pruned. The rule is a heuristic,
not a bound: a pruned run could in principle speed up and end lowest. Both conditions are needed
on real features, where the eventual best run is often not the leader early on: on DINOv2-S/14
(demo weights) CLS features of Fashion-MNIST test images it was 1.1-1.4 % (median; up to 3.9 %)
behind the leader after 3 iterations, and pruning on the gap alone (0.5 % after 3 iterations) lost
0.28 % of the best inertia on average over 20 seeds of 1,000 images, six times the spread of the
best inertia between seeds (0.045 %). The constants were chosen by replaying the recorded
per-iteration inertias of 20 seeds x 25 runs on 8 data sets (those 1,000 features at K = 10 and 50,
the 10,000 test images at K = 10 and 100, Gaussian blobs on the sphere and overlapping clusters of
very unequal sizes at K = 10 and 100, D = 384): with a gap of at least 1 % and a horizon of at
least 10 the best run never changed, while gap 0.5 % with horizon 20, or 1 % with horizon 5, lost up
to 0.3 % on the 1,000 features. 2 % and 20 sit a factor two inside that edge in both constants.
What it saves: 5x of the Lloyd iterations on the blobs at K = 10, where hopeless runs abound;
1.00-1.04x on the other seven, whose runs all end within a per cent or two of each other.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from numbers import Integral, Real

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score, silhouette_score
from sklearn.metrics.cluster import contingency_matrix
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import normalize

from itae.choices import BACKENDS, METRICS
from itae.devices import resolve_device

__all__ = [
    "KMeansResult",
    "ProtocolResult",
    "Summary",
    "clustering_accuracy",
    "clustering_scores",
    "cluster_protocol",
    "kmeans",
    "knn_classify",
    "l2_normalize",
    "stratified_split",
]

SILHOUETTE_SAMPLE_SIZE = 5_000  # silhouette is O(n²); beyond this many samples it is estimated on a seeded sample
KNN_BLOCK_ELEMENTS = 1 << 24  # test rows per k-NN block: this many similarities (64 MB) at a time
# Elements of one block of the K-Means distance matrix: small enough to stay in a CPU's L2 cache
# (measured fastest), large enough on a GPU to keep the kernels busy.
CPU_BLOCK_ELEMENTS = 1 << 19
CUDA_BLOCK_ELEMENTS = 1 << 27
# Pruning of hopeless initialisations (module docstring): from the second Lloyd iteration on, a run
# whose inertia is more than PRUNE_GAP above the best so far, and would still be after PRUNE_HORIZON
# more iterations at its last decrease, leaves the batch.
PRUNE_GAP = 0.02
PRUNE_HORIZON = 20
# A K-Means on a CPU whose E-step takes fewer multiply-adds than this (samples x features x
# initialisations x clusters) runs on one torch thread (module docstring, "Threads").
ONE_THREAD_WORK = 1 << 28


# --------------------------------------------------------------------------------------------------
# Features and scores
# --------------------------------------------------------------------------------------------------


def l2_normalize(X) -> np.ndarray:
    """Scale every row to unit L2 norm; all-zero rows stay zero.

    Parameters
    ----------
    X : array-like of shape (n_samples, n_features)

    Returns
    -------
    ndarray of shape (n_samples, n_features)
        Floating inputs keep their dtype; other inputs become float64.
    """
    return normalize(_check_features(X, "X"), norm="l2")


def clustering_accuracy(y_true, y_pred) -> float:
    """ACC: the fraction of samples on the best one-to-one matching of clusters to classes.

    The matching maximises the matched counts of the contingency table (Hungarian algorithm,
    ``scipy.optimize.linear_sum_assignment``). With more clusters than classes the surplus clusters
    stay unmatched and their samples count as errors, and likewise with more classes than clusters.

    Parameters
    ----------
    y_true : array-like of shape (n_samples,)
        Class labels (any hashable values).
    y_pred : array-like of shape (n_samples,)
        Cluster labels.

    Returns
    -------
    float in [0, 1]
    """
    y_true, y_pred = _check_label_pair(y_true, y_pred)
    counts = contingency_matrix(y_true, y_pred)  # (n_classes, n_clusters)
    rows, cols = linear_sum_assignment(counts, maximize=True)
    return float(counts[rows, cols].sum() / len(y_true))


def clustering_scores(y_true, y_pred) -> dict[str, float]:
    """ACC, NMI (arithmetic normalisation, scikit-learn's default) and ARI of a clustering.

    Parameters
    ----------
    y_true : array-like of shape (n_samples,)
    y_pred : array-like of shape (n_samples,)

    Returns
    -------
    dict with keys ``"acc"``, ``"nmi"``, ``"ari"``
    """
    y_true, y_pred = _check_label_pair(y_true, y_pred)
    return {
        "acc": clustering_accuracy(y_true, y_pred),
        "nmi": float(normalized_mutual_info_score(y_true, y_pred)),
        "ari": float(adjusted_rand_score(y_true, y_pred)),
    }


@dataclass
class Summary:
    """A metric over the protocol's sets.

    Attributes
    ----------
    mean : float
    std : float
        Sample standard deviation (``ddof=1``); NaN for a single value.
    se : float
        Standard error of the mean, ``std / sqrt(len(values))``; NaN for a single value.
    values : ndarray of shape (n_sets,)
    """

    mean: float
    std: float
    se: float
    values: np.ndarray

    @classmethod
    def from_values(cls, values) -> "Summary":
        values = np.asarray(values, dtype=np.float64)
        if values.ndim != 1 or len(values) == 0:
            raise ValueError(f"values must be a non-empty 1-D sequence, got shape {values.shape}")
        std = float(np.std(values, ddof=1)) if len(values) > 1 else math.nan
        return cls(float(values.mean()), std, std / math.sqrt(len(values)), values)

    def to_dict(self) -> dict[str, float | None]:
        """``{"mean", "std", "se"}``; NaN becomes None so that the result is strict JSON."""
        return {key: _json_float(getattr(self, key)) for key in ("mean", "std", "se")}


# --------------------------------------------------------------------------------------------------
# K-Means
# --------------------------------------------------------------------------------------------------


@dataclass
class KMeansResult:
    """The best of ``n_init`` K-Means runs.

    Attributes
    ----------
    labels_ : ndarray of shape (n_samples,), int64
    centers_ : ndarray of shape (n_clusters, n_features), float32 (torch) or X's dtype (sklearn)
    inertia_ : float
        Sum of squared distances of the samples to their centres.
    n_iter_ : int
        Lloyd iterations of the best run.
    """

    labels_: np.ndarray
    centers_: np.ndarray
    inertia_: float
    n_iter_: int


def kmeans(
    X,
    n_clusters: int,
    n_init: int = 25,
    max_iter: int = 300,
    tol: float = 1e-4,
    seed: int = 0,
    backend: str = "auto",
    device=None,
) -> KMeansResult:
    """K-Means with k-means++ seeding; the run with the lowest inertia out of ``n_init`` is kept.

    The features are used as given (no normalisation; :func:`cluster_protocol` normalises).

    Parameters
    ----------
    X : array-like of shape (n_samples, n_features)
    n_clusters : int, at least 2 and at most n_samples
    n_init : int
        Number of k-means++ initialisations.
    max_iter : int
        Lloyd iterations per initialisation at most.
    tol : float
        Convergence when the summed squared centre shift falls below ``tol`` times the mean
        per-feature variance of X (scikit-learn's definition).
    seed : int
        Seeds the initialisations; the same seed gives the same result on the same device (on CUDA,
        up to the order in which the M-step's atomic additions land).
    backend : {"auto", "sklearn", "torch"}
        ``"sklearn"``: ``sklearn.cluster.KMeans(init="k-means++")``, the reference. ``"torch"``: the
        batched implementation of this module (see the module docstring). ``"auto"``: torch, on CUDA
        when available; on a CPU it is also faster than scikit-learn at equal quality.
    device : str or torch.device, optional
        Where the torch backend runs, a CPU or CUDA device; default CUDA when available, else CPU.

    Returns
    -------
    KMeansResult
    """
    X = _check_features(X, "X")
    _check_n_clusters(n_clusters, len(X))
    for name, value in (("n_init", n_init), ("max_iter", max_iter)):
        _check_positive_int(name, value)
    if not isinstance(tol, Real) or tol < 0:
        raise ValueError(f"tol must be a non-negative number, got {tol!r}")
    if not isinstance(seed, Integral) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "sklearn":
        if device is not None and torch.device(device).type != "cpu":
            raise ValueError(f"backend='sklearn' runs on the CPU only, got device={device!r}")
        return _sklearn_kmeans(X, n_clusters, n_init, max_iter, tol, seed)
    return _torch_kmeans(X, n_clusters, n_init, max_iter, tol, seed, _resolve_device(device))


def _sklearn_kmeans(X, n_clusters, n_init, max_iter, tol, seed) -> KMeansResult:
    model = KMeans(n_clusters, init="k-means++", n_init=n_init, max_iter=max_iter, tol=tol, random_state=seed)
    model.fit(X)
    return KMeansResult(model.labels_.astype(np.int64), model.cluster_centers_, float(model.inertia_), int(model.n_iter_))


def _torch_kmeans(X, n_clusters, n_init, max_iter, tol, seed, device) -> KMeansResult:
    with _threads_for(device, work=X.shape[0] * X.shape[1] * n_init * n_clusters):
        return _batched_kmeans(X, n_clusters, n_init, max_iter, tol, seed, device)


@contextlib.contextmanager
def _threads_for(device, work: int):
    """One torch thread for a small K-Means on a CPU (module docstring, "Threads"), else as they are.

    ``work`` is the multiply-adds of one E-step. ``torch.set_num_threads`` sets the calling thread's
    OpenMP thread count (and the default of threads that have not run torch yet), so the count is put
    back at the end.
    """
    before = torch.get_num_threads()
    if device.type != "cpu" or work >= ONE_THREAD_WORK or before == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _batched_kmeans(X, n_clusters, n_init, max_iter, tol, seed, device) -> KMeansResult:
    tol_abs = tol * float(np.var(X, axis=0).mean())  # scikit-learn's absolute tolerance
    X = torch.as_tensor(X, dtype=torch.float32, device=device)
    # Centred, as scikit-learn does: the GEMM form ||x||² - 2 x·c + ||c||² then loses far less to
    # cancellation when the points sit close together far from the origin (unit-norm features).
    mean = X.mean(0)
    X = X - mean
    x_sq = X.square().sum(1)
    generator = torch.Generator(device=device).manual_seed(seed)
    centers, labels, sq_dist = _kmeans_plusplus(X, x_sq, n_clusters, n_init, generator)
    n_iter, inertias = _lloyd(X, x_sq, centers, labels, sq_dist, max_iter, tol_abs)
    best = int(inertias.argmin())
    labels, _ = _assign(X, x_sq, centers[best : best + 1])
    labels, best_centers = labels[0], centers[best]
    inertia = _exact_inertia(X, best_centers, labels)
    return KMeansResult(labels.cpu().numpy(), (best_centers + mean).cpu().numpy(), inertia, int(n_iter[best]))


def _exact_inertia(X, centers, labels, rows: int = 4096) -> float:
    """Sum of ``||x - c||²`` in float64 from the differences, which the GEMM form loses to cancellation."""
    centers = centers.double()
    return float(sum((x.double() - centers[l]).square().sum() for x, l in zip(X.split(rows), labels.split(rows))))


def _kmeans_plusplus(X, x_sq, n_clusters, n_init, generator):
    """k-means++ seeding with greedy trials for ``n_init`` initialisations at once.

    X : (n, d), x_sq : (n,) -> centres (n_init, K, d), and the labels (n_init, n) and squared
    distances (n_init, n) of the samples to their nearest centre, which make Lloyd's first E-step.
    Memory: (n_init, 2 + log K, n) floats.
    """
    n, d = X.shape
    n_trials = 2 + int(math.log(n_clusters))
    rows = torch.arange(n_init, device=X.device)
    centers = X.new_empty(n_init, n_clusters, d)
    first = torch.randint(n, (n_init,), generator=generator, device=X.device)
    centers[:, 0] = X[first]
    closest = _sq_distances(X, x_sq, X[first])  # (n_init, n): squared distance to the nearest centre
    labels = torch.zeros(n_init, n, dtype=torch.long, device=X.device)
    for k in range(1, n_clusters):
        # Sample candidates with probability proportional to `closest` (cumsum in float64, as sklearn).
        cumulative = closest.double().cumsum(1)
        targets = torch.rand(n_init, n_trials, generator=generator, device=X.device, dtype=torch.float64)
        candidates = torch.searchsorted(cumulative, targets * cumulative[:, -1:]).clamp_(max=n - 1)
        trial = _sq_distances(X, x_sq, X[candidates.flatten()]).view(n_init, n_trials, n)
        torch.minimum(trial, closest[:, None, :], out=trial)
        best = trial.sum(2).argmin(1)  # the candidate that lowers the potential most
        chosen = trial[rows, best]
        labels[chosen < closest] = k
        closest = chosen
        centers[:, k] = X[candidates[rows, best]]
    return centers, labels, closest


def _sq_distances(X, x_sq, C):
    """Squared distances, X : (n, d), C : (m, d) -> (m, n), by ``||x||² - 2 x·c + ||c||²``."""
    c_sq = C.square().sum(1)
    return _linear(C * -2.0, X, x_sq).add_(c_sq[:, None]).clamp_(min=0)


def _linear(A, B, bias):
    """``A @ B.T + bias`` in float32, A : (m, d), B : (n, d), bias : (n,) -> (m, n).

    On a CPU this calls oneDNN's matmul rather than ``torch.addmm``: torch's float32 GEMM goes to MKL,
    which runs AVX2 code on AMD processors, while oneDNN's JIT kernels use AVX-512 on any vendor's CPU.
    Both compute in float32 (no down-conversion is requested); on a Zen 5 core (AMD EPYC, family 26)
    oneDNN was 2-3x faster. The callers fold the factor -2 of ``-2 x·c`` into an operand: scaling by
    a power of two is exact.
    """
    if A.device.type == "cpu" and _ONEDNN_LINEAR is not None:
        return _ONEDNN_LINEAR(A, B, bias, "none", [], "")
    return torch.addmm(bias, A, B.T)


def _onednn_linear():
    """oneDNN's float32 linear op (the one torch's inductor calls), or None where this torch lacks it.

    The op is private, so it is used only if it still takes these arguments and gives addmm's result
    on operands whose every product and sum is exact in float32 (a transposed operand or a bias on
    the wrong axis would show).
    """
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return None
    op = torch.ops.mkldnn._linear_pointwise
    A, B, bias = torch.arange(6.0).view(2, 3), torch.arange(12.0).view(4, 3), torch.arange(4.0)
    try:
        works = torch.equal(op(A, B, bias, "none", [], ""), torch.addmm(bias, A, B.T))
    except (RuntimeError, TypeError):
        return None
    return op if works else None


_ONEDNN_LINEAR = _onednn_linear()


def _lloyd(X, x_sq, centers, labels, sq_dist, max_iter, tol):
    """Lloyd iterations on all initialisations; ``centers`` (n_init, K, d) is updated in place.

    ``labels`` and ``sq_dist`` (n_init, n) are the E-step of the starting centres. An initialisation
    leaves the batch when its labels stop changing, when its summed squared centre shift is at most
    ``tol``, or when it is hopeless (see the module docstring). Returns the iterations (n_init,) and
    the inertia (n_init,) of each, the inertia from the labels that its last centres give.
    """
    n_init, n_clusters = centers.shape[:2]
    n_iter = torch.zeros(n_init, dtype=torch.long)
    # Infinite before a run's first E-step: its first decrease is then infinite, so no run is judged
    # hopeless at the first iteration (module docstring).
    inertia = torch.full((n_init,), math.inf, dtype=torch.float64, device=X.device)
    active = torch.arange(n_init, device=X.device)
    sums, counts = _cluster_sums(X, labels, n_clusters)
    for iteration in range(1, max_iter + 1):
        old = centers[active]
        new = _centers_from_sums(X, sums, counts, sq_dist)
        centers[active] = new
        n_iter[active.cpu()] = iteration
        new_labels, sq_dist = _assign(X, x_sq, new)
        done = (new - old).square().sum((1, 2)) <= tol
        done |= (new_labels == labels).all(1)
        previous, current = inertia[active], sq_dist.sum(1, dtype=torch.float64)
        inertia[active] = current
        done |= _hopeless(current, previous, inertia.min())
        keep = ~done
        active, sq_dist, sums, counts = active[keep], sq_dist[keep], sums[keep], counts[keep]
        _move_samples(X, sums, counts, labels[keep], new_labels[keep])
        labels = new_labels[keep]
        if len(active) == 0:
            break
    return n_iter, inertia


def _hopeless(current, previous, best):
    """Runs that cannot be expected to win (module docstring); current, previous : (B,) -> mask (B,).

    ``current`` and ``previous`` are the inertias of the runs after this iteration and the one before,
    ``best`` the lowest inertia of any run so far.
    """
    reachable = current - PRUNE_HORIZON * (previous - current)
    return reachable > (1 + PRUNE_GAP) * best


def _assign(X, x_sq, centers):
    """E-step. X : (n, d), centers : (B, K, d) -> labels (B, n) and squared distances (B, n).

    The GEMM runs over blocks of rows so that only a block of the (n, B*K) score matrix exists at once;
    ``||x||²`` does not change the argmin and is added afterwards.
    """
    n_init, n_clusters, d = centers.shape
    flat = centers.reshape(n_init * n_clusters, d)
    c_sq, weight = flat.square().sum(1), flat * -2.0
    labels = torch.empty(n_init, len(X), dtype=torch.long, device=X.device)
    sq_dist = torch.empty(n_init, len(X), dtype=X.dtype, device=X.device)
    block = CUDA_BLOCK_ELEMENTS if X.device.type == "cuda" else CPU_BLOCK_ELEMENTS
    step = max(1, block // len(flat))
    for start in range(0, len(X), step):
        rows = slice(start, start + step)
        scores = _linear(X[rows], weight, c_sq)  # (rows, B*K)
        best, index = scores.view(-1, n_init, n_clusters).min(2)
        labels[:, rows], sq_dist[:, rows] = index.T, best.T
    sq_dist += x_sq
    return labels, sq_dist.clamp_(min=0)


def _cluster_sums(X, labels, n_clusters):
    """Per-cluster sums (B, K, d) and counts (B, K) of the samples, in float64; labels : (B, n)."""
    sums = X.new_zeros(len(labels), n_clusters, X.shape[1])
    counts = X.new_zeros(len(labels), n_clusters)
    ones = X.new_ones(len(X))
    for b in range(len(labels)):
        sums[b].index_add_(0, labels[b], X)
        counts[b].index_add_(0, labels[b], ones)
    return sums.double(), counts.double()


def _move_samples(X, sums, counts, old_labels, new_labels) -> None:
    """Update ``sums`` (B, K, d) and ``counts`` (B, K) in place for the samples that changed cluster.

    After the first iterations few samples move, so this costs a fraction of a full M-step; float64
    keeps the running sums from drifting. When more samples moved than X has rows, the sums are
    recomputed instead, which also bounds the memory of the gathered rows.
    """
    n_init, n_clusters, d = sums.shape
    init, sample = torch.nonzero(old_labels != new_labels, as_tuple=True)
    if len(sample) > len(X):
        sums[:], counts[:] = _cluster_sums(X, new_labels, n_clusters)
        return
    rows = X[sample].double()
    source = init * n_clusters + old_labels[init, sample]
    target = init * n_clusters + new_labels[init, sample]
    flat_sums, flat_counts, ones = sums.view(-1, d), counts.view(-1), rows.new_ones(len(rows))
    flat_sums.index_add_(0, target, rows).index_add_(0, source, rows, alpha=-1)
    flat_counts.index_add_(0, target, ones).index_add_(0, source, ones, alpha=-1)


def _centers_from_sums(X, sums, counts, sq_dist):
    """M-step: every centre becomes the mean of its samples; sums : (B, K, d), counts, sq_dist : (B, n).

    An empty cluster takes the sample farthest from its centre, as scikit-learn does, so that the
    number of clusters never shrinks.
    """
    centers = (sums / counts.clamp(min=1)[..., None]).to(X.dtype)
    empty = counts == 0
    for b in torch.nonzero(empty.any(1)).flatten().tolist():
        clusters = torch.nonzero(empty[b]).flatten()
        farthest = sq_dist[b].topk(len(clusters)).indices
        centers[b, clusters] = X[farthest]
    return centers


def _resolve_device(device) -> torch.device:
    return resolve_device(device, supported=("cpu", "cuda"), purpose="the torch K-Means (its sums are float64)")


# --------------------------------------------------------------------------------------------------
# The protocol
# --------------------------------------------------------------------------------------------------


@dataclass
class ProtocolResult:
    """Per-set results of :func:`cluster_protocol`.

    Attributes
    ----------
    n_samples, n_clusters, sets, runs, seed : int
    inertia : ndarray of shape (sets,)
        Best inertia of each set, on the L2-normalised features.
    acc, nmi, ari : ndarray of shape (sets,) or None
        With labels only.
    silhouette : ndarray of shape (sets,) or None
        Without labels only (estimated on a seeded sample of SILHOUETTE_SAMPLE_SIZE for big n).
    """

    n_samples: int
    n_clusters: int
    sets: int
    runs: int
    seed: int
    inertia: np.ndarray
    acc: np.ndarray | None = None
    nmi: np.ndarray | None = None
    ari: np.ndarray | None = None
    silhouette: np.ndarray | None = None

    def summary(self) -> dict[str, Summary]:
        """Metric name -> :class:`Summary` over the sets, for the metrics this result holds."""
        return {name: Summary.from_values(getattr(self, name)) for name in METRICS if getattr(self, name) is not None}

    def to_dict(self) -> dict:
        """JSON-ready: ``{metric: {"mean", "std", "se"}, "sets", "runs", "seed", "n_clusters", "n_samples"}``."""
        out: dict = {name: summary.to_dict() for name, summary in self.summary().items()}
        out.update(sets=self.sets, runs=self.runs, seed=self.seed, n_clusters=self.n_clusters, n_samples=self.n_samples)
        return out


def cluster_protocol(
    X,
    labels=None,
    n_clusters: int | None = None,
    sets: int = 20,
    runs: int = 25,
    seed: int = 0,
    backend: str = "auto",
    device=None,
    progress: Callable[[int, int], None] | None = None,
) -> ProtocolResult:
    """The paper's clustering evaluation: ``sets`` K-Means, each the best of ``runs`` initialisations.

    X is L2-normalised here (rows to unit norm), as the paper does with its CLS features.

    Parameters
    ----------
    X : array-like of shape (n_samples, n_features)
    labels : array-like of shape (n_samples,), optional
        Class labels. With them each set is scored by ACC, NMI and ARI; without them by inertia and
        silhouette only.
    n_clusters : int, optional
        K; default the number of distinct labels. Required without labels.
    sets : int
        Independent K-Means (the paper: 20); set ``s`` is seeded by word ``s`` of
        ``numpy.random.SeedSequence(seed)``.
    runs : int
        k-means++ initialisations per set (the paper: 25).
    seed : int
        Base seed; the same seed gives the same result on the same device.
    backend, device
        See :func:`kmeans`.
    progress : callable, optional
        Called as ``progress(done_sets, total_sets)`` after each set.

    Returns
    -------
    ProtocolResult
    """
    X = _check_features(X, "X")
    if labels is not None:
        labels = np.asarray(labels)
        if labels.ndim != 1 or len(labels) != len(X):
            raise ValueError(f"labels must have one entry per row of X ({len(X)}), got shape {labels.shape}")
        n_classes = len(np.unique(labels))
        if n_classes < 2:
            raise ValueError("labels hold a single class: clustering into K=1 cluster is meaningless; need at least 2 classes")
        n_clusters = n_classes if n_clusters is None else n_clusters
    elif n_clusters is None:
        raise ValueError("n_clusters is required when no labels are given")
    _check_n_clusters(n_clusters, len(X))
    _check_positive_int("sets", sets)
    _check_positive_int("runs", runs)
    if not isinstance(seed, Integral) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")

    X = l2_normalize(X)
    set_seeds = np.random.SeedSequence(seed).generate_state(sets)
    per_set: dict[str, list[float]] = {}
    for done, set_seed in enumerate(set_seeds, start=1):
        result = kmeans(X, n_clusters, n_init=runs, seed=int(set_seed), backend=backend, device=device)
        scores = {"inertia": result.inertia_}
        if labels is not None:
            scores.update(clustering_scores(labels, result.labels_))
        else:
            scores["silhouette"] = _silhouette(X, result.labels_, int(set_seed))
        for name, value in scores.items():
            per_set.setdefault(name, []).append(value)
        if progress is not None:
            progress(done, sets)
    arrays = {name: np.asarray(values) for name, values in per_set.items()}
    return ProtocolResult(len(X), int(n_clusters), int(sets), int(runs), int(seed), **arrays)


def _silhouette(X, labels, seed) -> float:
    """Silhouette score; NaN where it is undefined (fewer than 2, or n, distinct labels)."""
    if not 2 <= len(np.unique(labels)) < len(X):
        return math.nan
    sample_size = SILHOUETTE_SAMPLE_SIZE if len(X) > SILHOUETTE_SAMPLE_SIZE else None
    return float(silhouette_score(X, labels, sample_size=sample_size, random_state=seed))


# --------------------------------------------------------------------------------------------------
# k-NN
# --------------------------------------------------------------------------------------------------


def knn_classify(train_X, train_y, test_X, test_y, k: int = 10, temperature: float = 0.07) -> float:
    """Weighted k-NN accuracy as in DINOv2's k-NN evaluation (the paper's Sec. 5.3).

    Features are L2-normalised; each test sample takes its ``k`` most cosine-similar training
    samples, each voting for its class with weight ``exp(similarity / temperature)``; the class with
    the largest summed weight wins (the lowest class on ties).

    Parameters
    ----------
    train_X : array-like of shape (n_train, n_features)
    train_y : array-like of shape (n_train,)
    test_X : array-like of shape (n_test, n_features)
    test_y : array-like of shape (n_test,)
    k : int, 1 <= k <= n_train
    temperature : float > 0

    Returns
    -------
    float
        Accuracy on the test set.
    """
    train_X = normalize(_check_features(train_X, "train_X"))
    test_X = normalize(_check_features(test_X, "test_X"))
    train_y, test_y = np.asarray(train_y), np.asarray(test_y)
    if train_X.shape[1] != test_X.shape[1]:
        raise ValueError(f"train_X and test_X must have the same number of features, got {train_X.shape[1]} and {test_X.shape[1]}")
    for name, y, x in (("train_y", train_y, train_X), ("test_y", test_y, test_X)):
        if y.ndim != 1 or len(y) != len(x):
            raise ValueError(f"{name} must have one entry per feature row ({len(x)}), got shape {y.shape}")
    if not isinstance(k, Integral) or not 1 <= k <= len(train_X):
        raise ValueError(f"k must be an integer between 1 and the number of training samples ({len(train_X)}), got {k!r}")
    if not isinstance(temperature, Real) or not temperature > 0:
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")

    classes, train_index = np.unique(train_y, return_inverse=True)
    train = torch.as_tensor(train_X, dtype=torch.float32)
    test = torch.as_tensor(test_X, dtype=torch.float32)
    train_index = torch.as_tensor(train_index)
    predicted = torch.empty(len(test), dtype=torch.long)
    step = max(1, KNN_BLOCK_ELEMENTS // len(train))
    for start in range(0, len(test), step):
        rows = slice(start, start + step)
        similarity, neighbours = (test[rows] @ train.T).topk(k, dim=1)  # (rows, k)
        # Shifting by the row's top similarity keeps exp() finite and leaves the vote unchanged.
        weights = torch.exp((similarity - similarity[:, :1]) / temperature)
        votes = torch.zeros(len(similarity), len(classes)).scatter_add_(1, train_index[neighbours], weights)
        predicted[rows] = votes.argmax(1)
    return float(np.mean(classes[predicted.numpy()] == test_y))


def stratified_split(labels, test_fraction: float = 0.5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Split sample indices in two, keeping each class's proportion in both parts.

    Parameters
    ----------
    labels : array-like of shape (n_samples,)
    test_fraction : float in (0, 1)
    seed : int

    Returns
    -------
    train_idx, test_idx : sorted ndarrays of int64
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
    if not isinstance(test_fraction, Real) or not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be strictly between 0 and 1, got {test_fraction!r}")
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=test_fraction, stratify=labels, random_state=seed
    )
    return np.sort(train_idx), np.sort(test_idx)


# --------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------


def _check_features(X, name: str) -> np.ndarray:
    X = np.asarray(X)
    if X.ndim != 2 or X.shape[0] == 0 or X.shape[1] == 0:
        raise ValueError(f"{name} must be a non-empty 2-D array of shape (n_samples, n_features), got shape {X.shape}")
    if not np.issubdtype(X.dtype, np.number) or np.iscomplexobj(X):
        raise ValueError(f"{name} must hold real numbers, got dtype {X.dtype}")
    bad_rows = ~np.isfinite(X).all(1)
    if bad_rows.any():
        raise ValueError(f"{name} holds NaN or infinite values in {int(bad_rows.sum())} of {len(X)} rows (first: row {int(np.argmax(bad_rows))})")
    return X


def _check_label_pair(y_true, y_pred) -> tuple[np.ndarray, np.ndarray]:
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if y_true.ndim != 1 or y_true.shape != y_pred.shape or len(y_true) == 0:
        raise ValueError(f"y_true and y_pred must be non-empty 1-D arrays of the same length, got shapes {y_true.shape} and {y_pred.shape}")
    return y_true, y_pred


def _check_n_clusters(n_clusters, n_samples: int) -> None:
    if not isinstance(n_clusters, Integral) or n_clusters < 2:
        raise ValueError(f"n_clusters must be an integer of at least 2, got {n_clusters!r}")
    if n_samples < n_clusters:
        raise ValueError(f"{n_samples} images but {n_clusters} clusters: need at least {n_clusters} images")


def _check_positive_int(name: str, value) -> None:
    if not isinstance(value, Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _json_float(value: float) -> float | None:
    return None if math.isnan(value) else float(value)
