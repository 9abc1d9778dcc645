"""Figure 2: features at a new θ from the final-block cache, as a ratio to extracting the images again.

Times, interleaved, on the same images and backbone:

- ``itae(theta)``: ``Extraction.itae(theta)``, recomputed from the cache, no backbone run;
- ``re-extract``: ``itae.extract.extract`` again (decoding + preprocessing + backbone);
- ``forward``: ``cls_features(model, x, theta)`` on the already preprocessed images (backbone only).

The backbone has timm's random weights with LayerScale raised to 0.1 (``_common.informative_random``)
so that features and query norms differ between images. Checks that the cached features equal a full forward pass at the same θ (max abs diff, tolerance
1e-4) at three θ (the 10th, 50th and 90th percentile of the non-CLS query norms), and prints the
cache's memory per image and per 10,000 images for ViT-S/B/L/g, from the models' shapes.
Target: ``re-extract / itae(theta)`` >= 100.

    python bench/bench_theta_change.py                      # 64 Fashion-MNIST images, ViT-S/14, CPU
    python bench/bench_theta_change.py --device cuda --images 1024 --model dinov2_vitb14
"""
from __future__ import annotations

import argparse
import statistics

import numpy as np
import timm
import torch

import _common
from itae.backbones import REGISTRY, load_backbone
from itae.data import balanced_subset, open_source
from itae.engine import cls_features
from itae.extract import SPILL_BYTES, extract

TOLERANCE = {"fp32": 1e-4, "bf16": 5e-2}  # bf16 keeps 8 mantissa bits: ~0.4 % of a feature of size ~10
GIB = 1024**3


def cache_bytes(name: str) -> dict:
    """Bytes per image of the final-block cache (and of everything an Extraction keeps), from shapes.

    The model is built on the meta device: no memory, no weights, any size.
    """
    spec = REGISTRY[name]
    with torch.device("meta"):
        model = timm.create_model(spec.timm_id, pretrained=False, img_size=spec.img_size)
    attn = model.blocks[-1].attn
    T, H, d, C = model.patch_embed.num_patches + model.num_prefix_tokens, attn.num_heads, attn.head_dim, model.embed_dim
    rest = C * 4 + H * T * 4  # cls_input, cls_logits: always float32
    stored = C * 4 + 2 * T * 4 + H * T * 4  # features, query and output norms, attention
    return {
        "model": name, "T": T, "H": H, "C": C,
        "cache_fp32": H * T * d * 4 + rest,
        "cache_bf16": H * T * d * 2 + rest,
        "values_fp32": H * T * d * 4,
        "values_bf16": H * T * d * 2,
        "other_arrays": stored,
    }


def memory_table(names: list[str]) -> list[dict]:
    rows = [cache_bytes(name) for name in names]
    print(f"\nFinal-block cache per image and per 10,000 images (224 px; values spill to a memory-mapped file above {SPILL_BYTES / GIB:.0f} GiB)")
    print(f"  {'model':<20}{'T':>5}{'fp32 KiB/img':>14}{'fp32 GiB/10k':>14}{'bf16 KiB/img':>14}{'bf16 GiB/10k':>14}"
          f"{'spill from (fp32)':>19}{'other KiB/img':>15}")
    for r in rows:
        spill_from = SPILL_BYTES // r["values_fp32"] + 1
        print(f"  {r['model']:<20}{r['T']:>5}{r['cache_fp32'] / 1024:>14.1f}{r['cache_fp32'] * 1e4 / GIB:>14.2f}"
              f"{r['cache_bf16'] / 1024:>14.1f}{r['cache_bf16'] * 1e4 / GIB:>14.2f}{spill_from:>19,}{r['other_arrays'] / 1024:>15.1f}")
        r["spill_from_images_fp32"] = spill_from
        r["spill_from_images_bf16"] = SPILL_BYTES // r["values_bf16"] + 1
    return rows


