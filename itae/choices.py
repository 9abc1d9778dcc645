"""The names itae offers and reports: artifact rules, K-Means backends, splits and metrics, defined once for
the library and both front-ends.

Importing this module loads nothing heavy, so the command line can offer these choices in ``--help``
before it has imported torch.
"""
from __future__ import annotations

__all__ = [
    "BACKENDS",
    "LOWER_IS_BETTER",
    "METRICS",
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

THETA_WORDS = ("auto", "paper", "none")
"""What can be asked for θ besides a number (:func:`itae.theta.decide_theta`): the policy's choice (the default
everywhere), the paper's θ for the model, or no attenuation."""

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
