"""2-D embeddings of features for plots: UMAP (umap-learn) of L2-normalised features."""
from __future__ import annotations

import numpy as np

from itae.evaluate import l2_normalize

__all__ = ["umap_embedding", "compile_umap"]


def umap_embedding(features, n_neighbors: int = 15, min_dist: float = 0.1, seed: int = 0) -> np.ndarray:
    """UMAP of the L2-normalised features, seeded so that two feature sets get the same settings.

    Parameters
    ----------
    features : array-like of shape (n_samples, n_features)
    n_neighbors : capped at n_samples - 1 for small sets
    min_dist : float
    seed : random_state of UMAP

    Returns
    -------
    ndarray of shape (n_samples, 2)
    """
    import umap  # its import alone takes seconds: only where an embedding is asked for

    X = l2_normalize(features)
    if len(X) < 3:
        raise ValueError(f"UMAP needs at least 3 images, got {len(X)}")
    reducer = umap.UMAP(n_neighbors=min(n_neighbors, len(X) - 1), min_dist=min_dist, random_state=seed, n_jobs=1)
    return reducer.fit_transform(X)


def compile_umap() -> None:
    """Fit UMAP once on a few points: numba compiles on the first call (about 30 s), later calls are fast."""
    umap_embedding(np.random.default_rng(0).normal(size=(60, 8)), n_neighbors=5)
