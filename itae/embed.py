"""2-D embeddings of features for plots: UMAP (umap-learn) of L2-normalised features, and the original and
ITAE features of the same images in one shared UMAP space.

Why one fit on both feature sets, not two fits
----------------------------------------------
Two UMAPs fitted separately have unrelated coordinates: an image's place in one says nothing about its place
in the other, and a feature change of 1e-6 can move the whole layout. :func:`shared_umap` fits UMAP once, on
the original features stacked with the ITAE features of the images whose features ITAE changed, so that
both plots are drawn in the same coordinates and a distance between an image's two points is a distance in
that one space. An image that ITAE leaves unchanged (bit for bit, as :meth:`itae.extract.Extraction.itae`
guarantees for an image without artifacts) is a single point of the fit, drawn at the same place in both
plots; when nothing is attenuated the fit is that of the original features alone.

The other way, fitting the original features and placing the ITAE features into that layout with
``UMAP.transform``, was not chosen: ``transform`` puts each new point among its nearest *original*
neighbours and never lets the new points form a structure of their own, so a cluster that only the ITAE
features separate would be drawn where the original features put it, and the plot would hide the effect
it is meant to show. One fit treats both feature sets alike.
"""
from __future__ import annotations

import sys
import types
from dataclasses import dataclass

import numpy as np

from itae import settings
from itae.evaluate import l2_normalize

__all__ = ["NUMBA_FOLDER", "SharedEmbedding", "compile_umap", "import_umap", "shared_umap", "umap_embedding"]

NUMBA_FOLDER = "numba"
"""Where under the cache root (:func:`itae.settings.cache_dir`) numba keeps UMAP's compiled code."""


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
    umap = import_umap()  # its import alone takes seconds: only where an embedding is asked for

    X = l2_normalize(features)
    if len(X) < 3:
        raise ValueError(f"UMAP needs at least 3 images, got {len(X)}")
    reducer = umap.UMAP(n_neighbors=min(n_neighbors, len(X) - 1), min_dist=min_dist, random_state=seed, n_jobs=1)
    return reducer.fit_transform(X)


@dataclass(frozen=True)
class SharedEmbedding:
    """Where each image lies with its original and with its ITAE features, in one UMAP space.

    Attributes
    ----------
    original : ndarray of shape (n_samples, 2)
        The places of the original features.
    itae : ndarray of shape (n_samples, 2)
        The places of the ITAE features; equal to ``original`` in every row that ITAE left unchanged.
    changed : ndarray of bool, shape (n_samples,)
        The images whose ITAE features differ from their original features.
    """

    original: np.ndarray
    itae: np.ndarray
    changed: np.ndarray

    @property
    def moved(self) -> np.ndarray:
        """How far each image moved from its original place to its ITAE place: ndarray of shape (n_samples,)."""
        return np.linalg.norm(self.itae - self.original, axis=1)


def shared_umap(original, itae, n_neighbors: int = 15, min_dist: float = 0.1, seed: int = 0) -> SharedEmbedding:
    """Embed the original and the ITAE features of the same images in one UMAP space (see the module docstring).

    UMAP is fitted once on the original features stacked with the ITAE rows that differ from their original
    row; an unchanged image is one point of that fit, drawn at the same place in both layouts.

    Parameters
    ----------
    original : array-like of shape (n_samples, n_features)
        The unmodified features.
    itae : array-like of shape (n_samples, n_features)
        The ITAE features of the same images, in the same order.
    n_neighbors, min_dist, seed
        As in :func:`umap_embedding`; ``n_neighbors`` is capped by the number of points fitted.

    Returns
    -------
    SharedEmbedding

    Raises
    ------
    ValueError
        If the two feature sets differ in shape, or there are fewer than 3 images.
    """
    original, itae = np.asarray(original), np.asarray(itae)
    if original.shape != itae.shape or original.ndim != 2:
        raise ValueError(f"original and ITAE features must have the same shape (n_samples, n_features), "
                         f"got {original.shape} and {itae.shape}")
    # Exact comparison: an image without artifacts keeps its features bit for bit, and any difference at
    # all is a feature change that deserves its own point.
    changed = np.any(original != itae, axis=1)
    places = umap_embedding(np.concatenate([original, itae[changed]]), n_neighbors, min_dist, seed)
    original_places = places[: len(original)]
    itae_places = original_places.copy()
    itae_places[changed] = places[len(original):]
    return SharedEmbedding(original_places, itae_places, changed)


def compile_umap() -> None:
    """Fit UMAP once on a few points: numba compiles on the first call (about 30 s), later calls are fast."""
    umap_embedding(np.random.default_rng(0).normal(size=(60, 8)), n_neighbors=5)


def import_umap() -> types.ModuleType:
    """umap-learn, with numba's compilation of it kept on disk, so that only the first process ever waits.

    umap-learn and pynndescent compile their numba functions on first use (30-40 s on 2 cores), and most of
    them without ``cache=True``, so every new process paid it again. Here every numba function of the two
    packages caches its compiled code, under ``<cache root>/numba`` unless ``NUMBA_CACHE_DIR`` says
    otherwise; numba recompiles by itself when a package's source changes.
    """
    import numba
    from numba.core.caching import NullCache
    from numba.core.dispatcher import Dispatcher

    if not numba.config.CACHE_DIR:  # set before umap is imported: pynndescent compiles at import
        numba.config.CACHE_DIR = str(settings.cache_dir() / NUMBA_FOLDER)
    import umap

    for name, module in list(sys.modules.items()):
        if name.partition(".")[0] in ("umap", "pynndescent") and isinstance(module, types.ModuleType):
            for value in list(vars(module).values()):
                if isinstance(value, Dispatcher) and isinstance(value._cache, NullCache):  # numba's cache=False
                    value.enable_caching()
    return umap
