"""The ``itae`` command: extract features, evaluate, compare methods, sweep and suggest θ, k-NN, and the dashboard.

This module parses the command line; the subcommands that compute live in :mod:`itae.commands`, which is
imported only once such a command was parsed: torch, timm and scikit-learn take seconds to import, and
``itae --help`` or a mistyped option should answer at once. A user error (a missing folder, an unknown
model, a bad option, too few images) ends the command with one line on stderr and a non-zero exit
status, never a traceback.
"""
from __future__ import annotations

import argparse
import math
import subprocess
import sys
from pathlib import Path

from itae import __version__, reports
from itae.choices import ALGORITHMS, BACKENDS, METRICS, PRECISIONS, RULES, SPLITS, THETA_WORDS
from itae.data.sources import SOURCES
from itae.errors import USER_ERRORS, BackboneError
from itae.methods import DEFAULT_METHODS, METHODS, Method, parse_method
from itae.registry import REGISTRY, get_spec
from itae.resources import bundled
from itae.settings import CACHE_DIR_VARIABLE, DEFAULT_MODEL

__all__ = ["main", "build_parser"]

STREAMLIT_PORT = 8501


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
    except KeyboardInterrupt:
        return _fail("interrupted", status=130)


def _fail(message: str, status: int = 1) -> int:
    # Library messages may span lines (torchvision's do): one line keeps errors greppable.
    print(f"itae: error: {' '.join(message.split())}", file=sys.stderr)
    return status


def _computed(name: str):
    """The handler of a subcommand of :mod:`itae.commands`, imported when that subcommand runs."""

    def handler(args) -> int:
        from itae import commands

        return commands.run(name, args)

    return handler


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

    def add(name, help, parents=(), handler=None):
        command = commands.add_parser(name, help=help, description=help, parents=list(parents))
        command.set_defaults(handler=handler or _computed(name))
        return command

    command = add("extract", "extract original and ITAE features to an .npz file", [data, _model_options(), theta])
    command.add_argument("--out", type=Path, required=True, metavar="FILE.npz", help="the .npz to write")
    command.add_argument("--with-cache", action="store_true",
                         help="also write the final-block cache (about 0.4 MB per ViT-S image) so that a loaded "
                              "file can recompute features at a new θ")

    command = add("eval", "K-Means clustering, original vs ITAE (the paper's Tables 1 and 2)",
                  [data, _model_options(several=True), theta, protocol])
    command.add_argument("--json", type=Path, metavar="FILE", help="also write the results as JSON")

    command = add("compare", "ITAE, its variants, test-time and trained registers side by side, same seeds",
                  [data, _model_options(), theta, protocol])
    command.add_argument("--methods", type=_methods, default=None, metavar="M,M,...",
                         help=f"comma-separated methods (default {','.join(DEFAULT_METHODS)}); known: "
                         f"{', '.join(METHODS)}; or an ITAE variant written out, e.g. "
                         "itae:detector=value,attenuation=scale,factor=0.5,rows=all,blocks=2. "
                         "--theta applies to the query-norm detector; the other detectors take the automatic θ of their own "
                         "norms (none with --theta none)")
    command.add_argument("--json", type=Path, metavar="FILE", help="also write the comparison as JSON")
    command.add_argument("--csv", type=Path, metavar="FILE", help="also write the table as CSV, one row per method")

    command = add("sweep", "a clustering metric over a θ grid (the paper's Fig. 5)",
                  [data, _model_options(), _protocol_options(sets=5, runs=10)])
    command.add_argument("--thetas", default="1:8:0.25", metavar="START:STOP:STEP|A,B,C",
                         help="the θ grid, a range or a list (default %(default)s)")
    command.add_argument("--metric", choices=METRICS,
                         help="what to plot and rank by (default: acc with labels, else inertia); inertia and "
                         "silhouette cluster without the labels")
    command.add_argument("--rule", choices=RULES, default="below",
                         help="artifact rule; the paper's sweep uses 'below' (default %(default)s)")
    command.add_argument("--out-dir", type=Path, default=Path("."), metavar="DIR",
                         help="where sweep.csv and sweep.png go (default: the current folder)")

    command = add("suggest-theta", "test the query norms for bimodality, suggest θ, draw their histogram",
                  [data, _model_options(), theta])
    command.add_argument("--bins", type=_positive_int, default=30, help="histogram bins (default %(default)s)")
    command.add_argument("--json", type=Path, metavar="FILE", help="also write the verdict as JSON")

    command = add("knn", "weighted k-NN classification accuracy, original vs ITAE", [data, _model_options(), theta])
    command.add_argument("--k", type=_positive_int, default=10, help="neighbours (default %(default)s)")
    command.add_argument("--temperature", type=_positive_float, default=0.07,
                         help="similarity temperature of the vote (default %(default)s)")
    with_train = ", ".join(name for name, source in SOURCES.items() if source.has_train_split)
    command.add_argument("--test-fraction", type=_fraction, default=0.5,
                         help=f"share of the images used as queries, except for {with_train}, whose train split "
                         "is the memory bank and test split the queries (default %(default)s)")
    command.add_argument("--json", type=Path, metavar="FILE", help="also write the results as JSON")

    add("prepare-demo", "convert the offline demo weights once and check the demo data")
    add("models", "list the model registry", handler=cmd_models)
    command = add("sources", "list the built-in data sources", handler=cmd_sources)
    command.add_argument("--markdown", action="store_true", help="as a Markdown table (the README's)")

    command = add("app", "open the dashboard (streamlit run on the installed app)", handler=cmd_app)
    command.add_argument("--port", type=_positive_int, default=STREAMLIT_PORT, help="(default %(default)s)")
    command.add_argument("streamlit_options", nargs="*", metavar="-- OPTION",
                         help="further 'streamlit run' options after --, e.g. -- --server.address 0.0.0.0")
    return parser


