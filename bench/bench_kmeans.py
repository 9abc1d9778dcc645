"""Figure 3: the paper's K-Means protocol (sets x 25 initialisations, best inertia per set), three ways.

On the same machine and the same data, set by set in rotating order:

- ``ours``: ``itae.evaluate.kmeans(X, K, n_init=25, seed=s, backend="torch", device=...)``;
- ``sklearn``: ``sklearn.cluster.KMeans(K, n_init=25, random_state=s)`` (Lloyd, k-means++, tol 1e-4);
- ``faiss``: ``faiss.Kmeans(D, K, niter=..., nredo=25, seed=s)`` on CPU, every point used
  (``max_points_per_centroid`` raised so faiss does not subsample), bench-only dependency.

Every case runs at one thread per library and at ``--threads`` (default: every core), one after the
other in the same process, and the two are printed side by side. Data: 10,000 L2-normalised vectors
drawn as Gaussian blobs on the sphere (K blobs of unequal size, noise chosen so a point's cosine to
its centre is about 0.7, like real ViT features); with ``--features FILE`` also those features
(a ``.npy`` array or the ``.npz`` of ``itae extract --out``; L2-normalised here), at every K.
Inertia is recomputed from each method's centres the same way for all three. Reported per (data,
K, D, threads): median seconds per set, the speed ratio to scikit-learn (median over sets), and the
mean best inertia as a relative gap to scikit-learn's.
Targets: ours within 0.5 % of scikit-learn's inertia; >= 5x faster on CPU, >= 50x on a GPU.

The paper's protocol is 20 sets; at K = 100, D = 768 scikit-learn takes ~15-50 s per set on 2 cores,
so the default here is 2 sets: the per-set ratio is the figure.

    python bench/bench_kmeans.py                                  # 2 sets, K 10/100, D 384/768, 1 and all threads
    python bench/bench_kmeans.py --threads 1                      # one thread only
    python -m itae extract --data fashion-mnist --out fm.npz      # real features (10,000 images: ~1 h on one loaded core)
    python bench/bench_kmeans.py --features fm.npz --dims --k 10  # those only, K = 10
    python bench/bench_kmeans.py --device cuda --sets 20          # the full protocol, ours on the GPU
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
from pathlib import Path

import numpy as np
import torch
from sklearn.cluster import KMeans
from sklearn.preprocessing import normalize
from threadpoolctl import threadpool_limits

import _common
from itae import evaluate
from itae.evaluate import kmeans

try:
    import faiss
except ImportError:  # bench-only dependency (bench/requirements.txt): the column is left out without it
    faiss = None

N_INIT = 25


def sphere_blobs(n: int, dim: int, k: int, seed: int = 0, cosine: float = 0.7) -> np.ndarray:
    """``n`` unit vectors in ``k`` Gaussian blobs of unequal size on the sphere: float32 (n, dim)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((k, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    sizes = rng.dirichlet(np.full(k, 5.0))
    labels = rng.choice(k, size=n, p=sizes)
    # a noise vector of norm r is nearly orthogonal to the centre: cos = 1 / sqrt(1 + r^2)
    r = np.sqrt(1 / cosine**2 - 1)
    X = centres[labels] + rng.standard_normal((n, dim)) * (r / np.sqrt(dim))
    return (X / np.linalg.norm(X, axis=1, keepdims=True)).astype(np.float32)


def inertia(X: np.ndarray, centres: np.ndarray) -> float:
    """Sum of squared distances of each point of X (n, D) to its nearest centre (k, D), in float64."""
    X64, C64 = X.astype(np.float64), centres.astype(np.float64)
    d2 = (X64**2).sum(1, keepdims=True) - 2 * X64 @ C64.T + (C64**2).sum(1)
    return float(np.maximum(d2.min(1), 0).sum())


@contextlib.contextmanager
def thread_count(threads: int):
    """Run torch, BLAS, OpenMP (scikit-learn) and faiss on ``threads`` threads; restore them afterwards."""
    torch_before = torch.get_num_threads()
    faiss_before = faiss.omp_get_max_threads() if faiss is not None else None
    torch.set_num_threads(threads)
    if faiss is not None:
        faiss.omp_set_num_threads(threads)
    try:
        with threadpool_limits(limits=threads):
            yield
    finally:
        torch.set_num_threads(torch_before)
        if faiss is not None:
            faiss.omp_set_num_threads(faiss_before)


def methods(X: np.ndarray, k: int, device: torch.device, faiss_niter: int) -> dict:
    """name -> callable(seed, n_init) -> centres (k, D)."""

    def ours(seed, n_init=N_INIT):
        return np.asarray(kmeans(X, k, n_init=n_init, seed=seed, backend="torch", device=device).centers_)

    def sklearn(seed, n_init=N_INIT):
        return KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit(X).cluster_centers_

    def faiss_cpu(seed, n_init=N_INIT):
        km = faiss.Kmeans(X.shape[1], k, niter=faiss_niter, nredo=n_init, seed=seed, max_points_per_centroid=len(X))
        km.train(X)
        return km.centroids

    found = {"ours": ours, "sklearn": sklearn}
    if faiss is not None:
        found["faiss"] = faiss_cpu
    return found


def bench_case(X: np.ndarray, k: int, sets: int, device: torch.device, faiss_niter: int) -> dict:
    """Run ``sets`` sets of every method, interleaved; seconds and best inertia per set."""
    runs = methods(X, k, device, faiss_niter)
    for run in runs.values():
        run(seed=1000, n_init=2)  # warm-up: allocations, thread pools, kernels
    names = list(runs)
    seconds = {name: [] for name in names}
    inertias = {name: [] for name in names}
    for s in range(sets):
        shift = s % len(names)
        for name in names[shift:] + names[:shift]:
            centres = []
            seconds[name].append(_common.timed(lambda: centres.append(runs[name](seed=s)), device))
            inertias[name].append(inertia(X, centres[0]))
    base = statistics.mean(inertias["sklearn"])
    return {
        name: {
            "median_s_per_set": statistics.median(seconds[name]),
            "speedup_vs_sklearn": _common.median_ratio(seconds["sklearn"], seconds[name]),
            "mean_inertia": statistics.mean(inertias[name]),
            "inertia_gap_vs_sklearn": statistics.mean(inertias[name]) / base - 1,
        }
        for name in names
    }


def load_features(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """L2-normalised float32 features (n, D) and their labels (n,) or None, from a ``.npy`` array or
    the ``.npz`` that ``itae extract --out`` writes (its ``features_original`` and ``labels``)."""
    if path.suffix == ".npz":
        with np.load(path) as arrays:
            X, labels = arrays["features_original"], arrays["labels"] if "labels" in arrays else None
    else:
        X, labels = np.load(path), None
    return normalize(X).astype(np.float32), labels


def datasets(args) -> list[tuple[str, int, np.ndarray]]:
    """(name, K, X) for every case: the blobs at every D and K, and the given features at every K."""
    cases = [("blobs", k, sphere_blobs(args.n, dim, k)) for dim in args.dims for k in args.k]
    if args.features is not None:
        X, _ = load_features(args.features)
        cases += [(args.features.stem, k, X) for k in args.k]
    return cases


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common.add_device_args(parser, precision=False)
    parser.add_argument("--sets", type=int, default=2, help="sets of 25 initialisations (the paper: 20)")
    parser.add_argument("--n", type=int, default=10_000, help="vectors")
    parser.add_argument("--k", type=int, nargs="+", default=[10, 100])
    parser.add_argument("--dims", type=int, nargs="*", default=[384, 768], help="blob dimensions (none: no blobs)")
    parser.add_argument("--features", type=Path, help="also cluster these features: .npy (n, D), or the .npz of `itae extract`")
    parser.add_argument("--faiss-niter", type=int, default=50, help="faiss Lloyd iterations per initialisation")
    args = parser.parse_args(argv)
    device, _ = _common.resolve(args.device)
    target = 50 if device.type == "cuda" else 5
    all_threads = args.threads or len(os.sched_getaffinity(0))
    thread_counts = sorted({1, all_threads})
    print(_common.machine())
    if faiss is None:
        print("faiss is not installed (pip install -r bench/requirements.txt): its column is left out")
    print(f"{args.sets} set(s) x {N_INIT} initialisations, best inertia per set; ours on {device}; "
          f"threads per library: {' and '.join(map(str, thread_counts))}; ours runs on one thread whatever the "
          f"setting when an E-step is under {evaluate.ONE_THREAD_WORK:,} multiply-adds (n x D x {N_INIT} x K)")
    results = []
    for name, k, X in datasets(args):
        cells = {}
        for threads in thread_counts:
            with thread_count(threads):
                cells[threads] = bench_case(X, k, args.sets, device, args.faiss_niter)
            results.append({"data": name, "k": k, "dim": X.shape[1], "n": len(X), "threads": threads, "methods": cells[threads]})
        print(f"\n{name}  K={k}  D={X.shape[1]}  n={len(X):,}")
        print(f"  {'':<9}" + "".join(f"{f'{t} thread' + ('s' if t > 1 else ''):^36}" for t in thread_counts))
        print(f"  {'method':<9}" + f"{'s/set':>9}{'x sklearn':>11}{'inertia gap':>14}  " * len(thread_counts))
        for method in cells[thread_counts[0]]:
            print(f"  {method:<9}" + "".join(
                f"{row['median_s_per_set']:>9.2f}{row['speedup_vs_sklearn']:>11.2f}{row['inertia_gap_vs_sklearn']:>+14.3%}  "
                for row in (cells[t][method] for t in thread_counts)))
    print(f"\nSummary: ours vs scikit-learn (speed ratio, inertia gap); targets >= {target}x, within +0.5 %")
    for row in results:
        ours = row["methods"]["ours"]
        speed_ok = ours["speedup_vs_sklearn"] >= target
        quality_ok = ours["inertia_gap_vs_sklearn"] <= 0.005
        print(f"  {row['data']:<10} K={row['k']:<4} D={row['dim']:<4} threads {row['threads']}: "
              f"{ours['speedup_vs_sklearn']:6.2f}x {'ok  ' if speed_ok else 'MISS'}  {ours['inertia_gap_vs_sklearn']:+.3%} {'ok' if quality_ok else 'MISS'}")
    out = {"figure": "kmeans", "device": str(device), "sets": args.sets, "n": args.n, "thread_counts": thread_counts,
           "target_speedup": target, "results": results}
    _common.write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()
