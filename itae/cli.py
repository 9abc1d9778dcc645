"""The ``itae`` command: extract features, evaluate, sweep and suggest θ, and k-NN, from a terminal.

One function per subcommand (``cmd_extract``, ``cmd_eval``, ...) reads the parsed arguments. Results go
to stdout; progress bars and warnings go to stderr. A user error (a missing folder, an unknown model, a
bad option, too few images) ends the command with one line on stderr and a non-zero exit status, never
a traceback.

Every subcommand that needs features goes through ``extract_cached``: a second run with the same model,
weights, data, ``--limit`` and ``--seed`` reads them back from ``--cache-dir`` instead of running the
backbone, and a new θ or rule is recomputed from the cached final block (``Extraction.itae``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from itae import __version__
from itae.backbones import REGISTRY, Backbone, BackboneError, get_spec, load_backbone
from itae.checkpoints import CheckpointError, demo_weights_file
from itae.data import SOURCES, DataSourceError, ImageDataset, balanced_subset, open_source
from itae.engine import RULES
from itae.evaluate import cluster_protocol, knn_classify, stratified_split
from itae.extract import Extraction, ItaeResult, StaleCacheError, extract_cached
from itae.theta import BimodalityVerdict, SweepResult, parse_theta_range, suggest_theta, theta_sweep

__all__ = ["main", "build_parser", "ascii_histogram"]

DEFAULT_MODEL = "dinov2_vits14"
KNN_SPLIT_SOURCES = ("cifar10", "cifar100", "stl10")
SUPERVISED_METRICS = ("acc", "nmi", "ari")
UNSUPERVISED_METRICS = ("inertia", "silhouette")
# Checking a given θ against the distribution only decides whether to warn; 50,000 norms keep that
# to about a second, where suggest_theta's full 200,000 take five.
CHECK_SAMPLES = 50_000
USER_ERRORS = (DataSourceError, BackboneError, CheckpointError, StaleCacheError, ValueError, OSError)


# ---------------------------------------------------------------------------------------------------
# Entry point


def main(argv: list[str] | None = None) -> int:
    """Run the ``itae`` command.

    Parameters
    ----------
    argv : list of str, optional
        The arguments after the program name; default ``sys.argv[1:]``.

    Returns
    -------
    int
        The exit status: 0 on success, 1 for a user error, 2 for a malformed command line,
        130 when interrupted.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # --help, --version, or a malformed command line (already reported)
        return int(stop.code or 0)
    try:
        return args.handler(args)
    except USER_ERRORS as error:
        return _fail(str(error))
    except torch.OutOfMemoryError:
        return _fail("the device ran out of memory; lower --batch-size or use --device cpu")
    except KeyboardInterrupt:
        return _fail("interrupted", status=130)


def _fail(message: str, status: int = 1) -> int:
    # Library messages may span lines (torchvision's do): one line keeps errors greppable.
    print(f"itae: error: {' '.join(message.split())}", file=sys.stderr)
    return status


# ---------------------------------------------------------------------------------------------------
# Command line