def _data_options() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("data")
    group.add_argument("--data", default="demo", metavar="D",
                       help=f"one of {', '.join(SOURCES)} (see 'itae sources'), a folder of images or a .zip "
                       "(default %(default)s)")
    group.add_argument("--root", type=Path, metavar="DIR", help="where the built-in datasets live")
    group.add_argument("--labels-csv", type=Path, metavar="FILE",
                       help="filename,label rows for a folder or zip without class subfolders")
    group.add_argument("--split", choices=SPLITS, default="test", help="(default %(default)s)")
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
    group.add_argument("--model", action="append" if several else "store", type=_model_name,
                       default=None if several else DEFAULT_MODEL, metavar="M",
                       help=f"a registry name (see 'itae models'; default {DEFAULT_MODEL}).{again}")
    group.add_argument("--weights", action="append" if several else "store", metavar="W",
                       help="demo, hub, random or a checkpoint file (default: demo where the model has "
                       "demo weights, else hub)." + (" Once for all models, or once per --model." if several else ""))
    group.add_argument("--planted", action="store_true",
                       help="plant synthetic artifacts whose positions are known (a teaching and testing model; "
                       "every output says so) and score the detection against them")
    group.add_argument("--device", metavar="DEV",
                       help="where the backbone runs: cpu, cuda, cuda:1, mps (default: the best available)")
    group.add_argument("--precision", choices=PRECISIONS, default="auto",
                       help="auto: bf16 autocast on CUDA and on CPUs that compute bf16 natively (AMX, AVX512-BF16), "
                       "float32 elsewhere; bf16 or fp32 force one (default %(default)s)")
    group.add_argument("--batch-size", type=_positive_int, default=32, metavar="N", help="(default %(default)s)")
    group.add_argument("--workers", type=_non_negative_int, default=0, metavar="N",
                       help="decoding processes (default 0)")
    group.add_argument("--cache-dir", type=Path, metavar="DIR",
                       help=f"feature cache (default ${CACHE_DIR_VARIABLE}, else ~/.cache/itae)")
    return parent


def _theta_options() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("ITAE")
    group.add_argument("--theta", type=_theta_value, default="auto", metavar="T|auto|paper|none",
                       help="artifact threshold θ: a number (always used as given), 'auto' (θ only where the "
                       "query norms show artifacts: a few isolated tokens per image, apart from the rest), "
                       "'paper' (the paper's θ for the model) or 'none' (default %(default)s)")
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
    group.add_argument("--backend", choices=BACKENDS, default="auto",
                       help="K-Means implementation (default %(default)s)")
    group.add_argument("--kmeans-device", metavar="DEV",
                       help="where K-Means runs: cpu, cuda, cuda:1 (default: the backbone's device where the "
                       "backend can run there, else cpu; scikit-learn and an MPS backbone mean cpu)")
    group.add_argument("--algorithm", choices=ALGORITHMS, default="kmeans",
                       help="clustering algorithm on the same features; kmeans is the paper's protocol, "
                       "agglomerative and hdbscan are deterministic and run one set (default %(default)s)")
    return parent


def _methods(text: str) -> list[Method]:
    try:
        methods = [parse_method(name) for name in _split_methods(text)]
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    if not methods:
        raise argparse.ArgumentTypeError("name at least one method")
    return methods


def _split_methods(text: str) -> list[str]:
    """Split at the commas between methods, not at those inside an ``itae:a=b,c=d`` variant."""
    names: list[str] = []
    for part in filter(None, (part.strip() for part in text.split(","))):
        if names and names[-1].startswith("itae:") and "=" in part and ":" not in part:
            names[-1] += "," + part
        else:
            names.append(part)
    return names


def _model_name(text: str) -> str:
    try:
        return get_spec(text).name
    except BackboneError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


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
    if text in THETA_WORDS:
        return text
    words = ", ".join(repr(word) for word in THETA_WORDS)
    value = _number(text, float, f"a number or one of {words}")
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number or one of {words}, got {text!r}")
    return value


def _number(text: str, kind: type, what: str):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None


# ---------------------------------------------------------------------------------------------------
# Subcommands that need no model


def cmd_models(args) -> int:
    """``itae models``: the registry as a table."""
    print(reports.models_table(list(REGISTRY.values())))
    print("\ndefault θ: the paper's value (Sec. 4.2), used with --theta paper; none: the paper gives no θ. "
          "Every command decides θ with --theta auto unless told otherwise.")
    return 0


def cmd_sources(args) -> int:
    """``itae sources``: the built-in data sources as a table."""
    sources = list(SOURCES.values())
    print(reports.sources_markdown(sources) if args.markdown else reports.sources_table(sources))
    return 0


def cmd_app(args) -> int:
    """``itae app``: ``streamlit run`` on the dashboard shipped with this installation."""
    script = bundled("app") / "main.py"
    command = [sys.executable, "-m", "streamlit", "run", str(script), "--server.port", str(args.port),
               "--server.headless", "true", "--browser.gatherUsageStats", "false", *args.streamlit_options]
    return subprocess.call(command)
