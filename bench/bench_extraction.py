"""Figure 1: ITAE extraction throughput as a ratio to the plain timm model, same model, batch, precision, input.

Variants, each timed side by side with ``plain`` (``model.forward_features(x)``, timm as shipped):

- ``itae_cls``: ``itae.cls_features(model, x, theta, "minority")``, the CLS feature at one θ;
- ``extract_step``: what ``itae/extract.py`` runs per batch on the device: ``final_block_input`` +
  ``final_block_forward`` + the final norm + output norms + the CLS attention row;
- ``extract_step+host``: the same plus the copies to host memory that ``extract`` makes (features,
  norms, attention, the final-block cache).

A ratio is plain time / variant time (> 1: the variant is faster). Targets: >= 0.95 on CPU
(ViT-S/14, batch 16, at the precision ``auto`` picks: bf16 on a CPU with native bf16), >= 0.98 on a GPU (ViT-S/14 and ViT-B/14, bf16, batch >= 256).

    python bench/bench_extraction.py                                   # CPU, ViT-S/14, batch 16, precision auto
    python bench/bench_extraction.py --precision fp32                  # the float32 figure of earlier runs
    python bench/bench_extraction.py --device cuda --batch 256 --models dinov2_vits14 dinov2_vitb14
    python bench/bench_extraction.py --device cuda --batch 256 --compile   # opt-in torch.compile, a note only
"""
from __future__ import annotations

import argparse
import statistics

import torch

import _common
from itae import engine
from itae.backbones import load_backbone

THETA = 3.0


def plain(model, x):
    return model.forward_features(x)


def itae_cls(model, x):
    return engine.cls_features(model, x, THETA, "minority")


def itae_cls_body(model, x):
    """``cls_features``'s body without its ``inference_mode`` decorator, which torch.compile cannot trace."""
    block = model.blocks[-1]
    state = engine.final_block_state(block, engine.final_block_input(model, x))
    mask = engine.split_artifacts(state.query_norms, THETA, "minority")
    return engine.cls_output(block, model.norm, state, mask)[0]


def extract_step(model, x, to_host: bool = False):
    """The body of ``extract``'s batch loop (keep in step with ``itae/extract.py``)."""
    block = model.blocks[-1]
    tokens, state = engine.final_block_forward(block, engine.final_block_input(model, x))
    output = model.norm(tokens)
    results = [
        state.values.contiguous(),
        output[:, 0].float(),
        output.float().norm(dim=-1),
        state.query_norms,
        state.cls_logits.float().softmax(dim=-1),
        state.cls_input.float(),
        state.cls_logits.float(),
    ]
    if to_host:
        results = [r.cpu() for r in results]
    return results


def variants(model, x, device, precision, compile_: bool) -> dict:
    """name -> zero-argument callable, each under inference mode (no_grad when compiled) and the same autocast."""
    functions = {
        "plain": plain,
        "itae_cls": itae_cls,
        "extract_step": extract_step,
        "extract_step+host": lambda m, images: extract_step(m, images, to_host=True),
    }
    grad_off = torch.inference_mode
    if compile_:
        functions["itae_cls"] = itae_cls_body
        functions = {name: torch.compile(fn) for name, fn in functions.items()}
        grad_off = torch.no_grad  # inductor cannot compile a graph that creates inference tensors

    def run(fn):
        def call():
            with grad_off(), _common.autocast(device, precision):
                return fn(model, x)
        return call

    return {name: run(fn) for name, fn in functions.items()}


def bench_model(name: str, batch: int, device, precision: str, repeats: int, warmup: int, compile_: bool) -> dict:
    backbone = load_backbone(name, weights="random", device=device)
    size = backbone.spec.img_size
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    times = _common.time_interleaved(variants(backbone.model, x, device, precision, compile_), device, repeats, warmup)
    rows = {}
    for variant, seconds in times.items():
        per_round = [p / v for p, v in zip(times["plain"], seconds)]
        rows[variant] = {
            "median_s": statistics.median(seconds),
            "images_per_s": batch / statistics.median(seconds),
            "ratio_to_plain": statistics.median(per_round),
            "ratio_range": [min(per_round), max(per_round)],
        }
    return {"model": name, "batch": batch, "precision": precision, "repeats": repeats, "variants": rows}


def report(result: dict, target: float) -> None:
    print(f"\n{result['model']}  batch {result['batch']}  {result['precision']}  ({result['repeats']} interleaved rounds)")
    print(f"  {'variant':<20}{'median s':>10}{'img/s':>10}{'ratio to plain':>16}{'rounds min..max':>17}")
    for variant, row in result["variants"].items():
        flag = "" if variant == "plain" else ("  ok" if row["ratio_to_plain"] >= target else f"  MISS (target {target})")
        low, high = row["ratio_range"]
        print(f"  {variant:<20}{row['median_s']:>10.3f}{row['images_per_s']:>10.1f}{row['ratio_to_plain']:>16.3f}{low:>10.3f}..{high:.3f}{flag}")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common.add_device_args(parser)
    parser.add_argument("--models", nargs="+", default=None, help="registry names (default: dinov2_vits14; on CUDA also dinov2_vitb14)")
    parser.add_argument("--batch", type=int, default=None, help="images per call (default: 16 on CPU, 256 on CUDA)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--compile", action="store_true", help="torch.compile every variant (opt-in; GPU stretch)")
    args = parser.parse_args(argv)
    device, precision = _common.resolve(args.device, args.precision)
    cuda = device.type == "cuda"
    models = args.models or (["dinov2_vits14", "dinov2_vitb14"] if cuda else ["dinov2_vits14"])
    batch = args.batch or (256 if cuda else 16)
    target = 0.98 if cuda else 0.95
    _common.limit_threads(args.threads)
    print(_common.machine())
    results = []
    for name in models:
        results.append(bench_model(name, batch, device, precision, args.repeats, args.warmup, args.compile))
        report(results[-1], target)
    out = {"figure": "extraction", "device": str(device), "target": target, "compile": args.compile, "results": results}
    _common.write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()
