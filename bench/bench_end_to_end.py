"""Figure 4: ``itae eval`` end to end on Fashion-MNIST test images, wall time split by stage.

The stages, run in this order on the same images:

1. ``open``: ``open_source("fashion-mnist")`` (reading the IDX files) and the balanced subset;
2. ``decode``: one pass of decoding + preprocessing alone, through the same DataLoader settings
   as the extraction (so the data side is measured on its own);
3. ``extract``: ``itae.extract.extract``, the real pipeline (decoding + backbone);
   ``model`` = extract - decode when ``--workers 0`` (the two run one after the other); with
   workers the decoding overlaps the model and only the extract total is meaningful;
4. ``itae(theta)``: the ITAE features from the final-block cache;
5. ``kmeans original`` / ``kmeans itae``: ``cluster_protocol`` (20 sets x 25 inits by default).

The backbone has timm's random weights with its LayerScale raised to 0.1
(``_common.informative_random``): same cost as the real model, but features that differ from image
to image, so K-Means converges as it does on real features. Each stage is printed with its
seconds, its share of the total and images per second.
Absolute numbers depend on the machine; the shares are the figure.

    python bench/bench_end_to_end.py --device cuda                       # 10,000 images, ViT-B/14, 20x25
    python bench/bench_end_to_end.py --limit 200 --model dinov2_vits14   # a CPU smoke run
    python bench/bench_end_to_end.py --device cuda --root /path/with/idx # where the IDX files are elsewhere
"""
from __future__ import annotations

import argparse
import resource
import time

import numpy as np
import torch
from torch.utils.data import DataLoader

import _common
from itae.backbones import load_backbone
from itae.choices import SUPERVISED_METRICS
from itae.data import balanced_subset, open_source
from itae.evaluate import cluster_protocol, l2_normalize
from itae.extract import extract


class Decoded(torch.utils.data.Dataset):
    """The images of an ImageDataset, decoded and preprocessed: (3, S, S) float tensors."""

    def __init__(self, dataset, preprocess):
        self.dataset, self.preprocess = dataset, preprocess

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.preprocess(self.dataset.load(i))


def decode_pass(dataset, preprocess, batch: int, workers: int) -> None:
    """Decode and preprocess every image once, through a DataLoader shaped like the extraction's."""
    for _ in DataLoader(Decoded(dataset, preprocess), batch_size=batch, num_workers=workers):
        pass


def stage(name: str, fn, stages: dict, device: torch.device):
    """Run ``fn``, record its wall time under ``name``, return its result."""
    box = []
    stages[name] = _common.timed(lambda: box.append(fn()), device)
    return box[0]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common.add_device_args(parser)
    parser.add_argument("--model", default="dinov2_vitb14")
    parser.add_argument("--weights", default="random",
                        help="random (timm's, LayerScale raised: the real cost, informative features) or demo, hub, a file")
    parser.add_argument("--limit", type=int, default=10_000, help="Fashion-MNIST test images (balanced subset)")
    parser.add_argument("--root", default=None, help="folder holding the Fashion-MNIST IDX files (default: Debian's)")
    parser.add_argument("--batch", type=int, default=None, help="default: 256 on CUDA, 32 on CPU")
    parser.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: 8 on CUDA, 0 on CPU)")
    parser.add_argument("--theta", type=float, default=None, help="default: the model's θ, else the median query norm")
    parser.add_argument("--sets", type=int, default=20)
    parser.add_argument("--runs", type=int, default=25)
    args = parser.parse_args(argv)
    device, precision = _common.resolve(args.device, args.precision)
    cuda = device.type == "cuda"
    batch = args.batch or (256 if cuda else 32)
    workers = args.workers if args.workers is not None else (8 if cuda else 0)
    _common.limit_threads(args.threads)
    print(_common.machine())
    backbone = load_backbone(args.model, weights=args.weights, device=device)
    if args.weights == "random":
        _common.informative_random(backbone.model)

    stages: dict[str, float] = {}
    start = time.perf_counter()
    dataset = stage("open", lambda: balanced_subset(open_source("fashion-mnist", root=args.root), args.limit, seed=0), stages, device)
    stage("decode", lambda: decode_pass(dataset, backbone.preprocess, batch, workers), stages, device)
    extraction = stage("extract", lambda: extract(backbone, dataset, batch_size=batch, num_workers=workers, precision=precision), stages, device)
    theta = args.theta if args.theta is not None else backbone.default_theta
    if theta is None:
        theta = float(np.median(extraction.query_norms[:, 1:]))
    result = stage("itae(theta)", lambda: extraction.itae(theta), stages, device)
    protocol = {}
    for name, features in (("original", extraction.features_original), ("itae", result.features)):
        protocol[name] = stage(
            f"kmeans {name}",
            lambda f=features: cluster_protocol(l2_normalize(f), labels=extraction.labels, sets=args.sets, runs=args.runs, seed=0, device=device),
            stages, device,
        ).to_dict()
    total = time.perf_counter() - start

    n = len(extraction)
    print(f"\n{backbone.label}, {n:,} images, {extraction.info.precision}, batch {batch}, "
          f"{workers} workers, K-Means {args.sets} sets x {args.runs} inits, θ = {theta:.3f}")
    rows = {}
    for name, seconds in stages.items():
        rows[name] = seconds
        if name == "extract" and workers == 0:
            rows["  of which model"] = seconds - stages["decode"]
    print(f"  {'stage':<22}{'seconds':>10}{'share':>8}{'img/s':>11}")
    for name, seconds in rows.items():
        print(f"  {name:<22}{seconds:>10.2f}{seconds / total:>8.1%}{n / seconds:>11.1f}")
    print(f"  {'total':<22}{total:>10.2f}{1:>8.0%}{n / total:>11.1f}")
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"  peak resident memory {peak_mib:,.0f} MiB")
    for name, scores in protocol.items():
        print(f"  {name:<9} ACC {scores['acc']['mean']:.3f}  NMI {scores['nmi']['mean']:.3f}  ARI {scores['ari']['mean']:.3f}  ({backbone.label})")
    out = {
        "figure": "end_to_end", "model": args.model, "images": n, "device": str(device), "precision": extraction.info.precision,
        "batch": batch, "workers": workers, "sets": args.sets, "runs": args.runs, "stages_s": rows, "total_s": total, "peak_rss_mib": peak_mib, "weights": args.weights,
        "scores": {name: {m: scores[m]["mean"] for m in SUPERVISED_METRICS} for name, scores in protocol.items()},
    }
    _common.write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()
