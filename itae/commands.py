"""The ``itae`` subcommands that compute: extract, eval, compare, sweep, suggest-theta, knn and prepare-demo.

One function per subcommand (``cmd_extract``, ``cmd_eval``, ...) reads the arguments :mod:`itae.cli` parsed.
Results go to stdout; progress bars and warnings go to stderr. :mod:`itae.cli` imports this module only
once a command that needs it was parsed, because torch, timm and scikit-learn take seconds to import.

Every subcommand that needs features goes through ``extract_cached``: a second run with the same model,
weights, data, ``--limit`` and ``--seed`` reads them back from ``--cache-dir`` instead of running the
backbone, and a new θ or rule is recomputed from the cached final block (``Extraction.itae``).

θ is decided by the library's one policy, :func:`itae.theta.decide_theta`, and its reason is printed as is;
``--device`` places the backbone and :func:`itae.devices.kmeans_device` places K-Means. Everything that can
be refused (a θ request, a device, a metric without labels) is refused before any extraction.
"""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from itae import reports
from itae.backbones import Backbone, load_backbone
from itae.checkpoints import demo_weights_file
from itae.choices import SUPERVISED_METRICS, UNSUPERVISED_METRICS
from itae.clustering import clustering_protocol
from itae.compare import compare
from itae.data import SOURCES, ImageDataset, balanced_subset, open_source
from itae.devices import kmeans_device, resolve_device
from itae.errors import ItaeError
from itae.evaluate import knn_classify, stratified_split
from itae.extract import Extraction, ExtractionInfo, extract_cached, precision_path, resolve_precision
from itae.methods import DEFAULT_METHODS, METHODS
from itae.registry import REGISTRY, get_spec
from itae.settings import DEFAULT_MODEL, cache_dir, default_weights
from itae.theta import ArtifactEvidence, ThetaDecision, decide_theta, parse_theta_range, resolve_theta_request, theta_sweep

__all__ = [
    "run", "cmd_compare", "cmd_eval", "cmd_extract", "cmd_knn", "cmd_prepare_demo", "cmd_suggest_theta", "cmd_sweep",
]


def run(name: str, args) -> int:
    """Run the subcommand ``name`` (``"eval"``, ...) on the parsed ``args``; its exit status.

    Raises
    ------
    ItaeError
        Also when the device runs out of memory, with what to change.
    """
    try:
        return COMMANDS[name](args)
    except torch.OutOfMemoryError:
        raise ItaeError("the device ran out of memory; lower --batch-size or use --device cpu") from None


# ---------------------------------------------------------------------------------------------------
# Shared steps: data, model, features, θ


class _Progress:
    """A ``progress(done, total)`` callback drawing a tqdm bar, created on the first call."""

    def __init__(self, description: str, unit: str):
        self.description, self.unit, self.bar, self.calls = description, unit, None, 0

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None:
            self.bar = tqdm(total=total, desc=self.description, unit=self.unit, file=sys.stderr,
                            disable=None, dynamic_ncols=True)
        self.calls += 1
        self.bar.update(done - self.bar.n)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        if self.bar is not None:
            self.bar.close()


def _status(message: str) -> None:
    # Like the progress bars, only on a terminal: piped stderr holds warnings and the one error line.
    if sys.stderr.isatty():
        print(f"itae: {message}", file=sys.stderr)


def _warn(message: str) -> None:
    print(f"itae: warning: {message}", file=sys.stderr)


def _open_data(args, split: str | None = None) -> ImageDataset:
    """The ``--data`` source, cut to the ``--limit`` subset (the same for every subcommand)."""
    labels_csv = str(args.labels_csv) if args.labels_csv is not None else None
    dataset = open_source(args.data, root=args.root, labels_csv=labels_csv,
                          split=split or args.split, download=args.download)
    if args.limit is not None:
        dataset = balanced_subset(dataset, args.limit, seed=args.seed)
    return dataset


