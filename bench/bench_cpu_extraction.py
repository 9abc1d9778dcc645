"""Figure 1b: extraction on a CPU, every candidate path as a ratio to plain timm float32.

Side by side, in rotating order (``bench/_common.py``), on ``--batch`` demo images (Fashion-MNIST test
images, embedded) with timm's random weights of the real sizes (speed does not depend on the weights):

- ``timm fp32``: ``model.forward_features(x)`` in float32 eager, on images already decoded: the reference;
- ``timm bf16 autocast``: the same under ``torch.autocast("cpu", dtype=torch.bfloat16)``;
- ``timm bf16 weights``: a copy of the model and the input cast to bfloat16 (LayerNorm, softmax and the
  residual stream in bf16 too);
- ``extract auto``: ``itae.extract.extract`` at ``precision="auto"``, decoding, preprocessing and the copies
  of the final-block cache included (``auto`` resolves as printed);
- ``extract fp32``: the same forced to float32;
- ``extract auto, 1 worker``: ``num_workers=1`` (decoding in a second process);
- ``extract auto, 1 thread``: ``torch.set_num_threads(1)`` around the call (only when torch has more).

A ratio is the reference's time / the variant's time (> 1: faster), the median over rounds. Targets for
``extract auto`` (issue 14): >= 3x on a CPU with AMX, >= 1.5x with AVX512-BF16 alone, >= 1x elsewhere.
``--compile`` adds ``timm bf16 autocast`` through ``torch.compile`` (inductor) and prints its compile time.

    python bench/bench_cpu_extraction.py                                   # ViT-S/14, batch 16 and 64
    python bench/bench_cpu_extraction.py --models dinov2_vits14 dinov2_vitb14 --batches 16 64
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import torch

import _common
from itae.backbones import load_backbone
from itae.data import balanced_subset, open_source
from itae.devices import native_bf16_flags
from itae.extract import extract, precision_path, resolve_precision


def variants(backbone, dataset, compile_: bool) -> tuple[dict, dict]:
    """(name -> zero-argument callable, notes) for one model and one batch of ``dataset``."""
    model = backbone.model
    x = torch.stack([backbone.preprocess(dataset.load(i)) for i in range(len(dataset))])
    cast = copy.deepcopy(model).to(torch.bfloat16)
    x_bf16 = x.to(torch.bfloat16)

    def timm_fp32():
        with torch.inference_mode():
            return model.forward_features(x)

    def timm_autocast():
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            return model.forward_features(x)

    def timm_cast():
        with torch.inference_mode():
            return cast.forward_features(x_bf16)

    found = {
        "timm fp32": timm_fp32,
        "timm bf16 autocast": timm_autocast,
        "timm bf16 weights": timm_cast,
        "extract auto": lambda: extract(backbone, dataset, batch_size=len(dataset), precision="auto"),
        "extract fp32": lambda: extract(backbone, dataset, batch_size=len(dataset), precision="fp32"),
        "extract auto, 1 worker": lambda: extract(backbone, dataset, batch_size=len(dataset), num_workers=1),
    }
    threads = torch.get_num_threads()
    if threads > 1:
        def one_thread():
            torch.set_num_threads(1)
            try:
                return extract(backbone, dataset, batch_size=len(dataset))
            finally:
                torch.set_num_threads(threads)

        found["extract auto, 1 thread"] = one_thread
    notes = {}
    if compile_:
        compiled = torch.compile(model.forward_features)

        def timm_compiled():
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # inductor refuses inference tensors
                return compiled(x)

        start = time.perf_counter()
        timm_compiled()
        notes["compile_s"] = time.perf_counter() - start
        found["timm bf16 autocast, compiled"] = timm_compiled
    return found, notes


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common.add_device_args(parser, precision=False)
    parser.add_argument("--models", nargs="+", default=["dinov2_vits14"])
    parser.add_argument("--batches", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="also torch.compile (inductor; minutes on 2 cores)")
    args = parser.parse_args(argv)
    if args.device != "cpu":
        parser.error("this figure is the CPU's: --device cpu (figure 1, bench_extraction.py, covers CUDA)")
    _common.limit_threads(args.threads)
    cpu = torch.device("cpu")
    print(_common.machine())
    print(f"native bf16: {', '.join(native_bf16_flags()) or 'none'}; extract auto: {precision_path(resolve_precision('auto', cpu), cpu)}")
    demo = open_source("demo")
    results = []
    for name in args.models:
        backbone = load_backbone(name, weights="random", device=cpu)
        for batch in args.batches:
            found, notes = variants(backbone, balanced_subset(demo, batch, seed=0), args.compile)
            times = _common.time_interleaved(found, cpu, args.repeats, warmup=1)
            reference = times["timm fp32"]
            rows = {
                variant: {
                    "images_per_s": batch / statistics.median(seconds),
                    "ratio": _common.median_ratio(reference, seconds),
                    "ratio_range": [min(r / s for r, s in zip(reference, seconds)), max(r / s for r, s in zip(reference, seconds))],
                }
                for variant, seconds in times.items()
            }
            results.append({"model": name, "batch": batch, "variants": rows, **notes})
            print(f"\n{name} (random weights), batch {batch}, {args.repeats} interleaved rounds; load average now "
                  f"{', '.join(f'{v:.1f}' for v in os.getloadavg())}")
            print(f"  {'variant':<30}{'img/s':>8}{'ratio to timm fp32':>20}{'rounds min..max':>18}")
            for variant, row in rows.items():
                low, high = row["ratio_range"]
                print(f"  {variant:<30}{row['images_per_s']:>8.1f}{row['ratio']:>20.2f}{low:>11.2f}..{high:.2f}")
            if "compile_s" in notes:
                print(f"  torch.compile: first call (compilation) {notes['compile_s']:.0f} s")
    out = {"figure": "cpu_extraction", "native_bf16": list(native_bf16_flags()), "results": results}
    _common.write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()
