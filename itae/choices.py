"""The names itae offers and reports: artifact rules, K-Means backends, splits and metrics, defined once for
the library and both front-ends.

Importing this module loads nothing heavy, so the command line can offer these choices in ``--help``
before it has imported torch.
"""
from __future__ import annotations

__all__ = [
    "ALGORITHMS",
    "ATTENUATIONS",
    "BACKENDS",
    "DETECTORS",
    "LOWER_IS_BETTER",
    "METRICS",
    "PRECISIONS",
    "ROWS",
    "RULES",
    "SPLITS",
    "SUPERVISED_METRICS",
    "THETA_WORDS",
    "UNSUPERVISED_METRICS",
    "metric_label",
]

RULES = ("minority", "below", "above")
"""Which side of θ is attenuated (:func:`itae.engine.split_artifacts`): ``minority`` is the paper's Eq. 3
(the smaller of L_a and L_b), ``below`` is L_a (the θ sweep of Sec. 5.2), ``above`` is L_b."""

PRECISIONS = ("auto", "bf16", "fp32")
"""What an extraction computes in (:func:`itae.extract.resolve_precision`): ``auto`` is bf16 autocast where the
hardware computes bf16 natively (CUDA, CPUs with AMX or AVX512-BF16) and float32 elsewhere."""

THETA_WORDS = ("auto", "paper", "none")
"""What can be asked for θ besides a number (:func:`itae.theta.decide_theta`): the policy's choice (the default
everywhere), the paper's θ for the model, or no attenuation."""

DETECTORS = ("query", "key", "value", "output")
"""Which per-token norm finds the artifacts (:func:`itae.engine.detector_norms`): Eq. 4 on the final block's
queries (the paper), keys or values, or the norm of the final block's output tokens in the residual stream (the
high-norm criterion of Darcet et al. 2024)."""

ATTENUATIONS = ("min", "remove", "mean", "scale")
"""What an artifact's pre-softmax logit becomes (:func:`itae.engine.attenuate_logits`): the row minimum (Eq. 5-6,
the paper), minus infinity (removed from the softmax), the row mean, or the logit plus ``log(factor)`` (its
attention weight scaled by ``factor`` before the softmax renormalises)."""

ROWS = ("cls", "all")
"""Which logit rows are attenuated: the CLS row (Eq. 6, the paper) or every row (Eq. 5)."""

ALGORITHMS = ("kmeans", "spectral", "agglomerative", "gmm", "hdbscan")
"""Clustering algorithms for the same features (the paper's Sec. 3.4; :mod:`itae.clustering`): the paper's
K-Means protocol, spectral clustering, agglomerative (Ward), a Gaussian mixture, HDBSCAN."""

BACKENDS = ("auto", "sklearn", "torch")
"""K-Means implementations (:func:`itae.evaluate.kmeans`): scikit-learn, the batched torch one, or the
faster of the two for the data at hand."""

SPLITS = ("test", "train")
"""Data splits: the paper clusters the test split; k-NN takes its memory bank from the train split."""

SUPERVISED_METRICS = ("acc", "nmi", "ari")
"""Clustering scores against the true labels (:func:`itae.evaluate.clustering_scores`)."""

UNSUPERVISED_METRICS = ("inertia", "silhouette")
"""Clustering scores without labels: K-Means' inertia and the silhouette."""

METRICS = SUPERVISED_METRICS + UNSUPERVISED_METRICS
"""Every metric the K-Means protocol reports, in the order reports list them."""

LOWER_IS_BETTER = ("inertia",)
"""The metrics whose best value is the smallest; every other one is best when largest."""


def metric_label(metric: str) -> str:
    """How reports and plots name a metric: ``ACC``, ``NMI``, ``ARI``, ``inertia``, ``silhouette``."""
    return metric.upper() if metric in SUPERVISED_METRICS else metric
