"""Figure 6: dashboard responsiveness, each step as a ratio to the first extraction of the same images.

In one fresh process, on a class-balanced subset of N images of the embedded demo set (1,000 Fashion-MNIST test
images) with the offline demo ViT-S/14 (``load_backbone("dinov2_vits14", "demo")``), the steps the
dashboard runs, in its order and with its calls:

1. ``first extraction``: ``extract`` of the N images (the denominator of every ratio);
2. ``θ change``: ``extraction.itae(theta)`` + ``cluster_protocol(l2_normalize(features), labels,
   sets=5, runs=10)`` (the Metrics page's fast defaults), median of ``--repeats`` changes of θ;
3. ``UMAP compile``: the app's warm-up, ``itae.embed.compile_umap`` (numba compiles here, or reads its
   compilation from the disk cache: see ``bench_umap_cold.py``);
4. ``first UMAP``: ``itae.embed.umap_embedding`` (n_neighbors 15, min_dist 0.1, seed 0) on the N features;
5. ``next UMAP``: the same on the ITAE features, compiled already.

Default N = 300 on CPU (1,000 takes ~2 min to extract on 2 cores; ``--images 1000`` for the issue's N).

    python bench/bench_dashboard.py                  # 300 demo images, CPU
    python bench/bench_dashboard.py --images 1000
"""
from __future__ import annotations

import argparse
import statistics

import numpy as np

import _common
from itae.backbones import load_backbone
from itae.data import balanced_subset, open_source
from itae.embed import compile_umap, umap_embedding
from itae.evaluate import cluster_protocol, l2_normalize
from itae.extract import extract


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common.add_device_args(parser)
    parser.add_argument("--images", type=int, default=300, help="demo images, class-balanced (the demo holds 1,000)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="θ changes timed")
    args = parser.parse_args(argv)
    device, precision = _common.resolve(args.device, args.precision)
    _common.limit_threads(args.threads)
    print(_common.machine())
    backbone = load_backbone("dinov2_vits14", "demo", device=device)
    dataset = balanced_subset(open_source("demo"), args.images, seed=0)

    steps: dict[str, float] = {}
    box = []
    steps["first extraction"] = _common.timed(
        lambda: box.append(extract(backbone, dataset, batch_size=args.batch, precision=precision)), device
    )
    extraction = box[0]
    norms = extraction.query_norms[:, 1:]
    thetas = np.quantile(norms, np.linspace(0.2, 0.8, args.repeats))

    def theta_change(theta: float):
        features = extraction.itae(float(theta)).features
        return cluster_protocol(l2_normalize(features), labels=extraction.labels, sets=5, runs=10, seed=0, device=device)

    changes = [_common.timed(lambda t=t: theta_change(t), device) for t in thetas]
    steps["θ change (itae + 5x10 K-Means)"] = statistics.median(changes)
    steps["  of which itae(theta)"] = statistics.median(
        _common.timed(lambda t=t: extraction.itae(float(t)), device) for t in thetas
    )
    steps["UMAP compile (app warm-up)"] = _common.timed(compile_umap, device)
    steps["first UMAP"] = _common.timed(lambda: umap_embedding(extraction.features_original), device)
    steps["next UMAP"] = _common.timed(lambda: umap_embedding(extraction.itae(float(thetas[0])).features), device)

    first = steps["first extraction"]
    print(f"\ndemo ViT-S/14 ({backbone.label}), {len(extraction):,} demo images, {extraction.info.precision}, batch {args.batch}")
    print(f"  {'step':<34}{'seconds':>9}{'ratio to first extraction':>28}")
    for name, seconds in steps.items():
        print(f"  {name:<34}{seconds:>9.3f}{seconds / first:>28.4f}")
    out = {"figure": "dashboard", "images": len(extraction), "device": str(device), "steps_s": steps,
           "ratios": {name: s / first for name, s in steps.items()}}
    _common.write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()
