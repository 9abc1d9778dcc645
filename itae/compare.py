"""Methods side by side on one model and one dataset: ITAE, its variants, test-time and trained registers.

:func:`compare` takes an extraction (the backbone ran once) and a list of :class:`itae.methods.Method`, and
returns a :class:`Comparison`: per method its features, the clustering protocol over the SAME seeds, the
tokens it attenuated, the time it cost beyond the shared extraction and, on a model with planted artifacts,
its detection scored against them; across the detectors, how far their artifact sets agree.

Where each method's features come from:

- ``original``: the extraction's features.
- ITAE variants of the final block: :meth:`itae.extract.Extraction.itae`, from the final-block cache (no
  backbone run). Eq. 5 gives the CLS output of Eq. 6 there, so ``itae-eq5`` reproduces ``itae`` exactly;
  the table says so rather than clustering the same features twice.
- ITAE variants of the last k blocks and test-time registers need blocks before the final one: one more
  pass over the images, whose features are cached under their own key in ``<cache_dir>/variants/`` (with
  the time the pass took), so a second comparison reads them back.
- trained registers: the registry's ``*_reg`` model of the same size, its own extraction (cached as any
  other). Offline its hub weights cannot be loaded: the row says so instead of failing.

θ: one policy, :func:`itae.theta.decide_theta`, for every detector. The query-norm detector takes the θ
asked for (a number, ``"paper"``, ``"auto"`` or ``"none"``); the other detectors' norms live on other scales,
so they take the automatic θ of their own norms, examined by the same criteria (``"none"`` turns them off
too). Each decision's one-sentence reason goes into the report.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from itae import engine
from itae.backbones import Backbone, load_backbone
from itae.choices import ALGORITHMS
from itae.clustering import ClusteringResult, ClusterMovers, cluster_labels, cluster_movers, clustering_protocol
from itae.data import ImageDataset
from itae.errors import BackboneError
from itae.extract import Extraction, autocast, extract_cached, preprocessed_batches
from itae.fileio import atomic_path
from itae.methods import Method
from itae.planted import DetectionScores, detection_scores
from itae.registers import RegisterNeurons, calibrated_register_neurons, features_with_test_time_register
from itae.registry import REGISTRY
from itae.settings import default_weights
from itae.theta import ThetaDecision, decide_theta, examine_norms

__all__ = ["Comparison", "DetectorAgreement", "MethodResult", "compare", "trained_registers_model"]

VARIANTS_VERSION = 1
"""Changes whenever features cached under ``variants/`` would be computed differently."""


@dataclass
class MethodResult:
    """One method of a comparison.

    Attributes
    ----------
    method : Method
    features : ndarray of shape (N, C) or None
        Not L2-normalised; None when the method could not run (``note`` says why).
    clustering : ClusteringResult or None
        The protocol on ``features``, with the comparison's seeds.
    artifact_mask : ndarray of bool, shape (N, T), or None
        The tokens ITAE attenuated (the same mask in each attenuated block); None for other kinds.
    attention : ndarray of shape (N, H, T) or None
        The final block's softmax CLS row actually used, for final-block variants (and ``original``).
    theta : ThetaDecision or None
        The θ of an ITAE variant and why (its detector's decision).
    seconds_per_image : float or None
        Compute beyond the shared extraction, per image, as measured when the features were computed;
        None for trained registers (another model's whole forward pass).
    detection : DetectionScores or None
        ``artifact_mask`` against the planted artifacts (models loaded with ``planted=True``).
    same_as : str or None
        An earlier method whose features are identical, bit for bit (its clustering is reused).
    note : str
        What the row needs said: why it could not run, why nothing was attenuated, what it reproduces.
    """

    method: Method
    features: np.ndarray | None
    clustering: ClusteringResult | None = None
    artifact_mask: np.ndarray | None = None
    attention: np.ndarray | None = None
    theta: ThetaDecision | None = None
    seconds_per_image: float | None = None
    detection: DetectionScores | None = None
    same_as: str | None = None
    note: str = ""

    @property
    def available(self) -> bool:
        return self.features is not None

    @property
    def tokens_per_image(self) -> float | None:
        """Mean attenuated tokens per image (CLS never is one); None where the method attenuates none."""
        return None if self.artifact_mask is None else float(self.artifact_mask[:, 1:].sum(1).mean())

    def to_dict(self) -> dict:
        """JSON-ready, without the per-image arrays."""
        return {
            "method": self.method.name, "label": self.method.label, "kind": self.method.kind,
            "variant": self.method.identity()["variant"], "available": self.available,
            "theta": None if self.theta is None else self.theta.value,
            "theta_origin": None if self.theta is None else self.theta.origin,
            "tokens_per_image": self.tokens_per_image, "seconds_per_image": self.seconds_per_image,
            "clustering": None if self.clustering is None else self.clustering.to_dict(),
            "detection": None if self.detection is None else self.detection.to_dict(),
            "same_as": self.same_as, "note": self.note,
        }


@dataclass
class DetectorAgreement:
    """How far the detectors' artifact sets agree: Jaccard of every pair, pooled over all tokens.

    Attributes
    ----------
    names : list of str
        The detectors, with ``"planted"`` last on a model with planted artifacts.
    jaccard : ndarray of shape (len(names), len(names))
        NaN where both sets are empty.
    """

    names: list[str]
    jaccard: np.ndarray

    def to_dict(self) -> dict:
        return {"names": self.names,
                "jaccard": [[None if math.isnan(v) else float(v) for v in row] for row in self.jaccard]}


@dataclass
class Comparison:
    """The methods of :func:`compare`, on one model and one dataset, with one protocol.

    Attributes
    ----------
    results : list of MethodResult, in the order asked for
    extraction : Extraction
        The shared extraction: names, labels, indices, original attention maps (for thumbnails).
    algorithm, sets, runs, seed, n_clusters, backend, device
        The clustering protocol every method went through.
    agreement : DetectorAgreement or None
        Between the detectors of the ITAE variants; None with fewer than two (and no planting).
    register_neurons : RegisterNeurons or None
        What the test-time registers moved, when they ran.
    thetas : dict of str to ThetaDecision
        The θ decision of each detector the ITAE variants used, in the order first used.
    """

    results: list[MethodResult]
    extraction: Extraction
    algorithm: str
    sets: int
    runs: int
    seed: int
    n_clusters: int | None
    backend: str = "auto"
    device: str | None = None
    agreement: DetectorAgreement | None = None
    register_neurons: RegisterNeurons | None = None
    thetas: dict[str, ThetaDecision] = field(default_factory=dict)

    def result(self, name: str) -> MethodResult:
        """The result of the method named ``name``."""
        for result in self.results:
            if result.method.name == name:
                return result
        raise KeyError(f"no method {name!r} in this comparison; it has {', '.join(r.method.name for r in self.results)}")

    def cluster_labels(self, name: str, set_index: int = 0) -> np.ndarray:
        """Per-image cluster labels of set ``set_index`` for method ``name``: the set its scores came from.

        Comparing them with ``cluster_labels("original", s)`` shows which images a method moves.
        """
        result = self.result(name)
        if not result.available:
            raise ValueError(f"{result.method.label} has no features: {result.note}")
        k = result.clustering.protocol.n_clusters
        return cluster_labels(result.features, k, self.algorithm, self.seed, set_index, self.runs, self.backend,
                              self.device)

    def movers(self, name: str, set_index: int = 0, reference: str = "original") -> ClusterMovers:
        """Which images method ``name`` puts in another cluster than ``reference`` does, in set ``set_index``.

        Both partitions are the ones the set was scored on (:meth:`cluster_labels`); the clusters are matched
        as :func:`itae.clustering.cluster_movers` says, and named by their most common class where there are labels.
        """
        extraction = self.extraction
        return cluster_movers(self.cluster_labels(reference, set_index), self.cluster_labels(name, set_index),
                              extraction.labels, extraction.class_names)

    def to_dict(self) -> dict:
        """JSON-ready: what was compared, how, and every method's row."""
        info = self.extraction.info
        clustered = next((result.clustering for result in self.results if result.clustering is not None), None)
        return {
            "model": info.model, "label": info.label, "weights": info.weights, "data": info.data,
            "n_images": len(self.extraction), "algorithm": self.algorithm, "sets": self.sets, "runs": self.runs,
            "seed": self.seed, "n_clusters": clustered.protocol.n_clusters if clustered else self.n_clusters,
            "planted": self.extraction.planted_mask is not None,
            "register_neurons": None if self.register_neurons is None else self.register_neurons.to_json(),
            "theta_decisions": {detector: decision.to_dict() for detector, decision in self.thetas.items()},
            "methods": [result.to_dict() for result in self.results],
            "detector_agreement": None if self.agreement is None else self.agreement.to_dict(),
        }


def trained_registers_model(name: str) -> str | None:
    """The registry's model with trained registers of the same size as ``name``, or None."""
    spec = REGISTRY.get(name)
    if spec is None or spec.num_registers:
        return None
    candidate = f"{name}_reg"
    return candidate if candidate in REGISTRY else None


def compare(
    backbone: Backbone, dataset: ImageDataset, extraction: Extraction, methods: Sequence[Method], cache_dir: str | Path,
    *, theta: float | str | None = "auto", rule: str = "minority", algorithm: str = "kmeans", sets: int = 20,
    runs: int = 25, seed: int = 0, n_clusters: int | None = None, backend: str = "auto", device=None,
    batch_size: int = 32, calibration: ImageDataset | None = None,
    progress: Callable[[int, int, str], None] | None = None,
) -> Comparison:
    """Run ``methods`` on one extraction and cluster every method's features with the same seeds.

    Parameters
    ----------
    backbone : Backbone, attached to ``extraction``
    dataset : ImageDataset the extraction was made from (a second pass reads it for the variants that need it)
    extraction : Extraction of ``dataset`` by ``backbone``
    methods : sequence of Method (:mod:`itae.methods`), distinct names
    cache_dir : folder of the on-disk caches (``itae.settings.cache_dir()``)
    theta : float, {"auto", "paper", "none"} or None
        What is asked for the query-norm detector's θ (:func:`itae.theta.decide_theta`; None means "auto").
        The other detectors take the automatic θ of their own norms, or none with ``"none"``.
    rule : {"minority", "below", "above"}
    algorithm, sets, runs, seed, n_clusters, backend, device
        The clustering protocol (:func:`itae.clustering.clustering_protocol`), the same for every method.
    batch_size : images per forward pass of the variants that re-run the backbone
    calibration : ImageDataset, optional
        Calibration images of the test-time registers (default :func:`itae.registers.default_calibration_set`).
    progress : callable, optional
        ``progress(done, total, message)`` before each step that takes time: ``done`` of the ``total``
        methods are finished, ``message`` says what runs now (a progress bar's text).

    Returns
    -------
    Comparison
    """
    names = [method.name for method in methods]
    if len(set(names)) != len(names) or not names:
        raise ValueError(f"give each method once (and at least one), got {names}")
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
    comparison = Comparison([], extraction, algorithm, sets, runs, seed, n_clusters, backend,
                            None if device is None else str(device))

    def say(message: str) -> None:
        if progress is not None:
            progress(len(comparison.results), len(methods), message)

    run = _Runner(backbone, dataset, extraction, Path(cache_dir), theta, rule, batch_size, calibration, say)
    for method in methods:
        say(f"features: {method.label}")
        result = run.features(method)
        if result.artifact_mask is not None and extraction.planted_mask is not None:
            result.detection = extraction.detection_scores(result.artifact_mask)
        if result.available:
            same = next((earlier for earlier in comparison.results
                         if earlier.available and np.array_equal(earlier.features, result.features)), None)
            if same is not None:
                result.clustering, result.same_as = same.clustering, same.method.name
            else:
                say(f"clustering ({algorithm}): {method.label}")
                result.clustering = clustering_protocol(result.features, extraction.labels, n_clusters, algorithm,
                                                        sets, runs, seed, backend, device)
        comparison.results.append(result)
    comparison.register_neurons = run.register_neurons
    comparison.thetas = run.thetas
    comparison.agreement = _agreement(comparison.results, extraction.planted_mask)
    say("done")
    return comparison


class _Runner:
    """Computes each method's features for :func:`compare`; holds what the methods share."""

    def __init__(self, backbone, dataset, extraction, cache_dir, theta, rule, batch_size, calibration, say):
        self.backbone, self.dataset, self.extraction, self.cache_dir = backbone, dataset, extraction, cache_dir
        self.theta, self.rule, self.batch_size, self.calibration, self.say = theta, rule, batch_size, calibration, say
        self.register_neurons: RegisterNeurons | None = None
        self.thetas: dict[str, ThetaDecision] = {}  # per detector: examining the norms takes seconds

    def features(self, method: Method) -> MethodResult:
        extraction = self.extraction
        if method.kind == "original":
            return MethodResult(method, extraction.features_original, attention=extraction.attention_original,
                                seconds_per_image=0.0)
        if method.kind == "itae":
            return self._itae(method)
        if method.kind == "test-time-registers":
            return self._test_time_registers(method)
        return self._trained_registers(method)

    def _theta(self, detector: str) -> ThetaDecision:
        """The θ policy on ``detector``'s norms: the θ asked for on the query norms, else automatic."""
        if detector not in self.thetas:
            info, norms = self.extraction.info, self.extraction.detector_norms(detector)
            query = detector == "query"
            requested = self.theta if query or self.theta == "none" else "auto"
            layout = {"num_prefix_tokens": info.num_prefix_tokens, "grid_size": info.grid_size}
            evidence = examine_norms(norms, **layout, norms_name=f"{detector} norms")
            self.thetas[detector] = decide_theta(requested, norms, **layout, rule=self.rule, evidence=evidence,
                                                 paper_theta=info.default_theta if query else None)
        return self.thetas[detector]

    def _itae(self, method: Method) -> MethodResult:
        variant, extraction = method.variant, self.extraction
        theta = self._theta(variant.detector)
        if theta.value is None:
            mask = np.zeros(extraction.query_norms.shape, dtype=bool)
            return MethodResult(method, extraction.features_original, artifact_mask=mask,
                                attention=extraction.attention_original, theta=theta, seconds_per_image=0.0,
                                note=f"{variant.detector} norms: θ = none, the original features")
        attenuation = engine.Attenuation(variant.attenuation, variant.factor)
        if not variant.needs_earlier_blocks:
            start = time.perf_counter()
            itae = extraction.itae(theta.value, self.rule, detector=variant.detector, attenuation=attenuation)
            seconds = (time.perf_counter() - start) / len(extraction)
            note = "Eq. 5 = Eq. 6 on the final block's CLS output" if variant.rows == "all" else ""
            return MethodResult(method, itae.features, artifact_mask=itae.artifact_mask, attention=itae.attention,
                                theta=theta, seconds_per_image=seconds, note=note)
        mask = extraction.artifact_mask(theta.value, self.rule, variant.detector)
        model = self.backbone.model

        def features(rows: slice, images: torch.Tensor) -> torch.Tensor:
            batch_mask = torch.from_numpy(mask[rows]).to(images.device)
            return engine.attenuated_cls_features(model, images, batch_mask, attenuation, variant.rows, variant.blocks)

        key = {"theta": theta.value, "rule": self.rule}
        features_, seconds = self._second_pass(method, key, features)
        return MethodResult(method, features_, artifact_mask=mask, theta=theta, seconds_per_image=seconds,
                            note=f"re-ran blocks {len(model.blocks) - variant.blocks}-{len(model.blocks) - 1}")

    def _test_time_registers(self, method: Method) -> MethodResult:
        self.say("test-time registers: finding the register neurons (once per model and weights)")
        neurons = calibrated_register_neurons(self.backbone, self.cache_dir, self.calibration, self.batch_size)
        self.register_neurons = neurons
        if not neurons.units:
            return MethodResult(method, self.extraction.features_original, attention=self.extraction.attention_original,
                                seconds_per_image=0.0, note=f"{neurons.describe()}: the original model")
        model = self.backbone.model

        def features(rows: slice, images: torch.Tensor) -> torch.Tensor:
            return features_with_test_time_register(model, images, neurons)

        features_, seconds = self._second_pass(method, {"neurons": neurons.to_json()}, features)
        return MethodResult(method, features_, seconds_per_image=seconds, note=neurons.describe())

    def _trained_registers(self, method: Method) -> MethodResult:
        info = self.extraction.info
        name = trained_registers_model(info.model)
        if name is None:
            return MethodResult(method, None, note=f"the registry has no model with trained registers beside {info.model}")
        self.say(f"trained registers: loading {name}")
        try:
            backbone = load_backbone(name, weights=default_weights(name), device=self.backbone.device)
        except BackboneError as error:
            return MethodResult(method, None, note=f"{name} weights could not be loaded: {error}")
        reg = extract_cached(backbone, self.dataset, self.cache_dir, self.extraction.info.precision,
                             batch_size=self.batch_size)
        if not np.array_equal(reg.indices, self.extraction.indices):
            return MethodResult(method, None, note=f"{name} decoded other images than {info.model}: not comparable")
        return MethodResult(method, reg.features_original, attention=reg.attention_original, note=backbone.label)

    def _second_pass(self, method: Method, setting: dict, features: Callable[[slice, torch.Tensor], torch.Tensor]):
        """Features of every extracted image from one more pass, cached in ``variants/``: (features (N, C), s/image)."""
        extraction = self.extraction
        key = hashlib.sha256(json.dumps({
            "extraction": extraction.info.key, "method": method.identity(), "setting": setting,
            "precision": extraction.info.precision, "version": VARIANTS_VERSION,
        }, sort_keys=True, default=float).encode()).hexdigest()[:20]
        path = self.cache_dir / "variants" / f"{key}.npz"
        if path.is_file():
            try:
                with np.load(path) as file:
                    return file["features"], float(file["seconds_per_image"])
            except (OSError, KeyError, ValueError):
                path.unlink(missing_ok=True)  # unreadable: compute again
        self.say(f"{method.label}: one more pass over {len(extraction):,} images")
        out = np.empty_like(extraction.features_original)
        start = time.perf_counter()
        with torch.inference_mode():
            for rows, images in preprocessed_batches(self.backbone, self.dataset, extraction.indices, self.batch_size):
                with autocast(self.backbone.device, extraction.info.precision):
                    out[rows] = features(rows, images).float().cpu().numpy()
        seconds = (time.perf_counter() - start) / len(extraction)
        with atomic_path(path) as temporary, open(temporary, "wb") as file:
            np.savez(file, features=out, seconds_per_image=np.float64(seconds))
        return out, seconds


def _agreement(results: list[MethodResult], planted: np.ndarray | None) -> DetectorAgreement | None:
    """Jaccard between the artifact sets of the distinct detectors (and the planted set)."""
    masks: dict[str, np.ndarray] = {}
    for result in results:
        if result.method.kind == "itae" and result.artifact_mask is not None:
            masks.setdefault(result.method.variant.detector, result.artifact_mask)
    if planted is not None:
        masks["planted"] = planted
    if len(masks) < 2:
        return None
    names = list(masks)
    jaccard = np.array([[detection_scores(masks[a], masks[b]).jaccard for b in names] for a in names])
    return DetectorAgreement(names, jaccard)
