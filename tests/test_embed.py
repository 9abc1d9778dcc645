import numpy as np
import pytest
from sklearn.datasets import make_blobs

from itae.embed import umap_embedding


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
