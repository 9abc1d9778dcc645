"""Cold UMAP: the wait of a fresh process for its first embedding, before and after the on-disk numba cache.

Each figure is a fresh child process (what a new dashboard server, or a new ``itae`` command, pays) that
imports umap-learn, runs the app's warm-up fit (``compile_umap``: 60 points) and then the first UMAP of
``--images`` random 384-d points (ViT-S/14 width). Three kinds of child, in rotating order:

- ``before``: ``import umap`` as shipped: pynndescent caches part of its numba code (``cache=True``, next to
  its sources), umap-learn caches almost nothing, so every process compiles it again;
- ``after, first ever``: ``itae.embed.import_umap`` with an empty cache folder (``ITAE_CACHE_DIR`` a new
  temporary folder): everything is compiled and written to disk;
- ``after``: the same folder again: what every later process pays.

    python bench/bench_umap_cold.py                # 2 rounds, 1,000 points
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import _common

_CHILD = """
import json, sys, time
sys.path.insert(0, {root!r})
import numpy as np
start = time.perf_counter()
if {cached!r}:
    from itae.embed import import_umap
    umap = import_umap()
else:
    import umap
imported = time.perf_counter()


def fit(points, n_neighbors):  # itae.embed.umap_embedding's call, without its import
    points = points / np.linalg.norm(points, axis=1, keepdims=True)
    return umap.UMAP(n_neighbors=n_neighbors, min_dist=0.1, random_state=0, n_jobs=1).fit_transform(points)


fit(np.random.default_rng(0).normal(size=(60, 8)), 5)  # compile_umap's warm-up fit
compiled = time.perf_counter()
fit(np.random.default_rng(0).normal(size=({n}, 384)), 15)
done = time.perf_counter()
print(json.dumps({{"import": imported - start, "warm-up fit": compiled - imported, "first UMAP": done - compiled,
                  "total": done - start}}))
"""


def child(cached: bool, cache_dir: str, n: int, threads: int | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
    env["ITAE_CACHE_DIR"] = cache_dir
    if threads is not None:
        env["NUMBA_NUM_THREADS"] = env["OMP_NUM_THREADS"] = str(threads)
    code = _CHILD.format(root=str(_common.ROOT), cached=cached, n=n)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.splitlines()[-1])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    print(_common.machine())
    runs: dict[str, list[dict]] = {"before": [], "after, first ever": [], "after": []}
    for r in range(args.rounds):
        with tempfile.TemporaryDirectory() as cache_dir:
            order = ["before", "after, first ever"] if r % 2 == 0 else ["after, first ever", "before"]
            for kind in order:
                runs[kind].append(child(kind != "before", cache_dir, args.images, args.threads))
            runs["after"].append(child(True, cache_dir, args.images, args.threads))
    print(f"\nFresh processes, {args.rounds} rounds (medians), first UMAP of {args.images:,} x 384 points; load average "
          f"{', '.join(f'{v:.1f}' for v in os.getloadavg())}")
    stages = ["import", "warm-up fit", "first UMAP", "total"]
    print(f"  {'':<20}" + "".join(f"{s:>14}" for s in stages))
    medians = {kind: {s: statistics.median(run[s] for run in rows) for s in stages} for kind, rows in runs.items()}
    for kind, row in medians.items():
        print(f"  {kind:<20}" + "".join(f"{row[s]:>13.1f}s" for s in stages))
    ratio = statistics.median(b["total"] / a["total"] for b, a in zip(runs["before"], runs["after"]))
    print(f"  before / after (total, median of rounds): {ratio:.1f}x")
    out = {"figure": "umap_cold", "runs": runs, "medians": medians, "ratio_total": ratio}
    _common.write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()
