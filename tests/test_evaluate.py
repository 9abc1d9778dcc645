"""Tests of itae.evaluate: scores, the batched K-Means against scikit-learn, the protocol, k-NN."""
import json
import math

import numpy as np
import pytest
import torch
from sklearn.datasets import make_blobs
from sklearn.metrics import adjusted_rand_score
from sklearn.preprocessing import normalize
from threadpoolctl import threadpool_limits

from itae import evaluate
from itae.evaluate import (
    Summary,
    cluster_protocol,
    clustering_accuracy,
    clustering_scores,
    kmeans,
    knn_classify,
    l2_normalize,
    stratified_split,
)


def labels_from_contingency(table):
    """(y_true, y_pred) whose contingency table (classes x clusters) is ``table``."""
    y_true, y_pred = [], []
    for cls, row in enumerate(table):
        for cluster, count in enumerate(row):
            y_true += [cls] * count
            y_pred += [cluster] * count
    return np.array(y_true), np.array(y_pred)


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """The arrays here are small: on a busy machine, idle-waiting OpenMP threads cost more than they bring."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def easy_blobs():
    X, y = make_blobs(n_samples=2000, centers=10, n_features=16, cluster_std=1.0, random_state=0)
    return X.astype(np.float32), y


@pytest.fixture(scope="module")
def sphere_blobs():
    # Unit vectors in 10 blobs of unequal size, as L2-normalised features: runs that seed two centres
    # in one blob end several per cent worse than the others, so the hopeless-run rule prunes many.
    rng = np.random.default_rng(0)
    centres = normalize(rng.standard_normal((10, 16)))
    y = rng.choice(10, size=3000, p=rng.dirichlet(np.full(10, 5.0)))
    X = normalize(centres[y] + 0.15 * rng.standard_normal((3000, 16)))
    return X.astype(np.float32), y


@pytest.fixture(scope="module")
def hard_blobs():
    # Overlapping blobs: Lloyd needs tens of iterations after k-means++, and stopping early costs inertia.
    X, y = make_blobs(n_samples=3000, centers=25, n_features=8, cluster_std=6.0, center_box=(-10, 10), random_state=1)
    return X.astype(np.float32), y


# ---------------------------------------------------------------- scores


def test_permuted_labelling_scores_perfectly():
    y_true = np.array([0, 0, 1, 1, 1, 2, 2])
    y_pred = np.array([5, 5, 3, 3, 3, 9, 9])
    assert clustering_scores(y_true, y_pred) == pytest.approx({"acc": 1.0, "nmi": 1.0, "ari": 1.0})


def test_accuracy_uses_the_best_matching_not_the_greedy_one():
    # classes x clusters. Greedy (largest count first) takes 6 (class 0 -> cluster 0), leaving class 1
    # only zeros, then 4: 10 of 20. The best one-to-one matching is class 0 -> cluster 1 (5),
    # class 1 -> cluster 0 (5), class 2 -> cluster 2 (4): 14 of 20 = 0.7.
    table = [[6, 5, 0],
             [5, 0, 0],
             [0, 0, 4]]
    y_true, y_pred = labels_from_contingency(table)
    assert clustering_accuracy(y_true, y_pred) == pytest.approx(0.7)


def test_accuracy_with_more_clusters_than_classes_and_fewer():
    # class 0 -> cluster 0 (2), class 1 -> cluster 2 (2); clusters 1 and 3 stay unmatched: 4 of 6.
    y_true = np.array([0, 0, 0, 1, 1, 1])
    y_pred = np.array([0, 0, 1, 2, 2, 3])
    assert clustering_accuracy(y_true, y_pred) == pytest.approx(4 / 6)
    assert clustering_accuracy(y_pred, y_true) == pytest.approx(4 / 6)


def test_scores_reject_mismatched_lengths():
    with pytest.raises(ValueError, match="same length"):
        clustering_scores([0, 1, 1], [0, 1])


def test_summary_of_known_values():
    summary = Summary.from_values([1.0, 2.0, 3.0, 4.0])
    std = math.sqrt((1.5**2 + 0.5**2 + 0.5**2 + 1.5**2) / 3)  # ddof = 1
    assert (summary.mean, summary.std, summary.se) == pytest.approx((2.5, std, std / 2))
    assert summary.to_dict() == pytest.approx({"mean": 2.5, "std": std, "se": std / 2})


def test_summary_of_one_value_has_no_spread_and_stays_json():
    summary = Summary.from_values([0.5])
    assert summary.mean == 0.5 and math.isnan(summary.std) and math.isnan(summary.se)
    assert json.loads(json.dumps(summary.to_dict(), allow_nan=False)) == {"mean": 0.5, "std": None, "se": None}


def test_l2_normalize_gives_unit_rows_and_keeps_zero_rows():
    X = np.array([[3.0, 4.0], [0.0, 0.0], [0.0, -2.0]])
    assert l2_normalize(X) == pytest.approx(np.array([[0.6, 0.8], [0.0, 0.0], [0.0, -1.0]]))


# ---------------------------------------------------------------- batched K-Means


@pytest.mark.parametrize("blobs, n_clusters", [("easy_blobs", 10), ("hard_blobs", 25)])
def test_torch_kmeans_reaches_sklearn_inertia(request, blobs, n_clusters):
    X, y = request.getfixturevalue(blobs)
    ours = [kmeans(X, n_clusters, n_init=10, seed=seed, backend="torch", device="cpu").inertia_ for seed in range(4)]
    ref = [kmeans(X, n_clusters, n_init=10, seed=seed, backend="sklearn").inertia_ for seed in range(4)]
    assert np.mean(ours) <= 1.005 * np.mean(ref)


def test_torch_kmeans_with_the_protocols_25_runs_reaches_sklearn_inertia(sphere_blobs):
    X, _ = sphere_blobs
    ours = [kmeans(X, 10, n_init=25, seed=s, backend="torch", device="cpu").inertia_ for s in range(3)]
    ref = [kmeans(X, 10, n_init=25, seed=s, backend="sklearn").inertia_ for s in range(3)]
    assert np.mean(ours) <= 1.005 * np.mean(ref)


def test_torch_kmeans_on_normalised_features_reaches_sklearn_inertia(hard_blobs):
    X = l2_normalize(hard_blobs[0])
    ours = np.mean([kmeans(X, 25, n_init=10, seed=s, backend="torch", device="cpu").inertia_ for s in range(4)])
    ref = np.mean([kmeans(X, 25, n_init=10, seed=s, backend="sklearn").inertia_ for s in range(4)])
    assert ours <= 1.005 * ref


def test_torch_kmeans_recovers_blobs_and_reports_consistent_fields(easy_blobs):
    X, y = easy_blobs
    result = kmeans(X, 10, n_init=5, seed=0, backend="torch", device="cpu")
    assert adjusted_rand_score(y, result.labels_) > 0.99
    assert result.labels_.shape == (len(X),) and result.centers_.shape == (10, X.shape[1])
    assert result.n_iter_ >= 1
    recomputed = ((X.astype(np.float64) - result.centers_[result.labels_]) ** 2).sum()
    assert result.inertia_ == pytest.approx(recomputed, rel=1e-5)


def test_torch_kmeans_is_reproducible_for_a_seed_and_seeds_differ(hard_blobs):
    X, _ = hard_blobs
    runs = [kmeans(X, 25, n_init=2, seed=seed, backend="torch", device="cpu") for seed in (0, 0, 1, 2, 3)]
    assert np.array_equal(runs[0].labels_, runs[1].labels_) and runs[0].inertia_ == runs[1].inertia_
    assert len({round(run.inertia_, 3) for run in runs[1:]}) > 1


def test_hopeless_runs_are_far_behind_and_closing_in_too_slowly():
    best = torch.tensor(100.0, dtype=torch.float64)
    # inertia after this iteration, and the one before
    current = torch.tensor([101.9, 103.0, 103.0, 100.0], dtype=torch.float64)
    previous = torch.tensor([101.9, 103.01, 103.1, 105.0], dtype=torch.float64)
    # 1.9 % behind: never pruned; 3 % behind, 20 more steps of 0.01 leave it > 2 % behind: pruned;
    # 3 % behind but 20 steps of 0.1 would bring it within 2 %: kept; the best itself: kept.
    hopeless = evaluate._hopeless(current, previous, best)
    assert hopeless.tolist() == [False, True, False, False]
    # at the first iteration there is no previous inertia (infinite): no run is judged, however far behind
    assert not evaluate._hopeless(torch.tensor([150.0], dtype=torch.float64), torch.tensor([math.inf], dtype=torch.float64), best).any()


def test_pruning_keeps_the_best_run_and_saves_lloyd_iterations(monkeypatch, sphere_blobs):
    X, _ = sphere_blobs
    steps = []
    assign = evaluate._assign

    def counting_assign(X, x_sq, centers):
        steps.append(len(centers))  # runs in this E-step
        return assign(X, x_sq, centers)

    monkeypatch.setattr(evaluate, "_assign", counting_assign)
    results = {}
    for gap in (evaluate.PRUNE_GAP, math.inf):  # the rule, and no pruning
        monkeypatch.setattr(evaluate, "PRUNE_GAP", gap)
        steps.clear()
        results[gap] = [kmeans(X, 10, n_init=25, seed=s, backend="torch", device="cpu") for s in range(3)], sum(steps)
    (pruned, pruned_steps), (full, full_steps) = results.values()
    for a, b in zip(pruned, full):
        assert a.inertia_ == b.inertia_ and np.array_equal(a.labels_, b.labels_) and a.n_iter_ == b.n_iter_
    assert pruned_steps < full_steps / 2


def test_the_onednn_gemm_is_taken_where_torch_has_onednn():
    # The probe of the private op must accept it on a torch that has it, or the fast path is silently lost.
    assert (evaluate._ONEDNN_LINEAR is not None) == torch.backends.mkldnn.is_available()


def test_linear_is_addmm():
    generator = torch.Generator().manual_seed(0)
    A, B, bias = (torch.randn(*shape, generator=generator) for shape in ((300, 384), (250, 384), (250,)))
    expected = torch.addmm(bias.double(), A.double(), B.double().T)
    got = evaluate._linear(A, B, bias)
    assert got.shape == (300, 250) and got.dtype == torch.float32
    # float32 sums of 384 products of about 1: a few 1e-6 relative to the largest entries
    assert torch.allclose(got.double(), expected, rtol=0, atol=1e-4)
    assert torch.allclose(got, torch.addmm(bias, A, B.T), rtol=0, atol=1e-4)


def test_onednn_and_addmm_give_the_same_clustering(monkeypatch, hard_blobs):
    X, _ = hard_blobs
    fast = kmeans(X, 25, n_init=4, seed=0, backend="torch", device="cpu")
    monkeypatch.setattr(evaluate, "_ONEDNN_LINEAR", None)
    plain = kmeans(X, 25, n_init=4, seed=0, backend="torch", device="cpu")
    assert adjusted_rand_score(plain.labels_, fast.labels_) == 1.0
    assert fast.inertia_ == pytest.approx(plain.inertia_, rel=1e-6)


def test_empty_cluster_takes_the_farthest_sample():
    X = torch.tensor([[0.0, 0.0], [1.0, 0.0], [10.0, 0.0]])
    labels = torch.tensor([[0, 0, 0]])  # cluster 1 is empty
    sq_dist = torch.tensor([[0.0, 1.0, 100.0]])
    sums, counts = evaluate._cluster_sums(X, labels, 2)
    centers = evaluate._centers_from_sums(X, sums, counts, sq_dist)
    assert np.allclose(centers[0].numpy(), [[11 / 3, 0.0], [10.0, 0.0]])


def test_moving_samples_matches_recomputed_sums():
    generator = torch.Generator().manual_seed(0)
    X = torch.randn(50, 3, generator=generator)
    old = torch.randint(4, (2, 50), generator=generator)
    new = old.clone()
    new[0, :5] = (new[0, :5] + 1) % 4
    new[1, 10:12] = 3
    everything = (old + 1) % 4  # more moves than rows: the sums are recomputed instead
    for moved in (new, everything):
        sums, counts = evaluate._cluster_sums(X, old, 4)
        evaluate._move_samples(X, sums, counts, old, moved)
        expected_sums, expected_counts = evaluate._cluster_sums(X, moved, 4)
        assert torch.allclose(sums, expected_sums, atol=1e-5) and torch.equal(counts, expected_counts)


def test_kmeans_rejects_unknown_backend_and_device(easy_blobs):
    with pytest.raises(ValueError, match="backend"):
        kmeans(easy_blobs[0], 3, backend="faiss")
    with pytest.raises(ValueError, match="'cpu' or 'cuda'"):
        kmeans(easy_blobs[0], 3, backend="torch", device="mps")


# ---------------------------------------------------------------- the protocol


def test_protocol_with_labels(easy_blobs):
    X, y = easy_blobs
    calls = []
    result = cluster_protocol(X, y, sets=3, runs=4, seed=7, progress=lambda done, total: calls.append((done, total)))
    assert calls == [(1, 3), (2, 3), (3, 3)]
    out = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert set(out) == {"acc", "nmi", "ari", "inertia", "sets", "runs", "seed", "n_clusters", "n_samples"}
    assert (out["sets"], out["runs"], out["seed"], out["n_clusters"], out["n_samples"]) == (3, 4, 7, 10, len(X))
    assert out["acc"]["mean"] > 0.99 and out["ari"]["mean"] > 0.99
    assert set(out["acc"]) == {"mean", "std", "se"}
    assert result.acc.shape == result.inertia.shape == (3,)
    # The features were L2-normalised: no inertia can exceed n * max squared distance on the sphere (4).
    assert result.inertia.max() < 4 * len(X)
    assert cluster_protocol(X, y, sets=3, runs=4, seed=7).to_dict() == result.to_dict()


def test_protocol_sets_depend_only_on_the_base_seed(hard_blobs):
    X, y = hard_blobs
    three = cluster_protocol(X, y, sets=3, runs=2, seed=3, backend="torch", device="cpu")
    two = cluster_protocol(X, y, sets=2, runs=2, seed=3, backend="torch", device="cpu")
    assert np.array_equal(three.inertia[:2], two.inertia)


def test_protocol_without_labels_reports_unsupervised_figures(easy_blobs):
    X, _ = easy_blobs
    result = cluster_protocol(X, n_clusters=10, sets=2, runs=3, backend="sklearn")
    out = result.to_dict()
    assert set(out) == {"inertia", "silhouette", "sets", "runs", "seed", "n_clusters", "n_samples"}
    assert out["silhouette"]["mean"] > 0.5
    assert result.acc is None


def test_protocol_silhouette_is_sampled_for_big_n(monkeypatch, easy_blobs):
    monkeypatch.setattr(evaluate, "SILHOUETTE_SAMPLE_SIZE", 500)
    X, _ = easy_blobs
    first = cluster_protocol(X, n_clusters=10, sets=2, runs=2, seed=1).silhouette
    again = cluster_protocol(X, n_clusters=10, sets=2, runs=2, seed=1).silhouette
    assert np.array_equal(first, again) and first[0] != first[1]


def test_protocol_accepts_more_clusters_than_classes(easy_blobs):
    X, y = easy_blobs
    result = cluster_protocol(X, y, n_clusters=np.int64(12), sets=1, runs=2)
    assert result.n_clusters == 12 and 0.7 < result.acc[0] < 1.0
    json.dumps(result.to_dict())  # numpy integers in, plain JSON out


BAD_INPUTS = [
    (dict(X=np.ones((3, 4)), labels=[0, 1, 2], n_clusters=5), "3 images but 5 clusters: need at least 5 images"),
    (dict(X=np.random.default_rng(0).random((6, 4)), labels=[1] * 6), "K=1 cluster is meaningless"),
    (dict(X=np.ones((6, 4)), labels=[0, 1, 0]), "one entry per row"),
    (dict(X=np.array([[1.0, np.nan], [0.0, 1.0], [1.0, 1.0]]), n_clusters=2), "NaN or infinite"),
    (dict(X=np.array([[1.0, np.inf], [0.0, 1.0], [1.0, 1.0]]), n_clusters=2), "NaN or infinite"),
    (dict(X=np.ones((6, 4)), n_clusters=1), "n_clusters must be an integer of at least 2, got 1"),
    (dict(X=np.ones((6, 4)), n_clusters=2, sets=0), "sets must be a positive integer, got 0"),
    (dict(X=np.ones((6, 4)), n_clusters=2, runs=0), "runs must be a positive integer, got 0"),
    (dict(X=np.ones((6, 4))), "n_clusters is required"),
    (dict(X=np.ones(6), n_clusters=2), "2-D array"),
]


@pytest.mark.parametrize("kwargs, message", BAD_INPUTS)
def test_protocol_rejects_bad_input(kwargs, message):
    with pytest.raises(ValueError, match=message):
        cluster_protocol(**kwargs)


# ---------------------------------------------------------------- k-NN and the split


def test_knn_weighted_vote_differs_from_majority():
    # The test point's 4 neighbours: one of class "b" at cosine 1.0, three of class "a" at cosine 0.8.
    # Plain majority says "a"; with T = 0.07 one "b" weighs exp(0.2 / 0.07) ≈ 17 times an "a".
    angle = math.acos(0.8)
    train_X = [[1.0, 0.0], [math.cos(angle), math.sin(angle)], [math.cos(angle), -math.sin(angle)], [0.8, 0.6]]
    train_y = ["b", "a", "a", "a"]
    test_X, test_y = [[2.0, 0.0]], ["b"]
    assert knn_classify(train_X, train_y, test_X, test_y, k=4) == 1.0
    assert knn_classify(train_X, train_y, test_X, test_y, k=4, temperature=100.0) == 0.0


def test_knn_is_perfect_on_separable_blobs(easy_blobs):
    X, y = easy_blobs
    train, test = stratified_split(y, test_fraction=0.3, seed=0)
    assert knn_classify(X[train], y[train], X[test], y[test]) == 1.0


def test_knn_rejects_k_beyond_training_set():
    with pytest.raises(ValueError, match="k must be"):
        knn_classify([[1.0, 0.0]], [0], [[1.0, 0.0]], [0], k=2)


def test_stratified_split_keeps_class_proportions():
    labels = np.repeat([0, 1, 2], [120, 60, 20])
    train, test = stratified_split(labels, test_fraction=0.5, seed=0)
    assert np.bincount(labels[test]).tolist() == [60, 30, 10]
    assert np.bincount(labels[train]).tolist() == [60, 30, 10]
    assert sorted(np.concatenate([train, test]).tolist()) == list(range(200))
    again = stratified_split(labels, test_fraction=0.5, seed=0)
    assert np.array_equal(train, again[0]) and not np.array_equal(test, stratified_split(labels, 0.5, seed=1)[1])


def test_a_small_kmeans_runs_on_one_thread_and_puts_the_count_back(monkeypatch, sphere_blobs):
    X, _ = sphere_blobs
    seen = []
    lloyd = evaluate._lloyd

    def recording_lloyd(*args):
        seen.append(torch.get_num_threads())
        return lloyd(*args)

    monkeypatch.setattr(evaluate, "_lloyd", recording_lloyd)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        kmeans(X, 10, n_init=4, seed=0, backend="torch", device="cpu")
        assert torch.get_num_threads() == 2
        monkeypatch.setattr(evaluate, "ONE_THREAD_WORK", 0)  # every K-Means counts as large
        kmeans(X, 10, n_init=4, seed=0, backend="torch", device="cpu")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert seen == [1, 2]