def _load_backbone(model: str, weights: str | None, device: str | torch.device | None, planted: bool) -> Backbone:
    weights = weights or default_weights(model)
    _status(f"loading {model} ({weights} weights{', planting artifacts' if planted else ''})")
    return load_backbone(model, weights=weights, device=device, planted=planted)


def _devices(args) -> tuple[torch.device, torch.device]:
    """(backbone device, K-Means device) of ``--device``, ``--backend`` and ``--kmeans-device``, or a refusal."""
    backbone = resolve_device(args.device)
    return backbone, kmeans_device(args.backend, backbone, args.kmeans_device)


def _extract(backbone: Backbone, dataset: ImageDataset, args) -> Extraction:
    """Features of ``dataset``, from the cache when nothing relevant changed."""
    folder = cache_dir(args.cache_dir)
    _status(f"precision: {precision_path(resolve_precision(args.precision, backbone.device), backbone.device)}")
    with _Progress(f"extracting ({backbone.spec.name})", "img") as progress:
        extraction = extract_cached(backbone, dataset, folder, precision=args.precision, batch_size=args.batch_size,
                                    num_workers=args.workers, progress=progress)
    if progress.calls == 0:
        _status(f"features of {len(extraction):,} images read from the cache in {folder}")
    return extraction


def _decision(norms: np.ndarray, info: ExtractionInfo, requested, rule: str,
              evidence: ArtifactEvidence | None = None) -> ThetaDecision:
    """The library's θ policy on ``norms`` (n_images, n_tokens) of ``info``'s layout."""
    return decide_theta(requested, norms, num_prefix_tokens=info.num_prefix_tokens, grid_size=info.grid_size,
                        paper_theta=info.default_theta, rule=rule, evidence=evidence)


def _decide(norms: np.ndarray, info: ExtractionInfo, requested, rule: str) -> ThetaDecision:
    """The θ the command runs with; its warning goes to stderr."""
    decision = _decision(norms, info, requested, rule)
    if decision.warning is not None:
        _warn(decision.warning)
    return decision


def _check_clusterable(dataset: ImageDataset, clusters: int | None) -> int:
    """K; refuses data without labels or ``--clusters``, or with fewer images than clusters, before any model runs."""
    if clusters is None and dataset.labels is None:
        raise ValueError(f"{dataset.description} has no labels: give the number of clusters with --clusters K")
    # The source's classes, not those the subset happens to hold: --limit 5 of 10 classes must fail.
    k = clusters or len(dataset.class_names or np.unique(dataset.labels))
    if len(dataset) < k:
        raise ValueError(f"{len(dataset)} images are fewer than the {k} clusters K-Means needs "
                         f"({dataset.description}); raise --limit to at least {k}")
    return k


def _protocol(features: np.ndarray, labels: np.ndarray | None, n_clusters: int, args, device: torch.device,
              description: str | None = None) -> dict:
    """The clustering protocol of ``--algorithm`` (it L2-normalises) on ``features`` (N, C), K-Means on ``device``:
    ``ClusteringResult.to_dict()``."""
    with _Progress(description or "", "set") as progress:
        result = clustering_protocol(
            features, labels=labels, n_clusters=n_clusters, algorithm=args.algorithm, sets=args.sets,
            runs=args.runs, seed=args.seed, backend=args.backend, device=device,
            progress=progress if description else None,
        )
    return result.to_dict()


def _metrics(protocol: dict) -> dict:
    """The metric summaries of a protocol result: {"acc": {"mean", "std", "se"}, ...}."""
    names = SUPERVISED_METRICS if SUPERVISED_METRICS[0] in protocol else UNSUPERVISED_METRICS
    return {name: protocol[name] for name in names if name in protocol}


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, default=_json_default, ensure_ascii=False) + "\n")


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


# ---------------------------------------------------------------------------------------------------
# Subcommands