class _Parser(argparse.ArgumentParser):
    """argparse, reporting a malformed command line in one line like every other error."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``itae`` and its subcommands; each subcommand sets ``handler``."""
    parser = _Parser(
        prog="itae",
        description="Inference-Time Attention Engineering (Nakamura et al.): find and attenuate ViT "
        "artifact tokens, and measure what it does to zero-shot clustering.",
    )
    parser.add_argument("--version", action="version", version=f"itae {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    data, theta, protocol = _data_options(), _theta_options(), _protocol_options()

    def add(name, handler, help, parents=()):
        command = commands.add_parser(name, help=help, description=help, parents=list(parents))
        command.set_defaults(handler=handler)
        return command

    command = add("extract", cmd_extract, "extract original and ITAE features to an .npz file",
                  [data, _model_options(), theta])
    command.add_argument("--out", type=Path, required=True, metavar="FILE.npz", help="the .npz to write")
    command.add_argument("--with-cache", action="store_true",
                         help="also write the final-block cache (about 0.4 MB per ViT-S image) so that a loaded "
                              "file can recompute features at a new θ")

    command = add("eval", cmd_eval, "K-Means clustering, original vs ITAE (the paper's Tables 1 and 2)",
                  [data, _model_options(several=True), theta, protocol])
    command.add_argument("--json", type=Path, metavar="FILE", help="also write the results as JSON")

    command = add("sweep", cmd_sweep, "clustering ACC over a θ grid (the paper's Fig. 5)",
                  [data, _model_options(), _protocol_options(sets=5, runs=10)])
    command.add_argument("--thetas", default="1:8:0.25", metavar="START:STOP:STEP",
                         help="the θ grid (default %(default)s)")
    command.add_argument("--rule", choices=RULES, default="below",
                         help="artifact rule; the paper's sweep uses 'below' (default %(default)s)")
    command.add_argument("--out-dir", type=Path, default=Path("."), metavar="DIR",
                         help="where sweep.csv and sweep.png go (default: the current folder)")

    command = add("suggest-theta", cmd_suggest_theta,
                  "test the query norms for bimodality, suggest θ, draw their histogram",
                  [data, _model_options(), theta])
    command.add_argument("--bins", type=_positive_int, default=30, help="histogram bins (default %(default)s)")
    command.add_argument("--json", type=Path, metavar="FILE", help="also write the verdict as JSON")

    command = add("knn", cmd_knn, "weighted k-NN classification accuracy, original vs ITAE",
                  [data, _model_options(), theta])
    command.add_argument("--k", type=_positive_int, default=10, help="neighbours (default %(default)s)")
    command.add_argument("--temperature", type=_positive_float, default=0.07,
                         help="similarity temperature of the vote (default %(default)s)")
    command.add_argument("--test-fraction", type=_fraction, default=0.5,
                         help=f"share of the images used as queries, except for {', '.join(KNN_SPLIT_SOURCES)} "
                         "whose train split is the memory bank and test split the queries (default %(default)s)")
    command.add_argument("--json", type=Path, metavar="FILE", help="also write the results as JSON")

    add("prepare-demo", cmd_prepare_demo, "convert the offline demo weights once and check the demo data")
    add("models", cmd_models, "list the model registry")
    return parser


def _data_options() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("data")
    group.add_argument("--data", default="demo", metavar="D",
                       help=f"one of {', '.join(SOURCES)}, a folder of images or a .zip (default %(default)s)")
    group.add_argument("--root", type=Path, metavar="DIR", help="where the built-in datasets live")
    group.add_argument("--labels-csv", type=Path, metavar="FILE",
                       help="filename,label rows for a folder or zip without class subfolders")
    group.add_argument("--split", choices=("test", "train"), default="test", help="(default %(default)s)")
    group.add_argument("--download", action="store_true", help="let torchvision download the dataset")
    group.add_argument("--limit", type=_positive_int, metavar="N",
                       help="a class-balanced random subset of N images, the same for every subcommand")
    group.add_argument("--seed", type=_non_negative_int, default=0,
                       help="seeds --limit and K-Means (default %(default)s)")
    return parent


def _model_options(several: bool = False) -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("model")
    again = " Give it several times to compare models." if several else ""
    group.add_argument("--model", action="append" if several else "store", metavar="M",
                       help=f"a registry name (see 'itae models'; default {DEFAULT_MODEL}).{again}")
    group.add_argument("--weights", action="append" if several else "store", metavar="W",
                       help="demo, hub, random or a checkpoint file (default: demo where the model has "
                       "demo weights, else hub)." + (" Once for all models, or once per --model." if several else ""))
    group.add_argument("--device", metavar="DEV", help="cpu, cuda, cuda:1, mps (default: the best available)")
    group.add_argument("--batch-size", type=_positive_int, default=32, metavar="N", help="(default %(default)s)")
    group.add_argument("--workers", type=_non_negative_int, default=0, metavar="N",
                       help="decoding processes (default 0)")
    group.add_argument("--cache-dir", type=Path, metavar="DIR",
                       help="feature cache (default $ITAE_CACHE_DIR, else ~/.cache/itae)")
    return parent


def _theta_options() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("ITAE")
    group.add_argument("--theta", type=_theta_value, metavar="T|auto",
                       help="artifact threshold θ, or 'auto' to test the query norms for bimodality "
                       "(default: the model's θ from the paper, else auto)")
    group.add_argument("--rule", choices=RULES, default="minority",
                       help="which side of θ is attenuated; 'minority' is the paper's Eq. 3 (default %(default)s)")
    return parent


def _protocol_options(sets: int = 20, runs: int = 25) -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("K-Means protocol")
    group.add_argument("--sets", type=_positive_int, default=sets, metavar="N",
                       help="independent sets (default %(default)s)")
    group.add_argument("--runs", type=_positive_int, default=runs, metavar="N",
                       help="K-Means initialisations per set, best inertia kept (default %(default)s)")
    group.add_argument("--clusters", type=_positive_int, metavar="K",
                       help="number of clusters (default: the number of classes; needed without labels)")
    group.add_argument("--backend", choices=("auto", "torch", "sklearn"), default="auto",
                       help="K-Means implementation (default %(default)s)")
    return parent


def _positive_int(text: str) -> int:
    value = _number(text, int, "a whole number")
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    value = _number(text, int, "a whole number")
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    value = _number(text, float, "a number")
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


def _fraction(text: str) -> float:
    value = _number(text, float, "a number")
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must lie strictly between 0 and 1, got {text!r}")
    return value


def _theta_value(text: str) -> float | str:
    if text == "auto":
        return text
    value = _number(text, float, "a number or 'auto'")
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number or 'auto', got {text!r}")
    return value


def _number(text: str, kind: type, what: str):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None


# ---------------------------------------------------------------------------------------------------
# Shared steps: data, model, features, θ


@dataclass
class _Theta:
    """The θ a run uses and why.

    Attributes
    ----------
    value : float or None
        None means no attenuation: the ITAE features are the original features.
    origin : "--theta", "the paper's θ for this model" or "auto"
    verdict : the bimodality test of the query norms
    """

    value: float | None
    origin: str
    verdict: BimodalityVerdict


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


def _cache_dir(args) -> Path:
    if args.cache_dir is not None:
        return args.cache_dir.expanduser()
    return Path(os.environ.get("ITAE_CACHE_DIR") or Path.home() / ".cache" / "itae").expanduser()


def _open_data(args, split: str | None = None) -> ImageDataset:
    """The ``--data`` source, cut to the ``--limit`` subset (the same for every subcommand)."""
    labels_csv = str(args.labels_csv) if args.labels_csv is not None else None
    dataset = open_source(args.data, root=args.root, labels_csv=labels_csv,
                          split=split or args.split, download=args.download)
    if args.limit is not None:
        dataset = balanced_subset(dataset, args.limit, seed=args.seed)
    return dataset


def _default_weights(model: str) -> str:
    return "demo" if get_spec(model).demo_weights else "hub"


def _load_backbone(model: str, weights: str | None, args) -> Backbone:
    weights = weights or _default_weights(model)
    _status(f"loading {model} ({weights} weights)")
    return load_backbone(model, weights=weights, device=args.device)


def _extract(backbone: Backbone, dataset: ImageDataset, args) -> Extraction:
    """Features of ``dataset``, from the cache when nothing relevant changed."""
    cache_dir = _cache_dir(args)
    with _Progress(f"extracting ({backbone.spec.name})", "img") as progress:
        extraction = extract_cached(backbone, dataset, cache_dir, batch_size=args.batch_size,
                                    num_workers=args.workers, progress=progress)
    if progress.calls == 0:
        _status(f"features of {len(extraction):,} images read from the cache in {cache_dir}")
    return extraction


def _choose_theta(requested: float | str | None, norms: np.ndarray, default: float | None) -> _Theta:
    """Resolve ``--theta`` against the query norms ``norms`` of shape (N, T), CLS in column 0."""
    candidates = norms[:, 1:]
    if requested == "auto" or (requested is None and default is None):
        verdict = suggest_theta(candidates)
        return _Theta(verdict.theta, "auto", verdict)
    value, origin = (default, "the paper's θ for this model") if requested is None else (requested, "--theta")
    return _Theta(float(value), origin, suggest_theta(candidates, max_samples=CHECK_SAMPLES))


def _attenuation(extraction: Extraction, theta: float, rule: str) -> tuple[float, float]:
    """(fraction of non-CLS tokens, tokens per image) that ``theta`` and ``rule`` attenuate."""
    mask = extraction.artifact_mask(theta, rule)[:, 1:]
    return float(mask.mean()), float(mask.sum(axis=1).mean())


def _theta_line(theta: _Theta, extraction: Extraction, rule: str) -> str:
    """One line saying what θ is used and why; warns when a θ splits a unimodal distribution."""
    if theta.value is None:
        return f"{theta.verdict.message} Reporting θ = none (ITAE = original)."
    fraction, per_image = _attenuation(extraction, theta.value, rule)
    line = (f"θ = {theta.value:g} ({theta.origin}), rule {rule}: attenuates {100 * fraction:.2f} % of the "
            f"non-CLS tokens, {per_image:.1f} per image.")
    if theta.verdict.bimodal:
        line += f" {theta.verdict.message}"
        if rule not in ("minority", theta.verdict.minority_side):
            _warn(f"the artifact candidates lie {theta.verdict.minority_side} θ, but --rule {rule} attenuates "
                  f"the tokens on the other side, the majority")
    else:
        _warn(f"the query norms are not bimodal, yet θ = {theta.value:g} is used as asked ({theta.origin}); "
              f"it attenuates {100 * fraction:.1f} % of the non-CLS tokens. {theta.verdict.message}")
    return line


def _itae(extraction: Extraction, theta: _Theta, rule: str) -> ItaeResult:
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
    names = SUPERVISED_METRICS if "acc" in protocol else UNSUPERVISED_METRICS
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


def _table(rows: list[list[str]], right: set[int] = frozenset()) -> str:
    """Align ``rows`` (the first is the header) in columns; indices in ``right`` are right-aligned."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(cell.rjust(w) if i in right else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths)))
        for row in rows
    ]
    return "\n".join(line.rstrip() for line in lines)


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}"


def _plain(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def _theta_text(theta: float | None) -> str:
    return "none" if theta is None else f"{theta:g}"


# ---------------------------------------------------------------------------------------------------
# Subcommands


def cmd_extract(args) -> int:
    """``itae extract``: original and ITAE features, labels and query norms to one .npz."""
    get_spec(args.model or DEFAULT_MODEL)
    dataset = _open_data(args)
    backbone = _load_backbone(args.model or DEFAULT_MODEL, args.weights, args)
    extraction = _extract(backbone, dataset, args)
    theta = _choose_theta(args.theta, extraction.query_norms, backbone.default_theta)
    theta_line = _theta_line(theta, extraction, args.rule)
    result = _itae(extraction, theta, args.rule)
    path = extraction.save(args.out, itae=result, include_cache=args.with_cache)
    print(_extract_summary(extraction, backbone, theta_line, path))
    return 0


def _extract_summary(extraction: Extraction, backbone: Backbone, theta_line: str, path: Path) -> str:
    meta = extraction.meta
    rows, cols = meta["grid_size"]
    n_tokens = extraction.query_norms.shape[1]
    skipped = extraction.skipped
    reasons = "".join(f" {s.name}: {s.reason};" for s in skipped[:5]).rstrip(";")
    more = f" ... and {len(skipped) - 5} more" if len(skipped) > 5 else ""
    labels = "" if extraction.labels is not None else ", no labels"
    return (
        f"Extracted {len(extraction):,} images ({meta['data']}{labels}) with {meta['label']} "
        f"[weights {meta['weights']}] on {backbone.device}. "
        f"Skipped {len(skipped)}{':' + reasons + more if skipped else ''}. "
        f"Each image gives a {extraction.features_original.shape[1]}-d CLS feature and {n_tokens} tokens "
        f"(CLS, {meta['num_registers']} registers, {rows}×{cols} patches). {theta_line} "
        f"Wrote {path} ({path.stat().st_size / 1e6:.1f} MB): features_original, features_itae, "
        f"{'labels, ' if extraction.labels is not None else ''}query_norms, artifact_mask, attention and "
        f"the final-block cache."
    )


def cmd_eval(args) -> int:
    """``itae eval``: the K-Means protocol on original and ITAE features, per model."""
    models = args.model or [DEFAULT_MODEL]
    weights = _pair_weights(models, args.weights)
    for model in models:
        get_spec(model)  # a typo fails here, before any data is opened
    dataset = _open_data(args)
    _check_clusterable(dataset, args.clusters)
    reports = [_evaluate_model(model, model_weights, dataset, args) for model, model_weights in zip(models, weights)]
    print()
    print(_eval_table(reports, args))
    if args.json is not None:
        _write_json(args.json, reports[0] if len(reports) == 1 else reports)
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
    theta = _choose_theta(args.theta, extraction.query_norms, backbone.default_theta)
    print(_theta_line(theta, extraction, args.rule))
    original = _protocol(extraction.features_original, extraction.labels, args, f"K-Means original ({model})")
    if theta.value is None:
        itae = original  # identical features: the protocol would repeat itself exactly
    else:
        features = _itae(extraction, theta, args.rule).features
        itae = _protocol(features, extraction.labels, args, f"K-Means ITAE ({model})")
    return {
        "model": model,
        "label": extraction.meta["label"],
        "weights": extraction.meta["weights"],
        "data": extraction.meta["data"],
        "n_images": len(extraction),
        "n_skipped": len(extraction.skipped),
        "theta": theta.value,
        "theta_origin": theta.origin,
        "bimodality": theta.verdict.to_dict(),
        "rule": args.rule,
        "sets": args.sets,
        "runs": args.runs,
        "seed": args.seed,
        "n_clusters": original.get("n_clusters"),
        "original": _metrics(original),
        "itae": _metrics(itae),
    }


def _delta(before: float | None, after: float | None, scale) -> str:
    if before is None or after is None:
        return "n/a"
    return ("+" if after >= before else "-") + scale(abs(after - before))


def _eval_table(reports: list[dict], args) -> str:
    first = reports[0]
    rows = [["model", "θ", "metric", "original", "ITAE", "Δ"]]
    for report in reports:
        label = report["label"]
        theta = _theta_text(report["theta"])
        for name, original in report["original"].items():
            itae = report["itae"][name]
            scale = _percent if name in SUPERVISED_METRICS else _plain
            rows.append([label, theta, name.upper() if name in SUPERVISED_METRICS else name,
                         f"{scale(original['mean'])} ± {scale(original['se'])}",
                         f"{scale(itae['mean'])} ± {scale(itae['se'])}",
                         _delta(original["mean"], itae["mean"], scale)])
            label = theta = ""
    header = [
        f"Zero-shot K-Means clustering, original vs ITAE (rule {args.rule})",
        f"data:   {first['data']}",
        f"images: {first['n_images']:,} used ({first['n_skipped']} skipped); K = {first['n_clusters']}; "
        f"{args.sets} sets × {args.runs} K-Means runs (seed {args.seed})",
    ]
    percent = " (ACC, NMI, ARI in %)" if "acc" in first["original"] else ""
    footer = [f"mean ± SE over the {args.sets} sets{percent}; SE = std / √{args.sets}; --json also gives the std."]
    if any(report["theta"] is None for report in reports):
        footer.append("θ = none: the query norms are not bimodal, nothing is attenuated, ITAE = original.")
    return "\n".join([*header, "", _table(rows, right={3, 4, 5}), "", *footer])


def cmd_sweep(args) -> int:
    """``itae sweep``: the protocol's ACC at every θ of a grid, from the cached final block."""
    thetas = parse_theta_range(args.thetas)
    model = args.model or DEFAULT_MODEL
    get_spec(model)
    dataset = _open_data(args)
    if dataset.labels is None:
        raise ValueError(f"the θ sweep scores clustering ACC and needs labelled data; {dataset.description} "
                         "has no labels")
    _check_clusterable(dataset, args.clusters)
    backbone = _load_backbone(model, args.weights, args)
    extraction = _extract(backbone, dataset, args)
    original = _metrics(_protocol(extraction.features_original, extraction.labels, args, "K-Means original"))

    def score(features: np.ndarray) -> dict:
        return _metrics(_protocol(features, extraction.labels, args))

    with _Progress(f"θ sweep ({args.rule})", "θ") as progress:
        result = theta_sweep(
            extraction.query_norms, lambda theta, rule: extraction.itae(theta, rule).features, score, thetas,
            rule=args.rule, num_prefix_tokens=extraction.meta["num_prefix_tokens"],
            original_score=original, progress=progress,
        )
    args.out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, png_path = args.out_dir / "sweep.csv", args.out_dir / "sweep.png"
    result.to_csv(csv_path)
    result.plot_png(png_path, metric="acc")
    print(_sweep_report(result, extraction, args))
    print(f"\nWrote {csv_path} and {png_path}")
    return 0


def _sweep_report(result: SweepResult, extraction: Extraction, args) -> str:
    original = result.original
    rows = [["θ", "attenuated %", "per image", "ACC", "Δ vs original"]]
    for row in result.rows:
        rows.append([f"{row['theta']:g}", f"{100 * row['artifact_fraction']:.2f}",
                     f"{row['mean_artifacts_per_image']:.1f}",
                     f"{_percent(row['acc_mean'])} ± {_percent(row.get('acc_se'))}",
                     f"{100 * (row['acc_mean'] - original['acc_mean']):+.2f}"])
    best = max(result.rows, key=lambda row: row["acc_mean"])
    return "\n".join([
        f"θ sweep (the paper's Fig. 5), rule {result.rule}: {extraction.meta['label']} on {extraction.meta['data']}, "
        f"{len(extraction):,} images, {args.sets} sets × {args.runs} runs",
        f"original ACC {_percent(original['acc_mean'])} ± {_percent(original.get('acc_se'))}",
        "",
        _table(rows, right={0, 1, 2, 3, 4}),
        "",
        f"best: ACC {_percent(best['acc_mean'])} ± {_percent(best.get('acc_se'))} at θ = {best['theta']:g} "
        f"(ACC in %, mean ± SE over the {args.sets} sets)",
    ])


def cmd_suggest_theta(args) -> int:
    """``itae suggest-theta``: the bimodality verdict and an ASCII histogram of the query norms."""
    model = args.model or DEFAULT_MODEL
    get_spec(model)
    dataset = _open_data(args)
    backbone = _load_backbone(model, args.weights, args)
    extraction = _extract(backbone, dataset, args)
    norms = extraction.query_norms
    verdict = suggest_theta(norms[:, 1:])
    registers = extraction.meta["num_registers"]
    marks = {}
    if verdict.theta is not None:
        marks[verdict.theta] = f"suggested θ = {verdict.theta:.2f}"
    others = {"the paper's θ for this model": backbone.default_theta, "--theta": args.theta}
    for origin, value in others.items():
        if isinstance(value, float) and value != verdict.theta:
            marks[value] = f"θ = {value:g} ({origin})"
    print(_verdict_report(verdict, extraction, marks, args.rule))
    print()
    print("\n".join(ascii_histogram(norms[:, 1 + registers:], norms[:, 1:1 + registers], bins=args.bins,
                                    marks=marks)))
    if args.json is not None:
        _write_json(args.json, {
            "model": model, "label": extraction.meta["label"], "weights": extraction.meta["weights"],
            "data": extraction.meta["data"], "n_images": len(extraction), "num_registers": registers,
            "default_theta": backbone.default_theta, "verdict": verdict.to_dict(),
        })
        print(f"\nWrote {args.json}")
    return 0


def _verdict_report(verdict: BimodalityVerdict, extraction: Extraction, marks: dict, rule: str) -> str:
    n_images, n_tokens = extraction.query_norms.shape
    lines = [
        f"{extraction.meta['label']} on {extraction.meta['data']}: query norms of {n_images * (n_tokens - 1):,} "
        f"non-CLS tokens ({n_images:,} images × {n_tokens - 1})",
        f"bimodal: {'yes' if verdict.bimodal else 'no'}   θ: {_theta_text(verdict.theta)}   "
        f"strength (valley depth): {verdict.strength:.2f}   Ashman's D: {verdict.ashman_d:.2f}   "
        f"ΔBIC: {verdict.delta_bic:.1f}",
    ]
    if verdict.bimodal:
        lines.append(f"minority: {100 * verdict.minority_fraction:.2f} % of the tokens, {verdict.minority_side} θ")
    lines.append(verdict.message)
    registers = extraction.meta["num_registers"]
    for theta, text in sorted(marks.items()):
        fraction, per_image = _attenuation(extraction, theta, rule)
        line = f"{text}, rule {rule}: attenuates {100 * fraction:.2f} % of the tokens, {per_image:.1f} per image"
        if registers:
            mask = extraction.artifact_mask(theta, rule)[:, 1:1 + registers]
            line += f" ({mask.sum(axis=1).mean():.2f} of the {registers} registers)"
        lines.append(line)
    return "\n".join(lines)


def ascii_histogram(patch_norms, register_norms=None, bins: int = 30, width: int = 50,
                    marks: dict[float, str] | None = None) -> list[str]:
    """A horizontal histogram of query norms for a terminal, registers stacked apart.

    Parameters
    ----------
    patch_norms : array-like, any shape
        Query norms of the patch tokens.
    register_norms : array-like, any shape, optional
        Query norms of the register tokens, drawn with ``R`` after the patches' ``#``.
    bins : int
        Number of equal-width bins over the range of all norms.
    width : int
        Characters of the longest bar.
    marks : dict of float to str, optional
        Values (θ) to mark with a line of text between the bins around them.

    Returns
    -------
    list of str, one per line
    """
    patches = np.asarray(patch_norms, dtype=np.float64).ravel()
    registers = np.asarray(register_norms if register_norms is not None else [], dtype=np.float64).ravel()
    edges = np.histogram_bin_edges(np.concatenate([patches, registers]), bins=bins)
    patch_counts, _ = np.histogram(patches, edges)
    register_counts, _ = np.histogram(registers, edges)
    scale = width / max(int((patch_counts + register_counts).max()), 1)
    pending = sorted((marks or {}).items())
    legend = "# patch tokens" + (", R register tokens" if registers.size else "")
    lines = [f"{'query norm':>17} | {legend}"]
    for low, high, n_patches, n_registers in zip(edges[:-1], edges[1:], patch_counts, register_counts):
        while pending and pending[0][0] < (low + high) / 2:
            lines.append(f"{'':>17} +--- {pending.pop(0)[1]} ---")
        bar = _bar(n_patches, scale, "#") + _bar(n_registers, scale, "R")
        count = f"{n_patches + n_registers:,}" + (f" ({n_registers:,} R)" if n_registers else "")
        lines.append(f"{low:8.3f}-{high:<8.3f} | {bar:<{width}} {count}")
    lines += [f"{'':>17} +--- {text} ---" for _, text in pending]
    return lines


def _bar(count: int, scale: float, char: str) -> str:
    # A non-empty bin always shows: a few artifacts among 10^5 tokens is exactly what one looks for.
    return char * (max(1, round(count * scale)) if count else 0)


def cmd_knn(args) -> int:
    """``itae knn``: weighted k-NN accuracy with original and ITAE features."""
    model = args.model or DEFAULT_MODEL
    get_spec(model)
    if args.data in KNN_SPLIT_SOURCES:
        bank_data, query_data = _open_data(args, split="train"), _open_data(args, split="test")
    else:
        bank_data = query_data = _open_data(args)
    for dataset in (bank_data, query_data):
        if dataset.labels is None:
            raise ValueError(f"k-NN accuracy needs labelled data; {dataset.description} has no labels")
    backbone = _load_backbone(model, args.weights, args)
    bank = _extract(backbone, bank_data, args)
    queries = bank if query_data is bank_data else _extract(backbone, query_data, args)
    norms = bank.query_norms if queries is bank else np.concatenate([bank.query_norms, queries.query_norms])
    theta = _choose_theta(args.theta, norms, backbone.default_theta)
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
        "model": model, "label": bank.meta["label"], "weights": bank.meta["weights"],
        "memory_bank": {"data": bank.meta["data"], "n_images": len(bank_rows)},
        "queries": {"data": queries.meta["data"], "n_images": len(query_rows)},
        "k": args.k, "temperature": args.temperature, "theta": theta.value, "rule": args.rule,
        "accuracy": accuracy,
    }
    print()
    print(_knn_table(report))
    if args.json is not None:
        _write_json(args.json, report)
        print(f"\nWrote {args.json}")
    return 0


