"""The ``itae`` subcommands that compute: extract, eval, sweep, suggest-theta, knn and prepare-demo.

One function per subcommand (``cmd_extract``, ``cmd_eval``, ...) reads the arguments :mod:`itae.cli` parsed.
Results go to stdout; progress bars and warnings go to stderr. :mod:`itae.cli` imports this module only
once a command that needs it was parsed, because torch, timm and scikit-learn take seconds to import.

Every subcommand that needs features goes through ``extract_cached``: a second run with the same model,
weights, data, ``--limit`` and ``--seed`` reads them back from ``--cache-dir`` instead of running the
backbone, and a new θ or rule is recomputed from the cached final block (``Extraction.itae``).
"""
from __future__ import annotations

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
from itae.data import SOURCES, ImageDataset, balanced_subset, open_source
from itae.errors import ItaeError
from itae.evaluate import cluster_protocol, knn_classify, stratified_split
from itae.extract import Extraction, ItaeResult, extract_cached
from itae.registry import REGISTRY
from itae.settings import DEFAULT_MODEL, cache_dir, default_weights
from itae.theta import ThetaChoice, choose_theta, parse_theta_range, suggest_theta, theta_sweep

__all__ = ["run", "cmd_eval", "cmd_extract", "cmd_knn", "cmd_prepare_demo", "cmd_suggest_theta", "cmd_sweep"]


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


def _load_backbone(model: str, weights: str | None, args) -> Backbone:
    weights = weights or default_weights(model)
    _status(f"loading {model} ({weights} weights{', planting artifacts' if args.planted else ''})")
    return load_backbone(model, weights=weights, device=args.device, planted=args.planted)


def _extract(backbone: Backbone, dataset: ImageDataset, args) -> Extraction:
    """Features of ``dataset``, from the cache when nothing relevant changed."""
    folder = cache_dir(args.cache_dir)
    with _Progress(f"extracting ({backbone.spec.name})", "img") as progress:
        extraction = extract_cached(backbone, dataset, folder, batch_size=args.batch_size,
                                    num_workers=args.workers, progress=progress)
    if progress.calls == 0:
        _status(f"features of {len(extraction):,} images read from the cache in {folder}")
    return extraction


def _theta_line(theta: ThetaChoice, extraction: Extraction, rule: str) -> str:
    """One line saying what θ is used and why; warns when a θ splits a unimodal distribution."""
    if theta.value is None:
        return f"{theta.verdict.message} Reporting θ = none (ITAE = original)."
    origin = reports.THETA_ORIGIN_TEXT[theta.origin]
    fraction, per_image = reports.attenuation(extraction, theta.value, rule)
    line = (f"θ = {theta.value:g} ({origin}), rule {rule}: attenuates {100 * fraction:.2f} % of the "
            f"non-CLS tokens, {per_image:.1f} per image.")
    if theta.verdict.bimodal:
        line += f" {theta.verdict.message}"
        if rule not in ("minority", theta.verdict.minority_side):
            _warn(f"the artifact candidates lie {theta.verdict.minority_side} θ, but --rule {rule} attenuates "
                  f"the tokens on the other side, the majority")
    else:
        _warn(f"the query norms are not bimodal, yet θ = {theta.value:g} is used as asked ({origin}); "
              f"it attenuates {100 * fraction:.1f} % of the non-CLS tokens. {theta.verdict.message}")
    return line


def _itae(extraction: Extraction, theta: ThetaChoice, rule: str) -> ItaeResult:
    """The ITAE features at ``theta``; with no θ, the original features unchanged."""
    if theta.value is None:
        no_artifacts = np.zeros(extraction.query_norms.shape, dtype=bool)
        return ItaeResult(None, rule, extraction.features_original, extraction.attention_original, no_artifacts)
    return extraction.itae(theta.value, rule)


def _check_clusterable(dataset: ImageDataset, clusters: int | None) -> None:
    """Refuse data without labels or ``--clusters``, or with fewer images than clusters, before any model runs."""
    if clusters is None and dataset.labels is None:
        raise ValueError(f"{dataset.description} has no labels: give the number of clusters with --clusters K")
    # The source's classes, not those the subset happens to hold: --limit 5 of 10 classes must fail.
    k = clusters or len(dataset.class_names or np.unique(dataset.labels))
    if len(dataset) < k:
        raise ValueError(f"{len(dataset)} images are fewer than the {k} clusters K-Means needs "
                         f"({dataset.description}); raise --limit to at least {k}")