def cmd_extract(args) -> int:
    """``itae extract``: original and ITAE features, labels and query norms to one .npz."""
    dataset = _open_data(args)
    backbone = _load_backbone(args.model, args.weights, args.device, args.planted)
    resolve_theta_request(args.theta, backbone.default_theta)
    extraction = _extract(backbone, dataset, args)
    decision = _decide(extraction.query_norms, extraction.info, args.theta, args.rule)
    result = extraction.itae(decision.value, args.rule)
    path = extraction.save(args.out, itae=result, include_cache=args.with_cache)
    where = f"{backbone.device}, {precision_path(extraction.info.precision, backbone.device)}"
    print(reports.extract_summary(extraction, where, decision.reason, path))
    return 0


def cmd_eval(args) -> int:
    """``itae eval``: the K-Means protocol on original and ITAE features, per model."""
    models = args.model or [DEFAULT_MODEL]
    weights = _pair_weights(models, args.weights)
    for model in models:
        resolve_theta_request(args.theta, get_spec(model).default_theta)
    devices = _devices(args)
    dataset = _open_data(args)
    k = _check_clusterable(dataset, args.clusters)
    results = [_evaluate_model(model, model_weights, dataset, k, args, *devices)
               for model, model_weights in zip(models, weights)]
    print()
    print(reports.eval_report(results, args.rule, args.sets, args.runs, args.seed))
    if args.json is not None:
        _write_json(args.json, results[0] if len(results) == 1 else results)
        print(f"\nWrote {args.json}")
    return 0


def _pair_weights(models: list[str], weights: list[str] | None) -> list[str | None]:
    if not weights:
        return [None] * len(models)
    if len(weights) == 1:
        return weights * len(models)
    if len(weights) != len(models):
        raise ValueError(f"give --weights once for all models or once per --model; got {len(weights)} "
                         f"--weights for {len(models)} models")
    return list(weights)


def _evaluate_model(model: str, weights: str | None, dataset: ImageDataset, k: int, args,
                    backbone_device: torch.device, kmeans_on: torch.device) -> dict:
    """One model's row block: the JSON object of ``itae eval --json``."""
    backbone = _load_backbone(model, weights, backbone_device, args.planted)
    extraction = _extract(backbone, dataset, args)
    decision = _decide(extraction.query_norms, extraction.info, args.theta, args.rule)
    print(decision.reason)
    labels = extraction.labels
    original = _protocol(extraction.features_original, labels, k, args, kmeans_on, f"K-Means original ({model})")
    result = extraction.itae(decision.value, args.rule)
    if decision.value is None:
        itae = original  # identical features: the protocol would repeat itself exactly
    else:
        itae = _protocol(result.features, labels, k, args, kmeans_on, f"K-Means ITAE ({model})")
    planted = extraction.planted_mask is not None
    return {
        "model": model,
        "label": extraction.info.label,
        "weights": extraction.info.weights,
        "precision": extraction.info.precision,
        "data": extraction.info.data,
        "n_images": len(extraction),
        "n_skipped": len(extraction.skipped),
        "theta": decision.value,
        "theta_origin": decision.origin,
        "theta_decision": decision.to_dict(),
        "rule": args.rule,
        "algorithm": args.algorithm,
        "sets": args.sets,
        "runs": args.runs,
        "seed": args.seed,
        "backbone_device": str(backbone_device),
        "kmeans_device": str(kmeans_on),
        "n_clusters": k,
        "original": _metrics(original),
        "itae": _metrics(itae),
        "planted_detection": extraction.detection_scores(result.artifact_mask).to_dict() if planted else None,
    }


