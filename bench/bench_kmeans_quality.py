"""Figure 3b: does pruning hopeless initialisations change the protocol's results? Over many sets.

``itae.evaluate.kmeans(backend="torch")`` drops a run that is far behind the best and closing in too
slowly (``itae/evaluate.py``, "Hopeless initialisations"). That is a heuristic, so this script runs
the protocol's sets (set ``s`` seeded by word ``s`` of ``SeedSequence(0)``, 25 k-means++ runs, best
inertia kept) three ways on the same data, on one thread:

- ``pruned``: the module as it is;
- ``unpruned``: the same code with ``PRUNE_GAP = inf`` (every run goes to convergence);
- ``sklearn``: ``sklearn.cluster.KMeans(n_init=25)``.

and prints, per data set and K: the best inertia of pruned vs unpruned set by set (mean, worst, how
many sets identical to 1e-12), the mean best inertia of both vs scikit-learn's with the spread
between sets, ACC and NMI when labels are given, and CPU seconds per set. Data: Gaussian blobs on the
sphere (as ``bench_kmeans.py``), overlapping clusters of very unequal sizes, and ``--features FILE``
(the ``.npz`` of ``itae extract --out`` with its labels, or a ``.npy`` with ``--labels FILE.npy``).

    python bench/bench_kmeans_quality.py                                 # blobs, overlapping; 20 sets
    python -m itae extract --data fashion-mnist --out fm.npz
    python bench/bench_kmeans_quality.py --dims --features fm.npz        # real features, ACC and NMI too
"""
from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.preprocessing import normalize
from threadpoolctl import threadpool_limits

import _common
from bench_kmeans import load_features, sphere_blobs
from itae import evaluate
from itae.evaluate import clustering_scores

VARIANTS = ("pruned", "unpruned", "sklearn")


def overlapping(n: int, dim: int, k: int, seed: int = 0) -> np.ndarray:
    """``n`` unit vectors in ``k`` overlapping clusters of very unequal size: float32 (n, dim).

    The centres are scaled to 0.35 of the noise's norm (a point's cosine to its centre is ~0.33),
    and the sizes are Dirichlet(0.7): Lloyd takes tens of iterations and the runs end close together.
    """
    rng = np.random.default_rng(seed)
    centres = normalize(rng.standard_normal((k, dim)))
    labels = rng.choice(k, size=n, p=rng.dirichlet(np.full(k, 0.7)))
    X = 0.35 * centres[labels] + rng.standard_normal((n, dim)) / np.sqrt(dim)
    return normalize(X).astype(np.float32)


def run_sets(X, k, seeds, labels) -> dict:
    """variant -> {"inertia", "acc", "nmi", "cpu_s"}, one entry per set."""
    out = {}
    gap = evaluate.PRUNE_GAP
    try:
        for variant in VARIANTS:
            evaluate.PRUNE_GAP = math.inf if variant == "unpruned" else gap
            rows = {"inertia": [], "acc": [], "nmi": [], "cpu_s": []}
            for seed in seeds:
                start = time.process_time()
                backend = "sklearn" if variant == "sklearn" else "torch"
                result = evaluate.kmeans(X, k, n_init=25, seed=seed, backend=backend, device="cpu")
                rows["cpu_s"].append(time.process_time() - start)
                rows["inertia"].append(result.inertia_)
                if labels is not None:
                    scores = clustering_scores(labels, result.labels_)
                    rows["acc"].append(scores["acc"])
                    rows["nmi"].append(scores["nmi"])
            out[variant] = rows
    finally:
        evaluate.PRUNE_GAP = gap
    return out


def report(name: str, k: int, out: dict) -> None:
    pruned, unpruned, ref = (np.asarray(out[v]["inertia"]) for v in VARIANTS)
    rel = pruned / unpruned - 1
    spread = lambda x: x.std(ddof=1) / x.mean() if len(x) > 1 else math.nan  # noqa: E731
    print(f"\n{name}  K={k}  ({len(pruned)} sets)")
    print(f"  pruned vs unpruned, set by set: mean {rel.mean():+.4%}, worst {rel.max():+.4%}, "
          f"identical (1e-12) in {int(np.sum(np.abs(rel) <= 1e-12))} of {len(rel)}")
    print(f"  mean best inertia vs scikit-learn: pruned {pruned.mean() / ref.mean() - 1:+.4%}, "
          f"unpruned {unpruned.mean() / ref.mean() - 1:+.4%}; worst set (pruned) {pruned.max() / ref.mean() - 1:+.4%}")
    print(f"  spread of the best inertia between sets: ours {spread(pruned):.4%}, scikit-learn {spread(ref):.4%}")
    if out["pruned"]["acc"]:
        for metric in ("acc", "nmi"):
            cells = []
            for v in VARIANTS:
                values = out[v][metric]
                se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else math.nan
                cells.append(f"{v} {statistics.mean(values):.4f} ± {se:.4f}")
            print(f"  {metric.upper()} (mean ± s.e.): " + ", ".join(cells))
    print("  CPU s per set: " + ", ".join(f"{v} {statistics.median(out[v]['cpu_s']):.3f}" for v in VARIANTS))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", type=int, default=20, help="protocol sets per case (the paper: 20)")
    parser.add_argument("--n", type=int, default=10_000, help="vectors of the synthetic data")
    parser.add_argument("--k", type=int, nargs="+", default=[10, 100])
    parser.add_argument("--dims", type=int, nargs="*", default=[384], help="synthetic dimensions (none: no synthetic data)")
    parser.add_argument("--features", type=Path, help="also these features: .npy (n, D), or the .npz of `itae extract`")
    parser.add_argument("--labels", type=Path, help="class labels (.npy of shape (n,)) for ACC and NMI; an .npz brings its own")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(_common.machine())
    seeds = [int(s) for s in np.random.SeedSequence(0).generate_state(args.sets)]
    cases = [(f"{kind} D={dim}", k, make(args.n, dim, k), None)
             for dim in args.dims for kind, make in (("blobs", sphere_blobs), ("overlapping", overlapping)) for k in args.k]
    if args.features is not None:
        X, labels = load_features(args.features)
        labels = np.load(args.labels) if args.labels is not None else labels
        cases += [(args.features.stem, k, X, labels) for k in args.k]
    results = []
    with threadpool_limits(limits=1):
        for name, k, X, labels in cases:
            out = run_sets(X, k, seeds, labels)
            report(name, k, out)
            results.append({"data": name, "k": k, "n": len(X), "dim": X.shape[1], **out})
    out = {"figure": "kmeans_quality", "sets": args.sets, "prune": {"gap": evaluate.PRUNE_GAP,
           "horizon": evaluate.PRUNE_HORIZON}, "results": results}
    _common.write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()
