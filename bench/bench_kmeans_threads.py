"""Figure 3c: a small K-Means on a busy CPU, one torch thread (the kept policy) against every thread.

The dashboard's θ change re-runs the K-Means of ``cluster_protocol(sets=5, runs=10)`` on a few hundred to a few
thousand features. Each K-Means is thousands of small torch operations, each ending at an OpenMP
barrier; on a shared machine one of the threads is often descheduled and every barrier waits for it.
``itae.evaluate`` therefore runs a K-Means whose E-step is under ``ONE_THREAD_WORK`` multiply-adds on
one thread. This script times that call with the policy ("kept") and with it switched off ("all
threads": ``ONE_THREAD_WORK = 0``), side by side in rotating order, while ``--busy`` other processes
spin on the CPU (0: a quiet machine), and also one large K-Means, which keeps every thread either way.

Data: L2-normalised Gaussian blobs on the sphere (``bench_kmeans.sphere_blobs``), D = 384, or
``--features`` (an ``.npy`` or the ``.npz`` of ``itae extract``).

    python bench/bench_kmeans_threads.py                      # busy 0, 1 and 2; 1,000 and 10,000 samples
    python bench/bench_kmeans_threads.py --features fm.npz    # the first samples of real features
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch

import _common
from bench_kmeans import load_features, sphere_blobs
from itae import evaluate
from itae.evaluate import kmeans

CASES = ((1_000, 10, 5, 10), (10_000, 10, 1, 25))
"""(samples, K, sets, runs): the dashboard's θ change on 1,000 images, and one set of the paper's protocol."""


def spin(seconds: float) -> None:
    """Keep one core busy for ``seconds``."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


def protocol(X: np.ndarray, k: int, sets: int, runs: int, one_thread_work: int) -> None:
    """The K-Means of ``cluster_protocol`` (its scores left out: they take no torch thread)."""
    saved = evaluate.ONE_THREAD_WORK
    evaluate.ONE_THREAD_WORK = one_thread_work
    try:
        for s in range(sets):
            kmeans(X, k, n_init=runs, seed=s, backend="torch", device="cpu")
    finally:
        evaluate.ONE_THREAD_WORK = saved


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--busy", type=int, nargs="+", default=[0, 1, 2], help="spinning processes beside the benchmark")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--features", type=Path, help="real features instead of blobs (.npy, or the .npz of `itae extract`)")
    args = parser.parse_args(argv)
    print(_common.machine())
    print(f"ours at torch's {torch.get_num_threads()} threads; kept policy: one thread under "
          f"{evaluate.ONE_THREAD_WORK:,} multiply-adds per E-step (n x D x runs x K)")
    largest = max(n for n, *_ in CASES)
    X_all = load_features(args.features)[0] if args.features else sphere_blobs(largest, 384, 10)
    for busy in args.busy:
        spinners = [multiprocessing.Process(target=spin, args=(3600,), daemon=True) for _ in range(busy)]
        for process in spinners:
            process.start()
        try:
            for n, k, sets, runs in CASES:
                X = X_all[:n]
                work = n * X.shape[1] * runs * k
                times = _common.time_interleaved(
                    {"kept": lambda: protocol(X, k, sets, runs, evaluate.ONE_THREAD_WORK),
                     "all threads": lambda: protocol(X, k, sets, runs, 0)},
                    torch.device("cpu"), repeats=args.rounds)
                kept, every = (statistics.median(times[name]) for name in ("kept", "all threads"))
                print(f"busy {busy}, n {n:,}, K {k}, {sets} x {runs} (E-step {work / 1e6:,.0f} M, "
                      f"{'one thread' if work < evaluate.ONE_THREAD_WORK else 'every thread'} kept): "
                      f"kept {kept:.3f} s ({min(times['kept']):.3f}..{max(times['kept']):.3f}), "
                      f"all threads {every:.3f} s ({min(times['all threads']):.3f}..{max(times['all threads']):.3f}), "
                      f"all threads / kept {_common.median_ratio(times['all threads'], times['kept']):.2f}x; "
                      f"load average {os.getloadavg()[0]:.2f}", flush=True)
        finally:
            for process in spinners:
                process.terminate()


if __name__ == "__main__":
    main()