def cmd_compare(args) -> int:
    """``itae compare``: methods side by side on one model and one dataset, with the same protocol seeds."""
    methods = args.methods or [METHODS[name] for name in DEFAULT_METHODS]
    resolve_theta_request(args.theta, get_spec(args.model).default_theta)
    backbone_device, kmeans_on = _devices(args)
    dataset = _open_data(args)
    k = _check_clusterable(dataset, args.clusters)
    backbone = _load_backbone(args.model, args.weights, backbone_device, args.planted)
    extraction = _extract(backbone, dataset, args)
    comparison = compare(
        backbone, dataset, extraction, methods, cache_dir(args.cache_dir), theta=args.theta, rule=args.rule,
        algorithm=args.algorithm, sets=args.sets, runs=args.runs, seed=args.seed, n_clusters=k,
        backend=args.backend, device=kmeans_on, batch_size=args.batch_size,
        progress=lambda done, total, message: _status(f"[{done}/{total}] {message}"),
    )
    for decision in comparison.thetas.values():
        if decision.warning is not None:
            _warn(decision.warning)
    report = comparison.to_dict()
    print()
    print(reports.compare_report(report))
    if args.json is not None:
        _write_json(args.json, report)
        print(f"\nWrote {args.json}")
    if args.csv is not None:
        rows = reports.compare_rows(report)
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        with open(args.csv, "w", newline="", encoding="utf-8") as file:
            writer = csv.DictWriter(file, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        print(f"Wrote {args.csv}")
    return 0


def cmd_sweep(args) -> int:
    """``itae sweep``: a clustering metric at every θ of a grid (the paper's Fig. 5), from the cached final block."""
    thetas = parse_theta_range(args.thetas)
    backbone_device, kmeans_on = _devices(args)
    dataset = _open_data(args)
    metric = args.metric or (SUPERVISED_METRICS[0] if dataset.labels is not None else UNSUPERVISED_METRICS[0])
    supervised = metric in SUPERVISED_METRICS
    if supervised and dataset.labels is None:
        raise ValueError(f"--metric {metric} scores clusters against labels and {dataset.description} has none; "
                         f"choose --metric {' or '.join(UNSUPERVISED_METRICS)} (with --clusters K)")
    k = _check_clusterable(dataset, args.clusters)
    backbone = _load_backbone(args.model, args.weights, backbone_device, args.planted)
    extraction = _extract(backbone, dataset, args)
    # Unsupervised metrics cluster without the labels: the protocol scores the silhouette only then.
    labels = extraction.labels if supervised else None

    def score(features: np.ndarray) -> dict:
        return _metrics(_protocol(features, labels, k, args, kmeans_on))

    original = score(extraction.features_original)
    settings = {"model": extraction.info.label, "data": extraction.info.data, "n_clusters": k,
                "sets": args.sets, "runs": args.runs, "seed": args.seed}
    with _Progress(f"θ sweep ({args.rule})", "θ") as progress:
        result = theta_sweep(
            extraction.query_norms, lambda theta, rule: extraction.itae(theta, rule).features, score, thetas,
            rule=args.rule, num_prefix_tokens=extraction.info.num_prefix_tokens,
            original_score=original, progress=progress, settings=settings,
        )
    args.out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, png_path = args.out_dir / "sweep.csv", args.out_dir / "sweep.png"
    result.to_csv(csv_path)
    result.plot_png(png_path, metric=metric)
    print(reports.sweep_report(result, metric))
    print(f"\nWrote {csv_path} and {png_path}")
    return 0


def cmd_suggest_theta(args) -> int:
    """``itae suggest-theta``: what the query norms show, θ decided as asked, and an ASCII histogram."""
    dataset = _open_data(args)
    backbone = _load_backbone(args.model, args.weights, args.device, args.planted)
    resolve_theta_request(args.theta, backbone.default_theta)
    extraction = _extract(backbone, dataset, args)
    norms, info = extraction.query_norms, extraction.info
    decision = _decision(norms, info, args.theta, args.rule)  # its warning is part of the report
    # The other requests for comparison: auto, and the paper's θ where the paper gives one.
    others = [request for request in ("auto", "paper") if request != decision.origin
              and (request != "paper" or info.default_theta is not None)]
    decisions = [decision] + [_decision(norms, info, request, args.rule, decision.evidence) for request in others]
    print(reports.verdict_report(decisions, extraction))
    print()
    registers = info.num_registers
    print("\n".join(reports.ascii_histogram(norms[:, 1 + registers:], norms[:, 1:1 + registers], bins=args.bins,
                                            marks=reports.theta_marks(decisions))))
    if args.json is not None:
        _write_json(args.json, {
            "model": args.model, "label": info.label, "weights": info.weights, "data": info.data,
            "n_images": len(extraction), "num_registers": registers, "default_theta": info.default_theta,
            "theta_decision": decision.to_dict(),
        })
        print(f"\nWrote {args.json}")
    return 0


def cmd_knn(args) -> int:
    """``itae knn``: weighted k-NN accuracy with original and ITAE features."""
    if args.data in SOURCES and SOURCES[args.data].has_train_split:
        bank_data, query_data = _open_data(args, split="train"), _open_data(args, split="test")
    else:
        bank_data = query_data = _open_data(args)
    for dataset in (bank_data, query_data):
        if dataset.labels is None:
            raise ValueError(f"k-NN accuracy needs labelled data; {dataset.description} has no labels")
    backbone = _load_backbone(args.model, args.weights, args.device, args.planted)
    resolve_theta_request(args.theta, backbone.default_theta)
    bank = _extract(backbone, bank_data, args)
    queries = bank if query_data is bank_data else _extract(backbone, query_data, args)
    norms = bank.query_norms if queries is bank else np.concatenate([bank.query_norms, queries.query_norms])
    decision = _decide(norms, bank.info, args.theta, args.rule)
    print(decision.reason)
    if queries is bank:
        bank_rows, query_rows = stratified_split(bank.labels, test_fraction=args.test_fraction, seed=args.seed)
    else:
        bank_rows, query_rows = np.arange(len(bank)), np.arange(len(queries))
    accuracy = {}
    for name, features_of in (("original", lambda e: e.features_original),
                              ("itae", lambda e: e.itae(decision.value, args.rule).features)):
        bank_features = features_of(bank)
        query_features = bank_features if queries is bank else features_of(queries)
        accuracy[name] = knn_classify(
            bank_features[bank_rows], bank.labels[bank_rows], query_features[query_rows], queries.labels[query_rows],
            k=args.k, temperature=args.temperature,
        )
    report = {
        "model": args.model, "label": bank.info.label, "weights": bank.info.weights,
        "memory_bank": {"data": bank.info.data, "n_images": len(bank_rows)},
        "queries": {"data": queries.info.data, "n_images": len(query_rows)},
        "k": args.k, "temperature": args.temperature, "theta": decision.value, "rule": args.rule,
        "accuracy": accuracy,
    }
    print()
    print(reports.knn_report(report))
    if args.json is not None:
        _write_json(args.json, report)
        print(f"\nWrote {args.json}")
    return 0


def cmd_prepare_demo(args) -> int:
    """``itae prepare-demo``: convert the offline demo weights once and check the embedded demo data."""
    demo_models = [spec.name for spec in REGISTRY.values() if spec.demo_weights]
    _status("converting the offline demo weights (once; about ten seconds)")
    path = demo_weights_file()
    for model in demo_models:
        backbone = load_backbone(model, weights="demo", device="cpu")
        print(f"demo weights: {path} ({path.stat().st_size / 1e6:.0f} MB) load into {model} as "
              f"{backbone.label!r}")
    for source in (name for name, spec in SOURCES.items() if not spec.needs_root):
        dataset = open_source(source)
        dataset.load(0)
        classes = f", {len(dataset.class_names)} classes" if dataset.class_names else ", no labels"
        print(f"demo data {source!r}: {dataset.description}: {len(dataset):,} images{classes}")
    print(f"demo weights and feature cache live in {path.parent.parent} (set ITAE_CACHE_DIR to move them)")
    print("try: itae eval --data demo --limit 200")
    return 0


COMMANDS = {
    "extract": cmd_extract,
    "eval": cmd_eval,
    "compare": cmd_compare,
    "sweep": cmd_sweep,
    "suggest-theta": cmd_suggest_theta,
    "knn": cmd_knn,
    "prepare-demo": cmd_prepare_demo,
}
"""The subcommands by name, as :mod:`itae.cli` registers them."""
