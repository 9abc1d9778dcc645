"""Figure 7: each method of ``itae compare``, its time per image as a ratio to the plain forward pass.

Two tables, each measured side by side in one run (interleaved rounds, median of per-round ratios):

1. **At inference** (images -> CLS features), on one batch of real demo images through the planted
   teaching model (demo weights, or ``--weights random``): ``plain`` (``model.forward_features``), ITAE as
   the paper has it, its attenuations (``remove``, ``mean``, ``scale``), the key-norm and output-norm
   detectors (the output norm needs every token's output of the final block, which ITAE otherwise skips),
   ITAE in the last 2 blocks (Eq. 6 and Eq. 5: the second re-computes every row's logits explicitly), and
   test-time registers with the register neurons the calibration found (one extra token through every block).
   Ratio = variant time / plain time: 1.10 means 10 % slower than the plain model.
2. **From the final-block cache** (what ``itae compare`` does for the final-block variants): ``Extraction.itae``
   per image, as a fraction of the plain forward pass per image.

The calibration of the test-time registers (once per model and weights, then cached) is timed once, apart.

    python bench/bench_methods.py                          # CPU, ViT-S/14 demo weights, 16 images
    python bench/bench_methods.py --device cuda --batch 256 --model dinov2_vitb14 --weights random
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

import _common
from itae import engine
from itae.backbones import load_backbone
from itae.data import balanced_subset, open_source
from itae.extract import extract
from itae.registers import calibrated_register_neurons, features_with_test_time_register
from itae.theta import decide_theta


def inference_variants(backbone, x, theta: dict, neurons) -> dict:
    """name -> callable(images) -> CLS features, for every method of the comparison that runs at inference."""
    model = backbone.model

    def itae(detector="query", attenuation="min", factor=0.1, rows="cls", blocks=1):
        return lambda images: engine.cls_features(model, images, theta[detector], "minority", detector=detector,
                                                  attenuation=engine.Attenuation(attenuation, factor), rows=rows,
                                                  blocks=blocks)

    return {
        "plain": lambda images: model.forward_features(images)[:, 0],
        "itae (paper)": itae(),
        "itae remove": itae(attenuation="remove"),
        "itae mean": itae(attenuation="mean"),
        "itae scale 0.1": itae(attenuation="scale"),
        "key-norm": itae(detector="key"),
        "output-norm": itae(detector="output"),
        "last 2 blocks, Eq. 6": itae(blocks=2),
        "last 2 blocks, Eq. 5": itae(rows="all", blocks=2),
        "test-time registers": lambda images: features_with_test_time_register(model, images, neurons),
    }


def ratios(times: dict) -> dict:
    rows = {}
    for name, seconds in times.items():
        per_round = [v / p for p, v in zip(times["plain"], seconds)]
        rows[name] = {"median_s": statistics.median(seconds), "ratio_to_plain": statistics.median(per_round),
                      "ratio_range": [min(per_round), max(per_round)]}
    return rows


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common.add_device_args(parser)
    parser.add_argument("--model", default="dinov2_vits14")
    parser.add_argument("--weights", default="demo", help="demo (ViT-S/14 only) or random")
    parser.add_argument("--batch", type=int, default=None, help="images (default: 16 on CPU, 256 on CUDA)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args(argv)
    device, precision = _common.resolve(args.device, args.precision)
    batch = args.batch or (256 if device.type == "cuda" else 16)
    _common.limit_threads(args.threads)
    print(_common.machine())
    backbone = load_backbone(args.model, weights=args.weights, device=device, planted=True)
    dataset = balanced_subset(open_source("demo"), batch, seed=4)
    with tempfile.TemporaryDirectory() as cache:
        start = time.perf_counter()
        neurons = calibrated_register_neurons(backbone, cache)
        calibration_s = time.perf_counter() - start
    extraction = extract(backbone, dataset, batch_size=batch, precision=precision)
    layout = {"num_prefix_tokens": extraction.info.num_prefix_tokens, "grid_size": extraction.info.grid_size}
    theta = {detector: decide_theta("auto", extraction.detector_norms(detector), **layout).value
             for detector in ("query", "key", "output")}
    if None in theta.values():
        raise SystemExit(f"the θ policy attenuates nothing for a detector ({theta}): its timing would be the plain model's")
    x = torch.stack([backbone.preprocess(dataset.load(i)) for i in range(len(dataset))]).to(device)

    def timed(fn):
        def call():
            with torch.inference_mode(), _common.autocast(device, precision):
                return fn(x)
        return call

    variants = inference_variants(backbone, x, theta, neurons)
    inference = ratios(_common.time_interleaved({n: timed(f) for n, f in variants.items()}, device, args.repeats, args.warmup))
    plain_s = inference["plain"]["median_s"]
    print(f"\n{backbone.label}, {batch} demo images, {precision}; θ (auto): "
          + ", ".join(f"{d} {t:.3g}" for d, t in theta.items()) + f"; {neurons.describe()}")
    print(f"\nAt inference ({args.repeats} interleaved rounds): time per image as a ratio to the plain forward pass")
    print(f"  {'method':<24}{'median s':>10}{'ms/img':>9}{'ratio':>8}{'rounds min..max':>17}")
    for name, row in inference.items():
        low, high = row["ratio_range"]
        print(f"  {name:<24}{row['median_s']:>10.3f}{1000 * row['median_s'] / batch:>9.1f}{row['ratio_to_plain']:>8.3f}"
              f"{low:>10.3f}..{high:.3f}")

    cached_variants = {
        f"{detector} / {kind}": (lambda d=detector, k=kind: extraction.itae(theta[d], detector=d, attenuation=engine.Attenuation(k)))
        for detector in ("query", "key", "output") for kind in ("min", "remove", "mean", "scale")
    }
    cached = _common.time_interleaved(cached_variants, device, args.repeats, args.warmup)
    print("\nFrom the final-block cache (Extraction.itae): time per image as a fraction of the plain forward pass")
    cached_rows = {}
    for name, seconds in cached.items():
        median = statistics.median(seconds)
        cached_rows[name] = {"median_s": median, "fraction_of_plain": median / plain_s}
        print(f"  {name:<24}{median:>10.4f} s{1000 * median / batch:>9.3f} ms/img{median / plain_s:>10.4f} of plain")
    print(f"\nTest-time register calibration, once per model and weights: {calibration_s:.1f} s "
          f"({neurons.calibration_images} images, {calibration_s / plain_s * batch / neurons.calibration_images:.2f} "
          "plain forward passes per calibration image)")
    out = {"figure": "methods", "device": str(device), "model": args.model, "weights": args.weights, "batch": batch,
           "precision": precision, "repeats": args.repeats, "theta": theta, "register_neurons": neurons.to_json(),
           "inference": inference, "cached": cached_rows, "calibration_s": calibration_s}
    _common.write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()