def _protocol(features: np.ndarray, labels: np.ndarray | None, args, description: str | None = None) -> dict:
    """The K-Means protocol (it L2-normalises) on ``features`` (N, C): ``ProtocolResult.to_dict()``."""
    with _Progress(description or "", "set") as progress:
        result = cluster_protocol(
            features, labels=labels, n_clusters=args.clusters, sets=args.sets, runs=args.runs,
            seed=args.seed, backend=args.backend, device=args.device,
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
    backbone = _load_backbone(args.model, args.weights, args)
    extraction = _extract(backbone, dataset, args)
    theta = choose_theta(extraction.query_norms, args.theta, backbone.default_theta)
    theta_line = _theta_line(theta, extraction, args.rule)
    result = _itae(extraction, theta, args.rule)
    path = extraction.save(args.out, itae=result, include_cache=args.with_cache)
    print(reports.extract_summary(extraction, str(backbone.device), theta_line, path))
    return 0


def cmd_eval(args) -> int:
    """``itae eval``: the K-Means protocol on original and ITAE features, per model."""
    models = args.model or [DEFAULT_MODEL]
    weights = _pair_weights(models, args.weights)
    dataset = _open_data(args)
    _check_clusterable(dataset, args.clusters)
    results = [_evaluate_model(model, model_weights, dataset, args) for model, model_weights in zip(models, weights)]
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


def _evaluate_model(model: str, weights: str | None, dataset: ImageDataset, args) -> dict:
    """One model's row block: the JSON object of ``itae eval --json``."""
    backbone = _load_backbone(model, weights, args)
    extraction = _extract(backbone, dataset, args)
    theta = choose_theta(extraction.query_norms, args.theta, backbone.default_theta)
    print(_theta_line(theta, extraction, args.rule))
    original = _protocol(extraction.features_original, extraction.labels, args, f"K-Means original ({model})")
    result = _itae(extraction, theta, args.rule)
    if theta.value is None:
        itae = original  # identical features: the protocol would repeat itself exactly
    else:
        itae = _protocol(result.features, extraction.labels, args, f"K-Means ITAE ({model})")
    planted = extraction.planted_mask is not None
    return {
        "model": model,
        "label": extraction.info.label,
        "weights": extraction.info.weights,
        "data": extraction.info.data,
        "n_images": len(extraction),
        "n_skipped": len(extraction.skipped),
        "theta": theta.value,
        "theta_origin": reports.THETA_ORIGIN_TEXT[theta.origin],
        "bimodality": theta.verdict.to_dict(),
        "rule": args.rule,
        "sets": args.sets,
        "runs": args.runs,
        "seed": args.seed,
        "n_clusters": original.get("n_clusters"),
        "original": _metrics(original),
        "itae": _metrics(itae),
        "planted_detection": extraction.detection_scores(result.artifact_mask).to_dict() if planted else None,
    }


def cmd_sweep(args) -> int:
    """``itae sweep``: the protocol's ACC at every θ of a grid, from the cached final block."""
    thetas = parse_theta_range(args.thetas)
    dataset = _open_data(args)
    if dataset.labels is None:
        raise ValueError(f"the θ sweep scores clustering ACC and needs labelled data; {dataset.description} "
                         "has no labels")
    _check_clusterable(dataset, args.clusters)
    backbone = _load_backbone(args.model, args.weights, args)
    extraction = _extract(backbone, dataset, args)
    original = _metrics(_protocol(extraction.features_original, extraction.labels, args, "K-Means original"))

    def score(features: np.ndarray) -> dict:
        return _metrics(_protocol(features, extraction.labels, args))

    with _Progress(f"θ sweep ({args.rule})", "θ") as progress:
        result = theta_sweep(
            extraction.query_norms, lambda theta, rule: extraction.itae(theta, rule).features, score, thetas,
            rule=args.rule, num_prefix_tokens=extraction.info.num_prefix_tokens,
            original_score=original, progress=progress,
        )
    args.out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, png_path = args.out_dir / "sweep.csv", args.out_dir / "sweep.png"
    result.to_csv(csv_path)
    result.plot_png(png_path, metric="acc")
    print(reports.sweep_report(result, extraction, args.sets, args.runs))
    print(f"\nWrote {csv_path} and {png_path}")
    return 0


def cmd_suggest_theta(args) -> int:
    """``itae suggest-theta``: the bimodality verdict and an ASCII histogram of the query norms."""
    dataset = _open_data(args)
    backbone = _load_backbone(args.model, args.weights, args)
    extraction = _extract(backbone, dataset, args)
    norms = extraction.query_norms
    verdict = suggest_theta(norms[:, 1:])
    registers = extraction.info.num_registers
    marks = {}
    if verdict.theta is not None:
        marks[verdict.theta] = f"suggested θ = {verdict.theta:.2f}"
    others = {"paper": backbone.default_theta, "given": args.theta}
    for origin, value in others.items():
        if isinstance(value, float) and value != verdict.theta:
            marks[value] = f"θ = {value:g} ({reports.THETA_ORIGIN_TEXT[origin]})"
    print(reports.verdict_report(verdict, extraction, marks, args.rule))
    print()
    print("\n".join(reports.ascii_histogram(norms[:, 1 + registers:], norms[:, 1:1 + registers], bins=args.bins,
                                            marks=marks)))
    if args.json is not None:
        _write_json(args.json, {
            "model": args.model, "label": extraction.info.label, "weights": extraction.info.weights,
            "data": extraction.info.data, "n_images": len(extraction), "num_registers": registers,
            "default_theta": backbone.default_theta, "verdict": verdict.to_dict(),
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
    backbone = _load_backbone(args.model, args.weights, args)
    bank = _extract(backbone, bank_data, args)
    queries = bank if query_data is bank_data else _extract(backbone, query_data, args)
    norms = bank.query_norms if queries is bank else np.concatenate([bank.query_norms, queries.query_norms])
    theta = choose_theta(norms, args.theta, backbone.default_theta)
    print(_theta_line(theta, bank, args.rule))
    if queries is bank:
        bank_rows, query_rows = stratified_split(bank.labels, test_fraction=args.test_fraction, seed=args.seed)
    else:
        bank_rows, query_rows = np.arange(len(bank)), np.arange(len(queries))
    accuracy = {}
    for name, features_of in (("original", lambda e: e.features_original),
                              ("itae", lambda e: _itae(e, theta, args.rule).features)):
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
        "k": args.k, "temperature": args.temperature, "theta": theta.value, "rule": args.rule,
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
    "sweep": cmd_sweep,
    "suggest-theta": cmd_suggest_theta,
    "knn": cmd_knn,
    "prepare-demo": cmd_prepare_demo,
}
"""The subcommands by name, as :mod:`itae.cli` registers them."""
