"""Other clustering algorithms on the same features: the K-Means protocol's seeds and metrics for all."""
import numpy as np
import pytest

from itae.choices import ALGORITHMS
from itae.clustering import (
    DETERMINISTIC,
    UNMATCHED,
    cluster_labels,
    cluster_movers,
    clustering_protocol,
    set_seed,
)
from itae.evaluate import cluster_protocol, clustering_accuracy


def blobs_on_the_sphere(per_cluster=(30, 20, 25), dim=8, spread=0.08, seed=0):
    """Well separated clusters of unit vectors, and their labels."""
    rng = np.random.default_rng(seed)
    centres = np.eye(dim)[: len(per_cluster)]
    X = np.concatenate([c + spread * rng.standard_normal((n, dim)) for c, n in zip(centres, per_cluster)])
    labels = np.repeat(np.arange(len(per_cluster)), per_cluster)
    return X / np.linalg.norm(X, axis=1, keepdims=True), labels


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_every_algorithm_recovers_separated_clusters_with_the_protocol_metrics(algorithm):
    X, labels = blobs_on_the_sphere()
    result = clustering_protocol(X, labels, algorithm=algorithm, sets=3, runs=4, seed=1, backend="sklearn")
    assert result.algorithm == algorithm
    assert result.protocol.sets == (1 if algorithm in DETERMINISTIC else 3)
    summary = result.summary()
    assert set(summary) == {"inertia", "acc", "nmi", "ari"}
    assert summary["acc"].mean == 1.0 and summary["ari"].mean == pytest.approx(1.0)
    assert (result.clusters_found == 3).all() and (result.noise_fraction == 0).all()
    assert result.to_dict()["algorithm"] == algorithm and result.to_dict()["acc"]["mean"] == 1.0


def test_kmeans_is_the_papers_protocol_unchanged():
    X, labels = blobs_on_the_sphere(spread=0.5)
    ours = clustering_protocol(X, labels, algorithm="kmeans", sets=4, runs=3, seed=2, backend="sklearn").protocol
    reference = cluster_protocol(X, labels, sets=4, runs=3, seed=2, backend="sklearn")
    for name in ("inertia", "acc", "nmi", "ari"):
        np.testing.assert_array_equal(getattr(ours, name), getattr(reference, name))


@pytest.mark.parametrize("algorithm", ["kmeans", "spectral", "gmm", "agglomerative"])
def test_cluster_labels_give_back_the_labels_a_set_was_scored_on(algorithm):
    X, labels = blobs_on_the_sphere(spread=0.6, seed=3)  # overlapping: the sets differ
    result = clustering_protocol(X, labels, algorithm=algorithm, sets=3, runs=2, seed=5, backend="sklearn")
    for s in range(result.protocol.sets):
        predicted = cluster_labels(X, 3, algorithm, seed=5, set_index=s, runs=2, backend="sklearn")
        assert clustering_accuracy(labels, predicted) == result.protocol.acc[s]
    # Set s is seeded by word s of SeedSequence(seed), whatever the number of sets.
    assert set_seed(5, 2) == int(np.random.SeedSequence(5).generate_state(3)[2])


def test_inertia_is_the_within_cluster_sum_of_squares_of_the_partition():
    X, labels = blobs_on_the_sphere()
    result = clustering_protocol(X, labels, algorithm="agglomerative")
    predicted = cluster_labels(X, 3, "agglomerative")
    expected = sum(((X[predicted == c] - X[predicted == c].mean(0)) ** 2).sum() for c in range(3))
    assert result.protocol.inertia[0] == pytest.approx(expected)


def test_hdbscan_chooses_its_clusters_and_reports_its_noise():
    X, labels = blobs_on_the_sphere(per_cluster=(30, 30, 30), dim=8, spread=0.05)
    rng = np.random.default_rng(9)
    scattered = rng.standard_normal((6, 8))
    X = np.concatenate([X, scattered / np.linalg.norm(scattered, axis=1, keepdims=True)])
    labels = np.concatenate([labels, np.full(6, 3)])
    result = clustering_protocol(X, labels, algorithm="hdbscan", n_clusters=7)  # K is HDBSCAN's own choice
    assert result.clusters_found[0] == 3 and 0 < result.noise_fraction[0] <= 6 / len(X)


def test_without_labels_the_silhouette_scores_each_set():
    X, _ = blobs_on_the_sphere()
    result = clustering_protocol(X, n_clusters=3, algorithm="gmm", sets=2, runs=2)
    assert set(result.summary()) == {"inertia", "silhouette"} and (result.protocol.silhouette > 0.5).all()
    with pytest.raises(ValueError, match="n_clusters is required"):
        clustering_protocol(X, algorithm="spectral")


def test_bad_arguments():
    X, labels = blobs_on_the_sphere()
    with pytest.raises(ValueError, match="algorithm must be one of"):
        clustering_protocol(X, labels, algorithm="dbscan")
    with pytest.raises(ValueError, match="only set 0"):
        cluster_labels(X, 3, "hdbscan", set_index=1)
    with pytest.raises(ValueError, match="one entry per row"):
        clustering_protocol(X, labels[:-1], algorithm="gmm")


def test_cluster_movers_match_renamed_clusters_and_find_the_images_that_moved():
    before = np.array([0, 0, 0, 1, 1, 1, 2, 2])
    # The same clusters under other numbers, except image 2 (0 -> 1) and image 7 (2 -> 1).
    after = np.array([5, 5, 9, 9, 9, 9, 7, 9])
    movers = cluster_movers(before, after, labels=np.array([0, 0, 1, 1, 1, 1, 2, 2]), class_names=["a", "b", "c"])
    assert movers.moved.tolist() == [False, False, True, False, False, False, False, True] and movers.n_moved == 2
    assert movers.matched.tolist() == [0, 0, 1, 1, 1, 1, 2, 1]
    assert movers.after_clusters.tolist() == [5, 9, 7]  # column i is the after cluster matched to before cluster i
    assert movers.contingency.tolist() == [[2, 1, 0], [0, 3, 0], [0, 1, 1]] and movers.column_match.tolist() == [0, 1, 2]
    assert movers.majority == ["a", "b", "c"]


def test_cluster_movers_with_more_clusters_after_than_before():
    before = np.array([0, 0, 1, 1])
    after = np.array([3, 4, 5, 5])  # cluster 0 split in two: one half matches, the other matches nothing
    movers = cluster_movers(before, after)
    assert movers.moved.sum() == 1 and UNMATCHED in movers.matched.tolist()
    assert movers.contingency.shape == (2, 3) and movers.contingency.sum() == 4 and movers.majority is None
    assert movers.column_match.tolist()[:2] == [0, 1] and movers.column_match[2] == UNMATCHED
    fewer = cluster_movers(after, before)  # three clusters before, two after: one before cluster is left unmatched
    assert fewer.contingency.shape == (3, 2) and sorted(fewer.column_match.tolist()) == [3, 5]
    with pytest.raises(ValueError, match="same images"):
        cluster_movers(before, after[:3])