def _knn_table(report: dict) -> str:
    bank, queries, accuracy = report["memory_bank"], report["queries"], report["accuracy"]
    rows = [["model", "θ", "original", "ITAE", "Δ"],
            [report["label"], _theta_text(report["theta"]), _percent(accuracy["original"]),
             _percent(accuracy["itae"]), f"{100 * (accuracy['itae'] - accuracy['original']):+.2f}"]]
    return "\n".join([
        f"k-NN classification (k = {report['k']}, temperature {report['temperature']:g}, rule {report['rule']}), "
        "accuracy in %",
        f"memory bank: {bank['data']}, {bank['n_images']:,} images; queries: {queries['data']}, "
        f"{queries['n_images']:,} images",
        "",
        _table(rows, right={2, 3, 4}),
    ])


def cmd_prepare_demo(args) -> int:
    """``itae prepare-demo``: convert the offline demo weights once and check the embedded demo data."""
    demo_models = [spec.name for spec in REGISTRY.values() if spec.demo_weights]
    _status("converting the offline demo weights (once; about ten seconds)")
    path = demo_weights_file()
    for model in demo_models:
        backbone = load_backbone(model, weights="demo", device="cpu")
        print(f"demo weights: {path} ({path.stat().st_size / 1e6:.0f} MB) load into {model} as "
              f"{backbone.label!r}")
    for source in ("demo", "demo-photos"):
        dataset = open_source(source)
        dataset.load(0)
        classes = f", {len(dataset.class_names)} classes" if dataset.class_names else ", no labels"
        print(f"demo data {source!r}: {dataset.description}: {len(dataset):,} images{classes}")
    print(f"demo weights and feature cache live in {path.parent.parent} (set ITAE_CACHE_DIR to move them)")
    print("try: itae eval --data demo --limit 200")
    return 0


def cmd_models(args) -> int:
    """``itae models``: the registry as a table."""
    rows = [["name", "timm id", "registers", "default θ", "demo weights", "label"]]
    for spec in REGISTRY.values():
        rows.append([spec.name, spec.timm_id, str(spec.num_registers),
                     "none" if spec.default_theta is None else f"{spec.default_theta:g}",
                     "yes" if spec.demo_weights else "no", spec.label])
    print(_table(rows, right={2}))
    print("\ndefault θ: the paper's value (Sec. 4.2); none: no θ given there, so 'auto' tests the norms "
          "for bimodality.")
    return 0
