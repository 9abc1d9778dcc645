import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.datasets import make_blobs

from itae.embed import NUMBA_FOLDER, shared_umap, umap_embedding
from itae.extract import extract
from test_extract import ListDataset, tiny_backbone

ROOT = Path(__file__).resolve().parent.parent


def test_umap_is_seeded_and_keeps_clusters_apart():
    X, y = make_blobs(n_samples=120, centers=3, n_features=16, cluster_std=0.5, random_state=0)
    first, second = umap_embedding(X, seed=3), umap_embedding(X, seed=3)
    assert first.shape == (120, 2)
    np.testing.assert_array_equal(first, second)
    centres = np.stack([first[y == c].mean(0) for c in range(3)])
    spread = max(np.linalg.norm(first[y == c] - centres[c], axis=1).mean() for c in range(3))
    gaps = [np.linalg.norm(centres[a] - centres[b]) for a in range(3) for b in range(a + 1, 3)]
    assert min(gaps) > 2 * spread


def test_umap_refuses_too_few_points():
    with pytest.raises(ValueError, match="at least 3"):
        umap_embedding(np.ones((2, 4)))


@pytest.fixture(scope="module")
def extraction():
    return extract(tiny_backbone(), ListDataset(24), batch_size=8)


def test_unattenuated_features_give_one_layout(extraction):
    below_every_norm = float(extraction.query_norms[:, 1:].min()) - 1
    result = extraction.itae(below_every_norm, "below")
    assert not result.artifact_mask.any()
    layout = shared_umap(extraction.features_original, result.features, n_neighbors=5)
    assert not layout.changed.any()
    np.testing.assert_array_equal(layout.itae, layout.original)
    np.testing.assert_array_equal(layout.original, umap_embedding(extraction.features_original, n_neighbors=5))
    assert not layout.moved.any()


def test_an_image_without_artifacts_keeps_its_place(extraction):
    # θ between the 8th and 9th lowest per-image minimum: rule 'below' attenuates tokens in 8 images only.
    lowest = np.sort(extraction.query_norms[:, 1:].min(axis=1))
    theta = float(lowest[7:9].mean())
    result = extraction.itae(theta, "below")
    attenuated = result.artifact_mask.any(axis=1)
    assert attenuated.sum() == 8
    layout = shared_umap(extraction.features_original, result.features, n_neighbors=5)
    np.testing.assert_array_equal(layout.changed, attenuated)
    np.testing.assert_array_equal(layout.itae[~attenuated], layout.original[~attenuated])
    assert (layout.moved[attenuated] > 0).all() and not layout.moved[~attenuated].any()


def test_both_feature_sets_share_one_space():
    # The ITAE features of cluster 0 are those of cluster 1 (jittered): in one space they land among cluster 1.
    X, y = make_blobs(n_samples=90, centers=3, n_features=16, cluster_std=0.5, random_state=0)
    rng = np.random.default_rng(0)
    itae = X.copy()
    itae[y == 0] = X[y == 1][: (y == 0).sum()] + rng.normal(scale=0.05, size=((y == 0).sum(), 16))
    layout = shared_umap(X, itae, seed=1)
    centres = np.stack([layout.original[y == c].mean(0) for c in range(3)])
    nearest = np.argmin(np.linalg.norm(layout.itae[y == 0, None] - centres[None], axis=2), axis=1)
    assert (nearest == 1).all(), "moved images must be drawn where the original features of their new cluster are"
    np.testing.assert_array_equal(layout.itae[y != 0], layout.original[y != 0])


def test_shared_umap_refuses_feature_sets_of_different_shapes():
    with pytest.raises(ValueError, match="same shape"):
        shared_umap(np.ones((5, 4)), np.ones((4, 4)))


def test_umaps_compilation_is_kept_on_disk_for_the_next_process(tmp_path):
    """The first process compiles two of UMAP's numba functions into a fresh cache; the second reads them back.

    Two functions rather than a whole fit (a minute on 2 cores): enough to see where the code is kept and
    that the next process finds it; ``bench/bench_umap_cold.py`` times the whole fit.
    """
    probe = (
        "import numpy as np\n"
        "from itae.embed import import_umap\n"
        "import_umap()\n"
        "import umap.umap_ as u\n"
        "distances = np.random.default_rng(0).random((30, 5)).astype(np.float32)\n"
        "sigmas, rhos = u.smooth_knn_dist(distances, 5.0)\n"
        "u.compute_membership_strengths(np.argsort(distances, 1).astype(np.int32), distances, sigmas, rhos)\n"
        "for f in (u.smooth_knn_dist, u.compute_membership_strengths):\n"
        "    print(f.__name__, f.stats.cache_path, len(f.stats.cache_hits), len(f.stats.cache_misses))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
    env.update(ITAE_CACHE_DIR=str(tmp_path), PYTHONPATH=str(ROOT))
    runs = [subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=600)
            for _ in range(2)]
    for run in runs:
        assert run.returncode == 0, run.stderr[-2000:]
    first, second = ([line.split() for line in run.stdout.splitlines()] for run in runs)
    folder = str(tmp_path / NUMBA_FOLDER)
    assert all(path.startswith(folder) and misses == "1" for _, path, _, misses in first)  # compiled and written
    assert all(path.startswith(folder) and (hits, misses) == ("1", "0") for _, path, hits, misses in second)