def check_equal(extraction, backbone, dataset, precision: str) -> list[dict]:
    """Cached features vs a full forward pass, at three θ spread over the observed norms."""
    device = backbone.device
    x = torch.stack([backbone.preprocess(dataset.load(int(i))) for i in extraction.indices]).to(device)
    checks = []
    for q in (0.1, 0.5, 0.9):
        theta = float(np.quantile(extraction.query_norms[:, 1:], q))
        cached = extraction.itae(theta)
        with _common.autocast(device, precision):
            full = cls_features(backbone.model, x, theta).float().cpu().numpy()
        diff = float(np.abs(cached.features - full).max())
        moved = float(np.abs(cached.features - extraction.features_original).max())  # ITAE did change something
        checks.append({"quantile": q, "theta": theta, "max_abs_diff": diff, "ok": diff <= TOLERANCE[precision],
                       "max_abs_change_vs_original": moved, "artifact_fraction": float(cached.artifact_mask[:, 1:].mean())})
    return checks


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common.add_device_args(parser)
    parser.add_argument("--model", default="dinov2_vits14")
    parser.add_argument("--images", type=int, default=64, help="Fashion-MNIST test images (balanced subset)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--root", default=None, help="folder holding the Fashion-MNIST IDX files (default: Debian's)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    device, precision = _common.resolve(args.device, args.precision)
    _common.limit_threads(args.threads)
    print(_common.machine())
    backbone = load_backbone(args.model, weights="random", device=device)
    _common.informative_random(backbone.model)
    dataset = balanced_subset(open_source("fashion-mnist", root=args.root), args.images, seed=0)
    extraction = extract(backbone, dataset, batch_size=args.batch, precision=precision)
    precision = extraction.info.precision  # extract runs bf16 on CUDA only
    theta = float(np.median(extraction.query_norms[:, 1:]))
    x = torch.stack([backbone.preprocess(dataset.load(i)) for i in range(len(dataset))]).to(device)

    def forward():
        with torch.inference_mode(), _common.autocast(device, precision):
            for start in range(0, len(x), args.batch):
                cls_features(backbone.model, x[start:start + args.batch], theta)

    variants = {
        "itae(theta)": lambda: extraction.itae(theta),
        "re-extract": lambda: extract(backbone, dataset, batch_size=args.batch, precision=precision),
        "forward": forward,
    }
    times = _common.time_interleaved(variants, device, repeats=args.repeats, warmup=0)
    ratio_extract = _common.median_ratio(times["re-extract"], times["itae(theta)"])
    ratio_forward = _common.median_ratio(times["forward"], times["itae(theta)"])
    print(f"\n{args.model}, {len(extraction)} images, {extraction.info.precision}, batch {args.batch}, {args.repeats} interleaved rounds")
    for name, seconds in times.items():
        print(f"  {name:<14} median {statistics.median(seconds):8.3f} s  ({len(extraction) / statistics.median(seconds):9.1f} img/s)")
    print(f"  re-extract / itae(theta) = {ratio_extract:,.0f}x  (target >= 100x: {'ok' if ratio_extract >= 100 else 'MISS'})")
    print(f"  forward    / itae(theta) = {ratio_forward:,.0f}x  (backbone alone, images already decoded)")
    print(f"  measured cache: {extraction.cache.nbytes_per_image() / 1024:.1f} KiB per image")

    checks = check_equal(extraction, backbone, dataset, precision)
    print("\nCached features vs full forward pass cls_features(model, x, theta):")
    for c in checks:
        print(f"  theta {c['theta']:.4f} (q{int(c['quantile'] * 100)})  max abs diff {c['max_abs_diff']:.2e}  {'ok' if c['ok'] else 'MISS'} (<= {TOLERANCE[precision]});"
              f"  attenuated {c['artifact_fraction']:.0%} of tokens, features moved up to {c['max_abs_change_vs_original']:.2e} from the original")

    names = ["dinov2_vits14", "dinov2_vitb14", "dinov2_vitl14", "dinov2_vitg14", "dinov2_vitg14_reg"]
    out = {
        "figure": "theta_change", "model": args.model, "images": len(extraction), "device": str(device),
        "precision": extraction.info.precision,
        "median_s": {name: statistics.median(s) for name, s in times.items()},
        "ratio_reextract_to_itae": ratio_extract, "ratio_forward_to_itae": ratio_forward,
        "measured_cache_bytes_per_image": extraction.cache.nbytes_per_image(),
        "equality": checks, "memory": memory_table(names),
    }
    _common.write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()
