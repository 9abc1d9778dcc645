"""The quick CPU suite (``make bench``): every figure at small sizes, then one summary of the ratios.

Each benchmark runs in its own process (memory and numba's first-call compile stay separate) with
the small arguments below; its full table is printed as it goes. For the sizes of the issue, run
the scripts one by one (see bench/README.md). On a CPU, K-Means runs on one thread: on a machine
shared with other jobs, OpenMP's spinning threads collapse when the cores are oversubscribed and
multi-thread timings of scikit-learn and faiss stop meaning anything. ``--device`` and ``--threads``
go to every script.

    python bench/run_all.py
    python bench/run_all.py --only kmeans extraction
    python bench/run_all.py --device cuda
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common

HERE = Path(__file__).resolve().parent

QUICK = {
    "extraction": ["--repeats", "5"],
    "theta_change": ["--images", "64", "--repeats", "3"],
    "kmeans": ["--sets", "1", "--dims", "384"],
    "end_to_end": ["--limit", "100", "--model", "dinov2_vits14", "--sets", "2", "--runs", "5"],
    "memory": ["--images", "300", "500"],
    "dashboard": ["--images", "100", "--repeats", "2"],
    "methods": ["--batch", "8", "--repeats", "3"],
}


def summary(name: str, r: dict) -> list[str]:
    """The headline lines of one benchmark's JSON results."""
    if name == "extraction":
        return [
            f"{m['model']} b{m['batch']} {m['precision']}: " + ", ".join(
                f"{v} {row['ratio_to_plain']:.3f}" for v, row in m["variants"].items() if v != "plain"
            ) + f" (x plain throughput; target >= {r['target']})"
            for m in r["results"]
        ]
    if name == "theta_change":
        worst = max(c["max_abs_diff"] for c in r["equality"])
        return [f"re-extract / itae(theta) = {r['ratio_reextract_to_itae']:,.0f}x (target >= 100x), "
                f"forward / itae = {r['ratio_forward_to_itae']:,.0f}x; cached vs forward max abs diff {worst:.1e}"]
    if name == "kmeans":
        return [
            f"{c['data']} K={c['k']} D={c['dim']}: " + ", ".join(
                f"{m} {row['speedup_vs_sklearn']:.2f}x ({row['inertia_gap_vs_sklearn']:+.2%})" for m, row in c["methods"].items()
            ) + f" (speed vs sklearn, inertia gap; threads: {c['threads']})"
            for c in r["results"]
        ]
    if name == "end_to_end":
        total = r["total_s"]
        return [f"{r['images']} images {r['model']}: " + ", ".join(f"{s.strip()} {v / total:.0%}" for s, v in r["stages_s"].items())]
    if name == "memory":
        return [f"growth {r['growth_per_image_bytes'] / 1024:.0f} KiB/image vs results {r['per_image_bytes'] / 1024:.0f} KiB/image; "
                + ", ".join(f"{row['images']}: beyond {row['beyond_bytes'] / 2**20:.0f} MiB" for row in r["rows"])]
    if name == "dashboard":
        return [f"{r['images']} images, ratio to first extraction: "
                + ", ".join(f"{s.strip()} {v:.3f}" for s, v in r["ratios"].items() if s != "first extraction")]
    if name == "methods":
        return [f"{r['model']} ({r['weights']}) b{r['batch']} {r['precision']}, x plain time per image: "
                + ", ".join(f"{m} {row['ratio_to_plain']:.2f}" for m, row in r["inference"].items() if m != "plain")]
    return []


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=list(QUICK), default=list(QUICK))
    parser.add_argument("--device", default="cpu", help="cpu or cuda, passed to every script")
    parser.add_argument("--threads", type=int, help="CPU threads of every script (default: all; K-Means on a CPU: 1)")
    args = parser.parse_args()
    print(_common.machine(), flush=True)
    results, failed = {}, []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.only:
            out = Path(tmp) / f"{name}.json"
            threads = args.threads or (1 if name == "kmeans" and args.device == "cpu" else None)
            command = [sys.executable, str(HERE / f"bench_{name}.py"), *QUICK[name], "--device", args.device,
                       *(["--threads", str(threads)] if threads else []), "--json", str(out)]
            print(f"\n=== {name}: {' '.join(command[1:-2])}", flush=True)
            start = time.perf_counter()
            if subprocess.run(command).returncode != 0 or not out.is_file():
                failed.append(name)
                continue
            results[name] = json.loads(out.read_text())
            print(f"({time.perf_counter() - start:.0f} s)", flush=True)
    print("\n=== summary")
    for name, result in results.items():
        for line in summary(name, result):
            print(f"{name:<13} {line}")
    for name in failed:
        print(f"{name:<13} FAILED (see its output above)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
